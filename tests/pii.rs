//! PII (ARCHITECTURE.md, behaviour contract items 9 and 13): on every code path —
//! limited, permissive, disabled, refused identity, fail-open and fail-closed with failing
//! stores, the Redis backend failing over to memory, config errors — no user or tenant id
//! reaches a log line, a response (status line, headers or body), or the `Debug` output of
//! any public type that can hold one. One test gathers everything and searches it.

mod common;

use std::convert::Infallible;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body_util::BodyExt;
use tollgate::{
    Algorithm, Decision, Identity, Key, ManualClock, MemoryStore, Outcome, Outcomes, Rate,
    RateLimitConfig, RateLimitLayer, ResponseBody, RuleKind, Store, StoreError, StoreErrorKind,
    StoreFuture, StoreRequest, Subject, ToolName,
};
use tower::{Layer, Service};

/// Ids with separators, so a percent-encoded or escaped leak is caught by the markers.
const USER: &str = "usr:5e1d@example.org";
const TENANT: &str = "tnt{a7c3}/acme";
/// Fragments that survive any encoding (JSON, percent, Debug escapes).
const MARKERS: [&str; 2] = ["5e1d", "a7c3"];

/// The wrapped service: answers 200; `Debug` so the `RateLimit` service's can be read.
#[derive(Clone, Debug)]
struct Inner;

impl Service<Request<String>> for Inner {
    type Response = Response<String>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<String>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<String>) -> Self::Future {
        std::future::ready(Ok(Response::new("ok".to_owned())))
    }
}

/// Stores that fail in each way a store can.
#[derive(Debug, Clone, Copy)]
enum Failing {
    Errors,
    ErrorsLater,
    Panics,
    PanicsLater,
}

impl Store for Failing {
    fn check(&self, request: &StoreRequest<'_>) -> StoreFuture {
        let error = || StoreError::new(StoreErrorKind::Unavailable, "backend down");
        assert!(!request.keys().is_empty());
        match self {
            Failing::Errors => StoreFuture::Ready(Err(error())),
            Failing::ErrorsLater => StoreFuture::Pending(Box::pin(async move { Err(error()) })),
            Failing::Panics => panic!("store bug"),
            Failing::PanicsLater => StoreFuture::Pending(Box::pin(async { panic!("store bug") })),
        }
    }
}

fn request() -> Request<String> {
    let mut req = Request::new(String::new());
    req.extensions_mut()
        .insert(Identity::user(USER).with_tenant(TENANT));
    req.extensions_mut().insert(ToolName::new("search"));
    req
}

fn header_request() -> Request<String> {
    let mut req = Request::new(String::new());
    req.headers_mut().insert("x-user-id", USER.parse().unwrap());
    req.headers_mut()
        .insert("x-tenant-id", TENANT.parse().unwrap());
    req
}

/// Every rule, with `top` among the top-level keys and `tables` appended at the end.
fn cfg_with(top: &str, tables: &str) -> RateLimitConfig {
    RateLimitConfig::from_toml_str(&format!(
        "{top}\nby_user = \"1/m\"\nby_tenant = \"2/m\"\nheaders = \"both\"\n\
         [by_tool]\nsearch = \"3/m\"\n\
         [identity]\nuser_header = \"x-user-id\"\ntenant_header = \"x-tenant-id\"\n{tables}"
    ))
    .unwrap()
}

fn cfg(top: &str) -> RateLimitConfig {
    cfg_with(top, "")
}

/// Sends `req` through `layer` and records the response (and its decision) in `seen`.
async fn exchange(layer: &RateLimitLayer, req: Request<String>, seen: &mut String) {
    let mut svc = layer.layer(Inner);
    seen.push_str(&format!("{svc:?}\n"));
    let fut = svc.call(req);
    seen.push_str(&format!("{fut:?}\n"));
    let resp: Response<ResponseBody<String>> = fut.await.unwrap();
    seen.push_str(&format!("{:?} {:?}\n", resp.status(), resp.headers()));
    if let Some(d) = resp.extensions().get::<Decision>() {
        seen.push_str(&format!("{d:?}\n"));
    }
    let (parts, body) = resp.into_parts();
    seen.push_str(&format!("{:?}\n", parts.headers));
    let bytes = body.collect().await.unwrap().to_bytes();
    seen.push_str(&String::from_utf8_lossy(&bytes));
    seen.push('\n');
}

#[test]
fn no_identity_leaks_through_logs_responses_or_debug() {
    let captured = common::CapturedLogs::start(tracing::Level::TRACE);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut seen = String::new();
    rt.block_on(async {
        // Allowed, then limited by user, tenant and tool in turn; in every mode.
        for mode in ["enforce", "permissive", "disabled"] {
            let store = MemoryStore::new();
            let layer =
                RateLimitLayer::with_store(cfg(&format!("mode = \"{mode}\"")), store.clone())
                    .with_clock(ManualClock::new());
            for _ in 0..4 {
                exchange(&layer, request(), &mut seen).await;
                exchange(&layer, header_request(), &mut seen).await;
            }
            // A refused identity: the two values are the ids themselves.
            let mut twice = Request::new(String::new());
            twice
                .headers_mut()
                .append("x-user-id", USER.parse().unwrap());
            twice
                .headers_mut()
                .append("x-user-id", TENANT.parse().unwrap());
            exchange(&layer, twice, &mut seen).await;
            let mut long = Request::new(String::new());
            let padded = format!("{USER}{}", "x".repeat(300));
            long.headers_mut()
                .insert("x-user-id", padded.parse().unwrap());
            exchange(&layer, long, &mut seen).await;
            seen.push_str(&format!("{layer:?}\n{:?}\n{store:?}\n", layer.stats()));
            if mode == "enforce" {
                assert!(store.len() >= 3, "the ids were counted (so could leak)");
            }
        }
        // Every way a store can fail, open and closed.
        for fail_mode in ["open", "closed"] {
            for failing in [
                Failing::Errors,
                Failing::ErrorsLater,
                Failing::Panics,
                Failing::PanicsLater,
            ] {
                let layer = RateLimitLayer::with_store(
                    cfg(&format!("fail_mode = \"{fail_mode}\"")),
                    failing,
                )
                .with_clock(ManualClock::new());
                for _ in 0..2 {
                    exchange(&layer, request(), &mut seen).await;
                }
                // Failure logs are rate-limited to one a second: move on for the next.
                seen.push_str(&format!("{layer:?}\n{:?}\n", layer.stats()));
            }
        }
        // A Redis backend nobody answers: connection errors, then the memory fallback.
        #[cfg(feature = "redis")]
        {
            let layer = RateLimitLayer::new(cfg_with(
                "",
                "[backend]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:1/0\"\ntimeout_ms = 20",
            ))
            .with_clock(ManualClock::new());
            for _ in 0..3 {
                exchange(&layer, request(), &mut seen).await;
            }
            seen.push_str(&format!("{layer:?}\n{:?}\n", layer.stats()));
        }
    });

    // The public types that hold an id, directly.
    let key = Key::new(
        RuleKind::User,
        Subject::Named(USER.as_bytes()),
        Rate::per_minute(1),
        Algorithm::SlidingWindow,
    );
    let tenant_key = Key::new(
        RuleKind::Tenant,
        Subject::Named(TENANT.as_bytes()),
        Rate::per_minute(1),
        Algorithm::TokenBucket,
    );
    let keys = [key, tenant_key];
    let store_request = StoreRequest::new(&keys, 1_700_000_000_000_000);
    let store = MemoryStore::new();
    let answer = store.check(&store_request);
    let mut outcomes = Outcomes::new();
    outcomes.push(Outcome::allowed(0, std::time::Duration::from_secs(1)));
    let identity = Identity::user(USER).with_tenant(TENANT);
    let error = StoreError::new(StoreErrorKind::Protocol, "unexpected reply");
    seen.push_str(&format!(
        "{key:?}\n{tenant_key:?}\n{:?}\n{store_request:?}\n{answer:?}\n{store:?}\n{outcomes:?}\n\
         {identity:?}\n{:?}\n{error:?}\n{error}\n",
        key.subject(),
        Identity::user(USER),
    ));
    // Config errors name fields and echo the operator's own text, never a caller's.
    let broken =
        RateLimitConfig::from_toml_str("by_user = \"30/x\"\nmode = \"strict\"\n").unwrap_err();
    seen.push_str(&format!("{broken}\n{broken:?}\n"));

    let logs = captured.text();
    // Every path was taken, so a leak on any of them would be visible here.
    for expected in [
        "\"code\":\"RATE_LIMIT\"",
        "\"code\":\"INVALID_IDENTITY\"",
        "\"code\":\"BACKEND_UNAVAILABLE\"",
        "\"violated\":[\"user\"]",
        "Key {",
        "<redacted>",
        "MemoryStore",
        "RateLimitLayer",
        "RateLimit {",
        "ResponseFuture",
        "Decision {",
        "by_user: invalid rate",
    ] {
        assert!(
            seen.contains(expected),
            "no {expected:?} in what was gathered"
        );
    }
    for expected in [
        "permissive",
        "store failed",
        "identity",
        "rate limit exceeded",
    ] {
        assert!(
            logs.contains(expected),
            "no {expected:?} in the logs:\n{logs}"
        );
    }
    for marker in MARKERS {
        assert!(
            !seen.contains(marker),
            "{marker} leaked into a response or Debug output:\n{seen}"
        );
        assert!(
            !logs.contains(marker),
            "{marker} leaked into the logs:\n{logs}"
        );
    }
}

/// The test above must be able to fail: the markers are found where they are present.
#[test]
fn the_markers_are_visible_when_an_id_is_shown() {
    let encode = |kind, id: &str| {
        Key::new(
            kind,
            Subject::Named(id.as_bytes()),
            Rate::per_minute(1),
            Algorithm::FixedWindow,
        )
        .encode("rl")
    };
    let shown = format!(
        "{USER:?} {TENANT:?} {} {}",
        encode(RuleKind::User, USER),
        encode(RuleKind::Tenant, TENANT)
    );
    for marker in MARKERS {
        assert_eq!(shown.matches(marker).count(), 2, "{marker} in {shown}");
    }
}
