//! Request authentication: `Authorization: Bearer <key>`, or `?access_token=` on the WebSocket
//! URL for browsers. Extractors give handlers a [`Principal`] or an admin check.

use std::future::{ready, Ready};

use actix_web::{dev::Payload, web, FromRequest, HttpRequest};

use super::AppState;
use crate::error::ApiError;
use crate::tenant::Principal;

/// The bearer token of a request, if any.
pub fn bearer(req: &HttpRequest) -> Option<&str> {
    let header = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = header.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The `access_token` query parameter (WebSocket upgrades only).
pub fn access_token(req: &HttpRequest) -> Option<String> {
    web::Query::<std::collections::HashMap<String, String>>::from_query(req.query_string())
        .ok()?
        .get("access_token")
        .filter(|t| !t.is_empty())
        .cloned()
}

fn state(req: &HttpRequest) -> Result<&web::Data<AppState>, ApiError> {
    req.app_data::<web::Data<AppState>>().ok_or_else(|| {
        tracing::error!("application state missing");
        ApiError::internal()
    })
}

/// A `/v1/*` caller.
pub struct Client(pub Principal);

impl FromRequest for Client {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(
            state(req)
                .and_then(|s| s.auth.client(bearer(req)))
                .map(Client),
        )
    }
}

/// An `/admin/*` caller.
pub struct Admin;

impl FromRequest for Admin {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(
            state(req)
                .and_then(|s| s.auth.admin(bearer(req)))
                .map(|()| Admin),
        )
    }
}
