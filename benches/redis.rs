//! Requests/s through the Redis store against the floor: a plain `EVALSHA` loop of the same
//! script (`src/store/lua/algorithms.lua` + `batch.lua`, one request per call), same keys
//! and arguments, over ONE redis-rs multiplexed connection shared by every task.
//! Concurrency 1 and 64, in the same run. The store coalesces by default, so at 64 it may
//! beat the floor; `examples/redis_throughput.rs` compares coalescing on and off.
//!
//! ```text
//! cargo bench --bench redis                                  # 127.0.0.1:6379
//! TOLLGATE_REDIS_URL=redis://127.0.0.1:6380/0 cargo bench --bench redis
//! ```
//!
//! Skipped, with a message, when no Redis answers. Keys use the prefix
//! `tollgate-bench-<pid>` (they expire after one second); nothing is flushed. Throughput is
//! in elements/s (one element = one request checked); the ratio `store / evalsha` at the
//! same concurrency is the budget figure (≥ 0.8 at 64).
//!
//! `redis_refusal`: one caller over its limit, refused by the deny cache (no round trip)
//! against the same refusal asked of Redis each time (deny cache off); budget < 1 µs.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use redis::aio::MultiplexedConnection;
use redis::Script;
use tollgate::{
    Algorithm, Clock, Key, Rate, RedisStore, RuleKind, Store, StoreFuture, StoreRequest, Subject,
};

const USERS: usize = 1_000;
const RATE: Rate = Rate::per_second(1_000_000_000);

fn url() -> String {
    std::env::var("TOLLGATE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

fn user(id: &[u8]) -> Key<'_> {
    Key::new(
        RuleKind::User,
        Subject::Named(id),
        RATE,
        Algorithm::FixedWindow,
    )
}

/// Runs `iters` calls of `one(task, n)` spread over `tasks` tasks; the wall time.
async fn spread<F, Fut>(tasks: usize, iters: u64, one: F) -> Duration
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let one = Arc::new(one);
    let per_task = (iters as usize).div_ceil(tasks);
    let began = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let one = one.clone();
            tokio::spawn(async move {
                for n in 0..per_task {
                    one(t, n).await;
                }
            })
        })
        .collect();
    for h in handles {
        h.await.expect("bench task panicked");
    }
    let elapsed = began.elapsed();
    // Report per requested iteration, although rounding up may have run a few more.
    elapsed.mul_f64(iters as f64 / (per_task * tasks) as f64)
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let url = url();
    let client = match redis::Client::open(url.as_str()) {
        Ok(client) => client,
        Err(e) => {
            eprintln!("redis bench skipped: {url} is not a Redis URL ({e})");
            return;
        }
    };
    let conn: MultiplexedConnection = match rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(2),
            client.get_multiplexed_async_connection(),
        )
        .await
    }) {
        Ok(Ok(conn)) => conn,
        _ => {
            eprintln!("redis bench skipped: no Redis answers at {url}");
            return;
        }
    };
    let prefix = format!("tollgate-bench-{}", std::process::id());
    let ids: Arc<Vec<String>> = Arc::new((0..USERS).map(|i| format!("user-{i:06}")).collect());
    // The floor's keys are encoded exactly as the store encodes them, under another prefix.
    let floor_keys: Arc<Vec<String>> = Arc::new(
        ids.iter()
            .map(|id| user(id.as_bytes()).encode(&format!("{prefix}-floor")))
            .collect(),
    );
    let store = RedisStore::builder(url.as_str())
        .key_prefix(format!("{prefix}-store"))
        .timeout(Duration::from_secs(1))
        .build()
        .expect("a valid URL");
    let script = Arc::new(Script::new(concat!(
        include_str!("../src/store/lua/algorithms.lua"),
        include_str!("../src/store/lua/batch.lua")
    )));

    let mut group = c.benchmark_group("redis");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20)
        .throughput(Throughput::Elements(1));

    for tasks in [1, 64] {
        let (ids, store) = (ids.clone(), store.clone());
        group.bench_function(format!("store_c{tasks}"), |b| {
            b.iter_custom(|iters| {
                let (ids, store) = (ids.clone(), store.clone());
                rt.block_on(spread(tasks, iters, move |t, n| {
                    let id = &ids[(t * 7919 + n) % USERS];
                    let check = store.check(&StoreRequest::new(
                        &[user(id.as_bytes())],
                        0, // Redis TIME decides: the store's default.
                    ));
                    async move {
                        let outcomes = match check {
                            StoreFuture::Pending(fut) => fut.await,
                            StoreFuture::Ready(r) => r,
                        }
                        .expect("redis answered");
                        assert!(outcomes.iter().all(|o| o.is_allowed()), "rejected");
                        black_box(outcomes);
                    }
                }))
            })
        });
        let (keys, script, conn) = (floor_keys.clone(), script.clone(), conn.clone());
        group.bench_function(format!("evalsha_c{tasks}"), |b| {
            b.iter_custom(|iters| {
                let (keys, script, conn) = (keys.clone(), script.clone(), conn.clone());
                rt.block_on(spread(tasks, iters, move |t, n| {
                    let key = keys[(t * 7919 + n) % USERS].clone();
                    let (script, mut conn) = (script.clone(), conn.clone());
                    async move {
                        // One request of one fixed-window key, as the store packs it:
                        // Redis TIME, one request, then algorithm 1 with 1 key (u8 each),
                        // the key's index 1 (u16), its count (u32) and period in µs (f64).
                        let mut packed = vec![1u8, 1];
                        packed.extend(1u16.to_le_bytes());
                        packed.extend((RATE.count() as u32).to_le_bytes());
                        packed.extend((RATE.period().as_micros() as f64).to_le_bytes());
                        // The answer: the request's status, then the key's allowed flag.
                        let answer: Vec<u8> = script
                            .key(key)
                            .arg(-1i64)
                            .arg(1i64)
                            .arg(packed)
                            .invoke_async(&mut conn)
                            .await
                            .expect("redis answered");
                        assert_eq!(answer.get(..2), Some(&[1u8, 1][..]), "rejected");
                        black_box(answer);
                    }
                }))
            })
        });
    }
    group.finish();

    // An abusive caller over its limit: refused by the deny cache without a round trip,
    // against the same refusal asked of Redis every time (deny cache off).
    let mut group = c.benchmark_group("redis_refusal");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20)
        .throughput(Throughput::Elements(1));
    let clock = tollgate::SystemClock::new();
    let hourly = Rate::per_hour(1);
    let abuser = |id: &'static [u8]| {
        Key::new(
            RuleKind::User,
            Subject::Named(id),
            hourly,
            Algorithm::FixedWindow,
        )
    };
    for (name, capacity) in [("deny_cache", 10_000), ("redis_round_trip", 0)] {
        let store = RedisStore::builder(url.as_str())
            .key_prefix(format!("{prefix}-{name}"))
            .timeout(Duration::from_secs(1))
            .deny_cache(capacity)
            .build()
            .expect("a valid URL");
        let check = |store: &RedisStore| {
            let request = [abuser(b"abuser")];
            match store.check(&StoreRequest::new(&request, clock.now_micros())) {
                StoreFuture::Ready(r) => r,
                StoreFuture::Pending(fut) => rt.block_on(fut),
            }
            .expect("redis answered")
        };
        check(&store); // allowed: the hour's one request
        assert!(
            !check(&store).iter().all(|o| o.is_allowed()),
            "refused from now on"
        );
        group.bench_function(name, |b| {
            b.iter(|| {
                let outcomes = check(&store);
                assert!(!outcomes.iter().all(|o| o.is_allowed()));
                black_box(outcomes)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
