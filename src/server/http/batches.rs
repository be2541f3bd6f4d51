//! The OpenAI Batch API on top of async jobs (PROTOCOL §10): `POST /v1/files` (multipart,
//! `purpose=batch`, JSONL), `GET /v1/files/{id}`, `GET /v1/files/{id}/content`,
//! `POST /v1/batches`, `GET /v1/batches/{id}`, `POST /v1/batches/{id}/cancel`,
//! `GET /v1/batches`.
//!
//! A batch is a job per valid input line (so it runs with the key's limits, waits out momentary
//! ones, survives `kill -9`); a malformed line never aborts the batch, it goes to the error file.
//! A batch is finalized when it is looked at after its last job ended: the output file (one line
//! per succeeded request) and the error file (one per failed request or bad line) are written
//! then, once (compare-and-swap of the batch record).

use actix_multipart::Multipart;
use actix_web::{web, HttpResponse};
use futures_util::StreamExt;
use serde::Deserialize;

use super::jobs::new_job;
use crate::error::{ApiError, ErrorCode};
use crate::ids::unix_now;
use crate::server::auth::Client;
use crate::server::AppState;
use crate::store::{BadLine, BatchRecord, FileRecord, JobRequest, JobStatus, Settled};
use crate::tenant::Principal;
use crate::wire::openai::ChatCompletionRequest;

/// The largest file accepted.
const MAX_FILE_BYTES: usize = 64 << 20;
/// Lines of one batch, at most.
const MAX_LINES: usize = 50_000;
const ENDPOINT: &str = "/v1/chat/completions";

fn file_json(f: &FileRecord) -> serde_json::Value {
    serde_json::json!({
        "id": f.id, "object": "file", "bytes": f.bytes, "created_at": f.created_at,
        "filename": f.filename, "purpose": f.purpose, "status": "processed",
    })
}

pub async fn upload(
    Client(p): Client,
    state: web::Data<AppState>,
    mut form: Multipart,
) -> Result<HttpResponse, ApiError> {
    let mut purpose = None;
    let mut file: Option<(String, Vec<u8>)> = None;
    while let Some(field) = form.next().await {
        let mut field = field.map_err(|e| ApiError::bad_request(format!("multipart: {e}")))?;
        let name = field.name().unwrap_or_default().to_owned();
        let filename = field
            .content_disposition()
            .and_then(|cd| cd.get_filename())
            .unwrap_or("upload.jsonl")
            .to_owned();
        let mut bytes = Vec::new();
        while let Some(chunk) = field.next().await {
            let chunk = chunk.map_err(|e| ApiError::bad_request(format!("multipart: {e}")))?;
            if bytes.len() + chunk.len() > MAX_FILE_BYTES {
                return Err(ApiError::new(ErrorCode::TooLarge, "file over 64 MiB"));
            }
            bytes.extend_from_slice(&chunk);
        }
        match name.as_str() {
            "purpose" => purpose = Some(String::from_utf8_lossy(&bytes).trim().to_owned()),
            "file" => file = Some((filename, bytes)),
            _ => {}
        }
    }
    let purpose = purpose.ok_or_else(|| ApiError::bad_request("purpose: required"))?;
    if purpose != "batch" {
        return Err(ApiError::bad_request(format!(
            "purpose: {purpose:?} is not supported (only \"batch\")"
        )));
    }
    let (filename, bytes) = file.ok_or_else(|| ApiError::bad_request("file: required"))?;
    let rec = FileRecord {
        id: format!("file-{}", uuid::Uuid::new_v4().simple()),
        tenant: p.tenant.clone(),
        purpose,
        filename,
        bytes: bytes.len() as u64,
        created_at: unix_now(),
    };
    state.store().put_file(&rec, &bytes).await?;
    Ok(HttpResponse::Ok().json(file_json(&rec)))
}

fn owned_file(state: &AppState, p: &Principal, id: &str) -> Result<FileRecord, ApiError> {
    state
        .store()
        .file(id, &p.tenant)?
        .ok_or_else(|| ApiError::not_found("file"))
}

pub async fn get_file(
    Client(p): Client,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(file_json(&owned_file(&state, &p, &id)?)))
}

pub async fn file_content(
    Client(p): Client,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let f = owned_file(&state, &p, &id)?;
    let bytes = state.store().file_content(&f.id)?.unwrap_or_default();
    Ok(HttpResponse::Ok()
        .content_type("application/jsonl")
        .body(bytes))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewBatch {
    input_file_id: String,
    endpoint: String,
    completion_window: String,
    metadata: Option<serde_json::Value>,
}

/// One input line, as the Batch API writes them.
#[derive(Deserialize)]
struct Line {
    custom_id: String,
    method: String,
    url: String,
    body: serde_json::Value,
}

fn check_line(
    p: &Principal,
    raw: &str,
) -> Result<(String, serde_json::Value), (Option<String>, String)> {
    let line: Line = serde_json::from_str(raw).map_err(|e| {
        let custom = serde_json::from_str::<serde_json::Value>(raw)
            .ok()
            .and_then(|v| v["custom_id"].as_str().map(str::to_owned));
        (custom, format!("not a batch request line: {e}"))
    })?;
    let id = Some(line.custom_id.clone());
    if line.method != "POST" {
        return Err((id, format!("method: {:?} is not POST", line.method)));
    }
    if line.url != ENDPOINT {
        return Err((id, format!("url: {:?} is not {ENDPOINT}", line.url)));
    }
    let req: ChatCompletionRequest = serde_json::from_value(line.body.clone())
        .map_err(|e| (id.clone(), format!("body: {e}")))?;
    if req.stream {
        return Err((id, "body.stream: a batch request is answered whole".into()));
    }
    p.check_model(&req.model)
        .map_err(|e| (id.clone(), e.message))?;
    Ok((line.custom_id, line.body))
}

pub async fn create(
    Client(p): Client,
    state: web::Data<AppState>,
    body: web::Json<NewBatch>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    if body.endpoint != ENDPOINT {
        return Err(ApiError::bad_request(format!(
            "endpoint: only {ENDPOINT} is supported"
        )));
    }
    if body.completion_window != "24h" {
        return Err(ApiError::bad_request(
            "completion_window: only \"24h\" is supported",
        ));
    }
    let file = owned_file(&state, &p, &body.input_file_id)?;
    let content = state.store().file_content(&file.id)?.unwrap_or_default();
    let text = String::from_utf8_lossy(&content);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return Err(ApiError::bad_request("input file: no request lines"));
    }
    if lines.len() > MAX_LINES {
        return Err(ApiError::bad_request(format!(
            "input file: over {MAX_LINES} lines"
        )));
    }
    let id = format!("batch_{}", uuid::Uuid::new_v4().simple());
    let created_ms = chrono::Utc::now().timestamp_millis();
    let window_ms = i64::try_from(state.config.jobs.batch_window_secs)
        .unwrap_or(i64::MAX / 2_000)
        .saturating_mul(1_000);
    // Whole seconds, as the API shows it, never before the window has passed.
    let expires_at = created_ms.saturating_add(window_ms).saturating_add(999) / 1_000;
    let mut jobs = Vec::new();
    let mut records = Vec::new();
    let mut bad = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (n, raw) in lines.iter().enumerate() {
        match check_line(&p, raw) {
            Ok((custom_id, _)) if !seen.insert(custom_id.clone()) => bad.push(BadLine {
                line: n + 1,
                custom_id: Some(custom_id),
                message: "custom_id: used by an earlier line".into(),
            }),
            Ok((custom_id, request)) => {
                let meta = serde_json::json!({"batch_id": id, "custom_id": custom_id});
                let mut job = new_job(&p, JobRequest::Chat { body: request }, None, meta);
                job.deadline_ms = Some(expires_at.saturating_mul(1_000));
                jobs.push((custom_id, job.id.clone()));
                records.push(job);
            }
            Err((custom_id, message)) => bad.push(BadLine {
                line: n + 1,
                custom_id,
                message,
            }),
        }
    }
    // Every line's job, durable with one flush.
    state.store().put_jobs(&records).await?;
    state.jobs.wake();
    let now = created_ms / 1_000;
    let rec = BatchRecord {
        id,
        tenant: p.tenant.clone(),
        endpoint: body.endpoint,
        input_file_id: file.id,
        completion_window: body.completion_window,
        status: "in_progress".into(),
        created_at: now,
        created_ms,
        in_progress_at: Some(now),
        finalizing_at: None,
        completed_at: None,
        cancelling_at: None,
        cancelled_at: None,
        jobs,
        bad,
        output_file_id: None,
        error_file_id: None,
        completed: 0,
        failed: 0,
        metadata: body.metadata.unwrap_or(serde_json::Value::Null),
        expires_at,
        expired_at: None,
        settled: Settled::default(),
    };
    state.store().put_batch(&rec).await?;
    let rec = refresh(&state, &rec.id).await?;
    Ok(HttpResponse::Ok().json(batch_json(&rec)))
}

fn batch_json(b: &BatchRecord) -> serde_json::Value {
    let total = b.jobs.len() + b.bad.len();
    serde_json::json!({
        "id": b.id, "object": "batch", "endpoint": b.endpoint, "errors": null,
        "input_file_id": b.input_file_id, "completion_window": b.completion_window,
        "status": shown_status(&b.status), "output_file_id": b.output_file_id, "error_file_id": b.error_file_id,
        "created_at": b.created_at, "in_progress_at": b.in_progress_at,
        "expires_at": b.deadline(), "finalizing_at": b.finalizing_at,
        "completed_at": b.completed_at, "failed_at": null, "expired_at": b.expired_at,
        "cancelling_at": b.cancelling_at, "cancelled_at": b.cancelled_at,
        "request_counts": {"total": total, "completed": b.completed, "failed": b.failed + b.bad.len()},
        "metadata": b.metadata,
    })
}

/// The status the API shows: a batch whose last requests are being stopped because it expired
/// is finalizing (the SDKs know no `expiring`).
fn shown_status(status: &str) -> &str {
    match status {
        "expiring" => "finalizing",
        s => s,
    }
}

/// A poll of a running batch stops reading after this many jobs in a row that have not
/// ended: workers take jobs in order, so what lies behind has not started. (With more workers
/// than this across the nodes, a running batch's counts can lag; its end is never missed, as
/// a batch whose jobs have all ended has no such run.)
const SCAN_AHEAD: usize = 256;

/// The batch as it is now: past its deadline it expires (requests not yet ended are
/// cancelled), its counts are brought up to date, and the output and error files are written
/// once its last job has ended. A poll reads the jobs after the leading ones known to have
/// ended ([`Settled`]), up to [`SCAN_AHEAD`] unended ones in a row.
async fn refresh(state: &AppState, id: &str) -> Result<BatchRecord, ApiError> {
    let store = state.store();
    loop {
        let (rec, raw) = store
            .batch_raw(id)?
            .ok_or_else(|| ApiError::not_found("batch"))?;
        if !matches!(
            rec.status.as_str(),
            "in_progress" | "cancelling" | "expiring"
        ) {
            return Ok(rec);
        }
        // Every unended job is wanted when the batch is being stopped (or is due to be).
        let whole = rec.status != "in_progress" || rec.due();
        let mut settled = rec.settled;
        let (mut completed, mut failed) = (0, 0);
        let mut pending = Vec::new();
        let mut in_a_row = 0;
        let mut read_all = true;
        for (i, (_, job_id)) in rec.jobs.iter().enumerate().skip(settled.upto) {
            match store.job_raw(job_id)? {
                Some((job, _)) if job.status.finished() => {
                    let ok = job.status == JobStatus::Succeeded;
                    in_a_row = 0;
                    if settled.upto == i {
                        settled.upto = i + 1;
                        settled.completed += usize::from(ok);
                        settled.failed += usize::from(!ok);
                    } else {
                        completed += usize::from(ok);
                        failed += usize::from(!ok);
                    }
                }
                _ => {
                    pending.push(job_id);
                    in_a_row += 1;
                    if !whole && in_a_row >= SCAN_AHEAD {
                        read_all = false;
                        break;
                    }
                }
            }
        }
        let all_ended = read_all && pending.is_empty();
        if !all_ended && rec.status == "in_progress" && rec.due() && expire_due(state, id).await? {
            continue;
        }
        if rec.status != "in_progress" {
            // Being stopped: whatever a crash or a failed write left queued is stopped now.
            for job_id in pending {
                cancel_job(state, job_id, true).await?;
            }
        }
        let mut next = rec.clone();
        next.settled = settled;
        next.completed = settled.completed + completed;
        next.failed = settled.failed + failed;
        if all_ended {
            // Once per batch: every job read again for the result files.
            let mut ended = Vec::with_capacity(rec.jobs.len());
            for (custom_id, job_id) in &rec.jobs {
                if let Some((job, _)) = store.job_raw(job_id)? {
                    ended.push((custom_id.clone(), job));
                }
            }
            let now = unix_now();
            let (output, errors) = result_files(&rec, &ended);
            next.output_file_id = Some(write_file(state, &rec, "output", output).await?);
            next.error_file_id = Some(write_file(state, &rec, "error", errors).await?);
            next.finalizing_at = Some(now);
            if rec.status == "cancelling" {
                next.status = "cancelled".into();
                next.cancelled_at = Some(now);
            } else if rec.status == "expiring" {
                next.status = "expired".into();
                next.expired_at = Some(now);
            } else {
                next.status = "completed".into();
                next.completed_at = Some(now);
            }
        } else if next.completed == rec.completed
            && next.failed == rec.failed
            && next.settled == rec.settled
        {
            return Ok(rec);
        }
        if store.swap_batch(&raw, &next).await? {
            return Ok(next);
        }
    }
}

fn result_files(
    rec: &BatchRecord,
    ended: &[(String, crate::store::JobRecord)],
) -> (String, String) {
    let mut output = String::new();
    let mut errors = String::new();
    let line = |v: serde_json::Value, into: &mut String| {
        into.push_str(&v.to_string());
        into.push('\n');
    };
    for (custom_id, job) in ended {
        let req_id = format!("batch_req_{}", job.id.trim_start_matches("job_"));
        match (job.status, &job.result, &job.error) {
            (JobStatus::Succeeded, Some(body), _) => line(
                serde_json::json!({"id": req_id, "custom_id": custom_id, "response": {"status_code": 200, "request_id": job.id, "body": body}, "error": null}),
                &mut output,
            ),
            (JobStatus::Cancelled, _, None)
                if rec.status == "expiring"
                    && job.finished_at.is_some_and(|f| f >= rec.deadline()) =>
            {
                line(
                    serde_json::json!({"id": req_id, "custom_id": custom_id, "response": null, "error": {"code": "batch_expired", "message": "the batch expired before this request ended"}}),
                    &mut errors,
                );
            }
            (_, _, error) => {
                let (code, message) = error.as_ref().map_or(
                    (ErrorCode::Internal, "cancelled before it ran".to_owned()),
                    |e| (e.code, e.message.clone()),
                );
                let status = if job.status == JobStatus::Cancelled {
                    499
                } else {
                    code.status().as_u16()
                };
                line(
                    serde_json::json!({"id": req_id, "custom_id": custom_id, "response": {"status_code": status, "request_id": job.id, "body": {"error": {"message": message, "type": code.openai_type(), "code": code.as_str()}}}, "error": {"code": code.as_str(), "message": message}}),
                    &mut errors,
                );
            }
        }
    }
    for b in &rec.bad {
        line(
            serde_json::json!({"id": format!("batch_req_line_{}", b.line), "custom_id": b.custom_id, "response": null, "error": {"code": "invalid_request", "message": format!("line {}: {}", b.line, b.message), "line": b.line}}),
            &mut errors,
        );
    }
    (output, errors)
}

async fn write_file(
    state: &AppState,
    rec: &BatchRecord,
    kind: &str,
    content: String,
) -> Result<String, ApiError> {
    let file = FileRecord {
        id: format!("file-{}", uuid::Uuid::new_v4().simple()),
        tenant: rec.tenant.clone(),
        purpose: "batch_output".into(),
        filename: format!("{}_{kind}.jsonl", rec.id),
        bytes: content.len() as u64,
        created_at: unix_now(),
    };
    state.store().put_file(&file, content.as_bytes()).await?;
    Ok(file.id)
}

fn owned_batch(state: &AppState, p: &Principal, id: &str) -> Result<(), ApiError> {
    match state.store().batch_raw(id)? {
        Some((b, _)) if b.tenant == p.tenant => Ok(()),
        _ => Err(ApiError::not_found("batch")),
    }
}

pub async fn get(
    Client(p): Client,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    owned_batch(&state, &p, &id)?;
    Ok(HttpResponse::Ok().json(batch_json(&refresh(&state, &id).await?)))
}

pub async fn cancel(
    Client(p): Client,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    owned_batch(&state, &p, &id)?;
    stop(&state, &id, |rec| {
        let mut next = rec.clone();
        next.status = "cancelling".into();
        next.cancelling_at = Some(unix_now());
        Some(next)
    })
    .await?;
    Ok(HttpResponse::Ok().json(batch_json(&refresh(&state, &id).await?)))
}

/// Expires batch `id` if it is running past its deadline: it becomes `expiring` and every job
/// of it not yet ended is cancelled. Whether it did.
///
/// # Errors
/// Storage failures.
pub async fn expire_due(state: &AppState, id: &str) -> Result<bool, ApiError> {
    let expired = stop(state, id, |rec| {
        rec.due().then(|| {
            let mut next = rec.clone();
            next.status = "expiring".into();
            next
        })
    })
    .await?;
    if expired {
        tracing::info!(batch = %id, "batch expired; requests not ended are cancelled");
    }
    Ok(expired)
}

/// Moves a running batch to the stopping state `to` makes of it (`None`: leave it running),
/// then cancels its jobs that have not ended. Whether this call stopped it.
async fn stop(
    state: &AppState,
    id: &str,
    to: impl Fn(&BatchRecord) -> Option<BatchRecord>,
) -> Result<bool, ApiError> {
    let store = state.store();
    loop {
        let Some((rec, raw)) = store.batch_raw(id)? else {
            return Ok(false);
        };
        if rec.status != "in_progress" {
            return Ok(false);
        }
        let Some(next) = to(&rec) else {
            return Ok(false);
        };
        if store.swap_batch(&raw, &next).await? {
            stop_jobs(state, &rec).await?;
            return Ok(true);
        }
    }
}

/// Cancels every job of a batch that has not ended (cancelled or expired).
async fn stop_jobs(state: &AppState, rec: &BatchRecord) -> Result<(), ApiError> {
    // Queued jobs first: a worker freed by stopping a running one finds none left.
    for running in [false, true] {
        for (_, job_id) in &rec.jobs {
            cancel_job(state, job_id, running).await?;
        }
    }
    Ok(())
}

/// Cancels job `id` if it is queued (or, with `running`, whatever its state) and not ended.
///
/// # Errors
/// Storage failures.
pub async fn cancel_job(state: &AppState, id: &str, running: bool) -> Result<(), ApiError> {
    loop {
        let Some((job, raw)) = state.store().job_raw(id)? else {
            return Ok(());
        };
        if job.status.finished() || (!running && job.status != JobStatus::Queued) {
            return Ok(());
        }
        if job.cancel_requested {
            // Asked already (its node stops it): nothing to write again.
            state.jobs.cancel(id);
            return Ok(());
        }
        let mut next = job;
        next.cancel_requested = true;
        if next.status == JobStatus::Queued {
            next.status = JobStatus::Cancelled;
            next.finished_at = Some(unix_now());
        }
        if state.store().swap_job(&raw, &next).await? {
            state.jobs.cancel(id);
            return Ok(());
        }
    }
}

pub async fn list(
    Client(p): Client,
    state: web::Data<AppState>,
    q: web::Query<super::CursorPage>,
) -> Result<HttpResponse, ApiError> {
    let limit = q.limit();
    let ids = state.store().tenant_batches(&p.tenant, 10_000)?;
    let start = q
        .after
        .as_ref()
        .and_then(|a| ids.iter().position(|i| i == a).map(|i| i + 1))
        .unwrap_or(0);
    let mut data = Vec::new();
    for id in ids.iter().skip(start).take(limit) {
        data.push(batch_json(&refresh(&state, id).await?));
    }
    let has_more = ids.len() > start + data.len();
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "object": "list",
        "data": data,
        "first_id": data.first().map(|b| b["id"].clone()),
        "last_id": data.last().map(|b| b["id"].clone()),
        "has_more": has_more,
    })))
}
