//! The built-in `mock` provider: the mock upstream's generator run in-process, with the same
//! pacing and per-request fault directives, so the embedded default needs no network.

use std::time::Duration;

use tokio::sync::mpsc;

use super::{ChatRequest, ProviderError, UpstreamEvent};
use crate::domain::Usage;
use crate::mock_upstream::generator::{self, Fault, MockMessage};

pub struct MockBackend {
    name: String,
    seed: u64,
    ttft: Duration,
    tokens_per_sec: f64,
}

impl MockBackend {
    pub fn new(name: &str, seed: u64, ttft: Duration, tokens_per_sec: f64) -> Self {
        Self {
            name: name.to_owned(),
            seed,
            ttft,
            tokens_per_sec,
        }
    }

    pub async fn run(&self, req: ChatRequest, tx: mpsc::Sender<UpstreamEvent>) {
        let messages: Vec<MockMessage> = req
            .messages
            .iter()
            .map(|m| MockMessage {
                role: m.role.as_str().to_owned(),
                content: m.content.text(),
            })
            .collect();
        let plan = generator::plan(self.seed, &messages, req.max_tokens);
        let ttft = plan.ttft.unwrap_or(self.ttft);
        let gap = match plan.tokens_per_sec.unwrap_or(self.tokens_per_sec) {
            tps if tps > 0.0 => Duration::from_secs_f64(1.0 / tps),
            _ => Duration::ZERO,
        };
        let provider = self.name.clone();
        let fail = |e| UpstreamEvent::Failed(e);
        if !wait(ttft, &tx).await {
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
            Some(Fault::Hang) => {
                tx.closed().await;
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
            if i > 0 && !wait(gap, &tx).await {
                return;
            }
            if tx.send(UpstreamEvent::Delta(chunk.clone())).await.is_err() {
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

/// Waits `d` unless the consumer leaves first; answers whether to go on.
async fn wait(d: Duration, tx: &mpsc::Sender<UpstreamEvent>) -> bool {
    if d.is_zero() {
        return !tx.is_closed();
    }
    tokio::select! {
        () = tx.closed() => false,
        () = tokio::time::sleep(d) => true,
    }
}
