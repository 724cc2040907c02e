//! Faults injected into a private redis-server: killed mid-load, restarted, paused,
//! scripts flushed, down with no fallback. The caller never sees an error it should not.
#![cfg(feature = "redis")]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::redis::{keys_under, RedisServer};
use common::{counting_service, Body};
use http::{Request, StatusCode};
use tollgate::{Identity, RateLimitConfig, RateLimitLayer};
use tower::ServiceExt;

fn req(user: &str) -> Request<Body> {
    let mut req = Request::new(Body::new());
    req.extensions_mut().insert(Identity::user(user));
    req
}

fn layer(limits: &str, url: &str, prefix: &str, backend: &str) -> RateLimitLayer {
    let toml = format!("{limits}\n[backend]\nkind = \"redis\"\nurl = \"{url}\"\nkey_prefix = \"{prefix}\"\n{backend}");
    RateLimitLayer::new(RateLimitConfig::from_toml_str(&toml).unwrap())
}

/// Sends requests from `tasks` tasks until `stop` is set (at most `per_task` each),
/// returning every status and the slowest request.
async fn load(
    layer: &RateLimitLayer,
    tasks: usize,
    per_task: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(Vec<StatusCode>, Duration)> {
    let (svc, _) = counting_service(layer.clone());
    tokio::spawn(async move {
        let handles: Vec<_> = (0..tasks)
            .map(|t| {
                let svc = svc.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    let mut slowest = Duration::ZERO;
                    for i in 0..per_task {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let user = format!("load-{t}-{}", i % 5);
                        let started = Instant::now();
                        let status = svc.clone().oneshot(req(&user)).await.unwrap().status();
                        slowest = slowest.max(started.elapsed());
                        out.push(status);
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    (out, slowest)
                })
            })
            .collect();
        let mut all = Vec::new();
        let mut slowest = Duration::ZERO;
        for h in handles {
            let (s, w) = h.await.unwrap();
            all.extend(s);
            slowest = slowest.max(w);
        }
        (all, slowest)
    })
}

fn only_200_or_429(statuses: &[StatusCode]) {
    assert!(!statuses.is_empty());
    let bad: Vec<_> = statuses
        .iter()
        .filter(|s| **s != StatusCode::OK && **s != StatusCode::TOO_MANY_REQUESTS)
        .collect();
    assert!(
        bad.is_empty(),
        "{} of {} requests got {:?}",
        bad.len(),
        statuses.len(),
        bad.first()
    );
}

async fn allowed_of(layer: &RateLimitLayer, user: &str, n: usize) -> usize {
    let (svc, _) = counting_service(layer.clone());
    let mut ok = 0;
    for _ in 0..n {
        ok += usize::from(svc.clone().oneshot(req(user)).await.unwrap().status() == StatusCode::OK);
    }
    ok
}

/// Whether a request for `user` is counted in Redis (a key for it exists).
async fn counted_in_redis(server: &RedisServer, prefix: &str, user: &str) -> bool {
    let Ok(client) = redis::Client::open(server.url()) else {
        return false;
    };
    let Ok(Ok(mut conn)) = tokio::time::timeout(
        Duration::from_millis(500),
        client.get_multiplexed_async_connection(),
    )
    .await
    else {
        return false;
    };
    keys_under(&mut conn, prefix)
        .await
        .iter()
        .any(|k| k.ends_with(&format!("{{={user}}}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_load_then_restarted() {
    let Some(mut server) = RedisServer::private("killed_mid_load_then_restarted") else {
        return;
    };
    let prefix = common::redis::fresh_prefix();
    let layer = layer(
        "by_user = \"5/m\"",
        server.url(),
        &prefix,
        "timeout_ms = 100",
    );
    assert_eq!(allowed_of(&layer, "before", 8).await, 5, "Redis enforces");
    assert!(counted_in_redis(&server, &prefix, "before").await);

    let stop = Arc::new(AtomicBool::new(false));
    let running = load(&layer, 8, 3_000, stop.clone()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Redis is gone: the memory fallback enforces the same rule meanwhile.
    assert_eq!(
        allowed_of(&layer, "during", 12).await,
        5,
        "the fallback enforces limits"
    );
    assert!(
        layer.stats().store_errors == 0 && layer.stats().fail_open == 0,
        "{:?}",
        layer.stats()
    );
    assert!(
        layer.stats().fallback_answers >= 12,
        "the outage is counted: {:?}",
        layer.stats()
    );

    // Back again: within a few seconds decisions come from Redis.
    server.restart();
    let restarted = Instant::now();
    let deadline = restarted + Duration::from_secs(10);
    let mut i = 0;
    let recovered_after = loop {
        let user = format!("after-{i}");
        i += 1;
        let _ = allowed_of(&layer, &user, 1).await;
        if counted_in_redis(&server, &prefix, &user).await {
            break Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "decisions never came back to Redis"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    stop.store(true, Ordering::Relaxed);
    let (statuses, _) = running.await.unwrap();
    only_200_or_429(&statuses);
    let took = recovered_after - restarted;
    eprintln!(
        "killed: {} requests during the run, back on Redis {took:?} after the restart",
        statuses.len()
    );
    assert!(
        took < Duration::from_secs(5),
        "back on Redis after {took:?}"
    );
    // And Redis enforces again (a restarted Redis starts empty).
    assert_eq!(allowed_of(&layer, "recovered", 8).await, 5);
    assert!(counted_in_redis(&server, &prefix, "recovered").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_redis_costs_at_most_about_the_timeout() {
    let Some(server) = RedisServer::private("a_paused_redis_costs_at_most_about_the_timeout")
    else {
        return;
    };
    let prefix = common::redis::fresh_prefix();
    let timeout = Duration::from_millis(100);
    let layer = layer(
        "by_user = \"1000/m\"",
        server.url(),
        &prefix,
        "timeout_ms = 100",
    );
    assert_eq!(allowed_of(&layer, "warm", 2).await, 2);

    let mut admin = server.conn().await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(2_000)
        .arg("ALL")
        .query_async(&mut admin)
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let running = load(&layer, 16, 60, stop.clone()).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    stop.store(true, Ordering::Relaxed);
    let (statuses, slowest) = running.await.unwrap();
    only_200_or_429(&statuses);
    eprintln!("paused: {} requests, slowest {slowest:?}", statuses.len());
    // Generous for a noisy 2-core VM, but far below the 2 s pause.
    assert!(
        slowest < timeout + Duration::from_millis(600),
        "a request waited {slowest:?} (timeout {timeout:?})"
    );
    assert_eq!(
        layer.stats().fail_open,
        0,
        "the fallback answered, nothing failed open"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_flush_mid_run_never_reaches_a_caller() {
    let Some(server) = RedisServer::private("script_flush_mid_run_never_reaches_a_caller") else {
        return;
    };
    let prefix = common::redis::fresh_prefix();
    // No fallback and fail-closed: any error would surface as a 503.
    let layer = layer(
        "by_user = \"40/m\"\nfail_mode = \"closed\"",
        server.url(),
        &prefix,
        "timeout_ms = 2000\nfallback = \"none\"",
    );
    let mut admin = server.conn().await;
    let (svc, _) = counting_service(layer.clone());
    let mut allowed = 0;
    for i in 0..100 {
        if i % 10 == 5 {
            let _: () = redis::cmd("SCRIPT")
                .arg("FLUSH")
                .query_async(&mut admin)
                .await
                .unwrap();
        }
        let status = svc.clone().oneshot(req("flushed")).await.unwrap().status();
        assert!(
            status == StatusCode::OK || status == StatusCode::TOO_MANY_REQUESTS,
            "request {i}: {status}"
        );
        allowed += usize::from(status == StatusCode::OK);
    }
    assert_eq!(allowed, 40, "every request decided by Redis, exactly");
    assert_eq!(layer.stats().store_errors, 0);
    // Concurrent callers racing a flush: still no error.
    let stop = Arc::new(AtomicBool::new(false));
    let running = load(&layer, 8, 100, stop.clone()).await;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut admin)
            .await
            .unwrap();
    }
    let (statuses, _) = running.await.unwrap();
    only_200_or_429(&statuses);
    assert_eq!(layer.stats().store_errors, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_without_fallback_fail_closed_answers_503() {
    let Some(mut server) = RedisServer::private("down_without_fallback_fail_closed_answers_503")
    else {
        return;
    };
    let url = server.url().to_owned();
    server.kill();
    let prefix = common::redis::fresh_prefix();
    let layer = layer(
        "by_user = \"5/m\"\nfail_mode = \"closed\"",
        &url,
        &prefix,
        "timeout_ms = 100\nfallback = \"none\"",
    );
    let (svc, calls) = counting_service(layer.clone());
    // Before and after the circuit opens, the same documented answer.
    for _ in 0..10 {
        let started = Instant::now();
        let resp = svc.clone().oneshot(req("closed")).await.unwrap();
        assert!(
            started.elapsed() < Duration::from_millis(700),
            "{:?}",
            started.elapsed()
        );
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
        assert!(
            !String::from_utf8_lossy(&body).contains("closed"),
            "no identity in the body"
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(layer.stats().fail_closed, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_without_fallback_fail_open_forwards_without_headers() {
    let Some(mut server) = RedisServer::private("down_without_fallback_fail_open_forwards") else {
        return;
    };
    let url = server.url().to_owned();
    server.kill();
    let layer = layer(
        "by_user = \"1/m\"",
        &url,
        &common::redis::fresh_prefix(),
        "timeout_ms = 100\nfallback = \"none\"",
    );
    let (svc, calls) = counting_service(layer.clone());
    for _ in 0..5 {
        let resp = svc.clone().oneshot(req("open")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.headers().get("x-ratelimit-limit").is_none());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 5);
    assert_eq!(layer.stats().fail_open, 5);
}

/// Fallbacks and circuit transitions are logged about once a second, never per request,
/// and never with a user or tenant id (redis errors can echo keys).
#[test]
fn outage_logs_are_rate_limited_and_identity_free() {
    let Some(mut server) = RedisServer::private("outage_logs_are_rate_limited_and_identity_free")
    else {
        return;
    };
    let captured = common::CapturedLogs::start(tracing::Level::DEBUG);
    // One thread, so the thread-local subscriber sees every line.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let prefix = common::redis::fresh_prefix();
    let requests = rt.block_on(async {
        let layer = layer(
            "by_user = \"3/m\"\nby_tenant = \"1000/m\"",
            server.url(),
            &prefix,
            "timeout_ms = 100",
        );
        let (svc, _) = counting_service(layer.clone());
        let send = |i: usize| {
            let mut r = Request::new(Body::new());
            r.extensions_mut().insert(
                Identity::user(format!("secret-user-{}", i % 7)).with_tenant("secret-tenant"),
            );
            svc.clone().oneshot(r)
        };
        for i in 0..20 {
            send(i).await.unwrap();
        }
        server.kill();
        let started = Instant::now();
        let mut n = 0;
        while started.elapsed() < Duration::from_millis(2_500) && n < 5_000 {
            let status = send(n).await.unwrap().status();
            assert!(
                status == StatusCode::OK || status == StatusCode::TOO_MANY_REQUESTS,
                "{status}"
            );
            n += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        server.restart();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !counted_in_redis(&server, &prefix, "secret-user-0").await {
            assert!(Instant::now() < deadline, "never back on Redis");
            send(0).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        n
    });
    let text = captured.text();
    assert!(requests > 200, "only {requests} requests during the outage");
    assert!(text.contains("circuit opened"), "{text}");
    assert!(text.contains("memory store is answering"), "{text}");
    assert!(text.contains("circuit closed"), "{text}");
    let fallback_lines = text
        .lines()
        .filter(|l| l.contains("memory store is answering"))
        .count();
    assert!(
        fallback_lines <= 5,
        "{fallback_lines} fallback lines for {requests} requests in ~2.5 s:\n{text}"
    );
    assert!(
        !text.contains("secret"),
        "an identity reached a log line:\n{text}"
    );
    assert!(!text.contains(&prefix), "a key reached a log line:\n{text}");
}
