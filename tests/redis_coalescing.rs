//! Coalescing (the Redis store's default): concurrent requests share script calls and
//! stay exact, and a batch decides exactly as one call per request in its order would —
//! checked differentially against the memory store and against coalescing off
//! (`max_batch(1)`), on random request streams.
#![cfg(feature = "redis")]

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::redis::{command_calls, fresh_prefix, RedisServer};
use common::{counting_service, Body};
use http::{Request, StatusCode};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tollgate::{
    Algorithm, Identity, Key, MemoryStore, Outcomes, Rate, RateLimitConfig, RateLimitLayer,
    RedisStore, RuleKind, Store, StoreFuture, StoreRequest, Subject,
};
use tower::ServiceExt;

const T0: u64 = 1_700_000_000_000_000;

fn store(server: &RedisServer, prefix: &str, max_batch: usize) -> RedisStore {
    RedisStore::builder(server.url())
        .key_prefix(prefix)
        .caller_time(true)
        .timeout(Duration::from_secs(5))
        .deny_cache(0)
        .max_batch(max_batch)
        .build()
        .unwrap()
}

/// 512 concurrent requests of one user at 100/m: exactly 100 pass, in far fewer script
/// calls than requests; with coalescing off, one call each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_script_calls_and_stay_exact() {
    let Some(server) = RedisServer::private("concurrent_requests_share_script_calls") else {
        return;
    };
    let mut conn = server.conn().await;
    for (max_batch, most_calls) in [(128, 512 / 4), (1, 512)] {
        let cfg = RateLimitConfig::from_toml_str("by_user = \"100/m\"").unwrap();
        let redis = RedisStore::builder(server.url())
            .key_prefix(fresh_prefix())
            .timeout(Duration::from_secs(5))
            .deny_cache(0)
            .max_batch(max_batch)
            .build()
            .unwrap();
        let (svc, calls) = counting_service(RateLimitLayer::with_store(cfg, redis));
        // Warm: connects and loads the script.
        let mut warm = Request::new(Body::new());
        warm.extensions_mut().insert(Identity::user("warm"));
        svc.clone().oneshot(warm).await.unwrap();
        calls.store(0, Ordering::SeqCst);
        let before = command_calls(&mut conn, "evalsha").await;
        let tasks: Vec<_> = (0..512)
            .map(|_| {
                let svc = svc.clone();
                tokio::spawn(async move {
                    let mut req = Request::new(Body::new());
                    req.extensions_mut().insert(Identity::user("alice"));
                    svc.oneshot(req).await.unwrap().status()
                })
            })
            .collect();
        let mut ok = 0;
        for task in tasks {
            let status = task.await.unwrap();
            assert!(status == StatusCode::OK || status == StatusCode::TOO_MANY_REQUESTS);
            ok += usize::from(status == StatusCode::OK);
        }
        let scripts = command_calls(&mut conn, "evalsha").await - before;
        assert_eq!(ok, 100, "max_batch {max_batch}");
        assert_eq!(calls.load(Ordering::SeqCst), 100);
        assert!(
            scripts <= most_calls,
            "max_batch {max_batch}: {scripts} script calls for 512 requests"
        );
        if max_batch == 1 {
            assert_eq!(scripts, 512, "coalescing off: one call per request");
        }
    }
}

#[derive(Clone, Debug)]
struct Req {
    user: usize,
    tenant: Option<usize>,
    tool: Option<usize>,
}

const USERS: &[&[u8]] = &[b"alice", b"bob", b"a:b", b""];
const TENANTS: &[&[u8]] = &[b"acme", b"a:b"];
const TOOLS: &[&[u8]] = &[b"search", b"fetch"];

fn req() -> impl Strategy<Value = Req> {
    (
        0..USERS.len(),
        proptest::option::weighted(0.5, 0..TENANTS.len()),
        proptest::option::weighted(0.5, 0..TOOLS.len()),
    )
        .prop_map(|(user, tenant, tool)| Req { user, tenant, tool })
}

fn keys(r: &Req, rates: [Rate; 3], alg: Algorithm) -> Vec<Key<'static>> {
    let mut keys = vec![Key::new(
        RuleKind::User,
        Subject::Named(USERS[r.user]),
        rates[0],
        alg,
    )];
    if let Some(t) = r.tenant {
        keys.push(Key::new(
            RuleKind::Tenant,
            Subject::Named(TENANTS[t]),
            rates[1],
            alg,
        ));
    }
    if let Some(t) = r.tool {
        keys.push(Key::new(
            RuleKind::Tool,
            Subject::Named(TOOLS[t]),
            rates[2],
            alg,
        ));
    }
    keys
}

async fn one(store: &dyn Store, keys: &[Key<'_>], now: u64) -> Outcomes {
    match store.check(&StoreRequest::new(keys, now)) {
        StoreFuture::Ready(r) => r,
        StoreFuture::Pending(f) => f.await,
    }
    .expect("store answers")
}

/// Waves of requests at one time each (a wave is what a busy moment queues): the memory
/// store and Redis with coalescing off decide them one by one; Redis decides each wave as
/// batches (`check_batch`, split at `max_batch`). Every outcome is identical.
#[test]
fn a_batch_decides_as_one_call_per_request_would() {
    let Some(server) = RedisServer::any("a_batch_decides_as_one_call_per_request_would") else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let server = Arc::new(server);
    let rate = (1u64..8, prop_oneof![Just(1u64), Just(10), Just(60)])
        .prop_map(|(n, s)| Rate::new(n, Duration::from_secs(s)).unwrap());
    let strategy = (
        prop_oneof![
            Just(Algorithm::FixedWindow),
            Just(Algorithm::SlidingWindow),
            Just(Algorithm::TokenBucket)
        ],
        [rate.clone(), rate.clone(), rate],
        1usize..6,
        proptest::collection::vec(
            (0u64..3_000_000, proptest::collection::vec(req(), 1..40)),
            1..6,
        ),
    );
    let mut runner = TestRunner::new(Config {
        cases: 32,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&strategy, |(alg, rates, max_batch, waves)| {
            rt.block_on(async {
                let memory = MemoryStore::new();
                let single = store(&server, &fresh_prefix(), 1);
                let batched = store(&server, &fresh_prefix(), max_batch);
                let mut now = T0;
                for (w, (gap, wave)) in waves.iter().enumerate() {
                    now += gap;
                    let wave_keys: Vec<Vec<Key<'static>>> =
                        wave.iter().map(|r| keys(r, rates, alg)).collect();
                    let requests: Vec<StoreRequest<'_>> = wave_keys
                        .iter()
                        .map(|k| StoreRequest::new(k, now))
                        .collect();
                    let got = batched.check_batch(&requests).await;
                    for (i, k) in wave_keys.iter().enumerate() {
                        let expected = one(&memory, k, now).await;
                        let alone = one(&single, k, now).await;
                        prop_assert_eq!(&alone, &expected, "{} wave {} request {}", alg, w, i);
                        let batched = got[i].clone().expect("the batch answers");
                        prop_assert_eq!(batched, expected, "{} wave {} request {}", alg, w, i);
                    }
                }
                Ok(())
            })
        })
        .unwrap();
}

/// Makes `key` a list: the script reads it as missing (MGET) and its write is refused.
async fn make_list(conn: &mut redis::aio::MultiplexedConnection, key: &str) {
    let _: () = redis::cmd("RPUSH")
        .arg(key)
        .arg("x")
        .query_async(conn)
        .await
        .unwrap();
}

/// One request whose key Redis cannot use (here: someone else's value under the prefix,
/// of another length than a state or of a state's 16 bytes but out of its range) fails
/// alone; the requests batched with it are decided as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_an_unusable_key_fails_alone_in_its_batch() {
    let Some(server) = RedisServer::private("a_request_with_an_unusable_key_fails_alone") else {
        return;
    };
    let prefix = fresh_prefix();
    let redis = store(&server, &prefix, 128);
    let rate = Rate::per_minute(5);
    let key = |id: &'static [u8]| {
        [Key::new(
            RuleKind::User,
            Subject::Named(id),
            rate,
            Algorithm::FixedWindow,
        )]
    };
    let (alice, victim, bob) = (key(b"alice"), key(b"victim"), key(b"bob"));
    let (listed, stamped) = (key(b"listed"), key(b"stamped"));
    let mut conn = server.conn().await;
    // Read as a state, these 16 bytes would start its window about 2^59 µs from now.
    let stamp = "2026-12-06T15:00";
    for (victim, value) in [(&victim, "junk"), (&stamped, stamp)] {
        let _: () = redis::cmd("SET")
            .arg(victim[0].encode(&prefix))
            .arg(value)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    // A key of another type reads as missing; the write (SET ... GET) refuses it.
    make_list(&mut conn, &listed[0].encode(&prefix)).await;
    let answers = redis
        .check_batch(&[
            StoreRequest::new(&alice, T0),
            StoreRequest::new(&victim, T0),
            StoreRequest::new(&listed, T0),
            StoreRequest::new(&bob, T0),
            StoreRequest::new(&listed, T0),
            StoreRequest::new(&stamped, T0),
        ])
        .await;
    assert!(answers[0].as_ref().unwrap().iter().all(|o| o.is_allowed()));
    assert!(answers[1].is_err(), "{answers:?}");
    assert!(answers[2].is_err(), "{answers:?}");
    assert!(answers[3].as_ref().unwrap().iter().all(|o| o.is_allowed()));
    assert!(answers[4].is_err(), "{answers:?}");
    assert!(answers[5].is_err(), "{answers:?}");
    let kind: String = redis::cmd("TYPE")
        .arg(listed[0].encode(&prefix))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(kind, "list");
    for (victim, value) in [(&victim, "junk"), (&stamped, stamp)] {
        let kept: String = redis::cmd("GET")
            .arg(victim[0].encode(&prefix))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(
            kept, value,
            "a value tollgate did not write is never overwritten"
        );
    }
}

/// A write Redis refuses fails every request counted at that key, whichever of its keys
/// the key is (the script finds them by walking the batch again), and only those: a
/// request refused before the write, and the requests on other keys, answer as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_write_fails_each_request_counted_there_and_no_other() {
    let Some(server) = RedisServer::private("a_refused_write_fails_each_request_counted") else {
        return;
    };
    let prefix = fresh_prefix();
    let redis = store(&server, &prefix, 128);
    let rate = Rate::per_minute(2);
    let key =
        |kind, id: &'static [u8]| Key::new(kind, Subject::Named(id), rate, Algorithm::FixedWindow);
    let listed = key(RuleKind::Tenant, b"listed");
    let (alice, bob, carol) = (
        key(RuleKind::User, b"alice"),
        key(RuleKind::User, b"bob"),
        key(RuleKind::User, b"carol"),
    );
    let mut conn = server.conn().await;
    // The tenant's key is a list: MGET reads it as missing, and its write (SET ... GET)
    // is refused with WRONGTYPE.
    make_list(&mut conn, &listed.encode(&prefix)).await;
    // carol is already at her limit: her request with the tenant is refused before any
    // write, so it counted nowhere and answers as refused.
    for _ in 0..2 {
        let one = redis.check_batch(&[StoreRequest::new(&[carol], T0)]).await;
        assert!(one[0].as_ref().unwrap().iter().all(|o| o.is_allowed()));
    }
    let (a, b, c, l) = ([alice, listed], [bob], [carol, listed], [listed]);
    let answers = redis
        .check_batch(&[
            StoreRequest::new(&a, T0),
            StoreRequest::new(&b, T0),
            StoreRequest::new(&c, T0),
            StoreRequest::new(&l, T0),
        ])
        .await;
    assert!(answers[0].is_err(), "alice + tenant: {answers:?}");
    assert!(answers[1].as_ref().unwrap().iter().all(|o| o.is_allowed()));
    let refused = answers[2]
        .as_ref()
        .expect("carol's request was never written");
    assert!(!refused.iter().next().unwrap().is_allowed(), "{answers:?}");
    assert!(answers[3].is_err(), "the tenant alone: {answers:?}");
}
