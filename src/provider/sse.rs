//! Upstream SSE → [`UpstreamEvent`]s, shared by the OpenAI and Anthropic formats.
//!
//! [`frame::Framer`] does the framing (events split across network chunks, several events per
//! chunk, CRLF, comments and keep-alives) from one reused buffer; a [`Decoder`] turns each event
//! of one wire format into deltas and the final result. [`pump`] drives one response into the
//! consumer's channel, decoding what arrived together (a burst) before passing it on; it stops
//! once the consumer goes away (by the end of the burst it is reading; the upstream connection
//! is dropped, and so closed), and times out a stream that goes silent.

use std::time::Duration;

use futures_util::{FutureExt, Stream, StreamExt};

use super::{EventTx, ProviderError, UpstreamEvent};
use crate::domain::{UpstreamFinish, Usage};

/// What one SSE event meant, besides the events it produced.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    /// Go on reading.
    More,
    /// The stream says it is complete (`[DONE]`, `message_stop`).
    End,
    /// The upstream reported an error inside the stream.
    Error(String),
}

/// One wire format's reading of SSE events.
pub trait Decoder {
    /// Reads one event (`event` is `"message"` when the stream gave no name), pushing the
    /// deltas it carries onto `out`.
    fn decode(
        &mut self,
        event: &str,
        data: &str,
        out: &mut Vec<UpstreamEvent>,
    ) -> Result<Decoded, String>;
    /// The finish, usage and model seen so far.
    fn outcome(&self) -> (Option<UpstreamFinish>, Option<Usage>, Option<String>);
}

/// The most body chunks decoded together before their events are passed on.
const BURST_READS: usize = 64;

/// How long after its first read a burst may go on yielding for more. Each yield lets every
/// other task ready on the thread run, so under load one costs a good part of a millisecond:
/// at 1 ms, a reply that had arrived whole was still cut after two or three of its chunks, and
/// left in two or three writes. A burst that finds nothing new after a yield ends at once, so
/// the window holds back only a stream that is still coming in while the thread is busy.
const BURST_WINDOW: Duration = Duration::from_millis(5);

/// Feeds `body` through `decoder` into `tx` until the stream ends, fails, or `tx` is closed.
pub async fn pump<S, E, D>(provider: &str, body: S, mut decoder: D, idle: Duration, tx: &EventTx)
where
    S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Display,
    D: Decoder,
{
    let mut body = body;
    let mut framer = frame::Framer::new();
    let mut sent_text = false;
    let mut out = Vec::with_capacity(8);
    let mut joined = Vec::with_capacity(8);
    // The idle timeout runs from the last event: keep-alive comments do not reset it.
    let mut deadline = tokio::time::Instant::now() + idle;
    let failure = loop {
        let next = tokio::select! {
            () = tx.closed() => return,
            next = tokio::time::timeout_at(deadline, body.next()) => next,
        };
        let mut next = match next {
            Err(_) => break interrupted_or(provider, sent_text, "no data before the idle timeout"),
            Ok(next) => next,
        };
        // Every read that has already arrived is decoded before any event is passed on, and
        // the events of all of them are passed on together: under load the hand-off to the
        // consumer (and the write to its client) is paid once per burst rather than once per
        // read, and a stream that trickles in is passed on as it comes. Text of one read
        // leaves as one delta; text of separate reads stays in separate deltas, as sent.
        let mut reads = 0;
        let burst_began = tokio::time::Instant::now();
        // How the stream ended, if it did (`Some(None)`: complete).
        let ended = loop {
            let read_from = joined.len();
            let bytes = match next {
                None => {
                    break Some(match decoder.outcome() {
                        (Some(_), ..) => None,
                        _ => {
                            let replied = replied(sent_text, &out, &joined);
                            interrupted_or(provider, replied, "stream ended before completion")
                        }
                    })
                }
                Some(Err(e)) => {
                    let replied = replied(sent_text, &out, &joined);
                    break Some(interrupted_or(provider, replied, &e.to_string()));
                }
                Some(Ok(bytes)) => bytes,
            };
            framer.push(&bytes);
            let (events, end) = decode_held(provider, &mut framer, &mut decoder, &mut out, |out| {
                replied(sent_text, out, &joined)
            });
            if events {
                deadline = tokio::time::Instant::now() + idle;
            }
            coalesce(&mut out, &mut joined, read_from);
            if end.is_some() {
                break end;
            }
            reads += 1;
            if reads >= BURST_READS {
                break None;
            }
            match body.next().now_or_never() {
                Some(more) => next = more,
                None if burst_began.elapsed() < BURST_WINDOW => {
                    // hyper hands a response over one chunk at a time, the next decoded only
                    // once its connection's task has run again: let it run, then take what it
                    // has by then. Nothing more there ends the burst; so does the window, so
                    // a busy thread never holds a steady stream back for long.
                    tokio::task::yield_now().await;
                    if tx.is_closed() {
                        return;
                    }
                    match body.next().now_or_never() {
                        Some(more) => next = more,
                        None => break None,
                    }
                }
                None => break None,
            }
        };
        for e in joined.drain(..) {
            sent_text |= carries_reply(&e);
            if tx.send(e).await.is_err() {
                return;
            }
        }
        if let Some(failure) = ended {
            break failure;
        }
    };
    let last = match failure {
        Some(err) => UpstreamEvent::Failed(err),
        None => {
            let (finish, usage, model) = decoder.outcome();
            UpstreamEvent::Finished {
                finish: finish.unwrap_or(UpstreamFinish::UNKNOWN),
                usage,
                model,
            }
        }
    };
    // The consumer may be gone already; nothing is left to tell it then.
    let _ = tx.send(last).await;
}

/// Decodes into `out` every whole event `framer` holds. Answers whether there was any, and
/// how the stream ended if one of them ended it (`Some(None)`: complete); `replied` says
/// whether part of the reply came before `out`'s events.
fn decode_held<D: Decoder>(
    provider: &str,
    framer: &mut frame::Framer,
    decoder: &mut D,
    out: &mut Vec<UpstreamEvent>,
    replied: impl Fn(&[UpstreamEvent]) -> bool,
) -> (bool, Option<Option<ProviderError>>) {
    let mut events = false;
    loop {
        let decoded = match framer.next_event() {
            Ok(None) => return (events, None),
            Ok(Some((name, data))) => {
                events = true;
                decoder.decode(name, data, out)
            }
            Err(e) => {
                let why = match e {
                    frame::FrameError::NotUtf8 => "stream is not UTF-8",
                    frame::FrameError::TooLong => "an event past 16 MiB",
                };
                return (events, Some(interrupted_or(provider, replied(out), why)));
            }
        };
        let end = match decoded {
            Ok(Decoded::More) => continue,
            Ok(Decoded::End) => None,
            Ok(Decoded::Error(message)) => Some(upstream_error(provider, replied(out), message)),
            Err(message) => Some(ProviderError::Protocol {
                provider: provider.into(),
                message,
            }),
        };
        return (events, Some(end));
    }
}

/// Whether part of the reply has been sent, or is about to be.
fn replied(sent_text: bool, out: &[UpstreamEvent], joined: &[UpstreamEvent]) -> bool {
    sent_text || out.iter().chain(joined).any(carries_reply)
}

/// Whether an event is part of the reply itself (after which a failure interrupts a reply).
fn carries_reply(e: &UpstreamEvent) -> bool {
    match e {
        UpstreamEvent::Delta(t) => !t.is_empty(),
        UpstreamEvent::ToolCall(_) => true,
        _ => false,
    }
}

/// Moves `events` into `joined`, empty text deltas dropped and adjacent text deltas joined,
/// though never with one of `joined`'s first `from` events (those of earlier reads). Both
/// buffers are kept by the caller and reused from read to read.
fn coalesce(events: &mut Vec<UpstreamEvent>, joined: &mut Vec<UpstreamEvent>, from: usize) {
    for e in events.drain(..) {
        let len = joined.len();
        match (e, joined.last_mut()) {
            (UpstreamEvent::Delta(t), _) if t.is_empty() => {}
            (UpstreamEvent::Delta(t), Some(UpstreamEvent::Delta(prev))) if len > from => {
                prev.push_str(&t);
            }
            (e, _) => joined.push(e),
        }
    }
}

/// An error the upstream reported inside its stream: after part of the reply it interrupted
/// the reply; before, it is the upstream's failure.
fn upstream_error(provider: &str, after_reply: bool, message: String) -> ProviderError {
    if after_reply {
        ProviderError::Interrupted {
            provider: provider.into(),
            message,
        }
    } else {
        ProviderError::Status {
            provider: provider.into(),
            status: 502,
            message,
            retry_after: None,
        }
    }
}

fn interrupted_or(provider: &str, sent_text: bool, message: &str) -> Option<ProviderError> {
    let provider = provider.to_owned();
    let message = message.to_owned();
    Some(if sent_text {
        ProviderError::Interrupted { provider, message }
    } else {
        ProviderError::Connect { provider, message }
    })
}

/// Reads an upstream error body into a short message (the OpenAI and Anthropic shapes both keep
/// it at `error.message`), never echoing more than a bounded prefix.
pub fn error_message(body: &[u8]) -> String {
    const MAX: usize = 512;
    let parsed: Option<String> = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .and_then(|m| m.as_str())
                .map(str::to_owned)
        });
    let raw = parsed.unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    // Upstreams quote parts of a rejected key ("Incorrect API key provided: sk-ab***yz").
    let mut msg = raw
        .split(' ')
        .map(|w| {
            if looks_like_secret(w) {
                "[redacted]"
            } else {
                w
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    if msg.len() > MAX {
        let mut cut = MAX;
        while !msg.is_char_boundary(cut) {
            cut -= 1;
        }
        msg.truncate(cut);
    }
    msg
}

fn looks_like_secret(word: &str) -> bool {
    let w = word.trim_matches(|c: char| !c.is_alphanumeric());
    ["sk-", "sk_", "pk-", "key-", "Bearer"]
        .iter()
        .any(|p| w.starts_with(p))
        || word.contains("***")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_message_reads_openai_shape_and_hides_keys() {
        let body = br#"{"error":{"message":"Incorrect API key provided: sk-abc***xyz. See docs.","type":"x"}}"#;
        assert_eq!(
            error_message(body),
            "Incorrect API key provided: [redacted] See docs."
        );
        assert_eq!(error_message(b"plain text"), "plain text");
        assert_eq!(error_message(&[b'a'; 2000]).len(), 512);
    }
}

mod frame;

#[cfg(test)]
mod props;
