//! Tests of the test harness itself: the Redis Cluster and TLS Redis helpers start what
//! they claim, route keys where Redis routes them, fail over, and verify certificates.
#![cfg(feature = "redis")]

mod common;

#[cfg(feature = "redis-tls")]
use std::process::Command;
use std::time::{Duration, Instant};

use common::redis_cluster::RedisCluster;
#[cfg(feature = "redis-tls")]
use common::{
    redis::{pings, run_bounded},
    redis_tls::TlsRedis,
};
use redis::AsyncCommands;

/// The longest one Redis command of these tests may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// The first key `k0`, `k1`, ... that `cluster` serves on a master `wanted` accepts.
fn key_where(cluster: &RedisCluster, wanted: impl Fn(u16) -> bool) -> String {
    (0..10_000)
        .map(|i| format!("k{i}"))
        .find(|k| wanted(cluster.master_for_key(k)))
        .expect("some key lands on the wanted master")
}

#[test]
fn cluster_has_three_masters_serving_every_slot() {
    let started = Instant::now();
    let Some(cluster) = RedisCluster::start("cluster_has_three_masters_serving_every_slot") else {
        return;
    };
    eprintln!("cluster formed in {:?}", started.elapsed());
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3, "masters: {masters:?}");
    assert_eq!(cluster.live_ports().len(), 6);

    let ranges = cluster.slot_ranges();
    let mut next = 0u32;
    for (range, port) in &ranges {
        assert_eq!(
            u32::from(*range.start()),
            next,
            "gap or overlap: {ranges:?}"
        );
        assert!(masters.contains(port), "{port} is not a master: {ranges:?}");
        next = u32::from(*range.end()) + 1;
    }
    assert_eq!(next, 16384, "slots not all covered: {ranges:?}");
}

#[tokio::test]
async fn master_for_key_names_the_node_that_holds_the_key() {
    let Some(cluster) = RedisCluster::start("master_for_key_names_the_node_that_holds_the_key")
    else {
        return;
    };
    let first = key_where(&cluster, |_| true);
    let home = cluster.master_for_key(&first);
    let second = key_where(&cluster, |m| m != home);
    let other = cluster.master_for_key(&second);
    assert_ne!(home, other);

    let mut conn = cluster.cluster_conn().await;
    for key in [&first, &second] {
        let () = tokio::time::timeout(COMMAND_TIMEOUT, conn.set(key, key))
            .await
            .expect("SET in time")
            .expect("SET");
    }
    // Asked directly (no redirects), each key's master has it and the other master
    // answers MOVED: master_for_key agrees with the cluster's own routing.
    for (key, at, not_at) in [(&first, home, other), (&second, other, home)] {
        let value: String = cluster.node_conn(at).await.get(key).await.expect("GET");
        assert_eq!(&value, key);
        let moved: redis::RedisResult<String> = cluster.node_conn(not_at).await.get(key).await;
        let err = moved.expect_err("a master that does not serve the key redirects");
        assert_eq!(
            err.kind(),
            redis::ErrorKind::Server(redis::ServerErrorKind::Moved),
            "{err}"
        );
    }
}

#[tokio::test]
async fn evalsha_calls_counts_scripts_run_on_every_master() {
    let Some(cluster) = RedisCluster::start("evalsha_calls_counts_scripts_run_on_every_master")
    else {
        return;
    };
    let script = redis::Script::new("return redis.call('INCR', KEYS[1])");
    let mut conn = cluster.cluster_conn().await;
    let keys: Vec<String> = cluster
        .masters()
        .into_iter()
        .map(|m| key_where(&cluster, |at| at == m))
        .collect();
    // The first run on each master loads the script (a NOSCRIPT EVALSHA, then SCRIPT LOAD).
    for key in &keys {
        let _: i64 = script
            .key(key)
            .invoke_async(&mut conn)
            .await
            .expect("script");
    }
    let before = cluster.evalsha_calls().await;
    for key in &keys {
        for _ in 0..4 {
            let _: i64 = script
                .key(key)
                .invoke_async(&mut conn)
                .await
                .expect("script");
        }
    }
    assert_eq!(cluster.evalsha_calls().await - before, 12);
}

#[tokio::test]
async fn killed_master_fails_over_and_its_slots_serve_again() {
    let Some(mut cluster) =
        RedisCluster::start("killed_master_fails_over_and_its_slots_serve_again")
    else {
        return;
    };
    let victim = cluster.masters()[0];
    let key = key_where(&cluster, |m| m == victim);

    let killed_at = Instant::now();
    cluster.kill_node(victim);
    assert!(
        cluster.wait_for_failover(victim, Duration::from_secs(15)),
        "no failover within 15 s"
    );
    eprintln!("failover took {:?}", killed_at.elapsed());
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3, "masters after failover: {masters:?}");
    assert!(!masters.contains(&victim));
    let heir = cluster.master_for_key(&key);
    assert_ne!(heir, victim);

    let mut conn = cluster.cluster_conn().await;
    let () = tokio::time::timeout(COMMAND_TIMEOUT, conn.set(&key, "after"))
        .await
        .expect("SET in time")
        .expect("SET");
    let value: String = tokio::time::timeout(COMMAND_TIMEOUT, conn.get(&key))
        .await
        .expect("GET in time")
        .expect("GET");
    assert_eq!(value, "after");
}

/// `redis-cli --tls --cacert <ca> -p <port> ping`: its stdout, or why it failed.
#[cfg(feature = "redis-tls")]
fn tls_ping(port: u16, ca: &std::path::Path) -> Result<String, String> {
    let out = run_bounded(
        Command::new("redis-cli")
            .args(["--tls", "--cacert"])
            .arg(ca)
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "ping"]),
        COMMAND_TIMEOUT,
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if out.status.success() && !stdout.contains("Could not connect") {
        Ok(stdout)
    } else {
        Err(format!(
            "{stdout} {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[cfg(feature = "redis-tls")]
#[test]
fn tls_redis_answers_only_over_tls_with_its_ca() {
    let Some(mut redis) = TlsRedis::start("tls_redis_answers_only_over_tls_with_its_ca") else {
        return;
    };
    assert_eq!(
        redis.url(),
        format!("rediss://127.0.0.1:{}/0", redis.port())
    );
    assert_eq!(
        tls_ping(redis.port(), &redis.ca_path()).as_deref(),
        Ok("PONG")
    );

    let wrong = tls_ping(redis.port(), &redis.wrong_ca_path());
    assert!(
        wrong.is_err(),
        "a CA that signed nothing verified the server: {wrong:?}"
    );
    assert!(
        !pings(redis.port()),
        "the TLS port answered a plain-TCP PING"
    );

    redis.kill();
    assert!(
        tls_ping(redis.port(), &redis.ca_path()).is_err(),
        "a killed server answered"
    );
    redis.restart();
    assert_eq!(
        tls_ping(redis.port(), &redis.ca_path()).as_deref(),
        Ok("PONG")
    );
}
