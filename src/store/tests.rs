use super::*;

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
    let dir = tempfile::tempdir().unwrap(); // ok: test code
    let store = Store::open(dir.path()).unwrap(); // ok: test code
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

#[tokio::test]
async fn conversations_are_scoped_and_deleted_whole() {
    let dir = tempfile::tempdir().unwrap(); // ok: test code
    let store = Store::open(dir.path()).unwrap(); // ok: test code
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
    }
    let store = Store::open(dir.path()).unwrap(); // ok: test code
    assert_eq!(
        store.messages_after(&c.id, 0, 10).unwrap()[0].content, // ok: test code
        "message 1"
    );
}

#[tokio::test]
async fn keys_round_trip_and_revoke() {
    let dir = tempfile::tempdir().unwrap(); // ok: test code
    let store = Store::open(dir.path()).unwrap(); // ok: test code
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

/// A store in a fresh directory holding one conversation.
async fn with_conversation() -> (tempfile::TempDir, Store, ConversationRecord) {
    let dir = tempfile::tempdir().unwrap(); // ok: test code
    let store = Store::open(dir.path()).unwrap(); // ok: test code
    let c = conv("t");
    store.create_conversation(&c).await.unwrap(); // ok: test code
    (dir, store, c)
}

async fn append(store: &Store, c: &ConversationRecord, m: &MessageRecord) {
    store.append_message(&c.id, m).await.unwrap(); // ok: test code
}

#[tokio::test]
async fn an_append_cut_short_is_completed() {
    let (_dir, store, c) = with_conversation().await;
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

#[tokio::test]
async fn an_append_sees_a_header_changed_meanwhile() {
    let (_dir, store, c) = with_conversation().await;
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
