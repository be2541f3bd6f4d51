use super::*;
use crate::cluster::redis::{Redis, Timeouts};
use crate::cluster::testing::TestRedis;

/// What keeps a test's store alive: its directory, and its Redis if it has one.
struct Held(
    #[allow(dead_code)] tempfile::TempDir,
    #[allow(dead_code)] Option<TestRedis>,
);

/// The same empty store on each backend: sled in a directory, and Redis.
fn backends() -> Vec<(Held, Store)> {
    let dir = tempfile::tempdir().unwrap(); // ok: test code
    let sled = Store::open(dir.path()).unwrap(); // ok: test code
    let redis = TestRedis::start().unwrap(); // ok: test code
    let rdir = tempfile::tempdir().unwrap(); // ok: test code
    let conn = Redis::connect(&redis.url(), "parley:", Timeouts::default()).unwrap(); // ok: test code
    let on_redis = Store::open_redis(&conn, rdir.path()).unwrap(); // ok: test code
    vec![(Held(dir, None), sled), (Held(rdir, Some(redis)), on_redis)]
}

/// Opens a store that another handle of this process has just let go of. sled's last handle
/// can drop while one of sled's IO threads still holds the directory's lock for the moment it
/// takes to finish its write (seen once in a full run: `could not acquire lock`); a new process
/// never meets this, so the test waits for the lock, up to 10 s, without holding up this
/// runtime's other tasks (one of them may be what still holds the store).
async fn reopen(dir: &std::path::Path) -> Store {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match Store::open(dir) {
            Err(StoreError::Sled(sled::Error::Io(e)))
                if e.to_string().contains("lock") && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            other => return other.unwrap(), // ok: test code
        }
    }
}

fn conv(store_tenant: &str) -> ConversationRecord {
    ConversationRecord {
        id: ConversationId::generate(),
        tenant: TenantId(store_tenant.into()),
        model: "mock".into(),
        system: Some("be brief".into()),
        system_tokens: 2,
        prompt: None,
        metadata: serde_json::json!({"k": 1}),
        created_at: 1,
        last_seq: 0,
        history_tokens: 0,
        memory: Default::default(),
        tools: Vec::new(),
        tool_choice: None,
    }
}

fn msg(seq: u64, role: Role, client_id: Option<&str>) -> MessageRecord {
    MessageRecord {
        seq,
        role,
        content: format!("message {seq}"),
        created_at: 2,
        client_id: client_id.map(str::to_owned),
        finish_reason: None,
        tokens: 3,
        reply: None,
        flags: Vec::new(),
        ..MessageRecord::default()
    }
}

#[tokio::test]
async fn appends_in_seq_order_and_indexes_client_ids() {
    for (_held, store) in backends() {
        let c = conv("t");
        store.create_conversation(&c).await.unwrap(); // ok: test code
        store
            .append_message(&c.id, &msg(1, Role::User, Some("a")))
            .await
            .unwrap(); // ok: test code
        store
            .append_message(&c.id, &msg(2, Role::Assistant, None))
            .await
            .unwrap(); // ok: test code
        let err = store
            .append_message(&c.id, &msg(2, Role::User, Some("b")))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::SeqConflict {
                    expected: 3,
                    got: 2,
                    ..
                }
            ),
            "{err}"
        );

        assert_eq!(store.conversation(&c.id).unwrap().unwrap().last_seq, 2); // ok: test code
        assert_eq!(store.seq_for_client_id(&c.id, "a").unwrap(), Some(1)); // ok: test code
        assert_eq!(store.seq_for_client_id(&c.id, "b").unwrap(), None); // ok: test code
        let after: Vec<u64> = store
            .messages_after(&c.id, 0, 10)
            .unwrap() // ok: test code
            .iter()
            .map(|m| m.seq)
            .collect();
        assert_eq!(after, [1, 2]);
        let newest: Vec<u64> = store
            .messages_newest_first(&c.id)
            .map(|m| m.unwrap().seq) // ok: test code
            .collect();
        assert_eq!(newest, [2, 1]);
    }
}

#[tokio::test]
async fn conversations_are_scoped_and_deleted_whole() {
    for (_held, store) in backends() {
        let (a, b) = (conv("t1"), conv("t1"));
        for c in [&a, &b] {
            store.create_conversation(c).await.unwrap(); // ok: test code
            store
                .append_message(&c.id, &msg(1, Role::User, Some("x")))
                .await
                .unwrap(); // ok: test code
        }
        assert!(store
            .owned_conversation(&a.id, &TenantId("t2".into()))
            .is_err());
        store.delete_conversation(&a.id).await.unwrap(); // ok: test code
        assert!(store.conversation(&a.id).unwrap().is_none()); // ok: test code
        assert!(store.messages_after(&a.id, 0, 10).unwrap().is_empty()); // ok: test code
        assert_eq!(store.seq_for_client_id(&a.id, "x").unwrap(), None); // ok: test code
                                                                        // The neighbour is untouched.
        assert_eq!(store.messages_after(&b.id, 0, 10).unwrap().len(), 1); // ok: test code
    }
}

#[tokio::test]
async fn survives_reopen() {
    let dir = tempfile::tempdir().unwrap(); // ok: test code
    let c = conv("t");
    {
        let store = Store::open(dir.path()).unwrap(); // ok: test code
        store.create_conversation(&c).await.unwrap(); // ok: test code
        store
            .append_message(&c.id, &msg(1, Role::User, Some("a")))
            .await
            .unwrap(); // ok: test code
                       // A flush round runs as its own task and holds the database (and its directory lock)
                       // until it ends: wait for it, as shutdown does.
        store.idle().await;
    }
    let store = reopen(dir.path()).await;
    assert_eq!(
        store.messages_after(&c.id, 0, 10).unwrap()[0].content, // ok: test code
        "message 1"
    );
}

#[tokio::test]
async fn conversations_stored_before_the_listing_index_are_indexed_at_open() {
    let dir = tempfile::tempdir().unwrap(); // ok: test code
    let (a, b) = (conv("t"), conv("t"));
    {
        let store = Store::open(dir.path()).unwrap(); // ok: test code
        store.create_conversation(&a).await.unwrap(); // ok: test code
        store.create_conversation(&b).await.unwrap(); // ok: test code
        store.create_conversation(&conv("other")).await.unwrap(); // ok: test code
                                                                  // As a store of an earlier version left it: no index.
        store.conversations_by_tenant.clear().unwrap(); // ok: test code
        store.flush().await.unwrap(); // ok: test code
        store.idle().await;
    }
    let store = reopen(dir.path()).await;
    let tenant = crate::ids::TenantId("t".into());
    let (page, more) = store.list_conversations(&tenant, None, 10).unwrap(); // ok: test code
    let mut ids: Vec<_> = page.iter().map(|c| c.id.clone()).collect();
    ids.sort_by(|x, y| x.as_str().cmp(y.as_str()));
    let mut want = vec![a.id.clone(), b.id.clone()];
    want.sort_by(|x, y| x.as_str().cmp(y.as_str()));
    assert_eq!(ids, want);
    assert!(!more);
    let (first, more) = store.list_conversations(&tenant, None, 1).unwrap(); // ok: test code
    assert!(more);
    let (rest, more) = store
        .list_conversations(&tenant, Some(&first[0].id), 1)
        .unwrap(); // ok: test code
    assert!(!more);
    assert_ne!(rest[0].id, first[0].id);
}

#[tokio::test]
async fn keys_round_trip_and_revoke() {
    for (_held, store) in backends() {
        let rec = KeyRecord {
            id: "key_1".into(),
            tenant: TenantId("acme".into()),
            rpm: Some(60),
            tpm: None,
            daily_tokens: None,
            models: None,
            monthly_tokens: None,
            monthly_spend: None,
            regions: None,
            window: None,
            pii: None,
            cache: None,
            prefix: "ab12".into(),
            created_at: 0,
        };
        store.put_key("h1", &rec).await.unwrap(); // ok: test code
        assert_eq!(store.key_by_hash("h1").unwrap().unwrap().tenant.0, "acme"); // ok: test code
        assert_eq!(store.list_keys().unwrap().len(), 1); // ok: test code
        assert!(store.delete_key("key_1").await.unwrap()); // ok: test code
        assert!(!store.delete_key("key_1").await.unwrap()); // ok: test code
        assert!(store.key_by_hash("h1").unwrap().is_none()); // ok: test code
    }
}

/// A store on each backend holding one conversation.
async fn with_conversation() -> Vec<(Held, Store, ConversationRecord)> {
    let mut out = Vec::new();
    for (held, store) in backends() {
        let c = conv("t");
        store.create_conversation(&c).await.unwrap(); // ok: test code
        out.push((held, store, c));
    }
    out
}

async fn append(store: &Store, c: &ConversationRecord, m: &MessageRecord) {
    store.append_message(&c.id, m).await.unwrap(); // ok: test code
}

#[tokio::test]
async fn an_append_cut_short_is_completed() {
    for (_held, store, c) in with_conversation().await {
        append(&store, &c, &msg(1, Role::User, Some("a"))).await;
        // A crash after the message of seq 2 was written, before its index entry and header.
        let cut = encode(&msg(2, Role::User, Some("b"))).unwrap(); // ok: test code
        let key = message_key(&c.id, 2);
        store.messages.insert(key.as_slice(), cut).unwrap(); // ok: test code
        assert_eq!(store.conversation(&c.id).unwrap().unwrap().last_seq, 1); // ok: test code
        let rec = store.repair_tail(&c.id).unwrap().unwrap(); // ok: test code
        assert_eq!(rec.last_seq, 2);
        assert_eq!(rec.history_tokens, 2 * (3 + 4));
        assert_eq!(store.conversation(&c.id).unwrap().unwrap().last_seq, 2); // ok: test code
        assert_eq!(store.seq_for_client_id(&c.id, "b").unwrap(), Some(2)); // ok: test code

        // Whole again: the next append follows it, and a second repair changes nothing.
        append(&store, &c, &msg(3, Role::Assistant, None)).await;
        assert_eq!(store.repair_tail(&c.id).unwrap().unwrap().last_seq, 3); // ok: test code
    }
}

#[tokio::test]
async fn an_append_sees_a_header_changed_meanwhile() {
    for (_held, store, c) in with_conversation().await {
        store
            .update_conversation(&c.id, |r| r.tool_choice = None)
            .await
            .unwrap(); // ok: test code
        append(&store, &c, &msg(1, Role::User, Some("a"))).await;
        store.delete_conversation(&c.id).await.unwrap(); // ok: test code
        let err = store
            .append_message(&c.id, &msg(2, Role::Assistant, None))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NoConversation(_)));
        assert!(store.messages_after(&c.id, 0, 10).unwrap().is_empty()); // ok: test code
    }
}

#[tokio::test]
async fn redis_keeps_what_it_acknowledged_across_a_restart() {
    let mut redis = TestRedis::start().unwrap(); // ok: test code
    let dir = tempfile::tempdir().unwrap(); // ok: test code
    let conn = Redis::connect(&redis.url(), "parley:", Timeouts::default()).unwrap(); // ok: test code
    let store = Store::open_redis(&conn, dir.path()).unwrap(); // ok: test code
    let c = conv("t");
    store.create_conversation(&c).await.unwrap(); // ok: test code
    append(&store, &c, &msg(1, Role::User, Some("a"))).await;
    // Killed, not shut down: what it answered is in its append-only file.
    redis.restart().unwrap(); // ok: test code
    let mut read = store.messages_after(&c.id, 0, 10);
    for _ in 0..50 {
        // The first call after the restart may find a pooled connection closed.
        if read.is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        read = store.messages_after(&c.id, 0, 10);
    }
    let read = read.unwrap(); // ok: test code
    assert_eq!(read.len(), 1);
    assert_eq!(store.seq_for_client_id(&c.id, "a").unwrap(), Some(1)); // ok: test code
}

#[tokio::test]
async fn redis_down_is_unavailable_at_once_and_heals() {
    let mut redis = TestRedis::start().unwrap(); // ok: test code
    let dir = tempfile::tempdir().unwrap(); // ok: test code
    let conn = Redis::connect(&redis.url(), "parley:", Timeouts::default()).unwrap(); // ok: test code
    let store = Store::open_redis(&conn, dir.path()).unwrap(); // ok: test code
    let c = conv("t");
    store.create_conversation(&c).await.unwrap(); // ok: test code
    redis.stop();
    let err = store.conversation(&c.id).unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    assert_eq!(err.code(), ErrorCode::UpstreamUnavailable);
    // While it is down, calls fail without waiting for a timeout.
    let t = std::time::Instant::now();
    assert!(store.conversation(&c.id).is_err());
    assert!(
        t.elapsed() < std::time::Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );
    assert!(!conn.is_up());
    redis.restart().unwrap(); // ok: test code
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while store.conversation(&c.id).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "Redis back, store still failing"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(conn.is_up());
}

#[test]
fn redis_scans_run_both_ways_across_pages() {
    let redis = TestRedis::start().unwrap(); // ok: test code
    let conn = Redis::connect(&redis.url(), "parley:", Timeouts::default()).unwrap(); // ok: test code
    let tree = kv::Tree::Redis(kv::RedisTree::new(&conn, "scan"));
    let keys: Vec<[u8; 3]> = (0u16..700)
        .map(|i| [b'a', (i >> 8) as u8, i as u8])
        .collect();
    let mut batch = Batch::default();
    for k in &keys {
        batch.insert(k, k);
    }
    batch.insert(b"b", b"other prefix");
    tree.apply_batch(batch).unwrap(); // ok: test code
    let fwd: Vec<Vec<u8>> = tree
        .scan_prefix(b"a")
        .keys()
        .map(|k| k.unwrap().to_vec()) // ok: test code
        .collect(); // ok: test code
    assert_eq!(fwd, keys.iter().map(|k| k.to_vec()).collect::<Vec<_>>());
    let back: Vec<Vec<u8>> = tree
        .scan_prefix(b"a")
        .keys()
        .rev()
        .map(|k| k.unwrap().to_vec()) // ok: test code
        .collect(); // ok: test code
    assert_eq!(back.len(), 700);
    assert_eq!(back.first().map(Vec::as_slice), Some(keys[699].as_slice()));
    // Both ends at once meet in the middle, each entry once.
    let mut it = tree.scan_prefix(b"a");
    let mut seen = Vec::new();
    loop {
        let (f, b) = (it.next(), it.next_back());
        if f.is_none() && b.is_none() {
            break;
        }
        seen.extend(f.into_iter().chain(b).map(|kv| kv.unwrap().0.to_vec())); // ok: test code
    }
    seen.sort();
    assert_eq!(seen.len(), 700);
    seen.dedup();
    assert_eq!(seen.len(), 700);
    let mid: Vec<Vec<u8>> = tree
        .range(keys[10].to_vec()..=keys[20].to_vec())
        .keys()
        .map(|k| k.unwrap().to_vec()) // ok: test code
        .collect();
    assert_eq!(mid.len(), 11);
    assert_eq!(tree.len().unwrap(), 701); // ok: test code
    assert_eq!(
        tree.compare_and_swap(b"b", Some(b"x"), Some(b"y")).unwrap(), // ok: test code
        Err(kv::Conflict)
    ); // ok: test code
    assert_eq!(
        tree.compare_and_swap(b"b", Some(b"other prefix"), None::<&[u8]>)
            .unwrap(), // ok: test code
        Ok(())
    ); // ok: test code
    assert_eq!(tree.get(b"b").unwrap(), None); // ok: test code
    assert_eq!(
        tree.compare_and_swap(b"b", None::<&[u8]>, Some(b"new"))
            .unwrap(), // ok: test code
        Ok(())
    ); // ok: test code
    assert_eq!(tree.remove(b"b").unwrap().as_deref(), Some(&b"new"[..])); // ok: test code
}

#[tokio::test]
async fn redis_appends_from_two_nodes_never_overwrite_each_other() {
    let redis = TestRedis::start().unwrap(); // ok: test code
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()); // ok: test code
    let conn = Redis::connect(&redis.url(), "parley:", Timeouts::default()).unwrap(); // ok: test code
    let a = Store::open_redis(&conn, da.path()).unwrap(); // ok: test code
    let b = Store::open_redis(&conn, db.path()).unwrap(); // ok: test code
    let c = conv("t");
    a.create_conversation(&c).await.unwrap(); // ok: test code
    append(&a, &c, &msg(1, Role::User, Some("a1"))).await;
    // Node b appends 2 (a lease moved); node a, remembering the header it wrote, is refused.
    let mut m2 = msg(2, Role::Assistant, None);
    m2.content = "from b".into();
    append(&b, &c, &m2).await;
    let err = a
        .append_message(&c.id, &msg(2, Role::Assistant, None))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::SeqConflict { expected: 3, .. }),
        "{err}"
    );
    // And goes on from what is stored.
    append(&a, &c, &msg(3, Role::User, Some("a3"))).await;
    let stored = a.messages_after(&c.id, 0, 10).unwrap(); // ok: test code
    let seqs: Vec<u64> = stored.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, [1, 2, 3]);
    assert_eq!(stored[1].content, "from b");
    assert_eq!(b.conversation(&c.id).unwrap().unwrap().last_seq, 3); // ok: test code
}

fn ended_job(id: &str, finished_at: i64, webhook_done: Option<bool>) -> JobRecord {
    JobRecord {
        id: id.into(),
        tenant: TenantId("t".into()),
        key_id: None,
        status: JobStatus::Succeeded,
        created_at: finished_at,
        created_ms: finished_at * 1000,
        started_at: Some(finished_at),
        finished_at: Some(finished_at),
        request: JobRequest::Chat {
            body: serde_json::json!({}),
        },
        metadata: serde_json::json!({}),
        result: None,
        error: None,
        attempts: 1,
        claimed_by: None,
        cancel_requested: false,
        webhook: webhook_done.map(|done| WebhookState {
            url: "https://example.com".into(),
            msg_id: "msg".into(),
            deliveries: Vec::new(),
            done,
            first_ms: None,
        }),
        deadline_ms: None,
    }
}

#[tokio::test]
async fn ended_jobs_expire_after_their_retention_unless_still_needed() {
    for (_held, store) in backends() {
        for job in [
            ended_job("job_old", 100, None),
            ended_job("job_new", 10_000, None),
            ended_job("job_old_undelivered", 100, Some(false)),
            ended_job("job_old_delivered", 100, Some(true)),
            ended_job("job_old_kept", 100, None),
        ] {
            store.put_jobs(std::slice::from_ref(&job)).await.unwrap(); // ok: test code
        }
        let gone = store
            .expire_jobs(5_000, |j| j.id == "job_old_kept")
            .unwrap(); // ok: test code
        assert_eq!(gone, 2);
        for (id, there) in [
            ("job_old", false),
            ("job_new", true),
            ("job_old_undelivered", true),
            ("job_old_delivered", false),
            ("job_old_kept", true),
        ] {
            assert_eq!(store.job_raw(id).unwrap().is_some(), there, "{id}"); // ok: test code
        }
        assert_eq!(
            store.tenant_jobs(&TenantId("t".into()), 10).unwrap().len(), // ok: test code
            3
        ); // ok: test code
    }
}

fn job(id: &str) -> JobRecord {
    JobRecord {
        id: id.into(),
        tenant: TenantId("t".into()),
        key_id: None,
        status: JobStatus::Queued,
        created_at: 1,
        created_ms: 1_000,
        started_at: None,
        finished_at: None,
        request: JobRequest::Chat {
            body: serde_json::json!({}),
        },
        metadata: serde_json::Value::Null,
        result: None,
        error: None,
        attempts: 0,
        claimed_by: None,
        cancel_requested: false,
        webhook: None,
        deadline_ms: None,
    }
}

/// Moves job `id` from what is stored to `status` on `node`.
async fn set(store: &Store, id: &str, status: JobStatus, node: Option<&str>) {
    let (rec, raw) = store.job_raw(id).unwrap().unwrap(); // ok: test code
    let mut next = rec;
    next.status = status;
    next.claimed_by = node.map(str::to_owned);
    assert!(store.swap_job(&raw, &next).await.unwrap()); // ok: test code
}

#[tokio::test]
async fn running_jobs_are_found_by_node_through_their_index() {
    for (_held, store) in backends() {
        store
            .put_jobs(&[job("job_a"), job("job_b"), job("job_c")])
            .await
            .unwrap(); // ok: test code
        set(&store, "job_a", JobStatus::Running, Some("n1")).await;
        set(&store, "job_b", JobStatus::Running, Some("n2")).await;
        set(&store, "job_c", JobStatus::Running, Some("n1")).await;
        set(&store, "job_c", JobStatus::Succeeded, Some("n1")).await;
        let mut on_n1 = store.running_jobs(|n| n == "n1").unwrap(); // ok: test code
        on_n1.sort();
        assert_eq!(on_n1, vec!["job_a".to_owned()]);
        // Updated while it runs (a cancel asked): its entry stays.
        set(&store, "job_a", JobStatus::Running, Some("n1")).await;
        assert!(store
            .jobs_running
            .contains_key(jobs::running_key("n1", "job_a"))
            .unwrap()); // ok: test code
                        // Queued again: no longer running anywhere.
        set(&store, "job_b", JobStatus::Queued, None).await;
        assert!(store.running_jobs(|_| true).unwrap().len() == 1); // ok: test code

        // Entries a binary without the index never wrote: a process's first read builds the
        // index from the jobs (a new process is a new flag).
        store.jobs_running.clear().unwrap(); // ok: test code
        assert!(store.running_jobs(|_| true).unwrap().is_empty()); // ok: test code
        store
            .running_indexed
            .store(false, std::sync::atomic::Ordering::Release);
        let mut all = store.running_jobs(|_| true).unwrap(); // ok: test code
        all.sort();
        assert_eq!(all, vec!["job_a".to_owned()]);
        // A stale entry (its job moved on without the index) is dropped.
        store
            .jobs_running
            .insert(jobs::running_key("n2", "job_c"), [])
            .unwrap(); // ok: test code
        let on_n2 = store.running_jobs(|n| n == "n2").unwrap(); // ok: test code
        assert_eq!(on_n2, Vec::<String>::new());
        assert!(!store
            .jobs_running
            .contains_key(jobs::running_key("n2", "job_c"))
            .unwrap()); // ok: test code
    }
}
