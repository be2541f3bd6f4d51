//! WebSocket protocol (PROTOCOL §5): turns, replay, idempotency, fan-out, cancel, queueing.

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
        Some(done["usage"]["prompt_tokens"].as_u64().unwrap() + done["usage"]["completion_tokens"].as_u64().unwrap())
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
