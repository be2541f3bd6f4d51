//! `/healthz`, `/readyz`, `/metrics`: no key needed.

use actix_web::{web, HttpResponse};

use crate::server::AppState;

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

/// Ready once storage answers and at least one provider deployment is usable (its actor
/// answers and its breaker is not open).
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let storage = state
        .store()
        .conversation(&crate::ids::ConversationId::generate())
        .is_ok();
    let providers = state
        .router()
        .describe()
        .await
        .iter()
        .flat_map(|p| &p.deployments)
        .any(|d| d.breaker != crate::limits::BreakerState::Open);
    if storage && providers {
        HttpResponse::Ok().json(serde_json::json!({"status": "ready"}))
    } else {
        HttpResponse::ServiceUnavailable().json(
            serde_json::json!({"status": "not_ready", "storage": storage, "providers": providers}),
        )
    }
}

pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    state
        .metrics
        .live_conversations
        .set(i64::try_from(state.registry.live()).unwrap_or(i64::MAX));
    let mut text = state.metrics.render();
    if let Some(cluster) = state.cluster() {
        let redis = cluster.redis();
        text.push_str(&format!(
            "# HELP parley_redis_calls_total Calls to Redis (each one round trip; a script is one).\n\
             # TYPE parley_redis_calls_total counter\nparley_redis_calls_total {}\n\
             # HELP parley_redis_up Whether the last call to Redis succeeded.\n\
             # TYPE parley_redis_up gauge\nparley_redis_up {}\n",
            redis.calls(),
            u8::from(redis.is_up())
        ));
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(text)
}
