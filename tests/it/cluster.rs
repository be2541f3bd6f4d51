//! Cluster mode (PROTOCOL §9): one real `redis-server` and three `parley serve` processes on
//! loopback ports, against the real mock upstream.

use std::time::{Duration, Instant};

use parley::cluster::testing::TestRedis;
use serde_json::{json, Value};

use crate::common::{http, Behaviour, BinServer, MockUpstream, Ws};

const LEASE_MS: u64 = 1_500;

struct Cluster {
    redis: TestRedis,
    nodes: Vec<BinServer>,
    _dirs: Vec<tempfile::TempDir>,
}

fn config(redis: &TestRedis, node: usize, upstream: &MockUpstream) -> String {
    format!(
        "[cluster]\nredis_url = \"{}\"\nnode_id = \"node-{node}\"\nlease_ms = {LEASE_MS}\n\n\
         [[providers]]\nname = \"up\"\nkind = \"openai\"\nbase_url = \"{}\"\ntimeout_secs = 10\n\n\
         [[routes]]\nmodel = \"up\"\ntargets = [{{ provider = \"up\", model = \"mock-1\" }}]\n",
        redis.url(),
        upstream.base_url()
    )
}

impl Cluster {
    fn start(n: usize, upstream: &MockUpstream, envs: &[(&str, &str)]) -> Self {
        let redis = TestRedis::start().unwrap();
        let mut nodes = Vec::new();
        let mut dirs = Vec::new();
        for i in 1..=n {
            let dir = tempfile::tempdir().unwrap();
            nodes.push(BinServer::start(
                &config(&redis, i, upstream),
                dir.path(),
                envs,
            ));
            dirs.push(dir);
        }
        Self {
            redis,
            nodes,
            _dirs: dirs,
        }
    }

    fn ws_url(&self, node: usize) -> String {
        format!("ws://{}/v1/ws", self.nodes[node].addr)
    }

    async fn ws(&self, node: usize) -> Ws {
        Ws::try_connect_url(&self.ws_url(node)).await.unwrap()
    }
}

async fn create(node: &BinServer) -> String {
    let resp = http()
        .post(node.url("/v1/conversations"))
        .json(&json!({"model": "up"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let v: Value = resp.json().await.unwrap();
    v["id"].as_str().unwrap().to_owned()
}

/// The frames of one conversation a socket saw, in order, until `done` of reply `seq`.
async fn until_done(ws: &mut Ws, seq: u64) -> Vec<Value> {
    ws.recv_until(|f| f["type"] == "done" && f["seq"] == seq)
        .await
}

/// Checks that `frames` are exactly: ack `user`, deltas, done `user + 1`, with the deltas
/// spelling the stored reply.
fn one_turn(frames: &[Value], user: u64, stored: &str) {
    let kinds: Vec<&str> = frames.iter().filter_map(|f| f["type"].as_str()).collect();
    assert_eq!(kinds.first(), Some(&"ack"), "{frames:?}");
    assert_eq!(frames[0]["seq"], user, "{frames:?}");
    assert!(
        kinds[1..kinds.len() - 1].iter().all(|k| *k == "delta"),
        "{kinds:?}"
    );
    let done = frames.last().unwrap();
    assert_eq!(done["type"], "done");
    assert_eq!(done["seq"], user + 1);
    let text: String = frames
        .iter()
        .filter(|f| f["type"] == "delta")
        .filter_map(|f| f["text"].as_str())
        .collect();
    assert_eq!(text, stored);
}

#[tokio::test]
async fn three_nodes_serve_one_conversation() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let c = Cluster::start(3, &up, &[]);
    let conv = create(&c.nodes[0]).await;

    // Watched from all three nodes.
    let mut watchers = Vec::new();
    for node in 0..3 {
        let mut ws = c.ws(node).await;
        ws.send(json!({"type": "subscribe", "conversation": conv}))
            .await;
        let f = ws.recv().await;
        assert_eq!(f["type"], "subscribed", "node {node}: {f}");
        watchers.push(ws);
    }
    // Written from nodes 2 and 3, in turn.
    let mut writer2 = c.ws(1).await;
    writer2
        .send(json!({"type": "user_message", "conversation": conv, "client_id": "m1", "content": "hello from two"}))
        .await;
    let w2 = until_done(&mut writer2, 2).await;
    let mut writer3 = c.ws(2).await;
    writer3
        .send(json!({"type": "user_message", "conversation": conv, "client_id": "m2", "content": "hello from three"}))
        .await;
    let w3 = until_done(&mut writer3, 4).await;

    let stored = c.nodes[2].messages(&conv).await;
    assert_eq!(stored.len(), 4, "{stored:?}");
    let seqs: Vec<u64> = stored.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [1, 2, 3, 4]);
    let reply = |i: usize| stored[i]["content"].as_str().unwrap().to_owned();
    one_turn(&w2, 1, &reply(1));
    assert_eq!(w3[0]["seq"], 3);
    // Every watcher on every node saw both turns, once each, in order.
    for ws in &mut watchers {
        let first = until_done(ws, 2).await;
        one_turn(&first, 1, &reply(1));
        let second = until_done(ws, 4).await;
        one_turn(&second, 3, &reply(3));
        ws.assert_silent(Duration::from_millis(200)).await;
    }

    // A client id is idempotent service-wide: resent to another node, nothing is appended.
    let mut again = c.ws(0).await;
    again
        .send(json!({"type": "user_message", "conversation": conv, "client_id": "m1", "content": "hello from two"}))
        .await;
    let f = again.recv().await;
    assert_eq!(
        (f["type"].as_str(), f["seq"].as_u64()),
        (Some("ack"), Some(1)),
        "{f}"
    );
    assert_eq!(c.nodes[1].messages(&conv).await.len(), 4);

    // Replay on yet another socket and node.
    let mut late = c.ws(2).await;
    late.send(json!({"type": "subscribe", "conversation": conv, "after_seq": 0}))
        .await;
    let frames = late
        .recv_until(|f| f["type"] == "message" && f["seq"] == 4)
        .await;
    let replayed: Vec<u64> = frames
        .iter()
        .filter(|f| f["type"] == "message")
        .map(|f| f["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(replayed, [1, 2, 3, 4]);

    // REST from a node that does not run it (relayed to the one that does).
    let resp = http()
        .post(c.nodes[1].url(&format!("/v1/conversations/{conv}/messages")))
        .json(&json!({"content": "over rest", "client_id": "r1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["message"]["seq"], 6, "{v}");
    // Deleted through a third node: gone for all.
    let resp = http()
        .delete(c.nodes[2].url(&format!("/v1/conversations/{conv}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    for node in &c.nodes {
        let resp = http()
            .get(node.url(&format!("/v1/conversations/{conv}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404);
    }
}

/// Whether the node running `conv` has checkpointed part of a reply in Redis.
fn checkpointed(redis: &TestRedis, conv: &str) -> bool {
    let client = redis::Client::open(redis.url()).unwrap();
    let Ok(mut conn) = client.get_connection() else {
        return false;
    };
    redis::cmd("HEXISTS")
        .arg("parley:t:partials:v")
        .arg(conv)
        .query::<bool>(&mut conn)
        .unwrap_or(false)
}

#[tokio::test]
async fn a_dead_owner_is_taken_over_and_its_streaming_turn_interrupted() {
    // Slow replies: the owner dies while one streams.
    let up = MockUpstream::spawn(Behaviour {
        tokens_per_sec: 40.0,
        ..Behaviour::default()
    })
    .unwrap();
    let mut c = Cluster::start(3, &up, &[]);
    let conv = create(&c.nodes[0]).await;
    // Node 1 runs it: its own socket starts the turn.
    let mut owner_ws = c.ws(0).await;
    owner_ws
        .send(json!({"type": "user_message", "conversation": conv, "client_id": "long", "content": "tell me a long story please"}))
        .await;
    let ack = owner_ws.recv().await;
    assert_eq!(ack["type"], "ack", "{ack}");
    // Watchers on the other two nodes.
    let mut watchers = Vec::new();
    for node in 1..3 {
        let mut ws = c.ws(node).await;
        ws.send(json!({"type": "subscribe", "conversation": conv}))
            .await;
        assert_eq!(ws.recv().await["type"], "subscribed");
        watchers.push(ws);
    }
    let mut seen = vec![String::new(); 2];
    for (i, ws) in watchers.iter_mut().enumerate() {
        let f = ws.recv().await;
        assert_eq!(f["type"], "delta", "{f}");
        seen[i].push_str(f["text"].as_str().unwrap());
    }
    assert!(
        crate::common::wait_until(Duration::from_secs(5), || checkpointed(&c.redis, &conv)).await,
        "no checkpoint of the streaming reply"
    );
    c.nodes[0].kill9();
    let killed = Instant::now();

    // Every watcher hears the turn end interrupted.
    for (i, ws) in watchers.iter_mut().enumerate() {
        let frames = ws
            .recv_until(|f| f["type"] == "error" || f["type"] == "done")
            .await;
        let end = frames.last().unwrap();
        assert_eq!(end["type"], "error", "{frames:?}");
        assert_eq!(end["code"], "upstream_interrupted", "{end}");
        assert_eq!(end["reply_to"], 1);
        for f in &frames {
            if f["type"] == "delta" {
                seen[i].push_str(f["text"].as_str().unwrap());
            }
        }
    }

    // The conversation goes on elsewhere: a turn from node 2 is served within the lease time.
    let mut writer = c.ws(1).await;
    writer
        .send(json!({"type": "user_message", "conversation": conv, "client_id": "next", "content": "are you there"}))
        .await;
    let frames = writer
        .recv_until(|f| f["type"] == "done" || f["type"] == "error")
        .await;
    let takeover = killed.elapsed();
    assert_eq!(frames.last().unwrap()["type"], "done", "{frames:?}");
    assert!(
        takeover < Duration::from_millis(LEASE_MS) + Duration::from_secs(3),
        "took {takeover:?}"
    );
    eprintln!("takeover: first turn after kill -9 answered in {takeover:?} (lease {LEASE_MS} ms)");

    // Nothing acked lost; the interrupted reply kept what was checkpointed (a prefix of what
    // the watchers saw), and the turn was not run again.
    let stored = c.nodes[2].messages(&conv).await;
    let roles: Vec<&str> = stored.iter().filter_map(|m| m["role"].as_str()).collect();
    assert_eq!(
        roles,
        ["user", "assistant", "user", "assistant"],
        "{stored:?}"
    );
    assert_eq!(stored[0]["client_id"], "long");
    assert_eq!(stored[1]["finish_reason"], "interrupted");
    let partial = stored[1]["content"].as_str().unwrap();
    assert!(!partial.is_empty(), "the checkpointed text was not stored");
    // The mock's reply is known: the stored part is its beginning, and the watchers (who
    // joined mid-reply) saw a stretch of it.
    let full = crate::common::mock_reply(0, &[("user", "tell me a long story please")]);
    assert!(
        full.starts_with(partial),
        "stored {partial:?} does not begin {full:?}"
    );
    assert!(
        partial.len() < full.len(),
        "the whole reply was stored as interrupted"
    );
    for s in &seen {
        assert!(
            full.contains(s.as_str()),
            "watched {s:?} is not part of {full:?}"
        );
    }
    assert_eq!(stored[2]["client_id"], "next");
}

#[tokio::test]
async fn an_idle_owner_killed_loses_nothing() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let mut c = Cluster::start(2, &up, &[]);
    let conv = create(&c.nodes[0]).await;
    let mut ws = c.ws(0).await;
    let frames = ws.turn(&conv, "a", "first").await;
    assert_eq!(frames.last().unwrap()["type"], "done");
    c.nodes[0].kill9();
    let killed = Instant::now();
    let mut other = c.ws(1).await;
    let frames = other.turn(&conv, "b", "second").await;
    assert_eq!(frames.last().unwrap()["type"], "done", "{frames:?}");
    eprintln!(
        "takeover of an idle conversation: {:?} (lease {LEASE_MS} ms)",
        killed.elapsed()
    );
    let stored = c.nodes[1].messages(&conv).await;
    assert_eq!(stored.len(), 4, "{stored:?}");
}

#[tokio::test]
async fn redis_away_is_503_and_service_resumes() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let mut c = Cluster::start(1, &up, &[]);
    let conv = create(&c.nodes[0]).await;
    let mut ws = c.ws(0).await;
    assert_eq!(
        ws.turn(&conv, "a", "before").await.last().unwrap()["type"],
        "done"
    );

    c.redis.stop();
    let resp = http()
        .post(c.nodes[0].url("/v1/conversations"))
        .json(&json!({"model": "up"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upstream_unavailable", "{v}");
    let ready = http().get(c.nodes[0].url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    // The socket stays open and answers with an error frame.
    ws.send(json!({"type": "create", "client_id": "x", "model": "up"}))
        .await;
    let f = ws.recv().await;
    assert_eq!(f["type"], "error", "{f}");
    assert_eq!(f["code"], "upstream_unavailable");

    c.redis.restart().unwrap();
    let node = &c.nodes[0];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ready = http().get(node.url("/readyz")).send().await.unwrap();
        if ready.status() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not ready again after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let frames = ws.turn(&conv, "b", "after").await;
    assert_eq!(frames.last().unwrap()["type"], "done", "{frames:?}");
    // What was acked before the outage is still there.
    assert_eq!(node.messages(&conv).await.len(), 4);
}

#[tokio::test]
async fn a_key_revoked_on_one_node_is_refused_on_all() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    // Every node reads the admin key from the same variable, in its own environment.
    let c = Cluster::start(2, &up, &[("PARLEY_ADMIN_KEY", "adm-cluster-secret")]);
    let v = admin_key(&c.nodes[0], json!({"tenant": "acme"})).await;
    let (id, key) = (v["id"].as_str().unwrap(), v["key"].as_str().unwrap());
    // Known on node 2 (and remembered there).
    let models = http()
        .get(c.nodes[1].url("/v1/models"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 200);
    let url = format!("{}?access_token={key}", c.ws_url(1));
    let mut ws = Ws::try_connect_url(&url).await.unwrap();
    let resp = http()
        .delete(c.nodes[0].url(&format!("/admin/keys/{id}")))
        .bearer_auth("adm-cluster-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(ws.close_code(Duration::from_secs(5)).await, Some(1008));
    let models = http()
        .get(c.nodes[1].url("/v1/models"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 401);
}

/// Creates a key through a node's admin API (admin key `adm-cluster-secret`); answers the
/// created key's JSON (`id`, `key`, …).
async fn admin_key(node: &BinServer, body: Value) -> Value {
    let resp = http()
        .post(node.url("/admin/keys"))
        .bearer_auth("adm-cluster-secret")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    resp.json().await.unwrap()
}

/// `parley_cache_entries` of a node.
async fn cache_entries(node: &BinServer) -> i64 {
    let text = http()
        .get(node.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("parley_cache_entries "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

async fn ask(node: &BinServer, conv: &str, content: &str) -> Value {
    let resp = http()
        .post(node.url(&format!("/v1/conversations/{conv}/messages")))
        .json(&json!({"content": content, "client_id": "q"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

#[tokio::test]
async fn a_cache_entry_made_on_one_node_hits_on_another() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let c = Cluster::start(3, &up, &[]);
    let first = create(&c.nodes[0]).await;
    let v = ask(&c.nodes[0], &first, "Who wrote Hamlet?").await;
    assert_eq!(v["cached"], false);
    let stored = Instant::now();
    let learned = async {
        while cache_entries(&c.nodes[2]).await < 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), learned)
        .await
        .expect("node 3's index never learned of node 1's entry");
    let took = stored.elapsed();
    eprintln!("node 3 indexed node 1's cache entry {took:?} after it was stored");
    assert!(took < Duration::from_secs(1), "took {took:?}");

    let second = create(&c.nodes[2]).await;
    let v = ask(&c.nodes[2], &second, "Who wrote Hamlet?").await;
    assert_eq!(v["cached"], true, "{v}");
    assert_eq!(up.requests(), 1);

    // Its conversation deleted (through node 2): no node serves the entry any more.
    let resp = http()
        .delete(c.nodes[1].url(&format!("/v1/conversations/{first}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let third = create(&c.nodes[2]).await;
    let v = ask(&c.nodes[2], &third, "Who wrote Hamlet?").await;
    assert_eq!(v["cached"], false, "{v}");
    assert_eq!(up.requests(), 2);
}

#[tokio::test]
async fn a_key_rate_limit_adds_up_across_three_nodes() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let c = Cluster::start(3, &up, &[("PARLEY_ADMIN_KEY", "adm-cluster-secret")]);
    let v = admin_key(
        &c.nodes[0],
        json!({"tenant": "acme", "rpm": 60, "window": "sliding", "daily_tokens": 1_000_000}),
    )
    .await;
    let key = v["key"].as_str().unwrap().to_owned();
    // 120 requests, forty through each node, at once.
    let mut tasks = Vec::new();
    for i in 0..120 {
        let url = c.nodes[i % 3].url("/v1/chat/completions");
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            http()
                .post(url)
                .bearer_auth(key)
                .json(&json!({"model": "up", "messages": [{"role": "user", "content": format!("count {i}")}]}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    // A sliding window admits exactly its limit in any minute, whichever node counts.
    assert_eq!(admitted, 60, "{statuses:?}");
    assert_eq!(limited, 60, "{statuses:?}");
}

#[tokio::test]
async fn a_daily_budget_spent_across_nodes_is_never_overrun() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let c = Cluster::start(3, &up, &[("PARLEY_ADMIN_KEY", "adm-cluster-secret")]);
    let budget = 2_000u64;
    let v = admin_key(
        &c.nodes[0],
        json!({"tenant": "acme", "daily_tokens": budget}),
    )
    .await;
    let key = v["key"].as_str().unwrap().to_owned();
    let mut tasks = Vec::new();
    for i in 0..60 {
        let url = c.nodes[i % 3].url("/v1/chat/completions");
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let resp = http()
                .post(url)
                .bearer_auth(key)
                .json(&json!({"model": "up", "max_tokens": 50, "messages": [{"role": "user", "content": format!("spend some tokens {i}")}]}))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            (status, v["usage"]["total_tokens"].as_u64().unwrap_or(0))
        }));
    }
    let mut spent = 0;
    let mut refused = 0;
    for t in tasks {
        let (status, tokens) = t.await.unwrap();
        match status {
            200 => spent += tokens,
            429 => refused += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(refused > 0, "the budget was never reached ({spent} tokens)");
    assert!(spent <= budget, "spent {spent} of a {budget} budget");
}

#[tokio::test]
async fn a_response_continued_on_another_node_runs_where_its_conversation_does() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let c = Cluster::start(2, &up, &[]);
    let post = |node: usize, body: Value| {
        let url = c.nodes[node].url("/v1/responses");
        async move {
            let resp = http().post(url).json(&body).send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap())
        }
    };
    let (status, first) = post(0, json!({"model": "up", "input": "My name is Ada."})).await;
    assert_eq!(status, 200, "{first}");
    let (status, second) = post(
        1,
        json!({"model": "up", "input": "What is my name?", "previous_response_id": first["id"]}),
    )
    .await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["status"], "completed", "{second}");
    // One conversation, both turns in it.
    let (status, third) = post(
        1,
        json!({"model": "up", "input": "And again?", "previous_response_id": second["id"]}),
    )
    .await;
    assert_eq!(status, 200, "{third}");
    let conv = first["conversation"]["id"]
        .as_str()
        .or(first["conversation"].as_str())
        .map(str::to_owned);
    if let Some(conv) = conv {
        assert_eq!(c.nodes[1].messages(&conv).await.len(), 6);
    }
}

/// What one driver of `redis_stopped_and_restarted_under_traffic` saw.
#[derive(Default)]
struct Seen {
    /// client id → acked seq.
    acked: Vec<(String, u64)>,
    /// reply seq → its deltas.
    replies: Vec<(u64, String)>,
    codes: Vec<String>,
    done_after_restart: usize,
}

/// Sends turn after turn until `stop`; a message refused before its ack is sent again (same
/// client id), as the protocol asks of a client.
async fn drive(
    url: String,
    conv: String,
    seen: std::sync::Arc<parking_lot::Mutex<Seen>>,
    restarted: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering;
    let mut ws = Ws::try_connect_url(&url).await.unwrap();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let cid = format!("t{n}");
        ws.send(json!({"type": "user_message", "conversation": conv, "client_id": cid, "content": format!("turn {n}")}))
            .await;
        let mut acked = None;
        let mut text = String::new();
        loop {
            let f = ws.recv().await;
            match f["type"].as_str() {
                Some("ack") if f["client_id"] == cid.as_str() => {
                    let seq = f["seq"].as_u64().unwrap();
                    acked = Some(seq);
                    seen.lock().acked.push((cid.clone(), seq));
                }
                Some("delta") => text.push_str(f["text"].as_str().unwrap_or("")),
                Some("done") => {
                    let mut s = seen.lock();
                    s.replies.push((f["seq"].as_u64().unwrap(), text.clone()));
                    if restarted.load(Ordering::Relaxed) {
                        s.done_after_restart += 1;
                    }
                    n += 1;
                    break;
                }
                Some("error") => {
                    seen.lock()
                        .codes
                        .push(f["code"].as_str().unwrap_or("").to_owned());
                    if acked.is_some() {
                        // The reply could not be stored: the turn ended; go on.
                        n += 1;
                    } else {
                        // Not stored: sent again shortly, same client id.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    break;
                }
                _ => {}
            }
        }
    }
}

#[tokio::test]
async fn redis_stopped_and_restarted_under_traffic_loses_nothing_acked() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let mut c = Cluster::start(1, &up, &[]);
    let restarted = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut drivers = Vec::new();
    let mut seen = Vec::new();
    let mut convs = Vec::new();
    for _ in 0..3 {
        let conv = create(&c.nodes[0]).await;
        let s = Arc::new(parking_lot::Mutex::new(Seen::default()));
        drivers.push(tokio::spawn(drive(
            c.ws_url(0),
            conv.clone(),
            s.clone(),
            restarted.clone(),
            stop.clone(),
        )));
        seen.push(s);
        convs.push(conv);
    }
    let all = |f: &dyn Fn(&Seen) -> bool| seen.iter().all(|s| f(&s.lock()));
    assert!(
        crate::common::wait_until(Duration::from_secs(10), || all(&|s| s.replies.len() >= 3)).await
    );
    c.redis.stop();
    // Every driver hears that storage is away.
    assert!(
        crate::common::wait_until(Duration::from_secs(10), || all(&|s| s
            .codes
            .iter()
            .any(|c| c == "upstream_unavailable")))
        .await,
        "no upstream_unavailable while Redis was down"
    );
    c.redis.restart().unwrap();
    restarted.store(true, Ordering::Relaxed);
    assert!(
        crate::common::wait_until(Duration::from_secs(15), || all(
            &|s| s.done_after_restart >= 3
        ))
        .await,
        "service did not resume after Redis came back"
    );
    stop.store(true, Ordering::Relaxed);
    for d in drivers {
        d.await.unwrap();
    }
    for (conv, s) in convs.iter().zip(&seen) {
        let stored = c.nodes[0].messages(conv).await;
        let s = s.lock();
        for code in &s.codes {
            assert!(
                code == "upstream_unavailable" || code == "upstream_interrupted",
                "unexpected error {code}"
            );
        }
        // Every acked message is there under its seq and client id, and history alternates.
        for (cid, seq) in &s.acked {
            let m = stored
                .iter()
                .find(|m| m["seq"] == *seq)
                .unwrap_or_else(|| panic!("acked {cid} lost"));
            assert_eq!(m["client_id"], cid.as_str());
        }
        for (i, m) in stored.iter().enumerate() {
            let want = if i % 2 == 0 { "user" } else { "assistant" };
            assert_eq!(m["role"], want, "{conv}: {stored:?}");
        }
        // Every reply announced done is stored as its deltas spelled it.
        for (seq, text) in &s.replies {
            let m = stored.iter().find(|m| m["seq"] == *seq).unwrap();
            assert_eq!(m["content"], text.as_str());
        }
    }
}

#[tokio::test]
async fn jobs_of_a_dead_node_are_run_by_another() {
    let up = MockUpstream::spawn(Behaviour {
        ttft: Duration::from_millis(300),
        ..Behaviour::default()
    })
    .unwrap();
    let mut c = Cluster::start(2, &up, &[]);
    let mut ids = Vec::new();
    for i in 0..12 {
        let resp = http()
            .post(c.nodes[0].url("/v1/jobs"))
            .json(&json!({"request": {"model": "up", "messages": [{"role": "user", "content": format!("clustered job {i}")}]}}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202);
        let v: Value = resp.json().await.unwrap();
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    assert!(crate::common::wait_until(Duration::from_secs(5), || up.requests() >= 3).await);
    c.nodes[0].kill9();
    let base = format!("http://{}", c.nodes[1].addr);
    for id in &ids {
        let v = crate::jobs::ended(&base, id).await;
        assert_eq!(v["status"], "succeeded", "{v}");
    }
}

#[tokio::test]
async fn turn_jobs_run_on_the_node_that_runs_their_conversation() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let c = Cluster::start(3, &up, &[]);
    let conv = create(&c.nodes[0]).await;
    // A turn on node 1 makes it the conversation's owner.
    let resp = http()
        .post(c.nodes[0].url(&format!("/v1/conversations/{conv}/messages")))
        .json(&json!({"content": "first"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Turn jobs handed to the other nodes: whichever node's worker sees them, they run on
    // node 1 and none fails for running elsewhere.
    let mut ids = Vec::new();
    for i in 0..6 {
        let node = &c.nodes[1 + i % 2];
        let resp = http()
            .post(node.url("/v1/jobs"))
            .json(&json!({"conversation": conv, "content": format!("job turn {i}"), "client_id": format!("job-{i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202);
        let v: Value = resp.json().await.unwrap();
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    let base = format!("http://{}", c.nodes[2].addr);
    for id in &ids {
        let v = crate::jobs::ended(&base, id).await;
        assert_eq!(v["status"], "succeeded", "{v}");
        assert_eq!(v["attempts"], 1, "{v}");
    }
    let stored = c.nodes[0].messages(&conv).await;
    assert_eq!(stored.len(), 14, "{stored:?}");
}
