//! Async jobs (PROTOCOL §10): requests handed over now and answered later.
//!
//! A job is stored before `POST /v1/jobs` answers 202. A small pool of workers (`[jobs]
//! workers`, 2 by default, so a backlog never takes more than that from interactive traffic)
//! claims queued jobs oldest first by compare-and-swap of their record, runs them through the
//! same paths as `POST /v1/chat/completions` and `POST /v1/conversations/{id}/messages` (so the
//! key's limits, quotas, guards, cache and usage apply), and stores the end once. A limit that is
//! only momentary (`rate_limited`) makes the job wait and try again; a budget spent
//! (`quota_exceeded`) fails it. After a crash, the jobs this node was running are queued again:
//! a chat job runs again (its result was never stored), a turn job is idempotent by its
//! `client_id` (its stored reply is answered, not run twice).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix_web::web;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::error::{ApiError, ErrorCode};
use crate::ids::unix_now;
use crate::server::http::batches;
use crate::server::AppState;
use crate::store::{JobError, JobRecord, JobRequest, JobStatus};
use crate::tenant::Principal;

/// How often idle workers look at the queue (a submission wakes them at once).
const POLL: Duration = Duration::from_millis(500);
/// Longest wait for a momentary limit before trying again.
const MAX_WAIT: Duration = Duration::from_secs(30);
/// Tries of a job whose storage or upstream is unavailable before it fails.
const UNAVAILABLE_TRIES: u32 = 5;

/// The handle handlers use: wakes the workers, cancels running jobs.
#[derive(Clone, Default)]
pub struct Jobs {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    wake: Notify,
    deliver: Notify,
    running: Mutex<HashMap<String, CancellationToken>>,
}

impl Jobs {
    /// A job was queued: a worker looks now.
    pub fn wake(&self) {
        self.inner.wake.notify_one();
    }

    /// A webhook became due: the deliverer looks now.
    pub fn wake_deliveries(&self) {
        self.inner.deliver.notify_one();
    }

    /// Cancels job `id` if a worker of this node runs it.
    pub fn cancel(&self, id: &str) {
        if let Some(token) = self.inner.running.lock().get(id) {
            token.cancel();
        }
    }

    /// Starts `workers` workers, after queueing again what this node was running when it
    /// stopped (a crash leaves such jobs).
    pub fn start(
        &self,
        state: web::Data<AppState>,
        node: String,
        workers: usize,
        stop: CancellationToken,
    ) {
        let jobs = self.clone();
        actix::spawn(async move {
            requeue_orphans(&state, |claimed| claimed == node).await;
            for _ in 0..workers.max(1) {
                let (jobs, state, node, stop) =
                    (jobs.clone(), state.clone(), node.clone(), stop.clone());
                actix::spawn(async move { jobs.work(state, node, stop).await });
            }
            jobs.wake();
            if let Some(cluster) = state.cluster().cloned() {
                // Jobs a dead node was running: its announcement lapses with its leases, and
                // then any node queues them again.
                let (state, stop) = (state.clone(), stop.clone());
                actix::spawn(async move {
                    loop {
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(cluster.lease()) => {}
                        }
                        requeue_orphans(&state, |claimed| !cluster.alive(claimed)).await;
                    }
                });
            }
            let retention = state.config.jobs.retention_days;
            if retention > 0 {
                let (state, stop) = (state.clone(), stop.clone());
                actix::spawn(async move { sweep(&state, retention, &stop).await });
            }
            let deliverer = jobs.clone();
            actix::spawn(async move { deliverer.deliver(state, stop).await });
        });
    }

    /// Delivers due webhooks until `stop`.
    async fn deliver(self, state: web::Data<AppState>, stop: CancellationToken) {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_default();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.inner.deliver.notified() => {}
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
            let now = chrono::Utc::now().timestamp_millis();
            let lease = now + 60_000;
            let due = match state.store().take_due_webhooks(now, lease, 16) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "webhooks due unreadable");
                    continue;
                }
            };
            for id in due {
                if let Err(e) = crate::webhooks::attempt(&state, &client, &id, lease).await {
                    tracing::warn!(job = %id, error = %e, "webhook attempt not recorded");
                }
            }
        }
    }

    async fn work(self, state: web::Data<AppState>, node: String, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.inner.wake.notified() => {}
                () = tokio::time::sleep(POLL) => {}
            }
            loop {
                if stop.is_cancelled() {
                    return;
                }
                match claim(&state, &node).await {
                    Ok(Some(job)) => {
                        // Others may be waiting too.
                        self.inner.wake.notify_one();
                        self.run(&state, job, &stop).await;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "job queue unreadable");
                        break;
                    }
                }
            }
        }
    }

    async fn run(&self, state: &AppState, job: JobRecord, stop: &CancellationToken) {
        let token = stop.child_token();
        self.inner
            .running
            .lock()
            .insert(job.id.clone(), token.clone());
        let outcome = tokio::select! {
            out = execute(state, &job) => Some(out),
            () = token.cancelled() => None,
        };
        self.inner.running.lock().remove(&job.id);
        if outcome.is_none() && stop.is_cancelled() {
            // Shutting down: the job stays `running` on this node and is queued again at the
            // next start.
            return;
        }
        if let Err(e) = finish(state, &job.id, outcome).await {
            tracing::error!(job = %job.id, error = %e, "job end not stored");
        }
    }
}

/// Queued jobs a claim looks at, at most (in pages of 32): past turn jobs that wait for
/// another node, a worker still finds the ones it may run.
const CLAIM_SCAN: usize = 256;

/// Takes the oldest queued job for `node`, if there is one.
async fn claim(state: &AppState, node: &str) -> Result<Option<JobRecord>, ApiError> {
    let store = state.store();
    // Per conversation: whether another node runs it (asked of Redis once per claim).
    let mut elsewhere: HashMap<String, bool> = HashMap::new();
    // Batches this claim found past their deadline.
    let mut expired: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut after: Option<Vec<u8>> = None;
    let mut seen = 0;
    while seen < CLAIM_SCAN {
        let page = store.queued_jobs(after.as_deref(), 32)?;
        let Some((last, _)) = page.last() else {
            break;
        };
        after = Some(last.clone());
        seen += page.len();
        for (_, id) in page {
            let Some((rec, raw)) = store.job_raw(&id)? else {
                continue;
            };
            if rec.status != JobStatus::Queued {
                store.unqueue_job(&rec)?;
                continue;
            }
            // A batch line past its batch's deadline never starts: the batch expires (once per
            // claim at most), and the line is cancelled with it.
            let now_ms = chrono::Utc::now().timestamp_millis();
            if rec.deadline_ms.is_some_and(|d| now_ms >= d) {
                if let Some(batch) = rec.metadata["batch_id"].as_str() {
                    if expired.insert(batch.to_owned()) {
                        batches::expire_due(state, batch).await?;
                    }
                }
                batches::cancel_job(state, &id, false).await?;
                continue;
            }
            if let JobRequest::Turn { conversation, .. } = &rec.request {
                let skip = *elsewhere
                    .entry(conversation.clone())
                    .or_insert_with(|| runs_elsewhere(state, conversation));
                if skip {
                    // The node running its conversation takes it (a worker here could only
                    // wait for that node to let the conversation go).
                    continue;
                }
            }
            let mut next = rec.clone();
            next.status = JobStatus::Running;
            next.started_at = Some(unix_now());
            next.attempts += 1;
            next.claimed_by = Some(node.to_owned());
            if store.swap_job(&raw, &next).await? {
                return Ok(Some(next));
            }
        }
    }
    Ok(None)
}

/// Cluster mode: whether another live node runs `conversation` now.
fn runs_elsewhere(state: &AppState, conversation: &str) -> bool {
    let (Some(cluster), Some(id)) = (
        state.cluster(),
        crate::ids::ConversationId::parse(conversation),
    ) else {
        return false;
    };
    matches!(
        cluster.owner(&id),
        Ok(Some(crate::cluster::Owner::There { .. }))
    )
}

/// Every hour (and at start), removes what ended more than `days` days ago: jobs, batches and
/// batch files (a batch still running keeps its jobs and files).
async fn sweep(state: &AppState, days: u32, stop: &CancellationToken) {
    loop {
        let before = unix_now() - i64::from(days) * 86_400;
        let store = state.store();
        let jobs = store.expire_jobs(before, |job| {
            job.metadata["batch_id"]
                .as_str()
                .is_some_and(|b| store.batch_running(b).unwrap_or(true))
        });
        match (jobs, store.expire_batches(before)) {
            (Ok(j), Ok((b, f))) if j + b + f > 0 => {
                tracing::info!(
                    jobs = j,
                    batches = b,
                    files = f,
                    "expired jobs, batches and files removed"
                );
            }
            (Err(e), _) | (_, Err(e)) => tracing::warn!(error = %e, "expired jobs not removed"),
            _ => {}
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(3_600)) => {}
        }
    }
}

/// Queues again the running jobs of the nodes `orphaned` names.
async fn requeue_orphans(state: &AppState, orphaned: impl FnMut(&str) -> bool) {
    match state.store().running_jobs(orphaned) {
        Ok(ids) => {
            for id in ids {
                if let Err(e) = requeue(state, &id).await {
                    tracing::error!(job = %id, error = %e, "job not queued again");
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "interrupted jobs not checked"),
    }
}

async fn requeue(state: &AppState, id: &str) -> Result<(), ApiError> {
    let store = state.store();
    let Some((rec, raw)) = store.job_raw(id)? else {
        return Ok(());
    };
    // It ended since it was found orphaned (a node whose lease lapsed may still finish it).
    if rec.status != JobStatus::Running {
        return Ok(());
    }
    let mut next = rec;
    next.status = if next.cancel_requested {
        JobStatus::Cancelled
    } else {
        JobStatus::Queued
    };
    next.claimed_by = None;
    store.swap_job(&raw, &next).await?;
    Ok(())
}

/// Stores how a job ended (`None`: cancelled while running).
async fn finish(
    state: &AppState,
    id: &str,
    outcome: Option<Result<serde_json::Value, ApiError>>,
) -> Result<(), ApiError> {
    let store = state.store();
    loop {
        let Some((rec, raw)) = store.job_raw(id)? else {
            return Ok(());
        };
        if rec.status.finished() {
            return Ok(());
        }
        let mut next = rec;
        next.finished_at = Some(unix_now());
        next.claimed_by = None;
        match &outcome {
            _ if next.cancel_requested => next.status = JobStatus::Cancelled,
            None => next.status = JobStatus::Cancelled,
            Some(Ok(result)) => {
                next.status = JobStatus::Succeeded;
                next.result = Some(result.clone());
            }
            Some(Err(e)) => {
                next.status = JobStatus::Failed;
                next.error = Some(JobError {
                    code: e.code,
                    message: e.message.clone(),
                });
            }
        }
        let announce = matches!(next.status, JobStatus::Succeeded | JobStatus::Failed);
        if let (true, Some(w)) = (announce, next.webhook.as_mut()) {
            w.first_ms = Some(chrono::Utc::now().timestamp_millis());
        }
        if store.swap_job(&raw, &next).await? {
            if let (true, Some(w)) = (announce, &next.webhook) {
                store.webhook_due(&next.id, w.first_ms.unwrap_or_default())?;
                state.jobs.wake_deliveries();
            }
            return Ok(());
        }
    }
}

/// The principal a job acts for: its key as it is now (a revoked key fails the job).
fn principal(state: &AppState, job: &JobRecord) -> Result<Principal, ApiError> {
    let Some(key_id) = &job.key_id else {
        return Ok(Principal::local());
    };
    let rec = state
        .store()
        .key_by_id(key_id)?
        .ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "the job's key was revoked"))?;
    let rec = Arc::new(rec);
    Ok(Principal {
        tenant: rec.tenant.clone(),
        key_id: Some(rec.id.clone()),
        models: rec.models.clone(),
        limits: Some(rec),
    })
}

/// Runs a job, waiting out momentary limits.
async fn execute(state: &AppState, job: &JobRecord) -> Result<serde_json::Value, ApiError> {
    let mut unavailable = 0;
    loop {
        let p = principal(state, job)?;
        let answer = match &job.request {
            JobRequest::Chat { body } => {
                let body = serde_json::from_value(body.clone())
                    .map_err(|e| ApiError::bad_request(format!("request: {e}")))?;
                crate::server::http::openai::completion(state, p, body).await
            }
            JobRequest::Turn {
                conversation,
                content,
                client_id,
            } => {
                let body = serde_json::json!({"content": content, "client_id": client_id});
                crate::server::http::conversations::turn(state, p, conversation, body).await
            }
        };
        match answer {
            Err(e) if e.code == ErrorCode::RateLimited => {
                let wait = e
                    .retry_after
                    .unwrap_or(Duration::from_secs(1))
                    .min(MAX_WAIT);
                tokio::time::sleep(wait).await;
            }
            Err(e)
                if e.code == ErrorCode::UpstreamUnavailable
                    && unavailable + 1 < UNAVAILABLE_TRIES =>
            {
                unavailable += 1;
                tokio::time::sleep(Duration::from_millis(500) * 2u32.pow(unavailable)).await;
            }
            other => return other,
        }
    }
}
