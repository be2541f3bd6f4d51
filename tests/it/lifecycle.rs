//! Process lifecycle: restarts with history intact (graceful and `kill -9`), SIGTERM that
//! stores the partial reply and exits 0, and configurations refused at start.

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

#[tokio::test]
async fn graceful_restart_keeps_history_and_numbering() {
    let tmp = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(config_with(None), tmp.path(), None);
    let mut ws = Ws::connect(&server, None).await;
    let conv = ws.create("mock").await;
    let first = ws.turn(&conv, "a", "remember the number 42").await;
    assert_eq!(first.last().unwrap()["type"], "done");
    drop(ws);
    server.stop();

    let server = TestServer::start_in(config_with(None), tmp.path(), None);
    let before = messages(&server, None, &conv).await;
    assert_eq!(before.len(), 2);
    assert_eq!(before[0]["content"], "remember the number 42");
    assert_eq!(before[1]["content"].as_str().unwrap(), delta_text(&first));

    let mut ws = Ws::connect(&server, None).await;
    let frames = ws.turn(&conv, "b", "and now?").await;
    assert_eq!(frames[0]["seq"], 3);
    assert_eq!(frames.last().unwrap()["seq"], 4);
    // The idempotency index survived too: resending "a" appends nothing.
    let again = ws.turn(&conv, "a", "remember the number 42").await;
    assert_eq!(again[0]["seq"], 1);
    assert_eq!(messages(&server, None, &conv).await.len(), 4);
}

async fn ws_to(addr: &str) -> Ws {
    let (stream, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws"))
        .await
        .unwrap();
    Ws { stream }
}

#[tokio::test]
async fn kill_9_loses_no_acked_message_and_no_done_reply() {
    let tmp = tempfile::tempdir().unwrap();
    let mut bin = BinServer::start(MOCK_ONLY, tmp.path(), &[]);
    let mut ws = ws_to(&bin.addr.to_string()).await;
    let conv = ws.create("mock").await;
    let mut done_texts = Vec::new();
    for i in 0..5 {
        let frames = ws
            .turn(&conv, &format!("k{i}"), &format!("message {i}"))
            .await;
        assert_eq!(frames.last().unwrap()["type"], "done");
        done_texts.push(delta_text(&frames));
    }
    // A last message that is acked while its reply is still streaming.
    ws.send(
        json!({"type": "user_message", "conversation": conv, "client_id": "last",
                   "content": "slow [[mock:words=500,tps=10]]"}),
    )
    .await;
    let ack = ws.recv().await;
    assert_eq!(ack["type"], "ack");
    bin.kill9();

    let bin = BinServer::start(MOCK_ONLY, tmp.path(), &[]);
    let stored = bin.messages(&conv).await;
    assert!(stored.len() >= 11, "{stored:?}");
    for (i, text) in done_texts.iter().enumerate() {
        assert_eq!(stored[2 * i]["content"], format!("message {i}"));
        assert_eq!(stored[2 * i + 1]["content"].as_str().unwrap(), text);
    }
    assert_eq!(stored[10]["client_id"], "last");
    assert_eq!(stored[10]["seq"], ack["seq"]);

    // The message acked before the crash is answered once: resending it gets its ack and an
    // `upstream_interrupted` error, the reply is stored as interrupted, and history alternates.
    let mut ws = ws_to(&bin.addr.to_string()).await;
    ws.send(
        json!({"type": "user_message", "conversation": conv, "client_id": "last",
                   "content": "slow [[mock:words=500,tps=10]]"}),
    )
    .await;
    let frames = ws.recv_until(|f| is_end_of(f, "last")).await;
    assert_eq!(frames[0]["type"], "ack");
    assert_eq!(frames[0]["seq"], ack["seq"]);
    let end = frames.last().unwrap();
    assert_eq!(end["type"], "error", "{frames:?}");
    assert_eq!(end["code"], "upstream_interrupted");
    let frames = ws.turn(&conv, "after", "and now").await;
    assert_eq!(frames.last().unwrap()["type"], "done", "{frames:?}");
    let stored = bin.messages(&conv).await;
    let roles: Vec<&str> = stored.iter().map(|m| m["role"].as_str().unwrap()).collect();
    for pair in roles.chunks(2) {
        assert_eq!(pair, ["user", "assistant"], "{roles:?}");
    }
    assert_eq!(stored[11]["finish_reason"], "interrupted");
}

#[tokio::test]
async fn sigterm_stores_the_partial_reply_and_exits_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let mut bin = BinServer::start(MOCK_ONLY, tmp.path(), &[]);
    let mut ws = ws_to(&bin.addr.to_string()).await;
    let conv = ws.create("mock").await;
    ws.send(
        json!({"type": "user_message", "conversation": conv, "client_id": "s",
                   "content": "long [[mock:words=500,tps=20]]"}),
    )
    .await;
    let mut seen = ws.recv_until(|f| f["type"] == "delta").await;
    let status = tokio::task::spawn_blocking(move || {
        let status = bin.terminate();
        (status, bin)
    });
    // The client still hears how its turn ended before the socket closes.
    let rest = ws.recv_until(|f| f["type"] == "done").await;
    seen.extend(rest);
    let done = seen.last().unwrap().clone();
    assert_eq!(done["finish_reason"], "cancelled");
    let (status, bin) = status.await.unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert!(bin
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("storage flushed")));
    drop(bin);

    let bin = BinServer::start(MOCK_ONLY, tmp.path(), &[]);
    let stored: Value = http()
        .get(bin.url(&format!("/v1/conversations/{conv}/messages")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let stored = stored["data"].as_array().unwrap();
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[1]["finish_reason"], "cancelled");
    let partial = delta_text(&seen);
    assert!(!partial.is_empty());
    assert_eq!(stored[1]["content"].as_str().unwrap(), partial);
}

/// Runs `parley serve` expecting it to refuse to start; answers its stderr.
fn refused(config: Option<&str>, args: &[&str], envs: &[(&str, &str)]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_parley"));
    cmd.arg("serve")
        .args(["--data-dir"])
        .arg(tmp.path().join("data"))
        .env("NO_COLOR", "1")
        .env_remove("PARLEY_CONFIG");
    if let Some(text) = config {
        let path = tmp.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        cmd.arg("--config").arg(path);
    }
    cmd.args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(
        !out.status.success(),
        "serve started with a bad configuration"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_configurations_are_refused_with_the_field_named() {
    let err = refused(Some("listen = \n"), &[], &[]);
    assert!(err.contains("invalid config file"), "{err}");

    let err = refused(Some("bogus_field = 1\n"), &[], &[]);
    assert!(err.contains("bogus_field"), "{err}");

    let unknown = format!("{MOCK_ONLY}\n[[routes]]\nmodel = \"x\"\ntargets = [{{ provider = \"nope\", model = \"m\" }}]\n");
    let err = refused(Some(&unknown), &[], &[]);
    assert!(err.contains("routes[1].targets[0].provider"), "{err}");

    let unset = "[[providers]]\nname = \"o\"\nkind = \"openai\"\napi_key_env = \"PARLEY_IT_SURELY_UNSET\"\n\
                 [[routes]]\nmodel = \"m\"\ntargets = [{ provider = \"o\", model = \"gpt\" }]\n";
    let err = refused(Some(unset), &[], &[]);
    assert!(
        err.contains("providers[0].api_key_env") && err.contains("PARLEY_IT_SURELY_UNSET"),
        "{err}"
    );
}

#[test]
fn non_loopback_without_admin_key_is_refused() {
    let err = refused(
        None,
        &["--listen", "0.0.0.0:0"],
        &[("PARLEY_ADMIN_KEY", "")],
    );
    assert!(err.contains("admin key"), "{err}");
}

#[tokio::test]
async fn embedded_default_serves_mock_and_default_without_a_file() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_parley"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(tmp.path().join("data"));
    cmd.env("NO_COLOR", "1")
        .env_remove("PARLEY_CONFIG")
        .env_remove("OPENAI_API_KEY")
        .env_remove("ANTHROPIC_API_KEY");
    cmd.env_remove("PARLEY_ADMIN_KEY");
    let bin = BinServer::spawn(cmd);
    let models: Value = http()
        .get(bin.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["default", "mock"]);
    let resp: Value = http()
        .post(bin.url("/v1/chat/completions"))
        .json(&json!({"model": "default", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        resp["choices"][0]["message"]["content"].as_str().unwrap(),
        mock_reply(0, &[("user", "hi")])
    );
    assert!(bin
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("development mode")));
}

fn gauge(metrics: &str, name: &str) -> Option<i64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

#[tokio::test]
async fn idle_conversation_actors_stop_and_come_back_from_storage() {
    let mut cfg = config_with(None);
    cfg.server.idle_timeout_secs = 1;
    let server = TestServer::start(cfg);
    let mut ws = Ws::connect(&server, None).await;
    let conv = ws.create("mock").await;
    ws.turn(&conv, "a", "hello").await;
    let live = || async {
        let text = get_text(&server, "/metrics").await;
        gauge(&text, "parley_live_conversations")
    };
    assert_eq!(live().await, Some(1));
    drop(ws);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while live().await != Some(0) {
        assert!(
            std::time::Instant::now() < deadline,
            "idle actor was not stopped"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // The next turn starts a fresh actor that continues from the stored seq.
    let mut ws = Ws::connect(&server, None).await;
    let frames = ws.turn(&conv, "b", "again").await;
    assert_eq!(frames[0]["seq"], 3);
    assert_eq!(frames.last().unwrap()["seq"], 4);
}

/// An actor that idles out while a caller holds its address (a message on its way) is
/// restarted by its supervisor and serves that message, as the registry's actor still; a
/// deleted conversation's actor stays stopped and answers `not_found`.
#[test]
fn eviction_and_deletion_race_posting() {
    use parley::conversation::messages::Update;
    use parley::conversation::NewConversation;
    use parley::ids::TenantId;

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config_with(None);
    cfg.server.idle_timeout_secs = 1;
    let system = actix_web::rt::System::new();
    system.block_on(async move {
        let store = parley::store::Store::open(dir.path()).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let handle = parley::app::start(cfg, listener, store).unwrap();
        let state = handle.state().clone();
        let registry = &state.registry;
        let tenant = TenantId("local".into());
        let new = || NewConversation {
            model: Some("mock".into()),
            ..NewConversation::default()
        };
        let idle_stops = || {
            let text = state.metrics.render();
            text.lines()
                .find_map(|l| {
                    l.strip_prefix("parley_conversation_idle_stops_total ")?
                        .parse::<u64>()
                        .ok()
                })
                .unwrap_or(0)
        };
        let wait_for_idle_stops = |n: u64| async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while idle_stops() < n {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the actor never idled out"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };

        // Held across an idle stop: the same actor serves, and stays the registry's.
        let kept = registry.create(&tenant, new()).await.unwrap();
        let live = registry.get(&kept.id, &tenant).unwrap();
        wait_for_idle_stops(1).await;
        let update = Update {
            tools: None,
            tool_choice: None,
        };
        let rec = live.addr.send(update).await.unwrap().unwrap();
        assert_eq!(rec.id, kept.id);
        assert!(registry.peek(&kept.id).is_some_and(|a| a == live.addr));
        assert_eq!(registry.live(), 1);

        // Not held: the idle actor ends, and the next caller gets a fresh one from storage.
        drop(live);
        wait_for_idle_stops(2).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while registry.live() != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the idle actor did not end"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let again = registry.get(&kept.id, &tenant).unwrap();
        let update = Update {
            tools: None,
            tool_choice: None,
        };
        assert!(again.addr.send(update).await.unwrap().is_ok());

        // Deleted while held: the actor stays stopped and says so.
        let doomed = registry.create(&tenant, new()).await.unwrap();
        let live = registry.get(&doomed.id, &tenant).unwrap();
        registry.delete(&doomed.id, &tenant).await.unwrap();
        let update = Update {
            tools: None,
            tool_choice: None,
        };
        match live.addr.send(update).await {
            Ok(Err(e)) => assert_eq!(e.code, parley::error::ErrorCode::NotFound),
            Ok(Ok(_)) => panic!("a deleted conversation was updated"),
            Err(_) => {} // the mailbox closed: nothing was served either
        }
        assert!(registry.get(&doomed.id, &tenant).is_err());
        handle.shutdown().await.unwrap();
    });
}
