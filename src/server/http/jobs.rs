//! `POST /v1/jobs`, `GET /v1/jobs/{id}`, `GET /v1/jobs?status=`, `DELETE /v1/jobs/{id}`
//! (PROTOCOL §10): see `crate::jobs`.

use actix_web::{web, HttpResponse};
use serde::Deserialize;

use crate::error::ApiError;
use crate::ids::unix_now;
use crate::server::auth::Client;
use crate::server::AppState;
use crate::store::{JobRecord, JobRequest, JobStatus};
use crate::wire::openai::ChatCompletionRequest;

/// Jobs listed at most.
const LIST_LIMIT: usize = 1_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewJob {
    request: Option<serde_json::Value>,
    conversation: Option<String>,
    content: Option<serde_json::Value>,
    client_id: Option<String>,
    webhook: Option<serde_json::Value>,
    metadata: Option<serde_json::Value>,
}

/// The job as clients see it.
pub fn job_json(rec: &JobRecord) -> serde_json::Value {
    let (kind, request) = match &rec.request {
        JobRequest::Chat { body } => ("chat.completion", serde_json::json!({"request": body})),
        JobRequest::Turn {
            conversation,
            content,
            client_id,
        } => (
            "conversation.turn",
            serde_json::json!({"conversation": conversation, "content": content, "client_id": client_id}),
        ),
    };
    let mut v = serde_json::json!({
        "id": rec.id,
        "object": "job",
        "kind": kind,
        "status": rec.status,
        "created_at": rec.created_at,
        "started_at": rec.started_at,
        "finished_at": rec.finished_at,
        "metadata": rec.metadata,
        "result": rec.result,
        "error": rec.error,
        "attempts": rec.attempts,
        "webhook": rec.webhook.as_ref().map(|w| serde_json::json!({"url": w.url})),
        "deliveries": rec.webhook.as_ref().map_or_else(Vec::new, |w| w.deliveries.clone()),
    });
    if let (Some(obj), Some(req)) = (v.as_object_mut(), request.as_object()) {
        obj.extend(req.clone());
    }
    v
}

pub async fn create(
    Client(p): Client,
    state: web::Data<AppState>,
    req: actix_web::HttpRequest,
    body: web::Json<NewJob>,
) -> Result<HttpResponse, ApiError> {
    // A job runs later, without its request's headers: a tier header would be lost.
    if super::stateless::tier_header(&req)?.is_some() {
        return Err(ApiError::bad_request(
            "x-parley-tier: not taken on a job (it runs later, without the request's headers); a job's turns and completions are routed by their difficulty",
        ));
    }
    let body = body.into_inner();
    let webhook = match &body.webhook {
        None => None,
        Some(w) => {
            let url = w
                .get("url")
                .and_then(serde_json::Value::as_str)
                .ok_or_else(|| ApiError::bad_request("webhook.url: required"))?;
            if w.as_object().is_some_and(|o| o.len() > 1) {
                return Err(ApiError::bad_request("webhook: only url is known"));
            }
            if state.store().webhook_secret(&p.tenant)?.is_none() {
                return Err(ApiError::bad_request(
                    "webhook: this tenant has no signing secret yet (POST /admin/webhook-secrets)",
                ));
            }
            crate::webhooks::check_url(url, state.config.jobs.allow_private_webhooks).await?;
            Some(crate::store::WebhookState {
                url: url.to_owned(),
                msg_id: String::new(),
                deliveries: Vec::new(),
                done: false,
                first_ms: None,
            })
        }
    };
    if body.metadata.as_ref().is_some_and(|m| !m.is_object()) {
        return Err(ApiError::bad_request("metadata must be an object"));
    }
    let request = match (body.request, body.conversation) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "give request (a chat completion) or conversation (a turn), not both",
            ))
        }
        (Some(_), None) if body.content.is_some() || body.client_id.is_some() => {
            return Err(ApiError::bad_request(
                "content and client_id belong to a conversation turn, not to a request",
            ))
        }
        (Some(req), None) => {
            // Checked now, so a malformed body is refused here, not failed later.
            let parsed: ChatCompletionRequest = serde_json::from_value(req.clone())
                .map_err(|e| ApiError::bad_request(format!("request: {e}")))?;
            p.check_model(&parsed.model)?;
            if parsed.stream {
                return Err(ApiError::bad_request(
                    "request.stream: a job's answer is stored whole; leave stream unset",
                ));
            }
            JobRequest::Chat { body: req }
        }
        (None, Some(conversation)) => {
            let id = crate::ids::ConversationId::parse(&conversation)
                .ok_or_else(|| ApiError::not_found("conversation"))?;
            state.store().owned_conversation(&id, &p.tenant)?;
            let content = body
                .content
                .ok_or_else(|| ApiError::bad_request("content: required with conversation"))?;
            let client_id = body
                .client_id
                .ok_or_else(|| ApiError::bad_request("client_id: required with conversation"))?;
            crate::ids::check_client_id(&client_id).map_err(ApiError::bad_request)?;
            JobRequest::Turn {
                conversation,
                content,
                client_id,
            }
        }
        (None, None) => {
            return Err(ApiError::bad_request(
                "request (a chat completion) or conversation (a turn) is required",
            ))
        }
    };
    let rec = enqueue(
        &state,
        &p,
        request,
        webhook,
        body.metadata.unwrap_or_else(|| serde_json::json!({})),
    )
    .await?;
    Ok(HttpResponse::Accepted().json(job_json(&rec)))
}

/// Stores a new queued job (durably) and wakes the workers.
///
/// # Errors
/// Storage failures.
pub async fn enqueue(
    state: &AppState,
    p: &crate::tenant::Principal,
    request: JobRequest,
    webhook: Option<crate::store::WebhookState>,
    metadata: serde_json::Value,
) -> Result<JobRecord, ApiError> {
    let rec = new_job(p, request, webhook, metadata);
    // Durable before the 202.
    state.store().put_jobs(std::slice::from_ref(&rec)).await?;
    state.jobs.wake();
    Ok(rec)
}

/// A new queued job's record (not stored yet).
pub fn new_job(
    p: &crate::tenant::Principal,
    request: JobRequest,
    webhook: Option<crate::store::WebhookState>,
    metadata: serde_json::Value,
) -> JobRecord {
    // Time-ordered ids: jobs made in the same millisecond (a batch's lines) queue in the order
    // they were made.
    let id = format!("job_{}", uuid::Uuid::now_v7().simple());
    let webhook = webhook.map(|mut w| {
        w.msg_id = format!("msg_{}", id.trim_start_matches("job_"));
        w
    });
    JobRecord {
        id,
        tenant: p.tenant.clone(),
        key_id: p.key_id.clone(),
        status: JobStatus::Queued,
        created_at: unix_now(),
        created_ms: chrono::Utc::now().timestamp_millis(),
        started_at: None,
        finished_at: None,
        request,
        metadata,
        result: None,
        error: None,
        attempts: 0,
        claimed_by: None,
        cancel_requested: false,
        webhook,
        deadline_ms: None,
    }
}

fn owned(
    state: &AppState,
    p: &crate::tenant::Principal,
    id: &str,
) -> Result<(JobRecord, Vec<u8>), ApiError> {
    match state.store().job_raw(id)? {
        Some((rec, raw)) if rec.tenant == p.tenant => Ok((rec, raw)),
        _ => Err(ApiError::not_found("job")),
    }
}

pub async fn get(
    Client(p): Client,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let (rec, _) = owned(&state, &p, &id)?;
    Ok(HttpResponse::Ok().json(job_json(&rec)))
}

/// `?status=` only: the list is the tenant's newest jobs (paging is not offered; a `limit` or
/// `after` is refused rather than ignored).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    status: Option<String>,
}

pub async fn list(
    Client(p): Client,
    state: web::Data<AppState>,
    q: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let wanted = match q.status.as_deref() {
        Some(s) => Some(JobStatus::parse(s).ok_or_else(|| {
            ApiError::bad_request(format!(
                "status: {s:?} is not queued, running, succeeded, failed or cancelled"
            ))
        })?),
        None => None,
    };
    let data: Vec<_> = state
        .store()
        .tenant_jobs(&p.tenant, LIST_LIMIT)?
        .iter()
        .filter(|j| wanted.is_none_or(|w| j.status == w))
        .map(job_json)
        .collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({"object": "list", "data": data})))
}

pub async fn cancel(
    Client(p): Client,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    loop {
        let (rec, raw) = owned(&state, &p, &id)?;
        if rec.status.finished() {
            return Err(ApiError::bad_request(format!(
                "the job has already ended ({})",
                serde_json::to_value(rec.status)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            )));
        }
        let mut next = rec.clone();
        next.cancel_requested = true;
        if next.status == JobStatus::Queued {
            next.status = JobStatus::Cancelled;
            next.finished_at = Some(unix_now());
        }
        if state.store().swap_job(&raw, &next).await? {
            // Running here: stopped now; running on another node: ends cancelled there.
            state.jobs.cancel(&next.id);
            return Ok(HttpResponse::Ok().json(job_json(&next)));
        }
    }
}
