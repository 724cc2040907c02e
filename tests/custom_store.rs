//! A store written outside tollgate, with only the public API: a wrapper that reads each
//! answer through `Outcome`'s getters and reports its own `StoreStats`, shared through an
//! `Arc`. (A store written from scratch is the `Store` trait's doc example.)

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{counting_service, Body};
use http::{Request, StatusCode};
use tollgate::{
    Clock, Identity, ManualClock, MemoryStore, Outcome, RateLimitConfig, RateLimitLayer, Store,
    StoreFuture, StoreRequest, StoreStats,
};
use tower::ServiceExt;

/// The memory store's answers, recorded, with a count of its own in its stats.
#[derive(Debug, Default)]
struct Recording {
    inner: MemoryStore,
    seen: Mutex<Vec<Outcome>>,
}

impl Store for Recording {
    fn check(&self, request: &StoreRequest<'_>) -> StoreFuture {
        let StoreFuture::Ready(answer) = self.inner.check(request) else {
            unreachable!("the memory store answers at once")
        };
        if let Ok(outcomes) = &answer {
            self.seen.lock().unwrap().extend(outcomes.iter().copied());
        }
        StoreFuture::Ready(answer)
    }

    fn stats(&self) -> StoreStats {
        // A store outside tollgate sets the fields it counts on the default.
        let mut stats = self.inner.stats();
        stats.fallback_answers = self.seen.lock().unwrap().len() as u64;
        stats
    }
}

fn alice() -> Request<Body> {
    let mut req = Request::new(Body::new());
    req.extensions_mut().insert(Identity::user("alice"));
    req
}

#[tokio::test]
async fn a_wrapper_reads_every_answer_and_its_stats_reach_the_layer() {
    let store = Arc::new(Recording::default());
    let clock = ManualClock::new();
    let cfg = RateLimitConfig::from_toml_str("by_user = \"2/m\"").unwrap();
    // The layer holds a clone of the `Arc`: `Arc<T>` is a store.
    let layer = RateLimitLayer::with_store(cfg, store.clone()).with_clock(clock.clone());
    let (svc, calls) = counting_service(layer.clone());
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(svc.clone().oneshot(alice()).await.unwrap().status());
    }
    assert_eq!(
        got,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);

    let seen = store.seen.lock().unwrap().clone();
    let now = clock.now_micros();
    // The memory store's window starts at the first request and the clock stood still.
    let window_left = Duration::from_secs(60);
    let summary: Vec<_> = seen
        .iter()
        .map(|o| {
            (
                o.is_allowed(),
                o.remaining(),
                o.reset_after(),
                o.retry_after(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (true, 1, window_left, None),
            (true, 0, window_left, None),
            (false, 0, window_left, Some(window_left)),
        ]
    );
    for o in &seen {
        assert_eq!(o.reset_at_micros(), Some(now + 60_000_000));
    }
    assert_eq!(layer.stats().fallback_answers, 3);
}

#[test]
fn outcomes_read_back_what_they_were_built_from() {
    let allowed = Outcome::allowed(3, Duration::from_millis(2_500));
    assert!(allowed.is_allowed());
    assert_eq!(
        (
            allowed.remaining(),
            allowed.reset_after(),
            allowed.retry_after()
        ),
        (3, Duration::from_millis(2_500), None)
    );
    assert_eq!(allowed.reset_at_micros(), None);
    assert_eq!(allowed.with_reset_at_micros(42).reset_at_micros(), Some(42));

    // A rejection always names a wait, however short.
    let rejected = Outcome::rejected(Duration::from_secs(5), Duration::ZERO);
    assert!(!rejected.is_allowed());
    assert_eq!(rejected.remaining(), 0);
    assert_eq!(rejected.retry_after(), Some(Duration::from_micros(1)));
}
