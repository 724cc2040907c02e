//! The memory store against governor's keyed limiter, in the same run, doing the same
//! work: read the time, look the key up, count.
//!
//! ```text
//! cargo bench --bench store                 # full run, a few minutes on 2 cores
//! cargo bench --bench store -- --quick      # sanity check
//! cargo bench --bench store -- store/hot    # one group
//! ```
//!
//! Every tollgate check includes `SystemClock::now_micros()` on a clock created once (what
//! the layer does per request); governor's `check_key` reads its default (quanta) clock
//! the same way. `*_fixed_now` rows leave the clock out, to split store time from clock
//! time. The rate (10^9/s) is high enough that every check is accepted, as in governor.
//!
//! Groups:
//! - `store/hot`: one key, checked over and over.
//! - `store/100k`: 100 000 keys round-robin, the key Strings built beforehand and borrowed;
//!   `tollgate_store_sized_100k` holds them in a store sized for 100 000 keys instead of
//!   the default million.
//! - `store/threads`: one thread vs two on distinct keys (each thread round-robins its own
//!   1 024 keys), and one vs two on one shared key. Throughput is in elements/s: the
//!   2-thread / 1-thread ratio is the ratio of the `thrpt` figures.
//! - `store/rules`: one rule (user) vs three (user + tenant + tool) per request.
//! - `clock`: the time reads alone.

#[path = "../examples/common/store_check.rs"]
mod store_check;

use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use governor::clock::{Clock as _, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use store_check::check;
use tollgate::{Algorithm, Clock, Key, MemoryStore, Rate, RuleKind, Subject, SystemClock};

/// Every check is accepted at this rate, in both limiters.
const PER_SECOND: u32 = 1_000_000_000;
const MANY: usize = 100_000;
const PER_THREAD: usize = 1_024;

type Governor<K> = RateLimiter<K, DefaultKeyedStateStore<K>, DefaultClock>;

fn rate() -> Rate {
    Rate::per_second(PER_SECOND)
}

fn governor<K: std::hash::Hash + Eq + Clone>() -> Governor<K> {
    RateLimiter::keyed(Quota::per_second(
        NonZeroU32::new(PER_SECOND).expect("non-zero"),
    ))
}

fn user(id: &[u8]) -> Key<'_> {
    Key::new(
        RuleKind::User,
        Subject::Named(id),
        rate(),
        Algorithm::FixedWindow,
    )
}

#[inline]
fn check_gov<K: std::hash::Hash + Eq + Clone>(limiter: &Governor<K>, key: &K) {
    assert!(black_box(limiter.check_key(key)).is_ok(), "rejected");
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:08}")).collect()
}

fn configure(group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(30);
}

fn hot(c: &mut Criterion) {
    let mut group = c.benchmark_group("store/hot");
    configure(&mut group);
    group.throughput(Throughput::Elements(1));
    let clock = SystemClock::new();
    let id = String::from("user-00000042");

    let store = MemoryStore::new();
    group.bench_function("tollgate_string", |b| {
        b.iter(|| {
            check(
                &store,
                &[user(black_box(&id).as_bytes())],
                clock.now_micros(),
            )
        })
    });
    let store = MemoryStore::new();
    let now = clock.now_micros();
    group.bench_function("tollgate_fixed_now", |b| {
        b.iter(|| check(&store, &[user(black_box(&id).as_bytes())], black_box(now)))
    });
    let gov = governor::<String>();
    group.bench_function("governor_string", |b| {
        b.iter(|| check_gov(&gov, black_box(&id)))
    });
    let gov = governor::<u64>();
    group.bench_function("governor_u64", |b| {
        b.iter(|| check_gov(&gov, black_box(&42u64)))
    });
    group.finish();
}

fn many(c: &mut Criterion) {
    let mut group = c.benchmark_group("store/100k");
    configure(&mut group);
    group.throughput(Throughput::Elements(1));
    let clock = SystemClock::new();
    let keys = ids("user", MANY);
    let numbers: Vec<u64> = (0..MANY as u64).collect();

    // Each limiter is pre-filled with every key, so the measured loop is the steady state
    // (lookups of known keys), not first inserts. The second store holds the same keys in
    // a table sized for them (6.4 MiB instead of 64 MiB): how much of the cost is the
    // memory the keys are spread over.
    let store = MemoryStore::new();
    let sized = MemoryStore::with_max_keys(MANY);
    for (name, store) in [
        ("tollgate_string", &store),
        ("tollgate_store_sized_100k", &sized),
    ] {
        for k in &keys {
            check(store, &[user(k.as_bytes())], clock.now_micros());
        }
        let mut i = 0;
        group.bench_function(name, |b| {
            b.iter(|| {
                i = if i + 1 == MANY { 0 } else { i + 1 };
                check(store, &[user(keys[i].as_bytes())], clock.now_micros())
            })
        });
    }
    let now = clock.now_micros();
    let mut i = 0;
    group.bench_function("tollgate_fixed_now", |b| {
        b.iter(|| {
            i = if i + 1 == MANY { 0 } else { i + 1 };
            check(&store, &[user(keys[i].as_bytes())], black_box(now))
        })
    });
    let gov = governor::<String>();
    keys.iter().for_each(|k| check_gov(&gov, k));
    let mut i = 0;
    group.bench_function("governor_string", |b| {
        b.iter(|| {
            i = if i + 1 == MANY { 0 } else { i + 1 };
            check_gov(&gov, &keys[i])
        })
    });
    let gov = governor::<u64>();
    numbers.iter().for_each(|k| check_gov(&gov, k));
    let mut i = 0;
    group.bench_function("governor_u64", |b| {
        b.iter(|| {
            i = if i + 1 == MANY { 0 } else { i + 1 };
            check_gov(&gov, &numbers[i])
        })
    });
    group.finish();
}

/// Runs `work(thread, iters)` on `threads` threads started together; the wall time from
/// the common start to the last finish.
fn on_threads<F>(threads: usize, iters: u64, work: F) -> Duration
where
    F: Fn(usize, u64) + Sync,
{
    let start = Barrier::new(threads + 1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (start, work) = (&start, &work);
                s.spawn(move || {
                    start.wait();
                    work(t, iters);
                })
            })
            .collect();
        start.wait();
        let began = Instant::now();
        for h in handles {
            h.join().expect("bench thread panicked");
        }
        began.elapsed()
    })
}

fn threads(c: &mut Criterion) {
    let mut group = c.benchmark_group("store/threads");
    configure(&mut group);
    let clock = SystemClock::new();
    // Disjoint key sets, one per thread; the one-thread baseline uses set 0.
    let sets = [ids("a", PER_THREAD), ids("b", PER_THREAD)];
    let numbers = [
        (0..PER_THREAD as u64).collect::<Vec<_>>(),
        (PER_THREAD as u64..2 * PER_THREAD as u64).collect(),
    ];
    let shared = String::from("user-shared");

    let tollgate_distinct = |store: &MemoryStore, t: usize, iters: u64| {
        let set = &sets[t];
        for n in 0..iters as usize {
            check(
                store,
                &[user(set[n % PER_THREAD].as_bytes())],
                clock.now_micros(),
            );
        }
    };
    let governor_distinct = |gov: &Governor<String>, t: usize, iters: u64| {
        let set = &sets[t];
        for n in 0..iters as usize {
            check_gov(gov, &set[n % PER_THREAD]);
        }
    };
    let governor_u64_distinct = |gov: &Governor<u64>, t: usize, iters: u64| {
        let set = &numbers[t];
        for n in 0..iters as usize {
            check_gov(gov, &set[n % PER_THREAD]);
        }
    };

    for n in [1, 2] {
        group.throughput(Throughput::Elements(n as u64));
        let store = MemoryStore::new();
        group.bench_function(format!("tollgate_distinct_{n}t"), |b| {
            b.iter_custom(|iters| on_threads(n, iters, |t, i| tollgate_distinct(&store, t, i)))
        });
        let gov = governor::<String>();
        group.bench_function(format!("governor_string_distinct_{n}t"), |b| {
            b.iter_custom(|iters| on_threads(n, iters, |t, i| governor_distinct(&gov, t, i)))
        });
        let gov = governor::<u64>();
        group.bench_function(format!("governor_u64_distinct_{n}t"), |b| {
            b.iter_custom(|iters| on_threads(n, iters, |t, i| governor_u64_distinct(&gov, t, i)))
        });
    }
    for n in [1, 2] {
        group.throughput(Throughput::Elements(n as u64));
        let store = MemoryStore::new();
        group.bench_function(format!("tollgate_shared_{n}t"), |b| {
            b.iter_custom(|iters| {
                on_threads(n, iters, |_, iters| {
                    for _ in 0..iters {
                        check(&store, &[user(shared.as_bytes())], clock.now_micros());
                    }
                })
            })
        });
        let gov = governor::<String>();
        group.bench_function(format!("governor_string_shared_{n}t"), |b| {
            b.iter_custom(|iters| {
                on_threads(n, iters, |_, iters| {
                    for _ in 0..iters {
                        check_gov(&gov, &shared);
                    }
                })
            })
        });
    }
    group.finish();
}

fn rules(c: &mut Criterion) {
    let mut group = c.benchmark_group("store/rules");
    configure(&mut group);
    group.throughput(Throughput::Elements(1));
    let clock = SystemClock::new();
    let users = ids("user", 1_000);
    let tenants = ids("tenant", 10);
    let tool = String::from("search");

    let store = MemoryStore::new();
    let mut i = 0;
    group.bench_function("tollgate_one_rule", |b| {
        b.iter(|| {
            i = (i + 1) % users.len();
            check(&store, &[user(users[i].as_bytes())], clock.now_micros())
        })
    });
    let store = MemoryStore::new();
    let mut i = 0;
    group.bench_function("tollgate_three_rules", |b| {
        b.iter(|| {
            i = (i + 1) % users.len();
            let keys = [
                user(users[i].as_bytes()),
                Key::new(
                    RuleKind::Tenant,
                    Subject::Named(tenants[i % tenants.len()].as_bytes()),
                    rate(),
                    Algorithm::FixedWindow,
                ),
                Key::new(
                    RuleKind::Tool,
                    Subject::Named(tool.as_bytes()),
                    rate(),
                    Algorithm::FixedWindow,
                ),
            ];
            check(&store, &keys, clock.now_micros())
        })
    });
    // governor has no all-or-nothing multi-key check: three independent limiters, three
    // clock reads. For reference only.
    let (gu, gt, gk) = (
        governor::<String>(),
        governor::<String>(),
        governor::<String>(),
    );
    let mut i = 0;
    group.bench_function("governor_string_three_limiters", |b| {
        b.iter(|| {
            i = (i + 1) % users.len();
            check_gov(&gu, &users[i]);
            check_gov(&gt, &tenants[i % tenants.len()]);
            check_gov(&gk, &tool);
        })
    });
    group.finish();
}

fn clocks(c: &mut Criterion) {
    let mut group = c.benchmark_group("clock");
    configure(&mut group);
    let system = SystemClock::new();
    group.bench_function("tollgate_system_clock", |b| {
        b.iter(|| black_box(&system).now_micros())
    });
    let precise = SystemClock::precise();
    group.bench_function("tollgate_system_clock_precise", |b| {
        b.iter(|| black_box(&precise).now_micros())
    });
    group.bench_function("instant_now", |b| b.iter(Instant::now));
    let quanta = DefaultClock::default();
    group.bench_function("governor_default_clock", |b| {
        b.iter(|| black_box(&quanta).now())
    });
    group.finish();
}

criterion_group!(benches, hot, many, threads, rules, clocks);
criterion_main!(benches);
