//! Two providers' limits sharing one real `redis-server` stand for the same provider on two
//! nodes.

use super::*;
use crate::cluster::redis::Timeouts;
use crate::cluster::testing::TestRedis;
use crate::domain::Usage;
use crate::error::ErrorCode;
use crate::provider::ProviderActor;

fn limits(redis: &TestRedis, toml: &str) -> Arc<Limits> {
    let cfg: ProviderConfig = toml::from_str(toml).unwrap(); // ok: test code
    let redis = Redis::connect(&redis.url(), "test:", Timeouts::default()).unwrap(); // ok: test code
    let http = crate::provider::http::builder().build().unwrap(); // ok: test code
    ProviderActor::build(&cfg, http, |_| None, Some(redis)).limits()
}

/// Takes slots from both nodes on four threads; answers how many were granted and how long
/// it took.
fn hammer(nodes: &[Arc<Limits>], tokens: u32, attempts: usize) -> (usize, Duration) {
    let begun = Instant::now();
    let granted = std::thread::scope(|s| {
        let handles: Vec<_> = nodes
            .iter()
            .flat_map(|n| [n, n])
            .map(|n| s.spawn(move || (0..attempts).filter(|_| n.pick(tokens).is_ok()).count()))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap()) // ok: test code
            .sum::<usize>()
    });
    (granted, begun.elapsed())
}

#[test]
fn deployment_rpm_adds_up_across_nodes() {
    let redis = TestRedis::start().unwrap(); // ok: test code
    let cfg = "name = \"p\"\nkind = \"mock\"\nrpm = 60\n";
    let nodes = [limits(&redis, cfg), limits(&redis, cfg)];
    let (granted, elapsed) = hammer(&nodes, 1, 50);
    // A full bucket of 60, refilled at one a second while the attempts ran.
    let refill = elapsed.as_secs_f64().ceil() as usize;
    assert!(
        granted >= 60 && granted <= 60 + refill,
        "{granted} in {elapsed:?}"
    );
    match nodes[0].pick(1) {
        Err(Refusal::Full(wait)) => assert!(wait <= Duration::from_secs(1), "{wait:?}"),
        other => panic!("expected a full bucket, got {:?}", other.map(|(i, _)| i)),
    }
    // Both nodes see the shared levels.
    let info = |n: &Limits| {
        let mut infos = vec![n.deployments.lock()[0].info(0, Instant::now())];
        n.shared.as_ref().unwrap().describe(&mut infos); // ok: test code
        infos.remove(0)
    };
    let (a, b) = (info(&nodes[0]), info(&nodes[1]));
    assert_eq!(a.rpm_capacity, 60.0);
    assert!(
        a.rpm_available < 2.0 && b.rpm_available < 2.0,
        "{a:?} {b:?}"
    );
}

#[test]
fn deployment_tpm_is_shared_and_corrected_by_real_usage() {
    let redis = TestRedis::start().unwrap(); // ok: test code
    let cfg = "name = \"p\"\nkind = \"mock\"\ntpm = 6000\n";
    let nodes = [limits(&redis, cfg), limits(&redis, cfg)];
    let (i, _) = nodes[0].pick(4000).unwrap(); // ok: test code
    assert!(nodes[1].pick(4000).is_err());
    // The reply used 1000 of the 4000 held: 3000 come back, for the other node too.
    let done = Outcome::Succeeded {
        usage: Some(Usage::new(600, 400)),
        ttft: Duration::from_millis(5),
    };
    nodes[0].finish(i, 4000, &done, RateHeaders::default());
    nodes[1].pick(4000).unwrap(); // ok: test code
                                  // The upstream says 10 tokens remain: nobody gets 100 now.
    let hinted = RateHeaders {
        remaining_tokens: Some(10),
        ..RateHeaders::default()
    };
    nodes[1].finish(i, 0, &Outcome::Abandoned, hinted);
    assert!(nodes[0].pick(100).is_err());
}

#[test]
fn redis_down_refuses_at_once_with_upstream_unavailable_and_recovers() {
    let mut redis = TestRedis::start().unwrap(); // ok: test code
    let node = limits(&redis, "name = \"p\"\nkind = \"mock\"\nrpm = 600\n");
    node.pick(1).unwrap(); // ok: test code
    redis.stop();
    let begun = Instant::now();
    assert!(matches!(node.pick(1), Err(Refusal::Unreachable)));
    assert!(matches!(node.pick(1), Err(Refusal::Unreachable)));
    assert!(
        begun.elapsed() < Duration::from_secs(3),
        "{:?}",
        begun.elapsed()
    );
    assert_eq!(node.unreachable().code(), ErrorCode::UpstreamUnavailable);
    redis.restart().unwrap(); // ok: test code
    let deadline = Instant::now() + Duration::from_secs(10);
    while node.pick(1).is_err() {
        assert!(
            Instant::now() < deadline,
            "still refused after Redis came back"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
