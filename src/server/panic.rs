//! Middleware that turns a panicking handler into a 500 `internal` answer in the OpenAI shape,
//! so one bug never takes a worker's connections down with it.

use std::panic::AssertUnwindSafe;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::ResponseError;
use futures_util::FutureExt;

use crate::error::ApiError;

/// Catches panics of the handlers below it.
pub struct CatchPanic;

impl CatchPanic {
    /// The middleware function, for `actix_web::middleware::from_fn`.
    ///
    /// # Errors
    /// Passes on the inner service's errors.
    pub async fn handle(
        req: ServiceRequest,
        next: Next<impl MessageBody + 'static>,
    ) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
        let http_req = req.request().clone();
        match AssertUnwindSafe(next.call(req)).catch_unwind().await {
            Ok(res) => res.map(ServiceResponse::map_into_boxed_body),
            Err(_) => {
                tracing::error!(path = %http_req.path(), "handler panicked");
                Ok(ServiceResponse::new(http_req, ApiError::internal().error_response()))
            }
        }
    }
}
