//! The Redis Cluster store against a real cluster (3 masters, 3 replicas): exact when a
//! request's keys sit on different masters (reserve on each slot, refund where another
//! refused), a TTL on every key, and a master killed under load.
#![cfg(feature = "redis")]

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::redis::{count_of, fresh_prefix, keys_under};
use common::redis_cluster::RedisCluster;
use common::{counting_service, Body, SteadyLoad};
use http::{Request, StatusCode};
use redis::AsyncCommands;
use tollgate::{
    Algorithm, Identity, Key, Rate, RateLimitConfig, RateLimitLayer, RedisStore, RuleKind, Subject,
};
use tower::ServiceExt;

fn req(user: &str, tenant: Option<&str>) -> Request<Body> {
    let mut req = Request::new(Body::new());
    let mut id = Identity::user(user);
    if let Some(t) = tenant {
        id = id.with_tenant(t);
    }
    req.extensions_mut().insert(id);
    req
}

fn store(cluster: &RedisCluster, prefix: &str) -> RedisStore {
    RedisStore::cluster(cluster.seed_urls())
        .key_prefix(prefix)
        .timeout(Duration::from_secs(5))
        .deny_cache(0)
        .build()
        .expect("valid seed urls")
}

fn key_name(prefix: &str, kind: RuleKind, subject: &str, rate: Rate) -> String {
    Key::new(
        kind,
        Subject::Named(subject.as_bytes()),
        rate,
        Algorithm::FixedWindow,
    )
    .encode(prefix)
}

/// 300 users of one tenant at once, `by_tenant = "100/m"`: the tenant's key and the
/// users' keys sit on different masters, so each request reserves on two slots. Exactly
/// 100 pass; the tenant counts 100; every refused user's reservation was given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_the_limit_passes_when_a_requests_keys_span_masters() {
    let Some(cluster) =
        RedisCluster::start("exactly_the_limit_passes_when_a_requests_keys_span_masters")
    else {
        return;
    };
    let prefix = fresh_prefix();
    let user_rate = Rate::per_minute(1000);
    let tenant_rate = Rate::per_minute(100);
    let users: Vec<String> = (0..300).map(|i| format!("user-{i}")).collect();
    let tenant_master =
        cluster.master_for_key(&key_name(&prefix, RuleKind::Tenant, "acme", tenant_rate));
    let elsewhere = users
        .iter()
        .filter(|u| {
            cluster.master_for_key(&key_name(&prefix, RuleKind::User, u, user_rate))
                != tenant_master
        })
        .count();
    assert!(
        elsewhere > 150,
        "only {elsewhere} users off the tenant's master"
    );

    let cfg =
        RateLimitConfig::from_toml_str("by_user = \"1000/m\"\nby_tenant = \"100/m\"").unwrap();
    let layer = RateLimitLayer::with_store(cfg, store(&cluster, &prefix));
    let (svc, calls) = counting_service(layer.clone());
    let tasks: Vec<_> = users
        .iter()
        .map(|u| {
            let svc = svc.clone();
            let u = u.clone();
            tokio::spawn(async move { svc.oneshot(req(&u, Some("acme"))).await.unwrap() })
        })
        .collect();
    let mut allowed = Vec::new();
    for (user, task) in users.iter().zip(tasks) {
        let status = task.await.unwrap().status();
        assert!(
            status == StatusCode::OK || status == StatusCode::TOO_MANY_REQUESTS,
            "{status}"
        );
        if status == StatusCode::OK {
            allowed.push(user.clone());
        }
    }
    assert_eq!(allowed.len(), 100, "exactly the tenant's limit");
    assert_eq!(calls.load(Ordering::SeqCst), 100);
    assert_eq!(layer.stats().store_errors, 0, "{:?}", layer.stats());

    let mut conn = cluster.cluster_conn().await;
    let tenant: Option<Vec<u8>> = conn
        .get(key_name(&prefix, RuleKind::Tenant, "acme", tenant_rate))
        .await
        .unwrap();
    assert_eq!(
        tenant.as_deref().and_then(count_of),
        Some(100),
        "the tenant counted only what passed"
    );
    for user in &users {
        let counted: Option<Vec<u8>> = conn
            .get(key_name(&prefix, RuleKind::User, user, user_rate))
            .await
            .unwrap();
        let counted = counted.as_deref().and_then(count_of);
        let expected = u64::from(allowed.contains(user));
        assert_eq!(
            counted.unwrap_or(0),
            expected,
            "a refused user's reservation is given back, an admitted one kept"
        );
    }
}

/// One user's 300 concurrent requests (one slot: one atomic script each) → exactly 100.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_the_limit_passes_on_one_slot() {
    let Some(cluster) = RedisCluster::start("exactly_the_limit_passes_on_one_slot") else {
        return;
    };
    let cfg = RateLimitConfig::from_toml_str("by_user = \"100/m\"").unwrap();
    let layer = RateLimitLayer::with_store(cfg, store(&cluster, &fresh_prefix()));
    let (svc, calls) = counting_service(layer);
    let tasks: Vec<_> = (0..300)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move { svc.oneshot(req("alice", None)).await.unwrap() })
        })
        .collect();
    let mut ok = 0;
    for task in tasks {
        ok += usize::from(task.await.unwrap().status() == StatusCode::OK);
    }
    assert_eq!(ok, 100);
    assert_eq!(calls.load(Ordering::SeqCst), 100);
}

/// Every key the cluster store writes, on every master, expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_on_every_master_has_a_ttl() {
    let Some(cluster) = RedisCluster::start("every_key_on_every_master_has_a_ttl") else {
        return;
    };
    let prefix = fresh_prefix();
    for algorithm in ["fixed_window", "sliding_window", "token_bucket"] {
        let cfg = RateLimitConfig::from_toml_str(&format!(
            "algorithm = \"{algorithm}\"\nby_user = \"2/m\"\nby_tenant = \"3/m\"\n[by_tool]\nsearch = \"5/m\""
        ))
        .unwrap();
        let layer = RateLimitLayer::with_store(cfg, store(&cluster, &prefix));
        let (svc, _) = counting_service(layer);
        for i in 0..12 {
            let mut r = req(&format!("u{}", i % 4), Some(&format!("t{}", i % 3)));
            r.extensions_mut().insert(tollgate::ToolName::new("search"));
            svc.clone().oneshot(r).await.unwrap();
        }
    }
    let mut seen = 0;
    for port in cluster.masters() {
        let mut conn = cluster.node_conn(port).await;
        for key in keys_under(&mut conn, &prefix).await {
            let ttl: i64 = conn.pttl(&key).await.unwrap();
            assert!(ttl > 0, "{key} has no expiry ({ttl})");
            seen += 1;
        }
    }
    // 4 users, 3 tenants, 1 tool, for each of 3 algorithms.
    assert_eq!(seen, 3 * (4 + 3 + 1));
}

/// A master killed under load: no request errors (the fallback answers while its slots
/// have no master), and once its replica has taken over, decisions are the cluster's
/// again, on the killed master's slots too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_costs_no_request_and_its_replica_takes_over() {
    let Some(mut cluster) =
        RedisCluster::start("a_killed_master_costs_no_request_and_its_replica_takes_over")
    else {
        return;
    };
    let prefix = fresh_prefix();
    let seeds: Vec<String> = cluster
        .seed_urls()
        .iter()
        .map(|u| format!("{u:?}"))
        .collect();
    let cfg = RateLimitConfig::from_toml_str(&format!(
        "by_user = \"1000/m\"\n[backend]\nkind = \"redis_cluster\"\nurls = [{}]\nkey_prefix = \"{prefix}\"\ntimeout_ms = 200\nfallback = \"memory\"",
        seeds.join(", ")
    ))
    .unwrap();
    let layer = RateLimitLayer::new(cfg);
    let (svc, _) = counting_service(layer.clone());

    let load = SteadyLoad::start(svc.clone(), 50);

    tokio::time::sleep(Duration::from_millis(500)).await;
    let victim = cluster.masters()[0];
    let probe_rate = Rate::per_minute(1000);
    let probe = (0..)
        .map(|i| format!("probe-{i}"))
        .find(|p| {
            cluster.master_for_key(&key_name(&prefix, RuleKind::User, p, probe_rate)) == victim
        })
        .unwrap();
    cluster.kill_node(victim);
    let killed = Instant::now();
    // wait_for_failover polls with blocking sockets.
    let (ok, cluster) = tokio::task::spawn_blocking(move || {
        let ok = cluster.wait_for_failover(victim, Duration::from_secs(20));
        (ok, cluster)
    })
    .await
    .unwrap();
    assert!(ok, "no replica took over within 20 s");
    eprintln!("failover took {:?}", killed.elapsed());

    // Decisions come back to the cluster: the probe's key appears on the new master.
    let deadline = Instant::now() + Duration::from_secs(10);
    let name = key_name(&prefix, RuleKind::User, &probe, probe_rate);
    let mut conn = cluster.cluster_conn().await;
    loop {
        let status = svc
            .clone()
            .oneshot(req(&probe, None))
            .await
            .unwrap()
            .status();
        assert_eq!(status, StatusCode::OK);
        let exists: bool = conn.exists(&name).await.unwrap_or(false);
        if exists {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "decisions did not return to the cluster within 10 s of the failover"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("back on the cluster {:?} after the kill", killed.elapsed());
    let sent = load.finish().await;
    let stats = layer.stats();
    assert!(sent > 0);
    assert_eq!(stats.fail_open, 0, "{stats:?}");
    assert_eq!(stats.fail_closed, 0, "{stats:?}");
    eprintln!("{stats:?}, {sent} requests");
}

/// The same across masters for the sliding window and the token bucket (whose refunds
/// differ): 300 users of one tenant at once at `by_tenant = "100/h"` → exactly 100, and
/// a second wave right after is refused entirely (no refund gave the tenant back more
/// than it took).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_algorithm_is_exact_across_masters() {
    let Some(cluster) = RedisCluster::start("every_algorithm_is_exact_across_masters") else {
        return;
    };
    for algorithm in ["sliding_window", "token_bucket"] {
        let cfg = RateLimitConfig::from_toml_str(&format!(
            "algorithm = \"{algorithm}\"\nby_user = \"1000/m\"\nby_tenant = \"100/h\""
        ))
        .unwrap();
        let layer = RateLimitLayer::with_store(cfg, store(&cluster, &fresh_prefix()));
        let (svc, calls) = counting_service(layer.clone());
        for wave in 0..2 {
            let tasks: Vec<_> = (0..300)
                .map(|i| {
                    let svc = svc.clone();
                    tokio::spawn(async move {
                        svc.oneshot(req(&format!("user-{wave}-{i}"), Some("acme")))
                            .await
                            .unwrap()
                            .status()
                    })
                })
                .collect();
            for task in tasks {
                let status = task.await.unwrap();
                assert!(status == StatusCode::OK || status == StatusCode::TOO_MANY_REQUESTS);
            }
            assert_eq!(
                calls.load(Ordering::SeqCst),
                100,
                "{algorithm} wave {wave}: exactly the tenant's limit in all"
            );
        }
        assert_eq!(layer.stats().store_errors, 0, "{algorithm}");
    }
}

/// A reservation given back is reported as given back: the refund script answers a
/// number, which the store once tried to read as a list, so every refund that worked was
/// logged as a failure ("could not be given back") and cost the connection.
#[tokio::test]
async fn a_refund_that_works_logs_nothing() {
    let Some(cluster) = RedisCluster::start("a_refund_that_works_logs_nothing") else {
        return;
    };
    let prefix = fresh_prefix();
    let user_rate = Rate::per_minute(1000);
    let tenant_rate = Rate::per_minute(2);
    let tenant_master =
        cluster.master_for_key(&key_name(&prefix, RuleKind::Tenant, "acme", tenant_rate));
    // Users whose keys sit on another master than the tenant's: each request reserves on
    // two slots, and the user's reservation is given back when the tenant refuses.
    let users: Vec<String> = (0..200)
        .map(|i| format!("user-{i}"))
        .filter(|u| {
            cluster.master_for_key(&key_name(&prefix, RuleKind::User, u, user_rate))
                != tenant_master
        })
        .take(5)
        .collect();
    assert_eq!(users.len(), 5);
    let cfg = RateLimitConfig::from_toml_str("by_user = \"1000/m\"\nby_tenant = \"2/m\"").unwrap();
    let layer = RateLimitLayer::with_store(cfg, store(&cluster, &prefix));
    let (svc, _) = counting_service(layer.clone());

    let logs = common::CapturedLogs::start(tracing::Level::WARN);
    let mut statuses = Vec::new();
    for user in &users {
        statuses.push(
            svc.clone()
                .oneshot(req(user, Some("acme")))
                .await
                .unwrap()
                .status(),
        );
    }
    let ok = StatusCode::OK;
    let limited = StatusCode::TOO_MANY_REQUESTS;
    assert_eq!(statuses, [ok, ok, limited, limited, limited]);
    let text = logs.text();
    assert!(!text.contains("could not be given back"), "{text}");
    assert_eq!(layer.stats().store_errors, 0, "{:?}", layer.stats());

    let mut conn = cluster.cluster_conn().await;
    for (user, status) in users.iter().zip(&statuses) {
        let counted: Option<Vec<u8>> = conn
            .get(key_name(&prefix, RuleKind::User, user, user_rate))
            .await
            .unwrap();
        let expected = u64::from(*status == ok);
        assert_eq!(
            counted.as_deref().and_then(count_of).unwrap_or(0),
            expected,
            "{user}"
        );
    }
}
