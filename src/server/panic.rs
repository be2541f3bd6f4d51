//! Middleware that turns a panicking handler into a 500 `internal` answer in the OpenAI shape,
//! so one bug never takes a worker's connections down with it.

use std::panic::AssertUnwindSafe;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
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
        // The request cannot be cloned here (routing needs it unshared); an error answer is
        // rendered by actix from `ApiError`'s `ResponseError` impl.
        let path = req.path().to_owned();
        match AssertUnwindSafe(next.call(req)).catch_unwind().await {
            Ok(res) => res.map(ServiceResponse::map_into_boxed_body),
            Err(_) => {
                tracing::error!(%path, "handler panicked");
                Err(ApiError::internal().into())
            }
        }
    }
}
