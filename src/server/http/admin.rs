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
    tracing::info!(key_id = %id, "key revoked");
    Ok(HttpResponse::NoContent().finish())
}

/// Every provider's deployments: breaker state, bucket levels, in-flight, error rate, latency.
pub async fn providers(_: Admin, state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "data": state.router().describe().await }))
}

fn key_json(rec: &KeyRecord) -> serde_json::Value {
    serde_json::to_value(rec).unwrap_or_default()
}
