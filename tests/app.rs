//! ARCHITECTURE.md, behaviour contract item 20: tollgate inside a real app. The handler
//! reads its decision, a hook shapes refusals, layers stack (an inner refusal costs the
//! outer rule nothing), exempt requests are untouched, and a handle peeks and resets.
//! Through the tower API with a `ManualClock`; stacking and peek/reset on every store.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use common::{eventually, Backend};
use http::{header, Request, Response, StatusCode};
use tollgate::{
    Decision, Identity, ManualClock, OnRefusal, RateLimitConfig, RateLimitHandle, RateLimitLayer,
    Refused, ResponseBody, RuleKind, Store, StoreError, StoreErrorKind, StoreFuture, StoreRequest,
    ToolName,
};
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

type Body = String;
type Resp = Response<ResponseBody<Body>>;

fn cfg(toml: &str) -> RateLimitConfig {
    RateLimitConfig::from_toml_str(toml).unwrap()
}

fn call(user: &str, path: &str) -> Request<Body> {
    let mut req = Request::builder().uri(path).body(Body::new()).unwrap();
    req.extensions_mut().insert(Identity::user(user));
    req
}

/// A handler that answers 200 with what the request's `Decision` says is left, if it
/// carries one.
fn handler(
) -> impl Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future = impl Send>
       + Clone
       + Send {
    service_fn(|req: Request<Body>| async move {
        let left = req
            .extensions()
            .get::<Decision>()
            .and_then(Decision::remaining)
            .map_or_else(|| "no decision".to_owned(), |left| format!("{left} left"));
        Ok::<_, Infallible>(Response::new(left))
    })
}

async fn send<S>(svc: &S, req: Request<Body>) -> S::Response
where
    S: Service<Request<Body>, Error = Infallible> + Clone,
{
    svc.clone().oneshot(req).await.unwrap()
}

/// What `handle` says is left under `rule` for `user` (calling `tool`), once it reads
/// `want` (a Redis store's refund lands a moment later).
async fn left(
    handle: &RateLimitHandle,
    user: &str,
    tool: Option<&str>,
    rule: RuleKind,
    want: u64,
) -> u64 {
    let read = || async {
        let rules = handle.peek(&Identity::user(user), tool).await.unwrap();
        rules
            .iter()
            .find(|r| r.rule == rule)
            .unwrap_or_else(|| panic!("no {rule:?} rule in {rules:?}"))
            .remaining
    };
    eventually(read, want).await
}

// ---- on every store ----

/// An inner layer (stricter, on one route) refuses the third call: the outer layer gives
/// back what it counted for it, and leaves the inner refusal's headers and `Decision` as
/// they were; with `[cost]` the call's `Charge` gives it back.
async fn an_inner_refusal_costs_the_outer_rule_nothing(b: &dyn Backend) {
    for costed in ["", "\n[cost]"] {
        let clock = ManualClock::new();
        let user = format!("stacked{}", costed.len());
        // Another period than the inner rule's: layers sharing one memory store share a
        // counter for one rule and period (ARCHITECTURE.md, contract item 15).
        let outer = b.layer(cfg(&format!("by_user = \"5/h\"{costed}")), &clock);
        let handle = outer.handle();
        let inner = b.layer(cfg(&format!("by_user = \"2/m\"{costed}")), &clock);
        let svc = ServiceBuilder::new()
            .layer(outer)
            .layer(inner)
            .service(handler());
        for i in 0..2 {
            let resp = send(&svc, call(&user, "/strict")).await;
            assert_eq!(resp.status(), StatusCode::OK, "call {i} {costed}");
        }
        let refused = send(&svc, call(&user, "/strict")).await;
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        // The refusing layer's stand, untouched by the outer one.
        assert_eq!(refused.headers()["x-ratelimit-limit"], "2", "{costed}");
        assert_eq!(refused.headers()["x-ratelimit-remaining"], "0");
        assert!(refused.headers().contains_key("retry-after"));
        let d = refused
            .extensions()
            .get::<Decision>()
            .expect("the inner decision");
        assert!(!d.is_allowed());
        assert_eq!(d.limit(), Some(2));
        // Counted twice (the allowed calls), not three times.
        let seen = left(&handle, &user, None, RuleKind::User, 3).await;
        assert_eq!(
            seen,
            3,
            "{} {costed}: the refused call was given back",
            b.name()
        );
    }
}

/// Peek counts nothing (two peeks, a call, a peek: one use); reset forgets the user's and
/// the tool's counters.
async fn peek_counts_nothing_and_reset_forgets(b: &dyn Backend) {
    let clock = ManualClock::new();
    let layer = b.layer(
        cfg("by_user = \"3/m\"\n[by_tool]\nsearch = \"10/m\""),
        &clock,
    );
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(handler());
    let ann = Identity::user("peeked");
    for _ in 0..2 {
        let rules = handle.peek(&ann, Some("search")).await.unwrap();
        let seen: Vec<(RuleKind, u64, u64)> = rules
            .iter()
            .map(|r| (r.rule, r.limit.count(), r.remaining))
            .collect();
        assert_eq!(
            seen,
            [(RuleKind::User, 3, 3), (RuleKind::Tool, 10, 10)],
            "{}",
            b.name()
        );
    }
    let mut req = call("peeked", "/tools/search");
    req.extensions_mut().insert(ToolName::new("search"));
    let resp: Resp = send(&svc, req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let rules = handle.peek(&ann, Some("search")).await.unwrap();
    assert_eq!(
        (rules[0].remaining, rules[1].remaining),
        (2, 9),
        "{}",
        b.name()
    );
    assert!(rules[0].reset_after <= Duration::from_secs(60));
    assert!(rules[0].reset_after > Duration::from_secs(59));
    // Without the tool, only the user's rule applies.
    assert_eq!(handle.peek(&ann, None).await.unwrap().len(), 1);

    // Spent, then reset: everything back.
    for _ in 0..3 {
        let _: Resp = send(&svc, call("peeked", "/x")).await;
    }
    let refused: Resp = send(&svc, call("peeked", "/x")).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    handle.reset(&ann, Some("search")).await.unwrap();
    let rules = handle.peek(&ann, Some("search")).await.unwrap();
    assert_eq!(
        (rules[0].remaining, rules[1].remaining),
        (3, 10),
        "{}",
        b.name()
    );
    let back: Resp = send(&svc, call("peeked", "/x")).await;
    assert_eq!(back.status(), StatusCode::OK, "{}", b.name());
}

common::suite!(
    an_inner_refusal_costs_the_outer_rule_nothing,
    peek_counts_nothing_and_reset_forgets,
);

// ---- in memory ----

fn limited(
    layer: RateLimitLayer,
) -> impl Service<Request<Body>, Response = Resp, Error = Infallible> + Clone {
    ServiceBuilder::new()
        .layer(layer.with_clock(ManualClock::new()))
        .service(handler())
}

async fn body(resp: Resp) -> String {
    let bytes = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// With `decision_in_request(true)` the handler reads what tollgate decided for it; by
/// default it sees no `Decision`.
#[tokio::test]
async fn the_handler_reads_its_remaining() {
    let on = limited(RateLimitLayer::new(cfg("by_user = \"3/m\"")).decision_in_request(true));
    for left in [2, 1, 0] {
        let resp = send(&on, call("ann", "/")).await;
        assert_eq!(body(resp).await, format!("{left} left"));
    }
    let off = limited(RateLimitLayer::new(cfg("by_user = \"3/m\"")));
    assert_eq!(
        body(send(&off, call("ann", "/")).await).await,
        "no decision"
    );
}

/// A layer between the two that replaces the identity: the outer layer counted ann, the
/// inner one refused "bob"; nothing is given back to bob's counter (it was never counted
/// for this request) and ann's keeps the refused call (strict, never lenient).
#[tokio::test]
async fn a_refund_never_goes_to_another_identity() {
    let clock = ManualClock::new();
    let outer = RateLimitLayer::new(cfg(
        "by_user = \"5/h\"\n[identity]\nuser_header = \"x-user-id\"",
    ))
    .with_clock(clock.clone());
    let handle = outer.handle();
    // bob has used 2 of his 5 on the outer rule, on another route.
    let outer_only = ServiceBuilder::new()
        .layer(outer.clone())
        .service(handler());
    for _ in 0..2 {
        let bob = Request::builder()
            .header("x-user-id", "bob")
            .body(Body::new())
            .unwrap();
        assert_eq!(send(&outer_only, bob).await.status(), StatusCode::OK);
    }
    let inner = RateLimitLayer::new(cfg("by_user = \"2/m\"")).with_clock(clock.clone());
    let svc = ServiceBuilder::new()
        .layer(outer)
        .map_request(|mut req: Request<Body>| {
            req.extensions_mut().insert(Identity::user("bob"));
            req
        })
        .layer(inner)
        .service(handler());
    let ann = || {
        Request::builder()
            .header("x-user-id", "ann")
            .body(Body::new())
            .unwrap()
    };
    for _ in 0..2 {
        assert_eq!(send(&svc, ann()).await.status(), StatusCode::OK);
    }
    assert_eq!(
        send(&svc, ann()).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    let left = |user: &'static str| {
        let handle = handle.clone();
        async move { handle.peek(&Identity::user(user), None).await.unwrap()[0].remaining }
    };
    assert_eq!(
        left("ann").await,
        2,
        "ann's outer counter keeps the refused call"
    );
    assert_eq!(
        left("bob").await,
        3,
        "bob's outer counter was not given ann's refund"
    );
}

/// A hook shapes the 429: its body and content type, with tollgate's rate headers added.
#[tokio::test]
async fn a_refusal_hook_shapes_the_429() {
    let layer = RateLimitLayer::new(cfg("by_user = \"1/m\"\n[by_tool]\nsearch = \"1/m\""))
        .on_refusal(|refusal: &Refused<'_>| {
            let d = refusal.decision().expect("a 429 has a decision");
            let text = format!(
                "<p>{} for {} at {}: back in {} s</p>",
                refusal.code(),
                refusal.tool().unwrap_or("-"),
                refusal.request().uri().path(),
                d.retry_after().unwrap().as_secs()
            );
            let mut resp = Response::new(Bytes::from(text));
            *resp.status_mut() = refusal.status();
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, "text/html".parse().unwrap());
            resp
        });
    let svc = limited(layer);
    let search = || {
        let mut req = call("ann", "/tools/search");
        req.extensions_mut().insert(ToolName::new("search"));
        req
    };
    assert_eq!(send(&svc, search()).await.status(), StatusCode::OK);
    let refused = send(&svc, search()).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.headers()["content-type"], "text/html");
    assert_eq!(refused.headers()["retry-after"], "60");
    assert_eq!(refused.headers()["x-ratelimit-limit"], "1");
    assert_eq!(
        body(refused).await,
        "<p>RATE_LIMIT for search at /tools/search: back in 60 s</p>"
    );
}

/// A hook that opts out of the rate headers gets none added.
#[tokio::test]
async fn a_hook_may_leave_the_rate_headers_out() {
    struct Plain;
    impl OnRefusal for Plain {
        fn on_refusal(&self, refusal: &Refused<'_>) -> Response<Bytes> {
            let mut resp = refusal.default_response();
            resp.headers_mut().clear();
            resp
        }
        fn rate_headers(&self) -> bool {
            false
        }
    }
    let svc = limited(RateLimitLayer::new(cfg("by_user = \"1/m\"")).on_refusal(Plain));
    let _ = send(&svc, call("ann", "/")).await;
    let refused = send(&svc, call("ann", "/")).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(refused.headers().is_empty(), "{:?}", refused.headers());
    assert!(body(refused).await.contains("\"code\":\"RATE_LIMIT\""));
}

#[derive(Debug)]
struct Down;

impl Store for Down {
    fn check(&self, _: &StoreRequest<'_>) -> StoreFuture {
        StoreFuture::Ready(Err(StoreError::new(StoreErrorKind::Unavailable, "down")))
    }
}

/// Failing closed, the hook shapes the 503 too (no decision; `Retry-After: 1` added); a
/// hook that panics is answered with tollgate's own refusal.
#[tokio::test]
async fn a_refusal_hook_shapes_the_fail_closed_503_and_a_panicking_one_is_replaced() {
    let closed = cfg("by_user = \"1/m\"\nfail_mode = \"closed\"");
    let layer = RateLimitLayer::with_store(closed.clone(), Down).on_refusal(|r: &Refused<'_>| {
        assert!(r.decision().is_none());
        let mut resp = Response::new(Bytes::from(format!("{} {}", r.status().as_u16(), r.code())));
        *resp.status_mut() = r.status();
        resp
    });
    let resp = send(&limited(layer), call("ann", "/")).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(body(resp).await, "503 BACKEND_UNAVAILABLE");

    let panics = RateLimitLayer::with_store(closed, Down)
        .on_refusal(|_: &Refused<'_>| -> Response<Bytes> { panic!("a bug in the app's hook") });
    let resp = send(&limited(panics), call("ann", "/")).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(body(resp).await.contains("BACKEND_UNAVAILABLE"));
}

/// An exempt request is forwarded untouched: nothing counted, no headers, no decision;
/// two `exempt` predicates add up.
#[tokio::test]
async fn an_exempt_path_is_neither_counted_nor_decorated() {
    let layer = RateLimitLayer::new(cfg("by_user = \"2/m\""))
        .decision_in_request(true)
        .exempt(|req| req.uri().path() == "/healthz")
        .exempt(|req| req.method() == http::Method::OPTIONS);
    let handle = layer.handle();
    let svc = limited(layer);
    for _ in 0..5 {
        let health = send(&svc, call("ann", "/healthz")).await;
        assert_eq!(health.status(), StatusCode::OK);
        assert!(health.headers().get("x-ratelimit-limit").is_none());
        assert!(health.extensions().get::<Decision>().is_none());
        assert_eq!(body(health).await, "no decision");
        let mut options = call("ann", "/api");
        *options.method_mut() = http::Method::OPTIONS;
        assert_eq!(send(&svc, options).await.status(), StatusCode::OK);
    }
    let rules = handle.peek(&Identity::user("ann"), None).await.unwrap();
    assert_eq!(rules[0].remaining, 2, "nothing was counted");
    let api = send(&svc, call("ann", "/api")).await;
    assert_eq!(api.headers()["x-ratelimit-remaining"], "1");
}

// ---- Redis: a reset seen by every instance ----

/// Instance B's deny cache refuses a user locally; instance A resets the user; B lets the
/// user through again within the deny cache's hold (one second), without being told.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_is_seen_by_another_instance_within_a_second() {
    use tollgate::RedisStore;
    let Some(server) = common::redis::RedisServer::any("a_reset_is_seen_by_another_instance")
    else {
        return;
    };
    let prefix = common::redis::fresh_prefix();
    let instance = || {
        RedisStore::builder(server.url())
            .key_prefix(&prefix)
            .caller_time(true)
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap()
    };
    let clock = ManualClock::new();
    let rule = cfg("by_user = \"2/h\"");
    let a = RateLimitLayer::with_store(rule.clone(), instance()).with_clock(clock.clone());
    let handle_a = a.handle();
    let b = ServiceBuilder::new()
        .layer(RateLimitLayer::with_store(rule, instance()).with_clock(clock.clone()))
        .service(handler());
    for _ in 0..2 {
        assert_eq!(send(&b, call("bea", "/")).await.status(), StatusCode::OK);
    }
    let refused: Resp = send(&b, call("bea", "/")).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let wait = refused
        .extensions()
        .get::<Decision>()
        .unwrap()
        .retry_after()
        .unwrap();
    assert!(
        wait > Duration::from_secs(3000),
        "an hour's window: {wait:?}"
    );

    handle_a.reset(&Identity::user("bea"), None).await.unwrap();
    // B still holds its local refusal (it was not told) ...
    let held: Resp = send(&b, call("bea", "/")).await;
    assert_eq!(
        held.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "B's deny cache"
    );
    // ... for at most a second.
    clock.advance(Duration::from_secs(1));
    let back: Resp = send(&b, call("bea", "/")).await;
    assert_eq!(back.status(), StatusCode::OK, "seen within a second");
    assert_eq!(back.headers()["x-ratelimit-remaining"], "1");
}
