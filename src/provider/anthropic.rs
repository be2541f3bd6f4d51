//! The Anthropic Messages API (`/v1/messages`), streaming: `message_start` (input tokens, model),
//! `content_block_delta` (text), `message_delta` (stop reason, output tokens), `message_stop`,
//! `ping` and `error` events. The system prompt travels in `system`; consecutive messages of one
//! role are merged, since the API wants user and assistant turns to alternate.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use tokio::sync::mpsc;

use super::openai::send;
use super::sse::{self, Decoded, Decoder};
use super::{ChatMessage, ChatRequest, Observed, UpstreamEvent};
use crate::store::Usage;

pub const API_VERSION: &str = "2023-06-01";
/// Anthropic requires `max_tokens`; this is used when the client gives none.
pub const DEFAULT_MAX_TOKENS: u32 = 1024;

pub struct AnthropicClient {
    name: String,
    url: String,
    key: Option<SecretString>,
    http: reqwest::Client,
    timeout: Duration,
}

impl AnthropicClient {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn new(
        name: &str,
        base_url: &str,
        key: Option<SecretString>,
        http: reqwest::Client,
        timeout: Duration,
    ) -> Self {
        Self {
            name: name.to_owned(),
            url: format!("{base_url}/messages"),
            key,
            http,
            timeout,
        }
    }

    pub async fn run(&self, req: ChatRequest, tx: mpsc::Sender<UpstreamEvent>, seen: &Observed) {
        let body = request_body(&req);
        let mut request = self
            .http
            .post(&self.url)
            .header("anthropic-version", API_VERSION)
            .json(&body);
        if let Some(key) = &self.key {
            request = request.header("x-api-key", key.expose_secret());
        }
        let response = match send(&self.name, request, self.timeout, &tx, seen).await {
            Some(Ok(r)) => r,
            Some(Err(e)) => {
                let _ = tx.send(UpstreamEvent::Failed(e)).await;
                return;
            }
            None => return,
        };
        sse::pump(
            &self.name,
            response.bytes_stream(),
            AnthropicDecoder::default(),
            self.timeout,
            &tx,
        )
        .await;
    }
}

/// The Messages API body of a request.
pub fn request_body(req: &ChatRequest) -> serde_json::Value {
    let system: Vec<&str> = req
        .messages
        .iter()
        .filter(|m| m.role == "system")
        .map(|m| m.content.as_str())
        .collect();
    let mut messages: Vec<ChatMessage> = Vec::new();
    for m in req.messages.iter().filter(|m| m.role != "system") {
        match messages.last_mut() {
            Some(last) if last.role == m.role => {
                last.content.push_str("\n\n");
                last.content.push_str(&m.content);
            }
            _ => messages.push(m.clone()),
        }
    }
    let mut body = json!({
        "model": req.model,
        "messages": messages,
        "max_tokens": req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        "stream": true,
    });
    if !system.is_empty() {
        body["system"] = system.join("\n\n").into();
    }
    if let Some(t) = req.temperature {
        body["temperature"] = t.into();
    }
    body
}

#[derive(Debug, Default)]
pub struct AnthropicDecoder {
    finish_reason: Option<String>,
    input_tokens: u32,
    output_tokens: Option<u32>,
    model: Option<String>,
}

impl Decoder for AnthropicDecoder {
    fn decode(&mut self, event: &str, data: &str) -> Result<Decoded, String> {
        let v: serde_json::Value = match event {
            "ping" => return Ok(Decoded::Nothing),
            _ => {
                serde_json::from_str(data).map_err(|e| format!("{event} event is not JSON: {e}"))?
            }
        };
        let num = |p: &str| {
            v.pointer(p)
                .and_then(serde_json::Value::as_u64)
                .and_then(|n| u32::try_from(n).ok())
        };
        match event {
            "message_start" => {
                self.input_tokens = num("/message/usage/input_tokens").unwrap_or(0);
                self.model = v
                    .pointer("/message/model")
                    .and_then(|m| m.as_str())
                    .map(str::to_owned);
                Ok(Decoded::Nothing)
            }
            "content_block_delta" => {
                let text = v
                    .pointer("/delta/text")
                    .and_then(|t| t.as_str())
                    .unwrap_or_default();
                Ok(Decoded::Delta(text.to_owned()))
            }
            "message_delta" => {
                if let Some(reason) = v.pointer("/delta/stop_reason").and_then(|r| r.as_str()) {
                    self.finish_reason = Some(map_stop_reason(reason).to_owned());
                }
                if let Some(n) = num("/usage/output_tokens") {
                    self.output_tokens = Some(n);
                }
                Ok(Decoded::Nothing)
            }
            "message_stop" => {
                self.finish_reason.get_or_insert_with(|| "unknown".into());
                Ok(Decoded::End)
            }
            "error" => {
                let msg = v
                    .pointer("/error/message")
                    .and_then(|m| m.as_str())
                    .unwrap_or("upstream error");
                Ok(Decoded::Error(msg.to_owned()))
            }
            _ => Ok(Decoded::Nothing),
        }
    }

    fn outcome(&self) -> (Option<String>, Option<Usage>, Option<String>) {
        let usage = self
            .output_tokens
            .map(|out| Usage::new(self.input_tokens, out));
        (self.finish_reason.clone(), usage, self.model.clone())
    }
}

/// Anthropic's stop reasons in OpenAI's words; others (`pause_turn`, future ones) pass as they
/// are: shown as `stop`, never taken for a complete reply.
fn map_stop_reason(reason: &str) -> &str {
    match reason {
        "end_turn" | "stop_sequence" => "stop",
        "max_tokens" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::stream;

    #[tokio::test]
    async fn decodes_a_message_stream() {
        let body = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-x\",\"usage\":{\"input_tokens\":9}}}\n\n",
            "event: ping\ndata: {\"type\":\"ping\"}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\" there\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"max_tokens\"},\"usage\":{\"output_tokens\":2}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        );
        let (tx, mut rx) = mpsc::channel(64);
        let s = stream::iter(
            body.as_bytes()
                .chunks(7)
                .map(|c| Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(c))),
        );
        sse::pump(
            "a",
            s,
            AnthropicDecoder::default(),
            Duration::from_secs(5),
            &tx,
        )
        .await;
        drop(tx);
        let mut text = String::new();
        let mut end = None;
        while let Some(e) = rx.recv().await {
            match e {
                UpstreamEvent::Delta(t) => text.push_str(&t),
                other => end = Some(other),
            }
        }
        assert_eq!(text, "Hi there");
        match end {
            Some(UpstreamEvent::Finished {
                finish_reason,
                usage,
                model,
            }) => {
                assert_eq!(finish_reason, "length");
                assert_eq!(usage, Some(Usage::new(9, 2)));
                assert_eq!(model.as_deref(), Some("claude-x"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn system_goes_apart_and_roles_alternate() {
        let msg = |role, content: &str| ChatMessage {
            role,
            content: content.into(),
        };
        let req = ChatRequest {
            model: "m".into(),
            messages: vec![
                msg("system", "be kind"),
                msg("user", "a"),
                msg("user", "b"),
                msg("assistant", "c"),
            ],
            max_tokens: None,
            temperature: None,
        };
        let body = request_body(&req);
        assert_eq!(body["system"], "be kind");
        assert_eq!(body["max_tokens"], DEFAULT_MAX_TOKENS);
        assert_eq!(body["messages"].as_array().map(Vec::len), Some(2));
        assert_eq!(body["messages"][0]["content"], "a\n\nb");
    }
}
