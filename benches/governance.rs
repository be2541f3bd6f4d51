//! The per-turn cost of governance: key limits and quotas (admit + settle), PII redaction of the
//! outgoing messages and restoration of the reply, injection screening, and the usage record.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use parley::guard::{injection, pii};
use parley::ids::TenantId;
use parley::store::{KeyRecord, Store, UsageRecord};
use parley::tenant::{Governor, Price, Prices, Principal};

const MESSAGE: &str =
    "Hi, I'm Jane (jane.doe@example.com, +44 20 7946 0958). My order 123456789012 \
    from 2024-01-15 was charged twice to card 4111 1111 1111 1111. Could you refund one of the \
    charges to my account GB82 WEST 1234 5698 7654 32 and confirm by e-mail? Thanks a lot!";

fn principal() -> Principal {
    let rec = KeyRecord {
        id: "key_bench".into(),
        tenant: TenantId("acme".into()),
        rpm: Some(u32::MAX),
        tpm: None,
        daily_tokens: Some(u64::MAX / 4),
        models: None,
        monthly_tokens: Some(u64::MAX / 4),
        monthly_spend: Some(1e12),
        regions: None,
        window: None,
        pii: None,
        cache: None,
        prefix: String::new(),
        created_at: 0,
    };
    Principal {
        tenant: rec.tenant.clone(),
        key_id: Some(rec.id.clone()),
        models: None,
        limits: Some(Arc::new(rec)),
    }
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let prices = Prices(HashMap::from([(
        "gpt-4o-mini".to_owned(),
        Price {
            input_per_mtok: 0.15,
            output_per_mtok: 0.6,
        },
    )]));
    let governor = Governor::new(store, prices, 1024);
    let p = principal();
    let reply = "Sure, I refunded <CARD_1> and wrote to <EMAIL_1> to confirm.".to_owned();

    let mut group = c.benchmark_group("governance");
    group.bench_function("limits/admit_settle", |b| {
        b.iter(|| {
            let r = governor
                .admit(&p, "gpt-4o-mini", 900, Some(200))
                .unwrap()
                .unwrap();
            governor.settle(r, 1000, 0.0002);
        });
    });
    group.bench_function("pii/redact_message", |b| {
        b.iter(|| pii::Vault::default().redact(black_box(MESSAGE)));
    });
    group.bench_function("pii/restore_reply", |b| {
        let mut vault = pii::Vault::default();
        vault.redact(MESSAGE);
        b.iter(|| {
            let mut r = pii::Restorer::default();
            let mut out = String::new();
            for word in reply.split_inclusive(' ') {
                out.push_str(&r.push(&vault, word));
            }
            out.push_str(&r.finish(&vault));
            out
        });
    });
    group.bench_function("injection/screen", |b| {
        b.iter(|| injection::screen(black_box(MESSAGE)))
    });
    group.bench_function("turn/all", |b| {
        b.iter(|| {
            let r = governor
                .admit(&p, "gpt-4o-mini", 900, Some(200))
                .unwrap()
                .unwrap();
            let verdict = injection::screen(MESSAGE);
            let mut vault = pii::Vault::default();
            let (redacted, _) = vault.redact(MESSAGE);
            let mut restorer = pii::Restorer::default();
            let mut out = String::new();
            for word in reply.split_inclusive(' ') {
                out.push_str(&restorer.push(&vault, word));
            }
            out.push_str(&restorer.finish(&vault));
            governor.settle(r, 1000, 0.0002);
            let record = UsageRecord {
                ts_ms: 0,
                tenant: p.tenant.clone(),
                key_id: p.key_id.clone(),
                conversation: None,
                route: "default".into(),
                provider: "openai".into(),
                model: "gpt-4o-mini".into(),
                prompt_tokens: 900,
                completion_tokens: 100,
                cached: false,
                latency_ms: 1,
                ttft_ms: Some(1),
                cost: 0.0002,
                trimmed_tokens: 0,
                saved_tokens: 0,
                max_tokens_clamped: None,
                saved_cost: 0.0,
                tier: None,
                finish_reason: "stop".into(),
            };
            black_box((verdict, redacted, out, record))
        });
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
