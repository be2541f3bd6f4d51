//! Property tests of the SSE path: an upstream's bytes may arrive split anywhere (inside a
//! line, a CRLF, a multi-byte character), and the same events must come out whatever the
//! split; no byte stream, however malformed, panics the pump.

use std::time::Duration;

use futures_util::stream;
use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::provider::openai::OpenAiDecoder;
use tokio::sync::mpsc;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Records every SSE event as `event|data` (a tool-call delta, which the pump never joins with
/// its neighbours as it joins text), so the framing itself is compared.
#[derive(Default)]
struct Recorder;

impl Decoder for Recorder {
    fn decode(
        &mut self,
        event: &str,
        data: &str,
        out: &mut Vec<UpstreamEvent>,
    ) -> Result<Decoded, String> {
        out.push(UpstreamEvent::ToolCall(crate::domain::ToolCallDelta {
            index: 0,
            id: None,
            name: None,
            arguments: format!("{event}|{data}"),
        }));
        Ok(Decoded::More)
    }

    fn outcome(&self) -> (Option<UpstreamFinish>, Option<Usage>, Option<String>) {
        (Some(UpstreamFinish::UNKNOWN), None, None)
    }
}

/// What came out of the pump: text, a recorded SSE event, or any other event as its debug text
/// (`UpstreamEvent` has no `PartialEq`).
#[derive(Debug, PartialEq)]
enum Pumped {
    Text(String),
    Event(String),
    Other(String),
}

impl Pumped {
    fn of(e: UpstreamEvent) -> Self {
        match e {
            UpstreamEvent::Delta(t) => Self::Text(t),
            UpstreamEvent::ToolCall(d) => Self::Event(d.arguments),
            e => Self::Other(format!("{e:?}")),
        }
    }

    fn ends(&self) -> bool {
        matches!(self, Self::Other(e) if e.starts_with("Finished") || e.starts_with("Failed"))
    }
}

/// Runs `pump` over `body` cut at `cuts` (byte offsets, any order); answers the events.
fn pump_split<D: Decoder>(body: &[u8], cuts: &[usize], decoder: D) -> Vec<Pumped> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
    at.push(0);
    at.push(body.len());
    at.sort_unstable();
    at.dedup();
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = at
        .windows(2)
        .map(|w| Ok(bytes::Bytes::copy_from_slice(&body[w[0]..w[1]])))
        .collect();
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    else {
        return vec![Pumped::Other("no runtime".into())];
    };
    rt.block_on(async {
        let (tx, mut rx) = mpsc::channel(16);
        let tx = EventTx::new(tx);
        let pumped = async move {
            pump(
                "p",
                stream::iter(chunks),
                decoder,
                Duration::from_secs(30),
                &tx,
            )
            .await;
        };
        let collect = async {
            let mut out = Vec::new();
            while let Some(e) = rx.recv().await {
                out.push(Pumped::of(e));
            }
            out
        };
        tokio::join!(pumped, collect).1
    })
}

/// Pieces SSE streams are made of, including the awkward ones (bare CR, a BOM, non-ASCII).
fn sse_bytes() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just("data: ".to_owned()),
        Just("data:".to_owned()),
        Just("event: delta".to_owned()),
        Just("id: 7".to_owned()),
        Just("retry: 10".to_owned()),
        Just(": keep-alive".to_owned()),
        Just("\n".to_owned()),
        Just("\r\n".to_owned()),
        Just("\r".to_owned()),
        Just("\n\n".to_owned()),
        Just("\u{feff}".to_owned()),
        Just("héllo 🦀 ".to_owned()),
        Just("[DONE]".to_owned()),
        "[a-z :{}\"]{0,12}",
        any::<String>(),
    ];
    prop::collection::vec(piece, 0..40).prop_map(|p| p.concat().into_bytes())
}

/// An OpenAI chunk stream carrying `texts` as deltas, ended by `finish_reason` and `[DONE]`.
fn openai_body(texts: &[String], crlf: bool) -> Vec<u8> {
    let eol = if crlf { "\r\n" } else { "\n" };
    let mut body = String::new();
    for t in texts {
        let chunk = json!({"model": "m", "choices": [{"index": 0, "delta": {"content": t}}]});
        body.push_str(&format!("data: {chunk}{eol}{eol}"));
    }
    let last = json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
    body.push_str(&format!("data: {last}{eol}{eol}data: [DONE]{eol}{eol}"));
    body.into_bytes()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn sse_events_do_not_depend_on_the_split(
        body in sse_bytes(),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let whole = pump_split(&body, &[], Recorder);
        prop_assert_eq!(pump_split(&body, &cuts, Recorder), whole);
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_split_alike(
        body in prop::collection::vec(any::<u8>(), 0..300),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let whole = pump_split(&body, &[], Recorder);
        prop_assert!(whole.last().is_some_and(Pumped::ends));
        prop_assert_eq!(pump_split(&body, &cuts, Recorder), whole);
    }

    #[test]
    fn openai_deltas_come_out_whole_whatever_the_split(
        texts in prop::collection::vec(any::<String>(), 0..8),
        crlf in any::<bool>(),
        cuts in prop::collection::vec(any::<usize>(), 0..16),
    ) {
        let body = openai_body(&texts, crlf);
        let mut events = pump_split(&body, &cuts, OpenAiDecoder::default());
        let last = events.pop();
        prop_assert!(matches!(&last, Some(Pumped::Other(e)) if e.starts_with("Finished")), "{:?}", last);
        // Text that arrived together may leave as one delta: none is empty, none is lost.
        let mut joined = String::new();
        for e in &events {
            match e {
                Pumped::Text(t) if !t.is_empty() => joined.push_str(t),
                e => prop_assert!(false, "not a text delta: {:?}", e),
            }
        }
        prop_assert_eq!(joined, texts.concat());
    }
}

/// The events of `body` as the framer reads them and as eventsource-stream does (it must not
/// see a leading byte order mark: it panics on one).
/// Events as `(name, data)`.
type Events = Vec<(String, String)>;

fn framed_both(body: &[u8]) -> (Events, Events) {
    use eventsource_stream::Eventsource;
    let mut framer = frame::Framer::default();
    framer.push(body);
    let mut ours = Vec::new();
    while let Ok(Some((name, data))) = framer.next_event() {
        ours.push((name.to_owned(), data.to_owned()));
    }
    let mut rest = body;
    while let Some(r) = rest.strip_prefix(b"\xEF\xBB\xBF".as_slice()) {
        rest = r;
    }
    let chunk: Result<bytes::Bytes, std::io::Error> = Ok(bytes::Bytes::copy_from_slice(rest));
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().build() else {
        return (ours, Vec::new());
    };
    let theirs = rt.block_on(
        stream::iter([chunk])
            .eventsource()
            .take_while(|e| std::future::ready(e.is_ok()))
            .filter_map(|e| std::future::ready(e.ok()))
            .map(|e| {
                let name = if e.event.is_empty() {
                    "message".to_owned()
                } else {
                    e.event
                };
                (name, e.data)
            })
            .collect::<Vec<_>>(),
    );
    (ours, theirs)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_framer_reads_events_as_eventsource_stream_does(body in sse_bytes()) {
        // A line feed after it all: eventsource-stream cannot end a line at a CR that closes
        // the stream (it might start a CRLF), where the spec, and the framer, end it there.
        let mut body = body;
        body.push(b'\n');
        let (ours, theirs) = framed_both(&body);
        prop_assert_eq!(ours, theirs);
    }
}

/// A byte order mark may open an event stream (the SSE spec strips it); it used to panic the
/// pump, which sliced the BOM's first byte off a three-byte character.
#[test]
fn a_leading_byte_order_mark_is_stripped() {
    let body = "\u{feff}data: hi\n\n".as_bytes();
    for cuts in [vec![], vec![1], vec![2], vec![3], vec![1, 2, 3]] {
        let events = pump_split(body, &cuts, Recorder);
        assert_eq!(
            events.first(),
            Some(&Pumped::Event("message|hi".into())),
            "{cuts:?}"
        );
    }
}

/// A runtime with timers, for the tests that drive the pump in time. A `paused` clock stands
/// still unless every task waits (then it jumps to the next timer): the burst tests must not
/// depend on how fast the machine runs them.
fn runtime(paused: bool) -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(paused)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("no runtime: {e}"),
    }
}

type BodyChunk = Result<bytes::Bytes, std::io::Error>;

/// One OpenAI chunk carrying `text`, as one read of the body.
fn delta_read(text: &str) -> BodyChunk {
    let c = json!({"model": "m", "choices": [{"index": 0, "delta": {"content": text}}]});
    Ok(bytes::Bytes::from(format!("data: {c}\n\n")))
}

/// The pump on a task of its own, reading the body `body_rx` feeds: its task and what it
/// passes on.
fn spawn_pump(
    body_rx: mpsc::Receiver<BodyChunk>,
) -> (tokio::task::JoinHandle<()>, mpsc::Receiver<UpstreamEvent>) {
    let (tx, rx) = mpsc::channel(16);
    let tx = EventTx::new(tx);
    let pumped = tokio::spawn(async move {
        let body = Box::pin(stream::unfold(body_rx, |mut rx| async move {
            rx.recv().await.map(|chunk| (chunk, rx))
        }));
        pump(
            "p",
            body,
            OpenAiDecoder::default(),
            Duration::from_secs(30),
            &tx,
        )
        .await;
    });
    (pumped, rx)
}

/// Text is passed on as soon as it arrives: what came in separate reads leaves as separate
/// deltas (only what had already arrived together is joined).
#[test]
fn text_that_trickles_in_is_passed_on_as_it_comes() {
    let rt = runtime(false);
    rt.block_on(async {
        let (body_tx, body_rx) = mpsc::channel(4);
        let (pumped, mut rx) = spawn_pump(body_rx);
        for word in ["one ", "two ", "three"] {
            body_tx.send(delta_read(word)).await.unwrap(); // ok: test code
            let got = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
            assert!(
                matches!(got, Ok(Some(UpstreamEvent::Delta(ref t))) if t == word),
                "{got:?}"
            );
        }
        // Two events in one read leave as one delta.
        let mut both = delta_read("four ").unwrap().to_vec(); // ok: test code
        both.extend_from_slice(&delta_read("five").unwrap()); // ok: test code
        body_tx.send(Ok(both.into())).await.unwrap(); // ok: test code
        let got = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
        assert!(
            matches!(got, Ok(Some(UpstreamEvent::Delta(ref t))) if t == "four five"),
            "{got:?}"
        );
        drop(body_tx);
        pumped.await.unwrap(); // ok: test code
    });
}

/// Chunks an upstream sent together leave together, though the body hands them over one at a
/// time (as hyper does: the next chunk is decoded only once its connection task runs again):
/// when the consumer sees the first delta, the others are already waiting, each its own delta.
#[test]
fn chunks_that_arrived_together_leave_together_each_its_own_delta() {
    let rt = runtime(true);
    rt.block_on(async {
        // Capacity 1 and a task of its own, like hyper's body channel.
        let (body_tx, body_rx) = mpsc::channel(1);
        let words = ["one ", "two ", "three"];
        let feeder = tokio::spawn(async move {
            for word in words {
                if body_tx.send(delta_read(word)).await.is_err() {
                    return None;
                }
            }
            // Held open: the stream has not ended, only paused.
            Some(body_tx)
        });
        let (pumped, mut rx) = spawn_pump(body_rx);
        // The consumer is a task too, woken in turn with the feeder and the pump.
        let consumer = tokio::spawn(async move {
            let first = rx.recv().await;
            let rest: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
            (first, rest)
        });
        let (first, rest) = tokio::time::timeout(Duration::from_secs(10), consumer)
            .await
            .unwrap() // ok: test code
            .unwrap(); // ok: test code
        assert!(
            matches!(first, Some(UpstreamEvent::Delta(ref t)) if t == "one "),
            "{first:?}"
        );
        let rest: Vec<_> = rest
            .iter()
            .map(|e| match e {
                UpstreamEvent::Delta(t) => t.as_str(),
                _ => "(not a delta)",
            })
            .collect();
        assert_eq!(rest, words[1..], "not ready with the first delta");
        let body_tx = feeder.await.unwrap(); // ok: test code
        drop(body_tx);
        pumped.await.unwrap(); // ok: test code
    });
}

/// A body that fails in the middle of a burst: the deltas decoded before the failure still go
/// out, in order and each its own, and then the reply is reported interrupted.
#[test]
fn a_failure_inside_a_burst_comes_after_the_deltas_before_it() {
    let rt = runtime(true);
    rt.block_on(async {
        let (body_tx, body_rx) = mpsc::channel(1);
        tokio::spawn(async move {
            let _ = body_tx.send(delta_read("one ")).await;
            let _ = body_tx.send(delta_read("two")).await;
            let _ = body_tx.send(Err(std::io::Error::other("reset"))).await;
        });
        let (pumped, mut rx) = spawn_pump(body_rx);
        tokio::time::timeout(Duration::from_secs(10), pumped)
            .await
            .unwrap() // ok: test code
            .unwrap(); // ok: test code
        let mut got = Vec::new();
        while let Some(e) = rx.recv().await {
            got.push(e);
        }
        assert!(
            matches!(
                got.as_slice(),
                [
                    UpstreamEvent::Delta(a),
                    UpstreamEvent::Delta(b),
                    UpstreamEvent::Failed(ProviderError::Interrupted { .. }),
                ] if a == "one " && b == "two"
            ),
            "{got:?}"
        );
    });
}

/// The idle timeout runs from the last event: an upstream that sends keep-alive comments and
/// nothing else is cut off all the same.
#[test]
fn keep_alives_do_not_hold_off_the_idle_timeout() {
    let rt = runtime(false);
    rt.block_on(async {
        // Endless: a comment every 10 ms.
        let body = Box::pin(stream::unfold((), |()| async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let ping: Result<bytes::Bytes, std::io::Error> =
                Ok(bytes::Bytes::from_static(b": ping\n\n"));
            Some((ping, ()))
        }));
        let (tx, mut rx) = mpsc::channel(16);
        let tx = EventTx::new(tx);
        let begun = std::time::Instant::now();
        let idle = Duration::from_millis(150);
        let pumped = tokio::time::timeout(
            Duration::from_secs(10),
            pump("p", body, OpenAiDecoder::default(), idle, &tx),
        )
        .await;
        assert!(pumped.is_ok(), "the pump never gave up");
        assert!(begun.elapsed() >= idle);
        let last = rx.recv().await;
        assert!(matches!(last, Some(UpstreamEvent::Failed(_))), "{last:?}");
    });
}
