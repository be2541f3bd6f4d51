//! Tenants and API keys (PROTOCOL §3). A key's secret is shown once at creation and stored only
//! as its SHA-256; requests are resolved to a [`Principal`] (tenant, key, allowed models). The
//! admin key is compared by hash as well, so its length or prefix never leaks through timing.

use std::sync::Arc;

use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use crate::error::{ApiError, ErrorCode};
use crate::ids::{unix_now, TenantId};
use crate::store::{KeyRecord, LimitWindow, Store};

mod quota;
pub mod usage;

pub use quota::{Bill, Governor, Price, Prices, Reservation};

/// Who a client request acts for.
#[derive(Debug, Clone)]
pub struct Principal {
    pub tenant: TenantId,
    /// `None` in development mode.
    pub key_id: Option<String>,
    pub models: Option<Vec<String>>,
    /// The key's limits and quotas (none in development mode).
    pub limits: Option<Arc<KeyRecord>>,
}

impl Principal {
    /// The principal of development mode.
    pub fn local() -> Self {
        Self {
            tenant: TenantId::local(),
            key_id: None,
            models: None,
            limits: None,
        }
    }

    /// Whether this key's requests may use the semantic cache.
    pub fn cache(&self) -> bool {
        self.limits.as_ref().and_then(|k| k.cache).unwrap_or(true)
    }

    /// The key's own PII mode, if it sets one.
    pub fn pii(&self) -> Option<crate::guard::pii::PiiMode> {
        self.limits.as_ref()?.pii
    }

    /// Provider regions this key may reach (`None`: any).
    pub fn regions(&self) -> Option<&[String]> {
        self.limits.as_ref()?.regions.as_deref()
    }
}

impl Principal {
    /// Whether this principal may use route `model`.
    ///
    /// # Errors
    /// `forbidden` when the key is restricted to other models.
    pub fn check_model(&self, model: &str) -> Result<(), ApiError> {
        match &self.models {
            Some(allowed) if !allowed.iter().any(|m| m == model) => Err(ApiError::new(
                ErrorCode::Forbidden,
                format!("this key may not use model {model:?}"),
            )),
            _ => Ok(()),
        }
    }

    pub fn may_use(&self, model: &str) -> bool {
        self.check_model(model).is_ok()
    }
}

/// The body of `POST /admin/keys`.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    pub tenant: String,
    #[serde(default)]
    pub rpm: Option<u32>,
    #[serde(default)]
    pub tpm: Option<u32>,
    #[serde(default)]
    pub daily_tokens: Option<u64>,
    #[serde(default)]
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub monthly_tokens: Option<u64>,
    #[serde(default)]
    pub monthly_spend: Option<f64>,
    #[serde(default)]
    pub regions: Option<Vec<String>>,
    #[serde(default)]
    pub window: Option<LimitWindow>,
    #[serde(default)]
    pub pii: Option<crate::guard::pii::PiiMode>,
    #[serde(default)]
    pub cache: Option<bool>,
}

/// Resolves bearer tokens to principals.
#[derive(Clone)]
pub struct Auth {
    store: Store,
    admin_hash: Option<[u8; 32]>,
    dev_mode: bool,
    known: Arc<KnownKeys>,
}

/// Keys already resolved, by the SHA-256 of their secret: a request with a known key needs no
/// storage read or decode. Keys never change once created; a revocation empties the map before
/// it returns, and a lookup that read storage before a revocation does not add its answer after
/// it (the generation tells).
#[derive(Default)]
struct KnownKeys {
    map: parking_lot::RwLock<std::collections::HashMap<[u8; 32], Arc<KeyRecord>>>,
    generation: std::sync::atomic::AtomicU64,
}

impl KnownKeys {
    /// Keys remembered at most; past it the map starts again.
    const MAX: usize = 65_536;

    fn get(&self, digest: &[u8; 32]) -> Option<Arc<KeyRecord>> {
        self.map.read().get(digest).cloned()
    }

    fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Remembers `rec` unless a revocation happened since `generation` was read.
    fn add(&self, generation: u64, digest: [u8; 32], rec: Arc<KeyRecord>) {
        let mut map = self.map.write();
        if self.generation() != generation {
            return;
        }
        if map.len() >= Self::MAX {
            map.clear();
        }
        map.insert(digest, rec);
    }

    fn forget_all(&self) {
        let mut map = self.map.write();
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        map.clear();
    }
}

impl Auth {
    /// `admin_key`: the admin key, if its variable is set; `dev_mode`: serve keyless requests
    /// as tenant `local` (no admin key, loopback listener).
    pub fn new(store: Store, admin_key: Option<SecretString>, dev_mode: bool) -> Self {
        let admin_hash = admin_key.map(|k| hash(k.expose_secret()));
        Self {
            store,
            admin_hash,
            dev_mode,
            known: Arc::default(),
        }
    }

    pub fn dev_mode(&self) -> bool {
        self.dev_mode
    }

    /// The principal of a `/v1/*` request.
    ///
    /// # Errors
    /// `unauthorized` for a missing, unknown or admin key.
    pub fn client(&self, token: Option<&str>) -> Result<Principal, ApiError> {
        let Some(token) = token else {
            return if self.dev_mode {
                Ok(Principal::local())
            } else {
                Err(ApiError::unauthorized())
            };
        };
        let digest = hash(token);
        if self.admin_hash == Some(digest) {
            return Err(ApiError::new(
                ErrorCode::Unauthorized,
                "the admin key is for /admin only",
            ));
        }
        let rec = match self.known.get(&digest) {
            Some(rec) => rec,
            None => {
                let generation = self.known.generation();
                let Some(rec) = self.store.key_by_hash(&hex::encode(digest))? else {
                    // Development mode serves keyless clients; SDKs insist on sending some key.
                    return if self.dev_mode {
                        Ok(Principal::local())
                    } else {
                        Err(ApiError::unauthorized())
                    };
                };
                let rec = Arc::new(rec);
                self.known.add(generation, digest, Arc::clone(&rec));
                rec
            }
        };
        Ok(Principal {
            tenant: rec.tenant.clone(),
            key_id: Some(rec.id.clone()),
            models: rec.models.clone(),
            limits: Some(rec),
        })
    }

    /// Checks an `/admin/*` request.
    ///
    /// # Errors
    /// `unauthorized` unless the admin key is given (or, in development mode, no key at all).
    pub fn admin(&self, token: Option<&str>) -> Result<(), ApiError> {
        match (self.admin_hash, token) {
            (Some(expected), Some(t)) if hash(t) == expected => Ok(()),
            (None, None) if self.dev_mode => Ok(()),
            _ => Err(ApiError::unauthorized()),
        }
    }

    /// Creates a key; answers its record and the secret, which is never stored.
    ///
    /// # Errors
    /// `bad_request` for an empty tenant; storage failures.
    pub async fn create_key(&self, new: NewKey) -> Result<(KeyRecord, SecretString), ApiError> {
        if new.tenant.trim().is_empty() || new.tenant.len() > 128 {
            return Err(ApiError::bad_request("tenant must be 1 to 128 characters"));
        }
        let mut raw = [0u8; 24];
        rand::thread_rng().fill_bytes(&mut raw);
        let secret = format!("pk-{}", hex::encode(raw));
        let mut id_raw = [0u8; 8];
        rand::thread_rng().fill_bytes(&mut id_raw);
        let rec = KeyRecord {
            id: format!("key_{}", hex::encode(id_raw)),
            tenant: TenantId(new.tenant),
            rpm: new.rpm,
            tpm: new.tpm,
            daily_tokens: new.daily_tokens,
            models: new.models,
            monthly_tokens: new.monthly_tokens,
            monthly_spend: new.monthly_spend,
            regions: new.regions,
            window: new.window,
            pii: new.pii,
            cache: new.cache,
            prefix: secret[3..7].to_owned(),
            created_at: unix_now(),
        };
        self.store
            .put_key(&hex::encode(hash(&secret)), &rec)
            .await?;
        Ok((rec, SecretString::from(secret)))
    }

    /// Every key, without secrets.
    ///
    /// # Errors
    /// Storage failures.
    pub fn list_keys(&self) -> Result<Vec<KeyRecord>, ApiError> {
        Ok(self.store.list_keys()?)
    }

    /// Forgets every key resolved so far (cluster mode: another node revoked one).
    pub fn forget_known(&self) {
        self.known.forget_all();
    }

    /// Revokes a key at once; answers whether it existed.
    ///
    /// # Errors
    /// Storage failures.
    pub async fn revoke(&self, id: &str) -> Result<bool, ApiError> {
        let deleted = self.store.delete_key(id).await;
        // Forgotten whatever the store answered: a failed delete may still have removed it.
        self.known.forget_all();
        Ok(deleted?)
    }
}

fn hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keys_resolve_to_tenants_and_admin_is_refused_on_v1() {
        let dir = tempfile::tempdir().unwrap(); // ok: test code
        let store = Store::open(dir.path()).unwrap(); // ok: test code
        let auth = Auth::new(store, Some(SecretString::from("admin-secret")), false);
        let (rec, secret) = auth
            .create_key(NewKey {
                tenant: "acme".into(),
                models: Some(vec!["mock".into()]),
                ..NewKey::default()
            })
            .await
            .unwrap(); // ok: test code
        let p = auth.client(Some(secret.expose_secret())).unwrap(); // ok: test code
        assert_eq!(p.tenant.0, "acme");
        assert!(p.check_model("mock").is_ok());
        assert_eq!(
            p.check_model("default").unwrap_err().code,
            ErrorCode::Forbidden
        );
        assert_eq!(
            auth.client(Some("admin-secret")).unwrap_err().code,
            ErrorCode::Unauthorized
        );
        assert_eq!(auth.client(None).unwrap_err().code, ErrorCode::Unauthorized);
        assert!(auth.admin(Some("admin-secret")).is_ok());
        assert!(auth.admin(Some(secret.expose_secret())).is_err());
        assert!(auth.revoke(&rec.id).await.unwrap()); // ok: test code
        assert!(auth.client(Some(secret.expose_secret())).is_err());
    }

    #[tokio::test]
    async fn dev_mode_serves_local() {
        let dir = tempfile::tempdir().unwrap(); // ok: test code
        let auth = Auth::new(Store::open(dir.path()).unwrap(), None, true); // ok: test code
        assert_eq!(auth.client(None).unwrap().tenant, TenantId::local()); // ok: test code
        assert!(auth.admin(None).is_ok());
        assert_eq!(
            auth.client(Some("pk-bogus")).unwrap().tenant, // ok: test code
            TenantId::local()
        );
    }
}
