//! The OpenAI Chat Completions wire format, for OpenAI and every compatible server (vLLM,
//! Ollama, LM Studio, `parley mock-upstream`). Requests stream upstream, asking for the final
//! usage chunk, so time to first token is measured and deltas are forwarded as they come; a
//! request whose caller wants the reply in one piece ([`ChatRequest::whole`]) asks for one JSON
//! answer instead, which is one parse rather than one per chunk.

use std::time::Duration;

use secrecy::SecretString;
use serde_json::json;
use tokio::sync::mpsc;

use super::sse::{self, Decoded, Decoder};
use super::{ChatRequest, EventTx, Observed, ProviderError, RateHeaders, UpstreamEvent};
use crate::domain::{ToolCallDelta, UpstreamFinish, Usage};
use crate::wire::openai::{finish_of, ChatCompletionRequest, Text, UpstreamChunk};

/// A client of one OpenAI-compatible provider.
pub struct OpenAiClient {
    name: String,
    url: super::http::Endpoint,
    embeddings_url: super::http::Endpoint,
    credential: Option<super::http::Credential>,
    http: reqwest::Client,
    timeout: Duration,
}

impl OpenAiClient {
    pub fn new(
        name: &str,
        base_url: &str,
        key: Option<SecretString>,
        http: reqwest::Client,
        timeout: Duration,
    ) -> Self {
        Self {
            name: name.to_owned(),
            url: super::http::Endpoint::new(format!("{base_url}/chat/completions")),
            embeddings_url: super::http::Endpoint::new(format!("{base_url}/embeddings")),
            credential: key.as_ref().map(super::http::Credential::bearer),
            http,
            timeout,
        }
    }

    /// `POST /embeddings` for `texts`: the vectors in input order and the usage reported.
    pub async fn embed(
        &self,
        model: &str,
        texts: &[String],
    ) -> (
        Result<(Vec<Vec<f32>>, Option<Usage>), ProviderError>,
        RateHeaders,
    ) {
        let body = json!({"model": model, "input": texts});
        let request = self
            .embeddings_url
            .post_json(&self.http, &body, self.credential.as_ref());
        // Nobody listens for early closing here; the channel only satisfies `send`.
        let (tx, _rx) = mpsc::channel(1);
        let tx = EventTx::new(tx);
        let seen = Observed::default();
        let response = match send(&self.name, request, self.timeout, &tx, &seen).await {
            Some(Ok(r)) => r,
            Some(Err(e)) => return (Err(e), *seen.lock()),
            None => {
                let e = ProviderError::Interrupted {
                    provider: self.name.clone(),
                    message: "embedding request abandoned".into(),
                };
                return (Err(e), *seen.lock());
            }
        };
        let headers = *seen.lock();
        let protocol = |message: String| ProviderError::Protocol {
            provider: self.name.clone(),
            message,
        };
        let body = match tokio::time::timeout(self.timeout, response.bytes()).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => return (Err(protocol(e.to_string())), headers),
            Err(_) => {
                let e = ProviderError::Timeout {
                    provider: self.name.clone(),
                };
                return (Err(e), headers);
            }
        };
        (
            parse_embeddings(&body, texts.len()).map_err(protocol),
            headers,
        )
    }

    /// Runs one generation into `tx`: streamed, or as one answer when `req.whole`.
    pub async fn run(&self, req: ChatRequest, tx: &EventTx, seen: &Observed) {
        let mut body = ChatCompletionRequest::encode(&req);
        if req.whole {
            body.stream = false;
            body.stream_options = None;
        }
        let request = self
            .url
            .post_json(&self.http, &body, self.credential.as_ref());
        let response = match send(&self.name, request, self.timeout, tx, seen).await {
            Some(Ok(r)) => r,
            Some(Err(e)) => {
                let _ = tx.send(UpstreamEvent::Failed(e)).await;
                return;
            }
            None => return,
        };
        if req.whole {
            let read = tokio::select! {
                () = tx.closed() => return,
                read = tokio::time::timeout(self.timeout, response.bytes()) => read,
            };
            let last = match read {
                Err(_) => UpstreamEvent::Failed(ProviderError::Timeout {
                    provider: self.name.clone(),
                }),
                Ok(Err(e)) => UpstreamEvent::Failed(ProviderError::Connect {
                    provider: self.name.clone(),
                    message: e.to_string(),
                }),
                Ok(Ok(bytes)) => match whole_answer(&bytes) {
                    Ok(events) => {
                        for e in events {
                            if tx.send(e).await.is_err() {
                                return;
                            }
                        }
                        return;
                    }
                    Err(message) => UpstreamEvent::Failed(ProviderError::Protocol {
                        provider: self.name.clone(),
                        message,
                    }),
                },
            };
            let _ = tx.send(last).await;
            return;
        }
        sse::pump(
            &self.name,
            response.bytes_stream(),
            OpenAiDecoder::default(),
            self.timeout,
            tx,
        )
        .await;
    }
}

/// Sends a request and checks its status; `None` when the consumer went away meanwhile.
pub(super) async fn send(
    provider: &str,
    request: reqwest::RequestBuilder,
    timeout: Duration,
    tx: &EventTx,
    seen: &Observed,
) -> Option<Result<reqwest::Response, ProviderError>> {
    let sent = tokio::select! {
        () = tx.closed() => return None,
        sent = tokio::time::timeout(timeout, request.send()) => sent,
    };
    let response = match sent {
        Err(_) => {
            return Some(Err(ProviderError::Timeout {
                provider: provider.into(),
            }))
        }
        Ok(Err(e)) if e.is_timeout() => {
            return Some(Err(ProviderError::Timeout {
                provider: provider.into(),
            }))
        }
        // Without the URL: it is ours, and the error's source chain says what went wrong.
        Ok(Err(e)) => {
            let message =
                std::error::Error::source(&e).map_or_else(|| e.to_string(), ToString::to_string);
            return Some(Err(ProviderError::Connect {
                provider: provider.into(),
                message,
            }));
        }
        Ok(Ok(r)) => r,
    };
    *seen.lock() = RateHeaders::read(response.headers());
    let status = response.status();
    if status.is_success() {
        return Some(Ok(response));
    }
    let retry_after = seen.lock().retry_after;
    let body = tokio::time::timeout(timeout, response.bytes())
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    Some(Err(ProviderError::Status {
        provider: provider.into(),
        status: status.as_u16(),
        message: sse::error_message(&body),
        retry_after,
    }))
}

#[derive(serde::Deserialize)]
struct EmbeddingsBody {
    data: Vec<EmbeddingItem>,
    #[serde(default)]
    usage: Option<EmbeddingUsage>,
}

#[derive(serde::Deserialize)]
struct EmbeddingItem {
    #[serde(default)]
    index: Option<usize>,
    embedding: Vec<f32>,
}

#[derive(serde::Deserialize)]
struct EmbeddingUsage {
    #[serde(default)]
    prompt_tokens: u32,
}

/// An embeddings answer: one vector per input, put in input order by `index`.
fn parse_embeddings(body: &[u8], n: usize) -> Result<(Vec<Vec<f32>>, Option<Usage>), String> {
    let parsed: EmbeddingsBody =
        serde_json::from_slice(body).map_err(|e| format!("embeddings answer: {e}"))?;
    if parsed.data.len() != n {
        return Err(format!(
            "embeddings answer has {} vectors for {n} inputs",
            parsed.data.len()
        ));
    }
    let mut out: Vec<Option<Vec<f32>>> = vec![None; n];
    for (pos, item) in parsed.data.into_iter().enumerate() {
        let i = item.index.unwrap_or(pos);
        match out.get_mut(i) {
            Some(slot @ None) => *slot = Some(item.embedding),
            _ => return Err(format!("embeddings answer has a bad index {i}")),
        }
    }
    let vectors: Vec<Vec<f32>> = out.into_iter().flatten().collect();
    let dim = vectors.first().map_or(0, Vec::len);
    if dim == 0 || vectors.iter().any(|v| v.len() != dim) {
        return Err("embeddings answer has vectors of different or zero length".into());
    }
    let usage = parsed.usage.map(|u| Usage::new(u.prompt_tokens, 0));
    Ok((vectors, usage))
}

/// A non-streaming answer, read leniently: only what parley passes on.
#[derive(serde::Deserialize)]
struct WholeAnswer {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Vec<WholeChoice>,
    #[serde(default)]
    usage: Option<WholeUsage>,
}

#[derive(serde::Deserialize)]
struct WholeChoice {
    #[serde(default)]
    index: u32,
    #[serde(default)]
    message: WholeMessage,
    #[serde(default)]
    finish_reason: Option<String>,
    #[serde(default)]
    logprobs: Option<serde_json::Value>,
}

#[derive(Default, serde::Deserialize)]
struct WholeMessage {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<WholeCall>>,
}

#[derive(serde::Deserialize)]
struct WholeCall {
    #[serde(default)]
    id: Option<String>,
    function: WholeFunction,
}

#[derive(serde::Deserialize)]
struct WholeFunction {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

#[derive(serde::Deserialize)]
struct WholeUsage {
    #[serde(default)]
    prompt_tokens: u32,
    #[serde(default)]
    completion_tokens: u32,
}

/// The events of a non-streaming answer, in the order a stream would have given them, ending
/// with `Finished`.
fn whole_answer(body: &[u8]) -> Result<Vec<UpstreamEvent>, String> {
    let answer: WholeAnswer = serde_json::from_slice(body)
        .map_err(|e| format!("answer is not a chat completion: {e}"))?;
    let mut out = Vec::new();
    // parley asks for one choice; others (a server that ignores `n`) are not read.
    let choice = answer.choices.into_iter().find(|c| c.index == 0);
    let finish = match &choice {
        Some(WholeChoice {
            finish_reason: Some(reason),
            ..
        }) => finish_of(reason),
        _ => return Err("answer has no finished choice".into()),
    };
    if let Some(choice) = choice {
        if let Some(items) = choice
            .logprobs
            .and_then(|l| l.get("content").and_then(|c| c.as_array()).cloned())
        {
            out.push(UpstreamEvent::Logprobs(items));
        }
        if let Some(text) = choice.message.content.filter(|t| !t.is_empty()) {
            out.push(UpstreamEvent::Delta(text));
        }
        for (index, call) in choice.message.tool_calls.into_iter().flatten().enumerate() {
            out.push(UpstreamEvent::ToolCall(ToolCallDelta {
                index: u32::try_from(index).unwrap_or(u32::MAX),
                id: call.id,
                name: call.function.name,
                arguments: call.function.arguments.unwrap_or_default(),
            }));
        }
    }
    out.push(UpstreamEvent::Finished {
        finish,
        usage: answer
            .usage
            .map(|u| Usage::new(u.prompt_tokens, u.completion_tokens)),
        model: answer.model.filter(|m| !m.is_empty()),
    });
    Ok(out)
}

/// Reads `chat.completion.chunk` events.
#[derive(Debug, Default)]
pub struct OpenAiDecoder {
    finish: Option<UpstreamFinish>,
    usage: Option<Usage>,
    model: Option<String>,
}

impl Decoder for OpenAiDecoder {
    fn decode(
        &mut self,
        _event: &str,
        data: &str,
        out: &mut Vec<UpstreamEvent>,
    ) -> Result<Decoded, String> {
        let data = data.trim();
        if data == "[DONE]" {
            return Ok(Decoded::End);
        }
        if data.is_empty() {
            return Ok(Decoded::More);
        }
        let chunk: UpstreamChunk<'_> =
            serde_json::from_str(data).map_err(|e| format!("chunk is not a chunk: {e}"))?;
        if let Some(err) = chunk.error {
            return Ok(Decoded::Error(
                err.message.unwrap_or_else(|| "upstream error".into()),
            ));
        }
        if let Some(Text(model)) = chunk.model {
            if !model.is_empty() && self.model.is_none() {
                self.model = Some(model.into_owned());
            }
        }
        if let Some(u) = chunk.usage {
            self.usage = Some(Usage::new(u.prompt_tokens, u.completion_tokens));
        }
        // parley asks for one choice; others (a server that ignores `n`) are not read.
        let Some(choice) = chunk.choices.into_iter().find(|c| c.index == 0) else {
            return Ok(Decoded::More);
        };
        if let Some(Text(reason)) = &choice.finish_reason {
            self.finish = Some(finish_of(reason));
        }
        if let Some(serde_json::Value::Object(mut l)) = choice.logprobs {
            if let Some(serde_json::Value::Array(items)) = l.remove("content") {
                out.push(UpstreamEvent::Logprobs(items));
            }
        }
        if let Some(text) = choice.delta.content {
            out.push(UpstreamEvent::Delta(text));
        }
        for call in choice.delta.tool_calls.into_iter().flatten() {
            out.push(UpstreamEvent::ToolCall(ToolCallDelta {
                index: call.index,
                id: call.id,
                name: call.function.name,
                arguments: call.function.arguments.unwrap_or_default(),
            }));
        }
        Ok(Decoded::More)
    }

    fn outcome(&self) -> (Option<UpstreamFinish>, Option<Usage>, Option<String>) {
        (self.finish, self.usage, self.model.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::stream;

    #[test]
    fn embeddings_answers_are_put_in_order_and_checked() {
        let body = br#"{"data":[{"index":1,"embedding":[0,1]},{"index":0,"embedding":[1,0]}],
                        "usage":{"prompt_tokens":7,"total_tokens":7}}"#;
        let (v, usage) = parse_embeddings(body, 2).expect("parses"); // ok: test
        assert_eq!(v, vec![vec![1.0, 0.0], vec![0.0, 1.0]]);
        assert_eq!(usage.map(|u| u.prompt_tokens), Some(7));
        // Wrong count, duplicate or out-of-range index, ragged or empty vectors, not JSON.
        assert!(parse_embeddings(body, 3).is_err());
        let dup = br#"{"data":[{"index":0,"embedding":[1]},{"index":0,"embedding":[1]}]}"#;
        assert!(parse_embeddings(dup, 2).is_err());
        let far = br#"{"data":[{"index":5,"embedding":[1]}]}"#;
        assert!(parse_embeddings(far, 1).is_err());
        let ragged = br#"{"data":[{"embedding":[1,0]},{"embedding":[1]}]}"#;
        assert!(parse_embeddings(ragged, 2).is_err());
        let empty = br#"{"data":[{"embedding":[]}]}"#;
        assert!(parse_embeddings(empty, 1).is_err());
        assert!(parse_embeddings(b"<html>", 1).is_err());
    }

    async fn run_chunks(chunks: Vec<&'static str>) -> Vec<UpstreamEvent> {
        let (tx, mut rx) = mpsc::channel(64);
        let tx = EventTx::new(tx);
        let body = stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, std::io::Error>(bytes::Bytes::from(c))),
        );
        sse::pump(
            "p",
            body,
            OpenAiDecoder::default(),
            Duration::from_secs(5),
            &tx,
        )
        .await;
        drop(tx);
        let mut out = Vec::new();
        while let Some(e) = rx.recv().await {
            out.push(e);
        }
        out
    }

    fn texts(events: &[UpstreamEvent]) -> String {
        events
            .iter()
            .filter_map(|e| {
                if let UpstreamEvent::Delta(t) = e {
                    Some(t.as_str())
                } else {
                    None
                }
            })
            .collect()
    }

    #[tokio::test]
    async fn events_split_across_chunks_and_several_per_chunk() {
        let events = run_chunks(vec![
            ": keep-alive\n\n",
            "data: {\"model\":\"m1\",\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"Hel\"}}]}\n\ndata: {\"choices\":[{\"de",
            "lta\":{\"content\":\"lo\"}}]}\r\n\r\n",
            "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\ndata: [DONE]\n\n",
        ])
        .await;
        assert_eq!(texts(&events), "Hello");
        match events.last() {
            Some(UpstreamEvent::Finished {
                finish,
                usage,
                model,
            }) => {
                assert_eq!(finish.reason, crate::domain::FinishReason::Stop);
                assert!(finish.complete);
                assert_eq!(*usage, Some(Usage::new(5, 2)));
                assert_eq!(model.as_deref(), Some("m1"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn tool_call_fragments_pass_in_order() {
        let events = run_chunks(vec![
            "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"index\":0,\"id\":\"c0\",\"type\":\"function\",\"function\":{\"name\":\"get\",\"arguments\":\"\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"a\\\":\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"1}\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\ndata: [DONE]\n\n",
        ])
        .await;
        let mut calls = crate::domain::CallsBuilder::default();
        for e in &events {
            if let UpstreamEvent::ToolCall(d) = e {
                calls.push(d);
            }
        }
        let calls = calls.finish();
        assert_eq!(calls.len(), 1);
        assert_eq!(
            (calls[0].id.as_str(), calls[0].name.as_str()),
            ("c0", "get")
        );
        assert_eq!(calls[0].arguments, "{\"a\":1}");
        assert!(matches!(
            events.last(),
            Some(UpstreamEvent::Finished { finish, .. }) if finish.reason == crate::domain::FinishReason::ToolCalls
        ));
    }

    #[tokio::test]
    async fn broken_stream_after_text_is_interrupted() {
        let events = run_chunks(vec![
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n",
        ])
        .await;
        assert_eq!(texts(&events), "Hi");
        assert!(matches!(
            events.last(),
            Some(UpstreamEvent::Failed(ProviderError::Interrupted { .. }))
        ));
    }

    #[tokio::test]
    async fn error_event_and_garbage() {
        let events = run_chunks(vec!["data: {\"error\":{\"message\":\"overloaded\"}}\n\n"]).await;
        assert!(matches!(
            events.last(),
            Some(UpstreamEvent::Failed(ProviderError::Status {
                status: 502,
                ..
            }))
        ));
        let events = run_chunks(vec!["data: not json\n\n"]).await;
        assert!(matches!(
            events.last(),
            Some(UpstreamEvent::Failed(ProviderError::Protocol { .. }))
        ));
    }
}
