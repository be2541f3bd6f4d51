//! WebSocket protocol (PROTOCOL §5): turns, replay, idempotency, fan-out, cancel, queueing.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

#[tokio::test]
async fn full_turn_streams_and_stores_the_reply() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(config_with(Some(&up)));
    let mut ws = Ws::connect(&server, None).await;
    let conv = ws.create("up").await;
    let frames = ws.turn(&conv, "m1", "hello there").await;

    assert_eq!(frames[0]["type"], "ack");
    assert_eq!(frames[0]["seq"], 1);
    assert_eq!(frames[0]["client_id"], "m1");
    assert_eq!(frames[0]["conversation"], conv.as_str());
    let done = frames.last().unwrap();
    assert_eq!(done["type"], "done", "{frames:?}");
    assert_eq!(done["seq"], 2);
    assert_eq!(done["reply_to"], 1);
    assert_eq!(done["finish_reason"], "stop");
    assert_eq!(done["provider"], "up");
    assert_eq!(done["model"], "mock-1");
    assert_eq!(done["cached"], false);
    assert!(done["ttft_ms"].is_u64());
    assert!(done["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    assert_eq!(
        done["usage"]["total_tokens"].as_u64(),
        Some(
            done["usage"]["prompt_tokens"].as_u64().unwrap()
                + done["usage"]["completion_tokens"].as_u64().unwrap()
        )
    );

    let text = delta_text(&frames);
    assert_eq!(text, mock_reply(0, &[("user", "hello there")]));
    let stored = messages(&server, None, &conv).await;
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[0]["role"], "user");
    assert_eq!(stored[0]["content"], "hello there");
    assert_eq!(stored[1]["role"], "assistant");
    assert_eq!(stored[1]["content"], text.as_str());
    assert_eq!(up.requests(), 1);
}

/// How long a socket must stay silent to count as "answered nothing".
const QUIET: Duration = Duration::from_millis(300);

/// Frames of one type among `frames`.
fn of_type<'a>(frames: &'a [Value], ty: &str) -> Vec<&'a Value> {
    frames.iter().filter(|f| f["type"] == ty).collect()
}

/// Asserts that `f` is an `error` frame with `code`.
#[track_caller]
fn assert_error(f: &Value, code: &str) {
    assert_eq!(f["type"], "error", "{f}");
    assert_eq!(f["code"], code, "{f}");
    assert!(f["message"].as_str().is_some_and(|m| !m.is_empty()), "{f}");
}

#[tokio::test]
async fn subscribe_after_reconnect_replays_stored_messages() {
    let server = TestServer::start(config_with(None));
    let mut ws = Ws::connect(&server, None).await;
    let conv = ws.create("mock").await;
    let frames = ws.turn(&conv, "m1", "hello replay").await;
    assert_eq!(frames.last().unwrap()["type"], "done", "{frames:?}");
    let reply = delta_text(&frames);
    assert_eq!(reply, mock_reply(0, &[("user", "hello replay")]));
    drop(ws);

    let mut ws = Ws::connect(&server, None).await;
    ws.send(json!({"type": "subscribe", "conversation": conv, "after_seq": 0}))
        .await;
    assert_eq!(
        ws.recv().await,
        json!({"type": "subscribed", "conversation": conv, "last_seq": 2})
    );
    let m1 = ws.recv().await;
    assert_eq!(m1["type"], "message", "{m1}");
    assert_eq!(m1["conversation"], conv.as_str());
    assert_eq!(m1["seq"], 1);
    assert_eq!(m1["role"], "user");
    assert_eq!(m1["content"], "hello replay");
    assert_eq!(m1["client_id"], "m1");
    assert!(m1["created_at"].is_i64(), "{m1}");
    let m2 = ws.recv().await;
    assert_eq!(m2["type"], "message", "{m2}");
    assert_eq!(m2["conversation"], conv.as_str());
    assert_eq!(m2["seq"], 2);
    assert_eq!(m2["role"], "assistant");
    assert_eq!(m2["content"], reply.as_str());
    assert_eq!(m2["finish_reason"], "stop");
    ws.assert_silent(QUIET).await;

    // Only what comes after the given seq.
    ws.send(json!({"type": "subscribe", "conversation": conv, "after_seq": 1}))
        .await;
    assert_eq!(
        ws.recv().await,
        json!({"type": "subscribed", "conversation": conv, "last_seq": 2})
    );
    assert_eq!(ws.recv().await, m2);
    ws.assert_silent(QUIET).await;

    // Nothing after the last seq, and no replay at all without `after_seq`.
    ws.send(json!({"type": "subscribe", "conversation": conv, "after_seq": 2}))
        .await;
    assert_eq!(
        ws.recv().await,
        json!({"type": "subscribed", "conversation": conv, "last_seq": 2})
    );
    ws.send(json!({"type": "subscribe", "conversation": conv}))
        .await;
    assert_eq!(
        ws.recv().await,
        json!({"type": "subscribed", "conversation": conv, "last_seq": 2})
    );
    ws.assert_silent(QUIET).await;

    // Subscribing several times does not duplicate live traffic.
    let frames = ws.turn(&conv, "m2", "and again").await;
    assert_eq!(of_type(&frames, "ack").len(), 1, "{frames:?}");
    assert_eq!(frames[0]["seq"], 3);
    assert_eq!(frames.last().unwrap()["seq"], 4);
    ws.assert_silent(QUIET).await;
}

#[tokio::test]
async fn resending_a_client_id_answers_the_original_ack_and_done() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(config_with(Some(&up)));
    let mut ws = Ws::connect(&server, None).await;
    let conv = ws.create("up").await;
    let first = ws.turn(&conv, "m1", "only once please").await;
    let (ack, done) = (first[0].clone(), first.last().unwrap().clone());
    assert_eq!(ack["type"], "ack");
    assert_eq!(ack["seq"], 1);
    assert_eq!(done["type"], "done", "{first:?}");
    assert_eq!(done["seq"], 2);
    assert_eq!(up.requests(), 1);

    // Same socket: the original ack and done, nothing else.
    let again = ws.turn(&conv, "m1", "only once please").await;
    assert_eq!(again, vec![ack.clone(), done.clone()]);
    ws.assert_silent(QUIET).await;

    // A client that lost its socket resends from a new one: same answer.
    drop(ws);
    let mut ws = Ws::connect(&server, None).await;
    let again = ws.turn(&conv, "m1", "only once please").await;
    assert_eq!(again, vec![ack, done]);
    ws.assert_silent(QUIET).await;

    let stored = messages(&server, None, &conv).await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert_eq!(stored[0]["client_id"], "m1");
    assert_eq!(up.requests(), 1);
}

#[tokio::test]
async fn resending_a_client_id_while_its_reply_streams_appends_nothing() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(config_with(Some(&up)));
    let mut ws = Ws::connect(&server, None).await;
    let conv = ws.create("up").await;
    let content = "slowly [[mock:words=30,tps=60]]";
    let msg = json!({"type": "user_message", "conversation": conv, "client_id": "m1", "content": content});
    ws.send(msg.clone()).await;
    let ack = ws.recv().await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["seq"], 1);
    ws.send(msg).await;
    let mut frames = vec![ack];
    frames.extend(
        ws.recv_until(|f| f["type"] == "done" || f["type"] == "error")
            .await,
    );
    ws.assert_silent(QUIET).await;

    // Acks (the original, possibly answered again) all name seq 1; exactly one reply.
    let acks = of_type(&frames, "ack");
    assert!(
        acks.iter().all(|a| a["seq"] == 1 && a["client_id"] == "m1"),
        "{frames:?}"
    );
    let done = of_type(&frames, "done");
    assert_eq!(done.len(), 1, "{frames:?}");
    assert_eq!(done[0]["seq"], 2);
    assert_eq!(done[0]["finish_reason"], "stop");
    let text = delta_text(&frames);
    assert_eq!(text, mock_reply(0, &[("user", content)]));
    let stored = messages(&server, None, &conv).await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert_eq!(stored[1]["content"], text.as_str());
    assert_eq!(up.requests(), 1);
}

#[tokio::test]
async fn every_subscribed_socket_sees_every_turn() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(config_with(Some(&up)));
    let mut a = Ws::connect(&server, None).await;
    let mut b = Ws::connect(&server, None).await;
    let mut c = Ws::connect(&server, None).await;
    let conv = a.create("up").await;
    b.send(json!({"type": "subscribe", "conversation": conv}))
        .await;
    assert_eq!(
        b.recv().await,
        json!({"type": "subscribed", "conversation": conv, "last_seq": 0})
    );

    let fa = a.turn(&conv, "m1", "fan this out").await;
    let fb = b.recv_until(|f| f["type"] == "done").await;
    assert_eq!(fa.last().unwrap()["type"], "done", "{fa:?}");
    assert_eq!(fb, fa);
    assert_eq!(fb[0]["type"], "ack");
    assert_eq!(fb[0]["client_id"], "m1");
    assert_eq!(fb[0]["seq"], 1);
    assert!(!of_type(&fb, "delta").is_empty());
    assert!(of_type(&fb, "delta")
        .iter()
        .all(|d| d["reply_to"] == 1 && d["conversation"] == conv.as_str()));
    let text = delta_text(&fb);
    assert_eq!(text, mock_reply(0, &[("user", "fan this out")]));

    // The other way round: A was subscribed by sending; B's turn reaches it.
    let fb = b.turn(&conv, "m2", "and back").await;
    let fa = a.recv_until(|f| f["type"] == "done").await;
    assert_eq!(fa, fb);
    assert_eq!(fa[0]["seq"], 3);
    assert_eq!(fa.last().unwrap()["seq"], 4);

    // A socket that never subscribed hears nothing.
    c.assert_silent(QUIET).await;
    // Nor does A hear anything beyond its two turns (it has had C's quiet time to get it).
    a.assert_silent(Duration::from_millis(1)).await;
    let stored = messages(&server, None, &conv).await;
    assert_eq!(stored.len(), 4);
    assert_eq!(stored[1]["content"], text.as_str());
    assert_eq!(stored[3]["content"], delta_text(&fb).as_str());
}

#[tokio::test]
async fn cancel_stops_the_reply_and_stores_the_partial_text() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(config_with(Some(&up)));
    let mut ws = Ws::connect(&server, None).await;
    let conv = ws.create("up").await;
    let content = "a long story [[mock:words=200,tps=20]]";
    ws.send(json!({"type": "user_message", "conversation": conv, "client_id": "m1", "content": content})).await;
    let mut frames = vec![ws.recv().await];
    assert_eq!(frames[0]["type"], "ack", "{frames:?}");
    frames.push(ws.recv().await);
    assert_eq!(frames[1]["type"], "delta", "{frames:?}");
    ws.send(json!({"type": "cancel", "conversation": conv}))
        .await;
    frames.extend(
        ws.recv_until(|f| f["type"] == "done" || f["type"] == "error")
            .await,
    );

    let done = frames.last().unwrap();
    assert_eq!(done["type"], "done", "{frames:?}");
    assert_eq!(done["finish_reason"], "cancelled");
    assert_eq!(done["seq"], 2);
    assert_eq!(done["reply_to"], 1);
    let partial = delta_text(&frames);
    let full = mock_reply(0, &[("user", content)]);
    assert!(!partial.is_empty());
    assert!(
        partial.len() < full.len() && full.starts_with(&partial),
        "{partial:?}"
    );
    let stored = messages(&server, None, &conv).await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert_eq!(stored[1]["role"], "assistant");
    assert_eq!(stored[1]["content"], partial.as_str());
    assert_eq!(stored[1]["finish_reason"], "cancelled");

    // With nothing in progress, cancel does nothing and answers nothing.
    ws.send(json!({"type": "cancel", "conversation": conv}))
        .await;
    ws.assert_silent(QUIET).await;
    let frames = ws.turn(&conv, "m2", "after the cancel").await;
    assert_eq!(frames[0]["seq"], 3);
    let done = frames.last().unwrap();
    assert_eq!(done["type"], "done", "{frames:?}");
    assert_eq!(done["finish_reason"], "stop");
    assert_eq!(done["seq"], 4);
    assert_eq!(up.requests(), 2);
}

#[tokio::test]
async fn cancel_before_the_first_token_stores_an_empty_cancelled_reply() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(config_with(Some(&up)));
    let mut ws = Ws::connect(&server, None).await;
    let conv = ws.create("up").await;
    let content = "think first [[mock:ttft_ms=5000]]";
    ws.send(json!({"type": "user_message", "conversation": conv, "client_id": "m1", "content": content})).await;
    let ack = ws.recv().await;
    assert_eq!(ack["type"], "ack", "{ack}");
    ws.send(json!({"type": "cancel", "conversation": conv}))
        .await;
    let frames = ws
        .recv_until(|f| f["type"] == "done" || f["type"] == "error")
        .await;
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0]["type"], "done");
    assert_eq!(frames[0]["finish_reason"], "cancelled");
    assert_eq!(frames[0]["seq"], 2);
    // `done` still names the target the turn was going to, and nothing was used.
    assert_eq!(frames[0]["provider"], "up");
    assert_eq!(frames[0]["model"], "mock-1");
    assert_eq!(frames[0]["usage"]["total_tokens"], 0);
    let stored = messages(&server, None, &conv).await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert_eq!(stored[1]["content"], "");
    assert_eq!(stored[1]["finish_reason"], "cancelled");
}

#[tokio::test]
async fn a_second_message_waits_for_the_streaming_reply() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(config_with(Some(&up)));
    let mut ws = Ws::connect(&server, None).await;
    let conv = ws.create("up").await;
    let first = "first, slowly [[mock:words=20,tps=100]]";
    let m1 =
        json!({"type": "user_message", "conversation": conv, "client_id": "m1", "content": first});
    let m2 = json!({"type": "user_message", "conversation": conv, "client_id": "m2", "content": "second"});
    ws.send(m1).await;
    ws.send(m2.clone()).await;
    // A resend of the queued message appends nothing and answers nothing extra.
    ws.send(m2).await;
    let frames = ws
        .recv_until(|f| f["type"] == "error" || (f["type"] == "done" && f["seq"] == 4))
        .await;
    ws.assert_silent(QUIET).await;

    assert_eq!(frames[0]["type"], "ack", "{frames:?}");
    assert_eq!(frames[0]["seq"], 1);
    assert_eq!(frames[0]["client_id"], "m1");
    let d1 = frames
        .iter()
        .position(|f| f["type"] != "delta" && f["type"] != "ack")
        .unwrap();
    assert!(
        frames[1..d1]
            .iter()
            .all(|f| f["type"] == "delta" && f["reply_to"] == 1),
        "{frames:?}"
    );
    assert_eq!(frames[d1]["type"], "done", "{frames:?}");
    assert_eq!(frames[d1]["seq"], 2);
    assert_eq!(frames[d1]["reply_to"], 1);
    assert_eq!(frames[d1 + 1]["type"], "ack", "{frames:?}");
    assert_eq!(frames[d1 + 1]["seq"], 3);
    assert_eq!(frames[d1 + 1]["client_id"], "m2");
    let last = frames.len() - 1;
    assert!(
        frames[d1 + 2..last]
            .iter()
            .all(|f| f["type"] == "delta" && f["reply_to"] == 3),
        "{frames:?}"
    );
    assert!(last > d1 + 2, "second reply had no deltas: {frames:?}");
    assert_eq!(frames[last]["seq"], 4);
    assert_eq!(frames[last]["reply_to"], 3);

    let reply1 = delta_text(&frames[..=d1]);
    let reply2 = delta_text(&frames[d1 + 1..]);
    assert_eq!(reply1, mock_reply(0, &[("user", first)]));
    // The second turn was sent upstream with the first turn in its context.
    assert_eq!(
        reply2,
        mock_reply(
            0,
            &[("user", first), ("assistant", &reply1), ("user", "second")]
        )
    );
    let stored = messages(&server, None, &conv).await;
    let summary: Vec<_> = stored
        .iter()
        .map(|m| (m["seq"].as_u64().unwrap(), m["role"].as_str().unwrap()))
        .collect();
    assert_eq!(
        summary,
        [(1, "user"), (2, "assistant"), (3, "user"), (4, "assistant")]
    );
    assert_eq!(stored[0]["content"], first);
    assert_eq!(stored[1]["content"], reply1.as_str());
    assert_eq!(stored[2]["content"], "second");
    assert_eq!(stored[3]["content"], reply2.as_str());
    assert_eq!(up.requests(), 2);
}

#[tokio::test]
async fn bad_frames_are_answered_and_the_socket_stays_open() {
    let server = TestServer::start(config_with(None));
    let mut ws = Ws::connect(&server, None).await;
    let conv = ws.create("mock").await;

    ws.send_raw("{nope").await;
    let f = ws.recv().await;
    assert_error(&f, "bad_request");
    assert!(
        f.get("client_id").is_none() && f.get("conversation").is_none(),
        "{f}"
    );
    ws.send_raw("[1]").await;
    assert_error(&ws.recv().await, "bad_request");
    ws.send(json!({"type": "dance", "conversation": conv, "client_id": "d1"}))
        .await;
    let f = ws.recv().await;
    assert_error(&f, "bad_request");
    assert_eq!(f["client_id"], "d1");
    assert_eq!(f["conversation"], conv.as_str());
    ws.send(json!({"conversation": conv, "client_id": "d2", "content": "hi"}))
        .await;
    let f = ws.recv().await;
    assert_error(&f, "bad_request");
    assert_eq!(f["client_id"], "d2");
    ws.send(json!({"type": "user_message", "conversation": conv, "client_id": "d3"}))
        .await;
    let f = ws.recv().await;
    assert_error(&f, "bad_request");
    assert_eq!(f["client_id"], "d3");
    assert_eq!(f["conversation"], conv.as_str());
    assert!(f["message"].as_str().unwrap().contains("content"), "{f}");
    ws.send(
        json!({"type": "user_message", "conversation": conv, "client_id": "d4", "content": 42}),
    )
    .await;
    let f = ws.recv().await;
    assert_error(&f, "bad_request");
    assert_eq!(f["client_id"], "d4");
    ws.send(json!({"type": "create"})).await;
    assert_error(&ws.recv().await, "bad_request");
    ws.send(json!({"type": "subscribe"})).await;
    assert_error(&ws.recv().await, "bad_request");
    ws.send(json!({"type": "cancel"})).await;
    assert_error(&ws.recv().await, "bad_request");
    ws.send_binary(br#"{"type":"create","client_id":"b"}"#.to_vec())
        .await;
    assert_error(&ws.recv().await, "bad_request");

    // Conversations that do not exist: well-formed, and malformed ids.
    let ghost = format!("conv_{}", "0123456789abcdef".repeat(2));
    ws.send(json!({"type": "subscribe", "conversation": ghost, "after_seq": 0}))
        .await;
    let f = ws.recv().await;
    assert_error(&f, "not_found");
    assert_eq!(f["conversation"], ghost.as_str());
    ws.send(
        json!({"type": "user_message", "conversation": ghost, "client_id": "g1", "content": "hi"}),
    )
    .await;
    let f = ws.recv().await;
    assert_error(&f, "not_found");
    assert_eq!(f["conversation"], ghost.as_str());
    assert_eq!(f["client_id"], "g1");
    ws.send(json!({"type": "cancel", "conversation": ghost}))
        .await;
    assert_error(&ws.recv().await, "not_found");
    for bad in [
        "nope",
        "conv_",
        "conv_0123456789ABCDEF0123456789ABCDEF",
        "../../etc/passwd",
    ] {
        ws.send(json!({"type": "subscribe", "conversation": bad}))
            .await;
        assert_error(&ws.recv().await, "not_found");
        ws.send(json!({"type": "user_message", "conversation": bad, "client_id": "g2", "content": "hi"})).await;
        let f = ws.recv().await;
        assert_error(&f, "not_found");
        assert_eq!(f["client_id"], "g2");
    }

    // Still open and working; nothing was stored by the bad frames.
    let other = ws.create("mock").await;
    assert_ne!(other, conv);
    let frames = ws.turn(&conv, "ok", "finally").await;
    assert_eq!(frames[0]["type"], "ack", "{frames:?}");
    assert_eq!(frames[0]["seq"], 1);
    assert_eq!(frames.last().unwrap()["type"], "done");
    assert_eq!(messages(&server, None, &conv).await.len(), 2);
    ws.assert_silent(QUIET).await;
}

#[tokio::test]
async fn a_frame_over_the_limit_closes_with_1009() {
    use tokio_tungstenite::tungstenite::protocol::frame::{coding::Data, coding::OpCode, Frame};
    const LIMIT: usize = 64 * 1024;
    let mut cfg = config_with(None);
    cfg.server.max_frame_bytes = LIMIT;
    let server = TestServer::start(cfg);

    // Just under the limit is fine.
    let mut ws = Ws::connect(&server, None).await;
    let filler = "x".repeat(LIMIT - 100);
    ws.send(
        json!({"type": "create", "client_id": "c", "model": "mock", "metadata": {"pad": filler}}),
    )
    .await;
    let f = ws.recv().await;
    assert_eq!(f["type"], "created", "{f}");

    // One frame over the limit.
    let filler = "x".repeat(LIMIT + 1);
    let _ = ws
        .stream
        .send(Message::Text(
            json!({"type": "create", "client_id": filler}).to_string(),
        ))
        .await;
    assert_eq!(ws.close_code(TIMEOUT).await, Some(1009));

    // A fragmented message: reassembled under the limit, closed over it.
    let mut ws = Ws::connect(&server, None).await;
    let first = Frame::message(
        br#"{"type":"create","#.to_vec(),
        OpCode::Data(Data::Text),
        false,
    );
    let last = Frame::message(
        br#""client_id":"frag","model":"mock"}"#.to_vec(),
        OpCode::Data(Data::Continue),
        true,
    );
    ws.stream.send(Message::Frame(first)).await.unwrap();
    ws.stream.send(Message::Frame(last)).await.unwrap();
    let f = ws.recv().await;
    assert_eq!(f["type"], "created", "{f}");
    assert_eq!(f["client_id"], "frag");
    let part = vec![b' '; LIMIT / 2];
    let _ = ws
        .stream
        .send(Message::Frame(Frame::message(
            part.clone(),
            OpCode::Data(Data::Text),
            false,
        )))
        .await;
    let _ = ws
        .stream
        .send(Message::Frame(Frame::message(
            part.clone(),
            OpCode::Data(Data::Continue),
            false,
        )))
        .await;
    let _ = ws
        .stream
        .send(Message::Frame(Frame::message(
            part,
            OpCode::Data(Data::Continue),
            true,
        )))
        .await;
    assert_eq!(ws.close_code(TIMEOUT).await, Some(1009));
}

#[tokio::test]
async fn upstream_failures_are_reported_and_stored() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(config_with(Some(&up)));
    let mut ws = Ws::connect(&server, None).await;

    // A 5xx before any text.
    let conv = ws.create("up").await;
    let frames = ws.turn(&conv, "m1", "fail [[mock:status=500]]").await;
    assert_eq!(frames.len(), 2, "{frames:?}");
    assert_eq!(frames[0]["type"], "ack");
    assert_eq!(frames[0]["seq"], 1);
    let err = &frames[1];
    assert_error(err, "upstream_error");
    assert_eq!(err["conversation"], conv.as_str());
    assert_eq!(err["client_id"], "m1");
    assert_eq!(err["reply_to"], 1);
    let stored = messages(&server, None, &conv).await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert_eq!(stored[0]["role"], "user");
    assert_eq!(stored[0]["content"], "fail [[mock:status=500]]");
    assert_eq!(stored[1]["role"], "assistant");
    assert_eq!(stored[1]["content"], "");
    assert_eq!(stored[1]["finish_reason"], "error");
    assert_eq!(up.requests(), 1);
    // A resend of the failed message is answered as it was the first time, and not retried.
    let again = ws.turn(&conv, "m1", "fail [[mock:status=500]]").await;
    assert_eq!(again, frames);
    assert_eq!(up.requests(), 1);

    // The stream breaks after text was sent.
    let conv2 = ws.create("up").await;
    let content = "break [[mock:drop_after=3]]";
    let frames = ws.turn(&conv2, "m2", content).await;
    assert_eq!(frames[0]["type"], "ack", "{frames:?}");
    assert_eq!(frames[0]["seq"], 1);
    let deltas = of_type(&frames, "delta");
    assert_eq!(deltas.len(), 3, "{frames:?}");
    assert!(of_type(&frames, "done").is_empty(), "{frames:?}");
    let err = frames.last().unwrap();
    assert_error(err, "upstream_interrupted");
    assert_eq!(err["conversation"], conv2.as_str());
    assert_eq!(err["client_id"], "m2");
    assert_eq!(err["reply_to"], 1);
    let partial = delta_text(&frames);
    assert!(
        mock_reply(0, &[("user", content)]).starts_with(&partial),
        "{partial:?}"
    );
    let stored = messages(&server, None, &conv2).await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert_eq!(stored[1]["role"], "assistant");
    assert_eq!(stored[1]["content"], partial.as_str());
    assert_eq!(stored[1]["finish_reason"], "interrupted");

    // Both conversations go on.
    let frames = ws.turn(&conv, "m3", "try again").await;
    assert_eq!(frames[0]["seq"], 3);
    assert_eq!(frames.last().unwrap()["type"], "done", "{frames:?}");
    assert_eq!(frames.last().unwrap()["seq"], 4);
    ws.assert_silent(QUIET).await;
}

#[tokio::test]
async fn access_token_on_the_url_authenticates_the_socket() {
    use tokio_tungstenite::tungstenite::Error as WsError;
    let server = TestServer::start_with_admin(config_with(None));
    let (_, key) = server.create_key(json!({"tenant": "t1"})).await;

    let mut ws = Ws::try_connect_url(&format!("{}?access_token={key}", server.ws_url()))
        .await
        .unwrap();
    let conv = ws.create("mock").await;
    let frames = ws.turn(&conv, "m1", "hello with a token").await;
    assert_eq!(frames.last().unwrap()["type"], "done", "{frames:?}");
    assert_eq!(messages(&server, Some(&key), &conv).await.len(), 2);

    let status = |e: WsError| match e {
        WsError::Http(resp) => resp.status().as_u16(),
        other => panic!("expected an HTTP refusal, got {other:?}"),
    };
    let bad = Ws::try_connect_url(&format!("{}?access_token=pk-not-a-key", server.ws_url())).await;
    assert_eq!(status(bad.err().unwrap()), 401);
    let none = Ws::try_connect_url(&server.ws_url()).await;
    assert_eq!(status(none.err().unwrap()), 401);
    let admin =
        Ws::try_connect_url(&format!("{}?access_token=adm-test-secret", server.ws_url())).await;
    assert_eq!(status(admin.err().unwrap()), 401);

    // Another tenant's key cannot see or write the conversation.
    let (_, key2) = server.create_key(json!({"tenant": "t2"})).await;
    let mut other = Ws::connect(&server, Some(&key2)).await;
    other
        .send(json!({"type": "subscribe", "conversation": conv, "after_seq": 0}))
        .await;
    assert_error(&other.recv().await, "not_found");
    other.send(json!({"type": "user_message", "conversation": conv, "client_id": "x", "content": "hi"})).await;
    assert_error(&other.recv().await, "not_found");
    other
        .send(json!({"type": "cancel", "conversation": conv}))
        .await;
    assert_error(&other.recv().await, "not_found");
    assert_eq!(messages(&server, Some(&key), &conv).await.len(), 2);
    ws.assert_silent(QUIET).await;
}

#[cfg(feature = "fault-injection")]
#[tokio::test]
async fn a_panicking_turn_answers_internal_and_the_conversation_recovers() {
    let server = TestServer::start(config_with(None));
    let mut ws = Ws::connect(&server, None).await;
    let mut watcher = Ws::connect(&server, None).await;
    let conv = ws.create("mock").await;
    let other = ws.create("mock").await;
    let frames = ws.turn(&other, "o1", "before").await;
    assert_eq!(frames.last().unwrap()["seq"], 2, "{frames:?}");
    watcher.subscribe(&conv).await;

    let frames = ws.turn(&conv, "p1", "boom [[parley:panic]]").await;
    assert_eq!(frames.len(), 2, "{frames:?}");
    assert_eq!(frames[0]["type"], "ack");
    assert_eq!(frames[0]["seq"], 1);
    let err = &frames[1];
    assert_error(err, "internal");
    assert_eq!(err["conversation"], conv.as_str());
    assert_eq!(err["client_id"], "p1");
    // Other subscribers hear it too.
    assert_eq!(watcher.recv_until(|f| f["type"] == "error").await, frames);

    // The socket is open; the panicked turn was stored with an `internal` error reply, so the
    // history still alternates and the conversation goes on with the stored numbering.
    let frames = ws.turn(&conv, "p2", "after the panic").await;
    assert_eq!(frames[0]["type"], "ack", "{frames:?}");
    assert_eq!(frames[0]["seq"], 3);
    let done = frames.last().unwrap();
    assert_eq!(done["type"], "done", "{frames:?}");
    assert_eq!(done["seq"], 4);
    assert_eq!(done["reply_to"], 3);
    assert_eq!(done["finish_reason"], "stop");
    // Subscribers survive the restart.
    assert_eq!(watcher.recv_until(|f| f["type"] == "done").await, frames);
    let stored = messages(&server, None, &conv).await;
    let roles: Vec<_> = stored.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(
        roles,
        ["user", "assistant", "user", "assistant"],
        "{stored:?}"
    );
    assert_eq!(stored[0]["client_id"], "p1");
    assert_eq!(stored[1]["finish_reason"], "error");
    assert_eq!(stored[1]["content"], "");
    assert_eq!(stored[2]["content"], "after the panic");
    assert_eq!(stored[3]["content"], delta_text(&frames).as_str());

    // Resending the panicked message appends nothing and answers how it ended.
    ws.send(json!({"type": "user_message", "conversation": conv, "client_id": "p1", "content": "boom [[parley:panic]]"}))
        .await;
    let again = ws.recv().await;
    assert_eq!(
        again,
        json!({"type": "ack", "conversation": conv, "client_id": "p1", "seq": 1})
    );
    let outcome = ws.recv().await;
    assert_error(&outcome, "internal");
    assert_eq!(outcome["client_id"], "p1");
    assert_eq!(outcome["reply_to"], 1);

    // Another conversation is unaffected.
    let frames = ws.turn(&other, "o2", "after").await;
    assert_eq!(frames[0]["seq"], 3);
    assert_eq!(frames.last().unwrap()["type"], "done", "{frames:?}");
    assert_eq!(frames.last().unwrap()["seq"], 4);
    assert_eq!(messages(&server, None, &conv).await.len(), 4);
    ws.assert_silent(QUIET).await;
}

#[cfg(feature = "fault-injection")]
#[tokio::test]
async fn a_message_the_store_fails_is_not_acked_and_its_reply_goes_nowhere() {
    // The upstream is asked while the user message is being stored; here the mock answers at
    // once and the (injected) write fails 200 ms later: none of the reply may reach a client.
    let server = TestServer::start(config_with(None));
    let mut ws = Ws::connect(&server, None).await;
    let mut watcher = Ws::connect(&server, None).await;
    let conv = ws.create("mock").await;
    watcher.subscribe(&conv).await;

    let frames = ws.turn(&conv, "f1", "lost [[parley:store-fail]]").await;
    assert_eq!(frames.len(), 1, "only the error: {frames:?}");
    assert_error(&frames[0], "internal");
    assert_eq!(frames[0]["client_id"], "f1");
    assert!(frames[0].get("reply_to").is_none(), "{frames:?}");
    assert_eq!(watcher.recv().await, frames[0]);
    assert!(messages(&server, None, &conv).await.is_empty());

    // The conversation goes on from where the store stands.
    let frames = ws.turn(&conv, "f2", "kept").await;
    assert_eq!(frames[0]["type"], "ack", "{frames:?}");
    assert_eq!(frames[0]["seq"], 1);
    let done = frames.last().unwrap();
    assert_eq!(done["type"], "done", "{frames:?}");
    assert_eq!(done["seq"], 2);
    assert_eq!(
        watcher.recv_until(|f| f["type"] == "done").await,
        frames,
        "the watcher sees the same turn"
    );
    let stored = messages(&server, None, &conv).await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert_eq!(stored[0]["content"], "kept");
    assert_eq!(stored[1]["content"], delta_text(&frames).as_str());
    ws.assert_silent(QUIET).await;
    watcher.assert_silent(QUIET).await;
}

#[cfg(feature = "fault-injection")]
#[tokio::test]
async fn a_message_stored_by_a_write_reported_failed_is_answered_when_resent() {
    // The write lands but reports failure (as a Redis call that times out after applying): the
    // client hears an error and resends; it must hear the original ack and how the turn ended,
    // not an ack alone and then silence.
    let server = TestServer::start(config_with(None));
    let mut ws = Ws::connect(&server, None).await;
    let conv = ws.create("mock").await;
    let content = "landed [[parley:store-fail-applied]]";

    let frames = ws.turn(&conv, "a1", content).await;
    assert_eq!(frames.len(), 1, "only the error: {frames:?}");
    assert_error(&frames[0], "internal");
    let stored = messages(&server, None, &conv).await;
    assert_eq!(stored.len(), 1, "the message landed: {stored:?}");
    assert_eq!(stored[0]["content"], content);

    ws.send(json!({"type": "user_message", "conversation": conv, "client_id": "a1", "content": content})).await;
    let ack = ws.recv().await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["client_id"], "a1");
    assert_eq!(ack["seq"], 1);
    let end = ws.recv().await;
    assert_error(&end, "upstream_interrupted");
    assert_eq!(end["reply_to"], 1, "{end}");
    assert_eq!(end["client_id"], "a1", "{end}");
    let stored = messages(&server, None, &conv).await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert_eq!(stored[1]["role"], "assistant");
    assert_eq!(stored[1]["finish_reason"], "interrupted");

    // History still alternates: the next turn follows the repaired one.
    let frames = ws.turn(&conv, "a2", "next").await;
    assert_eq!(frames[0]["type"], "ack", "{frames:?}");
    assert_eq!(frames[0]["seq"], 3);
    let done = frames.last().unwrap();
    assert_eq!(done["type"], "done", "{frames:?}");
    assert_eq!(done["seq"], 4);
    ws.assert_silent(QUIET).await;
}

#[cfg(feature = "fault-injection")]
#[tokio::test]
async fn a_frame_whose_handling_panics_is_answered_internal_and_the_socket_goes_on() {
    let server = TestServer::start(config_with(None));
    let mut ws = Ws::connect(&server, None).await;
    ws.send(json!({"type": "create", "client_id": "[[parley:panic]]", "model": "mock"}))
        .await;
    let err = ws.recv().await;
    assert_error(&err, "internal");
    // The socket's next frames are still handled, in order.
    let conv = ws.create("mock").await;
    let frames = ws.turn(&conv, "p1", "still here").await;
    assert_eq!(frames[0]["type"], "ack", "{frames:?}");
    assert_eq!(frames.last().unwrap()["type"], "done", "{frames:?}");
    ws.assert_silent(QUIET).await;
}

#[tokio::test]
async fn frames_sent_just_before_a_socket_closes_are_still_worked_in_order() {
    // A bot that sends its turns and hangs up at once: what reached the server is worked,
    // though the socket is gone before the first reply has ended.
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(config_with(Some(&up)));
    let mut ws = Ws::connect(&server, None).await;
    let conv = ws.create("up").await;
    let mut watcher = Ws::connect(&server, None).await;
    watcher.subscribe(&conv).await;
    let turns = [
        ("c1", "first [[mock:words=10,tps=50]]"),
        ("c2", "second [[mock:words=10,tps=50]]"),
        ("c3", "third [[mock:words=10,tps=50]]"),
    ];
    for (cid, text) in turns {
        ws.send(json!({"type": "user_message", "conversation": conv, "client_id": cid, "content": text}))
            .await;
    }
    // A clean close: the client reads on until the server's close (dropping a socket with
    // unread frames resets the connection, and what the server had not read yet is lost).
    ws.stream.close(None).await.unwrap();
    let drained = tokio::time::timeout(TIMEOUT, async {
        while let Some(Ok(_)) = ws.stream.next().await {}
    })
    .await;
    assert!(drained.is_ok(), "the server never closed the socket");
    drop(ws);

    // A watcher sees the three turns end, each with its reply.
    let mut ended = 0;
    let frames = watcher
        .recv_until(|f| {
            ended += usize::from(f["type"] == "done" || f["type"] == "error");
            ended == 3
        })
        .await;
    assert!(frames.iter().all(|f| f["type"] != "error"), "{frames:?}");
    let stored = messages(&server, None, &conv).await;
    assert_eq!(stored.len(), 6, "{stored:?}");
    for (i, (cid, text)) in turns.into_iter().enumerate() {
        assert_eq!(stored[2 * i]["client_id"], cid, "{stored:?}");
        assert_eq!(stored[2 * i]["content"], text, "{stored:?}");
        assert_eq!(stored[2 * i + 1]["role"], "assistant", "{stored:?}");
    }
}

#[tokio::test]
async fn a_reply_outlives_its_socket_and_a_new_one_picks_it_up() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(config_with(Some(&up)));
    let mut a = Ws::connect(&server, None).await;
    let conv = a.create("up").await;
    let content = "take your time [[mock:words=40,tps=50]]";
    a.send(json!({"type": "user_message", "conversation": conv, "client_id": "m1", "content": content})).await;
    let ack = a.recv().await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let first = a.recv().await;
    assert_eq!(first["type"], "delta", "{first}");
    drop(a);

    // The client reconnects mid-reply: the stored user message, then the rest of the turn live.
    let mut b = Ws::connect(&server, None).await;
    b.send(json!({"type": "subscribe", "conversation": conv, "after_seq": 0}))
        .await;
    assert_eq!(
        b.recv().await,
        json!({"type": "subscribed", "conversation": conv, "last_seq": 1})
    );
    let m1 = b.recv().await;
    assert_eq!(m1["type"], "message", "{m1}");
    assert_eq!(m1["seq"], 1);
    assert_eq!(m1["role"], "user");
    assert_eq!(m1["content"], content);
    // Resending the acked message (the client may not have seen the ack) appends nothing.
    b.send(json!({"type": "user_message", "conversation": conv, "client_id": "m1", "content": content})).await;
    let fb = b
        .recv_until(|f| f["type"] == "done" || f["type"] == "error")
        .await;
    b.assert_silent(QUIET).await;

    let done = fb.last().unwrap();
    assert_eq!(done["type"], "done", "{fb:?}");
    assert_eq!(done["seq"], 2);
    assert_eq!(done["finish_reason"], "stop");
    let rest: Vec<_> = fb.iter().filter(|f| f["type"] != "ack").collect();
    assert!(
        rest[..rest.len() - 1]
            .iter()
            .all(|f| f["type"] == "delta" && f["reply_to"] == 1),
        "{fb:?}"
    );
    assert!(of_type(&fb, "ack").iter().all(|f| f["seq"] == 1), "{fb:?}");
    // The turn went on without its socket: what B saw live is the tail of the full reply.
    let full = mock_reply(0, &[("user", content)]);
    assert!(full.ends_with(&delta_text(&fb)), "{fb:?}");
    assert!(full.starts_with(first["text"].as_str().unwrap()));
    let stored = messages(&server, None, &conv).await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert_eq!(stored[1]["content"], full.as_str());
    assert_eq!(stored[1]["finish_reason"], "stop");
    assert_eq!(up.requests(), 1);
}

#[tokio::test]
async fn a_full_queue_answers_rate_limited_and_stores_nothing() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let mut cfg = config_with(Some(&up));
    cfg.server.max_queued_turns = 1;
    let server = TestServer::start(cfg);
    let mut ws = Ws::connect(&server, None).await;
    let conv = ws.create("up").await;
    let msg = |cid: &str, content: &str| json!({"type": "user_message", "conversation": conv, "client_id": cid, "content": content});
    ws.send(msg("m1", "wait for it [[mock:hang]]")).await;
    let ack = ws.recv().await;
    assert_eq!(ack["type"], "ack", "{ack}");
    ws.send(msg("m2", "queued")).await;
    ws.send(msg("m3", "one too many")).await;
    let err = ws.recv().await;
    assert_error(&err, "rate_limited");
    assert_eq!(err["client_id"], "m3");
    assert_eq!(err["conversation"], conv.as_str());
    assert!(
        err["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0),
        "{err}"
    );

    // Cancelling the hung reply lets the queued turn run.
    ws.send(json!({"type": "cancel", "conversation": conv}))
        .await;
    let frames = ws
        .recv_until(|f| f["type"] == "error" || (f["type"] == "done" && f["seq"] == 4))
        .await;
    assert_eq!(frames[0]["type"], "done", "{frames:?}");
    assert_eq!(frames[0]["finish_reason"], "cancelled");
    assert_eq!(frames[0]["seq"], 2);
    assert_eq!(
        frames[1],
        json!({"type": "ack", "conversation": conv, "client_id": "m2", "seq": 3})
    );
    assert_eq!(frames.last().unwrap()["finish_reason"], "stop");
    ws.assert_silent(QUIET).await;
    let stored = messages(&server, None, &conv).await;
    let cids: Vec<_> = stored
        .iter()
        .filter_map(|m| m["client_id"].as_str())
        .collect();
    assert_eq!(cids, ["m1", "m2"]);
    assert_eq!(stored.len(), 4);
}

/// Deleting a conversation answers the turns still waiting in its queue with `not_found`
/// (they were never acked and nothing of them is stored).
#[tokio::test]
async fn deleting_a_conversation_answers_its_queued_turns() {
    let server = TestServer::start(config_with(None));
    let mut ws = Ws::connect(&server, None).await;
    let conv = ws.create("mock").await;
    ws.send(
        json!({"type": "user_message", "conversation": conv, "client_id": "slow",
                   "content": "long [[mock:words=400,tps=20]]"}),
    )
    .await;
    let ack = ws.recv().await;
    assert_eq!(ack["type"], "ack");
    for id in ["q1", "q2"] {
        ws.send(
            json!({"type": "user_message", "conversation": conv, "client_id": id, "content": id}),
        )
        .await;
    }
    let resp = http()
        .delete(server.url(&format!("/v1/conversations/{conv}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let mut refused = Vec::new();
    while refused.len() < 2 {
        let f = ws.recv().await;
        // Nothing of a queued turn runs once its conversation is being deleted (no new actor
        // is started for it meanwhile).
        assert_ne!(
            f["type"], "ack",
            "a turn was accepted after the delete: {f}"
        );
        if f["type"] == "error" && f["code"] == "not_found" {
            refused.push(f["client_id"].as_str().unwrap_or_default().to_owned());
        }
    }
    refused.sort();
    assert_eq!(refused, ["q1", "q2"]);
}

/// Input that would be stored is checked first: a `client_id` empty or too long, `options`
/// or `metadata` that are not objects.
#[tokio::test]
async fn malformed_ids_and_fields_are_refused_not_stored() {
    let server = TestServer::start(config_with(None));
    let mut ws = Ws::connect(&server, None).await;
    let conv = ws.create("mock").await;
    let long = "x".repeat(300);
    for frame in [
        json!({"type": "user_message", "conversation": conv, "client_id": "", "content": "hi"}),
        json!({"type": "user_message", "conversation": conv, "client_id": long, "content": "hi"}),
        json!({"type": "user_message", "conversation": conv, "client_id": "c", "content": "hi", "options": []}),
        json!({"type": "create", "client_id": "c2", "metadata": 1}),
        json!({"type": "create", "client_id": ""}),
    ] {
        ws.send(frame.clone()).await;
        let f = ws.recv().await;
        assert_eq!(
            (f["type"].as_str(), f["code"].as_str()),
            (Some("error"), Some("bad_request")),
            "{frame} → {f}"
        );
    }
    assert!(messages(&server, None, &conv).await.is_empty());
    for body in [json!([]), json!({"metadata": 1})] {
        let resp = http()
            .post(server.url("/v1/conversations"))
            .json(&body)
            .send()
            .await
            .unwrap();
        expect_error(resp, 400, "bad_request").await;
    }
}

/// A text frame that is not UTF-8 closes the socket with 1007 (invalid payload), as RFC 6455
/// says, not with a generic protocol error.
#[tokio::test]
async fn a_text_frame_that_is_not_utf8_closes_with_1007() {
    use tokio_tungstenite::tungstenite::protocol::frame::{coding::Data, coding::OpCode, Frame};
    let server = TestServer::start(config_with(None));
    let mut ws = Ws::connect(&server, None).await;
    let bad = Frame::message(vec![b'{', 0xC0, 0xAF, b'}'], OpCode::Data(Data::Text), true);
    let _ = ws.stream.send(Message::Frame(bad)).await;
    assert_eq!(ws.close_code(TIMEOUT).await, Some(1007));
}

/// A replay longer than a page arrives whole and in order, at the socket's pace, and a turn
/// that runs meanwhile is heard only after it.
#[tokio::test]
async fn a_long_replay_is_paged_whole_and_live_frames_wait_for_it() {
    let server = TestServer::start(config_with(None));
    // A transcript of 2 400 messages given at once (Responses input), then its reply.
    let mut input: Vec<Value> = (0..2400)
        .map(|i| {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            json!({"role": role, "content": format!("line {i}")})
        })
        .collect();
    input.push(json!({"role": "user", "content": "the end"}));
    let r: Value = http()
        .post(server.url("/v1/responses"))
        .json(&json!({"model": "mock", "input": input}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let conv = r["conversation"]["id"].as_str().unwrap().to_owned();
    let total = 2402;
    assert!(total > 2 * parley::conversation::REPLAY_PAGE);

    let mut ws = Ws::connect(&server, None).await;
    ws.send(json!({"type": "subscribe", "conversation": conv, "after_seq": 0}))
        .await;
    assert_eq!(
        ws.recv().await,
        json!({"type": "subscribed", "conversation": conv, "last_seq": total})
    );
    // A turn from another socket while the replay is on its way.
    let mut other = Ws::connect(&server, None).await;
    other
        .send(json!({"type": "user_message", "conversation": conv, "client_id": "live", "content": "more"}))
        .await;
    let mut next = 1;
    while next <= total {
        let f = ws.recv().await;
        assert_eq!(
            f["type"], "message",
            "a live frame before the replay ended: {f}"
        );
        assert_eq!(f["seq"], next);
        next += 1;
    }
    // Then the live turn, in order: its ack, deltas, done.
    let live = ws.recv_until(|f| f["type"] == "done").await;
    assert_eq!(live[0]["type"], "ack", "{}", live[0]);
    assert_eq!(live[0]["seq"], total + 1);
    assert_eq!(live.last().unwrap()["seq"], total + 2);
}

/// A close handshake ends the TCP connection at once: a client that waits for the server's
/// close (as RFC 6455 has clients do) is not held for a linger timeout.
#[tokio::test]
async fn a_closed_socket_ends_its_connection_at_once() {
    use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
    let server = TestServer::start(config_with(None));
    for _ in 0..3 {
        let mut ws = Ws::connect(&server, None).await;
        ws.create("mock").await;
        let begun = std::time::Instant::now();
        ws.stream
            .close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            }))
            .await
            .unwrap();
        // The server's close frame, then the end of the stream (its TCP close).
        while let Ok(Some(Ok(_))) = tokio::time::timeout(TIMEOUT, ws.stream.next()).await {}
        let took = begun.elapsed();
        assert!(
            took < std::time::Duration::from_millis(300),
            "the connection ended {took:?} after the close"
        );
    }
}
