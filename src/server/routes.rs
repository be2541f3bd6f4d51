//! Path → handler: the whole HTTP surface in one table, plus the handlers for actix's own
//! rejections (bad JSON, query, path, size) so they answer in the OpenAI error shape too.

use actix_web::error::{JsonPayloadError, PathError, QueryPayloadError};
use actix_web::{web, HttpRequest};

use super::http::{admin, batches, conversations, health, jobs, openai, responses, ui, usage};
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
    .service(at("/").route(web::get().to(ui::chat)))
    .service(at("/dashboard").route(web::get().to(ui::dashboard)))
    .service(at("/ui/{name}").route(web::get().to(ui::asset)))
    .service(at("/healthz").route(web::get().to(health::healthz)))
    .service(at("/readyz").route(web::get().to(health::readyz)))
    .service(at("/metrics").route(web::get().to(health::metrics)))
    .service(at("/v1/models").route(web::get().to(openai::models)))
    .service(at("/v1/chat/completions").route(web::post().to(openai::chat_completions)))
    .service(at("/v1/responses").route(web::post().to(responses::create)))
    .service(
        at("/v1/responses/{id}")
            .route(web::get().to(responses::get))
            .route(web::delete().to(responses::delete)),
    )
    .service(at("/v1/responses/{id}/input_items").route(web::get().to(responses::input_items)))
    .service(at("/v1/files").route(web::post().to(batches::upload)))
    .service(at("/v1/files/{id}").route(web::get().to(batches::get_file)))
    .service(at("/v1/files/{id}/content").route(web::get().to(batches::file_content)))
    .service(
        at("/v1/batches")
            .route(web::post().to(batches::create))
            .route(web::get().to(batches::list)),
    )
    .service(at("/v1/batches/{id}").route(web::get().to(batches::get)))
    .service(at("/v1/batches/{id}/cancel").route(web::post().to(batches::cancel)))
    .service(
        at("/v1/jobs")
            .route(web::post().to(jobs::create))
            .route(web::get().to(jobs::list)),
    )
    .service(
        at("/v1/jobs/{id}")
            .route(web::get().to(jobs::get))
            .route(web::delete().to(jobs::cancel)),
    )
    .service(
        at("/v1/conversations")
            .route(web::post().to(conversations::create))
            .route(web::get().to(conversations::list)),
    )
    .service(
        at("/v1/conversations/{id}")
            .route(web::get().to(conversations::get))
            .route(web::delete().to(conversations::delete)),
    )
    .service(
        at("/v1/conversations/{id}/messages")
            .route(web::get().to(conversations::list_messages))
            .route(web::post().to(conversations::post_message)),
    )
    .service(at("/v1/conversations/{id}/cancel").route(web::post().to(conversations::cancel)))
    .service(at("/v1/ws").route(web::get().to(ws::connect)))
    .service(
        at("/admin/keys")
            .route(web::post().to(admin::create_key))
            .route(web::get().to(admin::list_keys)),
    )
    .service(at("/admin/keys/{id}").route(web::delete().to(admin::revoke_key)))
    .service(at("/admin/webhook-secrets").route(web::post().to(admin::webhook_secret)))
    .service(at("/admin/providers").route(web::get().to(admin::providers)))
    .service(at("/admin/cache").route(web::get().to(admin::cache)))
    .service(at("/admin/usage").route(web::get().to(usage::admin)))
    .service(
        at("/admin/prompts/{name}")
            .route(web::put().to(admin::put_prompt))
            .route(web::get().to(admin::list_prompts)),
    )
    .service(at("/v1/usage").route(web::get().to(usage::own)))
    .default_service(web::to(not_found));
}

/// A path of the table: a method it does not serve is answered 405, not 404.
fn at(path: &str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(method_not_allowed))
}

async fn method_not_allowed(req: HttpRequest) -> Result<actix_web::HttpResponse, ApiError> {
    let mut err = ApiError::bad_request(format!(
        "method {} is not allowed on {}",
        req.method(),
        req.path()
    ));
    err.status = Some(actix_web::http::StatusCode::METHOD_NOT_ALLOWED);
    Err(err)
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
