//! The Anthropic Messages API (`/v1/messages`), streaming: `message_start` (input tokens, model),
//! `content_block_delta` (text), `message_delta` (stop reason, output tokens), `message_stop`,
//! `ping` and `error` events. The system prompt travels in `system`; consecutive messages of one
//! role are merged, since the API wants user and assistant turns to alternate.

use std::time::Duration;

use secrecy::SecretString;

use super::openai::send;
use super::sse::{self, Decoded, Decoder};
use super::{ChatRequest, EventTx, Observed, ProviderError, UpstreamEvent};
use crate::domain::{FinishReason, ToolCallDelta, UpstreamFinish, Usage};
use crate::wire::anthropic::{self, finish_of, BlockDelta, StartBlock, StreamEvent, ANSWER_TOOL};

pub const API_VERSION: &str = "2023-06-01";

pub struct AnthropicClient {
    name: String,
    url: super::http::Endpoint,
    credential: Option<super::http::Credential>,
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
            url: super::http::Endpoint::new(format!("{base_url}/messages")),
            credential: key
                .as_ref()
                .map(|k| super::http::Credential::header("x-api-key", k)),
            http,
            timeout,
        }
    }

    pub async fn run(&self, req: ChatRequest, tx: &EventTx, seen: &Observed) {
        let body = match anthropic::encode(&req) {
            Ok(b) => b,
            Err(message) => {
                let e = ProviderError::Invalid {
                    provider: self.name.clone(),
                    message,
                };
                let _ = tx.send(UpstreamEvent::Failed(e)).await;
                return;
            }
        };
        let decoder = AnthropicDecoder {
            answer_tool: anthropic::wants_answer_tool(&req),
            ..AnthropicDecoder::default()
        };
        let request = self
            .url
            .post_json(&self.http, &body, self.credential.as_ref())
            .header("anthropic-version", API_VERSION);
        let response = match send(&self.name, request, self.timeout, tx, seen).await {
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
            decoder,
            self.timeout,
            tx,
        )
        .await;
    }
}

/// Reads a Messages stream. Tool-use blocks become tool-call fragments numbered in the order
/// they start; the input of [`ANSWER_TOOL`] (a structured answer) becomes text instead.
#[derive(Debug, Default)]
pub struct AnthropicDecoder {
    finish: Option<UpstreamFinish>,
    input_tokens: u32,
    output_tokens: Option<u32>,
    model: Option<String>,
    /// Whether the request asked for a structured answer through the answer tool.
    answer_tool: bool,
    /// Content block index → what it carries.
    blocks: Vec<(u32, BlockKind)>,
    tool_calls: u32,
    answered: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockKind {
    Text,
    Tool(u32),
    Answer,
    Other,
}

impl AnthropicDecoder {
    fn kind(&self, index: u32) -> BlockKind {
        self.blocks
            .iter()
            .find(|(i, _)| *i == index)
            .map_or(BlockKind::Text, |(_, k)| *k)
    }
}

impl Decoder for AnthropicDecoder {
    fn decode(
        &mut self,
        event: &str,
        data: &str,
        out: &mut Vec<UpstreamEvent>,
    ) -> Result<Decoded, String> {
        if event == "ping" {
            return Ok(Decoded::More);
        }
        let ev: StreamEvent =
            serde_json::from_str(data).map_err(|e| format!("{event} event: {e}"))?;
        match ev {
            StreamEvent::MessageStart { message } => {
                self.input_tokens = message.usage.map_or(0, |u| u.input_tokens);
                self.model = message.model;
            }
            StreamEvent::ContentBlockStart {
                index,
                content_block,
            } => {
                let kind = match content_block {
                    StartBlock::Text { text } => {
                        if !text.is_empty() {
                            out.push(UpstreamEvent::Delta(text));
                        }
                        BlockKind::Text
                    }
                    StartBlock::ToolUse { name, .. } if self.answer_tool && name == ANSWER_TOOL => {
                        self.answered = true;
                        BlockKind::Answer
                    }
                    StartBlock::ToolUse { id, name } => {
                        let n = self.tool_calls;
                        self.tool_calls += 1;
                        out.push(UpstreamEvent::ToolCall(ToolCallDelta {
                            index: n,
                            id: Some(id),
                            name: Some(name),
                            arguments: String::new(),
                        }));
                        BlockKind::Tool(n)
                    }
                    StartBlock::Other => BlockKind::Other,
                };
                self.blocks.push((index, kind));
            }
            StreamEvent::ContentBlockDelta { index, delta } => match (self.kind(index), delta) {
                (BlockKind::Text, BlockDelta::TextDelta { text }) => {
                    out.push(UpstreamEvent::Delta(text));
                }
                (BlockKind::Answer, BlockDelta::InputJsonDelta { partial_json }) => {
                    out.push(UpstreamEvent::Delta(partial_json));
                }
                (BlockKind::Tool(n), BlockDelta::InputJsonDelta { partial_json }) => {
                    out.push(UpstreamEvent::ToolCall(ToolCallDelta {
                        index: n,
                        id: None,
                        name: None,
                        arguments: partial_json,
                    }));
                }
                _ => {}
            },
            StreamEvent::MessageDelta { delta, usage } => {
                if let Some(reason) = delta.stop_reason {
                    let mut finish = finish_of(&reason);
                    // The structured answer came as the answer tool's input: a plain reply.
                    if self.answered && self.tool_calls == 0 && reason == "tool_use" {
                        finish = UpstreamFinish::known(FinishReason::Stop);
                    }
                    self.finish = Some(finish);
                }
                if let Some(n) = usage.and_then(|u| u.output_tokens) {
                    self.output_tokens = Some(n);
                }
            }
            StreamEvent::MessageStop => {
                self.finish.get_or_insert(UpstreamFinish::UNKNOWN);
                return Ok(Decoded::End);
            }
            StreamEvent::Error { error } => {
                return Ok(Decoded::Error(
                    error.message.unwrap_or_else(|| "upstream error".into()),
                ));
            }
            StreamEvent::ContentBlockStop { .. } | StreamEvent::Ping | StreamEvent::Other => {}
        }
        Ok(Decoded::More)
    }

    fn outcome(&self) -> (Option<UpstreamFinish>, Option<Usage>, Option<String>) {
        let usage = self
            .output_tokens
            .map(|out| Usage::new(self.input_tokens, out));
        (self.finish, usage, self.model.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::stream;
    use tokio::sync::mpsc;

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
        let tx = EventTx::new(tx);
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
                finish,
                usage,
                model,
            }) => {
                assert_eq!(finish.reason, FinishReason::Length);
                assert_eq!(usage, Some(Usage::new(9, 2)));
                assert_eq!(model.as_deref(), Some("claude-x"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn tool_use_blocks_become_call_fragments_and_the_answer_tool_text() {
        let body = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"c\",\"usage\":{\"input_tokens\":3}}}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Let me look.\"}}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_1\",\"name\":\"get\",\"input\":{}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"q\\\":\"}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"2}\"}}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":2,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_2\",\"name\":\"put\",\"input\":{}}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\"},\"usage\":{\"output_tokens\":9}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        );
        let events = pump_all(body, AnthropicDecoder::default()).await;
        let mut calls = crate::domain::CallsBuilder::default();
        let mut text = String::new();
        for e in &events {
            match e {
                UpstreamEvent::ToolCall(d) => calls.push(d),
                UpstreamEvent::Delta(t) => text.push_str(t),
                _ => {}
            }
        }
        let calls = calls.finish();
        assert_eq!(text, "Let me look.");
        assert_eq!(calls.len(), 2);
        assert_eq!(
            (calls[0].id.as_str(), calls[0].arguments.as_str()),
            ("toolu_1", "{\"q\":2}")
        );
        assert_eq!(calls[1].name, "put");
        assert!(
            matches!(events.last(), Some(UpstreamEvent::Finished { finish, .. }) if finish.reason == FinishReason::ToolCalls)
        );

        // The answer tool's input is the reply's text, and the reply ends as `stop`.
        let body = concat!(
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"tool_use\",\"id\":\"t\",\"name\":\"json_answer\",\"input\":{}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"a\\\":1}\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\"},\"usage\":{\"output_tokens\":2}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        );
        let decoder = AnthropicDecoder {
            answer_tool: true,
            ..AnthropicDecoder::default()
        };
        let events = pump_all(body, decoder).await;
        assert!(matches!(&events[0], UpstreamEvent::Delta(t) if t == "{\"a\":1}"));
        assert!(
            matches!(events.last(), Some(UpstreamEvent::Finished { finish, .. }) if finish.reason == FinishReason::Stop && finish.complete)
        );
    }

    async fn pump_all(body: &'static str, decoder: AnthropicDecoder) -> Vec<UpstreamEvent> {
        let (tx, mut rx) = mpsc::channel(64);
        let tx = EventTx::new(tx);
        let s = stream::iter(
            body.as_bytes()
                .chunks(11)
                .map(|c| Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(c))),
        );
        sse::pump("a", s, decoder, Duration::from_secs(5), &tx).await;
        drop(tx);
        let mut out = Vec::new();
        while let Some(e) = rx.recv().await {
            out.push(e);
        }
        out
    }
}
