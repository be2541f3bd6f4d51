//! The chat page (`/`) and the operator dashboard (`/dashboard`): static files built into the
//! binary (no Node toolchain to build or run), served with a Content-Security-Policy that runs
//! only these scripts (a reply rendered as markup by mistake still could not run one).

use actix_web::http::header;
use actix_web::{web, HttpResponse};

use crate::error::ApiError;

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' https: data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// `(name, content type, bytes)` of every file under `/ui/`.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../ui/app.js"),
    ),
    (
        "markdown.js",
        "text/javascript; charset=utf-8",
        include_str!("../ui/markdown.js"),
    ),
    (
        "dashboard.js",
        "text/javascript; charset=utf-8",
        include_str!("../ui/dashboard.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("../ui/style.css"),
    ),
    (
        "dashboard.css",
        "text/css; charset=utf-8",
        include_str!("../ui/dashboard.css"),
    ),
];

fn page(content_type: &str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((header::CONTENT_SECURITY_POLICY, CSP))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(body)
}

pub async fn chat() -> HttpResponse {
    page("text/html; charset=utf-8", include_str!("../ui/index.html"))
}

pub async fn dashboard() -> HttpResponse {
    page(
        "text/html; charset=utf-8",
        include_str!("../ui/dashboard.html"),
    )
}

pub async fn asset(name: web::Path<String>) -> Result<HttpResponse, ApiError> {
    ASSETS
        .iter()
        .find(|(n, _, _)| *n == name.as_str())
        .map(|(_, ty, body)| page(ty, body))
        .ok_or_else(|| ApiError::not_found(&format!("GET /ui/{name}")))
}
