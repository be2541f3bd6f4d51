//! Async jobs (PROTOCOL §10): `jobs` (job id → [`JobRecord`]), `jobs_queue` (created ms BE ‖ job
//! id → nothing: the queued jobs, oldest first) and `jobs_by_tenant` (tenant ‖ 0 ‖ created ms BE
//! ‖ job id → nothing, for listing). A job changes state by compare-and-swap of its record, so
//! one worker claims it (on any node sharing the store) and its end is written once.

use serde::{Deserialize, Serialize};

use super::{decode, encode, Store, StoreError};
use crate::error::ErrorCode;
use crate::ids::TenantId;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub fn finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    pub fn parse(s: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_owned())).ok()
    }
}

/// What a job runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobRequest {
    /// A chat-completions body, answered whole.
    Chat { body: serde_json::Value },
    /// A conversation turn.
    Turn {
        conversation: String,
        content: serde_json::Value,
        client_id: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobError {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub tenant: TenantId,
    /// The key that submitted it (none in development mode): the job acts for it.
    pub key_id: Option<String>,
    pub status: JobStatus,
    pub created_at: i64,
    /// Milliseconds since the epoch (the queue's order).
    pub created_ms: i64,
    #[serde(default)]
    pub started_at: Option<i64>,
    #[serde(default)]
    pub finished_at: Option<i64>,
    pub request: JobRequest,
    #[serde(default)]
    pub metadata: serde_json::Value,
    #[serde(default)]
    pub result: Option<serde_json::Value>,
    #[serde(default)]
    pub error: Option<JobError>,
    /// Times a worker started it (more than one only after a crash mid-run).
    #[serde(default)]
    pub attempts: u32,
    /// The node whose worker runs it.
    #[serde(default)]
    pub claimed_by: Option<String>,
    #[serde(default)]
    pub cancel_requested: bool,
    /// Where its end is announced, and how that went.
    #[serde(default)]
    pub webhook: Option<WebhookState>,
    /// A batch line's: the batch's deadline (unix ms), after which it never starts.
    #[serde(default)]
    pub deadline_ms: Option<i64>,
}

/// A job's webhook and its delivery attempts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WebhookState {
    pub url: String,
    /// The `webhook-id` of every attempt.
    pub msg_id: String,
    #[serde(default)]
    pub deliveries: Vec<Delivery>,
    /// Delivered (a 2xx), or given up.
    #[serde(default)]
    pub done: bool,
    /// When the first attempt was due (ms), for giving up after a day.
    #[serde(default)]
    pub first_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delivery {
    /// Unix seconds.
    pub at: i64,
    /// The receiver's status, if it answered.
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn queue_key(rec: &JobRecord) -> Vec<u8> {
    let mut k = rec.created_ms.to_be_bytes().to_vec();
    k.extend_from_slice(rec.id.as_bytes());
    k
}

/// `jobs_running`: node ‖ 0 ‖ job id → nothing, the jobs each node runs. It may hold more
/// than runs (an entry is checked against its job when read), never less: an entry is written
/// before its job starts running and removed only after it stopped.
pub(super) fn running_key(node: &str, id: &str) -> Vec<u8> {
    let mut k = node.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

fn tenant_key(rec: &JobRecord) -> Vec<u8> {
    let mut k = rec.tenant.as_str().as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&rec.created_ms.to_be_bytes());
    k.extend_from_slice(rec.id.as_bytes());
    k
}

impl Store {
    /// Stores new queued jobs and waits until they are durable: one flush for all of them (a
    /// batch's thousands of lines are not a flush each).
    ///
    /// # Errors
    /// Storage failures.
    pub async fn put_jobs(&self, recs: &[JobRecord]) -> Result<(), StoreError> {
        for rec in recs {
            self.jobs.insert(rec.id.as_bytes(), encode(rec)?)?;
            self.jobs_by_tenant.insert(tenant_key(rec), [])?;
            self.jobs_queue.insert(queue_key(rec), [])?;
        }
        self.flush().await
    }

    /// A job and its stored bytes (for [`Store::swap_job`]).
    ///
    /// # Errors
    /// Storage failures or a corrupt record.
    pub fn job_raw(&self, id: &str) -> Result<Option<(JobRecord, Vec<u8>)>, StoreError> {
        let Some(raw) = self.jobs.get(id.as_bytes())? else {
            return Ok(None);
        };
        Ok(Some((decode("jobs", id, &raw)?, raw.to_vec())))
    }

    /// Replaces job `new.id` if it is still `old`; answers whether it was. A job that leaves
    /// the queue leaves its queue entry.
    ///
    /// # Errors
    /// Storage failures.
    pub async fn swap_job(&self, old: &[u8], new: &JobRecord) -> Result<bool, StoreError> {
        let running = match (new.status, new.claimed_by.as_deref()) {
            (JobStatus::Running, Some(node)) => Some(running_key(node, &new.id)),
            _ => None,
        };
        if let Some(key) = &running {
            self.jobs_running.insert(key, [])?;
        }
        let swapped = self
            .jobs
            .compare_and_swap(new.id.as_bytes(), Some(old), Some(encode(new)?))?
            .is_ok();
        if swapped {
            if new.status == JobStatus::Queued {
                self.jobs_queue.insert(queue_key(new), [])?;
            } else {
                self.jobs_queue.remove(queue_key(new))?;
            }
            let before = decode::<JobRecord>("jobs", &new.id, old).ok();
            if let Some(node) = before
                .as_ref()
                .filter(|b| b.status == JobStatus::Running)
                .and_then(|b| b.claimed_by.as_deref())
            {
                let key = running_key(node, &new.id);
                if running.as_ref() != Some(&key) {
                    self.jobs_running.remove(key)?;
                }
            }
            self.flush().await?;
        }
        Ok(swapped)
    }

    /// Up to `limit` queued jobs after the queue key `after` (from the start without), oldest
    /// first: each as its queue key and job id.
    ///
    /// # Errors
    /// Storage failures.
    pub fn queued_jobs(
        &self,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, String)>, StoreError> {
        let keys = match after {
            Some(a) => self
                .jobs_queue
                .range::<&[u8], _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))
                .keys(),
            None => self.jobs_queue.iter().keys(),
        };
        keys.take(limit)
            .map(|k| {
                let k = k?;
                let id = String::from_utf8_lossy(k.get(8..).unwrap_or_default()).into_owned();
                Ok((k.to_vec(), id))
            })
            .collect()
    }

    /// Drops a queue entry whose job is no longer queued.
    ///
    /// # Errors
    /// Storage failures.
    pub fn unqueue_job(&self, rec: &JobRecord) -> Result<(), StoreError> {
        self.jobs_queue.remove(queue_key(rec))?;
        Ok(())
    }

    /// A tenant's jobs, newest first, at most `limit`.
    ///
    /// # Errors
    /// Storage failures or corrupt records.
    pub fn tenant_jobs(
        &self,
        tenant: &TenantId,
        limit: usize,
    ) -> Result<Vec<JobRecord>, StoreError> {
        let mut prefix = tenant.as_str().as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for k in self.jobs_by_tenant.scan_prefix(&prefix).keys().rev() {
            let k = k?;
            let id =
                String::from_utf8_lossy(k.get(prefix.len() + 8..).unwrap_or_default()).into_owned();
            if let Some((rec, _)) = self.job_raw(&id)? {
                out.push(rec);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Marks a job's webhook due at `due_ms` (a job id may be due once per key).
    ///
    /// # Errors
    /// Storage failures.
    pub fn webhook_due(&self, job: &str, due_ms: i64) -> Result<(), StoreError> {
        let mut k = due_ms.to_be_bytes().to_vec();
        k.extend_from_slice(job.as_bytes());
        self.webhooks_due.insert(k, [])?;
        Ok(())
    }

    /// Takes up to `limit` webhooks due by `now_ms`: each is claimed by removing its entry (so
    /// one node delivers it) and left due again at `lease_ms` in case this node dies mid-way.
    ///
    /// # Errors
    /// Storage failures.
    pub fn take_due_webhooks(
        &self,
        now_ms: i64,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let mut taken = Vec::new();
        let keys: Vec<_> = self
            .webhooks_due
            .range(..(now_ms + 1).to_be_bytes().to_vec())
            .keys()
            .take(limit)
            .collect::<Result<_, _>>()?;
        for k in keys {
            if self.webhooks_due.remove(&k)?.is_none() {
                // Another node took it.
                continue;
            }
            let job = String::from_utf8_lossy(k.get(8..).unwrap_or_default()).into_owned();
            self.webhook_due(&job, lease_ms)?;
            taken.push(job);
        }
        Ok(taken)
    }

    /// Drops a due entry (the lease of a delivery that ended).
    ///
    /// # Errors
    /// Storage failures.
    pub fn webhook_not_due(&self, job: &str, due_ms: i64) -> Result<(), StoreError> {
        let mut k = due_ms.to_be_bytes().to_vec();
        k.extend_from_slice(job.as_bytes());
        self.webhooks_due.remove(k)?;
        Ok(())
    }

    /// A tenant's webhook signing secret.
    ///
    /// # Errors
    /// Storage failures.
    pub fn webhook_secret(&self, tenant: &TenantId) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .webhook_secrets
            .get(tenant.as_str().as_bytes())?
            .map(|v| v.to_vec()))
    }

    /// Sets (or rotates) a tenant's webhook signing secret, durably.
    ///
    /// # Errors
    /// Storage failures.
    pub async fn put_webhook_secret(
        &self,
        tenant: &TenantId,
        secret: &[u8],
    ) -> Result<(), StoreError> {
        self.webhook_secrets
            .insert(tenant.as_str().as_bytes(), secret)?;
        self.flush().await
    }

    /// Removes ended jobs that finished before `before` (Unix seconds) whose webhook, if any,
    /// is done, except those of a batch not yet finalized (`keep`); answers how many went.
    ///
    /// # Errors
    /// Storage failures.
    pub fn expire_jobs(
        &self,
        before: i64,
        mut keep: impl FnMut(&JobRecord) -> bool,
    ) -> Result<usize, StoreError> {
        let mut gone = 0;
        let old: Vec<JobRecord> = self
            .jobs
            .iter()
            .values()
            .filter_map(|v| {
                v.ok()
                    .and_then(|v| decode::<JobRecord>("jobs", "", &v).ok())
            })
            .filter(|r| {
                r.status.finished()
                    && r.finished_at.is_some_and(|t| t < before)
                    && r.webhook.as_ref().is_none_or(|w| w.done)
            })
            .collect();
        for rec in old {
            if keep(&rec) {
                continue;
            }
            self.jobs.remove(rec.id.as_bytes())?;
            self.jobs_by_tenant.remove(tenant_key(&rec))?;
            self.jobs_queue.remove(queue_key(&rec))?;
            gone += 1;
        }
        Ok(gone)
    }

    /// Every job running on a node `claimed` says so of (after a crash: none of them is
    /// really running). Reads the index of running jobs, not every job; an index entry whose
    /// job no longer runs there (a crash between the two writes) is dropped.
    ///
    /// # Errors
    /// Storage failures.
    pub fn running_jobs(
        &self,
        mut claimed: impl FnMut(&str) -> bool,
    ) -> Result<Vec<String>, StoreError> {
        self.index_running_jobs()?;
        let mut out = Vec::new();
        let mut stale = Vec::new();
        for key in self.jobs_running.iter().keys() {
            let key = key?;
            let Some(at) = key.iter().position(|b| *b == 0) else {
                continue;
            };
            let (Ok(node), Ok(id)) = (
                std::str::from_utf8(&key[..at]),
                std::str::from_utf8(&key[at + 1..]),
            ) else {
                continue;
            };
            if !claimed(node) {
                continue;
            }
            match self.job_raw(id)? {
                Some((rec, _))
                    if rec.status == JobStatus::Running
                        && rec.claimed_by.as_deref() == Some(node) =>
                {
                    out.push(rec.id);
                }
                _ => stale.push((key.to_vec(), node.to_owned(), id.to_owned())),
            }
        }
        for (key, node, id) in stale {
            self.jobs_running.remove(&key)?;
            // Claimed again by that node since it was read: the entry stays.
            if let Some((rec, _)) = self.job_raw(&id)? {
                if rec.status == JobStatus::Running && rec.claimed_by.as_deref() == Some(&node) {
                    self.jobs_running.insert(&key, [])?;
                }
            }
        }
        Ok(out)
    }

    /// Builds the index of running jobs from the jobs, once per process (what a binary without
    /// the index started is found too).
    fn index_running_jobs(&self) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        if self.running_indexed.load(Ordering::Acquire) {
            return Ok(());
        }
        for v in self.jobs.iter().values() {
            let Ok(rec) = decode::<JobRecord>("jobs", "", &v?) else {
                continue;
            };
            if let (JobStatus::Running, Some(node)) = (rec.status, rec.claimed_by.as_deref()) {
                self.jobs_running.insert(running_key(node, &rec.id), [])?;
            }
        }
        self.running_indexed.store(true, Ordering::Release);
        Ok(())
    }
}
