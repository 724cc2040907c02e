//! The store gauges (feature `metrics`; ARCHITECTURE.md, "Metrics"): summed over every
//! store in the process and read at most once a second, so this binary holds one test
//! that runs its steps in order: no other test's stores are alive meanwhile.
#![cfg(feature = "metrics")]

mod common;

use std::time::Duration;

use common::counting_service;
use common::metrics::{unlabelled, with_recorder, Recorded};
use http::{Request, StatusCode};
use tollgate::{
    Identity, ManualClock, MemoryStore, RateLimitConfig, RateLimitLayer, Store, StoreFuture,
    StoreRequest, StoreStats,
};
use tower::ServiceExt;

fn config(toml: &str) -> RateLimitConfig {
    RateLimitConfig::from_toml_str(toml).unwrap()
}

async fn send(layer: &RateLimitLayer, user: &str) -> StatusCode {
    let (svc, _) = counting_service(layer.clone());
    let mut req = Request::new(String::new());
    req.extensions_mut().insert(Identity::user(user));
    svc.oneshot(req).await.unwrap().status()
}

/// Each step's clock starts past every earlier one's, so the once-a-second gate (one for
/// the process) opens for it.
fn clock(step: u64) -> ManualClock {
    let clock = ManualClock::new();
    clock.advance(Duration::from_secs(1_000 * step));
    clock
}

/// A store whose `stats` panics.
#[derive(Debug)]
struct BadStats(MemoryStore);

impl Store for BadStats {
    fn check(&self, request: &StoreRequest<'_>) -> StoreFuture {
        self.0.check(request)
    }

    fn stats(&self) -> StoreStats {
        panic!("a bug in a custom store")
    }
}

#[test]
fn the_store_gauges_sum_every_store_of_the_process() {
    let gauge = |r: &Recorded, name| unlabelled(r, name);

    // One memory store of 100 keys, flooded by 300 users: its keys and evictions.
    let recorded = with_recorder(async {
        let clock = clock(1);
        let layer = RateLimitLayer::new(config("by_user = \"5/m\"\n[backend]\nmax_keys = 100"))
            .with_clock(clock.clone());
        for i in 0..300 {
            send(&layer, &format!("user-{i}")).await;
        }
        clock.advance(Duration::from_millis(1_500));
        send(&layer, "alice").await;
    });
    let keys = gauge(&recorded, "tollgate_memory_keys").expect("keys");
    assert!((90.0..=100.0).contains(&keys), "{keys}");
    let evictions = gauge(&recorded, "tollgate_memory_evictions_total").expect("evictions");
    assert!(evictions >= 200.0, "{evictions}");
    assert_eq!(
        gauge(&recorded, "tollgate_fallback_answers_total"),
        Some(0.0)
    );
    assert_eq!(gauge(&recorded, "tollgate_circuit_open"), None);

    // Two layers with stores of their own add up; two layers on clones of one store, and
    // a store whose `stats` panics, change nothing.
    let recorded = with_recorder(async {
        let clock = clock(2);
        let cfg = || config("by_user = \"5/m\"");
        let first = RateLimitLayer::new(cfg()).with_clock(clock.clone());
        let second = RateLimitLayer::new(cfg()).with_clock(clock.clone());
        let shared = MemoryStore::new();
        let third = RateLimitLayer::with_store(cfg(), shared.clone()).with_clock(clock.clone());
        let fourth = RateLimitLayer::with_store(cfg(), shared).with_clock(clock.clone());
        let broken = RateLimitLayer::with_store(cfg(), BadStats(MemoryStore::new()))
            .with_clock(clock.clone());
        for i in 0..10 {
            send(&first, &format!("a-{i}")).await;
        }
        for i in 0..20 {
            send(&second, &format!("b-{i}")).await;
            send(&third, &format!("c-{i}")).await;
            send(&fourth, &format!("c-{i}")).await;
        }
        clock.advance(Duration::from_millis(1_500));
        assert_eq!(send(&broken, "alice").await, StatusCode::OK);
        // The one key the broken store holds is not in the sum (its stats panicked).
        drop((first, second, third, fourth, broken));
    });
    assert_eq!(gauge(&recorded, "tollgate_memory_keys"), Some(50.0));

    // Redis unreachable: the memory fallback answers, and the circuit opens.
    #[cfg(feature = "redis")]
    {
        // A port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let recorded = with_recorder(async move {
            let clock = clock(3);
            let url = format!("redis://127.0.0.1:{port}");
            let cfg = config(&format!(
                "by_user = \"5/m\"\n[backend]\nkind = \"redis\"\nurl = \"{url}\""
            ));
            let layer = RateLimitLayer::new(cfg).with_clock(clock.clone());
            // Each answered by the fallback, which holds the limit of five itself.
            for _ in 0..5 {
                assert_eq!(send(&layer, "alice").await, StatusCode::OK);
            }
            clock.advance(Duration::from_millis(1_500));
            send(&layer, "alice").await;
        });
        let answers = gauge(&recorded, "tollgate_fallback_answers_total").expect("fallback");
        assert!(answers >= 5.0, "{recorded:#?}");
        assert_eq!(gauge(&recorded, "tollgate_circuit_open"), Some(1.0));
        assert_eq!(gauge(&recorded, "tollgate_deny_cache_keys"), Some(0.0));
    }
}
