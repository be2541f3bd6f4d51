//! `/admin/keys`: create (the secret is shown once), list (no secrets), revoke (at once: open
//! sockets of the key are closed with 1008).

use actix_web::{web, HttpResponse};
use secrecy::ExposeSecret;

use crate::error::ApiError;
use crate::server::auth::Admin;
use crate::server::AppState;
use crate::store::KeyRecord;
use crate::tenant::NewKey;

pub async fn create_key(
    _: Admin,
    state: web::Data<AppState>,
    body: web::Json<NewKey>,
) -> Result<HttpResponse, ApiError> {
    let (rec, secret) = state.auth.create_key(body.into_inner()).await?;
    let mut json = key_json(&rec);
    json["key"] = secret.expose_secret().into();
    tracing::info!(key_id = %rec.id, tenant = %rec.tenant, "key created");
    Ok(HttpResponse::Created().json(json))
}

pub async fn list_keys(_: Admin, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let keys: Vec<_> = state.auth.list_keys()?.iter().map(key_json).collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({ "object": "list", "data": keys })))
}

pub async fn revoke_key(
    _: Admin,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    if !state.auth.revoke(&id).await? {
        return Err(ApiError::not_found("key"));
    }
    state.sockets.revoke(&id);
    state.registry.key_revoked(&id);
    if let Some(cluster) = state.cluster() {
        // Every other node forgets the key, closes its sockets and stops its turns.
        let event = crate::cluster::events::Event::KeyRevoked {
            key_id: id.to_string(),
        };
        crate::cluster::events::publish(cluster.redis(), &event)?;
    }
    tracing::info!(key_id = %id, "key revoked");
    Ok(HttpResponse::NoContent().finish())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptBody {
    content: String,
}

/// Stores a new version of prompt `name` (1, 2, …; never overwritten).
pub async fn put_prompt(
    _: Admin,
    state: web::Data<AppState>,
    name: web::Path<String>,
    body: web::Json<PromptBody>,
) -> Result<HttpResponse, ApiError> {
    let valid = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !valid {
        return Err(ApiError::bad_request(
            "prompt names are 1 to 128 letters, digits, '-', '_' or '.'",
        ));
    }
    let p = state
        .store()
        .put_prompt(&name, &body.content, crate::ids::unix_now())
        .await?;
    tracing::info!(prompt = %p.label(), "prompt version stored");
    Ok(HttpResponse::Created().json(p))
}

/// Every version of prompt `name`, oldest first.
pub async fn list_prompts(
    _: Admin,
    state: web::Data<AppState>,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let versions = state.store().prompt_versions(&name)?;
    if versions.is_empty() {
        return Err(ApiError::not_found("prompt"));
    }
    Ok(HttpResponse::Ok()
        .json(serde_json::json!({ "object": "list", "name": *name, "data": versions })))
}

/// Every provider's deployments: breaker state, bucket levels, in-flight, error rate, latency.
pub async fn providers(_: Admin, state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "data": state.router().describe().await }))
}

/// The semantic cache at a glance: its embedder, settings, and the index's living entries and
/// tombstones.
pub async fn cache(_: Admin, state: web::Data<AppState>) -> HttpResponse {
    let cache = &state.registry.deps().cache;
    let s = cache.settings();
    let (entries, tombstones) = match cache.len().await {
        Some((e, t)) => (Some(e), Some(t)),
        None => (None, None),
    };
    HttpResponse::Ok().json(serde_json::json!({
        "enabled": s.enabled,
        "embedder": cache.embedder().id(),
        "min_similarity": s.min_similarity,
        "ttl_secs": s.ttl.as_secs(),
        "max_entries": s.max_entries,
        "entries": entries,
        "tombstones": tombstones,
    }))
}

fn key_json(rec: &KeyRecord) -> serde_json::Value {
    serde_json::to_value(rec).unwrap_or_default()
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretBody {
    tenant: String,
}

/// `POST /admin/webhook-secrets`: a new signing secret for a tenant's webhooks, shown once;
/// asking again rotates it (deliveries from then on are signed with the new one).
pub async fn webhook_secret(
    _: Admin,
    state: web::Data<AppState>,
    body: web::Json<SecretBody>,
) -> Result<HttpResponse, ApiError> {
    let tenant = body.into_inner().tenant;
    if tenant.trim().is_empty() {
        return Err(ApiError::bad_request("tenant: must not be empty"));
    }
    let tenant = crate::ids::TenantId(tenant);
    let (bytes, shown) = crate::webhooks::new_secret();
    state.store().put_webhook_secret(&tenant, &bytes).await?;
    tracing::info!(tenant = %tenant, "webhook secret set");
    Ok(HttpResponse::Created()
        .json(serde_json::json!({"tenant": tenant.as_str(), "secret": shown})))
}
