//! The built-in `mock` provider: the mock upstream's generator run in-process, with the same
//! pacing and per-request fault directives, so the embedded default needs no network.

use std::time::Duration;

use super::{ChatRequest, EventTx, ProviderError, UpstreamEvent};
use crate::domain::Usage;
use crate::domain::{ResponseFormat, Role, ToolCallDelta, ToolChoice};
use crate::mock_upstream::generator::{
    self, Fault, MockCall, MockChoice, MockMessage, MockRequest, MockTool,
};

pub struct MockBackend {
    name: String,
    seed: u64,
    ttft: Duration,
    tokens_per_sec: f64,
    /// The provider's `timeout_secs`: how long a hung reply is waited for.
    timeout: Duration,
}

impl MockBackend {
    pub fn new(
        name: &str,
        seed: u64,
        ttft: Duration,
        tokens_per_sec: f64,
        timeout: Duration,
    ) -> Self {
        Self {
            name: name.to_owned(),
            seed,
            ttft,
            tokens_per_sec,
            timeout,
        }
    }

    /// The seed its replies (and embeddings) are drawn from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub async fn run(&self, req: ChatRequest, tx: &EventTx) {
        let plan = generator::plan_request(self.seed, &mock_request(&req));
        let ttft = plan.ttft.unwrap_or(self.ttft);
        let gap = generator::pace(plan.tokens_per_sec.unwrap_or(self.tokens_per_sec))
            .unwrap_or(Duration::ZERO);
        let provider = self.name.clone();
        let fail = |e| UpstreamEvent::Failed(e);
        if !wait(ttft, tx).await {
            return;
        }
        match plan.fault {
            Some(Fault::Status(status)) => {
                let retry_after = (status == 429).then_some(Duration::from_secs(1));
                let message = format!("mock fault: status {status}");
                let _ = tx
                    .send(fail(ProviderError::Status {
                        provider,
                        status,
                        message,
                        retry_after,
                    }))
                    .await;
                return;
            }
            // Like any provider, a silent one times out.
            Some(Fault::Hang) => {
                if wait(self.timeout, tx).await {
                    let _ = tx.send(fail(ProviderError::Timeout { provider })).await;
                }
                return;
            }
            _ => {}
        }
        for (i, chunk) in plan.chunks.iter().enumerate() {
            if plan.fault == Some(Fault::DropAfter(i)) {
                let message = "mock fault: connection dropped".to_owned();
                let _ = tx
                    .send(fail(ProviderError::Interrupted { provider, message }))
                    .await;
                return;
            }
            if i > 0 && !wait(gap, tx).await {
                return;
            }
            if tx.send(UpstreamEvent::Delta(chunk.clone())).await.is_err() {
                return;
            }
        }
        for (i, call) in plan.tool_calls.iter().enumerate() {
            let delta = ToolCallDelta {
                index: u32::try_from(i).unwrap_or(u32::MAX),
                id: Some(call.id.clone()),
                name: Some(call.name.clone()),
                arguments: call.arguments.clone(),
            };
            if tx.send(UpstreamEvent::ToolCall(delta)).await.is_err() {
                return;
            }
        }
        let usage = Usage::new(plan.prompt_tokens, plan.completion_tokens);
        let finished = UpstreamEvent::Finished {
            finish: crate::wire::openai::finish_of(plan.finish_reason),
            usage: Some(usage),
            model: Some(req.model),
        };
        let _ = tx.send(finished).await;
    }
}

/// The request as the generator reads it (the same reading the mock upstream's server does of
/// its wire formats).
fn mock_request(req: &ChatRequest) -> MockRequest {
    let messages: Vec<MockMessage> = req
        .messages
        .iter()
        .map(|m| MockMessage {
            role: m.role.as_str().to_owned(),
            content: if m.tool_calls.is_empty() {
                m.content.text()
            } else {
                let calls: Vec<MockCall> = m
                    .tool_calls
                    .iter()
                    .map(|c| MockCall {
                        id: c.id.clone(),
                        name: c.name.clone(),
                        arguments: c.arguments.clone(),
                    })
                    .collect();
                generator::assistant_content(&m.content.text(), &calls)
            },
        })
        .collect();
    let last_user = req.messages.iter().rev().find(|m| m.role == Role::User);
    let tool_results: Vec<(String, bool)> = req
        .messages
        .iter()
        .rev()
        .take_while(|m| m.role == Role::Tool)
        .map(|m| (m.content.text(), m.is_error))
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let (json_schema, json_object) = match &req.params.response_format {
        Some(ResponseFormat::JsonSchema { json_schema }) => (
            Some(
                json_schema
                    .schema
                    .clone()
                    .unwrap_or(serde_json::Value::Null),
            ),
            false,
        ),
        Some(ResponseFormat::JsonObject) => (None, true),
        Some(ResponseFormat::Text) | None => (None, false),
    };
    MockRequest {
        messages,
        images: last_user.map_or(0, |m| m.content.images().count()),
        image_tokens: req
            .messages
            .iter()
            .flat_map(|m| m.content.images())
            .map(crate::tokens::image_tokens)
            .fold(0, u32::saturating_add),
        tool_results,
        tools: req
            .tools
            .iter()
            .map(|t| MockTool {
                name: t.name.clone(),
                parameters: t.parameters.clone().unwrap_or(serde_json::Value::Null),
            })
            .collect(),
        choice: match &req.tool_choice {
            None | Some(ToolChoice::Auto) => MockChoice::Auto,
            Some(ToolChoice::None) => MockChoice::None,
            Some(ToolChoice::Required) => MockChoice::Required,
            Some(ToolChoice::Function(name)) => MockChoice::Named(name.clone()),
        },
        json_schema,
        json_object,
        max_tokens: req.max_tokens,
    }
}

/// Waits `d` unless the consumer leaves first; answers whether to go on.
async fn wait(d: Duration, tx: &EventTx) -> bool {
    if d.is_zero() {
        return !tx.is_closed();
    }
    tokio::select! {
        () = tx.closed() => false,
        () = crate::mock_upstream::sleep(d) => true,
    }
}
