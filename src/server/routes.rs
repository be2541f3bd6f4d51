//! Path → handler: the whole HTTP surface in one table, plus the handlers for actix's own
//! rejections (bad JSON, query, path, size) so they answer in the OpenAI error shape too.

use actix_web::error::{JsonPayloadError, PathError, QueryPayloadError};
use actix_web::{web, HttpRequest};

use super::http::{admin, conversations, health, openai, responses, usage};
use super::ws;
use crate::error::{ApiError, ErrorCode};

/// Registers every route; `max_body` bounds JSON bodies.
pub fn configure(cfg: &mut web::ServiceConfig, max_body: usize) {
    cfg.app_data(
        web::JsonConfig::default()
            .content_type_required(false)
            .limit(max_body)
            .error_handler(json_error),
    )
    .app_data(web::QueryConfig::default().error_handler(query_error))
    .app_data(web::PathConfig::default().error_handler(path_error))
    .route("/healthz", web::get().to(health::healthz))
    .route("/readyz", web::get().to(health::readyz))
    .route("/metrics", web::get().to(health::metrics))
    .route("/v1/models", web::get().to(openai::models))
    .route(
        "/v1/chat/completions",
        web::post().to(openai::chat_completions),
    )
    .route("/v1/responses", web::post().to(responses::create))
    .route("/v1/responses/{id}", web::get().to(responses::get))
    .route("/v1/responses/{id}", web::delete().to(responses::delete))
    .route(
        "/v1/responses/{id}/input_items",
        web::get().to(responses::input_items),
    )
    .route("/v1/conversations", web::post().to(conversations::create))
    .route("/v1/conversations/{id}", web::get().to(conversations::get))
    .route(
        "/v1/conversations/{id}",
        web::delete().to(conversations::delete),
    )
    .route(
        "/v1/conversations/{id}/messages",
        web::get().to(conversations::list_messages),
    )
    .route(
        "/v1/conversations/{id}/messages",
        web::post().to(conversations::post_message),
    )
    .route(
        "/v1/conversations/{id}/cancel",
        web::post().to(conversations::cancel),
    )
    .route("/v1/ws", web::get().to(ws::connect))
    .route("/admin/keys", web::post().to(admin::create_key))
    .route("/admin/keys", web::get().to(admin::list_keys))
    .route("/admin/keys/{id}", web::delete().to(admin::revoke_key))
    .route("/admin/providers", web::get().to(admin::providers))
    .route("/admin/cache", web::get().to(admin::cache))
    .route("/admin/usage", web::get().to(usage::admin))
    .route("/admin/prompts/{name}", web::put().to(admin::put_prompt))
    .route("/admin/prompts/{name}", web::get().to(admin::list_prompts))
    .route("/v1/usage", web::get().to(usage::own))
    .default_service(web::to(not_found));
}

async fn not_found(req: HttpRequest) -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::not_found(&format!(
        "{} {}",
        req.method(),
        req.path()
    )))
}

fn json_error(err: JsonPayloadError, _req: &HttpRequest) -> actix_web::Error {
    let api = match &err {
        JsonPayloadError::Overflow { .. } | JsonPayloadError::OverflowKnownLength { .. } => {
            ApiError::new(ErrorCode::TooLarge, "request body is too large")
        }
        JsonPayloadError::ContentType => {
            ApiError::bad_request("expected Content-Type: application/json")
        }
        other => ApiError::bad_request(format!("invalid JSON body: {other}")),
    };
    api.into()
}

fn query_error(err: QueryPayloadError, _req: &HttpRequest) -> actix_web::Error {
    ApiError::bad_request(format!("invalid query: {err}")).into()
}

fn path_error(err: PathError, _req: &HttpRequest) -> actix_web::Error {
    ApiError::bad_request(format!("invalid path: {err}")).into()
}
