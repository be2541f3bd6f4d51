//! The mock's HTTP surface: OpenAI and Anthropic generation endpoints, embeddings, models.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use bytes::Bytes;
use futures_util::{stream, StreamExt};
use serde_json::{json, Value};

use super::generator::{self, Fault, MockMessage, Plan};
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
    let messages = read_messages(&body);
    let max_tokens = body
        .get("max_tokens")
        .and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok());
    let plan = generator::plan(behaviour.seed, &messages, max_tokens);
    tokio::time::sleep(plan.ttft.unwrap_or(behaviour.ttft)).await;

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
        (Wire::OpenAi, false) => HttpResponse::Ok().json(openai_json(&plan, &model)),
        (Wire::Anthropic, false) => HttpResponse::Ok().json(anthropic_json(&plan, &model)),
        (wire, true) => {
            let events = match wire {
                Wire::OpenAi => openai_events(&plan, &model, include_usage),
                Wire::Anthropic => anthropic_events(&plan, &model),
            };
            stream_response(events, fault, tps, wire)
        }
    }
}

fn read_messages(body: &Value) -> Vec<MockMessage> {
    let text = |c: &Value| match c {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    };
    let mut out = Vec::new();
    if let Some(system) = body.get("system") {
        out.push(MockMessage {
            role: "system".into(),
            content: text(system),
        });
    }
    for m in body
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .unwrap_or("user")
            .to_owned();
        out.push(MockMessage {
            role,
            content: m.get("content").map(text).unwrap_or_default(),
        });
    }
    out
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

fn openai_json(plan: &Plan, model: &str) -> Value {
    json!({
        "id": "chatcmpl-mock", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": plan.text()}, "finish_reason": plan.finish_reason}],
        "usage": usage(plan),
    })
}

fn anthropic_json(plan: &Plan, model: &str) -> Value {
    json!({
        "id": "msg_mock", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": plan.text()}],
        "stop_reason": anthropic_stop(plan),
        "usage": {"input_tokens": plan.prompt_tokens, "output_tokens": plan.completion_tokens},
    })
}

fn usage(plan: &Plan) -> Value {
    json!({
        "prompt_tokens": plan.prompt_tokens,
        "completion_tokens": plan.completion_tokens,
        "total_tokens": plan.prompt_tokens + plan.completion_tokens,
    })
}

fn anthropic_stop(plan: &Plan) -> &'static str {
    if plan.finish_reason == "length" {
        "max_tokens"
    } else {
        "end_turn"
    }
}

/// SSE events; the i-th content chunk is at index i + 1 (after the opening event).
fn openai_events(plan: &Plan, model: &str, include_usage: bool) -> Vec<String> {
    let chunk = |delta: Value, finish: Option<&str>| {
        json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let mut events = vec![data(&chunk(
        json!({"role": "assistant", "content": ""}),
        None,
    ))];
    events.extend(
        plan.chunks
            .iter()
            .map(|c| data(&chunk(json!({"content": c}), None))),
    );
    events.push(data(&chunk(json!({}), Some(plan.finish_reason))));
    if include_usage {
        let u = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": model,
                       "choices": [], "usage": usage(plan)});
        events.push(data(&u));
    }
    events.push("data: [DONE]\n\n".into());
    events
}

fn anthropic_events(plan: &Plan, model: &str) -> Vec<String> {
    let ev = |name: &str, v: Value| format!("event: {name}\ndata: {v}\n\n");
    let mut events = vec![ev(
        "message_start",
        json!({"type": "message_start", "message": {"id": "msg_mock", "type": "message", "role": "assistant",
               "model": model, "content": [], "stop_reason": null, "stop_sequence": null,
               "usage": {"input_tokens": plan.prompt_tokens, "output_tokens": 0}}}),
    )];
    events.push(ev(
        "content_block_start",
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ));
    events.extend(plan.chunks.iter().map(|c| {
        ev("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": c}}))
    }));
    events.push(ev(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push(ev(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": anthropic_stop(plan)}, "usage": {"output_tokens": plan.completion_tokens}}),
    ));
    events.push(ev("message_stop", json!({"type": "message_stop"})));
    events
}

fn data(v: &Value) -> String {
    format!("data: {v}\n\n")
}

/// Streams `events` at `tps` chunks per second; `DropAfter(n)` breaks the connection after the
/// n-th content chunk.
fn stream_response(
    events: Vec<String>,
    fault: Option<Fault>,
    tps: f64,
    wire: Wire,
) -> HttpResponse {
    let gap = if tps > 0.0 {
        Duration::from_secs_f64(1.0 / tps)
    } else {
        Duration::ZERO
    };
    // Content chunks follow the opening events: one for OpenAI, two for Anthropic.
    let opening = match wire {
        Wire::OpenAi => 1,
        Wire::Anthropic => 2,
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
            tokio::time::sleep(gap).await;
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

/// A deterministic unit vector of 64 dimensions from hashed words.
fn embed(seed: u64, text: &str) -> Vec<f32> {
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
