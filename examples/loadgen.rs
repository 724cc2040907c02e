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
//! Two HTTP clients: `--client raw` (default) writes precomputed request bytes and
//! parses responses with a minimal HTTP/1.1 reader inside the worker task (status,
//! content-length, chunked, connection: close; no allocation per request once warm);
//! `--client hyper` uses hyper's `client::conn::http1`, the reference the tests compare
//! the raw client's counts against.
//!
//! Latency is measured per request from just before sending to the end of the response
//! body, into a log-linear histogram (≤ 1.6% relative error); percentiles are the upper
//! bound of their bucket.

#[path = "common/flags.rs"]
mod flags;

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
use tokio::net::TcpStream;

use flags::Flags;

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
    --client raw|hyper  HTTP client: raw = precomputed request bytes and a minimal
                        response parser (cheapest per request) or hyper's http1 client
                        [default: raw]
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
    engine: Engine,
}

/// `Ok(None)`: `--help` was asked for.
fn parse_args(args: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
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
        engine: Engine::Raw,
    };
    let mut flags = Flags::new(args);
    while let Some(flag) = flags.next_flag() {
        let mut value = || flags.value(&flag);
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
            "--client" => {
                a.engine = match value()?.as_str() {
                    "raw" => Engine::Raw,
                    "hyper" => Engine::Hyper,
                    other => return Err(format!("--client {other:?}: expected raw or hyper")),
                }
            }
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
    /// The raw engine's request up to the user id: request line, host, body headers and
    /// `x-user-id: `.
    raw_prefix: Vec<u8>,
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
    let mut raw_prefix = Vec::with_capacity(128 + path.len());
    let method = if tool.is_some() { "POST" } else { "GET" };
    raw_prefix
        .extend_from_slice(format!("{method} {path} HTTP/1.1\r\nhost: {authority}\r\n").as_bytes());
    if tool.is_some() {
        raw_prefix.extend_from_slice(b"content-type: application/json\r\ncontent-length: 2\r\n");
    }
    raw_prefix.extend_from_slice(b"x-user-id: ");
    Ok(Target {
        raw_prefix,
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
    engine: Engine,
    interval: Option<Duration>,
    start: Instant,
    deadline: Instant,
    max_requests: u64,
    issued: AtomicU64,
}

/// Which HTTP client sends the requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Engine {
    /// Precomputed HTTP/1.1 request bytes written straight to the socket and a minimal
    /// response parser in the worker task: a few µs of client CPU per request, so the
    /// server, not the load generator, is what runs out.
    Raw,
    /// hyper's `client::conn::http1` (a connection task per connection): the reference
    /// implementation, costs the client about as much CPU per request as the server.
    Hyper,
}

/// A worker's connections, one per target, opened on first use and after any error.
enum Connections {
    Raw {
        streams: Vec<Option<TcpStream>>,
        out: Vec<u8>,
        inb: Vec<u8>,
    },
    Hyper {
        senders: Vec<Option<SendRequest<Full<Bytes>>>>,
    },
}

impl Connections {
    fn new(engine: Engine, targets: usize) -> Self {
        match engine {
            Engine::Raw => Connections::Raw {
                streams: (0..targets).map(|_| None).collect(),
                out: Vec::with_capacity(512),
                inb: Vec::with_capacity(16 * 1024),
            },
            Engine::Hyper => Connections::Hyper {
                senders: (0..targets).map(|_| None).collect(),
            },
        }
    }

    /// Forgets target `t`'s connection (after an error).
    fn drop_connection(&mut self, t: usize) {
        match self {
            Connections::Raw { streams, .. } => streams[t] = None,
            Connections::Hyper { senders } => senders[t] = None,
        }
    }

    /// Sends user `user`'s request to target `t` and reads the whole response.
    async fn send(&mut self, plan: &Plan, t: usize, user: usize) -> Sent {
        let target = &plan.targets[t];
        let (user_id, tenant_id) = &plan.users[user];
        match self {
            Connections::Raw { streams, out, inb } => {
                out.clear();
                out.extend_from_slice(&target.raw_prefix);
                out.extend_from_slice(user_id.as_bytes());
                if let Some(tenant) = tenant_id {
                    out.extend_from_slice(b"\r\nx-tenant-id: ");
                    out.extend_from_slice(tenant.as_bytes());
                }
                out.extend_from_slice(if plan.tool {
                    b"\r\n\r\n{}"
                } else {
                    b"\r\n\r\n"
                });
                if streams[t].is_none() {
                    let Ok(stream) = TcpStream::connect(&target.addrs[..]).await else {
                        return Sent::TransportError;
                    };
                    let _ = stream.set_nodelay(true);
                    streams[t] = Some(stream);
                }
                let stream = streams[t].as_mut().expect("connected above");
                match raw::exchange(stream, out, inb).await {
                    Ok((status, keep_alive)) => {
                        if !keep_alive {
                            streams[t] = None;
                        }
                        Sent::Status(status)
                    }
                    Err(_) => Sent::TransportError,
                }
            }
            Connections::Hyper { senders } => {
                if senders[t].as_ref().is_some_and(|s| s.is_closed()) {
                    senders[t] = None;
                }
                if senders[t].is_none() {
                    let Ok(stream) = TcpStream::connect(&target.addrs[..]).await else {
                        return Sent::TransportError;
                    };
                    let _ = stream.set_nodelay(true);
                    let Ok((sender, conn)) =
                        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
                    else {
                        return Sent::TransportError;
                    };
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    senders[t] = Some(sender);
                }
                let sender = senders[t].as_mut().expect("connected above");
                let mut req = Request::new(Full::new(if plan.tool {
                    Bytes::from_static(b"{}")
                } else {
                    Bytes::new()
                }));
                *req.uri_mut() = target.path.clone();
                if plan.tool {
                    *req.method_mut() = Method::POST;
                }
                let headers = req.headers_mut();
                headers.insert(HOST, target.host.clone());
                headers.insert(USER_HEADER.clone(), user_id.clone());
                if let Some(tenant) = tenant_id {
                    headers.insert(TENANT_HEADER.clone(), tenant.clone());
                }
                if plan.tool {
                    headers.insert(CONTENT_TYPE, JSON.clone());
                    headers.insert(CONTENT_LENGTH, HeaderValue::from_static("2"));
                }
                hyper_exchange(sender, req).await
            }
        }
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
    let mut conns = Connections::new(plan.engine, plan.targets.len());
    let hard_stop = tokio::time::sleep_until((plan.deadline + GRACE).into());
    tokio::pin!(hard_stop);
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
        stats.sent += 1;
        let began = Instant::now();
        let outcome = tokio::select! {
            biased;
            outcome = conns.send(&plan, t, user) => outcome,
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
                conns.drop_connection(t);
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

async fn hyper_exchange(sender: &mut SendRequest<Full<Bytes>>, req: Request<Full<Bytes>>) -> Sent {
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

/// The raw HTTP/1.1 exchange: write the request, read one response. Enough of RFC 9112
/// for a load generator: status line, `content-length`, `transfer-encoding: chunked`,
/// `connection: close`, and a body delimited by the end of the connection.
mod raw {
    use std::io::{Error, ErrorKind};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// Longest response head accepted.
    const MAX_HEAD: usize = 64 * 1024;
    /// Body bytes are discarded once this many are buffered.
    const KEEP: usize = 32 * 1024;

    fn bad(what: &'static str) -> Error {
        Error::new(ErrorKind::InvalidData, what)
    }

    /// Sends `request` and reads the response into `inb` (reused, no allocation once
    /// warm). Returns the status and whether the connection may carry another request.
    pub(super) async fn exchange(
        stream: &mut TcpStream,
        request: &[u8],
        inb: &mut Vec<u8>,
    ) -> std::io::Result<(u16, bool)> {
        stream.write_all(request).await?;
        inb.clear();
        let mut scanned = 0usize;
        let head_end = loop {
            let from = scanned.saturating_sub(3);
            if let Some(p) = inb[from..].windows(4).position(|w| w == b"\r\n\r\n") {
                break from + p + 4;
            }
            scanned = inb.len();
            if scanned > MAX_HEAD {
                return Err(bad("response head too long"));
            }
            fill(stream, inb).await?;
        };
        let head = &inb[..head_end];
        if head.len() < 12 || !head.starts_with(b"HTTP/1.") {
            return Err(bad("not an HTTP/1.x response"));
        }
        let status = parse_status(&head[9..12]).ok_or_else(|| bad("bad status code"))?;
        let mut keep_alive = head[7] == b'1';
        let mut length = None;
        let mut chunked = false;
        for line in head[..head_end - 4].split(|&b| b == b'\n').skip(1) {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                continue;
            };
            let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
            if name.eq_ignore_ascii_case(b"content-length") {
                length = Some(parse_usize(value).ok_or_else(|| bad("bad content-length"))?);
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                chunked = contains_ignore_case(value, b"chunked");
            } else if name.eq_ignore_ascii_case(b"connection") {
                if contains_ignore_case(value, b"close") {
                    keep_alive = false;
                } else if contains_ignore_case(value, b"keep-alive") {
                    keep_alive = true;
                }
            }
        }
        if (100..200).contains(&status) {
            return Err(bad("interim 1xx responses are not supported"));
        }
        let mut pos = head_end;
        if status == 204 || status == 304 {
            // No body.
        } else if chunked {
            chunked_body(stream, inb, pos).await?;
            return Ok((status, keep_alive));
        } else if let Some(len) = length {
            let mut remaining = len;
            loop {
                let have = (inb.len() - pos).min(remaining);
                remaining -= have;
                pos += have;
                if remaining == 0 {
                    break;
                }
                inb.clear();
                pos = 0;
                fill(stream, inb).await?;
            }
        } else {
            // Delimited by the end of the connection.
            loop {
                inb.clear();
                if stream.read_buf(inb).await? == 0 {
                    return Ok((status, false));
                }
            }
        }
        if pos != inb.len() {
            return Err(bad("bytes after the response (no pipelining here)"));
        }
        Ok((status, keep_alive))
    }

    async fn fill(stream: &mut TcpStream, inb: &mut Vec<u8>) -> std::io::Result<()> {
        inb.reserve(8 * 1024);
        if stream.read_buf(inb).await? == 0 {
            return Err(Error::new(
                ErrorKind::UnexpectedEof,
                "connection closed mid-response",
            ));
        }
        Ok(())
    }

    /// Reads and discards a chunked body (and its trailers) starting at `pos`.
    async fn chunked_body(
        stream: &mut TcpStream,
        inb: &mut Vec<u8>,
        mut pos: usize,
    ) -> std::io::Result<()> {
        loop {
            // The chunk-size line.
            let line_end = loop {
                if let Some(p) = inb[pos..].windows(2).position(|w| w == b"\r\n") {
                    break pos + p;
                }
                if inb.len() - pos > MAX_HEAD {
                    return Err(bad("chunk size line too long"));
                }
                fill(stream, inb).await?;
            };
            let size_text = inb[pos..line_end]
                .split(|&b| b == b';')
                .next()
                .unwrap_or(&[]);
            let size = parse_hex(size_text.trim_ascii()).ok_or_else(|| bad("bad chunk size"))?;
            pos = line_end + 2;
            if size == 0 {
                // Trailers, up to an empty line.
                loop {
                    let end = loop {
                        if let Some(p) = inb[pos..].windows(2).position(|w| w == b"\r\n") {
                            break pos + p;
                        }
                        if inb.len() - pos > MAX_HEAD {
                            return Err(bad("trailers too long"));
                        }
                        fill(stream, inb).await?;
                    };
                    let empty = end == pos;
                    pos = end + 2;
                    if empty {
                        if pos != inb.len() {
                            return Err(bad("bytes after the response (no pipelining here)"));
                        }
                        return Ok(());
                    }
                }
            }
            // The chunk data and its CRLF, discarding as we go.
            let mut remaining = size + 2;
            loop {
                let have = (inb.len() - pos).min(remaining);
                remaining -= have;
                pos += have;
                if remaining == 0 {
                    break;
                }
                inb.clear();
                pos = 0;
                fill(stream, inb).await?;
            }
            if pos > KEEP {
                inb.drain(..pos);
                pos = 0;
            }
        }
    }

    fn parse_status(digits: &[u8]) -> Option<u16> {
        let n = parse_usize(digits)?;
        u16::try_from(n).ok().filter(|n| (100..600).contains(n))
    }

    fn parse_usize(digits: &[u8]) -> Option<usize> {
        if digits.is_empty() || digits.len() > 18 {
            return None;
        }
        digits.iter().try_fold(0usize, |n, &d| {
            d.is_ascii_digit().then(|| n * 10 + usize::from(d - b'0'))
        })
    }

    fn parse_hex(digits: &[u8]) -> Option<usize> {
        if digits.is_empty() || digits.len() > 15 {
            return None;
        }
        digits.iter().try_fold(0usize, |n, &d| {
            let v = (d as char).to_digit(16)?;
            Some(n * 16 + v as usize)
        })
    }

    fn contains_ignore_case(haystack: &[u8], needle: &[u8]) -> bool {
        haystack
            .windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle))
    }
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
        engine: args.engine,
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
            "client": format!("{:?}", self.args.engine).to_lowercase(),
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

    /// The raw client against canned responses from a loopback socket: each framing is
    /// consumed exactly, so the next response on the same connection parses too.
    #[tokio::test]
    async fn raw_exchange_reads_every_framing_exactly() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let responses: [&[u8]; 5] = [
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
            b"HTTP/1.1 429 Too Many Requests\r\nTransfer-Encoding: chunked\r\n\r\n\
              3;ext=1\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nx-trailer: 1\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end",
        ];
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            for resp in responses {
                let n = sock.read(&mut buf).await.unwrap();
                assert!(buf[..n].ends_with(b"\r\n\r\n"));
                // Split writes so the parser has to wait for more bytes.
                let (a, b) = resp.split_at(resp.len() / 2);
                sock.write_all(a).await.unwrap();
                sock.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
                sock.write_all(b).await.unwrap();
            }
        });
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut inb = Vec::new();
        let req = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
        let mut got = Vec::new();
        for _ in 0..5 {
            got.push(raw::exchange(&mut stream, req, &mut inb).await.unwrap());
        }
        assert_eq!(
            got,
            [
                (200, true),
                (429, true),
                (204, true),
                (503, true),
                (200, false)
            ]
        );
        server.await.unwrap();
    }

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
