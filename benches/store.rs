#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Storage: durable append of one message (three writes + flush) and replay of a conversation.

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use parley::ids::{ConversationId, TenantId};
use parley::store::{ConversationRecord, MessageRecord, Role, Store};

fn record() -> ConversationRecord {
    ConversationRecord {
        id: ConversationId::generate(),
        tenant: TenantId("bench".into()),
        model: "mock".into(),
        system: None,
        system_tokens: 0,
        prompt: None,
        metadata: serde_json::json!({}),
        created_at: 0,
        last_seq: 0,
        history_tokens: 0,
        memory: Default::default(),
        tools: Vec::new(),
        tool_choice: None,
    }
}

fn message(seq: u64) -> MessageRecord {
    MessageRecord {
        seq,
        role: if seq % 2 == 1 {
            Role::User
        } else {
            Role::Assistant
        },
        content: "a message of ordinary length, some sixty characters or so.".repeat(4),
        created_at: 0,
        client_id: (seq % 2 == 1).then(|| format!("c{seq}")),
        finish_reason: None,
        tokens: 48,
        reply: None,
        flags: Vec::new(),
        ..MessageRecord::default()
    }
}

fn bench_append(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let conv = record();
    rt.block_on(store.create_conversation(&conv)).unwrap();
    let mut seq = 0;
    c.bench_function("store/append_durable", |b| {
        b.iter_batched(
            || {
                seq += 1;
                message(seq)
            },
            |m| rt.block_on(store.append_message(&conv.id, &m)).unwrap(),
            BatchSize::SmallInput,
        );
    });
}

fn bench_replay(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut group = c.benchmark_group("store/replay");
    for n in [100u64, 1_000, 10_000] {
        let conv = record();
        rt.block_on(store.create_conversation(&conv)).unwrap();
        for seq in 1..=n {
            rt.block_on(store.append_message(&conv.id, &message(seq)))
                .unwrap();
        }
        group.bench_with_input(BenchmarkId::from_parameter(n), &conv.id, |b, id| {
            b.iter(|| store.messages_after(id, 0, usize::MAX).unwrap().len());
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench_append, bench_replay
}
criterion_main!(benches);
