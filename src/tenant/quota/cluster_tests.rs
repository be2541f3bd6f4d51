//! The governor in cluster mode against a real `redis-server`: two governors sharing one Redis
//! stand for two nodes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::cluster::redis::Timeouts;
use crate::cluster::testing::TestRedis;
use crate::ids::TenantId;
use crate::store::UsageRecord;

struct Node {
    _dir: tempfile::TempDir,
    governor: Governor,
}

fn node(redis: &TestRedis) -> Node {
    let dir = tempfile::tempdir().unwrap(); // ok: test code
    let store = Store::open(dir.path()).unwrap(); // ok: test code
    let prices = Prices(HashMap::from([(
        "m".to_owned(),
        Price {
            input_per_mtok: 1e6,
            output_per_mtok: 2e6,
        },
    )]));
    let redis = Redis::connect(&redis.url(), "test:", Timeouts::default()).unwrap(); // ok: test code
    Node {
        _dir: dir,
        governor: Governor::new(store, prices, 100).with_redis(redis),
    }
}

fn principal(rec: KeyRecord) -> Principal {
    Principal {
        tenant: rec.tenant.clone(),
        key_id: Some(rec.id.clone()),
        models: None,
        limits: Some(Arc::new(rec)),
    }
}

fn key(id: &str) -> KeyRecord {
    KeyRecord {
        id: id.into(),
        tenant: TenantId("t".into()),
        rpm: None,
        tpm: None,
        daily_tokens: None,
        models: None,
        monthly_tokens: None,
        monthly_spend: None,
        regions: None,
        window: None,
        pii: None,
        cache: None,
        prefix: String::new(),
        created_at: 0,
    }
}

/// Two threads per node admit `attempts` requests each; answers the reservations granted, the
/// refusals and how long it took.
fn hammer(
    nodes: &[Node],
    p: &Principal,
    model: &str,
    prompt: u32,
    max: u32,
    attempts: usize,
) -> (Vec<Reservation>, Vec<ApiError>, Duration) {
    let begun = Instant::now();
    let results: Vec<Result<Option<Reservation>, ApiError>> = std::thread::scope(|s| {
        let handles: Vec<_> = nodes
            .iter()
            .flat_map(|n| [n, n])
            .map(|n| {
                s.spawn(move || {
                    (0..attempts)
                        .map(|_| n.governor.admit(p, model, prompt, Some(max)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap()) // ok: test code
            .collect()
    });
    let elapsed = begun.elapsed();
    let mut granted = Vec::new();
    let mut refused = Vec::new();
    for r in results {
        match r {
            Ok(r) => granted.push(r.unwrap()), // ok: test code
            Err(e) => refused.push(e),
        }
    }
    (granted, refused, elapsed)
}

fn two_nodes() -> (TestRedis, Vec<Node>) {
    let redis = TestRedis::start().unwrap(); // ok: test code
    let nodes = vec![node(&redis), node(&redis)];
    (redis, nodes)
}

#[test]
fn rpm_bucket_adds_up_across_nodes() {
    let (_redis, nodes) = two_nodes();
    let p = principal(KeyRecord {
        rpm: Some(60),
        ..key("rb")
    });
    let (granted, refused, elapsed) = hammer(&nodes, &p, "x", 1, 1, 50);
    // A full bucket of 60, refilled at one a second while the 200 attempts ran.
    let refill = elapsed.as_secs_f64().ceil() as usize;
    assert!(granted.len() >= 60, "{} granted", granted.len());
    assert!(
        granted.len() <= 60 + refill,
        "{} granted in {elapsed:?}",
        granted.len()
    );
    assert!(refused.iter().all(|e| e.code == ErrorCode::RateLimited));
    assert!(refused[0].retry_after.unwrap() <= Duration::from_secs(1)); // ok: test code
}

#[test]
fn rpm_sliding_window_admits_exactly_the_limit_across_nodes() {
    let (_redis, nodes) = two_nodes();
    let p = principal(KeyRecord {
        rpm: Some(60),
        window: Some(LimitWindow::Sliding),
        ..key("rs")
    });
    let (granted, refused, _) = hammer(&nodes, &p, "x", 1, 1, 50);
    assert_eq!(granted.len(), 60);
    let wait = refused[0].retry_after.unwrap(); // ok: test code
    assert_eq!(refused[0].code, ErrorCode::RateLimited);
    assert!(
        wait > Duration::from_secs(55) && wait <= Duration::from_secs(60),
        "{wait:?}"
    );
    // Requests that reach no model count too.
    assert_eq!(
        nodes[1].governor.take_request(&p).unwrap_err().code, // ok: test code
        ErrorCode::RateLimited
    );
}

#[test]
fn tpm_adds_up_and_settle_gives_back() {
    let (_redis, nodes) = two_nodes();
    // Sliding: 1000 tokens a minute, 50 a request (10 prompt + 40 reply).
    let p = principal(KeyRecord {
        tpm: Some(1000),
        window: Some(LimitWindow::Sliding),
        ..key("ts")
    });
    let (mut granted, refused, _) = hammer(&nodes, &p, "x", 10, 40, 10);
    assert_eq!(granted.len(), 20);
    assert!(refused.iter().all(|e| e.code == ErrorCode::RateLimited));
    // One used nothing: its 50 come back to the window, on the other node too.
    nodes[0].governor.settle(granted.pop().unwrap(), 0, 0.0); // ok: test code
    nodes[1].governor.admit(&p, "x", 10, Some(40)).unwrap(); // ok: test code
    assert!(nodes[0].governor.admit(&p, "x", 10, Some(40)).is_err());

    // Bucket: 600 a minute (10 a second), 300 a request.
    let p = principal(KeyRecord {
        tpm: Some(600),
        ..key("tb")
    });
    let g = |i: usize| &nodes[i].governor;
    let first = g(0).admit(&p, "x", 100, Some(200)).unwrap().unwrap(); // ok: test code
    nodes[1].governor.admit(&p, "x", 100, Some(200)).unwrap(); // ok: test code
    let err = g(0).admit(&p, "x", 100, Some(200)).unwrap_err(); // ok: test code
    assert_eq!(err.code, ErrorCode::RateLimited);
    nodes[0].governor.settle(first, 0, 0.0);
    nodes[1].governor.admit(&p, "x", 100, Some(200)).unwrap(); // ok: test code
}

#[test]
fn daily_budget_is_never_overrun_by_two_nodes() {
    let (_redis, nodes) = two_nodes();
    let p = principal(KeyRecord {
        daily_tokens: Some(10_000),
        ..key("d")
    });
    // 100 tokens a request (10 prompt + 90 reply), 400 attempts for 100 places.
    let (granted, refused, _) = hammer(&nodes, &p, "x", 10, 90, 100);
    let total: u64 = granted.iter().map(|r| r.tokens).sum();
    assert_eq!(total, 10_000);
    assert_eq!(granted.len(), 100);
    assert!(refused.iter().all(|e| e.code == ErrorCode::QuotaExceeded));
    assert!(refused[0].retry_after.is_some());
    // Each used 50: half the budget comes back, and the reply is clamped at its end.
    for (i, r) in granted.into_iter().enumerate() {
        nodes[i % 2].governor.settle(r, 50, 0.0);
    }
    let (granted, _, _) = hammer(&nodes, &p, "x", 10, 90, 30);
    let total: u64 = granted.iter().map(|r| r.tokens).sum();
    assert_eq!(total, 5_000);
    assert_eq!(granted.len(), 50);
    // A prompt that leaves room for a reply of one token is served, clamped.
    for (i, r) in granted.into_iter().enumerate() {
        nodes[i % 2].governor.settle(r, 99, 0.0);
    }
    let r = nodes[0].governor.admit(&p, "x", 40, None).unwrap().unwrap(); // ok: test code
    assert_eq!(r.max_tokens(), Some(10));
}

#[test]
fn monthly_spend_is_never_overrun_by_two_nodes() {
    let (_redis, nodes) = two_nodes();
    // Under model "m" a prompt token costs 1.0 and a reply token 2.0: 3.0 a request.
    let p = principal(KeyRecord {
        monthly_spend: Some(10.0),
        monthly_tokens: Some(1_000_000),
        ..key("s")
    });
    let (mut granted, refused, _) = hammer(&nodes, &p, "m", 1, 1, 20);
    assert_eq!(granted.len(), 3);
    assert!(refused.iter().all(|e| e.code == ErrorCode::QuotaExceeded));
    // One really cost 1.0: 7.0 held, so one more fits (10.0), and then none.
    nodes[1].governor.settle(granted.pop().unwrap(), 2, 1.0); // ok: test code
    nodes[0].governor.admit(&p, "m", 1, Some(1)).unwrap(); // ok: test code
    let err = nodes[1].governor.admit(&p, "m", 1, Some(1)).unwrap_err(); // ok: test code
    assert_eq!(err.code, ErrorCode::QuotaExceeded);
}

#[test]
fn redis_down_answers_unavailable_at_once_and_recovers() {
    let (mut redis, nodes) = two_nodes();
    let p = principal(KeyRecord {
        rpm: Some(1000),
        daily_tokens: Some(1_000_000),
        ..key("down")
    });
    let held = nodes[0].governor.admit(&p, "x", 10, None).unwrap().unwrap(); // ok: test code
    redis.stop();
    for n in &nodes {
        let begun = Instant::now();
        let err = n.governor.admit(&p, "x", 10, None).unwrap_err(); // ok: test code
        assert_eq!(err.code, ErrorCode::UpstreamUnavailable);
        assert!(
            begun.elapsed() < Duration::from_secs(3),
            "{:?}",
            begun.elapsed()
        );
        // Now failing fast.
        let begun = Instant::now();
        let err = n.governor.take_request(&p).unwrap_err(); // ok: test code
        assert_eq!(err.code, ErrorCode::UpstreamUnavailable);
        assert!(begun.elapsed() < Duration::from_millis(100));
    }
    // A settlement that cannot reach Redis is logged, never a panic.
    nodes[0].governor.settle(held, 10, 0.0);
    redis.restart().unwrap(); // ok: test code
    let deadline = Instant::now() + Duration::from_secs(10);
    while nodes[1].governor.admit(&p, "x", 10, None).is_err() {
        assert!(
            Instant::now() < deadline,
            "still refused after Redis came back"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_period_counter_starts_from_the_stored_totals_once() {
    let (_redis, nodes) = two_nodes();
    // Node 0's store has 9000 tokens of today recorded for the key; node 1's has none. The
    // first request seeds the shared counter; the second node must not seed it again.
    let used = UsageRecord {
        ts_ms: chrono::Utc::now().timestamp_millis(),
        tenant: TenantId("t".into()),
        key_id: Some("seeded".into()),
        conversation: None,
        route: "x".into(),
        provider: "p".into(),
        model: "x".into(),
        prompt_tokens: 4000,
        completion_tokens: 5000,
        cached: false,
        latency_ms: 1,
        ttft_ms: None,
        cost: 0.0,
        trimmed_tokens: 0,
        finish_reason: "stop".into(),
        max_tokens_clamped: None,
        saved_tokens: 0,
        saved_cost: 0.0,
        tier: None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap(); // ok: test code
    let records = [used];
    let append = nodes[0].governor.store.append_usage(&records, false);
    runtime.block_on(append).unwrap(); // ok: test code
    let p = principal(KeyRecord {
        daily_tokens: Some(10_000),
        ..key("seeded")
    });
    nodes[0].governor.admit(&p, "x", 10, Some(90)).unwrap(); // ok: test code
    let (granted, _, _) = hammer(&nodes, &p, "x", 10, 90, 10);
    assert_eq!(granted.len(), 9);
}
