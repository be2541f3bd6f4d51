//! The semantic cache and recall memory, end to end: the real server, the real mock upstream,
//! and its request counter as the proof of whether a reply came from the cache.

use serde_json::{json, Value};

use crate::common::*;

/// One turn: its deltas' text and its `done` (or `error`) frame.
async fn ask(ws: &mut Ws, conv: &str, client_id: &str, content: &str) -> (String, Value) {
    let frames = ws.turn(conv, client_id, content).await;
    let end = frames.last().unwrap().clone();
    (delta_text(&frames), end)
}

/// Asks `question` in a fresh conversation of `model` and answers whether it was a cache hit,
/// checked both on `done` and on the upstream's request count.
async fn hits(ws: &mut Ws, up: &MockUpstream, model: &str, question: &str) -> bool {
    let conv = ws.create(model).await;
    let before = up.requests();
    let (_, done) = ask(ws, &conv, "q", question).await;
    assert_eq!(done["type"], "done", "{done}");
    let cached = done["cached"].as_bool().unwrap();
    assert_eq!(
        cached,
        up.requests() == before,
        "a hit calls no upstream, a miss calls it once: {done}"
    );
    cached
}

/// Route `up` to `up`, and the cache embedding through provider `emb` (another mock).
fn with_provider_embedder(up: &MockUpstream, emb: &MockUpstream) -> parley::config::Config {
    let mut cfg = config_with(Some(up));
    cfg.providers.push(openai_provider("emb", &emb.base_url()));
    cfg.cache.embedder = "provider:emb/text-embedding-3-small".into();
    cfg
}

fn two_routes(up: &MockUpstream) -> parley::config::Config {
    let mut cfg = config_with(Some(up));
    cfg.routes.push(route("up2", &[("up", "mock-1")]));
    cfg
}

#[tokio::test]
async fn a_reworded_question_hits_with_the_original_reply_and_usage() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(config_with(Some(&up)));
    let mut ws = Ws::connect(&server, None).await;

    let a = ws.create("up").await;
    let (original, first) = ask(&mut ws, &a, "a1", "What is the capital of France?").await;
    assert_eq!(first["type"], "done");
    assert_eq!(first["cached"], false);
    assert_eq!(up.requests(), 1);

    for (i, reworded) in [
        "what's the capital of france",
        "Tell me the capital of France, please.",
        "What is the capital of France",
    ]
    .iter()
    .enumerate()
    {
        let b = ws.create("up").await;
        let (text, done) = ask(&mut ws, &b, &format!("b{i}"), reworded).await;
        assert_eq!(done["type"], "done", "{done}");
        assert_eq!(done["cached"], true, "{reworded}: {done}");
        assert_eq!(text, original, "the hit streams the original reply");
        assert_eq!(
            done["usage"], first["usage"],
            "done reports the original usage"
        );
        assert_eq!(done["provider"], first["provider"]);
        assert_eq!(done["model"], first["model"]);
        assert_eq!(done["finish_reason"], "stop");
        // Stored like any reply, marked cached.
        let stored = messages(&server, None, &b).await;
        assert_eq!(stored.len(), 2);
        assert_eq!(stored[1]["content"], original.as_str());
    }
    assert_eq!(up.requests(), 1, "no hit reached the upstream");

    let metrics = get_text(&server, "/metrics").await;
    assert!(
        metrics.contains("parley_cache_lookups_total{result=\"hit\"} 3"),
        "{metrics}"
    );
    assert!(metrics.contains("parley_cache_entries 1"), "{metrics}");
    assert!(metrics.contains("parley_cache_lookup_seconds_count"));
    let admin = get_json(&server, "/admin/cache").await;
    assert_eq!(admin["entries"], 1, "{admin}");
    assert_eq!(admin["embedder"], "builtin-v2-512");
}

#[tokio::test]
async fn near_misses_are_refused_by_the_guards() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    // A low similarity bar, so the guards alone tell these questions apart.
    let mut cfg = config_with(Some(&up));
    cfg.cache.min_similarity = 0.5;
    let server = TestServer::start(cfg);
    let mut ws = Ws::connect(&server, None).await;
    for (first, second) in [
        (
            "What is the capital of France?",
            "What is the capital of Germany?",
        ),
        ("What is 2 + 2?", "What is 2 + 3?"),
        ("Is ibuprofen safe?", "Is ibuprofen not safe?"),
        ("Convert 100 USD to EUR", "Convert 100 EUR to USD"),
        (
            "When was the Eiffel Tower built?",
            "Where was the Eiffel Tower built?",
        ),
    ] {
        assert!(!hits(&mut ws, &up, "up", first).await, "{first}");
        assert!(
            !hits(&mut ws, &up, "up", second).await,
            "{second} hit {first}"
        );
        // Each is cached itself: asked again, it hits.
        assert!(hits(&mut ws, &up, "up", second).await, "{second} again");
    }
    let metrics = get_text(&server, "/metrics").await;
    for guard in ["entities", "numbers", "negation", "order", "question"] {
        assert!(
            metrics.contains(&format!(
                "parley_cache_near_misses_total{{guard=\"{guard}\"}}"
            )),
            "{guard} not counted: {metrics}"
        );
    }
}

#[tokio::test]
async fn another_model_system_prompt_or_context_misses() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(two_routes(&up));
    let mut ws = Ws::connect(&server, None).await;
    let q = "How do I reverse a string in Rust?";
    assert!(!hits(&mut ws, &up, "up", q).await);
    assert!(hits(&mut ws, &up, "up", q).await);
    // Another route (model).
    assert!(!hits(&mut ws, &up, "up2", q).await);
    // Another temperature.
    let conv = ws.create("up").await;
    let before = up.requests();
    ws.send(
        json!({"type": "user_message", "conversation": conv, "client_id": "t",
                   "content": q, "options": {"temperature": 1.5}}),
    )
    .await;
    let frames = ws.recv_until(|f| is_end_of(f, "t")).await;
    assert_eq!(frames.last().unwrap()["cached"], false);
    assert_eq!(up.requests(), before + 1);

    // Another system prompt.
    let mut by_system = Vec::new();
    for system in ["You are terse.", "You are verbose.", "You are terse."] {
        let conv =
            create_conversation(&server, None, json!({"model": "up", "system": system})).await;
        let before = up.requests();
        let (_, done) = ask(&mut ws, &conv, "s", q).await;
        by_system.push((done["cached"].as_bool().unwrap(), up.requests() - before));
    }
    assert_eq!(by_system, vec![(false, 1), (false, 1), (true, 0)]);

    // Different earlier turns miss; the same earlier turns (the mock answers them alike) hit.
    let mut by_context = Vec::new();
    for earlier in [
        "I am learning Rust.",
        "I am learning Go.",
        "I am learning Rust.",
    ] {
        let conv = ws.create("up").await;
        ask(&mut ws, &conv, "e", earlier).await;
        let before = up.requests();
        let (_, done) = ask(&mut ws, &conv, "q", q).await;
        by_context.push((done["cached"].as_bool().unwrap(), up.requests() - before));
    }
    assert_eq!(by_context, vec![(false, 1), (false, 1), (true, 0)]);
}

#[tokio::test]
async fn tenants_never_share_entries_and_opt_outs_are_honoured() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let mut cfg = config_with(Some(&up));
    cfg.cache.disabled_tenants = vec!["nocache".into()];
    let mut off = route("up-nocache", &[("up", "mock-1")]);
    off.cache = false;
    cfg.routes.push(off);
    let server = TestServer::start_with_admin(cfg);
    let (_, ka) = server.create_key(json!({"tenant": "a"})).await;
    let (_, kb) = server.create_key(json!({"tenant": "b"})).await;
    let (_, ka_off) = server
        .create_key(json!({"tenant": "a", "cache": false}))
        .await;
    let (_, kn) = server.create_key(json!({"tenant": "nocache"})).await;
    let q = "Which planet is the largest?";

    let mut a = Ws::connect(&server, Some(&ka)).await;
    assert!(!hits(&mut a, &up, "up", q).await);
    assert!(hits(&mut a, &up, "up", q).await, "same tenant hits");
    let mut b = Ws::connect(&server, Some(&kb)).await;
    assert!(!hits(&mut b, &up, "up", q).await, "another tenant misses");

    // A key of tenant a that opts out.
    let mut a_off = Ws::connect(&server, Some(&ka_off)).await;
    assert!(!hits(&mut a_off, &up, "up", q).await);
    // A request that opts out.
    let conv = a.create("up").await;
    let before = up.requests();
    a.send(
        json!({"type": "user_message", "conversation": conv, "client_id": "o",
                  "content": q, "options": {"cache": false}}),
    )
    .await;
    let frames = a.recv_until(|f| is_end_of(f, "o")).await;
    assert_eq!(frames.last().unwrap()["cached"], false);
    assert_eq!(up.requests(), before + 1);
    // A route without cache, asked twice.
    assert!(!hits(&mut a, &up, "up-nocache", q).await);
    assert!(!hits(&mut a, &up, "up-nocache", q).await);
    // A tenant without cache, asked twice.
    let mut n = Ws::connect(&server, Some(&kn)).await;
    assert!(!hits(&mut n, &up, "up", q).await);
    assert!(!hits(&mut n, &up, "up", q).await);

    // What the cache saved is attributed to the tenant (records are written in batches).
    let end = std::time::Instant::now() + TIMEOUT;
    let text = loop {
        let usage = get_json_as(&server, "/v1/usage?group_by=model", Some(&ka)).await;
        let text = usage.to_string();
        if text.contains("\"cached_requests\":1") || std::time::Instant::now() > end {
            break text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(text.contains("\"cached_requests\":1"), "{text}");
    assert!(!text.contains("\"saved_tokens\":0,"), "{text}");
}

#[tokio::test]
async fn a_deleted_conversations_entries_never_hit_again() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(config_with(Some(&up)));
    let mut ws = Ws::connect(&server, None).await;
    let q = "What is the boiling point of water at sea level?";
    let conv = ws.create("up").await;
    ask(&mut ws, &conv, "a", q).await;
    assert!(hits(&mut ws, &up, "up", q).await);
    let resp = http()
        .delete(server.url(&format!("/v1/conversations/{conv}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    // The entry came from the deleted conversation; the hit's own conversation made none.
    assert!(!hits(&mut ws, &up, "up", q).await, "deleted entry served");
}

#[tokio::test]
async fn entries_survive_a_restart() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let q = "Name three primary colours.";
    let original = {
        let server = TestServer::start_in(config_with(Some(&up)), tmp.path(), None);
        let mut ws = Ws::connect(&server, None).await;
        let conv = ws.create("up").await;
        let (text, _) = ask(&mut ws, &conv, "a", q).await;
        server.stop();
        text
    };
    let server = TestServer::start_in(config_with(Some(&up)), tmp.path(), None);
    let mut ws = Ws::connect(&server, None).await;
    let conv = ws.create("up").await;
    let before = up.requests();
    let (text, done) = ask(&mut ws, &conv, "b", "name three primary colours").await;
    assert_eq!(done["cached"], true, "{done}");
    assert_eq!(text, original);
    assert_eq!(up.requests(), before);
}

#[tokio::test]
async fn cancelled_and_interrupted_replies_are_never_cached() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(config_with(Some(&up)));
    let mut ws = Ws::connect(&server, None).await;

    // Interrupted: the upstream drops the stream after a few tokens, every time.
    let broken = "Describe the ocean [[mock:drop_after=3,words=30]]";
    for i in 0..2 {
        let conv = ws.create("up").await;
        let before = up.requests();
        let (_, end) = ask(&mut ws, &conv, &format!("i{i}"), broken).await;
        assert_eq!(end["type"], "error", "{end}");
        assert_eq!(end["code"], "upstream_interrupted");
        assert_eq!(
            up.requests(),
            before + 1,
            "an interrupted reply was served from cache"
        );
    }

    // Cancelled after the first delta: the partial reply is stored but not cached.
    let slow = "Describe the mountains [[mock:tps=20,words=40]]";
    let conv = ws.create("up").await;
    ws.send(
        json!({"type": "user_message", "conversation": conv, "client_id": "c", "content": slow}),
    )
    .await;
    ws.recv_until(|f| f["type"] == "delta").await;
    ws.send(json!({"type": "cancel", "conversation": conv}))
        .await;
    let frames = ws.recv_until(|f| is_end_of(f, "c")).await;
    assert_eq!(frames.last().unwrap()["finish_reason"], "cancelled");
    let conv = ws.create("up").await;
    let before = up.requests();
    ws.send(
        json!({"type": "user_message", "conversation": conv, "client_id": "d", "content": slow}),
    )
    .await;
    ws.recv_until(|f| f["type"] == "delta").await;
    assert_eq!(
        up.requests(),
        before + 1,
        "a cancelled reply was served from cache"
    );
    ws.send(json!({"type": "cancel", "conversation": conv}))
        .await;
    ws.recv_until(|f| is_end_of(f, "d")).await;
}

#[tokio::test]
async fn the_rest_api_reports_cached_replies() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(config_with(Some(&up)));
    let mut cached = Vec::new();
    for _ in 0..2 {
        let id = create_conversation(&server, None, json!({"model": "up"})).await;
        let v: Value = http()
            .post(server.url(&format!("/v1/conversations/{id}/messages")))
            .json(&json!({"content": "Who wrote Hamlet?", "client_id": "x"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        cached.push(v["cached"].as_bool().unwrap());
    }
    assert_eq!(cached, vec![false, true]);
    assert_eq!(up.requests(), 1);
}

/// A long conversation whose first turn states a fact: in `recall` mode the fact reaches the
/// upstream long after the window has moved past it; in `window` mode it does not.
#[tokio::test]
async fn recall_memory_brings_back_an_early_fact() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let mut cfg = config_with(Some(&up));
    cfg.context.budget_tokens = 400;
    cfg.context.reserve_output_tokens = 100;
    cfg.context.recall_share = 0.3;
    cfg.cache.enabled = false;
    let server = TestServer::start(cfg);
    let fact = "Please remember this: my locker code is 4417.";
    let mut sent_fact = Vec::new();
    for memory in ["recall", "window"] {
        let id = create_conversation(&server, None, json!({"model": "up", "memory": memory})).await;
        let conv = get_json(&server, &format!("/v1/conversations/{id}")).await;
        assert_eq!(conv["memory"], memory);
        let mut ws = Ws::connect(&server, None).await;
        ask(&mut ws, &id, "fact", &format!("{fact} [[mock:words=5]]")).await;
        for i in 0..12 {
            let filler =
                format!("Tell me something about weather pattern number {i}. [[mock:words=25]]");
            let (_, done) = ask(&mut ws, &id, &format!("f{i}"), &filler).await;
            assert_eq!(done["type"], "done", "{done}");
        }
        let (_, done) = ask(&mut ws, &id, "q", "What is my locker code?").await;
        assert_eq!(done["type"], "done", "{done}");
        let last = up.received().last().unwrap().clone();
        let sent = last["messages"].as_array().unwrap().clone();
        let contents: Vec<&str> = sent
            .iter()
            .map(|m| m["content"].as_str().unwrap())
            .collect();
        assert_eq!(*contents.last().unwrap(), "What is my locker code?");
        // The window alone has long moved past the first turn.
        assert!(
            !contents
                .iter()
                .any(|c| c.contains("weather pattern number 0.")),
            "{memory}: the window still reaches the start"
        );
        sent_fact.push(contents.iter().any(|c| c.contains("locker code is 4417")));
        if memory == "recall" {
            // Recalled turns come first, in order, and whole (the fact and its reply).
            assert!(contents[0].contains("locker code is 4417"), "{contents:?}");
            assert_eq!(sent[0]["role"], "user");
            assert_eq!(sent[1]["role"], "assistant");
            let tokens = done["usage"]["prompt_tokens"].as_u64().unwrap();
            assert!(
                tokens <= 300,
                "prompt of {tokens} tokens exceeds the budget"
            );
        }
        // Stored history is untouched.
        assert_eq!(messages(&server, None, &id).await.len(), 28);
    }
    assert_eq!(sent_fact, vec![true, false]);
}

#[tokio::test]
async fn the_openai_endpoint_shares_the_cache_with_conversations() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(config_with(Some(&up)));
    let mut ws = Ws::connect(&server, None).await;
    let conv =
        create_conversation(&server, None, json!({"model": "up", "system": "Be brief."})).await;
    let (original, _) = ask(&mut ws, &conv, "a", "How far away is the Moon?").await;
    assert_eq!(up.requests(), 1);
    let complete = |stream: bool| {
        http()
            .post(server.url("/v1/chat/completions"))
            .json(&json!({"model": "up", "stream": stream, "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "how far away is the moon"}]}))
            .send()
    };
    let v: Value = complete(false).await.unwrap().json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], original.as_str());
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let body = complete(true).await.unwrap().text().await.unwrap();
    let streamed: String = sse_events(&body)
        .iter()
        .filter(|e| e.data != "[DONE]")
        .filter_map(|e| {
            let v: Value = serde_json::from_str(&e.data).ok()?;
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(streamed, original);
    assert_eq!(
        up.requests(),
        1,
        "both completions were served from the cache"
    );

    // A stateless completion is cached too, for the next one.
    let ask_http = || {
        http()
            .post(server.url("/v1/chat/completions"))
            .json(&json!({"model": "up", "messages": [{"role": "user", "content": "Why do cats purr?"}]}))
            .send()
    };
    ask_http().await.unwrap().text().await.unwrap();
    ask_http().await.unwrap().text().await.unwrap();
    assert_eq!(up.requests(), 2);
}

/// `provider:<name>/<model>`: questions are embedded by the provider's `/v1/embeddings`
/// (through its actor); when that fails, the turn goes upstream as if there were no cache.
#[tokio::test]
async fn a_provider_embedder_embeds_through_the_provider_and_fails_open() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let emb = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(with_provider_embedder(&up, &emb));
    let mut ws = Ws::connect(&server, None).await;
    let q = "What is the tallest mountain on Earth?";
    assert!(!hits(&mut ws, &up, "up", q).await);
    assert!(hits(&mut ws, &up, "up", "what is the tallest mountain on earth?").await);
    let (requests, texts) = emb.embedding_requests();
    assert_eq!((requests, texts), (2, 2), "one embedding per lookup");
    let providers = get_json(&server, "/admin/providers").await;
    let served = providers["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "emb")
        .map(|p| p["deployments"][0]["served"].as_u64().unwrap());
    assert_eq!(served, Some(2), "embeddings go through the provider actor");

    // The embedding provider fails: lookups are skipped, turns still answer, and the chat
    // side of that provider is not held against it.
    emb.set_behaviour(Behaviour {
        error_rate: 1.0,
        ..Behaviour::default()
    });
    let conv = ws.create("up").await;
    let before = up.requests();
    let (_, done) = ask(&mut ws, &conv, "x", q).await;
    assert_eq!(done["type"], "done", "{done}");
    assert_eq!(done["cached"], false);
    assert_eq!(up.requests(), before + 1);
}

/// `local:<dir>`: the sentence transformer in-process catches a rewording the builtin
/// embedder cannot (another sentence shape), at the default threshold, and still refuses
/// another country.
#[cfg(feature = "local-embed")]
#[tokio::test]
async fn a_local_sentence_transformer_catches_deeper_rewordings() {
    let dir = std::env::var("PARLEY_MINILM_DIR").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/target/models/all-minilm-l6-v2"
        )
        .to_owned()
    });
    assert!(
        std::path::Path::new(&dir)
            .join("model.safetensors")
            .is_file(),
        "the local-embed tests need the model (run scripts/test.sh, or set PARLEY_MINILM_DIR)"
    );
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let mut cfg = config_with(Some(&up));
    cfg.cache.embedder = format!("local:{dir}");
    // What is under test is what the model catches, not how fast it embeds: on two cores shared
    // with the rest of the suite, one embedding can take longer than the default 250 ms, and a
    // lookup that slow is skipped (a miss), by design.
    cfg.cache.lookup_timeout_ms = 10_000;
    let server = TestServer::start(cfg);
    let mut ws = Ws::connect(&server, None).await;
    assert!(!hits(&mut ws, &up, "up", "What is the capital of France?").await);
    assert!(hits(&mut ws, &up, "up", "Which city is France's capital?").await);
    assert!(!hits(&mut ws, &up, "up", "Which city is Germany's capital?").await);
}

/// Entries expire after `ttl_secs`, and past `max_entries` the least recently used go (from
/// the index and from storage).
#[tokio::test]
async fn entries_expire_and_the_size_cap_evicts_the_least_recently_used() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let mut cfg = config_with(Some(&up));
    cfg.cache.max_entries = 3;
    let server = TestServer::start(cfg);
    let mut ws = Ws::connect(&server, None).await;
    let qs = [
        "Who discovered penicillin?",
        "What is the largest ocean?",
        "How many legs does a spider have?",
        "What language is spoken in Brazil?",
    ];
    for q in &qs[..3] {
        assert!(!hits(&mut ws, &up, "up", q).await);
    }
    // Use the first again: the second is now the least recently used.
    assert!(hits(&mut ws, &up, "up", qs[0]).await);
    assert!(!hits(&mut ws, &up, "up", qs[3]).await);
    assert!(
        !hits(&mut ws, &up, "up", qs[1]).await,
        "the LRU entry was evicted"
    );
    let metrics = get_text(&server, "/metrics").await;
    assert!(metrics.contains("parley_cache_entries 3"), "{metrics}");
    drop(ws);
    server.stop();

    // Expiry: a one-second time to live.
    let mut cfg = config_with(Some(&up));
    cfg.cache.ttl_secs = 1;
    let server = TestServer::start(cfg);
    let mut ws = Ws::connect(&server, None).await;
    let q = "What is the chemical symbol for gold?";
    assert!(!hits(&mut ws, &up, "up", q).await);
    assert!(hits(&mut ws, &up, "up", q).await);
    // Time itself is the condition here: the entry is older than its time to live.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert!(
        !hits(&mut ws, &up, "up", q).await,
        "an expired entry was served"
    );
}

/// Recall memory embeds each stored message once (kept in storage), not at every turn: with a
/// provider embedder, the texts sent to `/v1/embeddings` grow with the conversation, not with
/// its square, and the cache lookup uses the question's vector recall already has.
#[tokio::test]
async fn recall_memory_embeds_each_message_once() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let emb = MockUpstream::spawn(Behaviour::default()).unwrap();
    let mut cfg = with_provider_embedder(&up, &emb);
    cfg.context.budget_tokens = 300;
    cfg.context.reserve_output_tokens = 100;
    cfg.context.memory = parley::config::MemoryMode::Recall;
    let server = TestServer::start(cfg);
    let id = create_conversation(&server, None, json!({"model": "up"})).await;
    let mut ws = Ws::connect(&server, None).await;
    let turns = 16;
    for i in 0..turns {
        let (_, done) = ask(
            &mut ws,
            &id,
            &format!("t{i}"),
            &format!("Question {i} about the weather. [[mock:words=25]]"),
        )
        .await;
        assert_eq!(done["type"], "done", "{done}");
    }
    let (requests, texts) = emb.embedding_requests();
    // One request a turn: the cache lookup reuses the question's vector from recall.
    assert_eq!(requests, turns, "{texts} texts");
    // At most the question of each turn plus each stored message once.
    assert!(
        texts <= turns + 2 * turns,
        "{texts} texts embedded in {requests} requests"
    );
}

/// A key restricted to regions never has its text embedded by a provider elsewhere: its turns
/// skip the cache.
#[tokio::test]
async fn a_provider_embedder_outside_a_keys_regions_is_not_used() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let emb = MockUpstream::spawn(Behaviour::default()).unwrap();
    let mut cfg = with_provider_embedder(&up, &emb);
    for prov in &mut cfg.providers {
        match prov.name.as_str() {
            "emb" => prov.region = Some("us-east".into()),
            "up" => prov.region = Some("eu-west".into()),
            _ => {}
        }
    }
    let server = TestServer::start_with_admin(cfg);
    let (_, eu) = server
        .create_key(json!({"tenant": "t", "regions": ["eu-west"]}))
        .await;
    let (_, any) = server.create_key(json!({"tenant": "t"})).await;
    let q = "What is the longest river in Africa?";
    let mut ws = Ws::connect(&server, Some(&eu)).await;
    assert!(!hits(&mut ws, &up, "up", q).await);
    assert!(!hits(&mut ws, &up, "up", q).await);
    assert_eq!(
        emb.embedding_requests().0,
        0,
        "an EU-only key's text went to us-east"
    );
    let mut ws = Ws::connect(&server, Some(&any)).await;
    assert!(!hits(&mut ws, &up, "up", q).await);
    assert!(hits(&mut ws, &up, "up", q).await);
    assert_eq!(emb.embedding_requests().0, 2);
}

/// A cached reply longer than a request's `max_tokens` is no answer to it: that request goes
/// upstream, and the entry still serves requests it fits.
#[tokio::test]
async fn a_cached_reply_longer_than_max_tokens_is_not_served() {
    let up = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = TestServer::start(config_with(Some(&up)));
    let mut ws = Ws::connect(&server, None).await;
    let q = "Describe a rainforest. [[mock:words=30]]";
    assert!(!hits(&mut ws, &up, "up", q).await);
    let conv = ws.create("up").await;
    let before = up.requests();
    ws.send(
        json!({"type": "user_message", "conversation": conv, "client_id": "m",
                   "content": q, "options": {"max_tokens": 5}}),
    )
    .await;
    let frames = ws.recv_until(|f| is_end_of(f, "m")).await;
    assert_eq!(frames.last().unwrap()["cached"], false);
    assert_eq!(up.requests(), before + 1);
    assert!(hits(&mut ws, &up, "up", q).await, "the entry still serves");
}

/// The cache on `store`, once its worker has loaded the index.
async fn started_cache(store: &parley::store::Store) -> parley::cache::Cache {
    let settings = parley::cache::CacheSettings {
        enabled: true,
        min_similarity: 0.92,
        ttl: std::time::Duration::from_secs(3600),
        max_entries: 10_000,
        lookup_timeout: std::time::Duration::from_secs(5),
        disabled_tenants: Default::default(),
    };
    let cache = parley::cache::Cache::start(
        settings,
        std::sync::Arc::new(parley::cache::embed::Builtin),
        store.clone(),
        parley::metrics::Metrics::new().unwrap(),
        None,
    )
    .unwrap();
    cache.len().await.unwrap();
    cache
}

/// The entry a question is served from, if any.
async fn served(cache: &parley::cache::Cache, scope: [u8; 16], q: &str) -> Option<(String, f32)> {
    let query = parley::cache::Query {
        key: scope,
        tenant: "t",
        question: q,
        max_tokens: None,
    };
    match cache.lookup(query, None).await.outcome {
        parley::cache::Outcome::Hit(hit) => Some((hit.record.question, hit.similarity)),
        _ => None,
    }
}

#[tokio::test]
async fn a_large_scopes_graph_is_dumped_at_stop_and_restored_at_start() {
    use parley::cache::embed::{cosine, Builtin};
    let tmp = tempfile::tempdir().unwrap();
    let store = parley::store::Store::open(tmp.path()).unwrap();
    let scope = [7u8; 16];
    let question = |i: usize| format!("What is the population of town number {i} in the north?");
    let original = question(6);
    let reworded = "Tell me the population of town number 6 in the north, please.";
    assert!(parley::cache::is_hit(&original, reworded, 0.92));
    let record = |q: String| parley::store::CacheRecord {
        tenant: "t".into(),
        scope: String::new(),
        question: q,
        reply: "an answer".into(),
        usage: parley::store::Usage::new(3, 4),
        provider: "mock".into(),
        model: "mock-1".into(),
        conversation: None,
        created_ms: 0,
        expires_ms: 0,
    };
    // More entries than a scope scans exactly: the scope is a graph.
    let cache = started_cache(&store).await;
    for q in (0..400).map(question) {
        cache.insert(scope, Builtin::vector(&q), record(q));
    }
    assert_eq!(cache.len().await, Some((400, 0)));
    cache.stop().await;
    let dir = store.cache_index_dir().to_owned();
    assert!(dir.join("manifest.json").exists());

    // While it was stopped, an entry left storage: after the start it is a tombstone.
    let gone = store
        .cache_entry_heads()
        .unwrap()
        .into_iter()
        .find(|h| store.cache_entry(h.id).unwrap().unwrap().question == question(5))
        .unwrap();
    store.remove_cache_entries(&[gone.id]).unwrap();
    let cache = started_cache(&store).await;
    assert_eq!(cache.len().await, Some((399, 1)));
    assert_eq!(served(&cache, scope, &question(5)).await, None);
    assert_eq!(
        served(&cache, scope, &question(7)).await.map(|s| s.0),
        Some(question(7))
    );
    // A rewording hits with the exact similarity of the two questions: quantised vectors in
    // the index move no threshold.
    let (q, similarity) = served(&cache, scope, reworded).await.unwrap();
    assert_eq!(q, original);
    assert_eq!(
        similarity,
        cosine(&Builtin::vector(reworded), &Builtin::vector(&original))
    );
    cache.stop().await;

    // A damaged dump: the start rebuilds the graph from storage, and serves as before.
    let graph = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".usearch"))
        .unwrap();
    let mut raw = std::fs::read(&graph).unwrap();
    let middle = raw.len() / 2;
    raw[middle] ^= 0x5a;
    std::fs::write(&graph, raw).unwrap();
    let cache = started_cache(&store).await;
    assert_eq!(cache.len().await, Some((399, 0)));
    assert_eq!(
        served(&cache, scope, &question(7)).await.map(|s| s.0),
        Some(question(7))
    );
    assert_eq!(
        served(&cache, scope, reworded).await.map(|s| s.0),
        Some(original.clone())
    );
    cache.stop().await;
}
