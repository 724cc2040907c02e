//! An HTTP/1.1 load generator for the example gateway and any tollgate-protected server.
//!
//! ```text
//! cargo run --release --example gateway -- --listen 127.0.0.1:3000 &
//! cargo run --release --example loadgen -- --target http://127.0.0.1:3000 \
//!     --tool echo --users 100 --rate 0 --concurrency 32 --duration 5
//! ```
//!
//! Measuring tollgate's cost over HTTP (server and load generator pinned to different
//! cores; compare runs made one after the other, since these machines drift):
//!
//! ```text
//! cargo build --release --example gateway --example loadgen
//! for cfg in disabled accept reject; do
//!     taskset -c 0 target/release/examples/gateway --config examples/bench/$cfg.toml \
//!         --listen 127.0.0.1:3000 & pid=$!; sleep 1
//!     taskset -c 1 target/release/examples/loadgen --target http://127.0.0.1:3000 \
//!         --tool echo --users 100 --concurrency 32 --duration 5 --json
//!     kill $pid; wait $pid
//! done
//! ```
//!
//! `disabled.toml` is the baseline (tollgate passes everything through), `accept.toml`
//! counts every call without reaching a limit, `reject.toml` answers 429 to all but each
//! user's first call.
//!
//! Simulated user `i` (0-based) sends `x-user-id: user-<i>` (and, with `--tenants K`,
//! `x-tenant-id: tenant-<i mod K>`). With `--tool NAME` every request is
//! `POST <target path>/tools/NAME` with the body `{}`; without it, every request is a
//! `GET` of the target URL exactly as given (path and query), so any server can be
//! measured. Targets are used round-robin.
//!
//! Workers: `--concurrency C` tasks, each with one keep-alive connection per target
//! (reconnecting after an error), and one request in flight at a time. User `i` belongs
//! to worker `i mod C`. With `--rate R` > 0, each user is scheduled at `R` requests per
//! second (open loop, staggered start); a worker that falls behind sends as soon as it
//! can, skipping at most one second of backlog. With `--rate 0`, each worker sends back to
//! back (closed loop), cycling through its users.
//!
//! It stops by itself: at `--duration`, or after `--max-requests` requests, whichever
//! comes first; a request still unanswered 2 s after the deadline is abandoned (counted
//! as `unfinished`). Only loopback targets (127.0.0.0/8, ::1, localhost) are accepted
//! unless `--allow-remote` is given.
//!
//! Latency is measured per request from just before sending to the end of the response
//! body, into a log-linear histogram (≤ 1.6% relative error); percentiles are the upper
//! bound of their bucket.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST};
use http::{HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

const USAGE: &str = "\
loadgen: HTTP/1.1 load against tollgate-protected servers (loopback only by default).

USAGE:
    loadgen --target URL [OPTIONS]

OPTIONS:
    --target URL        http:// URL; repeat or comma-separate for several (round-robin)
    --users N           simulated users, each sending x-user-id: user-<i> [default: 10]
    --tenants K         also send x-tenant-id: tenant-<i mod K> [default: none]
    --rate R            requests per second per user; 0 = as fast as possible [default: 0]
    --duration SECS     how long to send (fractions allowed, at most 3600) [default: 10]
    --max-requests N    hard cap on requests sent [default: 10000000]
    --tool NAME         POST <target path>/tools/NAME with body {} ; without it, GET the
                        target URL as given
    --concurrency C     workers, each one request in flight and one keep-alive
                        connection per target [default: min(users, 64)]
    --threads T         runtime worker threads [default: available CPUs]
    --json              print the report as one JSON object
    --allow-remote      allow targets that are not loopback (only against servers you run)
    -h, --help          print this help";

const DEFAULT_MAX_REQUESTS: u64 = 10_000_000;
const MAX_DURATION_SECS: f64 = 3600.0;
const MAX_USERS: usize = 1_000_000;
const MAX_CONCURRENCY: usize = 10_000;
/// How long after the deadline an unanswered request is waited for.
const GRACE: Duration = Duration::from_secs(2);
/// Pause after a failed connection attempt, so a dead target is not hammered.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(20);

static USER_HEADER: HeaderName = HeaderName::from_static("x-user-id");
static TENANT_HEADER: HeaderName = HeaderName::from_static("x-tenant-id");
static JSON: HeaderValue = HeaderValue::from_static("application/json");

// ---------------------------------------------------------------------------------------
// Arguments.

#[derive(Debug)]
struct Args {
    targets: Vec<String>,
    users: usize,
    tenants: usize,
    rate: f64,
    duration: Duration,
    max_requests: u64,
    tool: Option<String>,
    concurrency: Option<usize>,
    threads: Option<usize>,
    json: bool,
    allow_remote: bool,
}

/// `Ok(None)`: `--help` was asked for.
fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut a = Args {
        targets: Vec::new(),
        users: 10,
        tenants: 0,
        rate: 0.0,
        duration: Duration::from_secs(10),
        max_requests: DEFAULT_MAX_REQUESTS,
        tool: None,
        concurrency: None,
        threads: None,
        json: false,
        allow_remote: false,
    };
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(value.to_owned()))
            }
            _ => (arg, None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--target" => {
                let v = value()?;
                a.targets.extend(
                    v.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned),
                );
            }
            "--users" => a.users = bounded(&flag, &value()?, MAX_USERS)?,
            "--tenants" => a.tenants = number(&flag, &value()?)?,
            "--rate" => {
                let v = value()?;
                a.rate = v
                    .parse::<f64>()
                    .ok()
                    .filter(|r| *r == 0.0 || (0.001..=1_000_000.0).contains(r))
                    .ok_or_else(|| format!("--rate {v:?}: expected 0 or 0.001 to 1000000"))?;
            }
            "--duration" => {
                let v = value()?;
                let secs = v
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s > 0.0 && *s <= MAX_DURATION_SECS)
                    .ok_or_else(|| {
                        format!("--duration {v:?}: expected seconds in (0, {MAX_DURATION_SECS}]")
                    })?;
                a.duration = Duration::from_secs_f64(secs);
            }
            "--max-requests" => a.max_requests = bounded(&flag, &value()?, usize::MAX)? as u64,
            "--tool" => {
                let v = value()?;
                if v.is_empty()
                    || !v
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                {
                    return Err(format!(
                        "--tool {v:?}: use letters, digits, '-', '_' or '.'"
                    ));
                }
                a.tool = Some(v);
            }
            "--concurrency" => a.concurrency = Some(bounded(&flag, &value()?, MAX_CONCURRENCY)?),
            "--threads" => a.threads = Some(bounded(&flag, &value()?, 1024)?),
            "--json" => a.json = true,
            "--allow-remote" => a.allow_remote = true,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if a.targets.is_empty() {
        return Err("at least one --target URL is required".into());
    }
    Ok(Some(a))
}

fn number(flag: &str, v: &str) -> Result<usize, String> {
    v.parse()
        .map_err(|_| format!("{flag} {v:?}: expected a whole number"))
}

fn bounded(flag: &str, v: &str, max: usize) -> Result<usize, String> {
    match number(flag, v)? {
        n @ 1.. if n <= max => Ok(n),
        _ => Err(format!("{flag} {v:?}: expected 1 to {max}")),
    }
}

// ---------------------------------------------------------------------------------------
// Targets.

/// One target, with everything a request needs precomputed.
#[derive(Debug)]
struct Target {
    url: String,
    addrs: Vec<SocketAddr>,
    host: HeaderValue,
    path: Uri,
}

async fn resolve_target(
    url: &str,
    tool: Option<&str>,
    allow_remote: bool,
) -> Result<Target, String> {
    let uri: Uri = url.parse().map_err(|e| format!("--target {url:?}: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(format!(
                "--target {url:?}: scheme {other:?} is not supported (http only)"
            ))
        }
        None => return Err(format!("--target {url:?}: expected http://host:port/...")),
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("--target {url:?}: no host"))?;
    let host = authority.host();
    let port = authority.port_u16().unwrap_or(80);
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let named_loopback = bare.eq_ignore_ascii_case("localhost");
    let literal = bare.parse::<IpAddr>().ok();
    if !allow_remote && !named_loopback && !literal.is_some_and(|ip| ip.is_loopback()) {
        return Err(format!(
            "--target {url:?}: {host} is not a loopback address (127.0.0.0/8, ::1, localhost); \
             pass --allow-remote to load a server you run elsewhere"
        ));
    }
    let addrs: Vec<SocketAddr> = match literal {
        Some(ip) => vec![SocketAddr::new(ip, port)],
        None => tokio::net::lookup_host((bare, port))
            .await
            .map_err(|e| format!("--target {url:?}: cannot resolve {host}: {e}"))?
            .collect(),
    };
    if addrs.is_empty() {
        return Err(format!("--target {url:?}: {host} resolves to no address"));
    }
    if !allow_remote && addrs.iter().any(|a| !a.ip().is_loopback()) {
        return Err(format!(
            "--target {url:?}: {host} resolves to a non-loopback address"
        ));
    }
    let path = match tool {
        Some(tool) => {
            let base = uri.path().trim_end_matches('/');
            format!("{base}/tools/{tool}")
        }
        None => uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned()),
    };
    Ok(Target {
        url: url.to_owned(),
        addrs,
        host: HeaderValue::from_str(authority.as_str())
            .map_err(|e| format!("--target {url:?}: {e}"))?,
        path: path
            .parse()
            .map_err(|e| format!("--target {url:?}: path {path:?}: {e}"))?,
    })
}

// ---------------------------------------------------------------------------------------
// Statistics.

/// Log-linear latency histogram in microseconds: exact below 128 µs, then 64 buckets per
/// power of two.
struct Histogram {
    counts: Vec<u64>,
    max: u64,
}

const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;
const BUCKETS: usize = ((64 - SUB_BITS as usize) * SUB as usize) + SUB as usize;

impl Histogram {
    fn new() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            max: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < 2 * SUB {
            return v as usize;
        }
        let shift = (63 - v.leading_zeros()) - SUB_BITS;
        (u64::from(shift) * SUB + (v >> shift)) as usize
    }

    /// The largest value that falls into bucket `i`.
    fn upper(i: usize) -> u64 {
        let i = i as u64;
        if i < 2 * SUB {
            return i;
        }
        let shift = i / SUB - 1;
        let mantissa = i - shift * SUB;
        let upper = (u128::from(mantissa + 1) << shift) - 1;
        u64::try_from(upper).unwrap_or(u64::MAX)
    }

    fn record(&mut self, micros: u64) {
        self.counts[Self::index(micros)] += 1;
        self.max = self.max.max(micros);
    }

    fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.max = self.max.max(other.max);
    }

    fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    fn percentile(&self, p: f64) -> u64 {
        let total = self.total();
        if total == 0 {
            return 0;
        }
        let rank = ((p / 100.0) * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::upper(i).min(self.max);
            }
        }
        self.max
    }
}

/// One worker's counts; merged at the end, never shared while running.
struct Stats {
    sent: u64,
    status: [u64; 600],
    transport_errors: u64,
    unfinished: u64,
    latency: Histogram,
}

impl Stats {
    fn new() -> Self {
        Stats {
            sent: 0,
            status: [0; 600],
            transport_errors: 0,
            unfinished: 0,
            latency: Histogram::new(),
        }
    }

    fn merge(&mut self, o: &Stats) {
        self.sent += o.sent;
        for (a, b) in self.status.iter_mut().zip(o.status.iter()) {
            *a += b;
        }
        self.transport_errors += o.transport_errors;
        self.unfinished += o.unfinished;
        self.latency.merge(&o.latency);
    }

    fn responses(&self) -> u64 {
        self.status.iter().sum()
    }
}

// ---------------------------------------------------------------------------------------
// Workers.

struct Plan {
    targets: Vec<Target>,
    users: Vec<(HeaderValue, Option<HeaderValue>)>,
    tool: bool,
    interval: Option<Duration>,
    start: Instant,
    deadline: Instant,
    max_requests: u64,
    issued: AtomicU64,
}

/// A connection per target, opened on first use and after any error.
struct Connections {
    senders: Vec<Option<SendRequest<Full<Bytes>>>>,
}

impl Connections {
    async fn get(&mut self, plan: &Plan, t: usize) -> Option<&mut SendRequest<Full<Bytes>>> {
        if self.senders[t].as_ref().is_some_and(|s| s.is_closed()) {
            self.senders[t] = None;
        }
        if self.senders[t].is_none() {
            let stream = tokio::net::TcpStream::connect(&plan.targets[t].addrs[..])
                .await
                .ok()?;
            let _ = stream.set_nodelay(true);
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .ok()?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.senders[t] = Some(sender);
        }
        self.senders[t].as_mut()
    }
}

enum Sent {
    Status(u16),
    TransportError,
    Unfinished,
}

async fn worker(plan: Arc<Plan>, id: usize, workers: usize) -> Stats {
    let mut stats = Stats::new();
    let mine: Vec<usize> = (id..plan.users.len()).step_by(workers).collect();
    if mine.is_empty() {
        return stats;
    }
    let mut conns = Connections {
        senders: (0..plan.targets.len()).map(|_| None).collect(),
    };
    let hard_stop = tokio::time::sleep_until((plan.deadline + GRACE).into());
    tokio::pin!(hard_stop);
    let body = Bytes::from_static(b"{}");
    let mut next_target = id % plan.targets.len();
    let mut cursor = 0usize;
    // Open loop: (due time, user) for each of this worker's users, staggered over one interval.
    let mut schedule: BinaryHeap<Reverse<(Instant, usize)>> = BinaryHeap::new();
    if let Some(interval) = plan.interval {
        let n = plan.users.len() as u32;
        for &u in &mine {
            let offset = interval * (u as u32) / n;
            schedule.push(Reverse((plan.start + offset, u)));
        }
    }

    loop {
        let user = match plan.interval {
            None => {
                if Instant::now() >= plan.deadline {
                    break;
                }
                let u = mine[cursor];
                cursor = if cursor + 1 == mine.len() {
                    0
                } else {
                    cursor + 1
                };
                u
            }
            Some(interval) => {
                // A request due before the deadline is sent, even if this task wakes late.
                let Reverse((due, u)) = schedule.pop().expect("every user is rescheduled");
                if due >= plan.deadline {
                    break;
                }
                if due > Instant::now() {
                    tokio::time::sleep_until(due.into()).await;
                }
                let mut next = due + interval;
                let now = Instant::now();
                if next + Duration::from_secs(1) < now {
                    next = now;
                }
                schedule.push(Reverse((next, u)));
                u
            }
        };
        if plan.issued.fetch_add(1, Ordering::Relaxed) >= plan.max_requests {
            break;
        }
        let t = next_target;
        next_target = if t + 1 == plan.targets.len() {
            0
        } else {
            t + 1
        };
        let target = &plan.targets[t];

        let mut req = Request::new(Full::new(if plan.tool {
            body.clone()
        } else {
            Bytes::new()
        }));
        *req.uri_mut() = target.path.clone();
        if plan.tool {
            *req.method_mut() = Method::POST;
        }
        let headers = req.headers_mut();
        headers.insert(HOST, target.host.clone());
        let (user_id, tenant_id) = &plan.users[user];
        headers.insert(USER_HEADER.clone(), user_id.clone());
        if let Some(tenant) = tenant_id {
            headers.insert(TENANT_HEADER.clone(), tenant.clone());
        }
        if plan.tool {
            headers.insert(CONTENT_TYPE, JSON.clone());
            headers.insert(CONTENT_LENGTH, HeaderValue::from_static("2"));
        }

        stats.sent += 1;
        let began = Instant::now();
        let outcome = tokio::select! {
            biased;
            outcome = send(&mut conns, &plan, t, req) => outcome,
            () = &mut hard_stop => Sent::Unfinished,
        };
        match outcome {
            Sent::Status(code) => {
                let micros = began.elapsed().as_micros() as u64;
                stats.latency.record(micros);
                stats.status[usize::from(code).min(599)] += 1;
            }
            Sent::TransportError => {
                stats.transport_errors += 1;
                conns.senders[t] = None;
                tokio::time::sleep(RECONNECT_BACKOFF).await;
            }
            Sent::Unfinished => {
                stats.unfinished += 1;
                break;
            }
        }
    }
    stats
}

async fn send(conns: &mut Connections, plan: &Plan, t: usize, req: Request<Full<Bytes>>) -> Sent {
    let Some(sender) = conns.get(plan, t).await else {
        return Sent::TransportError;
    };
    if sender.ready().await.is_err() {
        return Sent::TransportError;
    }
    let resp = match sender.send_request(req).await {
        Ok(resp) => resp,
        Err(_) => return Sent::TransportError,
    };
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    // Read the body to its end so the connection can carry the next request.
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            return Sent::TransportError;
        }
    }
    Sent::Status(status)
}

// ---------------------------------------------------------------------------------------
// Main.

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("loadgen: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = args.threads {
        builder.worker_threads(threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let mut targets = Vec::with_capacity(args.targets.len());
    for url in &args.targets {
        targets.push(resolve_target(url, args.tool.as_deref(), args.allow_remote).await?);
    }
    let users = (0..args.users)
        .map(|i| {
            let user = HeaderValue::from_str(&format!("user-{i}")).expect("ASCII");
            let tenant = (args.tenants > 0).then(|| {
                HeaderValue::from_str(&format!("tenant-{}", i % args.tenants)).expect("ASCII")
            });
            (user, tenant)
        })
        .collect();
    let workers = args
        .concurrency
        .unwrap_or(args.users.min(64))
        .min(args.users);
    let interval = (args.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / args.rate));
    let start = Instant::now();
    let plan = Arc::new(Plan {
        targets,
        users,
        tool: args.tool.is_some(),
        interval,
        start,
        deadline: start + args.duration,
        max_requests: args.max_requests,
        issued: AtomicU64::new(0),
    });

    let handles: Vec<_> = (0..workers)
        .map(|id| tokio::spawn(worker(plan.clone(), id, workers)))
        .collect();
    let mut total = Stats::new();
    for handle in handles {
        match handle.await {
            Ok(stats) => total.merge(&stats),
            Err(e) => return Err(format!("a worker failed: {e}")),
        }
    }
    let elapsed = start.elapsed();
    let report = Report {
        args: &args,
        plan: &plan,
        workers,
        stats: &total,
        elapsed,
    };
    if args.json {
        println!("{}", report.json());
    } else {
        print!("{}", report.text());
    }
    Ok(())
}

struct Report<'a> {
    args: &'a Args,
    plan: &'a Plan,
    workers: usize,
    stats: &'a Stats,
    elapsed: Duration,
}

impl Report<'_> {
    fn counts(&self) -> (u64, u64, Vec<(usize, u64)>) {
        let s = self.stats;
        let ok: u64 = s.status[200..300].iter().sum();
        let limited = s.status[429];
        let other = s
            .status
            .iter()
            .enumerate()
            .filter(|&(code, &n)| n > 0 && !(200..300).contains(&code) && code != 429)
            .map(|(code, &n)| (code, n))
            .collect();
        (ok, limited, other)
    }

    fn rps(&self) -> f64 {
        self.stats.responses() as f64 / self.elapsed.as_secs_f64()
    }

    fn json(&self) -> String {
        let (ok, limited, other) = self.counts();
        let s = self.stats;
        let other: serde_json::Map<String, serde_json::Value> = other
            .into_iter()
            .map(|(code, n)| (code.to_string(), n.into()))
            .collect();
        let lat = &s.latency;
        serde_json::json!({
            "targets": self.plan.targets.iter().map(|t| t.url.as_str()).collect::<Vec<_>>(),
            "tool": self.args.tool,
            "users": self.args.users,
            "rate_per_user": self.args.rate,
            "concurrency": self.workers,
            "duration_s": self.elapsed.as_secs_f64(),
            "sent": s.sent,
            "responses": s.responses(),
            "status_2xx": ok,
            "status_429": limited,
            "status_other": other,
            "transport_errors": s.transport_errors,
            "unfinished": s.unfinished,
            "req_per_s": self.rps(),
            "latency_us": {
                "p50": lat.percentile(50.0),
                "p90": lat.percentile(90.0),
                "p99": lat.percentile(99.0),
                "max": lat.max,
            },
        })
        .to_string()
    }

    fn text(&self) -> String {
        let (ok, limited, other) = self.counts();
        let s = self.stats;
        let ms = |us: u64| us as f64 / 1000.0;
        let lat = &s.latency;
        let mut out = String::new();
        let urls: Vec<&str> = self.plan.targets.iter().map(|t| t.url.as_str()).collect();
        let request = match &self.args.tool {
            Some(tool) => format!("POST .../tools/{tool}"),
            None => "GET".to_owned(),
        };
        let rate = if self.args.rate > 0.0 {
            format!("{} req/s per user", self.args.rate)
        } else {
            "as fast as possible".to_owned()
        };
        let _ = writeln!(out, "targets       {} ({request})", urls.join(", "));
        let _ = writeln!(
            out,
            "load          {} users, {rate}, concurrency {}, {:.2} s",
            self.args.users,
            self.workers,
            self.elapsed.as_secs_f64()
        );
        let _ = writeln!(out, "sent          {}", s.sent);
        let _ = writeln!(out, "2xx           {ok}");
        let _ = writeln!(out, "429           {limited}");
        let other: Vec<String> = other.iter().map(|(c, n)| format!("{c}: {n}")).collect();
        let _ = writeln!(
            out,
            "other status  {}",
            if other.is_empty() {
                "0".to_owned()
            } else {
                other.join(", ")
            }
        );
        let _ = writeln!(
            out,
            "errors        {} transport, {} unfinished",
            s.transport_errors, s.unfinished
        );
        let _ = writeln!(out, "throughput    {:.0} req/s", self.rps());
        let _ = writeln!(
            out,
            "latency ms    p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}",
            ms(lat.percentile(50.0)),
            ms(lat.percentile(90.0)),
            ms(lat.percentile(99.0)),
            ms(lat.max)
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_contiguous_and_bound_their_values() {
        let mut last = 0;
        for v in (0..200_000u64).chain([u64::MAX / 2, u64::MAX]) {
            let i = Histogram::index(v);
            assert!(i < BUCKETS);
            assert!(i >= last, "monotone at {v}");
            last = i;
            assert!(Histogram::upper(i) >= v, "upper bound of {v}");
            assert!(Histogram::upper(i) - v <= v / 32 + 1, "error at {v}");
        }
    }
}
