//! Differential: for each algorithm, random sequences of (time, identity, tool) requests
//! get identical outcomes (allowed, remaining, reset_after, retry_after: everything the
//! decision and its headers are made of) from `MemoryStore` and from `RedisStore` with
//! caller-supplied time. The Lua scripts must mirror the Rust algorithms exactly.
#![cfg(feature = "redis")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::redis::{caller_time_store, fresh_prefix, RedisServer};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tollgate::{
    Algorithm, Key, MemoryStore, Outcomes, Rate, RedisStore, RuleKind, Settlement, Store,
    StoreFuture, StoreRequest, Subject,
};

const T0: u64 = 1_700_000_000_000_000;

const USERS: &[&[u8]] = &[b"alice", b"bob", b"a:b", b"{x}\n", b""];
const TENANTS: &[&[u8]] = &[b"acme", b"a:b"];
const TOOLS: &[&[u8]] = &[b"search", b"fetch"];

#[derive(Clone, Debug)]
struct Step {
    /// µs since the previous request (forward only: see `clock_stepped_back`).
    gap: u64,
    user: Option<usize>,
    tenant: Option<usize>,
    tool: Option<usize>,
}

fn step() -> impl Strategy<Value = Step> {
    (
        prop_oneof![
            4 => 0u64..50_000,
            3 => 0u64..1_500_000,
            1 => 0u64..200_000_000,
        ],
        proptest::option::weighted(0.8, 0..USERS.len()),
        proptest::option::weighted(0.5, 0..TENANTS.len()),
        proptest::option::weighted(0.5, 0..TOOLS.len()),
    )
        .prop_map(|(gap, user, tenant, tool)| Step {
            gap,
            user,
            tenant,
            tool,
        })
}

fn rate() -> impl Strategy<Value = Rate> {
    (
        1u64..12,
        prop_oneof![Just(1u64), Just(2), Just(3), Just(10), Just(60)],
    )
        .prop_map(|(count, secs)| Rate::new(count, Duration::from_secs(secs)).unwrap())
}

async fn answer(store: &dyn Store, keys: &[Key<'_>], now: u64) -> Outcomes {
    match store.check(&StoreRequest::new(keys, now)) {
        StoreFuture::Ready(r) => r,
        StoreFuture::Pending(f) => f.await,
    }
    .expect("store answers")
}

/// Runs `steps` through both stores, asserting identical outcomes at every request.
async fn compare(
    redis: &dyn Store,
    alg: Algorithm,
    rates: [Rate; 3],
    start: u64,
    steps: &[Step],
) -> Result<(), TestCaseError> {
    let memory = MemoryStore::new();
    let mut now = start;
    for (i, s) in steps.iter().enumerate() {
        now += s.gap;
        let mut keys = Vec::with_capacity(3);
        keys.push(Key::new(
            RuleKind::User,
            s.user
                .map_or(Subject::Anonymous, |u| Subject::Named(USERS[u])),
            rates[0],
            alg,
        ));
        if let Some(t) = s.tenant {
            keys.push(Key::new(
                RuleKind::Tenant,
                Subject::Named(TENANTS[t]),
                rates[1],
                alg,
            ));
        }
        if let Some(t) = s.tool {
            keys.push(Key::new(
                RuleKind::Tool,
                Subject::Named(TOOLS[t]),
                rates[2],
                alg,
            ));
        }
        let expected = memory.check(&StoreRequest::new(&keys, now));
        let StoreFuture::Ready(Ok(expected)) = expected else {
            panic!("the memory store answers at once")
        };
        let got = answer(redis, &keys, now).await;
        prop_assert_eq!(got, expected, "{} step {} at +{} µs", alg, i, now - start);
    }
    Ok(())
}

fn differential(alg: Algorithm, test: &str) {
    let Some(server) = RedisServer::any(test) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let server = Arc::new(server);
    let mut runner = TestRunner::new(Config {
        cases: 48,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        [rate(), rate(), rate()],
        0u64..120_000_000,
        proptest::collection::vec(step(), 1..60),
    );
    runner
        .run(&strategy, |(rates, offset, steps)| {
            // A fresh prefix per case: each case starts from empty stores.
            let redis = caller_time_store(server.url(), &fresh_prefix());
            rt.block_on(compare(&redis, alg, rates, T0 + offset, &steps))
        })
        .unwrap();
}

#[test]
fn fixed_window_lua_matches_memory() {
    differential(Algorithm::FixedWindow, "fixed_window_lua_matches_memory");
}

#[test]
fn sliding_window_lua_matches_memory() {
    differential(
        Algorithm::SlidingWindow,
        "sliding_window_lua_matches_memory",
    );
}

#[test]
fn token_bucket_lua_matches_memory() {
    differential(Algorithm::TokenBucket, "token_bucket_lua_matches_memory");
}

/// The clock stepping back (NTP) is handled alike: time goes forward, then back behind
/// stored windows and arrival times, within one period so neither store drops state.
#[test]
fn clock_stepped_back_matches_memory() {
    let Some(server) = RedisServer::any("clock_stepped_back_matches_memory") else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for alg in [
            Algorithm::FixedWindow,
            Algorithm::SlidingWindow,
            Algorithm::TokenBucket,
        ] {
            let rate = Rate::new(4, Duration::from_secs(10)).unwrap();
            let redis = caller_time_store(server.url(), &fresh_prefix());
            let memory = MemoryStore::new();
            // Starts 1 s before an aligned 10 s boundary so the sliding window crosses it.
            let base = T0 - T0 % 10_000_000 + 9_000_000;
            let offsets: [i64; 12] = [
                0, 100_000, 1_500_000, 1_200_000, 400_000, 2_000_000, 900_000, 950_000, 3_000_000,
                2_500_000, 1_000_001, 999_999,
            ];
            let key = [Key::new(RuleKind::User, Subject::Named(b"u"), rate, alg)];
            for (i, off) in offsets.iter().enumerate() {
                let now = (base as i64 + off) as u64;
                let StoreFuture::Ready(Ok(expected)) = memory.check(&StoreRequest::new(&key, now))
                else {
                    panic!("memory answers at once")
                };
                let got = answer(&redis, &key, now).await;
                assert_eq!(got, expected, "{alg} step {i} at offset {off}");
            }
        }
    });
}

/// Counts near the largest rate sliding_window accepts still agree: every double the
/// script computes stays exact.
#[test]
fn large_rates_stay_exact() {
    let Some(server) = RedisServer::any("large_rates_stay_exact") else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for alg in [
            Algorithm::FixedWindow,
            Algorithm::SlidingWindow,
            Algorithm::TokenBucket,
        ] {
            // sliding_window's bound: count × period in ms ≤ 2^53.
            let count = if alg == Algorithm::SlidingWindow {
                104_000_000
            } else {
                1_000_000_000
            };
            let rate = Rate::new(count, Duration::from_secs(86_400)).unwrap();
            let small = Rate::new(3, Duration::from_secs(86_400)).unwrap();
            let redis = caller_time_store(server.url(), &fresh_prefix());
            let memory = MemoryStore::new();
            let keys = [
                Key::new(RuleKind::User, Subject::Named(b"u"), rate, alg),
                Key::new(RuleKind::Tool, Subject::Named(b"t"), small, alg),
            ];
            let mut now = T0 + 12_345_678;
            for i in 0..8 {
                now += 43_199_999_999 * (i % 2) + 7;
                let StoreFuture::Ready(Ok(expected)) = memory.check(&StoreRequest::new(&keys, now))
                else {
                    panic!("memory answers at once")
                };
                assert_eq!(answer(&redis, &keys, now).await, expected, "{alg} step {i}");
            }
        }
    });
}

/// One call of the costed sequence: a step, what it costs, and what settling it changes
/// (`None`: it is not settled).
#[derive(Clone, Debug)]
struct CostedStep {
    step: Step,
    cost: u64,
    settle: Option<i64>,
}

fn costed_step() -> impl Strategy<Value = CostedStep> {
    (
        step(),
        prop_oneof![3 => 0u64..4, 2 => 0u64..14, 1 => Just(0u64)],
        proptest::option::weighted(0.3, -20i64..30),
    )
        .prop_map(|(step, cost, settle)| CostedStep { step, cost, settle })
}

/// Settles a call under `keys` in `store`, whose check answered `outcomes`, and waits for
/// the store to have applied it.
async fn settle(store: &dyn Store, keys: &[Key<'_>], outcomes: &Outcomes, delta: i64, now: u64) {
    store
        .settle(&Settlement::new(keys, outcomes, delta, now))
        .await
        .expect("settled");
}

/// Runs `steps` through the memory store, through Redis one call at a time, and through
/// Redis in batches (`check_batch`, cut where a call is settled), asserting identical
/// outcomes for every call and every settlement's effect.
async fn compare_costed(
    alone: &RedisStore,
    batched: &RedisStore,
    alg: Algorithm,
    rates: [Rate; 3],
    start: u64,
    steps: &[CostedStep],
) -> Result<(), TestCaseError> {
    let memory = MemoryStore::new();
    // Each call's keys and time, owned for the batch run.
    let mut calls = Vec::with_capacity(steps.len());
    let mut now = start;
    for s in steps {
        now += s.step.gap;
        calls.push((keys_of(&s.step, alg, rates), now));
    }
    let mut expected = Vec::with_capacity(steps.len());
    for (i, (s, (keys, now))) in steps.iter().zip(&calls).enumerate() {
        let request = StoreRequest::new(keys, *now).with_cost(s.cost);
        let StoreFuture::Ready(Ok(want)) = memory.check(&request) else {
            panic!("the memory store answers at once")
        };
        let got = match alone.check(&request) {
            StoreFuture::Ready(r) => r,
            StoreFuture::Pending(f) => f.await,
        }
        .expect("redis answers");
        prop_assert_eq!(
            got,
            want,
            "{} call {} (cost {}), one at a time",
            alg,
            i,
            s.cost
        );
        if let Some(delta) = s.settle.filter(|_| want.iter().all(|o| o.is_allowed())) {
            settle(&memory, keys, &want, delta, *now + 1).await;
            settle(alone, keys, &got, delta, *now + 1).await;
        }
        expected.push(want);
    }
    // The same calls in batches: a batch ends at a call that is settled.
    let mut i = 0;
    while i < steps.len() {
        let end = (i..steps.len())
            .find(|&j| steps[j].settle.is_some())
            .map_or(steps.len(), |j| j + 1);
        let requests: Vec<StoreRequest<'_>> = (i..end)
            .map(|j| StoreRequest::new(&calls[j].0, calls[j].1).with_cost(steps[j].cost))
            .collect();
        let answers = batched.check_batch(&requests).await;
        for (j, answer) in (i..end).zip(answers) {
            let got = answer.expect("redis answers");
            prop_assert_eq!(
                got,
                expected[j],
                "{} call {} (cost {}), in a batch",
                alg,
                j,
                steps[j].cost
            );
            if let Some(delta) = steps[j]
                .settle
                .filter(|_| got.iter().all(|o| o.is_allowed()))
            {
                settle(batched, &calls[j].0, &got, delta, calls[j].1 + 1).await;
            }
        }
        i = end;
    }
    Ok(())
}

/// The keys of one step: the user's, and the tenant's and the tool's when it has them.
fn keys_of(s: &Step, alg: Algorithm, rates: [Rate; 3]) -> Vec<Key<'static>> {
    let mut keys = vec![Key::new(
        RuleKind::User,
        s.user
            .map_or(Subject::Anonymous, |u| Subject::Named(USERS[u])),
        rates[0],
        alg,
    )];
    if let Some(t) = s.tenant {
        keys.push(Key::new(
            RuleKind::Tenant,
            Subject::Named(TENANTS[t]),
            rates[1],
            alg,
        ));
    }
    if let Some(t) = s.tool {
        keys.push(Key::new(
            RuleKind::Tool,
            Subject::Named(TOOLS[t]),
            rates[2],
            alg,
        ));
    }
    keys
}

/// ARCHITECTURE.md, behaviour contract item 19: random costs (0 included, and above a
/// limit) and settlements up and down give the same outcomes from the memory store, from
/// Redis one call at a time and from Redis batches, for every algorithm.
#[test]
fn costed_calls_and_settlements_match_memory_alone_and_in_batches() {
    let Some(server) = RedisServer::any("costed_calls_and_settlements_match_memory") else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let server = Arc::new(server);
    for alg in [
        Algorithm::FixedWindow,
        Algorithm::SlidingWindow,
        Algorithm::TokenBucket,
    ] {
        let mut runner = TestRunner::new(Config {
            cases: 32,
            failure_persistence: None,
            ..Config::default()
        });
        let strategy = (
            [rate(), rate(), rate()],
            0u64..120_000_000,
            proptest::collection::vec(costed_step(), 1..50),
        );
        runner
            .run(&strategy, |(rates, offset, steps)| {
                let alone = caller_time_store(server.url(), &fresh_prefix());
                let batched = caller_time_store(server.url(), &fresh_prefix());
                rt.block_on(compare_costed(
                    &alone,
                    &batched,
                    alg,
                    rates,
                    T0 + offset,
                    &steps,
                ))
            })
            .unwrap();
    }
}
