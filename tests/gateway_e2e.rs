//! The example gateway, tried as a new user would: the real binary (built if needed, see
//! `tests/common/example.rs`), started on a free loopback port, called over HTTP.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::example::{drain, example_binary, wait_bounded, Running, START_TIMEOUT};
use common::reply::Reply;

const IO_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// The example binaries, and a running gateway (killed on drop, also when an assertion
// fails).

fn gateway_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| example_binary("gateway"))
}

fn loadgen_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| example_binary("loadgen"))
}

struct Gateway(Running);

impl Gateway {
    fn start(extra: &[&str]) -> Gateway {
        let mut args = vec!["--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        Gateway(Running::start(gateway_binary(), "tollgate gateway", &args))
    }

    fn post(&self, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
        request(self.addr, "POST", path, headers, body)
    }

    fn get(&self, path: &str) -> Reply {
        request(self.addr, "GET", path, &[], "")
    }
}

impl std::ops::Deref for Gateway {
    type Target = Running;
    fn deref(&self) -> &Running {
        &self.0
    }
}

impl std::ops::DerefMut for Gateway {
    fn deref_mut(&mut self) -> &mut Running {
        &mut self.0
    }
}

// ---------------------------------------------------------------------------------------
// A plain HTTP/1.1 client over a TcpStream: one request per connection.

impl Reply {
    fn number(&self, name: &str) -> u64 {
        self.header(name)
            .unwrap_or_else(|| panic!("no {name} header in {self:?}"))
            .parse()
            .unwrap_or_else(|_| panic!("{name} is not a number in {self:?}"))
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: body {:?}", self.body))
    }
}

fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        head.push_str("content-type: application/json\r\n");
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).expect("write request");
    stream.write_all(body.as_bytes()).expect("write body");

    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read response");
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let reply = Reply::parse(&text);
    if let Some(len) = reply.header("content-length") {
        assert_eq!(
            len.parse::<usize>().ok(),
            Some(reply.body.len()),
            "{reply:?}"
        );
    }
    reply
}

fn now_epoch() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

// ---------------------------------------------------------------------------------------
// The tests.

/// The README promise: 31 calls as one user within a minute → 30 × 200 then a 429 with
/// the documented headers and problem+json body; health checks and other users carry on.
#[test]
fn thirty_calls_pass_then_the_31st_is_a_documented_429() {
    let gw = Gateway::start(&[]);
    let alice = [("x-user-id", "alice")];
    for i in 0..30u64 {
        let reply = gw.post("/tools/echo", &alice, r#"{"n":1}"#);
        assert_eq!(reply.status, 200, "call {} of 30: {reply:?}", i + 1);
        let body = reply.json();
        assert_eq!(body["tool"], "echo");
        assert_eq!(body["ok"], true);
        assert_eq!(
            body["echo"],
            serde_json::json!({"n": 1}),
            "echo sends the body back"
        );
        assert_eq!(reply.number("x-ratelimit-limit"), 30);
        assert_eq!(reply.number("x-ratelimit-remaining"), 29 - i);
        assert!(reply.header("retry-after").is_none(), "{reply:?}");
    }

    let before = now_epoch();
    let limited = gw.post("/tools/echo", &alice, r#"{"n":1}"#);
    assert_eq!(limited.status, 429, "{limited:?}");
    assert_eq!(limited.number("x-ratelimit-limit"), 30);
    assert_eq!(limited.number("x-ratelimit-remaining"), 0);
    let reset = limited.number("x-ratelimit-reset");
    assert!(
        reset > before && reset <= before + 61,
        "reset {reset} should be within the next minute of {before}"
    );
    let retry = limited.number("retry-after");
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert_eq!(
        limited.header("content-type"),
        Some("application/problem+json")
    );
    let problem = limited.json();
    assert_eq!(problem["status"], 429);
    assert_eq!(problem["code"], "RATE_LIMIT");
    assert_eq!(problem["title"], "Rate limit exceeded");
    assert_eq!(problem["violated"], serde_json::json!(["user"]));
    assert_eq!(problem["retry_after"], retry);
    assert!(
        !limited.body.contains("alice"),
        "the 429 names no user: {limited:?}"
    );

    let health = gw.get("/healthz");
    assert_eq!(health.status, 200, "{health:?}");
    assert!(health.header("x-ratelimit-limit").is_none(), "{health:?}");

    let bob = gw.post("/tools/echo", &[("x-user-id", "bob")], "{}");
    assert_eq!(bob.status, 200, "another user is unaffected: {bob:?}");
    assert_eq!(bob.number("x-ratelimit-remaining"), 29);

    let still = gw.post("/tools/echo", &alice, "{}");
    assert_eq!(still.status, 429, "alice stays limited: {still:?}");
}

/// `search = "10/m"` protects the tool: ten calls from ten different users use it up,
/// the eleventh caller (whoever, whatever the case of the name) gets 429 naming the tool.
#[test]
fn search_is_limited_at_ten_for_all_callers_together() {
    let gw = Gateway::start(&[]);
    for i in 0..10u64 {
        let user = format!("user-{i}");
        let reply = gw.post("/tools/search", &[("x-user-id", &user)], "{}");
        assert_eq!(reply.status, 200, "search call {}: {reply:?}", i + 1);
        assert_eq!(reply.json()["tool"], "search");
        assert_eq!(
            reply.number("x-ratelimit-limit"),
            10,
            "the tool rule speaks"
        );
        assert_eq!(reply.number("x-ratelimit-remaining"), 9 - i);
    }
    let limited = gw.post("/tools/Search", &[("x-user-id", "newcomer")], "{}");
    assert_eq!(limited.status, 429, "{limited:?}");
    assert_eq!(limited.number("x-ratelimit-limit"), 10);
    assert_eq!(limited.number("x-ratelimit-remaining"), 0);
    let problem = limited.json();
    assert_eq!(problem["violated"], serde_json::json!(["tool"]));
    assert_eq!(problem["detail"], "Rate limit exceeded for tool 'search'");

    // The tool limit is not a user limit: the same users still reach other tools.
    let echo = gw.post("/tools/echo", &[("x-user-id", "newcomer")], "{}");
    assert_eq!(echo.status, 200, "{echo:?}");
    assert_eq!(
        echo.number("x-ratelimit-remaining"),
        29,
        "the 429 cost newcomer nothing"
    );
}

/// `summarise` is priced at 10 units of alice's 30; `?used=N` settles a call at N, and
/// the difference comes back to (or out of) her budget before her next call.
#[test]
fn summarise_costs_its_price_and_used_settles_it() {
    let gw = Gateway::start(&[]);
    let alice = [("x-user-id", "alice")];
    let priced = gw.post("/tools/summarise", &alice, "{}");
    assert_eq!(priced.status, 200, "{priced:?}");
    assert_eq!(priced.number("x-ratelimit-remaining"), 20, "10 of 30 units");
    assert!(priced.json().get("charge").is_none(), "{priced:?}");

    let settled = gw.post("/tools/summarise?used=3", &alice, "{}");
    assert_eq!(settled.status, 200, "{settled:?}");
    assert_eq!(
        settled.number("x-ratelimit-remaining"),
        10,
        "charged 10 up front"
    );
    assert_eq!(
        settled.json()["charge"],
        serde_json::json!({"estimate": 10, "settled": 3})
    );
    // 30 - 10 - 3 = 17 left, then this echo's 1 unit.
    let echo = gw.post("/tools/echo", &alice, "{}");
    assert_eq!(echo.number("x-ratelimit-remaining"), 16, "{echo:?}");

    // Settling up: 12 used of an estimate of 10 leaves 16 - 10 - 2 = 4.
    let over = gw.post("/tools/summarise?used=12", &alice, "{}");
    assert_eq!(over.status, 200, "{over:?}");
    let echo = gw.post("/tools/echo", &alice, "{}");
    assert_eq!(echo.number("x-ratelimit-remaining"), 3, "{echo:?}");
    let refused = gw.post("/tools/summarise", &alice, "{}");
    assert_eq!(refused.status, 429, "10 units do not fit in 3: {refused:?}");
    let problem = refused.json();
    assert_eq!(problem["cost"], 10, "{problem}");
    assert_eq!(problem["remaining"], 3, "{problem}");

    let bad = gw.post("/tools/echo?used=lots", &[("x-user-id", "bob")], "{}");
    assert_eq!(bad.status, 400, "{bad:?}");
    assert_eq!(bad.json()["code"], "INVALID_USED", "{bad:?}");
    let twice = gw.post("/tools/echo?used=1&used=2", &[("x-user-id", "bob")], "{}");
    assert_eq!(twice.status, 400, "{twice:?}");
    // Refused before tollgate counted them; a percent-encoded number is a number.
    let counted = gw.post("/tools/echo?used=%31", &[("x-user-id", "bob")], "{}");
    assert_eq!(counted.number("x-ratelimit-remaining"), 29, "{counted:?}");
}

/// `--admin ADDR`: a second listener where `GET /limits` shows what each rule has left
/// (counting nothing) and `POST /limits/reset` clears it; the public listener has neither.
#[test]
fn the_admin_listener_peeks_and_resets() {
    let gw = Gateway::start(&["--admin", "127.0.0.1:0"]);
    let admin = gw.next_address("tollgate gateway admin");
    let alice = [("x-user-id", "alice")];
    for _ in 0..3 {
        assert_eq!(gw.post("/tools/search", &alice, "{}").status, 200);
    }
    let peek = || {
        let reply = request(admin, "GET", "/limits?user=alice&tool=search", &[], "");
        assert_eq!(reply.status, 200, "{reply:?}");
        reply.json()["rules"].clone()
    };
    for _ in 0..2 {
        let rules = peek();
        assert_eq!(rules[0]["rule"], "user", "{rules}");
        assert_eq!(rules[0]["limit"], 30);
        assert_eq!(rules[0]["rate"], "30/m");
        assert_eq!(rules[0]["remaining"], 27, "peeking counts nothing: {rules}");
        assert_eq!(rules[1]["rule"], "tool");
        assert_eq!(rules[1]["remaining"], 7);
        let reset_after = rules[0]["reset_after"].as_u64().unwrap();
        assert!((1..=60).contains(&reset_after), "{rules}");
    }
    let reset = request(
        admin,
        "POST",
        "/limits/reset?user=alice&tool=search",
        &[],
        "",
    );
    assert_eq!(reset.status, 204, "{reset:?}");
    let rules = peek();
    assert_eq!(
        (
            rules[0]["remaining"].as_u64(),
            rules[1]["remaining"].as_u64()
        ),
        (Some(30), Some(10))
    );
    // Percent-encoded ids are decoded; a bad query is a 400 naming no value.
    let odd = request(admin, "GET", "/limits?user=a%3Ab%7Bc&tenant=acme", &[], "");
    assert_eq!(odd.json()["rules"].as_array().unwrap().len(), 2, "{odd:?}");
    let bad = request(admin, "GET", "/limits?user=a&user=b", &[], "");
    assert_eq!(bad.status, 400, "{bad:?}");
    assert!(!bad.body.contains("user=a"), "{bad:?}");
    // The public listener has no admin routes.
    assert_eq!(gw.get("/limits?user=alice").status, 404);
}

/// The example builds `Identity` itself, so it must refuse what tollgate refuses when it
/// reads headers: a repeated or overlong identity is a 400 that echoes no value, and it
/// spends nobody's quota.
#[test]
fn ambiguous_identity_headers_are_refused_without_echoing_them() {
    let gw = Gateway::start(&[]);
    let twice = gw.post(
        "/tools/echo",
        &[("x-user-id", "mallory"), ("x-user-id", "victim")],
        "{}",
    );
    assert_eq!(twice.status, 400, "{twice:?}");
    assert_eq!(
        twice.header("content-type"),
        Some("application/problem+json")
    );
    assert_eq!(twice.json()["code"], "INVALID_IDENTITY");
    assert!(
        !twice.body.contains("mallory") && !twice.body.contains("victim"),
        "{twice:?}"
    );

    let tenant_twice = gw.post(
        "/tools/echo",
        &[
            ("x-user-id", "u"),
            ("x-tenant-id", "t1"),
            ("x-tenant-id", "t2"),
        ],
        "{}",
    );
    assert_eq!(tenant_twice.status, 400, "{tenant_twice:?}");

    let long = "v".repeat(tollgate::MAX_IDENTITY_LEN + 1);
    let overlong = gw.post("/tools/echo", &[("x-user-id", &long)], "{}");
    assert_eq!(overlong.status, 400, "{overlong:?}");
    assert!(!overlong.body.contains(&long[..32]), "{overlong:?}");

    let exact = "v".repeat(tollgate::MAX_IDENTITY_LEN);
    let fits = gw.post("/tools/echo", &[("x-user-id", &exact)], "{}");
    assert_eq!(fits.status, 200, "{fits:?}");

    let victim = gw.post("/tools/echo", &[("x-user-id", "victim")], "{}");
    assert_eq!(victim.status, 200, "{victim:?}");
    assert_eq!(
        victim.number("x-ratelimit-remaining"),
        29,
        "the refused request spent none of victim's quota"
    );
}

/// Start-up refuses an invalid config: non-zero exit, every problem on its own line
/// naming its field, and no listening line.
#[test]
fn invalid_config_exits_non_zero_listing_every_problem() {
    let dir = std::env::temp_dir().join(format!("tollgate-gateway-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("three-mistakes.toml");
    std::fs::write(
        &path,
        "by_user = \"abc/m\"\nalgorithm = \"leaky\"\n[by_tool]\nsearch = \"0/m\"\n",
    )
    .unwrap();

    let mut child = Command::new(gateway_binary())
        .args(["--listen", "127.0.0.1:0", "--config"])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the gateway");
    let stdout = drain(child.stdout.take().unwrap());
    let stderr = drain(child.stderr.take().unwrap());
    let status = wait_bounded(&mut child, START_TIMEOUT);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
    let status = status.expect("the gateway should exit on an invalid config");
    // The pipes close at exit; give the reader threads a moment to finish.
    let deadline = Instant::now() + IO_TIMEOUT;
    while Instant::now() < deadline && !stderr.lock().unwrap().contains("algorithm") {
        thread::sleep(Duration::from_millis(10));
    }
    let stderr = stderr.lock().unwrap().clone();
    assert!(!status.success(), "exit status {status}; stderr:\n{stderr}");
    assert!(
        !stdout.lock().unwrap().contains("listening"),
        "it must not start"
    );
    let problems: Vec<&str> = stderr
        .lines()
        .filter(|l| {
            l.starts_with("by_user:")
                || l.starts_with("algorithm:")
                || l.starts_with("by_tool[\"search\"]:")
        })
        .collect();
    assert_eq!(problems.len(), 3, "one line per problem, got:\n{stderr}");
    assert!(stderr.contains("abc/m") && stderr.contains("leaky") && stderr.contains("0/m"));
}

/// The shipped example configs start the gateway as their comments say. The Redis one
/// must start without a reachable Redis (it connects lazily); only `/healthz` is called,
/// so the test never writes to a Redis that may be running on this machine.
#[test]
fn shipped_example_configs_start() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let memory = root.join("examples/gateway.toml");
    let gw = Gateway::start(&["--config", memory.to_str().unwrap()]);
    assert_eq!(gw.get("/healthz").status, 200);
    let call = gw.post("/tools/search", &[("x-user-id", "a")], "{}");
    assert_eq!(call.status, 200, "{call:?}");
    assert_eq!(call.number("x-ratelimit-limit"), 10);
    drop(gw);

    for shipped in [
        "examples/gateway-policy.toml",
        "examples/gateway-redis.toml",
        "examples/gateway-redis-tls.toml",
        "examples/gateway-redis-cluster.toml",
    ] {
        let path = root.join(shipped);
        let gw = Gateway::start(&["--config", path.to_str().unwrap()]);
        assert_eq!(gw.get("/healthz").status, 200, "{shipped}");
    }
}

/// Ctrl-C / SIGTERM end the server gracefully with a zero exit status.
#[cfg(unix)]
#[test]
fn sigterm_shuts_the_gateway_down_cleanly() {
    let mut gw = Gateway::start(&[]);
    assert_eq!(gw.get("/healthz").status, 200);
    let status = gw.terminate();
    assert!(status.success(), "exit status after SIGTERM: {status}");
}

/// `kill -HUP` reloads `--config`: a good file applies from the next request with the
/// counts kept; a bad file, or one changing `[backend]`, is logged field by field and
/// changes nothing.
#[cfg(unix)]
#[test]
fn sighup_applies_a_new_config_and_a_bad_one_changes_nothing() {
    let file = TempFile::new("reload.toml", "by_user = \"2/m\"\n");
    let gw = Gateway::start(&["--config", file.path()]);
    let call = |user: &str| gw.post("/tools/echo", &[("x-user-id", user)], "{}");
    assert_eq!(call("alice").status, 200);
    assert_eq!(call("alice").status, 200);
    assert_eq!(call("alice").status, 429);

    std::fs::write(&file.0, "by_user = \"4/m\"\n").unwrap();
    gw.signal("HUP");
    // Stderr is unbuffered, so a line may arrive in pieces: wait for its end.
    let log = gw.wait_for_log("backend=Memory\n", 2);
    assert!(
        log.lines()
            .any(|l| l.starts_with("gateway: reloaded") && l.contains("by_user=4/m")),
        "one summary line:\n{log}"
    );
    // The two calls alice made still count: two more, then refused.
    let next = call("alice");
    assert_eq!((next.status, next.number("x-ratelimit-limit")), (200, 4));
    assert_eq!(next.number("x-ratelimit-remaining"), 1);
    assert_eq!(call("alice").status, 200);
    assert_eq!(call("alice").status, 429);

    std::fs::write(&file.0, "by_user = \"abc/m\"\nalgorithm = \"leaky\"\n").unwrap();
    gw.signal("HUP");
    let log = gw.wait_for_log("or token_bucket\n", 1);
    assert!(log.contains("reload failed, the old rules stay"), "{log}");
    assert!(
        log.lines().any(|l| l.starts_with("by_user:"))
            && log.lines().any(|l| l.starts_with("algorithm:")),
        "every problem on its own line, naming its field:\n{log}"
    );
    assert_eq!(call("bob").number("x-ratelimit-limit"), 4);

    std::fs::write(&file.0, "by_user = \"9/m\"\n[backend]\nmax_keys = 10\n").unwrap();
    gw.signal("HUP");
    let log = gw.wait_for_log("(nothing was applied)\n", 1);
    assert!(log.contains("backend.max_keys: changed"), "{log}");
    assert_eq!(call("bob").number("x-ratelimit-limit"), 4);
    assert_eq!(gw.get("/healthz").status, 200);
}

/// Built with `--features metrics`, the gateway serves its counters at `/metrics` in
/// Prometheus text format, by decision, rule and configured tool, never by user.
#[cfg(feature = "metrics")]
#[test]
fn metrics_show_the_counters_in_prometheus_text() {
    let gw = Gateway::start(&[]);
    for _ in 0..3 {
        assert_eq!(
            gw.post("/tools/echo", &[("x-user-id", "alice")], "{}")
                .status,
            200
        );
    }
    for user in ["alice", "bob"] {
        assert_eq!(
            gw.post("/tools/search", &[("x-user-id", user)], "{}")
                .status,
            200
        );
    }
    for user in ["carol", "dave"] {
        assert_eq!(
            gw.post("/tools/search", &[("x-user-id", user)], "{}")
                .status,
            200
        );
    }
    // The default config allows ten searches a minute: the rest are refused.
    for i in 0..8 {
        gw.post(
            "/tools/search",
            &[("x-user-id", &format!("user-{i}"))],
            "{}",
        );
    }
    let metrics = gw.get("/metrics");
    assert_eq!(metrics.status, 200);
    let body = &metrics.body;
    let line = |prefix: &str| {
        body.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in:\n{body}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse::<f64>()
            .unwrap()
    };
    assert_eq!(
        line("tollgate_requests_total{decision=\"allowed\",rule=\"user\",tool=\"\"}"),
        3.0
    );
    assert_eq!(
        line("tollgate_requests_total{decision=\"allowed\",rule=\"tool\",tool=\"search\"}"),
        10.0
    );
    assert_eq!(
        line("tollgate_requests_total{decision=\"limited\",rule=\"tool\",tool=\"search\"}"),
        2.0
    );
    assert_eq!(
        line("tollgate_store_latency_seconds_count{backend=\"memory\"}"),
        15.0
    );
    for user in ["alice", "bob", "user-1"] {
        assert!(!body.contains(user), "{user} in /metrics");
    }
}

#[test]
fn help_prints_usage_and_exits_zero() {
    let out = Command::new(gateway_binary())
        .arg("--help")
        .output()
        .expect("run gateway --help");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("--config") && text.contains("--listen"),
        "{text}"
    );

    let bad = Command::new(gateway_binary())
        .arg("--no-such-flag")
        .output()
        .expect("run gateway --no-such-flag");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--no-such-flag"));
}

/// Runs the load generator (bounded by its own `--duration`) and parses its JSON report.
fn loadgen(args: &[&str]) -> serde_json::Value {
    let out = Command::new(loadgen_binary())
        .args(args)
        .arg("--json")
        .output()
        .expect("run loadgen");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "loadgen failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// The load generator counts what the gateway answers: three users flat out for one
/// second get exactly 3 × 30 successes, every other answer is a 429, nothing is lost.
#[test]
fn loadgen_reports_exactly_what_the_gateway_allowed() {
    let gw = Gateway::start(&[]);
    let target = format!("http://{}", gw.addr);
    let report = loadgen(&[
        "--target",
        &target,
        "--tool",
        "echo",
        "--users",
        "3",
        "--duration",
        "1",
    ]);
    assert_eq!(report["client"], "raw", "{report}");
    assert_eq!(report["status_2xx"], 90, "{report}");
    assert_eq!(report["transport_errors"], 0, "{report}");
    assert_eq!(report["unfinished"], 0, "{report}");
    assert_eq!(report["status_other"], serde_json::json!({}), "{report}");
    let sent = report["sent"].as_u64().unwrap();
    assert_eq!(
        report["status_429"].as_u64().unwrap(),
        sent - 90,
        "{report}"
    );
    assert!(
        report["latency_us"]["max"].as_u64().unwrap() > 0,
        "{report}"
    );

    // Open loop: 4 users at 5 requests/s for 1 s → exactly 20 requests, on two targets
    // (the same gateway named twice, round-robin). user-0..2 spent their 30 above, so
    // only user-3's five calls pass.
    let both = format!("{target},{target}");
    let paced = loadgen(&[
        "--target",
        &both,
        "--users",
        "4",
        "--rate",
        "5",
        "--duration",
        "1",
        "--tool",
        "other",
    ]);
    assert_eq!(paced["sent"], 20, "{paced}");
    assert_eq!(paced["status_2xx"], 5, "{paced}");
    assert_eq!(paced["status_429"], 15, "{paced}");
}

/// Both HTTP clients of the load generator count the same: hyper's as the reference for
/// the raw one (which the earlier test uses by default).
#[test]
fn loadgen_hyper_client_counts_the_same() {
    let gw = Gateway::start(&[]);
    let target = format!("http://{}", gw.addr);
    let report = loadgen(&[
        "--client",
        "hyper",
        "--target",
        &target,
        "--tool",
        "echo",
        "--users",
        "3",
        "--tenants",
        "2",
        "--duration",
        "1",
    ]);
    assert_eq!(report["client"], "hyper", "{report}");
    assert_eq!(report["status_2xx"], 90, "{report}");
    assert_eq!(report["transport_errors"], 0, "{report}");
    let sent = report["sent"].as_u64().unwrap();
    assert_eq!(
        report["status_429"].as_u64().unwrap(),
        sent - 90,
        "{report}"
    );
}

/// Only loopback targets (and only http), unless the user says otherwise.
#[test]
fn loadgen_refuses_targets_that_are_not_loopback() {
    for target in [
        "http://192.0.2.1:3000/",
        "http://example.com/",
        "https://127.0.0.1/",
    ] {
        let out = Command::new(loadgen_binary())
            .args(["--target", target, "--duration", "1"])
            .output()
            .expect("run loadgen");
        assert!(!out.status.success(), "{target} accepted");
        assert!(out.stdout.is_empty(), "{target}: nothing sent or reported");
    }
}

/// A file under the temp dir with a name no other test or run uses, removed on drop
/// (also when an assertion fails).
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, contents: &str) -> TempFile {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "tollgate-gateway-e2e-{}-{nanos}-{n}-{name}",
            std::process::id()
        ));
        std::fs::write(&path, contents).expect("write a temp config");
        TempFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("UTF-8 temp path")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Three gateways started with `config`, and loadgen's report of one user sending exactly
/// 60 calls round-robin across them (1 worker, back to back, capped by `--max-requests`;
/// `--duration` only bounds the run).
#[cfg(feature = "redis")]
fn sixty_calls_round_robin(config: &str) -> ([Gateway; 3], serde_json::Value) {
    let gateways = [(); 3].map(|()| Gateway::start(&["--config", config]));
    let targets: Vec<String> = gateways
        .iter()
        .map(|g| format!("http://{}", g.addr))
        .collect();
    let report = loadgen(&[
        "--target",
        &targets.join(","),
        "--users",
        "1",
        "--rate",
        "0",
        "--max-requests",
        "60",
        "--duration",
        "30",
        "--tool",
        "echo",
    ]);
    assert_eq!(report["sent"], 60, "{report}");
    assert_eq!(report["responses"], 60, "{report}");
    assert_eq!(report["transport_errors"], 0, "{report}");
    assert_eq!(report["unfinished"], 0, "{report}");
    assert_eq!(report["status_other"], serde_json::json!({}), "{report}");
    (gateways, report)
}

/// Three gateways started with `config` (`by_user = "30/m"`, one shared store): one user
/// sending 60 calls round-robin gets exactly 30 through, and every instance then refuses
/// that user while counting another afresh.
#[cfg(feature = "redis")]
fn three_gateways_share_thirty(config: &str) -> [Gateway; 3] {
    let (gateways, shared) = sixty_calls_round_robin(config);
    assert_eq!(
        shared["status_2xx"], 30,
        "one limit for all three: {shared}"
    );
    assert_eq!(shared["status_429"], 30, "{shared}");
    for gw in &gateways {
        let again = gw.post("/tools/echo", &[("x-user-id", "user-0")], "{}");
        assert_eq!(
            again.status, 429,
            "{} still refuses user-0: {again:?}",
            gw.addr
        );
        assert_eq!(again.number("x-ratelimit-remaining"), 0, "{again:?}");
    }
    let other = gateways[1].post("/tools/echo", &[("x-user-id", "someone-else")], "{}");
    assert_eq!(other.status, 200, "{other:?}");
    assert_eq!(other.number("x-ratelimit-remaining"), 29, "{other:?}");
    gateways
}

/// The shipped cluster config's shape on a real cluster (3 masters, 3 replicas): three
/// gateway processes share one 30/m limit exactly. Redis failures show as 503s.
#[cfg(feature = "redis")]
#[test]
fn three_gateways_share_one_limit_through_a_redis_cluster() {
    let test = "three_gateways_share_one_limit_through_a_redis_cluster";
    let Some(cluster) = common::redis_cluster::RedisCluster::start(test) else {
        return;
    };
    let seeds: Vec<String> = cluster
        .seed_urls()
        .iter()
        .map(|u| format!("{u:?}"))
        .collect();
    let config = TempFile::new(
        "cluster.toml",
        &format!(
            "by_user = \"30/m\"\n\
             fail_mode = \"closed\"\n\
             [backend]\n\
             kind = \"redis_cluster\"\n\
             urls = [{}]\n\
             key_prefix = \"{}\"\n\
             timeout_ms = 5000\n\
             fallback = \"none\"\n",
            seeds.join(", "),
            common::redis::fresh_prefix()
        ),
    );
    three_gateways_share_thirty(config.path());
}

/// The same over TLS, trusting the test's private CA through `tls_ca`.
#[cfg(feature = "redis-tls")]
#[test]
fn three_gateways_share_one_limit_through_tls_redis() {
    let test = "three_gateways_share_one_limit_through_tls_redis";
    let Some(redis) = common::redis_tls::TlsRedis::start(test) else {
        return;
    };
    let config = TempFile::new(
        "tls.toml",
        &format!(
            "by_user = \"30/m\"\n\
             fail_mode = \"closed\"\n\
             [backend]\n\
             kind = \"redis\"\n\
             url = \"{}\"\n\
             tls_ca = {:?}\n\
             key_prefix = \"{}\"\n\
             timeout_ms = 5000\n\
             fallback = \"none\"\n",
            redis.url(),
            redis.ca_path().to_str().expect("UTF-8 path"),
            common::redis::fresh_prefix()
        ),
    );
    three_gateways_share_thirty(config.path());
}

/// The Redis guide's promise (docs/redis.md, "Sharing limits across instances"), tried as
/// a new user would: three gateway processes on three ports, `by_user = "30/m"`, one user
/// sending 60 calls round-robin across them within a minute. With one (private) Redis
/// behind them exactly 30 pass and 30 get 429, and every instance then refuses that user;
/// with the memory backend all 60 pass, 20 counted by each instance.
#[cfg(feature = "redis")]
#[test]
fn three_gateways_share_one_limit_through_redis_but_not_in_memory() {
    let test = "three_gateways_share_one_limit_through_redis_but_not_in_memory";
    let Some(redis) = common::redis::RedisServer::private(test) else {
        return;
    };
    let prefix = common::redis::fresh_prefix();
    // The Redis guide's config, except that a Redis failure must show as a 503 (counted
    // as status_other) rather than as a local decision, and the timeout allows for a
    // loaded test machine.
    let config = TempFile::new(
        "redis.toml",
        &format!(
            "by_user = \"30/m\"\n\
             fail_mode = \"closed\"\n\
             [backend]\n\
             kind = \"redis\"\n\
             url = \"{}\"\n\
             key_prefix = \"{prefix}\"\n\
             timeout_ms = 5000\n\
             fallback = \"none\"\n",
            redis.url()
        ),
    );

    let gateways = three_gateways_share_thirty(config.path());
    // The counters live in the private server, under this test's prefix.
    let keys = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(async {
            let mut conn = redis.conn().await;
            common::redis::keys_under(&mut conn, &prefix).await
        });
    assert!(!keys.is_empty(), "no key under {prefix} in {}", redis.url());
    drop(gateways);

    // The memory backend, from the shipped config: each instance counts alone.
    let memory = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/gateway.toml");
    let (gateways, alone) = sixty_calls_round_robin(memory.to_str().expect("UTF-8 path"));
    assert_eq!(alone["status_2xx"], 60, "three separate limits: {alone}");
    assert_eq!(alone["status_429"], 0, "{alone}");
    for gw in &gateways {
        let next = gw.post("/tools/echo", &[("x-user-id", "user-0")], "{}");
        assert_eq!(next.status, 200, "{next:?}");
        assert_eq!(
            next.number("x-ratelimit-remaining"),
            30 - 20 - 1,
            "{} counted 20 of the 60: {next:?}",
            gw.addr
        );
    }
}

/// `examples/gateway-policy.toml`: the gateway serves with `ConnectInfo`, so anonymous
/// callers are counted per client address (here as a trusted local proxy reports it in
/// `X-Forwarded-For`); each caller has its own search counter; a pro tenant gets the pro
/// tier's limits.
#[test]
fn the_policy_config_limits_anonymous_clients_by_address_and_tenants_by_tier() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = root.join("examples/gateway-policy.toml");
    let gw = Gateway::start(&["--config", config.to_str().unwrap()]);
    let anonymous = |client: &str| gw.post("/tools/search", &[("x-forwarded-for", client)], "{}");
    for i in 0..5 {
        let reply = anonymous("198.51.100.1");
        assert_eq!(reply.status, 200, "call {i}: {reply:?}");
    }
    let refused = anonymous("198.51.100.1");
    assert_eq!(refused.status, 429, "{refused:?}");
    assert_eq!(
        refused.number("x-ratelimit-limit"),
        5,
        "the per-user search limit speaks"
    );
    // Another client address has its own bucket; a spoofed left-most entry changes nothing.
    assert_eq!(anonymous("198.51.100.2").status, 200);
    assert_eq!(anonymous("203.0.113.9, 198.51.100.1").status, 429);
    // A pro tenant's user: the pro tier's per-user search limit (50) has the fewest left.
    let pro = gw.post(
        "/tools/search",
        &[("x-user-id", "bob"), ("x-tenant-id", "acme")],
        "{}",
    );
    assert_eq!(pro.status, 200, "{pro:?}");
    assert_eq!(pro.number("x-ratelimit-limit"), 50);
    // A free user: 4 of their own 5 left, but the free tool counter (10, shared by every
    // free caller, untouched by pro calls) has only 3: the anonymous 6 and this one.
    let free = gw.post("/tools/search", &[("x-user-id", "carol")], "{}");
    assert_eq!(free.status, 200, "{free:?}");
    assert_eq!(
        (
            free.number("x-ratelimit-limit"),
            free.number("x-ratelimit-remaining")
        ),
        (10, 3)
    );
}
