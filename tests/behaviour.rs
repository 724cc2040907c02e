//! ARCHITECTURE.md, behaviour contract items 1-10, defined once and run against every
//! store through the tower API, with a `ManualClock`: no sleeps, no sockets.

mod common;

use std::time::Duration;

use common::{counting_service, Backend, Body};
use http::{HeaderMap, Request, Response, StatusCode};
use std::net::SocketAddr;

use tollgate::{
    Decision, Identity, ManualClock, RateLimitConfig, ResponseBody, RuleKind, Tier, ToolName,
};
use tower::{Service, ServiceExt};

fn req(user: Option<&str>, tenant: Option<&str>, tool: Option<&str>) -> Request<Body> {
    let mut req = Request::new(Body::new());
    req.extensions_mut().insert(Identity::new(
        user.map(str::to_owned),
        tenant.map(str::to_owned),
    ));
    if let Some(tool) = tool {
        req.extensions_mut().insert(ToolName::new(tool));
    }
    req
}

fn user(name: &str) -> Request<Body> {
    req(Some(name), None, None)
}

type Resp = Response<ResponseBody<Body>>;

async fn send<S>(svc: &S, request: Request<Body>) -> Resp
where
    S: Service<Request<Body>, Response = Resp, Error = std::convert::Infallible> + Clone,
{
    svc.clone().oneshot(request).await.unwrap()
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).map(|v| v.to_str().unwrap())
}

fn num(h: &HeaderMap, name: &str) -> u64 {
    header(h, name)
        .unwrap_or_else(|| panic!("missing {name}"))
        .parse()
        .unwrap()
}

fn cfg(toml: &str) -> RateLimitConfig {
    RateLimitConfig::from_toml_str(toml).unwrap()
}

fn epoch_secs(clock: &ManualClock) -> u64 {
    clock
        .now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

// ---- the cases ----

async fn two_per_second_then_429_then_reset(b: &dyn Backend) {
    let clock = ManualClock::new();
    let (svc, calls) = counting_service(b.layer(cfg("by_user = \"2/s\""), &clock));
    let first = send(&svc, user("alice")).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(num(first.headers(), "x-ratelimit-limit"), 2);
    assert_eq!(num(first.headers(), "x-ratelimit-remaining"), 1);
    assert!(first.headers().get("retry-after").is_none());
    let reset = num(first.headers(), "x-ratelimit-reset");
    assert_eq!(reset, epoch_secs(&clock) + 1);

    clock.advance(Duration::from_millis(300));
    let second = send(&svc, user("alice")).await;
    assert_eq!(second.status(), StatusCode::OK);
    assert_eq!(num(second.headers(), "x-ratelimit-remaining"), 0);
    assert_eq!(
        num(second.headers(), "x-ratelimit-reset"),
        reset,
        "reset moves within a window"
    );
    assert!(second.headers().get("retry-after").is_none());

    clock.advance(Duration::from_millis(300));
    let third = send(&svc, user("alice")).await;
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(num(third.headers(), "x-ratelimit-limit"), 2);
    assert_eq!(num(third.headers(), "x-ratelimit-remaining"), 0);
    assert_eq!(num(third.headers(), "x-ratelimit-reset"), reset);
    assert!(num(third.headers(), "retry-after") >= 1);
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "a 429 never reaches the service"
    );

    clock.advance(Duration::from_millis(400));
    let fourth = send(&svc, user("alice")).await;
    assert_eq!(fourth.status(), StatusCode::OK, "window passed");
    assert_eq!(num(fourth.headers(), "x-ratelimit-remaining"), 1);
    assert!(num(fourth.headers(), "x-ratelimit-reset") > reset);
}

async fn no_limits_means_no_rate_headers(b: &dyn Backend) {
    let clock = ManualClock::new();
    let (svc, _) = counting_service(b.layer(RateLimitConfig::default(), &clock));
    for _ in 0..50 {
        let resp = send(&svc, req(Some("alice"), Some("acme"), Some("search"))).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(!resp
            .headers()
            .keys()
            .any(|k| k.as_str().contains("ratelimit")));
        assert!(resp.extensions().get::<Decision>().unwrap().is_allowed());
    }
}

async fn users_within_their_limit_are_never_blocked(b: &dyn Backend) {
    let clock = ManualClock::new();
    let (svc, _) = counting_service(b.layer(cfg("by_user = \"5/m\""), &clock));
    for round in 0..5 {
        for u in 0..10 {
            let resp = send(&svc, user(&format!("user-{u}"))).await;
            assert_eq!(resp.status(), StatusCode::OK, "user {u} round {round}");
        }
    }
}

async fn a_thousand_users_one_call_each(b: &dyn Backend) {
    let clock = ManualClock::new();
    let (svc, _) = counting_service(b.layer(cfg("by_user = \"1/s\""), &clock));
    for u in 0..1000 {
        assert_eq!(
            send(&svc, user(&format!("u{u}"))).await.status(),
            StatusCode::OK
        );
    }
}

async fn unicode_identities_are_distinct_users(b: &dyn Backend) {
    let clock = ManualClock::new();
    let (svc, _) = counting_service(b.layer(cfg("by_user = \"1/m\""), &clock));
    for name in [
        "jürgen", "jurgen", "JÜRGEN", "用户", "用戶", "🦀", "e\u{301}", "\u{e9}",
    ] {
        assert_eq!(
            send(&svc, user(name)).await.status(),
            StatusCode::OK,
            "{name}"
        );
    }
    assert_eq!(
        send(&svc, user("用户")).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}

async fn missing_and_blank_users_share_the_anonymous_bucket(b: &dyn Backend) {
    let clock = ManualClock::new();
    let (svc, _) = counting_service(b.layer(cfg("by_user = \"3/m\""), &clock));
    assert_eq!(
        send(&svc, req(None, None, None)).await.status(),
        StatusCode::OK
    );
    assert_eq!(send(&svc, user("")).await.status(), StatusCode::OK);
    assert_eq!(send(&svc, user("   ")).await.status(), StatusCode::OK);
    let mut no_extension = Request::new(Body::new());
    no_extension.extensions_mut().insert(ToolName::new("x"));
    assert_eq!(
        send(&svc, no_extension).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // The anonymous bucket never touches named users, not even one called "anonymous".
    for name in ["alice", "anonymous", "-"] {
        let resp = send(&svc, user(name)).await;
        assert_eq!(resp.status(), StatusCode::OK, "{name}");
        assert_eq!(num(resp.headers(), "x-ratelimit-remaining"), 2, "{name}");
    }
}

async fn tool_names_are_trimmed_and_lower_cased(b: &dyn Backend) {
    let clock = ManualClock::new();
    let (svc, _) = counting_service(b.layer(cfg("[by_tool]\n\" Search\" = \"3/m\""), &clock));
    for (i, tool) in ["Search", " search", "search\t"].into_iter().enumerate() {
        let resp = send(&svc, req(Some(&format!("u{i}")), None, Some(tool))).await;
        assert_eq!(resp.status(), StatusCode::OK, "{tool:?}");
    }
    let resp = send(&svc, req(Some("u9"), None, Some("SEARCH"))).await;
    assert_eq!(
        resp.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "one counter for all spellings"
    );
    // Tools not named in by_tool, and requests without a tool, have no tool rule.
    for tool in [Some("fetch"), None] {
        let resp = send(&svc, req(Some("u9"), None, tool)).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.headers().get("x-ratelimit-limit").is_none());
    }
}

async fn tenants_never_share_a_counter(b: &dyn Backend) {
    let clock = ManualClock::new();
    let (svc, _) = counting_service(b.layer(cfg("by_tenant = \"2/m\""), &clock));
    for tenant in ["acme", "globex", "acme:x", "ACME"] {
        for _ in 0..2 {
            let resp = send(&svc, req(Some("alice"), Some(tenant), None)).await;
            assert_eq!(resp.status(), StatusCode::OK, "{tenant}");
        }
    }
    // No tenant: the tenant rule is skipped, there is no shared default bucket.
    for _ in 0..5 {
        let resp = send(&svc, req(Some("bob"), None, None)).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.headers().get("x-ratelimit-limit").is_none());
    }
    let resp = send(&svc, req(Some("carol"), Some(""), None)).await;
    assert!(
        resp.headers().get("x-ratelimit-limit").is_none(),
        "empty tenant = none"
    );
}

async fn a_tenant_limit_blocks_every_user_of_the_tenant(b: &dyn Backend) {
    let clock = ManualClock::new();
    let layer = b.layer(cfg("by_user = \"10/m\"\nby_tenant = \"3/m\""), &clock);
    let (svc, _) = counting_service(layer);
    for name in ["alice", "bob", "alice"] {
        assert_eq!(
            send(&svc, req(Some(name), Some("acme"), None))
                .await
                .status(),
            StatusCode::OK
        );
    }
    for name in ["alice", "bob"] {
        let resp = send(&svc, req(Some(name), Some("acme"), None)).await;
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS, "{name}");
        let decision = resp.extensions().get::<Decision>().unwrap();
        assert_eq!(decision.violated().collect::<Vec<_>>(), [RuleKind::Tenant]);
    }
    assert_eq!(
        send(&svc, req(Some("bob"), Some("initech"), None))
            .await
            .status(),
        StatusCode::OK
    );
}

async fn a_blocked_user_consumes_no_tenant_or_tool_quota(b: &dyn Backend) {
    let clock = ManualClock::new();
    let layer = b.layer(
        cfg("by_user = \"2/m\"\nby_tenant = \"10/m\"\n[by_tool]\nsearch = \"10/m\""),
        &clock,
    );
    let (svc, _) = counting_service(layer);
    for _ in 0..2 {
        assert_eq!(
            send(&svc, req(Some("mallory"), Some("acme"), Some("search")))
                .await
                .status(),
            StatusCode::OK
        );
    }
    for _ in 0..20 {
        let resp = send(&svc, req(Some("mallory"), Some("acme"), Some("search"))).await;
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    }
    // The tenant and the tool each counted only mallory's two allowed calls: look at
    // them through layers over the same store that have no user rule.
    let (tenant_view, _) = counting_service(b.layer(cfg("by_tenant = \"10/m\""), &clock));
    let d = *send(&tenant_view, req(Some("alice"), Some("acme"), None))
        .await
        .extensions()
        .get::<Decision>()
        .unwrap();
    assert_eq!(
        (d.rule(), d.remaining()),
        (Some(RuleKind::Tenant), Some(10 - 2 - 1))
    );
    let (tool_view, _) = counting_service(b.layer(cfg("[by_tool]\nsearch = \"10/m\""), &clock));
    let d = *send(&tool_view, req(Some("alice"), None, Some("search")))
        .await
        .extensions()
        .get::<Decision>()
        .unwrap();
    assert_eq!(
        (d.rule(), d.remaining()),
        (Some(RuleKind::Tool), Some(10 - 2 - 1))
    );
}

async fn the_most_restrictive_rule_speaks(b: &dyn Backend) {
    let clock = ManualClock::new();
    let layer = b.layer(
        cfg("by_user = \"4/m\"\nby_tenant = \"6/h\"\n[by_tool]\nsearch = \"3/10s\""),
        &clock,
    );
    let (svc, _) = counting_service(layer);
    let call = || req(Some("alice"), Some("acme"), Some("search"));
    // All allow: the fewest remaining speaks. user 3, tenant 5, tool 2 → tool.
    let d = *send(&svc, call())
        .await
        .extensions()
        .get::<Decision>()
        .unwrap();
    assert_eq!(
        (d.rule(), d.remaining(), d.limit()),
        (Some(RuleKind::Tool), Some(2), Some(3))
    );
    // Ties: user and tool both at 1 → user.
    let other = req(Some("bob"), Some("acme"), None);
    let d = *send(&svc, other)
        .await
        .extensions()
        .get::<Decision>()
        .unwrap();
    assert_eq!((d.rule(), d.remaining()), (Some(RuleKind::User), Some(3)));
    let d = *send(&svc, call())
        .await
        .extensions()
        .get::<Decision>()
        .unwrap();
    assert_eq!(
        (d.rule(), d.remaining()),
        (Some(RuleKind::Tool), Some(1)),
        "user 2, tenant 3, tool 1"
    );
    let d = *send(&svc, call())
        .await
        .extensions()
        .get::<Decision>()
        .unwrap();
    assert_eq!(
        (d.rule(), d.remaining()),
        (Some(RuleKind::Tool), Some(0)),
        "user 1, tenant 2, tool 0"
    );
    // Tool rejects alone.
    let resp = send(&svc, call()).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let d = *resp.extensions().get::<Decision>().unwrap();
    assert_eq!(d.rule(), Some(RuleKind::Tool));
    assert_eq!(d.violated().collect::<Vec<_>>(), [RuleKind::Tool]);
    // After the tool's window, alice's own minute is what's left: user 1 left.
    clock.advance(Duration::from_secs(10));
    let d = *send(&svc, call())
        .await
        .extensions()
        .get::<Decision>()
        .unwrap();
    assert_eq!(
        (d.rule(), d.remaining()),
        (Some(RuleKind::User), Some(0)),
        "user 0, tenant 1, tool 2"
    );
    // Now user and tenant... user rejects (reset ~50 s), tenant allows: user speaks.
    let resp = send(&svc, call()).await;
    let d = *resp.extensions().get::<Decision>().unwrap();
    assert_eq!(d.violated().collect::<Vec<_>>(), [RuleKind::User]);
    assert_eq!(d.rule(), Some(RuleKind::User));
    // bob uses the tenant's last call; then alice is rejected by user (wait ≈ 50 s) and
    // tenant (wait ≈ 1 h): the longest wait speaks, so Retry-After, X-RateLimit-Limit and
    // X-RateLimit-Reset all describe the tenant.
    let bob = send(&svc, req(Some("bob"), Some("acme"), None)).await;
    assert_eq!(bob.status(), StatusCode::OK);
    let resp = send(&svc, call()).await;
    let d = *resp.extensions().get::<Decision>().unwrap();
    assert_eq!(
        d.violated().collect::<Vec<_>>(),
        [RuleKind::User, RuleKind::Tenant]
    );
    assert_eq!(d.rule(), Some(RuleKind::Tenant));
    assert!(
        d.retry_after().unwrap() > Duration::from_secs(3000),
        "{:?}",
        d.retry_after()
    );
    let retry = num(resp.headers(), "retry-after");
    assert!(retry > 3000);
    assert_eq!(num(resp.headers(), "x-ratelimit-limit"), 6);
    assert_eq!(
        num(resp.headers(), "x-ratelimit-reset"),
        epoch_secs(&clock) + retry
    );
}

async fn the_429_body_is_problem_json_without_identities(b: &dyn Backend) {
    let clock = ManualClock::new();
    let (svc, _) = counting_service(b.layer(cfg("[by_tool]\nsearch = \"1/m\""), &clock));
    send(
        &svc,
        req(Some("alice-secret"), Some("tenant-secret"), Some("search")),
    )
    .await;
    let resp = send(
        &svc,
        req(Some("alice-secret"), Some("tenant-secret"), Some("Search")),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        header(resp.headers(), "content-type"),
        Some("application/problem+json")
    );
    let retry = num(resp.headers(), "retry-after");
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let text = std::str::from_utf8(&body).unwrap();
    assert!(!text.contains("secret"), "{text}");
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        json["type"],
        "https://iana.org/assignments/http-problem-types#quota-exceeded"
    );
    assert_eq!(json["title"], "Rate limit exceeded");
    assert_eq!(json["status"], 429);
    assert_eq!(json["code"], "RATE_LIMIT");
    assert_eq!(json["retry_after"], retry);
    assert_eq!(json["violated"], serde_json::json!(["tool"]));
    assert_eq!(json["detail"], "Rate limit exceeded for tool 'search'");
}

async fn ietf_headers_list_every_rule(b: &dyn Backend) {
    let clock = ManualClock::new();
    let layer = b.layer(
        cfg("by_user = \"30/m\"\nby_tenant = \"3000/m\"\nheaders = \"ietf\"\n[by_tool]\nsearch = \"10/m\""),
        &clock,
    );
    let (svc, _) = counting_service(layer);
    let resp = send(&svc, req(Some("a"), Some("t"), Some("search"))).await;
    assert_eq!(
        header(resp.headers(), "ratelimit-policy"),
        Some("\"user\";q=30;w=60, \"tenant\";q=3000;w=60, \"tool\";q=10;w=60")
    );
    assert_eq!(
        header(resp.headers(), "ratelimit"),
        Some("\"tool\";r=9;t=60")
    );
    assert!(resp.headers().get("x-ratelimit-limit").is_none());
    let layer = b.layer(cfg("by_user = \"1/m\"\nheaders = \"none\""), &clock);
    let (svc, _) = counting_service(layer);
    let ok = send(&svc, user("z")).await;
    assert!(!ok
        .headers()
        .keys()
        .any(|k| k.as_str().contains("ratelimit")));
    let limited = send(&svc, user("z")).await;
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(!limited
        .headers()
        .keys()
        .any(|k| k.as_str().contains("ratelimit")));
    assert!(
        num(limited.headers(), "retry-after") >= 1,
        "a 429 always says when to come back"
    );
    let layer = b.layer(cfg("by_user = \"1/m\"\nheaders = \"both\""), &clock);
    let (svc, _) = counting_service(layer);
    let resp = send(&svc, user("y")).await;
    assert!(
        resp.headers().contains_key("ratelimit")
            && resp.headers().contains_key("x-ratelimit-limit")
    );
}

async fn permissive_never_rejects_and_counts_like_enforce(b: &dyn Backend) {
    let enforce_clock = ManualClock::new();
    let (enforce, _) = counting_service(b.layer(cfg("by_user = \"3/m\""), &enforce_clock));
    let permissive_clock = ManualClock::new();
    let (permissive, calls) = counting_service(b.layer(
        cfg("by_user = \"3/m\"\nmode = \"permissive\""),
        &permissive_clock,
    ));
    for i in 0..8 {
        let e = send(&enforce, user("p-enforce")).await;
        let p = send(&permissive, user("p-permissive")).await;
        assert_eq!(p.status(), StatusCode::OK, "call {i}");
        for name in [
            "x-ratelimit-limit",
            "x-ratelimit-remaining",
            "x-ratelimit-reset",
        ] {
            assert_eq!(
                e.headers().get(name),
                p.headers().get(name),
                "call {i} {name}"
            );
        }
        assert!(p.headers().get("retry-after").is_none());
        let (de, dp) = (
            e.extensions().get::<Decision>().unwrap(),
            p.extensions().get::<Decision>().unwrap(),
        );
        assert_eq!(de.is_allowed(), dp.is_allowed());
        if i == 20 {
            enforce_clock.advance(Duration::from_secs(60));
        }
        if i == 5 {
            enforce_clock.advance(Duration::from_secs(60));
            permissive_clock.advance(Duration::from_secs(60));
        }
    }
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 8);
}

async fn disabled_counts_nothing(b: &dyn Backend) {
    let clock = ManualClock::new();
    let (off, calls) =
        counting_service(b.layer(cfg("by_user = \"1/m\"\nmode = \"disabled\""), &clock));
    for _ in 0..20 {
        let resp = send(&off, user("dora")).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.headers().is_empty(), "{:?}", resp.headers());
        assert!(resp.extensions().get::<Decision>().is_none());
    }
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 20);
    // Same store, now enforcing: dora's counter is untouched.
    let (on, _) = counting_service(b.layer(cfg("by_user = \"1/m\""), &clock));
    assert_eq!(send(&on, user("dora")).await.status(), StatusCode::OK);
    assert_eq!(
        send(&on, user("dora")).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}

async fn sliding_window_matches_the_contract(b: &dyn Backend) {
    let clock = ManualClock::new();
    let layer = b.layer(
        cfg("by_user = \"5/s\"\nalgorithm = \"sliding_window\""),
        &clock,
    );
    let (svc, _) = counting_service(layer);
    let mut allowed = 0;
    for _ in 0..5 {
        allowed += usize::from(send(&svc, user("s1")).await.status() == StatusCode::OK);
    }
    clock.advance(Duration::from_millis(500));
    for _ in 0..5 {
        allowed += usize::from(send(&svc, user("s1")).await.status() == StatusCode::OK);
    }
    assert_eq!(allowed, 5);

    let clock = ManualClock::new();
    let layer = b.layer(
        cfg("by_user = \"5/s\"\nalgorithm = \"sliding_window\""),
        &clock,
    );
    let (svc, _) = counting_service(layer);
    clock.advance(Duration::from_millis(900));
    let mut allowed = 0;
    for _ in 0..5 {
        allowed += usize::from(send(&svc, user("s2")).await.status() == StatusCode::OK);
    }
    clock.advance(Duration::from_millis(200));
    for _ in 0..5 {
        allowed += usize::from(send(&svc, user("s2")).await.status() == StatusCode::OK);
    }
    assert!((5..=6).contains(&allowed), "{allowed}");
}

async fn token_bucket_matches_the_contract(b: &dyn Backend) {
    let clock = ManualClock::new();
    let layer = b.layer(
        cfg("by_user = \"5/s\"\nalgorithm = \"token_bucket\""),
        &clock,
    );
    let (svc, _) = counting_service(layer);
    for i in 0..5 {
        assert_eq!(
            send(&svc, user("tb")).await.status(),
            StatusCode::OK,
            "call {i}"
        );
    }
    let sixth = send(&svc, user("tb")).await;
    assert_eq!(sixth.status(), StatusCode::TOO_MANY_REQUESTS);
    let decision = sixth.extensions().get::<Decision>().unwrap();
    assert_eq!(decision.retry_after(), Some(Duration::from_millis(200)));
    clock.advance(Duration::from_millis(199));
    assert_eq!(
        send(&svc, user("tb")).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    clock.advance(Duration::from_millis(1));
    assert_eq!(send(&svc, user("tb")).await.status(), StatusCode::OK);
    assert_eq!(
        send(&svc, user("tb")).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}

async fn identity_headers_are_read_when_named(b: &dyn Backend) {
    let clock = ManualClock::new();
    let layer = b.layer(
        cfg("by_user = \"1/m\"\nby_tenant = \"5/m\"\n[by_tool]\nsearch = \"5/m\"\n[identity]\nuser_header = \"x-user-id\"\ntenant_header = \"x-tenant-id\"\ntool_header = \"x-tool\""),
        &clock,
    );
    let (svc, calls) = counting_service(layer);
    let with = |pairs: &[(&str, &[u8])]| {
        let mut r = Request::new(Body::new());
        for (k, v) in pairs {
            r.headers_mut().append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_bytes(v).unwrap(),
            );
        }
        r
    };
    assert_eq!(
        send(&svc, with(&[("x-user-id", b" h-alice ")]))
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        send(&svc, with(&[("x-user-id", b"h-alice")]))
            .await
            .status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // Non-UTF-8 bytes are an opaque, distinct identity.
    assert_eq!(
        send(&svc, with(&[("x-user-id", b"h-\xff")])).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        send(&svc, with(&[("x-user-id", b"h-\xfe")])).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        send(&svc, with(&[("x-user-id", b"h-\xff")])).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    let resp = send(
        &svc,
        with(&[
            ("x-user-id", b"h-bob"),
            ("x-tenant-id", b"acme"),
            ("x-tool", b"SEARCH"),
        ]),
    )
    .await;
    let d = resp.extensions().get::<Decision>().unwrap();
    assert_eq!(d.rules().count(), 3);
    // The extension wins over headers.
    let mut r = with(&[("x-user-id", b"h-alice")]);
    r.extensions_mut().insert(Identity::user("h-carol"));
    assert_eq!(send(&svc, r).await.status(), StatusCode::OK);
    // A repeated identity header is refused, never resolved to either value.
    let before = calls.load(std::sync::atomic::Ordering::SeqCst);
    for name in ["x-user-id", "x-tenant-id", "x-tool"] {
        let resp = send(&svc, with(&[(name, b"h-dave"), (name, b"h-erin")])).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{name}");
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        let text = String::from_utf8_lossy(&body);
        assert!(
            text.contains("INVALID_IDENTITY")
                && !text.contains("h-dave")
                && !text.contains("h-erin"),
            "{text}"
        );
    }
    // An id over 256 bytes is refused, not truncated onto someone else's counter.
    let long = vec![b'a'; 300];
    assert_eq!(
        send(&svc, with(&[("x-user-id", &long)])).await.status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), before);
}

async fn concurrent_requests_allow_exactly_the_limit(b: &dyn Backend) {
    let clock = ManualClock::new();
    let (svc, calls) =
        counting_service(b.layer(cfg("by_user = \"50/m\"\nby_tenant = \"1000/m\""), &clock));
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move {
                svc.oneshot(req(Some("crowd"), Some("acme"), None))
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        ok += usize::from(t.await.unwrap() == StatusCode::OK);
    }
    assert_eq!(ok, 50);
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 50);
    // The tenant counted exactly the 50 allowed requests.
    let (svc2, _) = counting_service(b.layer(cfg("by_tenant = \"1000/m\""), &clock));
    let d = *send(&svc2, req(Some("other"), Some("acme"), None))
        .await
        .extensions()
        .get::<Decision>()
        .unwrap();
    assert_eq!(d.remaining(), Some(1000 - 50 - 1));
}

async fn clones_of_the_layer_and_service_share_counters(b: &dyn Backend) {
    let clock = ManualClock::new();
    let layer = b.layer(cfg("by_user = \"2/m\""), &clock);
    let (a, _) = counting_service(layer.clone());
    let (b2, _) = counting_service(layer);
    assert_eq!(send(&a, user("c")).await.status(), StatusCode::OK);
    assert_eq!(send(&b2, user("c")).await.status(), StatusCode::OK);
    assert_eq!(
        send(&a.clone(), user("c")).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}

/// When the user's and the tool's rule refuse alike (same wait), the user's speaks for the
/// headers, and the body still names the tool that was over its limit.
async fn the_refusal_names_the_tool_when_rules_tie(b: &dyn Backend) {
    let clock = ManualClock::new();
    let layer = b.layer(
        cfg("by_user = \"1/m\"\n[by_tool]\nsearch = \"1/m\""),
        &clock,
    );
    let (svc, _) = counting_service(layer);
    let call = || req(Some("alice"), None, Some("Search"));
    assert_eq!(send(&svc, call()).await.status(), StatusCode::OK);
    let refused = send(&svc, call()).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(decision(&refused).rule(), Some(RuleKind::User));
    let json = body_json(refused).await;
    assert_eq!(json["violated"], serde_json::json!(["user", "tool"]));
    assert_eq!(json["tool"], "search");
    // A refusal by the user's rule alone names no tool.
    let other = send(&svc, req(Some("alice"), None, Some("fetch"))).await;
    let json = body_json(other).await;
    assert_eq!(json["violated"], serde_json::json!(["user"]));
    assert!(json.get("tool").is_none(), "{json}");
}

async fn body_json(resp: Resp) -> serde_json::Value {
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    serde_json::from_slice(&body).unwrap()
}

fn decision(resp: &Resp) -> Decision {
    *resp.extensions().get::<Decision>().unwrap()
}

/// With four rules, two refusing with different
/// waits, every header and the body describe the one with the longest wait, and a client
/// that comes back at `X-RateLimit-Reset` is let in.
async fn headers_agree_on_a_multi_rule_429(b: &dyn Backend) {
    let clock = ManualClock::new();
    let layer = b.layer(
        cfg(r#"
            by_user = "10/m"
            by_tenant = "100/h"
            headers = "both"
            [by_tool]
            search = "1/10s"
            [by_user_tool]
            search = "1/30s"
        "#),
        &clock,
    );
    let (svc, _) = counting_service(layer);
    let call = || req(Some("alice"), Some("acme"), Some("search"));
    let first = send(&svc, call()).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(decision(&first).rules().count(), 4);
    assert_eq!(
        header(first.headers(), "ratelimit-policy"),
        Some("\"user\";q=10;w=60, \"tenant\";q=100;w=3600, \"tool\";q=1;w=10, \"user_tool\";q=1;w=30")
    );
    let refused = send(&svc, call()).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let d = decision(&refused);
    assert_eq!(
        d.violated().collect::<Vec<_>>(),
        [RuleKind::Tool, RuleKind::UserTool]
    );
    assert_eq!(d.rule(), Some(RuleKind::UserTool));
    let h = refused.headers();
    assert_eq!(num(h, "retry-after"), 30);
    assert_eq!(num(h, "x-ratelimit-limit"), 1);
    assert_eq!(num(h, "x-ratelimit-remaining"), 0);
    assert_eq!(num(h, "x-ratelimit-reset"), epoch_secs(&clock) + 30);
    assert_eq!(header(h, "ratelimit"), Some("\"user_tool\";r=0;t=30"));
    let json = body_json(refused).await;
    assert_eq!(json["retry_after"], 30);
    assert_eq!(json["violated"], serde_json::json!(["tool", "user_tool"]));
    assert_eq!(
        json["detail"],
        "Rate limit exceeded for tool 'search': per-user limit of 1/30s"
    );
    // Obeying the tool's own 10 s would be refused again; obeying the headers is not.
    clock.advance(Duration::from_secs(10));
    assert_eq!(
        send(&svc, call()).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    clock.advance(Duration::from_secs(20));
    assert_eq!(send(&svc, call()).await.status(), StatusCode::OK);
}

/// `by_user_tool`: each user's own counter for a tool, beside `by_tool`'s shared one.
async fn by_user_tool_gives_each_user_their_own_counter(b: &dyn Backend) {
    let clock = ManualClock::new();
    let layer = b.layer(
        cfg("[by_tool]\nsearch = \"5/m\"\n[by_user_tool]\nsearch = \"2/m\"\n\" Fetch \" = \"1/m\""),
        &clock,
    );
    let (svc, _) = counting_service(layer);
    for _ in 0..2 {
        let ok = send(&svc, req(Some("alice"), None, Some("Search"))).await;
        assert_eq!(ok.status(), StatusCode::OK);
    }
    let refused = send(&svc, req(Some("alice"), None, Some("search"))).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        decision(&refused).violated().collect::<Vec<_>>(),
        [RuleKind::UserTool]
    );
    // bob has his own counter (1 left after this call); the shared tool counter 5 − 3 = 2.
    let bob = send(&svc, req(Some("bob"), None, Some("search"))).await;
    assert_eq!(bob.status(), StatusCode::OK);
    let d = decision(&bob);
    assert_eq!(
        (d.rule(), d.remaining()),
        (Some(RuleKind::UserTool), Some(1))
    );
    // A tool only by_user_tool names, and anonymous callers (one shared user).
    assert_eq!(
        send(&svc, req(Some("alice"), None, Some("fetch")))
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        send(&svc, req(Some("alice"), None, Some("fetch")))
            .await
            .status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        send(&svc, req(None, None, Some("fetch"))).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        send(&svc, req(Some(""), None, Some("fetch")))
            .await
            .status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // A user called like a tool, or a tool called like a user, shares nothing.
    assert_eq!(
        send(&svc, req(Some("search"), None, Some("fetch")))
            .await
            .status(),
        StatusCode::OK
    );
}

/// ARCHITECTURE.md, behaviour contract item 4, with four keys: a request the user rule
/// refuses counts under none of tenant, tool and user×tool.
async fn a_refused_request_counts_under_none_of_four_keys(b: &dyn Backend) {
    let clock = ManualClock::new();
    let rules =
        "by_tenant = \"10/m\"\n[by_tool]\nsearch = \"10/m\"\n[by_user_tool]\nsearch = \"10/m\"";
    let layer = b.layer(cfg(&format!("by_user = \"2/m\"\n{rules}")), &clock);
    let (svc, _) = counting_service(layer);
    let call = || req(Some("mallory"), Some("acme"), Some("search"));
    for _ in 0..2 {
        assert_eq!(send(&svc, call()).await.status(), StatusCode::OK);
    }
    for _ in 0..10 {
        let resp = send(&svc, call()).await;
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            decision(&resp).violated().collect::<Vec<_>>(),
            [RuleKind::User]
        );
    }
    // The same rules without by_user, over the same store: each counted only the two.
    let (view, _) = counting_service(b.layer(cfg(rules), &clock));
    let d = decision(&send(&view, call()).await);
    assert!(d.is_allowed());
    let verdicts: Vec<_> = d.rules().map(|(kind, _)| kind).collect();
    assert_eq!(
        verdicts,
        [RuleKind::Tenant, RuleKind::Tool, RuleKind::UserTool]
    );
    assert_eq!(d.remaining(), Some(10 - 2 - 1));
    // Every one of the three has 7 left: exhaust them together, exactly at the 8th.
    for i in 0..7 {
        assert_eq!(send(&view, call()).await.status(), StatusCode::OK, "{i}");
    }
    assert_eq!(
        send(&view, call()).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}

const TIERS: &str = r#"
by_user = "2/m"
by_tenant = "100/m"
[by_tool]
search = "1/m"
[tiers.pro]
by_user = "4/m"
[tiers.pro.by_tool]
search = "3/m"
[tiers.empty]
[tenants]
acme = "pro"
" initech " = "pro"
"#;

/// Tiers override the rules they name, inherit the rest, and count in counters of their
/// own: one tenant's tier never touches another's counters.
async fn tiers_override_what_they_name_and_inherit_the_rest(b: &dyn Backend) {
    let clock = ManualClock::new();
    let (svc, _) = counting_service(b.layer(cfg(TIERS), &clock));
    // A pro tenant's user: 4 a minute; the tenant rule is inherited (100).
    for i in 0..4 {
        let resp = send(&svc, req(Some("alice"), Some("acme"), None)).await;
        assert_eq!(resp.status(), StatusCode::OK, "{i}");
        let rules: Vec<_> = decision(&resp).rules().collect();
        assert_eq!(rules[0].1.count(), 4);
        assert_eq!(rules[1].1.count(), 100);
    }
    let refused = send(&svc, req(Some("alice"), Some("acme"), None)).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(num(refused.headers(), "x-ratelimit-limit"), 4);
    // The same user under a free tenant is a different counter with the base rate.
    for _ in 0..2 {
        let resp = send(&svc, req(Some("alice"), Some("globex"), None)).await;
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let refused = send(&svc, req(Some("alice"), Some("globex"), None)).await;
    assert_eq!(num(refused.headers(), "x-ratelimit-limit"), 2);
    // The tool: pro callers share the pro counter (3), free callers the base one (1).
    for i in 0..3 {
        let resp = send(
            &svc,
            req(Some(&format!("p{i}")), Some("initech"), Some("search")),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::OK, "{i}");
    }
    let refused = send(&svc, req(Some("p9"), Some("acme"), Some("search"))).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        send(&svc, req(Some("f1"), Some("globex"), Some("search")))
            .await
            .status(),
        StatusCode::OK,
        "pro calls never touched the free tool counter"
    );
    assert_eq!(
        send(&svc, req(Some("f2"), None, Some("search")))
            .await
            .status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // The app's Tier extension wins over [tenants]; a tier naming nothing is the base.
    let mut own = req(Some("erin"), Some("globex"), None);
    own.extensions_mut().insert(Tier::new("pro"));
    assert_eq!(num(send(&svc, own).await.headers(), "x-ratelimit-limit"), 4);
    let mut empty = req(Some("erin"), Some("acme"), None);
    empty.extensions_mut().insert(Tier::new("empty"));
    assert_eq!(
        num(send(&svc, empty).await.headers(), "x-ratelimit-limit"),
        2
    );
    let mut unknown = req(Some("erin"), Some("acme"), None);
    unknown.extensions_mut().insert(Tier::new("platinum"));
    assert_eq!(
        num(send(&svc, unknown).await.headers(), "x-ratelimit-limit"),
        2
    );
}

/// A tenant moved from free to pro starts its pro counters: a free user at its limit is
/// let in at once under the pro rules (and the free counters stay as they were).
async fn a_tenant_moved_to_another_tier_starts_its_counters(b: &dyn Backend) {
    let clock = ManualClock::new();
    let free = TIERS.replace("acme = \"pro\"", "");
    let (before, _) = counting_service(b.layer(cfg(&free), &clock));
    for _ in 0..2 {
        assert_eq!(
            send(&before, req(Some("zoe"), Some("acme"), None))
                .await
                .status(),
            StatusCode::OK
        );
    }
    assert_eq!(
        send(&before, req(Some("zoe"), Some("acme"), None))
            .await
            .status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    let (after, _) = counting_service(b.layer(cfg(TIERS), &clock));
    let resp = send(&after, req(Some("zoe"), Some("acme"), None)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(num(resp.headers(), "x-ratelimit-remaining"), 3);
}

/// `[identity] tool_path`: the tool from the path when no `ToolName` is present.
async fn the_tool_is_taken_from_the_path(b: &dyn Backend) {
    let clock = ManualClock::new();
    let layer = b.layer(
        cfg("[by_tool]\nsearch = \"1/m\"\n[identity]\ntool_path = \"/tools/{name}\""),
        &clock,
    );
    let (svc, _) = counting_service(layer);
    let at = |path: &str| {
        let mut r = Request::post(path).body(Body::new()).unwrap();
        r.extensions_mut().insert(Identity::user("pat"));
        r
    };
    assert_eq!(
        send(&svc, at("/tools/Search")).await.status(),
        StatusCode::OK
    );
    for path in ["/tools/search", "/tools/search/", "/tools/s%65arch?x=1"] {
        let resp = send(&svc, at(path)).await;
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS, "{path}");
        assert_eq!(
            body_json(resp).await["detail"],
            "Rate limit exceeded for tool 'search'"
        );
    }
    for path in [
        "/tools/fetch",
        "/tools",
        "/other/search",
        "/tools/search/more",
    ] {
        let resp = send(&svc, at(path)).await;
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        assert!(resp.headers().get("x-ratelimit-limit").is_none(), "{path}");
    }
    // The extension wins over the path.
    let mut named = at("/tools/search");
    named.extensions_mut().insert(ToolName::new("fetch"));
    assert_eq!(send(&svc, named).await.status(), StatusCode::OK);
}

fn from(peer: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut r = Request::new(Body::new());
    let addr: std::net::IpAddr = peer.parse().unwrap();
    r.extensions_mut().insert(SocketAddr::new(addr, 40_000));
    for (k, v) in headers {
        r.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    r
}

/// `anonymous = "by_ip"`: each client network its own bucket, forwarding headers believed
/// only from trusted proxies and walked from the right.
async fn anonymous_callers_are_counted_by_client_address(b: &dyn Backend) {
    let clock = ManualClock::new();
    let layer = b.layer(
        cfg(r#"
            by_user = "1/m"
            anonymous = "by_ip"
            [identity]
            trusted_proxies = ["10.0.0.0/8", "::1/128"]
        "#),
        &clock,
    );
    let (svc, _) = counting_service(layer);
    let status = |r: Request<Body>| {
        let svc = svc.clone();
        async move { send(&svc, r).await.status() }
    };
    const OK: StatusCode = StatusCode::OK;
    const NO: StatusCode = StatusCode::TOO_MANY_REQUESTS;
    assert_eq!(status(from("192.0.2.1", &[])).await, OK);
    assert_eq!(status(from("192.0.2.1", &[])).await, NO);
    assert_eq!(status(from("192.0.2.2", &[])).await, OK, "another client");
    // IPv4-mapped IPv6 is the IPv4 client.
    assert_eq!(status(from("::ffff:192.0.2.2", &[])).await, NO);
    // One IPv6 /64 is one client.
    assert_eq!(status(from("2001:db8:1:1::1", &[])).await, OK);
    assert_eq!(status(from("2001:db8:1:1:ffff::9", &[])).await, NO);
    assert_eq!(
        status(from("2001:db8:1:2::1", &[])).await,
        OK,
        "another /64"
    );
    // Named users never share an address's bucket, whatever they are called.
    for name in ["192.0.2.1", "@192.0.2.1/32", "anonymous"] {
        let mut r = from("192.0.2.1", &[]);
        r.extensions_mut().insert(Identity::user(name));
        assert_eq!(status(r).await, OK, "{name}");
    }
    // Behind a trusted proxy: the rightmost address that is not a proxy is the client;
    // a client prepending entries does not change it.
    let xff = |v: &str| from("10.0.0.1", &[("x-forwarded-for", v)]);
    assert_eq!(status(xff("198.51.100.7, 10.0.0.2")).await, OK);
    assert_eq!(
        status(xff("203.0.113.99, 198.51.100.7")).await,
        NO,
        "spoofed left-most entry"
    );
    assert_eq!(status(xff("198.51.100.8")).await, OK);
    // An untrusted peer's header is ignored: it is counted as itself.
    let spoof = from("192.0.2.50", &[("x-forwarded-for", "198.51.100.9")]);
    assert_eq!(status(spoof).await, OK);
    assert_eq!(
        status(from("10.0.0.1", &[("x-forwarded-for", "198.51.100.9")])).await,
        OK
    );
    // Forwarded (RFC 7239), from the trusted IPv6 loopback.
    let fwd = |v: &str| from("::1", &[("forwarded", v)]);
    assert_eq!(
        status(fwd("for=\"[2001:db8:5::1]:4711\";proto=https")).await,
        OK
    );
    assert_eq!(
        status(fwd("for=203.0.113.1, for=\"[2001:db8:5::2]\"")).await,
        NO
    );
    // The proxy's own requests, and garbage behind it, count as the proxy.
    assert_eq!(status(from("10.0.0.3", &[])).await, OK);
    assert_eq!(
        status(from("10.0.0.3", &[("x-forwarded-for", "not-an-ip")])).await,
        NO
    );
    // Without a peer address: the shared anonymous bucket.
    assert_eq!(status(Request::new(Body::new())).await, OK);
    assert_eq!(status(Request::new(Body::new())).await, NO);
}

common::suite!(
    two_per_second_then_429_then_reset,
    no_limits_means_no_rate_headers,
    users_within_their_limit_are_never_blocked,
    a_thousand_users_one_call_each,
    unicode_identities_are_distinct_users,
    missing_and_blank_users_share_the_anonymous_bucket,
    tool_names_are_trimmed_and_lower_cased,
    tenants_never_share_a_counter,
    a_tenant_limit_blocks_every_user_of_the_tenant,
    a_blocked_user_consumes_no_tenant_or_tool_quota,
    the_most_restrictive_rule_speaks,
    the_429_body_is_problem_json_without_identities,
    ietf_headers_list_every_rule,
    permissive_never_rejects_and_counts_like_enforce,
    disabled_counts_nothing,
    sliding_window_matches_the_contract,
    token_bucket_matches_the_contract,
    identity_headers_are_read_when_named,
    concurrent_requests_allow_exactly_the_limit,
    clones_of_the_layer_and_service_share_counters,
    headers_agree_on_a_multi_rule_429,
    the_refusal_names_the_tool_when_rules_tie,
    by_user_tool_gives_each_user_their_own_counter,
    a_refused_request_counts_under_none_of_four_keys,
    tiers_override_what_they_name_and_inherit_the_rest,
    a_tenant_moved_to_another_tier_starts_its_counters,
    the_tool_is_taken_from_the_path,
    anonymous_callers_are_counted_by_client_address,
);

#[tokio::test]
async fn the_decision_extension_can_be_turned_off() {
    let clock = ManualClock::new();
    let layer = common::Memory::default()
        .layer(cfg("by_user = \"1/m\""), &clock)
        .decision_extension(false);
    let (svc, _) = counting_service(layer);
    let ok = send(&svc, user("x")).await;
    assert_eq!(num(ok.headers(), "x-ratelimit-remaining"), 0);
    assert!(ok.extensions().get::<Decision>().is_none());
    let limited = send(&svc, user("x")).await;
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(limited.extensions().get::<Decision>().is_none());
}
