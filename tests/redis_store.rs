//! The Redis store against a real redis-server: one round trip per request, all-or-nothing,
//! TTLs, collision-free keys, several instances sharing one limit, and the config path.
#![cfg(feature = "redis")]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::redis::{command_calls, keys_under, RedisBackend, RedisServer};
use common::{counting_service, Backend, Body};
use http::{Request, StatusCode};
use tollgate::{Clock, Decision, Identity, ManualClock, RateLimitConfig, RateLimitLayer, ToolName};
use tower::ServiceExt;

fn req(user: &str, tenant: Option<&str>, tool: Option<&str>) -> Request<Body> {
    let mut req = Request::new(Body::new());
    let mut id = Identity::user(user);
    if let Some(t) = tenant {
        id = id.with_tenant(t);
    }
    req.extensions_mut().insert(id);
    if let Some(tool) = tool {
        req.extensions_mut().insert(ToolName::new(tool));
    }
    req
}

fn cfg(toml: &str) -> RateLimitConfig {
    RateLimitConfig::from_toml_str(toml).unwrap()
}

/// A config whose `[backend]` is Redis at `url` (server time, the config path).
fn redis_cfg(limits: &str, url: &str, prefix: &str, extra_backend: &str) -> RateLimitConfig {
    cfg(&format!(
        "{limits}\n[backend]\nkind = \"redis\"\nurl = \"{url}\"\nkey_prefix = \"{prefix}\"\n{extra_backend}"
    ))
}

/// Four rules: user, tenant, tool and user×tool (the most one request carries).
const LIMITS: &str = "by_user = \"2/m\"\nby_tenant = \"100/m\"\n[by_tool]\nsearch = \"100/m\"\n[by_user_tool]\nsearch = \"50/m\"";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_script_call_per_request_whatever_the_number_of_rules() {
    let Some(server) = RedisServer::private("one_script_call_per_request") else {
        return;
    };
    let backend = RedisBackend::on(Arc::new(server));
    let clock = ManualClock::new();
    let (svc, _) = counting_service(backend.layer(cfg(LIMITS), &clock));
    let mut conn = backend.server().conn().await;
    // Warm up: the first call may load the script (NOSCRIPT → SCRIPT LOAD → EVALSHA).
    let first = svc
        .clone()
        .oneshot(req("warm", Some("acme"), Some("search")))
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();
    for i in 0..10 {
        let user = format!("u{i}");
        let resp = svc
            .clone()
            .oneshot(req(&user, Some("acme"), Some("search")))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let rules = resp.extensions().get::<Decision>().unwrap().rules().count();
        assert_eq!(
            rules, 4,
            "user, tenant, tool and user×tool rules all applied"
        );
    }
    let evalsha = command_calls(&mut conn, "evalsha").await;
    let eval = command_calls(&mut conn, "eval").await;
    let load = command_calls(&mut conn, "script|load").await;
    // Every command the server ran besides ours (INFO, CONFIG) is counted too: the
    // store issued exactly 10 EVALSHA and nothing else.
    let (mget, get, set) = (
        command_calls(&mut conn, "mget").await,
        command_calls(&mut conn, "get").await,
        command_calls(&mut conn, "set").await,
    );
    assert_eq!((evalsha, eval, load), (10, 0, 0));
    assert_eq!(
        mget, 10,
        "the four keys read at once inside each script call"
    );
    assert_eq!(get, 0, "and no key read again");
    assert_eq!(set, 40, "and each written once, with its expiry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_limit_user_leaves_tenant_tool_and_user_tool_counters_untouched() {
    let Some(backend) = RedisBackend::start("an_over_limit_user_leaves_counters_untouched") else {
        return;
    };
    let clock = ManualClock::new();
    let (svc, _) = counting_service(backend.layer(cfg(LIMITS), &clock));
    let mut conn = backend.server().conn().await;
    for _ in 0..2 {
        let ok = svc
            .clone()
            .oneshot(req("greedy", Some("acme"), Some("search")))
            .await
            .unwrap();
        assert_eq!(ok.status(), StatusCode::OK);
    }
    let snapshot = |keys: Vec<String>| async {
        let mut conn = backend.server().conn().await;
        let mut out = Vec::new();
        for k in keys {
            let state: Option<Vec<u8>> = redis::cmd("GET")
                .arg(&k)
                .query_async(&mut conn)
                .await
                .unwrap();
            out.push((k, state));
        }
        out.sort();
        out
    };
    let keys = keys_under(&mut conn, backend.prefix()).await;
    assert_eq!(keys.len(), 4, "{keys:?}");
    let before = snapshot(keys.clone()).await;
    for _ in 0..20 {
        let no = svc
            .clone()
            .oneshot(req("greedy", Some("acme"), Some("search")))
            .await
            .unwrap();
        assert_eq!(no.status(), StatusCode::TOO_MANY_REQUESTS);
    }
    assert_eq!(
        snapshot(keys).await,
        before,
        "rejected requests wrote nothing"
    );
    // The tenant and the tool still have 98 of 100 left.
    let other = svc
        .clone()
        .oneshot(req("modest", Some("acme"), Some("search")))
        .await
        .unwrap();
    let d = other.extensions().get::<Decision>().unwrap();
    assert_eq!(
        other.headers()["x-ratelimit-remaining"],
        "1",
        "the user rule speaks"
    );
    assert!(d.is_allowed());
    let (tenant_svc, _) = counting_service(backend.layer(cfg("by_tenant = \"100/m\""), &clock));
    let t = tenant_svc
        .oneshot(req("x", Some("acme"), None))
        .await
        .unwrap();
    assert_eq!(
        t.headers()["x-ratelimit-remaining"],
        "96",
        "2 + 1 counted, this one makes 4"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_under_the_prefix_has_a_ttl_within_one_period() {
    let Some(server) = RedisServer::any("every_key_has_a_ttl") else {
        return;
    };
    let server = Arc::new(server);
    for alg in ["fixed_window", "sliding_window", "token_bucket"] {
        let backend = RedisBackend::on(server.clone());
        let clock = ManualClock::new();
        let limits = format!("algorithm = \"{alg}\"\nby_user = \"3/10s\"\nby_tenant = \"100/m\"\n[by_tool]\nsearch = \"100/h\"");
        let (svc, _) = counting_service(backend.layer(cfg(&limits), &clock));
        for i in 0..40 {
            let user = format!("u{}", i % 7);
            let _ = svc
                .clone()
                .oneshot(req(&user, Some(&format!("t{}", i % 3)), Some("search")))
                .await
                .unwrap();
            clock.advance(Duration::from_millis(700));
        }
        let mut conn = server.conn().await;
        let keys = keys_under(&mut conn, backend.prefix()).await;
        assert_eq!(keys.len(), 7 + 3 + 1, "{alg}: {keys:?}");
        for key in keys {
            let ttl: i64 = redis::cmd("PTTL")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            // Sliding window keeps two periods (the previous window weighs in).
            let period_ms: i64 = if key.contains(":u:") {
                10_000
            } else if key.contains(":t:") {
                60_000
            } else {
                3_600_000
            };
            let bound = if alg == "sliding_window" {
                2 * period_ms
            } else {
                period_ms
            };
            assert!(
                ttl > 0 && ttl <= bound,
                "{alg}: {key} has PTTL {ttl} (bound {bound})"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_with_separators_never_collide() {
    let Some(backend) = RedisBackend::start("identities_with_separators_never_collide") else {
        return;
    };
    let clock = ManualClock::new();
    let (svc, _) =
        counting_service(backend.layer(cfg("by_user = \"1/m\"\nby_tenant = \"1/m\""), &clock));
    let ids = [
        "a:b",
        "a",
        "a:b:c",
        "{a}",
        "a}",
        "{a",
        "a\nb",
        "a%3Ab",
        "a b",
        "anonymous",
        "ä",
        "a%7B",
    ];
    // Each id is both a user (alone) and, with a different user, a tenant: every one of
    // these first requests must pass, so no two share a counter.
    for (i, id) in ids.iter().enumerate() {
        let resp = svc.clone().oneshot(req(id, None, None)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "user {id:?}");
        let resp = svc
            .clone()
            .oneshot(req(&format!("tenant-user-{i}"), Some(id), None))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "tenant {id:?}");
    }
    for id in ids {
        let resp = svc.clone().oneshot(req(id, None, None)).await.unwrap();
        assert_eq!(
            resp.status(),
            StatusCode::TOO_MANY_REQUESTS,
            "user {id:?} counted once"
        );
    }
    let mut conn = backend.server().conn().await;
    let keys = keys_under(&mut conn, backend.prefix()).await;
    assert_eq!(keys.len(), 2 * ids.len() + ids.len(), "{keys:?}");
    assert_eq!(keys.iter().collect::<HashSet<_>>().len(), keys.len());
    for k in &keys {
        // One `{…}`: the subject, as the cluster hash tag; no separator inside it.
        let tag = k.rsplit_once(':').unwrap().1;
        let subject = tag.strip_prefix('{').and_then(|t| t.strip_suffix('}'));
        assert!(
            subject.is_some_and(|s| !s.contains(['{', '}', '\n', ' ', ':'])),
            "{k:?}"
        );
    }
}

/// Three instances (each its own layer, store and pool), one Redis, server time.
fn instances(url: &str, prefix: &str, limits: &str) -> Vec<RateLimitLayer> {
    (0..3)
        .map(|_| {
            RateLimitLayer::new(redis_cfg(
                limits,
                url,
                prefix,
                "timeout_ms = 5000\npool_size = 4",
            ))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_one_exact_limit() {
    let Some(server) = RedisServer::any("three_instances_share_one_exact_limit") else {
        return;
    };
    let prefix = common::redis::fresh_prefix();
    let layers = instances(server.url(), &prefix, "by_user = \"100/m\"");
    let services: Vec<_> = layers.iter().map(|l| counting_service(l.clone())).collect();
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let svc = services[i % 3].0.clone();
            tokio::spawn(async move {
                svc.oneshot(req("shared", None, None))
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    let mut allowed = 0;
    let mut limited = 0;
    for t in tasks {
        match t.await.unwrap() {
            StatusCode::OK => allowed += 1,
            StatusCode::TOO_MANY_REQUESTS => limited += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((allowed, limited), (100, 200));
    let inner: usize = services
        .iter()
        .map(|(_, c)| c.load(std::sync::atomic::Ordering::SeqCst))
        .sum();
    assert_eq!(inner, 100);
    for l in &layers {
        assert_eq!(l.stats().store_errors, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_reset_for_every_instance_at_once() {
    let Some(server) = RedisServer::any("windows_reset_for_every_instance_at_once") else {
        return;
    };
    let prefix = common::redis::fresh_prefix();
    let layers = instances(server.url(), &prefix, "by_user = \"3/s\"");
    let services: Vec<_> = layers
        .iter()
        .map(|l| counting_service(l.clone()).0)
        .collect();
    // Fill the window through the first instance...
    for _ in 0..3 {
        assert_eq!(
            services[0]
                .clone()
                .oneshot(req("w", None, None))
                .await
                .unwrap()
                .status(),
            StatusCode::OK
        );
    }
    // ...and every instance sees it full, with one reset time.
    let mut resets = HashSet::new();
    for svc in &services {
        let resp = svc.clone().oneshot(req("w", None, None)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        resets.insert(
            resp.headers()["x-ratelimit-reset"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert!(
        resets.len() <= 2,
        "one reset time (second rounding aside): {resets:?}"
    );
    // After the window, every instance allows again (from Redis: 3 in total, not 9).
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let mut allowed = 0;
    for round in 0..3 {
        for svc in &services {
            let status = svc
                .clone()
                .oneshot(req("w", None, None))
                .await
                .unwrap()
                .status();
            if round == 0 {
                assert_eq!(status, StatusCode::OK, "every instance sees the reset");
            }
            allowed += usize::from(status == StatusCode::OK);
        }
    }
    assert_eq!(allowed, 3);
}

#[test]
fn a_redis_config_builds_a_layer_outside_any_runtime() {
    // RateLimitLayer::new is synchronous and infallible: no runtime, no connection yet.
    let layer = RateLimitLayer::new(redis_cfg(
        "by_user = \"1/m\"",
        "redis://127.0.0.1:1/0",
        "rl",
        "",
    ));
    let shown = format!("{layer:?}");
    assert!(shown.contains("RedisStore"), "{shown}");
    // An unparsable URL is refused at start-up, naming its field (it used to pass the
    // scheme check and leave a store that never called Redis).
    let err = RateLimitConfig::from_toml_str(
        "by_user = \"1/m\"\n[backend]\nkind = \"redis\"\nurl = \"redis://[::1\"",
    )
    .unwrap_err();
    assert!(err.to_string().starts_with("backend.url: "), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_config_just_works_through_the_layer() {
    let Some(server) = RedisServer::any("a_redis_config_just_works_through_the_layer") else {
        return;
    };
    let prefix = common::redis::fresh_prefix();
    // Default timeout and pool: what a user's config file gives.
    let layer = RateLimitLayer::new(redis_cfg("by_user = \"2/m\"", server.url(), &prefix, ""));
    let (svc, _) = counting_service(layer.clone());
    let statuses = [
        svc.clone()
            .oneshot(req("cfg", None, None))
            .await
            .unwrap()
            .status(),
        svc.clone()
            .oneshot(req("cfg", None, None))
            .await
            .unwrap()
            .status(),
        svc.clone()
            .oneshot(req("cfg", None, None))
            .await
            .unwrap()
            .status(),
    ];
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    let mut conn = server.conn().await;
    assert_eq!(
        keys_under(&mut conn, &prefix).await.len(),
        1,
        "counted in Redis, under the prefix"
    );
    assert_eq!(layer.stats().store_errors, 0);
}

/// ARCHITECTURE.md, behaviour contract item 8, with skewed clocks: on Redis's time,
/// instances whose own clocks disagree (by an hour here) state the same
/// `X-RateLimit-Reset`, taken from Redis's clock, and keep it constant within the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_with_skewed_clocks_state_the_same_reset() {
    let Some(server) = RedisServer::private("instances_with_skewed_clocks_state_the_same_reset")
    else {
        return;
    };
    let prefix = common::redis::fresh_prefix();
    let toml = redis_cfg(
        "by_user = \"10/m\"",
        server.url(),
        &prefix,
        "deny_cache = 0\ntimeout_ms = 2000",
    );
    let early = ManualClock::new();
    let late = ManualClock::new();
    late.advance(Duration::from_secs(3_600));
    let mut resets = Vec::new();
    for clock in [&early, &late, &early, &late] {
        let layer = RateLimitLayer::new(toml.clone()).with_clock(clock.clone());
        let (svc, _) = counting_service(layer);
        let resp = svc.oneshot(req("skewed", None, None)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resets.push(
            resp.headers()["x-ratelimit-reset"]
                .to_str()
                .unwrap()
                .parse::<u64>()
                .unwrap(),
        );
    }
    assert!(resets.iter().all(|r| *r == resets[0]), "{resets:?}");
    // Redis's clock is the real one, not either instance's.
    let real = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        (real..=real + 61).contains(&resets[0]),
        "{} vs now {real}",
        resets[0]
    );
}

/// On Redis's clock, a write that stays in the counter's window keeps the key's expiry
/// (`SET ... KEEPTTL`: the same window has the same expiry) instead of setting it again;
/// a write that starts a window sets it. Shown by stretching the TTL by hand in between:
/// kept by the same-window write, replaced by the next window's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_in_the_same_window_keeps_the_expiry_on_redis_clock() {
    let Some(server) = RedisServer::any("same_window_keeps_the_expiry") else {
        return;
    };
    let prefix = common::redis::fresh_prefix();
    let layer = RateLimitLayer::new(redis_cfg("by_user = \"100/2s\"", server.url(), &prefix, ""));
    let (svc, _) = counting_service(layer);
    let mut conn = server.conn().await;
    let call = || svc.clone().oneshot(req("alice", None, None));
    assert_eq!(call().await.unwrap().status(), StatusCode::OK);
    let keys = keys_under(&mut conn, &prefix).await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    // The key's expiry in ms, or (with `ms`) set by hand to that.
    let expiry = |ms: Option<i64>| {
        let (mut conn, key) = (conn.clone(), keys[0].clone());
        async move {
            let mut cmd = redis::cmd(if ms.is_some() { "PEXPIRE" } else { "PTTL" });
            cmd.arg(&key);
            if let Some(ms) = ms {
                cmd.arg(ms);
            }
            cmd.query_async::<i64>(&mut conn).await.unwrap()
        }
    };
    assert!((1..=2_000).contains(&expiry(None).await));
    expiry(Some(3_600_000)).await;
    let second = call().await.unwrap();
    assert_eq!(
        second.headers()["x-ratelimit-remaining"],
        "98",
        "counted on"
    );
    let kept = expiry(None).await;
    assert!(kept > 3_000_000, "the same window keeps the expiry: {kept}");
    // The next window sets its own.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    expiry(Some(3_600_000)).await;
    let third = call().await.unwrap();
    assert_eq!(
        third.headers()["x-ratelimit-remaining"],
        "99",
        "a new window"
    );
    let set = expiry(None).await;
    assert!(
        (1..=2_000).contains(&set),
        "a new window sets its expiry: {set}"
    );
}

/// The Redis guide's one-liner for reading a counter by hand (`redis-cli EVAL "…"`, in
/// docs/redis.md, which the README points to), run as written on a key the store wrote:
/// it answers the window start, the count and the previous count.
#[tokio::test]
async fn the_redis_guide_one_liner_reads_a_counter() {
    let one_liner = |page: &'static str| {
        page.lines()
            .map(str::trim)
            .find(|l| l.starts_with("redis-cli EVAL \""))
    };
    let guide = include_str!("../docs/redis.md");
    let (script, key) = one_liner(guide)
        .and_then(|l| l.strip_prefix("redis-cli EVAL \""))
        .and_then(|rest| rest.split_once("\" 1 '"))
        .and_then(|(script, key)| Some((script, key.strip_suffix('\'')?)))
        .expect("the README shows how to read a counter with redis-cli EVAL");
    let Some(backend) = RedisBackend::start("the_redis_guide_one_liner_reads_a_counter") else {
        return;
    };
    let clock = ManualClock::new();
    let (svc, _) = counting_service(backend.layer(cfg("by_user = \"30/m\""), &clock));
    for _ in 0..3 {
        let resp = svc.clone().oneshot(req("alice", None, None)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let mut conn = backend.server().conn().await;
    let keys = keys_under(&mut conn, backend.prefix()).await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    // The README's key is alice's under the default prefix `rl`, as the store names it.
    assert_eq!(
        keys[0].strip_prefix(backend.prefix()),
        key.strip_prefix("rl"),
        "the README's example key"
    );
    let state: Vec<u64> = redis::Script::new(script)
        .key(&keys[0])
        .invoke_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(state, [clock.now_micros(), 3, 0, 17], "t, c, p and 17");
}
