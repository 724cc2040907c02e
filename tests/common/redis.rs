//! Redis for tests: a private `redis-server` on a free loopback port (so a test may kill,
//! restart or pause it), or the server at `TOLLGATE_REDIS_URL`. With neither, tests print
//! why and skip, unless `TOLLGATE_REQUIRE_REDIS=1`, which makes that a failure.
//!
//! The shared Redis on 127.0.0.1:6379 is never stopped: only a server this harness
//! started (its own child process) is ever killed.

use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use tollgate::{ManualClock, RateLimitConfig, RateLimitLayer, RedisStore};

use super::Backend;

/// A Redis server for one test.
pub struct RedisServer {
    url: String,
    port: u16,
    child: Option<Child>,
    private: bool,
}

fn required() -> bool {
    std::env::var("TOLLGATE_REQUIRE_REDIS").is_ok_and(|v| v == "1")
}

/// Prints why a test skips, or fails it when Redis is required. Generic over what the test
/// would have had, so every helper (a server, a cluster, a TLS server) skips alike.
pub(crate) fn unavailable<T>(test: &str, why: &str) -> Option<T> {
    unavailable_unless(test, why, "set TOLLGATE_REDIS_URL or install redis-server")
}

/// [`unavailable`], naming `fix` (what would have made the test run) in the skip message.
pub(crate) fn unavailable_unless<T>(test: &str, why: &str, fix: &str) -> Option<T> {
    if required() {
        panic!("{test}: Redis is required (TOLLGATE_REQUIRE_REDIS=1) but {why}");
    }
    eprintln!("SKIPPED {test}: {why} ({fix})");
    None
}

/// Every port [`free_port`] or [`free_port_with_bus`] has handed out in this test process.
static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());

/// A free loopback port that no other server of this test process has had: a killed
/// server's port must stay its own until it restarts, not go to a test running beside it.
pub(crate) fn free_port() -> Option<u16> {
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..20 {
        let listener = TcpListener::bind("127.0.0.1:0").ok()?;
        let port = listener.local_addr().ok()?.port();
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return Some(port);
        }
    }
    None
}

/// A free loopback port `P` (below 55535) whose cluster-bus port `P + 10000` is free too,
/// neither handed out before; both are handed out now, so no other server of this test
/// process takes the bus port of a cluster node.
pub(crate) fn free_port_with_bus() -> Option<u16> {
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..200 {
        let listener = TcpListener::bind("127.0.0.1:0").ok()?;
        let port = listener.local_addr().ok()?.port();
        if port >= 55535 || handed_out.contains(&port) || handed_out.contains(&(port + 10000)) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            handed_out.extend([port, port + 10000]);
            return Some(port);
        }
    }
    None
}

/// Whether a server answers a plain-TCP PING on `port`.
pub(crate) fn pings(port: u16) -> bool {
    let Ok(mut s) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// `redis-server` on loopback, persisting nothing, quiet, its files (a replica's synced
/// RDB) in `dir`, never the checkout: each helper adds its ports and mode.
pub(crate) fn server_command(dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(server_bin());
    cmd.current_dir(dir)
        .args([
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
        ])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

fn spawn(port: u16) -> std::io::Result<Child> {
    server_command(&std::env::temp_dir())
        .args(["--port", &port.to_string()])
        .spawn()
}

/// Waits until the server on `port` answers, or `child` exits, or 5 s pass.
pub(crate) fn wait_ready(child: &mut Child, port: u16) -> bool {
    wait_until(child, || pings(port))
}

/// Waits until `ready` says so, or `child` exits, or 5 s pass.
pub(crate) fn wait_until(child: &mut Child, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if ready() {
            return true;
        }
        if matches!(child.try_wait(), Ok(Some(_))) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Runs `cmd` to its end (stdin empty, output captured), killing it after `timeout`:
/// its output, or why there is none. A tool that hangs (a cluster that never agrees)
/// fails the helper instead of the whole test run.
pub(crate) fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{:?} could not be started: {e}", cmd.get_program()))?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => {
                return child
                    .wait_with_output()
                    .map_err(|e| format!("{:?}: {e}", cmd.get_program()))
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{:?} did not finish within {timeout:?}",
                    cmd.get_program()
                ));
            }
        }
    }
}

/// A new, empty directory under the system temp dir, named `kind-<unique>`.
pub(crate) fn fresh_dir(kind: &str) -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("{kind}-{}", fresh_prefix()));
    std::fs::create_dir(&dir)?;
    Ok(dir)
}

/// The `redis-server` binary: `TOLLGATE_REDIS_SERVER`, else the one on `PATH`.
pub(crate) fn server_bin() -> String {
    std::env::var("TOLLGATE_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into())
}

impl RedisServer {
    /// A private `redis-server` this test owns (kill, restart, pause, commandstats).
    pub fn private(test: &str) -> Option<RedisServer> {
        let mut last = String::from("no free port");
        for _ in 0..5 {
            let Some(port) = free_port() else { continue };
            let mut child = match spawn(port) {
                Ok(child) => child,
                Err(e) => {
                    return unavailable(test, &format!("redis-server could not be started: {e}"))
                }
            };
            if wait_ready(&mut child, port) {
                return Some(RedisServer {
                    url: format!("redis://127.0.0.1:{port}/0"),
                    port,
                    child: Some(child),
                    private: true,
                });
            }
            let _ = child.kill();
            let _ = child.wait();
            last = format!("redis-server did not answer on port {port}");
        }
        unavailable(test, &last)
    }

    /// `TOLLGATE_REDIS_URL` when set, else a private server.
    pub fn any(test: &str) -> Option<RedisServer> {
        match std::env::var("TOLLGATE_REDIS_URL") {
            Ok(url) if !url.trim().is_empty() => Some(RedisServer {
                url: url.trim().to_owned(),
                port: 0,
                child: None,
                private: false,
            }),
            _ => RedisServer::private(test),
        }
    }

    /// The server's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The server's port (0 for `TOLLGATE_REDIS_URL`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether this harness started the server (and so may kill it).
    pub fn is_private(&self) -> bool {
        self.private
    }

    /// Kills the server (SIGKILL) and waits for it to go.
    pub fn kill(&mut self) {
        assert!(self.private, "never kill a shared Redis");
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (empty: nothing was saved).
    pub fn restart(&mut self) {
        assert!(self.private, "never restart a shared Redis");
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut child = spawn(self.port).expect("redis-server starts again");
            if wait_ready(&mut child, self.port) {
                self.child = Some(child);
                return;
            }
            let _ = child.kill();
            let _ = child.wait();
            assert!(
                Instant::now() < deadline,
                "redis-server did not come back on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A connection for the test's own commands.
    pub async fn conn(&self) -> MultiplexedConnection {
        redis::Client::open(self.url.as_str())
            .expect("valid url")
            .get_multiplexed_async_connection()
            .await
            .expect("the test's Redis answers")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A key prefix no other test (or earlier run) uses.
pub fn fresh_prefix() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(N.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    format!("tgtest{:016x}", h.finish())
}

/// Redis as a [`Backend`]: each value has a fresh key prefix; decisions use the test's
/// [`ManualClock`] (caller time), so time travel works as with the memory store. Layers
/// made from one value share one [`RedisStore`].
pub struct RedisBackend {
    server: Arc<RedisServer>,
    prefix: String,
    store: Mutex<Option<RedisStore>>,
}

impl RedisBackend {
    /// A backend on `TOLLGATE_REDIS_URL` or a private server; `None` (after printing why)
    /// when neither is available, a panic instead when `TOLLGATE_REQUIRE_REDIS=1`.
    ///
    /// ```ignore
    /// let Some(redis) = common::redis::RedisBackend::start("my_test") else { return };
    /// ```
    pub fn start(test: &str) -> Option<RedisBackend> {
        RedisServer::any(test).map(|s| RedisBackend::on(Arc::new(s)))
    }

    /// A backend on `server`, with a fresh prefix.
    pub fn on(server: Arc<RedisServer>) -> RedisBackend {
        RedisBackend {
            server,
            prefix: fresh_prefix(),
            store: Mutex::new(None),
        }
    }

    /// The key prefix of this backend's store.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The server.
    pub fn server(&self) -> &RedisServer {
        &self.server
    }

    /// The store layers from this backend share.
    pub fn store(&self) -> RedisStore {
        let mut slot = self.store.lock().unwrap();
        slot.get_or_insert_with(|| caller_time_store(self.server.url(), &self.prefix))
            .clone()
    }
}

/// A store on `url` under `prefix`, deciding on the caller's clock, with a timeout
/// generous enough for a noisy 2-core machine (a timeout would fail open and show up as a
/// missing header, not pass silently). Every request goes to Redis: the deny cache (which
/// answers refused keys locally, and cannot know a refused request's other keys) has
/// tests of its own in tests/redis_deny_cache.rs.
pub fn caller_time_store(url: &str, prefix: &str) -> RedisStore {
    RedisStore::builder(url)
        .key_prefix(prefix)
        .caller_time(true)
        .timeout(Duration::from_secs(5))
        .deny_cache(0)
        .build()
        .expect("valid redis url")
}

impl Backend for RedisBackend {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn layer(&self, cfg: RateLimitConfig, clock: &ManualClock) -> RateLimitLayer {
        RateLimitLayer::with_store(cfg, self.store()).with_clock(clock.clone())
    }
}

/// Every key under `prefix` (SCAN).
pub async fn keys_under(conn: &mut MultiplexedConnection, prefix: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .expect("SCAN");
        keys.extend(batch);
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}

/// `calls` of one command in `INFO commandstats` (0 when absent).
pub async fn command_calls(conn: &mut MultiplexedConnection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .expect("INFO");
    let needle = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A key's state as the scripts store it: t (u64), c and p (u32), little-endian, 16
/// bytes; `None` for anything else.
pub fn state_of(state: &[u8]) -> Option<(u64, u32, u32)> {
    let state: &[u8; 16] = state.try_into().ok()?;
    let (t, rest) = state.split_at(8);
    let (c, p) = rest.split_at(4);
    Some((
        u64::from_le_bytes(t.try_into().ok()?),
        u32::from_le_bytes(c.try_into().ok()?),
        u32::from_le_bytes(p.try_into().ok()?),
    ))
}

/// A state as the scripts store it (see [`state_of`]).
pub fn packed_state(t: u64, c: u32, p: u32) -> Vec<u8> {
    [&t.to_le_bytes()[..], &c.to_le_bytes(), &p.to_le_bytes()].concat()
}

/// The count `c` of a key's state as the scripts store it.
pub fn count_of(state: &[u8]) -> Option<u64> {
    state_of(state).map(|(_, c, _)| u64::from(c))
}
