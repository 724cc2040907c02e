//! Failover behind one address (Sentinel, a managed Redis): the primary is demoted under
//! load, so its connections answer `READONLY`; then a primary is back behind the same
//! address, promoted in place or restarted as a replica and promoted. No request errors
//! meanwhile (the fallback answers), and decisions return to Redis within 2 s of the new
//! primary accepting writes. ARCHITECTURE.md, behaviour contract item 14.
#![cfg(feature = "redis")]

mod common;

use std::time::{Duration, Instant};

use common::redis::{command_calls, fresh_prefix, RedisServer};
use common::{counting_service, Body, HasStatus, SteadyLoad};
use http::{Request, StatusCode};
use redis::AsyncCommands;
use tollgate::{
    Algorithm, Identity, Key, Rate, RateLimitConfig, RateLimitLayer, RuleKind, Subject,
};
use tower::ServiceExt;

fn req(user: &str) -> Request<Body> {
    let mut req = Request::new(Body::new());
    req.extensions_mut().insert(Identity::user(user));
    req
}

async fn replicaof(server: &RedisServer, primary: Option<u16>) {
    let mut conn = server.conn().await;
    let mut cmd = redis::cmd("REPLICAOF");
    match primary {
        Some(port) => cmd.arg("127.0.0.1").arg(port),
        None => cmd.arg("NO").arg("ONE"),
    };
    cmd.query_async::<()>(&mut conn).await.expect("REPLICAOF");
}

/// Waits (bounded) until `server`, a replica, has synced with its primary.
async fn synced(server: &RedisServer) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut conn = server.conn().await;
    loop {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut conn)
            .await
            .expect("INFO");
        if info.contains("master_link_status:up") {
            return;
        }
        assert!(Instant::now() < deadline, "the replica never synced");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `user`'s requests until Redis at `server` holds the user's counter (bounded):
/// how long decisions took to come back to Redis.
async fn back_on_redis<S>(svc: &S, server: &RedisServer, prefix: &str, user: &str) -> Duration
where
    S: tower::Service<Request<Body>, Error = std::convert::Infallible> + Clone,
    S::Response: HasStatus,
{
    let name = Key::new(
        RuleKind::User,
        Subject::Named(user.as_bytes()),
        Rate::per_minute(1000),
        Algorithm::FixedWindow,
    )
    .encode(prefix);
    let started = Instant::now();
    let mut conn = server.conn().await;
    loop {
        let status = svc.clone().oneshot(req(user)).await.unwrap().status();
        assert_eq!(status, StatusCode::OK);
        if conn.exists::<_, bool>(&name).await.unwrap_or(false) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "decisions never came back to Redis"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demoted_primary_is_dropped_and_decisions_return_after_promotion() {
    let test = "a_demoted_primary_is_dropped_and_decisions_return_after_promotion";
    let (Some(mut primary), Some(other)) = (RedisServer::private(test), RedisServer::private(test))
    else {
        return;
    };
    let prefix = fresh_prefix();
    let cfg = RateLimitConfig::from_toml_str(&format!(
        "by_user = \"1000/m\"\n[backend]\nkind = \"redis\"\nurl = \"{}\"\nkey_prefix = \"{prefix}\"\ntimeout_ms = 200\nfallback = \"memory\"",
        primary.url()
    ))
    .unwrap();
    let layer = RateLimitLayer::new(cfg);
    let (svc, _) = counting_service(layer.clone());

    let load = SteadyLoad::start(svc.clone(), 20);

    back_on_redis(&svc, &primary, &prefix, "probe-before").await;
    let before = layer.stats();

    // Demoted: every script that writes answers READONLY. The connection is dropped and
    // the failures open the circuit, so the fallback answers (nothing fails open).
    replicaof(&primary, Some(other.port())).await;
    synced(&primary).await;
    let mut watch = primary.conn().await;
    let scripts_before = command_calls(&mut watch, "evalsha").await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let scripts = command_calls(&mut watch, "evalsha").await - scripts_before;
    let demoted = layer.stats();
    assert!(
        demoted.fallback_answers > before.fallback_answers + 100,
        "READONLY must hand decisions to the fallback: {demoted:?}"
    );
    // The circuit is open: about one probe a second reaches the demoted server, not every
    // request (as when READONLY passed for one command's error and kept the socket).
    assert!(
        scripts <= 10,
        "{scripts} scripts reached the demoted primary in 1.5 s"
    );

    // Promoted in place.
    replicaof(&primary, None).await;
    let took = back_on_redis(&svc, &primary, &prefix, "probe-promoted").await;
    eprintln!("promoted in place: back on Redis after {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");

    // Another server behind the same address: restarted as a replica, then promoted.
    primary.restart();
    replicaof(&primary, Some(other.port())).await;
    synced(&primary).await;
    replicaof(&primary, None).await;
    let took = back_on_redis(&svc, &primary, &prefix, "probe-replaced").await;
    eprintln!("replaced and promoted: back on Redis after {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");

    let sent = load.finish().await;
    let stats = layer.stats();
    assert_eq!(stats.fail_open, 0, "{stats:?}");
    assert_eq!(stats.fail_closed, 0, "{stats:?}");
    eprintln!("{stats:?}, {sent} load requests");
}
