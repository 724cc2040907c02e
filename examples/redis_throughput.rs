//! Redis throughput with and without coalescing, and Redis memory per key: the Redis
//! tables in BENCHMARKS.md.
//!
//! ```text
//! taskset -c 1 cargo run --release --example redis_throughput [-- SECONDS [ROUNDS]]
//! ```
//!
//! Starts a private `redis-server` on a free loopback port, pinned to core 0 with `taskset`
//! when it is installed (run the example itself on core 1, as above), and never touches
//! 127.0.0.1:6379. For each concurrency (1, 64, 512 callers) and mode (coalescing off:
//! `max_batch(1)`; on: the default), interleaved, ROUNDS rounds (default 3, at most 15; more
//! steady the medians on a noisy machine) of SECONDS (default 2): each
//! caller checks one request after another through `RedisStore`, on Redis's clock, never
//! refused: with one rule, a user's fixed-window key (1 000 users); with three rules, also
//! its tenant's (10 tenants) and a tool's (3 tools). Reported: checks/s, p50 and p99
//! latency, EVALSHA calls and their time per check (from `INFO commandstats`), and all of
//! Redis's CPU time per check (`INFO cpu`: network reads and writes too), medians of the
//! rounds.
//!
//! Then memory per key at 1 000 000 keys, from `INFO memory` and `MEMORY USAGE`: a key as
//! the previous release wrote it (a hash of `t`, `c`, `p` with `PEXPIRE`), as text
//! (`SET key "t:c:p" PX ttl`, an earlier form of this release) and as now (`SET key
//! <16-byte state> PX ttl`), each filled by a server-side script with realistic names
//! (`rl:fw:u:60:{=user-0000001}`).
//!
//! With `CSV=PATH` in the environment, the throughput table's rows are also written to
//! PATH as comma-separated values (`benchmarks/redis-throughput.csv` is one such file, read
//! by `scripts/charts.py`); what is measured does not change.
//!
//! Every load is bounded in time and count; the server is killed at the end.

#[cfg(feature = "redis")]
mod run {
    use std::net::TcpListener;
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use redis::aio::MultiplexedConnection;
    use tollgate::{
        Algorithm, Key, Rate, RedisStore, RuleKind, Store, StoreFuture, StoreRequest, Subject,
    };

    const USERS: usize = 1_000;
    const TENANTS: [&[u8]; 10] = [
        b"t0", b"t1", b"t2", b"t3", b"t4", b"t5", b"t6", b"t7", b"t8", b"t9",
    ];
    const TOOLS: [&[u8]; 3] = [b"search", b"fetch", b"echo"];
    const MAX_CHECKS_PER_CALLER: usize = 2_000_000;
    const MEMORY_KEYS: u64 = 1_000_000;

    struct Server(Child);

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn start_server() -> (Server, String) {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        assert_ne!(port, 6379, "never the shared Redis");
        let args = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ];
        let pinned = Command::new("taskset").arg("--version").output().is_ok();
        let mut cmd = if pinned {
            let mut c = Command::new("taskset");
            c.args(["-c", "0", "redis-server"]);
            c
        } else {
            Command::new("redis-server")
        };
        let child = cmd
            .current_dir(std::env::temp_dir())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        eprintln!(
            "redis-server on port {port}{}",
            if pinned { ", pinned to core 0" } else { "" }
        );
        (Server(child), format!("redis://127.0.0.1:{port}/0"))
    }

    async fn connect(url: &str) -> MultiplexedConnection {
        let client = redis::Client::open(url).expect("url");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            // No response timeout: filling a million keys takes a while per call.
            let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
            if let Ok(conn) = client
                .get_multiplexed_async_connection_with_config(&config)
                .await
            {
                return conn;
            }
            assert!(Instant::now() < deadline, "redis-server did not answer");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// EVALSHA calls so far, and the µs Redis spent in them.
    async fn evalsha_calls(conn: &mut MultiplexedConnection) -> (u64, u64) {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(conn)
            .await
            .expect("INFO");
        let Some(stats) = info
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_evalsha:"))
        else {
            return (0, 0);
        };
        let field = |name: &str| -> u64 {
            stats
                .split(',')
                .find_map(|kv| kv.strip_prefix(name))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        (field("calls="), field("usec="))
    }

    /// CPU seconds Redis has used so far (user and system), from `INFO cpu`: everything
    /// it does, its network reads and writes included, where commandstats time only the
    /// commands.
    async fn redis_cpu(conn: &mut MultiplexedConnection) -> f64 {
        let info: String = redis::cmd("INFO")
            .arg("cpu")
            .query_async(conn)
            .await
            .expect("INFO");
        ["used_cpu_user:", "used_cpu_sys:"]
            .iter()
            .filter_map(|name| info.lines().find_map(|l| l.strip_prefix(name)))
            .filter_map(|n| n.trim().parse::<f64>().ok())
            .sum()
    }

    struct Round {
        per_sec: f64,
        p50_us: f64,
        p99_us: f64,
        scripts_per_check: f64,
        redis_us_per_check: f64,
        redis_cpu_us_per_check: f64,
    }

    /// `callers` callers checking for `secs`; each check carries `rules` keys: a user's
    /// (1 000 users), and with three rules also its tenant's (10 tenants) and a tool's (3
    /// tools), as a gateway with by_user, by_tenant and by_tool does.
    async fn round(
        store: &RedisStore,
        conn: &mut MultiplexedConnection,
        callers: usize,
        rules: usize,
        secs: f64,
    ) -> Round {
        let ids: Arc<Vec<String>> = Arc::new((0..USERS).map(|i| format!("user-{i:06}")).collect());
        let rate = Rate::per_second(1_000_000_000);
        let stop = Arc::new(AtomicBool::new(false));
        let before = evalsha_calls(conn).await;
        let cpu_before = redis_cpu(conn).await;
        let began = Instant::now();
        let tasks: Vec<_> = (0..callers)
            .map(|c| {
                let (store, ids, stop) = (store.clone(), ids.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    for n in 0..MAX_CHECKS_PER_CALLER {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let u = (c * 7919 + n) % USERS;
                        let key = |kind, id: &'static [u8]| {
                            Key::new(kind, Subject::Named(id), rate, Algorithm::FixedWindow)
                        };
                        let keys = [
                            Key::new(
                                RuleKind::User,
                                Subject::Named(ids[u].as_bytes()),
                                rate,
                                Algorithm::FixedWindow,
                            ),
                            key(RuleKind::Tenant, TENANTS[u % TENANTS.len()]),
                            key(RuleKind::Tool, TOOLS[u % TOOLS.len()]),
                        ];
                        let started = Instant::now();
                        let request = StoreRequest::new(&keys[..rules], 0);
                        let outcomes = match store.check(&request) {
                            StoreFuture::Ready(r) => r,
                            StoreFuture::Pending(f) => f.await,
                        }
                        .expect("redis answered");
                        assert!(outcomes.iter().all(|o| o.is_allowed()));
                        latencies.push(started.elapsed());
                    }
                    latencies
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        stop.store(true, Ordering::Relaxed);
        let mut latencies = Vec::new();
        for t in tasks {
            latencies.extend(t.await.expect("caller"));
        }
        let elapsed = began.elapsed().as_secs_f64();
        let after = evalsha_calls(conn).await;
        let cpu = redis_cpu(conn).await - cpu_before;
        let (scripts, usec) = (after.0 - before.0, after.1 - before.1);
        latencies.sort_unstable();
        let at =
            |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
        Round {
            per_sec: latencies.len() as f64 / elapsed,
            p50_us: at(0.50),
            p99_us: at(0.99),
            scripts_per_check: scripts as f64 / latencies.len() as f64,
            redis_us_per_check: usec as f64 / latencies.len() as f64,
            redis_cpu_us_per_check: cpu * 1e6 / latencies.len() as f64,
        }
    }

    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }

    /// Bytes per key at MEMORY_KEYS keys written by `fill` (a script run in chunks).
    async fn memory_per_key(conn: &mut MultiplexedConnection, fill: &str) -> (f64, u64) {
        let _: () = redis::cmd("FLUSHALL")
            .query_async(conn)
            .await
            .expect("FLUSHALL");
        let used = |info: String| -> u64 {
            info.lines()
                .find_map(|l| l.strip_prefix("used_memory:"))
                .and_then(|n| n.trim().parse().ok())
                .expect("used_memory")
        };
        let before = used(
            redis::cmd("INFO")
                .arg("memory")
                .query_async(conn)
                .await
                .unwrap(),
        );
        let script = redis::Script::new(fill);
        let chunk = 20_000u64;
        let mut from = 0;
        while from < MEMORY_KEYS {
            let _: () = script
                .arg(from)
                .arg((from + chunk).min(MEMORY_KEYS))
                .invoke_async(conn)
                .await
                .expect("fill");
            from += chunk;
        }
        let after = used(
            redis::cmd("INFO")
                .arg("memory")
                .query_async(conn)
                .await
                .unwrap(),
        );
        let sample: u64 = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg("rl:fw:u:60:{=user-0000001}")
            .query_async(conn)
            .await
            .expect("MEMORY USAGE");
        ((after - before) as f64 / MEMORY_KEYS as f64, sample)
    }

    pub(crate) fn main() {
        let secs: f64 = std::env::args()
            .nth(1)
            .map_or(2.0_f64, |a| a.parse::<f64>().expect("SECONDS: a number"))
            .clamp(0.5, 10.0);
        let rounds: usize = std::env::args()
            .nth(2)
            .map_or(3, |a| a.parse::<usize>().expect("ROUNDS: a whole number"))
            .clamp(1, 15);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let (_server, url) = start_server();
        rt.block_on(async {
            let mut conn = connect(&url).await;
            let command = format!(
                "taskset -c 1 cargo run --release --example redis_throughput{}",
                if secs == 2.0 && rounds == 3 { String::new() } else { format!(" -- {secs} {rounds}") }
            );
            println!(
                "`{command}` — redis-server on core 0, the store's runtime on core 1; medians of {rounds} interleaved rounds of {secs} s\n"
            );
            println!("| rules | callers | coalescing | checks/s | p50 µs | p99 µs | EVALSHA per check | script µs per check | Redis CPU µs per check | ratio on/off |");
            println!("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|");
            let mut csv = std::env::var_os("CSV").map(|_| {
                format!("# {command}\nrules,callers,coalescing,checks_per_s,p50_us,p99_us,evalsha_per_check,script_us_per_check,redis_cpu_us_per_check,ratio_on_off\n")
            });
            for (rules, callers) in [(1, 1), (1, 64), (1, 512), (3, 1), (3, 64), (3, 512)] {
                let mut rows: Vec<(&str, Vec<Round>)> = vec![("off (max_batch 1)", Vec::new()), ("on (max_batch 128)", Vec::new())];
                for r in 0..rounds {
                    for (i, max_batch) in [1, 128].into_iter().enumerate() {
                        let store = RedisStore::builder(url.as_str())
                            .key_prefix(format!("rl{r}{max_batch}"))
                            .timeout(Duration::from_secs(2))
                            .max_batch(max_batch)
                            .build()
                            .expect("url");
                        rows[i]
                            .1
                            .push(round(&store, &mut conn, callers, rules, secs).await);
                    }
                }
                let off = median(rows[0].1.iter().map(|r| r.per_sec).collect());
                for ((name, runs), short) in rows.iter().zip(["off", "on"]) {
                    let per_sec = median(runs.iter().map(|r| r.per_sec).collect());
                    let figures = format!(
                        "{:.0}|{:.0}|{:.0}|{:.3}|{:.2}|{:.2}|{:.2}",
                        per_sec,
                        median(runs.iter().map(|r| r.p50_us).collect()),
                        median(runs.iter().map(|r| r.p99_us).collect()),
                        median(runs.iter().map(|r| r.scripts_per_check).collect()),
                        median(runs.iter().map(|r| r.redis_us_per_check).collect()),
                        median(runs.iter().map(|r| r.redis_cpu_us_per_check).collect()),
                        per_sec / off,
                    );
                    println!("| {rules} | {callers} | {name} | {} |", figures.replace('|', " | "));
                    if let Some(csv) = &mut csv {
                        csv.push_str(&format!("{rules},{callers},{short},{}\n", figures.replace('|', ",")));
                    }
                }
            }
            if let (Some(csv), Some(path)) = (&csv, std::env::var_os("CSV")) {
                std::fs::write(&path, csv).expect("CSV: a writable path");
                eprintln!("wrote {}", std::path::Path::new(&path).display());
            }

            let now = "1764582000123456";
            let hash = format!(
                "for i = tonumber(ARGV[1]), tonumber(ARGV[2]) - 1 do \
                   local k = string.format('rl:fw:u:60:{{=user-%07d}}', i) \
                   redis.call('HSET', k, 't', '{now}', 'c', '1', 'p', '0') \
                   redis.call('PEXPIRE', k, 3600000) \
                 end"
            );
            let string = format!(
                "for i = tonumber(ARGV[1]), tonumber(ARGV[2]) - 1 do \
                   redis.call('SET', string.format('rl:fw:u:60:{{=user-%07d}}', i), '{now}:1:0', 'PX', 3600000) \
                 end"
            );
            let packed = format!(
                "for i = tonumber(ARGV[1]), tonumber(ARGV[2]) - 1 do \
                   redis.call('SET', string.format('rl:fw:u:60:{{=user-%07d}}', i), \
                     struct.pack('<I8I4I4', {now}, 1, 0), 'PX', 3600000) \
                 end"
            );
            println!("\n| key layout | bytes per key (INFO memory, 1 000 000 keys) | MEMORY USAGE of one key |");
            println!("|---|---:|---:|");
            for (name, fill) in [
                ("release 0.1: hash t/c/p + PEXPIRE", hash.as_str()),
                ("text: SET \"t:c:p\" PX", string.as_str()),
                ("now: SET <16-byte state> PX", packed.as_str()),
            ] {
                let (per_key, sample) = memory_per_key(&mut conn, fill).await;
                println!("| {name} | {per_key:.1} | {sample} |");
            }
            let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.expect("FLUSHALL");
        });
    }
}

fn main() {
    #[cfg(feature = "redis")]
    run::main();
    #[cfg(not(feature = "redis"))]
    eprintln!("examples/redis_throughput needs tollgate's `redis` feature (on by default)");
}
