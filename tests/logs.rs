//! ARCHITECTURE.md, behaviour contract item 13: no user or tenant id in any log line, on
//! every path that logs.

mod common;

use common::{counting_service, Body};
use http::Request;
use tollgate::{
    Identity, ManualClock, MemoryStore, RateLimitConfig, RateLimitLayer, Store, StoreError,
    StoreErrorKind, StoreFuture, StoreRequest, ToolName,
};
use tower::ServiceExt;

#[derive(Debug)]
struct Down;
impl Store for Down {
    fn check(&self, _: &StoreRequest<'_>) -> StoreFuture {
        StoreFuture::Ready(Err(StoreError::new(
            StoreErrorKind::Unavailable,
            "connection refused",
        )))
    }
}

const USER: &str = "user-7f3a-secret";
const TENANT: &str = "tenant-91bc-secret";

fn request(tool: &str) -> Request<Body> {
    let mut req = Request::new(Body::new());
    req.extensions_mut()
        .insert(Identity::user(USER).with_tenant(TENANT));
    req.extensions_mut().insert(ToolName::new(tool));
    req
}

#[test]
fn no_identity_reaches_a_log_line() {
    let captured = common::CapturedLogs::start(tracing::Level::TRACE);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let limits = "by_user = \"1/m\"\nby_tenant = \"1/m\"\n[by_tool]\nsearch = \"1/m\"\n[identity]\nuser_header = \"x-user-id\"";
        for extra in ["", "mode = \"permissive\"\n"] {
            let cfg = RateLimitConfig::from_toml_str(&format!("{extra}{limits}")).unwrap();
            let layer = RateLimitLayer::with_store(cfg, MemoryStore::new()).with_clock(ManualClock::new());
            let (svc, _) = counting_service(layer);
            for _ in 0..3 {
                svc.clone().oneshot(request("search")).await.unwrap();
            }
            // A refused identity (repeated header) logs its reason, never its value.
            let mut req = Request::new(Body::new());
            req.headers_mut().append("x-user-id", USER.parse().unwrap());
            req.headers_mut().append("x-user-id", TENANT.parse().unwrap());
            svc.clone().oneshot(req).await.unwrap();
        }
        for fail_mode in ["open", "closed"] {
            let cfg = RateLimitConfig::from_toml_str(&format!("by_user = \"1/m\"\nfail_mode = \"{fail_mode}\"")).unwrap();
            let layer = RateLimitLayer::with_store(cfg, Down).with_clock(ManualClock::new());
            let (svc, _) = counting_service(layer);
            svc.oneshot(request("search")).await.unwrap();
        }
    });
    let text = captured.text();
    // Each path logged something (so this test can see a leak if there were one)...
    for expected in [
        "permissive",
        "rate limit exceeded",
        "store failed",
        "identity",
        "tool=\"search\"",
    ] {
        assert!(text.contains(expected), "no {expected:?} in:\n{text}");
    }
    // ...and no line names the user or the tenant.
    for secret in [USER, TENANT, "7f3a", "91bc"] {
        assert!(!text.contains(secret), "{secret} leaked:\n{text}");
    }
}

/// Regression: an abusive client turned its request rate into permissive-mode warn lines.
/// Now one line a second, with the count held back; and the `by_ip` hint for a server that
/// gives no peer address likewise. No client address reaches a log line.
#[test]
fn client_triggered_warnings_are_rate_limited_and_carry_no_address() {
    let captured = common::CapturedLogs::start(tracing::Level::WARN);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let clock = ManualClock::new();
    rt.block_on(async {
        let cfg = RateLimitConfig::from_toml_str(
            "by_user = \"1/h\"\nmode = \"permissive\"\nanonymous = \"by_ip\"\n[identity]\ntrusted_proxies = [\"10.0.0.0/8\"]",
        )
        .unwrap();
        let layer = RateLimitLayer::with_store(cfg, MemoryStore::new()).with_clock(clock.clone());
        let (svc, calls) = counting_service(layer);
        for second in 0..3 {
            for _ in 0..200 {
                let mut req = Request::new(Body::new());
                req.extensions_mut()
                    .insert(std::net::SocketAddr::from(([10, 0, 0, 1], 1234)));
                req.headers_mut()
                    .insert("x-forwarded-for", "198.51.100.77".parse().unwrap());
                svc.clone().oneshot(req).await.unwrap();
                // No peer address at all: the shared bucket, and a hint.
                svc.clone().oneshot(Request::new(Body::new())).await.unwrap();
            }
            let _ = second;
            clock.advance(std::time::Duration::from_secs(1));
        }
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1200);
    });
    let text = captured.text();
    let count = |needle: &str| text.lines().filter(|l| l.contains(needle)).count();
    assert_eq!(count("permissive mode"), 3, "one a second:\n{text}");
    assert_eq!(count("no peer address"), 3, "one a second:\n{text}");
    assert!(text.contains("suppressed=397"), "{text}");
    assert!(
        text.contains("into_make_service_with_connect_info"),
        "{text}"
    );
    for secret in ["198.51.100.77", "10.0.0.1"] {
        assert!(!text.contains(secret), "{secret} leaked:\n{text}");
    }
}

/// Every log line a client can trigger is rate-limited: a hundred refusals and a hundred
/// refused identities in the same second log about one line each, not a hundred.
#[test]
fn client_triggered_lines_are_rate_limited() {
    let captured = common::CapturedLogs::start(tracing::Level::TRACE);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cfg = RateLimitConfig::from_toml_str(
            "by_user = \"1/m\"\n[identity]\nuser_header = \"x-user-id\"",
        )
        .unwrap();
        let layer =
            RateLimitLayer::with_store(cfg, MemoryStore::new()).with_clock(ManualClock::new());
        let (svc, _) = counting_service(layer);
        for _ in 0..100 {
            svc.clone().oneshot(request("search")).await.unwrap();
            let mut req = Request::new(Body::new());
            req.headers_mut().append("x-user-id", "a".parse().unwrap());
            req.headers_mut().append("x-user-id", "b".parse().unwrap());
            svc.clone().oneshot(req).await.unwrap();
        }
    });
    let text = captured.text();
    for line in ["rate limit exceeded", "ambiguous identity"] {
        let n = text.lines().filter(|l| l.contains(line)).count();
        assert!((1..=2).contains(&n), "{n} lines of {line:?}:\n{text}");
    }
}
