//! Hot reload (ARCHITECTURE.md, "Hot reload"): `RateLimitLayer::handle().update(cfg)`
//! swaps the rules for every clone at once, a request finishes on the rules it started
//! with, counters survive a change of count, and a change of `[backend]` is refused.

mod common;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{counting_service, Body};
use http::{Request, StatusCode};
use tokio::sync::oneshot;
use tollgate::{
    Identity, ManualClock, MemoryStore, Outcome, Outcomes, RateLimitConfig, RateLimitHandle,
    RateLimitLayer, Store, StoreError, StoreFuture, StoreRequest,
};
use tower::ServiceExt;

fn config(toml: &str) -> RateLimitConfig {
    RateLimitConfig::from_toml_str(toml).expect("a valid config")
}

fn by_user(rate: &str) -> RateLimitConfig {
    config(&format!("by_user = \"{rate}\""))
}

fn user(name: &str) -> Request<Body> {
    let mut req = Request::new(Body::new());
    req.extensions_mut()
        .insert(Identity::new(Some(name.to_owned()), None));
    req
}

async fn status<S>(svc: &S, name: &str) -> StatusCode
where
    S: tower::Service<
            Request<Body>,
            Response = http::Response<tollgate::ResponseBody<Body>>,
            Error = Infallible,
        > + Clone,
{
    svc.clone().oneshot(user(name)).await.unwrap().status()
}

/// Sends requests for `name` until one is refused; returns how many were allowed.
async fn allowed_until_refused<S>(svc: &S, name: &str) -> u32
where
    S: tower::Service<
            Request<Body>,
            Response = http::Response<tollgate::ResponseBody<Body>>,
            Error = Infallible,
        > + Clone,
{
    for allowed in 0..10_000 {
        if status(svc, name).await == StatusCode::TOO_MANY_REQUESTS {
            return allowed;
        }
    }
    panic!("never refused");
}

/// A layer for `cfg` on a fresh manual clock, its reload handle, and a service through it.
fn served(
    cfg: RateLimitConfig,
) -> (
    ManualClock,
    RateLimitHandle,
    impl tower::Service<
            Request<Body>,
            Response = http::Response<tollgate::ResponseBody<Body>>,
            Error = Infallible,
            Future = impl Send,
        > + Clone
        + Send,
) {
    let clock = ManualClock::new();
    let layer = RateLimitLayer::new(cfg).with_clock(clock.clone());
    let handle = layer.handle();
    let (svc, _) = counting_service(layer);
    (clock, handle, svc)
}

#[tokio::test]
async fn a_changed_count_keeps_the_counter_and_holds_from_the_next_request() {
    let (clock, handle, svc) = served(by_user("5/m"));

    assert_eq!(allowed_until_refused(&svc, "alice").await, 5);
    // Raised: the five used stay used, so three more.
    handle.update(by_user("8/m")).unwrap();
    assert_eq!(allowed_until_refused(&svc, "alice").await, 3);
    // Lowered below what is used: refused from the very next request.
    handle.update(by_user("2/m")).unwrap();
    assert_eq!(status(&svc, "alice").await, StatusCode::TOO_MANY_REQUESTS);
    // Another user starts at the new limit.
    assert_eq!(allowed_until_refused(&svc, "bob").await, 2);
    // The window still ends when it did: a minute after the first request.
    clock.advance(Duration::from_secs(60));
    assert_eq!(allowed_until_refused(&svc, "alice").await, 2);
}

#[tokio::test]
async fn a_changed_period_or_algorithm_starts_a_fresh_counter() {
    let (_, handle, svc) = served(by_user("3/m"));
    assert_eq!(allowed_until_refused(&svc, "alice").await, 3);

    handle.update(by_user("3/h")).unwrap();
    assert_eq!(allowed_until_refused(&svc, "alice").await, 3);

    handle
        .update(config("by_user = \"3/h\"\nalgorithm = \"sliding_window\""))
        .unwrap();
    assert_eq!(allowed_until_refused(&svc, "alice").await, 3);

    // Back to the first rule: its counter was never lost, and is still full.
    handle.update(by_user("3/m")).unwrap();
    assert_eq!(status(&svc, "alice").await, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn every_clone_and_every_service_follows_one_handle() {
    let clock = ManualClock::new();
    let layer = RateLimitLayer::new(by_user("1/m")).with_clock(clock.clone());
    // A handle taken before a builder method still reaches the layer it returns.
    let handle = layer.handle();
    let layer = layer.decision_extension(false);
    let (first, _) = counting_service(layer.clone());
    let (second, _) = counting_service(layer);
    assert_eq!(status(&first, "alice").await, StatusCode::OK);
    assert_eq!(
        status(&second, "alice").await,
        StatusCode::TOO_MANY_REQUESTS
    );

    handle
        .clone()
        .update(config("mode = \"disabled\""))
        .unwrap();
    assert_eq!(status(&first, "alice").await, StatusCode::OK);
    assert_eq!(status(&second, "alice").await, StatusCode::OK);
}

#[tokio::test]
async fn other_settings_apply_from_the_next_request() {
    let (_, handle, svc) = served(by_user("1/m"));

    let resp = svc.clone().oneshot(user("alice")).await.unwrap();
    assert_eq!(resp.headers()["x-ratelimit-remaining"], "0");
    handle
        .update(config(
            "by_user = \"1/m\"\nmode = \"permissive\"\nheaders = \"ietf\"",
        ))
        .unwrap();
    // Over the limit, but forwarded, with the IETF fields instead of the legacy ones.
    let resp = svc.clone().oneshot(user("alice")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().get("x-ratelimit-remaining").is_none());
    assert!(resp.headers().get("ratelimit").is_some());
}

#[tokio::test]
async fn a_new_backend_is_refused_naming_each_field_and_nothing_changes() {
    let (_, handle, svc) = served(config(
        "by_user = \"1/m\"\n[backend]\nmax_keys = 5000\ndeny_cache = 100",
    ));
    assert_eq!(status(&svc, "alice").await, StatusCode::OK);

    let err = handle
        .update(config(
            "by_user = \"100/m\"\n[backend]\nmax_keys = 6000\ndeny_cache = 100\nkey_prefix = \"x\"",
        ))
        .unwrap_err();
    let fields: Vec<&str> = err.problems().map(|(field, _)| field).collect();
    assert_eq!(fields, ["backend.key_prefix", "backend.max_keys"]);
    assert!(err.to_string().contains("restart"), "{err}");
    // The old rules still hold.
    assert_eq!(status(&svc, "alice").await, StatusCode::TOO_MANY_REQUESTS);

    // The same [backend] with new rules is applied.
    handle
        .update(config(
            "by_user = \"2/m\"\n[backend]\nmax_keys = 5000\ndeny_cache = 100",
        ))
        .unwrap();
    assert_eq!(status(&svc, "alice").await, StatusCode::OK);
}

#[tokio::test]
async fn a_layer_with_its_own_store_ignores_backend_on_reload_too() {
    let layer = RateLimitLayer::with_store(by_user("1/m"), MemoryStore::new())
        .with_clock(ManualClock::new());
    let handle = layer.handle();
    let (svc, _) = counting_service(layer);
    assert_eq!(status(&svc, "alice").await, StatusCode::OK);
    handle
        .update(config("by_user = \"2/m\"\n[backend]\nmax_keys = 10"))
        .unwrap();
    assert_eq!(status(&svc, "alice").await, StatusCode::OK);
    assert_eq!(status(&svc, "alice").await, StatusCode::TOO_MANY_REQUESTS);
}

/// A store whose answers wait until the test releases them: each check refuses.
#[derive(Debug, Default)]
struct Gated {
    waiting: Mutex<Vec<oneshot::Sender<()>>>,
}

impl Store for Gated {
    fn check(&self, _request: &StoreRequest<'_>) -> StoreFuture {
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().unwrap().push(tx);
        let answer = async move {
            let _ = rx.await;
            let refused = Outcome::rejected(Duration::from_secs(60), Duration::from_secs(60));
            let mut out = Outcomes::new();
            out.push(refused);
            Ok::<_, StoreError>(out)
        };
        StoreFuture::Pending(Box::pin(answer) as Pin<Box<dyn Future<Output = _> + Send>>)
    }
}

#[tokio::test]
async fn a_request_under_way_finishes_on_the_rules_it_started_with() {
    let store = Arc::new(Gated::default());
    let layer =
        RateLimitLayer::with_store(by_user("1/m"), store.clone()).with_clock(ManualClock::new());
    let handle = layer.handle();
    let (svc, _) = counting_service(layer);

    let started = tokio::spawn({
        let svc = svc.clone();
        async move { svc.oneshot(user("alice")).await.unwrap() }
    });
    while store.waiting.lock().unwrap().is_empty() {
        tokio::task::yield_now().await;
    }
    // Permissive from now on; the store then refuses the request already asked about.
    handle
        .update(config("by_user = \"1/m\"\nmode = \"permissive\""))
        .unwrap();
    for tx in store.waiting.lock().unwrap().drain(..) {
        let _ = tx.send(());
    }
    let resp = started.await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);

    // The next request is on the new rules: refused by the store, forwarded anyway.
    let next = tokio::spawn({
        let svc = svc.clone();
        async move { svc.oneshot(user("alice")).await.unwrap() }
    });
    loop {
        let waiting: Vec<_> = store.waiting.lock().unwrap().drain(..).collect();
        if !waiting.is_empty() {
            waiting.into_iter().for_each(|tx| {
                let _ = tx.send(());
            });
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(next.await.unwrap().status(), StatusCode::OK);
}

/// Four tasks send without pause while the limit changes ten times. Time stands still, so
/// one window holds everything: after each change, once every task has been refused, the
/// user's counter holds exactly the highest limit so far (a raise admits exactly the
/// difference, a cut admits nothing), and no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_changes_ten_times_under_load_without_an_error() {
    let limits = [10u64, 25, 5, 40, 40, 12, 60, 1, 75, 100];
    let clock = ManualClock::new();
    let layer = RateLimitLayer::new(by_user(&format!("{}/h", limits[0]))).with_clock(clock);
    let handle = layer.handle();
    let (svc, calls) = counting_service(layer);

    let allowed = Arc::new(AtomicU64::new(0));
    let other = Arc::new(AtomicU64::new(0));
    // Bumped by the controller on each change; a task reports the change it was refused
    // under (plus one: 0 is "not yet"), so the controller knows when all four have met
    // the new limit.
    let version = Arc::new(AtomicUsize::new(0));
    let refused_at: Arc<Vec<AtomicUsize>> = Arc::new((0..4).map(|_| AtomicUsize::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));

    let mut tasks = Vec::new();
    for t in 0..4 {
        let (svc, allowed, other, version, refused_at, stop) = (
            svc.clone(),
            allowed.clone(),
            other.clone(),
            version.clone(),
            refused_at.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut sent = 0u64;
            // Bounded: the controller stops the tasks; a cap guards against a hang.
            while !stop.load(Ordering::SeqCst) && sent < 2_000_000 {
                let seen = version.load(Ordering::SeqCst);
                match status(&svc, "shared-user").await {
                    StatusCode::OK => {
                        allowed.fetch_add(1, Ordering::SeqCst);
                    }
                    StatusCode::TOO_MANY_REQUESTS => {
                        refused_at[t].store(seen + 1, Ordering::SeqCst)
                    }
                    _ => {
                        other.fetch_add(1, Ordering::SeqCst);
                    }
                }
                sent += 1;
                tokio::task::yield_now().await;
            }
            sent
        }));
    }

    let mut highest = limits[0];
    for (i, &limit) in limits.iter().enumerate() {
        if i > 0 {
            handle.update(by_user(&format!("{limit}/h"))).unwrap();
            version.store(i, Ordering::SeqCst);
            highest = highest.max(limit);
        }
        // Every task refused on this version (a bounded wait: 20 s at most).
        let mut waited = 0;
        while refused_at.iter().any(|r| r.load(Ordering::SeqCst) <= i) {
            tokio::time::sleep(Duration::from_millis(1)).await;
            waited += 1;
            assert!(
                waited < 20_000,
                "the tasks were never refused after change {i}"
            );
        }
        assert_eq!(
            allowed.load(Ordering::SeqCst),
            highest,
            "after change {i} to {limit}/h"
        );
    }
    stop.store(true, Ordering::SeqCst);
    let mut sent = 0;
    for task in tasks {
        sent += task.await.expect("no task panicked");
    }
    assert_eq!(other.load(Ordering::SeqCst), 0, "no request failed");
    assert_eq!(calls.load(Ordering::SeqCst) as u64, highest);
    assert!(sent > highest, "the tasks kept sending: {sent}");
}

/// In Redis the count is part of the key name (ARCHITECTURE.md, behaviour contract item
/// 15), so a changed count starts a fresh counter there, while an unchanged rule keeps
/// its counter across a reload.
#[cfg(feature = "redis")]
#[tokio::test]
async fn in_redis_a_changed_count_starts_a_fresh_counter() {
    use common::Backend as _;
    let Some(redis) = common::redis::RedisBackend::start("in_redis_a_changed_count") else {
        return;
    };
    let layer = redis.layer(by_user("3/m"), &ManualClock::new());
    let handle = layer.handle();
    let (svc, _) = counting_service(layer);
    assert_eq!(allowed_until_refused(&svc, "alice").await, 3);
    handle
        .update(config("by_user = \"3/m\"\nheaders = \"ietf\""))
        .unwrap();
    assert_eq!(status(&svc, "alice").await, StatusCode::TOO_MANY_REQUESTS);
    handle.update(by_user("5/m")).unwrap();
    assert_eq!(allowed_until_refused(&svc, "alice").await, 5);
}

#[tokio::test]
async fn a_tenant_moved_into_a_tier_counts_there_from_zero() {
    let (_, handle, svc) = served(by_user("3/m"));
    let call = || {
        let mut req = Request::new(Body::new());
        req.extensions_mut().insert(Identity::new(
            Some("alice".to_owned()),
            Some("acme".to_owned()),
        ));
        svc.clone().oneshot(req)
    };
    for _ in 0..3 {
        assert_eq!(call().await.unwrap().status(), StatusCode::OK);
    }
    assert_eq!(
        call().await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    handle
        .update(config(
            "by_user = \"3/m\"\n[tiers.pro]\nby_user = \"3/m\"\n[tenants]\nacme = \"pro\"",
        ))
        .unwrap();
    for _ in 0..3 {
        assert_eq!(call().await.unwrap().status(), StatusCode::OK);
    }
    assert_eq!(
        call().await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test]
async fn a_token_bucket_keeps_its_share_used_across_a_count_change() {
    let bucket = |rate: &str| {
        config(&format!(
            "by_user = \"{rate}\"\nalgorithm = \"token_bucket\""
        ))
    };
    let (_, handle, svc) = served(bucket("4/m"));
    // Half of four used...
    assert_eq!(status(&svc, "alice").await, StatusCode::OK);
    assert_eq!(status(&svc, "alice").await, StatusCode::OK);
    // ...is half of eight.
    handle.update(bucket("8/m")).unwrap();
    assert_eq!(allowed_until_refused(&svc, "alice").await, 4);
}

#[tokio::test]
async fn a_changed_identity_header_applies_from_the_next_request() {
    let header = |name: &str| {
        config(&format!(
            "by_user = \"1/m\"\n[identity]\nuser_header = \"{name}\""
        ))
    };
    let (_, handle, svc) = served(header("x-a"));
    let call = || {
        let mut req = Request::new(Body::new());
        req.headers_mut().insert("x-b", "bob".parse().unwrap());
        svc.clone().oneshot(req)
    };
    // x-b is not read yet: anonymous, whose one request a minute is then used up.
    assert_eq!(call().await.unwrap().status(), StatusCode::OK);
    assert_eq!(
        call().await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    handle.update(header("x-b")).unwrap();
    // Now bob, with a counter of his own.
    assert_eq!(call().await.unwrap().status(), StatusCode::OK);
    assert_eq!(
        call().await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}
