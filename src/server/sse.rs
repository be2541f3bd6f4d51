//! Server-sent events: framing of one event and the streaming response around a stream of them.

use actix_web::http::header;
use actix_web::HttpResponse;
use bytes::Bytes;
use futures_util::Stream;

/// One SSE event: an optional `event:` name and a one-line `data:` payload (JSON never contains
/// a raw newline, so one `data:` line suffices).
pub fn event(name: Option<&str>, data: &str) -> Bytes {
    let mut out = String::with_capacity(data.len() + 32);
    if let Some(name) = name {
        out.push_str("event: ");
        out.push_str(name);
        out.push('\n');
    }
    out.push_str("data: ");
    out.push_str(data);
    out.push_str("\n\n");
    Bytes::from(out)
}

/// A streaming `text/event-stream` response; dropping the client drops `body`.
pub fn response<S>(body: S) -> HttpResponse
where
    S: Stream<Item = Result<Bytes, actix_web::Error>> + 'static,
{
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body)
}
