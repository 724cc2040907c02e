//! Failure behaviour under load (ARCHITECTURE.md, behaviour contract item 11): the faults
//! of `tests/redis_fault_load.rs`, run longer, printing the "Failure behaviour" table of
//! BENCHMARKS.md.
//!
//! ```text
//! cargo run --release --example faults [-- SECONDS]
//! ```
//!
//! For each fault it starts a private `redis-server` on a free loopback port (never
//! 127.0.0.1:6379; `TOLLGATE_REDIS_SERVER` names another binary) and three instances of
//! one layer config sharing it, built from `[backend] kind = "redis"` with `timeout_ms =
//! 50` and `deny_cache = 0` (every request reaches Redis, so every fault meets every
//! caller): `fallback = "memory"`; `fallback = "none"` + `fail_mode = "open"`; `fallback =
//! "none"` + `fail_mode = "closed"`. Ten tasks per instance send requests (1 ms apart, 100
//! users each, `by_user = "10/m"`) for 2 s, then the fault lasts SECONDS (default 4), then
//! the load goes on until every instance decides through Redis again, plus 1 s. Every
//! load is bounded in time and count; the server is killed at the end of each fault.
//!
//! Columns: requests served; 2xx (of which "unchecked": forwarded without a decision,
//! fail-open); 429; 5xx (503: fail-closed); errors (the service returned an error: must be
//! 0); latency of every request; recovery: from the fault's end to the instance's first
//! decision from Redis (memory fallback: a fresh user's counter appears in Redis; no
//! fallback: a response decided by Redis, i.e. with rate headers or a 429).

#[cfg(feature = "redis")]
mod faults {
    use std::convert::Infallible;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use http::{Request, Response, StatusCode};
    use redis::aio::MultiplexedConnection;
    use tokio::task::JoinHandle;
    use tollgate::{
        Algorithm, Identity, Key, Rate, RateLimitConfig, RateLimitLayer, RuleKind, Subject,
    };
    use tower::{service_fn, ServiceBuilder, ServiceExt};

    const LIMIT: u32 = 10;
    const TIMEOUT_MS: u64 = 50;
    const TASKS: usize = 10;
    const USERS_PER_TASK: usize = 100;
    const WARM_UP: Duration = Duration::from_secs(2);
    const AFTER: Duration = Duration::from_secs(1);
    /// No load runs longer than this, and no task sends more than `MAX_PER_TASK`.
    const LOAD_CAP: Duration = Duration::from_secs(30);
    const MAX_PER_TASK: usize = 200_000;
    const RECOVERY_CAP: Duration = Duration::from_secs(10);

    // ---------------------------------------------------------------- redis-server

    /// A private redis-server: a child of this process on a free loopback port.
    struct Server {
        port: u16,
        child: Option<Child>,
    }

    fn free_port() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
        let port = listener.local_addr().unwrap().port();
        assert_ne!(port, 6379, "never the shared Redis");
        port
    }

    fn pings(port: u16) -> bool {
        let Ok(mut s) =
            TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
        else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    impl Server {
        fn start() -> Server {
            let mut server = Server {
                port: free_port(),
                child: None,
            };
            server.spawn();
            server
        }

        fn spawn(&mut self) {
            let bin =
                std::env::var("TOLLGATE_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let mut child = Command::new(&bin)
                    .current_dir(std::env::temp_dir())
                    .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
                    .args(["--save", "", "--appendonly", "no"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap_or_else(|e| panic!("{bin} could not be started: {e}"));
                while Instant::now() < deadline {
                    if pings(self.port) {
                        self.child = Some(child);
                        return;
                    }
                    if matches!(child.try_wait(), Ok(Some(_))) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                let _ = child.kill();
                let _ = child.wait();
                assert!(Instant::now() < deadline, "redis-server did not start");
                std::thread::sleep(Duration::from_millis(100));
            }
        }

        fn url(&self) -> String {
            format!("redis://127.0.0.1:{}/0", self.port)
        }

        /// SIGKILL, and wait for it to go.
        fn kill(&mut self) {
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }

        fn restart(&mut self) {
            self.kill();
            self.spawn();
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.kill();
        }
    }

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

    // ---------------------------------------------------------------- instances

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Policy {
        Fallback,
        Open,
        Closed,
    }

    impl Policy {
        fn label(self) -> &'static str {
            match self {
                Policy::Fallback => "memory fallback",
                Policy::Open => "none, fail open",
                Policy::Closed => "none, fail closed",
            }
        }
    }

    struct Gateway {
        url: String,
        prefix: String,
        instances: Vec<(Policy, RateLimitLayer)>,
    }

    impl Gateway {
        fn new(url: String, pool: u32) -> Gateway {
            let prefix = format!("faults{}", std::process::id());
            let instances = [Policy::Fallback, Policy::Open, Policy::Closed]
                .into_iter()
                .map(|policy| {
                    let (fallback, fail_mode) = match policy {
                        Policy::Fallback => ("memory", "open"),
                        Policy::Open => ("none", "open"),
                        Policy::Closed => ("none", "closed"),
                    };
                    let toml = format!(
                        "by_user = \"{LIMIT}/m\"\nfail_mode = \"{fail_mode}\"\n[backend]\n\
                         kind = \"redis\"\nurl = \"{url}\"\nkey_prefix = \"{prefix}\"\n\
                         timeout_ms = {TIMEOUT_MS}\npool_size = {pool}\nfallback = \"{fallback}\"\n\
                         deny_cache = 0"
                    );
                    let cfg = RateLimitConfig::from_toml_str(&toml).expect("a valid config");
                    (policy, RateLimitLayer::new(cfg))
                })
                .collect();
            Gateway {
                url,
                prefix,
                instances,
            }
        }

        fn key(&self, user: &str) -> String {
            Key::new(
                RuleKind::User,
                Subject::Named(user.as_bytes()),
                Rate::per_minute(LIMIT),
                Algorithm::FixedWindow,
            )
            .encode(&self.prefix)
        }
    }

    fn request(user: &str) -> Request<String> {
        let mut req = Request::new(String::new());
        req.extensions_mut().insert(Identity::user(user));
        req
    }

    async fn send(
        layer: &RateLimitLayer,
        user: &str,
    ) -> Result<Response<tollgate::ResponseBody<String>>, Infallible> {
        ServiceBuilder::new()
            .layer(layer.clone())
            .service(service_fn(|_req: Request<String>| async {
                Ok::<_, Infallible>(Response::new(String::from("ok")))
            }))
            .oneshot(request(user))
            .await
    }

    // ---------------------------------------------------------------- load

    #[derive(Default)]
    struct Tally {
        ok: usize,
        unchecked: usize,
        limited: usize,
        server_errors: usize,
        errors: usize,
        latencies: Vec<Duration>,
    }

    impl Tally {
        fn merge(&mut self, other: Tally) {
            self.ok += other.ok;
            self.unchecked += other.unchecked;
            self.limited += other.limited;
            self.server_errors += other.server_errors;
            self.errors += other.errors;
            self.latencies.extend(other.latencies);
        }

        fn ms(&self, p: f64) -> f64 {
            let i = ((self.latencies.len() as f64 * p).ceil() as usize).saturating_sub(1);
            self.latencies
                .get(i)
                .map_or(0.0, |d| d.as_secs_f64() * 1_000.0)
        }
    }

    struct Shape {
        tasks: usize,
        max_per_task: usize,
        pace: Duration,
        victim: Option<&'static str>,
    }

    struct Run {
        stop: Arc<AtomicBool>,
        handles: Vec<(Policy, Vec<JoinHandle<Tally>>)>,
    }

    impl Run {
        fn start(gw: &Gateway, shape: &Shape, tag: &'static str) -> Run {
            let stop = Arc::new(AtomicBool::new(false));
            let started = Instant::now();
            let handles = gw
                .instances
                .iter()
                .map(|(policy, layer)| {
                    let tasks = (0..shape.tasks)
                        .map(|t| {
                            let (layer, stop, policy) = (layer.clone(), stop.clone(), *policy);
                            let (max, pace, victim) =
                                (shape.max_per_task, shape.pace, shape.victim);
                            tokio::spawn(async move {
                                let mut tally = Tally::default();
                                let svc = ServiceBuilder::new().layer(layer).service(service_fn(
                                    |_req: Request<String>| async {
                                        Ok::<_, Infallible>(Response::new(String::from("ok")))
                                    },
                                ));
                                for i in 0..max {
                                    if stop.load(Ordering::Relaxed) || started.elapsed() > LOAD_CAP
                                    {
                                        break;
                                    }
                                    let user = match victim {
                                        Some(v) if i % 4 == 0 => v.to_owned(),
                                        _ => format!("{tag}-{policy:?}-{t}-{}", i % USERS_PER_TASK),
                                    };
                                    let sent = Instant::now();
                                    let resp = svc.clone().oneshot(request(&user)).await;
                                    tally.latencies.push(sent.elapsed());
                                    match resp {
                                        Ok(resp) if resp.status() == StatusCode::OK => {
                                            tally.ok += 1;
                                            if resp.headers().get("x-ratelimit-limit").is_none() {
                                                tally.unchecked += 1;
                                            }
                                        }
                                        Ok(resp)
                                            if resp.status() == StatusCode::TOO_MANY_REQUESTS =>
                                        {
                                            tally.limited += 1
                                        }
                                        Ok(resp) if resp.status().is_server_error() => {
                                            tally.server_errors += 1
                                        }
                                        _ => tally.errors += 1,
                                    }
                                    tokio::time::sleep(pace).await;
                                }
                                tally
                            })
                        })
                        .collect();
                    (*policy, tasks)
                })
                .collect();
            Run { stop, handles }
        }

        async fn join(self, stop: bool) -> Vec<(Policy, Tally)> {
            if stop {
                self.stop.store(true, Ordering::Relaxed);
            }
            let mut out = Vec::new();
            for (policy, tasks) in self.handles {
                let mut all = Tally::default();
                for task in tasks {
                    match task.await {
                        Ok(t) => all.merge(t),
                        // A panic inside a request: counted, never hidden.
                        Err(_) => all.errors += 1,
                    }
                }
                out.push((policy, all));
            }
            out
        }
    }

    // ---------------------------------------------------------------- recovery

    /// Whether `policy`'s instance decided `user`'s request through Redis.
    async fn decided_by_redis(
        gw: &Gateway,
        policy: Policy,
        layer: &RateLimitLayer,
        user: &str,
    ) -> bool {
        let Ok(resp) = send(layer, user).await;
        match policy {
            Policy::Fallback => admin_cmd::<bool>(&gw.url, redis::cmd("EXISTS").arg(gw.key(user)))
                .await
                .unwrap_or(false),
            Policy::Open => {
                resp.status() == StatusCode::TOO_MANY_REQUESTS
                    || resp.headers().get("x-ratelimit-limit").is_some()
            }
            Policy::Closed => resp.status() != StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Per instance (probed concurrently): time from `end` to its first decision from
    /// Redis, probing every 10 ms with `probe(policy, n)`'s user.
    async fn recovery(
        gw: &Arc<Gateway>,
        end: Instant,
        probe: Arc<dyn Fn(Policy, usize) -> String + Send + Sync>,
    ) -> Vec<Option<Duration>> {
        let probes: Vec<JoinHandle<Option<Duration>>> = (0..gw.instances.len())
            .map(|i| {
                let (gw, probe) = (gw.clone(), probe.clone());
                tokio::spawn(async move {
                    let (policy, layer) = &gw.instances[i];
                    for n in 0.. {
                        if decided_by_redis(&gw, *policy, layer, &probe(*policy, n)).await {
                            return Some(end.elapsed());
                        }
                        if end.elapsed() > RECOVERY_CAP {
                            return None;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    None
                })
            })
            .collect();
        let mut out = Vec::new();
        for p in probes {
            out.push(p.await.ok().flatten());
        }
        out
    }

    // ---------------------------------------------------------------- faults

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Fault {
        None,
        Kill,
        Restart,
        Pause,
        ScriptFlush,
        Oom,
        WrongType,
        Pool,
        Failover,
    }

    impl Fault {
        fn label(self, secs: u64) -> String {
            match self {
                Fault::None => "none (baseline)".into(),
                Fault::Kill => format!("killed, down {secs} s"),
                Fault::Restart => "restarted (bounce)".into(),
                Fault::Pause => format!("CLIENT PAUSE {} ALL", secs * 1_000),
                Fault::ScriptFlush => format!("SCRIPT FLUSH every 50 ms for {secs} s"),
                Fault::Oom => format!("maxmemory full (noeviction) {secs} s"),
                Fault::WrongType => format!("WRONGTYPE on one user's key {secs} s"),
                Fault::Pool => "pool_size 2, +256 callers per instance".into(),
                Fault::Failover => format!("failover: demoted (REPLICAOF) {secs} s, promoted"),
            }
        }
    }

    struct Row {
        fault: String,
        policy: Policy,
        tally: Tally,
        recovery: Option<Duration>,
        recovered: bool,
    }

    async fn fill_memory(conn: &mut MultiplexedConnection, written: &mut usize) {
        let junk = vec![b'x'; 16 * 1024];
        for _ in 0..100_000 {
            let small: redis::RedisResult<()> = redis::cmd("HSET")
                .arg(format!("oom-probe:{written}"))
                .arg("t")
                .arg(1)
                .query_async(conn)
                .await;
            if matches!(&small, Err(e) if e.code() == Some("OOM")) {
                return;
            }
            let _: redis::RedisResult<()> = redis::cmd("SET")
                .arg(format!("junk:{written}"))
                .arg(&junk)
                .query_async(conn)
                .await;
            *written += 1;
        }
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
            .unwrap_or(0)
    }

    async fn config_set(
        conn: &mut MultiplexedConnection,
        name: &str,
        value: impl redis::ToRedisArgs,
    ) {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query_async(conn)
            .await
            .expect("CONFIG SET");
    }

    async fn run(fault: Fault, secs: u64) -> Vec<Row> {
        let mut server = Server::start();
        let gw = Arc::new(Gateway::new(
            server.url(),
            if fault == Fault::Pool { 2 } else { 16 },
        ));
        let hold = Duration::from_secs(secs);
        let victim = "victim";
        if fault != Fault::Pool {
            // Connect every instance before the clock starts.
            for (_, layer) in &gw.instances {
                for i in 0..8 {
                    let _ = send(layer, &format!("warm-{i}")).await;
                }
            }
        }
        let steady = Shape {
            tasks: TASKS,
            max_per_task: MAX_PER_TASK,
            pace: Duration::from_millis(1),
            victim: (fault == Fault::WrongType).then_some(victim),
        };
        let load = Run::start(&gw, &steady, "steady");
        let mut extra = None;
        if fault != Fault::Pool {
            tokio::time::sleep(WARM_UP).await;
        }
        let end = match fault {
            Fault::None => Instant::now(),
            Fault::Kill => {
                tokio::task::block_in_place(|| server.kill());
                tokio::time::sleep(hold).await;
                tokio::task::block_in_place(|| server.restart());
                Instant::now()
            }
            Fault::Restart => {
                tokio::task::block_in_place(|| server.restart());
                Instant::now()
            }
            Fault::Pause => {
                let ms = hold.as_millis() as u64;
                let started = Instant::now();
                let _: Option<()> = admin_cmd(
                    &gw.url,
                    redis::cmd("CLIENT").arg("PAUSE").arg(ms).arg("ALL"),
                )
                .await;
                let end = started + hold;
                tokio::time::sleep_until(end.into()).await;
                end
            }
            Fault::ScriptFlush => {
                let until = Instant::now() + hold;
                while Instant::now() < until {
                    let _: Option<()> = admin_cmd(&gw.url, redis::cmd("SCRIPT").arg("FLUSH")).await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Instant::now()
            }
            Fault::Oom => {
                let mut conn = admin(&gw.url).await.expect("admin connection");
                config_set(&mut conn, "maxmemory-policy", "noeviction").await;
                let used = used_memory(&mut conn).await;
                config_set(&mut conn, "maxmemory", used + 1024 * 1024).await;
                let mut junk = 0;
                let until = Instant::now() + hold;
                fill_memory(&mut conn, &mut junk).await;
                // Below what Redis holds: shrinking client buffers cannot make room.
                let used = used_memory(&mut conn).await;
                config_set(
                    &mut conn,
                    "maxmemory",
                    used.saturating_sub(512 * 1024).max(1),
                )
                .await;
                tokio::time::sleep_until(until.into()).await;
                config_set(&mut conn, "maxmemory", 0).await;
                Instant::now()
            }
            Fault::WrongType => {
                let mut conn = admin(&gw.url).await.expect("admin connection");
                let key = gw.key(victim);
                let _: (u64, u64) = redis::pipe()
                    .atomic()
                    .del(&key)
                    .lpush(&key, "junk")
                    .query_async(&mut conn)
                    .await
                    .expect("MULTI DEL LPUSH EXEC");
                tokio::time::sleep(hold).await;
                let _: u64 = redis::cmd("DEL")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                Instant::now()
            }
            Fault::Failover => {
                // The primary becomes a replica of another server (its scripts answer
                // READONLY), then is promoted again behind the same address.
                let other = Server::start();
                let replicaof = |args: &[&str]| {
                    let mut cmd = redis::cmd("REPLICAOF");
                    for a in args {
                        cmd.arg(*a);
                    }
                    cmd
                };
                let port = other.port.to_string();
                let _: Option<()> = admin_cmd(&gw.url, &replicaof(&["127.0.0.1", &port])).await;
                tokio::time::sleep(hold).await;
                let _: Option<()> = admin_cmd(&gw.url, &replicaof(&["NO", "ONE"])).await;
                Instant::now()
            }
            Fault::Pool => {
                let burst = Shape {
                    tasks: 256,
                    max_per_task: (hold.as_millis() / 50) as usize,
                    pace: Duration::from_millis(50),
                    victim: None,
                };
                extra = Some(Run::start(&gw, &burst, "burst").join(false).await);
                Instant::now()
            }
        };
        // Each instance probes its own fresh users (the victim's key, for WRONGTYPE).
        let probe: Arc<dyn Fn(Policy, usize) -> String + Send + Sync> = if fault == Fault::WrongType
        {
            Arc::new(move |_, _| victim.to_owned())
        } else {
            Arc::new(|policy, n| format!("probe-{policy:?}-{n}"))
        };
        let recoveries = recovery(&gw, end, probe).await;
        tokio::time::sleep(AFTER).await;
        let mut tallies = load.join(true).await;
        if let Some(extra) = extra {
            for (policy, t) in extra {
                tallies
                    .iter_mut()
                    .find(|(p, _)| *p == policy)
                    .unwrap()
                    .1
                    .merge(t);
            }
        }
        server.kill();
        tallies
            .into_iter()
            .zip(recoveries)
            .map(|((policy, mut tally), recovery)| {
                tally.latencies.sort_unstable();
                Row {
                    fault: fault.label(secs),
                    policy,
                    tally,
                    recovered: recovery.is_some(),
                    recovery,
                }
            })
            .collect()
    }

    pub(crate) fn main() {
        let secs: u64 = std::env::args()
            .nth(1)
            .map_or(4, |a| a.parse().expect("SECONDS: a whole number"))
            .clamp(1, 10);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        let faults = [
            Fault::None,
            Fault::Kill,
            Fault::Restart,
            Fault::Pause,
            Fault::ScriptFlush,
            Fault::Oom,
            Fault::WrongType,
            Fault::Pool,
            Fault::Failover,
        ];
        let mut rows = Vec::new();
        for fault in faults {
            eprintln!("running: {}", fault.label(secs));
            rows.extend(rt.block_on(run(fault, secs)));
        }
        let redis_version = Command::new(
            std::env::var("TOLLGATE_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into()),
        )
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
        println!(
            "`cargo run --release --example faults{}` — {} cores, {redis_version}; \
             timeout_ms = {TIMEOUT_MS}, {TASKS} tasks per instance (1 ms apart), by_user = \"{LIMIT}/m\"\n",
            if secs == 4 { String::new() } else { format!(" -- {secs}") },
            std::thread::available_parallelism().map_or(0, |n| n.get()),
        );
        println!(
            "| fault | instance (fallback, fail_mode) | served | 2xx (unchecked) | 429 | 5xx | errors | p50 ms | p99 ms | max ms | recovered after |"
        );
        println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let mut failed = false;
        for row in &rows {
            let t = &row.tally;
            let recovery = match (row.fault.starts_with("none"), row.recovery) {
                (true, _) => "–".to_owned(),
                (false, Some(d)) => format!("{} ms", d.as_millis()),
                (false, None) => format!("> {} s", RECOVERY_CAP.as_secs()),
            };
            println!(
                "| {} | {} | {} | {} ({}) | {} | {} | {} | {:.2} | {:.2} | {:.1} | {} |",
                row.fault,
                row.policy.label(),
                t.latencies.len(),
                t.ok,
                t.unchecked,
                t.limited,
                t.server_errors,
                t.errors,
                t.ms(0.50),
                t.ms(0.99),
                t.ms(1.0),
                recovery
            );
            failed |= t.errors > 0 || !row.recovered;
            failed |= row.policy != Policy::Closed && t.server_errors > 0;
        }
        if failed {
            eprintln!("FAILED: an error, a 5xx without fail-closed, or no recovery (see table)");
            std::process::exit(1);
        }
    }
}

fn main() {
    #[cfg(feature = "redis")]
    faults::main();
    #[cfg(not(feature = "redis"))]
    eprintln!("examples/faults needs tollgate's `redis` feature (on by default)");
}
