//! Faults under load (ARCHITECTURE.md, behaviour contract item 11). Each test owns a
//! private `redis-server` and three gateway instances sharing it, one per failure policy:
//!
//! - `fallback`: `fallback = "memory"` (the default),
//! - `open`:     `fallback = "none"`, `fail_mode = "open"`,
//! - `closed`:   `fallback = "none"`, `fail_mode = "closed"`,
//!
//! all with `timeout_ms = 50`. Concurrent tasks drive every instance (bounded in time and
//! count, every request's latency measured) while one fault is injected: Redis killed,
//! restarted, paused, its scripts flushed, its memory full, one limiter key of the wrong
//! type, the pool exhausted. Each test asserts that every response is 200 or 429 (503
//! only from the fail-closed instance, and only where the fault makes Redis fail), that no
//! request waited much longer than the timeout, and that within seconds of the fault's
//! end a user at its limit is refused again *by Redis* (the count is in Redis, and
//! instances with no fallback refuse it too).
//!
//! The tests run one at a time (a 2-core machine measures latency, not contention), and
//! each prints its figures; `cargo run --release --example faults` runs the same faults
//! longer and prints the table in BENCHMARKS.md.
#![cfg(feature = "redis")]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::redis::{command_calls, fresh_prefix, RedisServer};
use common::{counting_service, Body};
use http::{Request, Response, StatusCode};
use redis::aio::MultiplexedConnection;
use tokio::task::JoinHandle;
use tollgate::{
    Algorithm, Identity, Key, Rate, RateLimitConfig, RateLimitLayer, ResponseBody, RuleKind,
    Subject,
};
use tower::ServiceExt;

/// Every user's limit (per minute: nothing resets during a test).
const LIMIT: u32 = 5;
/// The instances' `timeout_ms`.
const TIMEOUT: Duration = Duration::from_millis(50);
/// Slack on a noisy 2-core VM in a debug build (real p99 / max are printed).
const MARGIN: Duration = Duration::from_millis(500);
/// Load tasks per instance (three instances).
const TASKS: usize = 8;
/// Requests per load task, at most.
const MAX_PER_TASK: usize = 3_000;
/// A load never runs longer than this, whatever happens to the test.
const LOAD_CAP: Duration = Duration::from_secs(15);
/// Limits hold again within this long after a fault ends.
const RECOVERY_BOUND: Duration = Duration::from_secs(5);

/// One test at a time: latency is what is measured.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Policy {
    Fallback,
    Open,
    Closed,
}

const POLICIES: [Policy; 3] = [Policy::Fallback, Policy::Open, Policy::Closed];

impl Policy {
    fn backend(self) -> &'static str {
        match self {
            Policy::Fallback => "fallback = \"memory\"",
            Policy::Open => "fallback = \"none\"",
            Policy::Closed => "fallback = \"none\"",
        }
    }

    fn fail_mode(self) -> &'static str {
        match self {
            Policy::Closed => "closed",
            _ => "open",
        }
    }
}

/// An instance whose every request reaches Redis (`deny_cache = 0`), so each fault meets
/// every caller; the deny cache has tests of its own (tests/redis_deny_cache.rs).
fn layer(url: &str, prefix: &str, policy: Policy, timeout: Duration, pool: u32) -> RateLimitLayer {
    let toml = format!(
        "by_user = \"{LIMIT}/m\"\nfail_mode = \"{}\"\n[backend]\nkind = \"redis\"\n\
         url = \"{url}\"\nkey_prefix = \"{prefix}\"\ntimeout_ms = {}\npool_size = {pool}\n\
         deny_cache = 0\n{}",
        policy.fail_mode(),
        timeout.as_millis(),
        policy.backend()
    );
    RateLimitLayer::new(RateLimitConfig::from_toml_str(&toml).expect("a valid config"))
}

fn request(user: &str) -> Request<Body> {
    let mut req = Request::new(Body::new());
    req.extensions_mut().insert(Identity::user(user));
    req
}

/// The Redis key of `user`'s counter.
fn user_key(prefix: &str, user: &str) -> String {
    Key::new(
        RuleKind::User,
        Subject::Named(user.as_bytes()),
        Rate::per_minute(LIMIT),
        Algorithm::FixedWindow,
    )
    .encode(prefix)
}

/// Three instances sharing one Redis and one key prefix, plus a verifier: no fallback,
/// fail-closed, a generous timeout, so every 200 or 429 it gives is Redis's decision.
struct Gateway {
    url: String,
    prefix: String,
    instances: Vec<(Policy, RateLimitLayer)>,
    verifier: RateLimitLayer,
}

impl Gateway {
    fn new(server: &RedisServer, pool: u32) -> Gateway {
        let url = server.url().to_owned();
        let prefix = fresh_prefix();
        let instances = POLICIES
            .iter()
            .map(|&p| (p, layer(&url, &prefix, p, TIMEOUT, pool)))
            .collect();
        let verifier = layer(&url, &prefix, Policy::Closed, Duration::from_secs(2), 4);
        Gateway {
            url,
            prefix,
            instances,
            verifier,
        }
    }

    fn instance(&self, policy: Policy) -> &RateLimitLayer {
        &self.instances.iter().find(|(p, _)| *p == policy).unwrap().1
    }

    /// Connects every instance (a few requests each, so every shared connection is up).
    async fn warm(&self) {
        for (policy, layer) in &self.instances {
            for i in 0..8 {
                let status = send(layer, &format!("warm-{policy:?}-{i}")).await.status();
                assert_eq!(status, StatusCode::OK, "{policy:?} warming up");
            }
        }
    }
}

async fn send(layer: &RateLimitLayer, user: &str) -> Response<ResponseBody<Body>> {
    let (svc, _) = counting_service(layer.clone());
    svc.oneshot(request(user)).await.unwrap()
}

/// A fresh admin connection (the old one dies with a killed server), or `None` when Redis
/// does not answer within half a second.
async fn admin(url: &str) -> Option<MultiplexedConnection> {
    let client = redis::Client::open(url).ok()?;
    tokio::time::timeout(
        Duration::from_millis(500),
        client.get_multiplexed_async_connection(),
    )
    .await
    .ok()?
    .ok()
}

async fn admin_cmd<T: redis::FromRedisValue>(url: &str, cmd: &redis::Cmd) -> Option<T> {
    let mut conn = admin(url).await?;
    tokio::time::timeout(Duration::from_millis(500), cmd.query_async(&mut conn))
        .await
        .ok()?
        .ok()
}

/// What one policy's tasks saw.
#[derive(Debug, Default)]
struct Tally {
    ok: usize,
    /// 200s without rate headers: forwarded unchecked (fail-open).
    unchecked: usize,
    limited: usize,
    unavailable: usize,
    /// 503s answered to the owner of a wrong-typed key.
    victim_unavailable: usize,
    other: usize,
    latencies: Vec<Duration>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        self.unchecked += other.unchecked;
        self.limited += other.limited;
        self.unavailable += other.unavailable;
        self.victim_unavailable += other.victim_unavailable;
        self.other += other.other;
        self.latencies.extend(other.latencies);
    }

    fn total(&self) -> usize {
        self.latencies.len()
    }

    fn percentile(&mut self, p: f64) -> Duration {
        self.latencies.sort_unstable();
        let i = ((self.latencies.len() as f64 * p).ceil() as usize).saturating_sub(1);
        self.latencies.get(i).copied().unwrap_or_default()
    }
}

/// Concurrent load on every instance until stopped (or its own caps).
struct Run {
    stop: Arc<AtomicBool>,
    handles: Vec<(Policy, JoinHandle<Tally>)>,
}

struct LoadShape {
    tasks: usize,
    max_per_task: usize,
    /// Sleep between a task's requests (`None`: back to back).
    pace: Option<Duration>,
    /// Every fourth request of every task is this user's.
    victim: Option<&'static str>,
    /// Load only this instance (default: all three).
    only: Option<Policy>,
}

const STEADY: LoadShape = LoadShape {
    tasks: TASKS,
    max_per_task: MAX_PER_TASK,
    pace: Some(Duration::from_millis(1)),
    victim: None,
    only: None,
};

impl Run {
    fn start(gw: &Gateway, shape: &LoadShape) -> Run {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let handles = gw
            .instances
            .iter()
            .filter(|(policy, _)| shape.only.map_or(true, |only| only == *policy))
            .map(|(policy, layer)| {
                let (svc, _) = counting_service(layer.clone());
                let tasks: Vec<JoinHandle<Tally>> = (0..shape.tasks)
                    .map(|t| {
                        let svc = svc.clone();
                        let stop = stop.clone();
                        let (max, pace, victim, policy) =
                            (shape.max_per_task, shape.pace, shape.victim, *policy);
                        tokio::spawn(async move {
                            let mut tally = Tally::default();
                            for i in 0..max {
                                if stop.load(Ordering::Relaxed) || started.elapsed() > LOAD_CAP {
                                    break;
                                }
                                let user = match victim {
                                    Some(v) if i % 4 == 0 => v.to_owned(),
                                    _ => format!("{policy:?}-{t}-{}", i % 64),
                                };
                                let sent = Instant::now();
                                let resp = svc.clone().oneshot(request(&user)).await.unwrap();
                                tally.latencies.push(sent.elapsed());
                                match resp.status() {
                                    StatusCode::OK => {
                                        tally.ok += 1;
                                        if resp.headers().get("x-ratelimit-limit").is_none() {
                                            tally.unchecked += 1;
                                        }
                                    }
                                    StatusCode::TOO_MANY_REQUESTS => tally.limited += 1,
                                    StatusCode::SERVICE_UNAVAILABLE => {
                                        tally.unavailable += 1;
                                        if victim == Some(user.as_str()) {
                                            tally.victim_unavailable += 1;
                                        }
                                    }
                                    _ => tally.other += 1,
                                }
                                match pace {
                                    Some(p) => tokio::time::sleep(p).await,
                                    None => tokio::task::yield_now().await,
                                }
                            }
                            tally
                        })
                    })
                    .collect();
                let merged = tokio::spawn(async move {
                    let mut all = Tally::default();
                    for task in tasks {
                        // A panic in any request fails the test here.
                        all.merge(task.await.expect("a load task panicked"));
                    }
                    all
                });
                (*policy, merged)
            })
            .collect();
        Run { stop, handles }
    }

    /// Stops the load and collects what it saw.
    async fn finish(self) -> Vec<(Policy, Tally)> {
        self.stop.store(true, Ordering::Relaxed);
        self.finish_when_done().await
    }

    /// Waits for every task to reach its own cap (the load is bounded by count).
    async fn finish_when_done(self) -> Vec<(Policy, Tally)> {
        let mut out = Vec::new();
        for (policy, handle) in self.handles {
            out.push((policy, handle.await.expect("load panicked")));
        }
        out
    }
}

/// What a fault may do to the fail-closed instance.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Closed503 {
    /// Redis never fails: no 503 at all.
    Never,
    /// Redis fails for everyone while the fault lasts.
    WhileFaulty,
    /// Redis fails only for the owner of the broken key: nobody else gets a 503.
    OnlyTheVictim,
}

/// The assertions every fault shares; prints the figures.
fn check(fault: &str, gw: &Gateway, mut tallies: Vec<(Policy, Tally)>, closed: Closed503) {
    let bound = TIMEOUT + MARGIN;
    for (policy, t) in &mut tallies {
        let stats = gw.instance(*policy).stats();
        let (p50, p99, max) = (t.percentile(0.50), t.percentile(0.99), t.percentile(1.0));
        eprintln!(
            "{fault:<10} {policy:<8?} n={:<6} 200={:<6} (unchecked {:<5}) 429={:<6} 503={:<5} \
             other={} p50={p50:?} p99={p99:?} max={max:?} {stats:?}",
            t.total(),
            t.ok,
            t.unchecked,
            t.limited,
            t.unavailable,
            t.other
        );
        assert!(
            t.total() > 100,
            "{fault}/{policy:?}: only {} requests",
            t.total()
        );
        assert_eq!(
            t.other, 0,
            "{fault}/{policy:?}: a status other than 200/429/503"
        );
        match policy {
            Policy::Fallback => {
                assert_eq!(t.unavailable, 0, "{fault}/fallback answered 503");
                assert_eq!(t.unchecked, 0, "{fault}/fallback forwarded unchecked");
                assert_eq!(stats.store_errors, 0, "{fault}/fallback: {stats:?}");
            }
            Policy::Open => {
                assert_eq!(t.unavailable, 0, "{fault}/open answered 503");
                assert_eq!(
                    t.unchecked as u64, stats.fail_open,
                    "{fault}/open: every unchecked 200 is a counted fail-open"
                );
            }
            Policy::Closed => {
                assert_eq!(t.unchecked, 0, "{fault}/closed forwarded unchecked");
                assert_eq!(t.unavailable as u64, stats.fail_closed, "{fault}/closed");
                match closed {
                    Closed503::Never => assert_eq!(t.unavailable, 0, "{fault}/closed: 503s"),
                    Closed503::WhileFaulty => {}
                    Closed503::OnlyTheVictim => assert_eq!(
                        t.unavailable, t.victim_unavailable,
                        "{fault}/closed: a 503 for a user whose key is fine"
                    ),
                }
            }
        }
        assert!(
            max <= bound,
            "{fault}/{policy:?}: a request waited {max:?} (timeout {TIMEOUT:?}); p99 {p99:?}"
        );
    }
}

/// Time from `since` until a decision comes from Redis again: `probe(n)` names the user of
/// the n-th probe, sent through the fallback instance; Redis decided when the user's key
/// exists (only the script writes it). Panics after [`RECOVERY_BOUND`].
async fn time_to_recover(
    gw: &Gateway,
    since: Instant,
    probe: impl Fn(usize) -> String,
) -> Duration {
    let layer = gw.instance(Policy::Fallback);
    for n in 0.. {
        let user = probe(n);
        let status = send(layer, &user).await.status();
        assert!(status == StatusCode::OK || status == StatusCode::TOO_MANY_REQUESTS);
        let exists: Option<bool> = admin_cmd(
            &gw.url,
            redis::cmd("EXISTS").arg(user_key(&gw.prefix, &user)),
        )
        .await;
        if exists == Some(true) {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < RECOVERY_BOUND,
            "no decision from Redis {RECOVERY_BOUND:?} after the fault ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    unreachable!()
}

/// Whether Redis refuses `user` when asked through `layer`, an instance with no fallback
/// (its 200s and 429s are Redis's decisions). Its circuit may still be cooling down, or
/// its first request may meet a connection the fault broke: it answers 503 (closed) or
/// forwards without headers (open) meanwhile, so ask again for up to [`RECOVERY_BOUND`].
async fn redis_refuses(layer: &RateLimitLayer, user: &str) -> Result<(), String> {
    let deadline = Instant::now() + RECOVERY_BOUND;
    loop {
        let resp = send(layer, user).await;
        let status = resp.status();
        if status == StatusCode::TOO_MANY_REQUESTS {
            return Ok(());
        }
        if status == StatusCode::OK && resp.headers().get("x-ratelimit-limit").is_some() {
            return Err("Redis allowed a user at its limit".into());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no decision from Redis within {RECOVERY_BOUND:?}: {status}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// After recovery, `user` (fresh) is limited by Redis again: exactly LIMIT of LIMIT + 3
/// pass through the fallback instance, Redis holds the count, and the verifier and the
/// instances with no fallback (which can only answer 429 from Redis) refuse the user.
async fn assert_enforced_by_redis(gw: &Gateway, user: &str) {
    let fallback = gw.instance(Policy::Fallback);
    let mut allowed = 0;
    for _ in 0..LIMIT + 3 {
        allowed += u32::from(send(fallback, user).await.status() == StatusCode::OK);
    }
    assert_eq!(allowed, LIMIT, "the limit holds exactly after recovery");
    let state: Option<Vec<u8>> =
        admin_cmd(&gw.url, redis::cmd("GET").arg(user_key(&gw.prefix, user))).await;
    assert_eq!(
        state.as_deref().and_then(common::redis::count_of),
        Some(u64::from(LIMIT)),
        "Redis holds the user's count"
    );
    for (name, layer) in [
        ("verifier", &gw.verifier),
        ("open", gw.instance(Policy::Open)),
        ("closed", gw.instance(Policy::Closed)),
    ] {
        if let Err(why) = redis_refuses(layer, user).await {
            panic!("{name}: {why}");
        }
    }
}

fn fresh_probe(fault: &'static str) -> impl Fn(usize) -> String {
    move |n| format!("probe-{fault}-{n}")
}

/// Runs the blocking harness call (it sleeps while redis-server starts) off the runtime.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    tokio::task::block_in_place(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_under_load_and_back() {
    let _serial = SERIAL.lock().await;
    let Some(mut server) = RedisServer::private("killed_under_load_and_back") else {
        return;
    };
    let gw = Gateway::new(&server, 16);
    gw.warm().await;
    let run = Run::start(&gw, &STEADY);
    tokio::time::sleep(Duration::from_millis(500)).await;
    blocking(|| server.kill());
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    blocking(|| server.restart());
    let end = Instant::now();
    let recovered = time_to_recover(&gw, end, fresh_probe("kill")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tallies = run.finish().await;
    eprintln!("kill: back on Redis {recovered:?} after the restart");
    let closed = &tallies
        .iter()
        .find(|(p, _)| *p == Policy::Closed)
        .unwrap()
        .1;
    assert!(
        closed.unavailable > 0,
        "the fault never reached the fail-closed instance"
    );
    check("kill", &gw, tallies, Closed503::WhileFaulty);
    assert_enforced_by_redis(&gw, "after-kill").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_under_load() {
    let _serial = SERIAL.lock().await;
    let Some(mut server) = RedisServer::private("restarted_under_load") else {
        return;
    };
    let gw = Gateway::new(&server, 16);
    gw.warm().await;
    let run = Run::start(&gw, &STEADY);
    tokio::time::sleep(Duration::from_millis(500)).await;
    blocking(|| server.restart());
    let end = Instant::now();
    let recovered = time_to_recover(&gw, end, fresh_probe("restart")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tallies = run.finish().await;
    eprintln!("restart: back on Redis {recovered:?} after the restart");
    check("restart", &gw, tallies, Closed503::WhileFaulty);
    assert_enforced_by_redis(&gw, "after-restart").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_under_load() {
    let _serial = SERIAL.lock().await;
    let Some(server) = RedisServer::private("paused_under_load") else {
        return;
    };
    let gw = Gateway::new(&server, 16);
    gw.warm().await;
    let run = Run::start(&gw, &STEADY);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let paused: Option<()> = admin_cmd(
        &gw.url,
        redis::cmd("CLIENT").arg("PAUSE").arg(2_000).arg("ALL"),
    )
    .await;
    assert_eq!(paused, Some(()), "CLIENT PAUSE");
    let end = Instant::now() + Duration::from_millis(2_000);
    tokio::time::sleep_until(end.into()).await;
    let recovered = time_to_recover(&gw, end, fresh_probe("pause")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tallies = run.finish().await;
    eprintln!("pause: back on Redis {recovered:?} after the pause ended");
    let closed = &tallies
        .iter()
        .find(|(p, _)| *p == Policy::Closed)
        .unwrap()
        .1;
    assert!(
        closed.unavailable > 0,
        "the pause never reached the fail-closed instance"
    );
    check("pause", &gw, tallies, Closed503::WhileFaulty);
    assert_enforced_by_redis(&gw, "after-pause").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_flushed_under_load() {
    let _serial = SERIAL.lock().await;
    let Some(server) = RedisServer::private("scripts_flushed_under_load") else {
        return;
    };
    let gw = Gateway::new(&server, 16);
    gw.warm().await;
    let run = Run::start(&gw, &STEADY);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut flushes = 0;
    for _ in 0..20 {
        let done: Option<()> = admin_cmd(&gw.url, redis::cmd("SCRIPT").arg("FLUSH")).await;
        flushes += usize::from(done.is_some());
        tokio::time::sleep(Duration::from_millis(75)).await;
    }
    assert_eq!(flushes, 20);
    let end = Instant::now();
    let recovered = time_to_recover(&gw, end, fresh_probe("flush")).await;
    let tallies = run.finish().await;
    eprintln!("flush: {recovered:?} to the first probe decided by Redis");
    // NOSCRIPT is answered by reloading the script: Redis never "fails".
    check("flush", &gw, tallies, Closed503::Never);
    for (policy, layer) in &gw.instances {
        assert_eq!(
            layer.stats().store_errors,
            0,
            "{policy:?}: NOSCRIPT surfaced"
        );
    }
    assert_enforced_by_redis(&gw, "after-flush").await;
}

/// Lowers `maxmemory` (policy `noeviction`) to 1 MiB above what Redis uses now.
async fn cap_memory(conn: &mut MultiplexedConnection) {
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query_async(conn)
        .await
        .unwrap();
    let used = used_memory(conn).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(used + 1024 * 1024)
        .query_async(conn)
        .await
        .unwrap();
}

async fn used_memory(conn: &mut MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory")
}

/// Writes 16 KiB junk keys until Redis refuses even a write as small as the script's (an
/// HSET of a fresh key) with OOM. `written` counts the junk keys so far.
async fn fill_memory(conn: &mut MultiplexedConnection, written: &mut usize) {
    let junk = vec![b'x'; 16 * 1024];
    for _ in 0..10_000 {
        let small: redis::RedisResult<()> = redis::cmd("HSET")
            .arg(format!("oom-probe:{written}"))
            .arg("t")
            .arg(1)
            .query_async(conn)
            .await;
        match small {
            Err(e) if e.code() == Some("OOM") => return,
            Err(e) => panic!("{e}"),
            Ok(()) => {}
        }
        // The junk itself may be refused once memory is nearly full: that is fine.
        let _: redis::RedisResult<()> = redis::cmd("SET")
            .arg(format!("junk:{written}"))
            .arg(&junk)
            .query_async(conn)
            .await;
        *written += 1;
    }
    panic!("10,000 junk keys and Redis is still not full");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_memory_under_load() {
    let _serial = SERIAL.lock().await;
    let Some(server) = RedisServer::private("out_of_memory_under_load") else {
        return;
    };
    let gw = Gateway::new(&server, 16);
    gw.warm().await;
    // At its limit before Redis fills: a refusal writes nothing, so Redis keeps refusing
    // it while full.
    for _ in 0..LIMIT {
        send(&gw.verifier, "held").await;
    }
    let run = Run::start(&gw, &STEADY);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut conn = admin(&gw.url).await.expect("admin connection");
    cap_memory(&mut conn).await;
    let mut junk = 0;
    fill_memory(&mut conn, &mut junk).await;
    // Then lower the cap under what Redis holds, so that client buffers shrinking cannot
    // make room for a write while the fault lasts.
    let used = used_memory(&mut conn).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(used - 512 * 1024)
        .query_async(&mut conn)
        .await
        .unwrap();
    // The fault is real: a fresh user's first request needs a write, which Redis refuses.
    assert_eq!(
        send(&gw.verifier, "oom-check").await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    // While Redis is full (topped up as the load adds keys), the user at its limit is
    // still refused, through the instance with a memory fallback too: Redis decides
    // refusals (they write nothing), and its OOM answers must not hand the user to a
    // fresh local counter.
    for _ in 0..12 {
        fill_memory(&mut conn, &mut junk).await;
        assert_eq!(
            send(gw.instance(Policy::Fallback), "held").await.status(),
            StatusCode::TOO_MANY_REQUESTS,
            "a user at its limit was allowed while Redis was full"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(0)
        .query_async(&mut conn)
        .await
        .unwrap();
    let end = Instant::now();
    let recovered = time_to_recover(&gw, end, fresh_probe("oom")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tallies = run.finish().await;
    eprintln!("oom: {junk} junk keys filled Redis; back on Redis {recovered:?} after");
    check("oom", &gw, tallies, Closed503::WhileFaulty);
    assert_enforced_by_redis(&gw, "after-oom").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_typed_key_under_load() {
    let _serial = SERIAL.lock().await;
    let Some(server) = RedisServer::private("a_wrong_typed_key_under_load") else {
        return;
    };
    let gw = Gateway::new(&server, 16);
    gw.warm().await;
    let victim_key = user_key(&gw.prefix, "victim");
    let shape = LoadShape {
        victim: Some("victim"),
        ..STEADY
    };
    let run = Run::start(&gw, &shape);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The victim's counter becomes a list: every script touching it fails with WRONGTYPE.
    // (Atomically: the load may recreate the hash between a DEL and an LPUSH.)
    let mut conn = admin(&gw.url).await.expect("admin connection");
    let (_, pushed): (u64, u64) = redis::pipe()
        .atomic()
        .del(&victim_key)
        .lpush(&victim_key, "junk")
        .query_async(&mut conn)
        .await
        .expect("MULTI DEL LPUSH EXEC");
    assert_eq!(pushed, 1);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let deleted: Option<u64> = admin_cmd(&gw.url, redis::cmd("DEL").arg(&victim_key)).await;
    assert_eq!(deleted, Some(1), "the key stayed a list throughout");
    let end = Instant::now();
    let recovered = time_to_recover(&gw, end, |_| "victim".to_owned()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tallies = run.finish().await;
    eprintln!("wrongtype: the victim is back on Redis {recovered:?} after the key was deleted");
    let closed = &tallies
        .iter()
        .find(|(p, _)| *p == Policy::Closed)
        .unwrap()
        .1;
    assert!(
        closed.victim_unavailable > 0,
        "the fault never reached the victim"
    );
    check("wrongtype", &gw, tallies, Closed503::OnlyTheVictim);
    assert_enforced_by_redis(&gw, "after-wrongtype").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_exhausted_by_256_callers() {
    let _serial = SERIAL.lock().await;
    let Some(server) = RedisServer::private("pool_exhausted_by_256_callers") else {
        return;
    };
    // Two connections per instance, nothing connected yet: the first wave meets a cold
    // pool. 256 callers on the fail-closed instance, where a starved caller shows as a
    // 503; the steady load keeps the other two busy meanwhile.
    let gw = Gateway::new(&server, 2);
    if std::env::var("WARM").is_ok() {
        gw.warm().await;
    }
    let burst = Run::start(
        &gw,
        &LoadShape {
            tasks: 256,
            max_per_task: 12,
            pace: Some(Duration::from_millis(100)),
            victim: None,
            only: Some(Policy::Closed),
        },
    );
    let steady = Run::start(&gw, &STEADY);
    let mut tallies = steady.finish_after(burst).await;
    let end = Instant::now();
    let recovered = time_to_recover(&gw, end, fresh_probe("pool")).await;
    eprintln!("pool: {recovered:?} from the burst's end to a probe decided by Redis");
    check("pool", &gw, std::mem::take(&mut tallies), Closed503::Never);
    assert_enforced_by_redis(&gw, "after-pool").await;
}

impl Run {
    /// Waits for `burst` to reach its own caps, then stops this run; one tally per
    /// instance, both runs merged.
    async fn finish_after(self, burst: Run) -> Vec<(Policy, Tally)> {
        let burst = burst.finish_when_done().await;
        let mut all = self.finish().await;
        for (policy, t) in burst {
            all.iter_mut()
                .find(|(p, _)| *p == policy)
                .unwrap()
                .1
                .merge(t);
        }
        all
    }
}

/// Regression: the circuit breaker counted errors Redis *answered* (`WRONGTYPE` on one
/// key, `OOM` on a write) as Redis failing, so three of them opened the circuit for every
/// user: with no fallback and fail-closed, everyone got 503 for a second at a time; with
/// the memory fallback, users at their Redis limit got a fresh local quota. Generous
/// timeouts: nothing here may time out, so every answer is the one Redis gave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_redis_answers_do_not_open_the_circuit() {
    let _serial = SERIAL.lock().await;
    let Some(server) = RedisServer::private("errors_redis_answers_do_not_open_the_circuit") else {
        return;
    };
    let (url, prefix) = (server.url().to_owned(), fresh_prefix());
    let closed = layer(&url, &prefix, Policy::Closed, Duration::from_secs(2), 4);
    let fallback = layer(&url, &prefix, Policy::Fallback, Duration::from_secs(2), 4);
    for _ in 0..LIMIT {
        assert_eq!(send(&closed, "held").await.status(), StatusCode::OK);
    }
    let mut conn = server.conn().await;
    let _: () = redis::cmd("SET")
        .arg(user_key(&prefix, "victim"))
        .arg("junk")
        .query_async(&mut conn)
        .await
        .unwrap();
    for i in 0..10 {
        let victim = send(&closed, "victim").await.status();
        assert_eq!(
            victim,
            StatusCode::SERVICE_UNAVAILABLE,
            "WRONGTYPE, fail-closed"
        );
        let other = send(&closed, &format!("other-{i}")).await.status();
        assert_eq!(
            other,
            StatusCode::OK,
            "request {i}: a user with a sound key"
        );
        let held = send(&fallback, "held").await.status();
        assert_eq!(held, StatusCode::TOO_MANY_REQUESTS, "request {i}: held");
        let victim = send(&fallback, "victim").await.status();
        assert_ne!(
            victim,
            StatusCode::SERVICE_UNAVAILABLE,
            "the fallback answers"
        );
    }
    // Full: no write succeeds, refusals (which write nothing) still come from Redis.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();
    for i in 0..10 {
        let fresh = send(&closed, &format!("fresh-{i}")).await.status();
        assert_eq!(fresh, StatusCode::SERVICE_UNAVAILABLE, "OOM, fail-closed");
        let held = send(&closed, "held").await.status();
        assert_eq!(
            held,
            StatusCode::TOO_MANY_REQUESTS,
            "request {i}: held, closed"
        );
        let held = send(&fallback, "held").await.status();
        assert_eq!(
            held,
            StatusCode::TOO_MANY_REQUESTS,
            "request {i}: held, fallback"
        );
    }
}

/// Regression: 256 callers meeting a cold store each took a connection from the pool
/// (bb8 PINGs every checkout), queueing 128 checkouts on each of 2 connections; on a
/// loaded machine the last ones outlived `timeout_ms`, and three timeouts opened the
/// circuit for a second (503s for everyone with fail-closed). One checkout per shared
/// connection is enough. A generous timeout here: every request must be Redis's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_pool_is_filled_once_not_once_per_caller() {
    let _serial = SERIAL.lock().await;
    let Some(server) = RedisServer::private("a_cold_pool_is_filled_once_not_once_per_caller")
    else {
        return;
    };
    let mut conn = server.conn().await;
    let pings_before = command_calls(&mut conn, "ping").await;
    let closed = layer(
        server.url(),
        &fresh_prefix(),
        Policy::Closed,
        Duration::from_secs(5),
        2,
    );
    let (svc, _) = counting_service(closed.clone());
    let callers: Vec<_> = (0..256)
        .map(|i| {
            let svc = svc.clone();
            tokio::spawn(async move { svc.oneshot(request(&format!("cold-{i}"))).await })
        })
        .collect();
    for caller in callers {
        assert_eq!(caller.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    let pings = command_calls(&mut conn, "ping").await - pings_before;
    // One checkout (one PING) per shared connection, a few more if a checkout races.
    assert!(
        pings <= 4,
        "{pings} checkouts for 256 callers on a pool of 2"
    );
}
