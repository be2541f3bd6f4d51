//! The scripts against a real `redis-server`.

use super::*;
use crate::cluster::redis::Timeouts;
use crate::cluster::testing::TestRedis;

fn shared(redis: &TestRedis) -> SharedLimits {
    let redis = Redis::connect(&redis.url(), "t:", Timeouts::default()).unwrap(); // ok: test code
    SharedLimits::new(redis)
}

#[test]
fn a_window_gives_back_only_to_its_own_grant() {
    let redis = TestRedis::start().unwrap(); // ok: test code
    let s = shared(&redis);
    let w = s.key_limiter("k", "tpm", Counting::Sliding, 100);
    let first = s.take(&[(&w, 60)]).unwrap().unwrap(); // ok: test code
    s.take(&[(&w, 40)]).unwrap().unwrap(); // ok: test code
    assert_eq!(s.take(&[(&w, 1)]).unwrap().unwrap_err().index, 0); // ok: test code
    let give_back = |delta: i64, entry: &str| {
        let a = Adjustment {
            limiter: &w,
            lower_to: None,
            delta,
            entry,
        };
        s.adjust(&[a]).unwrap(); // ok: test code
    };
    // The first used 20 of its 60; giving back more than it holds frees only what it holds.
    give_back(40, &first[0].entry);
    give_back(1000, &first[0].entry);
    let again = s.take(&[(&w, 60)]).unwrap().unwrap(); // ok: test code
    assert_eq!(again[0].counted, 60);
    assert!(s.take(&[(&w, 1)]).unwrap().is_err()); // ok: test code
                                                   // An unknown entry gives nothing back; more use than reserved is counted.
    give_back(10, "0:0");
    assert!(s.take(&[(&w, 1)]).unwrap().is_err()); // ok: test code
}

#[test]
fn buckets_take_all_or_nothing_and_follow_upstream_hints() {
    let redis = TestRedis::start().unwrap(); // ok: test code
    let s = shared(&redis);
    let rpm = s.deployment_limiter("p", 0, "rpm", 600);
    let tpm = s.deployment_limiter("p", 0, "tpm", 6000);
    s.take(&[(&rpm, 1), (&tpm, 5000)]).unwrap().unwrap(); // ok: test code
                                                          // The tokens do not fit: the request is not counted either.
    let refused = s.take(&[(&rpm, 1), (&tpm, 5000)]).unwrap().unwrap_err(); // ok: test code
    assert_eq!(refused.index, 1);
    assert!(refused.wait > Duration::from_secs(30) && refused.wait <= Duration::from_secs(40));
    let levels = s.levels(&[&rpm, &tpm]).unwrap(); // ok: test code
    assert!((599.0..=600.0).contains(&levels[0]), "{levels:?}");
    assert!((1000.0..1100.0).contains(&levels[1]), "{levels:?}");
    // The upstream says 3 requests remain; then a reply used 4000 fewer tokens than held.
    let lower = Adjustment {
        limiter: &rpm,
        lower_to: Some(3.0),
        delta: 0,
        entry: "",
    };
    let give = Adjustment {
        limiter: &tpm,
        lower_to: None,
        delta: 4000,
        entry: "",
    };
    s.adjust(&[lower, give]).unwrap(); // ok: test code
    let levels = s.levels(&[&rpm, &tpm]).unwrap(); // ok: test code
    assert!((3.0..4.0).contains(&levels[0]), "{levels:?}");
    assert!((5000.0..5100.0).contains(&levels[1]), "{levels:?}");
    // Unlimited takes nothing and always grants.
    let free = s.deployment_limiter("p", 1, "rpm", 0);
    for _ in 0..5 {
        assert_eq!(s.take(&[(&free, 1)]).unwrap().unwrap()[0].counted, 0); // ok: test code
    }
}
