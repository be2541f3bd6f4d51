//! Context trimming (PROTOCOL §6), asserted on what the mock upstream actually received.

use parley::tokens::{count, Encoding, MESSAGE_FRAMING_TOKENS};
use serde_json::{json, Value};

use crate::common::*;

fn cost(text: &str) -> u32 {
    count(Encoding::Cl100kBase, text) + MESSAGE_FRAMING_TOKENS
}

#[tokio::test]
async fn sends_the_newest_run_that_fits_and_keeps_everything_stored() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let mut cfg = config_with(Some(&up));
    cfg.context.budget_tokens = 300;
    cfg.context.reserve_output_tokens = 100;
    let server = TestServer::start(cfg);
    let id = create_conversation(
        &server,
        None,
        json!({"model": "up", "system": "You are terse."}),
    )
    .await;
    let mut ws = Ws::connect(&server, None).await;
    for i in 0..8 {
        let frames = ws
            .turn(
                &id,
                &format!("t{i}"),
                &format!("question number {i} [[mock:words=20]]"),
            )
            .await;
        assert_eq!(frames.last().unwrap()["type"], "done");
    }
    let stored = messages(&server, None, &id).await;
    assert_eq!(stored.len(), 16, "trimming never removes stored history");

    let last: &Value = &up.received()[7];
    let sent = last["messages"].as_array().unwrap();
    assert_eq!(sent[0]["role"], "system");
    assert_eq!(sent[0]["content"], "You are terse.");
    assert_eq!(
        sent.last().unwrap()["content"],
        "question number 7 [[mock:words=20]]"
    );
    // What was sent is exactly the newest run of stored messages that fits 200 tokens.
    let history: Vec<&Value> = sent[1..sent.len() - 1].iter().collect();
    assert!(
        !history.is_empty() && history.len() < 14,
        "{} earlier messages sent",
        history.len()
    );
    let expected: Vec<&str> = stored[..14]
        .iter()
        .rev()
        .take(history.len())
        .rev()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    let got: Vec<&str> = history
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(got, expected);
    let used: u32 = sent
        .iter()
        .map(|m| cost(m["content"].as_str().unwrap()))
        .sum();
    assert!(used <= 200, "sent {used} tokens");
    let next_older = stored[13 - history.len()]["content"].as_str().unwrap();
    assert!(
        used + cost(next_older) > 200,
        "one more message would have fit"
    );
}

#[tokio::test]
async fn a_message_that_cannot_fit_is_refused_before_it_is_stored() {
    let mut cfg = config_with(None);
    cfg.context.budget_tokens = 120;
    cfg.context.reserve_output_tokens = 20;
    let server = TestServer::start(cfg);
    let mut ws = Ws::connect(&server, None).await;
    let id = ws.create("mock").await;
    let big = "word ".repeat(200);
    ws.send(
        json!({"type": "user_message", "conversation": id, "client_id": "big", "content": big}),
    )
    .await;
    let err = ws.recv().await;
    assert_eq!(err["type"], "error");
    assert_eq!(err["code"], "too_large");
    assert_eq!(err["client_id"], "big");
    assert!(messages(&server, None, &id).await.is_empty());
    // The conversation goes on.
    let frames = ws.turn(&id, "small", "short one").await;
    assert_eq!(frames[0]["seq"], 1);
}
