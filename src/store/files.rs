//! The Batch API's files and batches (PROTOCOL §10): `files` (id → [`FileRecord`]),
//! `file_contents` (id → the bytes), `batches` (id → [`BatchRecord`]) and `batches_by_tenant`
//! (tenant ‖ 0 ‖ created ms BE ‖ id → nothing).

use serde::{Deserialize, Serialize};

use super::{decode, encode, Store, StoreError};
use crate::ids::TenantId;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileRecord {
    pub id: String,
    pub tenant: TenantId,
    pub purpose: String,
    pub filename: String,
    pub bytes: u64,
    pub created_at: i64,
}

/// A line of an input file that became no job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BadLine {
    pub line: usize,
    pub custom_id: Option<String>,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchRecord {
    pub id: String,
    pub tenant: TenantId,
    pub endpoint: String,
    pub input_file_id: String,
    pub completion_window: String,
    /// `in_progress`, `cancelling`, `expiring`, `completed`, `cancelled`, `expired`.
    pub status: String,
    pub created_at: i64,
    pub created_ms: i64,
    pub in_progress_at: Option<i64>,
    pub finalizing_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub cancelling_at: Option<i64>,
    pub cancelled_at: Option<i64>,
    /// custom id → job id, in input order.
    pub jobs: Vec<(String, String)>,
    pub bad: Vec<BadLine>,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub completed: usize,
    pub failed: usize,
    #[serde(default)]
    pub metadata: serde_json::Value,
    /// When the batch expires (0 in records older than the field: 24 hours after creation).
    #[serde(default)]
    pub expires_at: i64,
    #[serde(default)]
    pub expired_at: Option<i64>,
    /// The leading jobs known to have ended, so a poll reads only those after them.
    #[serde(default)]
    pub settled: Settled,
}

/// `jobs[..upto]` have all ended, `completed` of them successfully and `failed` not.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settled {
    pub upto: usize,
    pub completed: usize,
    pub failed: usize,
}

impl BatchRecord {
    /// When the batch expires, unix seconds.
    pub fn deadline(&self) -> i64 {
        if self.expires_at > 0 {
            self.expires_at
        } else {
            self.created_at + 86_400
        }
    }

    /// Whether the batch is past its deadline now.
    pub fn due(&self) -> bool {
        chrono::Utc::now().timestamp_millis() >= self.deadline().saturating_mul(1_000)
    }
}

impl Store {
    /// Stores a file and its bytes, durably.
    ///
    /// # Errors
    /// Storage failures.
    pub async fn put_file(&self, rec: &FileRecord, content: &[u8]) -> Result<(), StoreError> {
        self.file_contents.insert(rec.id.as_bytes(), content)?;
        self.files.insert(rec.id.as_bytes(), encode(rec)?)?;
        self.flush().await
    }

    /// A file of `tenant`.
    ///
    /// # Errors
    /// Storage failures.
    pub fn file(&self, id: &str, tenant: &TenantId) -> Result<Option<FileRecord>, StoreError> {
        let Some(raw) = self.files.get(id.as_bytes())? else {
            return Ok(None);
        };
        let rec: FileRecord = decode("files", id, &raw)?;
        Ok((&rec.tenant == tenant).then_some(rec))
    }

    /// A file's bytes.
    ///
    /// # Errors
    /// Storage failures.
    pub fn file_content(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.file_contents.get(id.as_bytes())?.map(|v| v.to_vec()))
    }

    /// Stores a new batch, durably.
    ///
    /// # Errors
    /// Storage failures.
    pub async fn put_batch(&self, rec: &BatchRecord) -> Result<(), StoreError> {
        self.batches.insert(rec.id.as_bytes(), encode(rec)?)?;
        let mut k = rec.tenant.as_str().as_bytes().to_vec();
        k.push(0);
        k.extend_from_slice(&rec.created_ms.to_be_bytes());
        k.extend_from_slice(rec.id.as_bytes());
        self.batches_by_tenant.insert(k, [])?;
        self.flush().await
    }

    /// A batch and its stored bytes (for [`Store::swap_batch`]).
    ///
    /// # Errors
    /// Storage failures or a corrupt record.
    pub fn batch_raw(&self, id: &str) -> Result<Option<(BatchRecord, Vec<u8>)>, StoreError> {
        let Some(raw) = self.batches.get(id.as_bytes())? else {
            return Ok(None);
        };
        Ok(Some((decode("batches", id, &raw)?, raw.to_vec())))
    }

    /// Replaces a batch if it is still `old`; answers whether it was.
    ///
    /// # Errors
    /// Storage failures.
    pub async fn swap_batch(&self, old: &[u8], new: &BatchRecord) -> Result<bool, StoreError> {
        let swapped = self
            .batches
            .compare_and_swap(new.id.as_bytes(), Some(old), Some(encode(new)?))?
            .is_ok();
        if swapped {
            self.flush().await?;
        }
        Ok(swapped)
    }

    /// Removes batches that ended before `before` (Unix seconds) with their input, output and
    /// error files, and files older than that which no batch still uses; answers how many
    /// batches and files went. A batch not yet finalized keeps everything it names.
    ///
    /// # Errors
    /// Storage failures.
    pub fn expire_batches(&self, before: i64) -> Result<(usize, usize), StoreError> {
        let mut used = std::collections::HashSet::new();
        let mut batches = 0;
        let all: Vec<BatchRecord> = self
            .batches
            .iter()
            .values()
            .filter_map(|v| {
                v.ok()
                    .and_then(|v| decode::<BatchRecord>("batches", "", &v).ok())
            })
            .collect();
        for b in all {
            let ended = b.completed_at.or(b.cancelled_at).or(b.expired_at);
            if ended.is_some_and(|t| t < before) {
                self.batches.remove(b.id.as_bytes())?;
                let mut k = b.tenant.as_str().as_bytes().to_vec();
                k.push(0);
                k.extend_from_slice(&b.created_ms.to_be_bytes());
                k.extend_from_slice(b.id.as_bytes());
                self.batches_by_tenant.remove(k)?;
                batches += 1;
            } else {
                used.insert(b.input_file_id.clone());
                used.extend(b.output_file_id.clone());
                used.extend(b.error_file_id.clone());
            }
        }
        let mut files = 0;
        let old: Vec<FileRecord> = self
            .files
            .iter()
            .values()
            .filter_map(|v| {
                v.ok()
                    .and_then(|v| decode::<FileRecord>("files", "", &v).ok())
            })
            .filter(|f| f.created_at < before && !used.contains(&f.id))
            .collect();
        for f in old {
            self.files.remove(f.id.as_bytes())?;
            self.file_contents.remove(f.id.as_bytes())?;
            files += 1;
        }
        Ok((batches, files))
    }

    /// Whether batch `id` is still running (its jobs must stay until it is finalized).
    ///
    /// # Errors
    /// Storage failures.
    pub fn batch_running(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.batch_raw(id)?.is_some_and(|(b, _)| {
            matches!(b.status.as_str(), "in_progress" | "cancelling" | "expiring")
        }))
    }

    /// A tenant's batch ids, newest first, at most `limit`.
    ///
    /// # Errors
    /// Storage failures.
    pub fn tenant_batches(
        &self,
        tenant: &TenantId,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let mut prefix = tenant.as_str().as_bytes().to_vec();
        prefix.push(0);
        self.batches_by_tenant
            .scan_prefix(&prefix)
            .keys()
            .rev()
            .take(limit)
            .map(|k| {
                Ok(
                    String::from_utf8_lossy(k?.get(prefix.len() + 8..).unwrap_or_default())
                        .into_owned(),
                )
            })
            .collect()
    }
}
