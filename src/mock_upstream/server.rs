//! The mock's HTTP surface: OpenAI and Anthropic generation endpoints, embeddings, models.
//! Each wire ([`openai`], [`anthropic`]) reads its request into a
//! [`MockRequest`](super::generator::MockRequest), refusing with a 400 what the real API refuses,
//! and writes the [`generator`]'s plan back as JSON or SSE; this file owns the HTTP side (faults,
//! pacing, dropped connections).

mod anthropic;
mod openai;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use bytes::Bytes;
use futures_util::{stream, StreamExt};
use serde_json::{json, Value};

use super::generator::{self, Fault};
use super::MockState;

/// A hung request is held at most this long (tests close their side long before).
const HANG: Duration = Duration::from_secs(600);

/// Builds the mock's server on `listener` (`workers` 0 = one per core).
pub fn build(
    listener: TcpListener,
    state: Arc<MockState>,
    workers: usize,
) -> std::io::Result<actix_web::dev::Server> {
    let data = web::Data::from(state);
    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .app_data(
                web::JsonConfig::default()
                    .limit(64 << 20)
                    .content_type_required(false),
            )
            .route("/v1/chat/completions", web::post().to(chat_completions))
            .route("/v1/messages", web::post().to(messages))
            .route("/v1/embeddings", web::post().to(embeddings))
            .route("/v1/models", web::get().to(models))
            .route("/mock/stats", web::get().to(stats))
    })
    .tcp_nodelay(true)
    .listen(listener)?
    .disable_signals()
    .shutdown_timeout(1);
    if workers > 0 {
        server = server.workers(workers);
    }
    Ok(server.run())
}

#[derive(Clone, Copy, PartialEq)]
enum Wire {
    OpenAi,
    Anthropic,
}

async fn chat_completions(state: web::Data<MockState>, body: web::Json<Value>) -> HttpResponse {
    generate(&state, body.into_inner(), Wire::OpenAi).await
}

async fn messages(state: web::Data<MockState>, body: web::Json<Value>) -> HttpResponse {
    generate(&state, body.into_inner(), Wire::Anthropic).await
}

async fn generate(state: &MockState, body: Value, wire: Wire) -> HttpResponse {
    state.record(&body);
    let behaviour = state.behaviour.read().clone();
    let read = match wire {
        Wire::OpenAi => openai::read_request(&body),
        Wire::Anthropic => anthropic::read_request(&body),
    };
    let req = match read {
        Ok(req) => req,
        Err(message) => {
            return HttpResponse::BadRequest().json(bad_request_body(wire, &message));
        }
    };
    let plan = generator::plan_request(behaviour.seed, &req);
    super::sleep(plan.ttft.unwrap_or(behaviour.ttft)).await;

    let fault = if let Some(status) = drawn_fault(state) {
        Some(Fault::Status(status))
    } else {
        plan.fault.or(behaviour.drop_after.map(Fault::DropAfter))
    };
    match fault {
        Some(Fault::Status(status)) => return error_response(status, wire),
        Some(Fault::Hang) => {
            tokio::time::sleep(HANG).await;
            return error_response(504, wire);
        }
        _ => {}
    }
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-1")
        .to_owned();
    let streaming = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let tps = plan.tokens_per_sec.unwrap_or(behaviour.tokens_per_sec);
    match (wire, streaming) {
        (Wire::OpenAi, false) => HttpResponse::Ok().json(openai::answer(&plan, &model)),
        (Wire::Anthropic, false) => HttpResponse::Ok().json(anthropic::answer(&plan, &model)),
        (wire, true) => {
            let events = match wire {
                Wire::OpenAi => openai::events(&plan, &model, include_usage),
                Wire::Anthropic => anthropic::events(&plan, &model),
            };
            stream_response(events, fault, tps, wire)
        }
    }
}

/// The body of a 400 for a request the real API would refuse, in the wire's error shape.
fn bad_request_body(wire: Wire, message: &str) -> Value {
    match wire {
        Wire::OpenAi => json!({"error": {"message": message, "type": "invalid_request_error",
                                         "param": null, "code": "400"}}),
        Wire::Anthropic => json!({"type": "error",
                                  "error": {"type": "invalid_request_error", "message": message}}),
    }
}

/// The text of a content value: a string, or the `text` of its parts or blocks, concatenated.
fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts_text(parts),
        _ => String::new(),
    }
}

/// The `text` of `parts`, concatenated.
fn parts_text<'a>(parts: impl IntoIterator<Item = &'a Value>) -> String {
    parts
        .into_iter()
        .filter_map(|p| p.get("text").and_then(Value::as_str))
        .collect()
}

/// `body[key]` as a token count, when it is one.
fn max_tokens_of(body: &Value, key: &str) -> Option<u32> {
    body.get(key)
        .and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
}

fn error_response(status: u16, wire: Wire) -> HttpResponse {
    let code = actix_web::http::StatusCode::from_u16(status)
        .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = HttpResponse::build(code);
    if status == 429 {
        resp.insert_header(("Retry-After", "1"));
    }
    let message = format!("mock upstream fault: status {status}");
    match wire {
        Wire::OpenAi => resp
            .json(json!({"error": {"message": message, "type": "server_error", "code": status.to_string()}})),
        Wire::Anthropic => {
            let kind = if status == 429 {
                "rate_limit_error"
            } else {
                "api_error"
            };
            resp.json(json!({"type": "error", "error": {"type": kind, "message": message}}))
        }
    }
}

/// Streams `events` at `tps` chunks per second; `DropAfter(n)` breaks the connection after the
/// n-th content chunk (on a tool-call stream, the n-th event after the opening ones).
fn stream_response(
    events: Vec<String>,
    fault: Option<Fault>,
    tps: f64,
    wire: Wire,
) -> HttpResponse {
    let gap = generator::pace(tps).unwrap_or(Duration::ZERO);
    // Content chunks (or a tool-call stream's pieces) follow the wire's opening events.
    let opening = match wire {
        Wire::OpenAi => openai::OPENING,
        Wire::Anthropic => anthropic::OPENING,
    };
    let drop_at = match fault {
        Some(Fault::DropAfter(n)) => Some(n + opening),
        _ => None,
    };
    let body = stream::iter(events.into_iter().enumerate()).then(move |(i, event)| async move {
        if drop_at == Some(i) {
            // A body error drops the connection with whatever is still buffered: yield first, so
            // that the chunks streamed so far are flushed to the client before the drop.
            tokio::task::yield_now().await;
            return Err(actix_web::error::ErrorInternalServerError(
                "mock: connection dropped",
            ));
        }
        if i > 1 && !gap.is_zero() {
            super::sleep(gap).await;
        }
        Ok::<_, actix_web::Error>(Bytes::from(event))
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .streaming(body)
}

/// The status the `--error-rate` / `--rate-limit-rate` draw picks for this request, if any.
fn drawn_fault(state: &MockState) -> Option<u16> {
    let behaviour = state.behaviour.read().clone();
    let drawn = state.draw();
    if drawn < behaviour.error_rate {
        Some(500)
    } else if drawn < behaviour.error_rate + behaviour.rate_limit_rate {
        Some(429)
    } else {
        None
    }
}

async fn embeddings(state: web::Data<MockState>, body: web::Json<Value>) -> HttpResponse {
    if let Some(status) = drawn_fault(&state) {
        return error_response(status, Wire::OpenAi);
    }
    let inputs: Vec<String> =
        match body.get("input") {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| i.as_str().unwrap_or_default().to_owned())
                .collect(),
            _ => return HttpResponse::BadRequest().json(
                json!({"error": {"message": "input is required", "type": "invalid_request_error"}}),
            ),
        };
    state
        .embeddings
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    state
        .embedded_texts
        .fetch_add(inputs.len() as u64, std::sync::atomic::Ordering::Relaxed);
    let seed = state.behaviour.read().seed;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| json!({"object": "embedding", "index": i, "embedding": embed(seed, text)}))
        .collect();
    let tokens: u32 = inputs
        .iter()
        .map(|t| crate::tokens::count(crate::tokens::Encoding::Cl100kBase, t))
        .sum();
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-embed");
    HttpResponse::Ok().json(json!({"object": "list", "data": data, "model": model,
                                   "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}))
}

/// A deterministic unit vector of 64 dimensions from hashed words (the mock's embeddings, over
/// HTTP and in-process alike).
pub(crate) fn embed(seed: u64, text: &str) -> Vec<f32> {
    let mut v = vec![0f32; 64];
    for word in text.split_whitespace() {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
        for b in word.to_lowercase().bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        v[(h % 64) as usize] += if h & (1 << 63) == 0 { 1.0 } else { -1.0 };
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

async fn models(state: web::Data<MockState>) -> HttpResponse {
    if let Some(status) = drawn_fault(&state) {
        return error_response(status, Wire::OpenAi);
    }
    HttpResponse::Ok().json(json!({"object": "list", "data": [{"id": "mock-1", "object": "model", "created": 0, "owned_by": "mock"}]}))
}

async fn stats(state: web::Data<MockState>) -> HttpResponse {
    HttpResponse::Ok()
        .json(json!({"requests": state.requests.load(std::sync::atomic::Ordering::Relaxed)}))
}
