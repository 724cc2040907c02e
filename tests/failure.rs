//! ARCHITECTURE.md, behaviour contract items 11-12: tollgate's own failures never reach
//! the caller, and the memory store stays bounded.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use common::{counting_service, Body};
use http::{Request, StatusCode};
use tollgate::{
    Decision, Identity, ManualClock, MemoryStore, Outcomes, RateLimitConfig, RateLimitLayer, Store,
    StoreError, StoreErrorKind, StoreFuture, StoreRequest,
};
use tower::ServiceExt;

fn user(name: &str) -> Request<Body> {
    let mut req = Request::new(Body::new());
    req.extensions_mut().insert(Identity::user(name));
    req
}

fn cfg(toml: &str) -> RateLimitConfig {
    RateLimitConfig::from_toml_str(toml).unwrap()
}

#[derive(Debug)]
enum Broken {
    Errors,
    Panics,
    PanicsWhenPolled,
    AnswersTooFew,
}

impl Store for Broken {
    fn check(&self, _: &StoreRequest<'_>) -> StoreFuture {
        match self {
            Broken::Errors => {
                StoreFuture::Ready(Err(StoreError::new(StoreErrorKind::Unavailable, "down")))
            }
            Broken::Panics => panic!("bug in a store"),
            Broken::PanicsWhenPolled => {
                StoreFuture::Pending(Box::pin(async { panic!("bug in a store future") }))
            }
            Broken::AnswersTooFew => StoreFuture::Ready(Ok(Outcomes::new())),
        }
    }
}

#[tokio::test]
async fn a_failing_store_never_stops_the_service() {
    for broken in [
        Broken::Errors,
        Broken::Panics,
        Broken::PanicsWhenPolled,
        Broken::AnswersTooFew,
    ] {
        let name = format!("{broken:?}");
        let layer = RateLimitLayer::with_store(cfg("by_user = \"1/m\""), broken);
        let (svc, calls) = counting_service(layer.clone());
        for _ in 0..5 {
            let resp = svc.clone().oneshot(user("alice")).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "{name}");
            assert!(
                resp.headers().get("x-ratelimit-limit").is_none(),
                "{name}: fail-open has no rate headers"
            );
            assert!(resp.extensions().get::<Decision>().is_none(), "{name}");
        }
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 5, "{name}");
        let stats = layer.stats();
        assert_eq!(
            (stats.store_errors, stats.fail_open, stats.fail_closed),
            (5, 5, 0),
            "{name}"
        );
    }
}

#[tokio::test]
async fn fail_closed_answers_503_with_the_documented_body() {
    let layer = RateLimitLayer::with_store(
        cfg("by_user = \"1/m\"\nfail_mode = \"closed\""),
        Broken::Errors,
    );
    let (svc, calls) = counting_service(layer.clone());
    let resp = svc.oneshot(user("alice")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (json["status"].as_u64(), json["code"].as_str()),
        (Some(503), Some("BACKEND_UNAVAILABLE"))
    );
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_eq!(layer.stats().fail_closed, 1);
}

/// A store that answers through a future (as Redis does), to drive the async path.
#[derive(Debug, Clone)]
struct Deferred(MemoryStore);

struct Later(Option<StoreFuture>, bool);

impl Future for Later {
    type Output = Result<Outcomes, StoreError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if !self.1 {
            self.1 = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        match self.0.take() {
            Some(StoreFuture::Ready(r)) => Poll::Ready(r),
            _ => unreachable!("the memory store answers synchronously"),
        }
    }
}

impl Store for Deferred {
    fn check(&self, request: &StoreRequest<'_>) -> StoreFuture {
        StoreFuture::Pending(Box::pin(Later(Some(self.0.check(request)), false)))
    }
}

#[tokio::test]
async fn asynchronous_stores_decide_like_synchronous_ones() {
    let clock = ManualClock::new();
    let layer = RateLimitLayer::with_store(cfg("by_user = \"2/m\""), Deferred(MemoryStore::new()))
        .with_clock(clock);
    let (svc, calls) = counting_service(layer);
    let statuses: Vec<_> = futures_statuses(&svc, 4).await;
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
}

async fn futures_statuses<S>(svc: &S, n: usize) -> Vec<StatusCode>
where
    S: tower::Service<
            Request<Body>,
            Response = http::Response<tollgate::ResponseBody<Body>>,
            Error = std::convert::Infallible,
        > + Clone,
{
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(svc.clone().oneshot(user("async")).await.unwrap().status());
    }
    out
}

#[tokio::test]
async fn the_memory_store_stays_within_max_keys() {
    let store = MemoryStore::with_max_keys(2_000);
    let clock = ManualClock::new();
    let layer =
        RateLimitLayer::with_store(cfg("by_user = \"5/h\"\nby_tenant = \"5/h\""), store.clone())
            .with_clock(clock.clone());
    let (svc, _) = counting_service(layer);
    // mallory is blocked before the flood, so her key is the nearest to its expiry...
    for _ in 0..5 {
        assert_eq!(
            svc.clone().oneshot(user("mallory")).await.unwrap().status(),
            StatusCode::OK
        );
    }
    clock.advance(std::time::Duration::from_secs(1));
    for i in 0..10_000 {
        let mut req = user(&format!("flood-{i}"));
        req.extensions_mut()
            .insert(Identity::user(format!("flood-{i}")).with_tenant(format!("t-{i}")));
        let resp = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(store.len() <= 2_000, "{} keys", store.len());
    }
    assert!(store.evictions() >= 18_000 - 2_000, "{}", store.evictions());
    // ...and stays blocked: evicting keys with quota left comes before keys at their limit.
    assert_eq!(
        svc.clone().oneshot(user("mallory")).await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // Legitimate users are still limited correctly after the flood.
    for _ in 0..5 {
        assert_eq!(
            svc.clone().oneshot(user("regular")).await.unwrap().status(),
            StatusCode::OK
        );
    }
    assert_eq!(
        svc.clone().oneshot(user("regular")).await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}
