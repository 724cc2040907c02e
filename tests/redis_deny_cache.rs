//! The Redis store's deny cache: a key Redis refused until T is refused locally until T,
//! without a round trip; exactly as Redis would, and never longer.

#![cfg(feature = "redis")]

mod common;

use std::time::Duration;

use common::redis::{command_calls, fresh_prefix, RedisServer};
use common::{counting_service, Body};
use http::{Request, StatusCode};
use tollgate::{
    Decision, Identity, ManualClock, RateLimitConfig, RateLimitLayer, RedisStore, ToolName,
};
use tower::ServiceExt;

fn req(user: &str, tool: Option<&str>) -> Request<Body> {
    let mut r = Request::new(Body::new());
    r.extensions_mut()
        .insert(Identity::user(user).with_tenant("acme"));
    if let Some(tool) = tool {
        r.extensions_mut().insert(ToolName::new(tool));
    }
    r
}

fn store(server: &RedisServer, prefix: &str, deny_cache: usize) -> RedisStore {
    RedisStore::builder(server.url())
        .key_prefix(prefix)
        .caller_time(true)
        .timeout(Duration::from_secs(5))
        .deny_cache(deny_cache)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_a_refused_user_costs_no_round_trips() {
    let Some(server) = RedisServer::private("a_flood_from_a_refused_user_costs_no_round_trips")
    else {
        return;
    };
    let mut conn = server.conn().await;
    let prefix = fresh_prefix();
    let clock = ManualClock::new();
    let cfg = RateLimitConfig::from_toml_str(
        "by_user = \"3/m\"\nby_tenant = \"1000/m\"\n[by_tool]\nsearch = \"1000/m\"",
    )
    .unwrap();
    let layer =
        RateLimitLayer::with_store(cfg, store(&server, &prefix, 10_000)).with_clock(clock.clone());
    let (svc, calls) = counting_service(layer);

    for _ in 0..3 {
        let resp = svc
            .clone()
            .oneshot(req("mallory", Some("search")))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let before = command_calls(&mut conn, "evalsha").await;
    let first = svc
        .clone()
        .oneshot(req("mallory", Some("search")))
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry = first
        .extensions()
        .get::<Decision>()
        .unwrap()
        .retry_after()
        .unwrap();
    let reset = first.headers()["x-ratelimit-reset"].clone();
    // Within the cache's hold (a second: a reset elsewhere is seen within it).
    clock.advance(Duration::from_millis(500));
    for i in 0..500 {
        let resp = svc
            .clone()
            .oneshot(req("mallory", Some("search")))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS, "request {i}");
        // The same answer Redis gave, half a second on.
        let d = resp.extensions().get::<Decision>().unwrap();
        assert_eq!(d.retry_after(), Some(retry - Duration::from_millis(500)));
        assert_eq!(resp.headers()["x-ratelimit-reset"], reset);
        assert_eq!(resp.headers()["x-ratelimit-remaining"], "0");
    }
    let after = command_calls(&mut conn, "evalsha").await;
    assert_eq!(after - before, 1, "only the first refusal asked Redis");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);

    // Other users still go to Redis, and the refused flood counted nowhere: the tenant and
    // the tool saw only mallory's 3 allowed calls.
    let other = svc
        .clone()
        .oneshot(req("alice", Some("search")))
        .await
        .unwrap();
    assert_eq!(other.status(), StatusCode::OK);
    assert_eq!(command_calls(&mut conn, "evalsha").await - after, 1);
    let tenant_view = RateLimitConfig::from_toml_str("by_tenant = \"1000/m\"").unwrap();
    let (view, _) = counting_service(
        RateLimitLayer::with_store(tenant_view, store(&server, &prefix, 0))
            .with_clock(clock.clone()),
    );
    let d = *view
        .oneshot(req("bob", None))
        .await
        .unwrap()
        .extensions()
        .get::<Decision>()
        .unwrap();
    assert_eq!(d.remaining(), Some(1000 - 3 - 1 - 1));

    // When Redis said the key allows again, Redis decides again (and allows).
    clock.advance(retry - Duration::from_millis(500));
    let back = svc
        .clone()
        .oneshot(req("mallory", Some("search")))
        .await
        .unwrap();
    assert_eq!(back.status(), StatusCode::OK);
    // alice, the tenant view, and now mallory again: three round trips since the flood.
    assert_eq!(command_calls(&mut conn, "evalsha").await - after, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_turns_the_cache_on_by_default_and_off_with_zero() {
    let Some(server) =
        RedisServer::private("the_config_turns_the_cache_on_by_default_and_off_with_zero")
    else {
        return;
    };
    let mut conn = server.conn().await;
    for (setting, round_trips) in [("", 1), ("deny_cache = 0\n", 20)] {
        let toml = format!(
            "by_user = \"1/h\"\n[backend]\nkind = \"redis\"\nurl = \"{}\"\nkey_prefix = \"{}\"\ntimeout_ms = 5000\n{setting}",
            server.url(),
            fresh_prefix()
        );
        let layer = RateLimitLayer::new(RateLimitConfig::from_toml_str(&toml).unwrap());
        let (svc, _) = counting_service(layer);
        assert_eq!(
            svc.clone()
                .oneshot(req("dora", None))
                .await
                .unwrap()
                .status(),
            StatusCode::OK
        );
        let before = command_calls(&mut conn, "evalsha").await;
        for _ in 0..20 {
            let resp = svc.clone().oneshot(req("dora", None)).await.unwrap();
            assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        }
        let calls = command_calls(&mut conn, "evalsha").await - before;
        assert_eq!(calls, round_trips, "{setting:?}");
    }
}
