//! Heap use on the memory path, measured with a counting global allocator (this test
//! binary only): allocations per request through the layer, and bytes per tracked key.
//!
//! ```text
//! cargo test --release --test alloc -- --nocapture --test-threads=1
//! TOLLGATE_ALLOC_TRACE=1 cargo test --test alloc allowed -- --nocapture   # where from
//! ```
//!
//! Counting is per thread (a const-initialised thread-local), so tests running in
//! parallel do not pollute each other's figures; each measurement runs on its own thread
//! with a current-thread runtime.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response, StatusCode};
use tollgate::{
    Algorithm, HeaderStyle, Key, MemoryStore, Rate, RateLimitConfig, RateLimitLayer, RuleKind,
    Store, StoreFuture, StoreRequest, Subject,
};
use tower::{service_fn, Layer, Service, ServiceExt};

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
    static LIVE_BYTES: Cell<i64> = const { Cell::new(0) };
    /// Set while a backtrace is taken, so the trace's own allocations are not traced.
    static TRACING: Cell<bool> = const { Cell::new(false) };
}

fn trace_wanted() -> bool {
    std::env::var_os("TOLLGATE_ALLOC_TRACE").is_some()
}

fn on_alloc(size: usize) {
    if !COUNTING.with(Cell::get) || TRACING.with(Cell::get) {
        return;
    }
    ALLOCS.with(|a| a.set(a.get() + 1));
    LIVE_BYTES.with(|b| b.set(b.get() + size as i64));
    if TRACE.with(Cell::get) {
        TRACING.with(|t| t.set(true));
        eprintln!(
            "--- allocation of {size} bytes\n{}",
            std::backtrace::Backtrace::force_capture()
        );
        TRACING.with(|t| t.set(false));
    }
}

fn on_dealloc(size: usize) {
    if COUNTING.with(Cell::get) && !TRACING.with(Cell::get) {
        LIVE_BYTES.with(|b| b.set(b.get() - size as i64));
    }
}

thread_local! {
    static TRACE: Cell<bool> = const { Cell::new(false) };
}

// SAFETY: every call is forwarded unchanged to `System`; the bookkeeping touches only
// const-initialised thread-locals (no allocation, no destructor), except the opt-in
// backtrace, which is guarded against re-entry by `TRACING`.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        on_alloc(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        on_alloc(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        on_dealloc(layout.size());
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        on_dealloc(layout.size());
        on_alloc(new_size);
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations and net bytes made by this thread while `f` runs.
fn counted<T>(trace: bool, f: impl FnOnce() -> T) -> (T, u64, i64) {
    let (a0, b0) = (ALLOCS.with(Cell::get), LIVE_BYTES.with(Cell::get));
    TRACE.with(|t| t.set(trace));
    COUNTING.with(|c| c.set(true));
    let out = f();
    COUNTING.with(|c| c.set(false));
    TRACE.with(|t| t.set(false));
    (
        out,
        ALLOCS.with(Cell::get) - a0,
        LIVE_BYTES.with(Cell::get) - b0,
    )
}

const REQUESTS: usize = 1_000;
const USERS: usize = 100;

/// A handler like any real one: its response already carries a header, so the header map
/// exists before tollgate adds to it.
fn handler(_req: Request<()>) -> std::future::Ready<Result<Response<()>, Infallible>> {
    let mut resp = Response::new(());
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    std::future::ready(Ok(resp))
}

/// Allocations per request over `REQUESTS` requests answered `expect`, after as many to
/// warm up (first inserts, table growth, per-thread buffers; with a limit of one, the
/// warm-up uses it up). Requests are built outside the count, and
/// each future is polled in place (no executor): the handler and the memory store are
/// ready at once, so only the service's own work is counted.
fn per_request<S, B>(svc: S, expect: StatusCode, trace: bool) -> f64
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible> + Clone,
{
    let users: Vec<HeaderValue> = (0..USERS)
        .map(|i| HeaderValue::from_str(&format!("user-{i:04}")).expect("ASCII"))
        .collect();
    let requests = || {
        (0..REQUESTS)
            .map(|i| {
                let mut req = Request::new(());
                req.headers_mut()
                    .insert("x-user-id", users[i % USERS].clone());
                req
            })
            .collect::<Vec<_>>()
    };
    let waker = Waker::from(Arc::new(Noop));
    let mut warm = Vec::with_capacity(REQUESTS);
    poll_all(&svc, &waker, requests(), &mut warm);
    let reqs = requests();
    let mut responses = Vec::with_capacity(REQUESTS);
    let ((), allocs, _) = counted(trace, || poll_all(&svc, &waker, reqs, &mut responses));
    for resp in &responses {
        assert_eq!(resp.status(), expect);
    }
    allocs as f64 / REQUESTS as f64
}

struct Noop;
impl Wake for Noop {
    fn wake(self: Arc<Self>) {}
}

/// Drives each request through a clone of `svc` (as axum does) by polling it once.
fn poll_all<S, B>(svc: &S, waker: &Waker, reqs: Vec<Request<()>>, out: &mut Vec<Response<B>>)
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible> + Clone,
{
    let mut cx = Context::from_waker(waker);
    for req in reqs {
        let mut fut = pin!(svc.clone().oneshot(req));
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(resp) => out.push(resp.expect("infallible")),
            Poll::Pending => panic!("the memory path never waits"),
        }
    }
}

fn layer(rate: &str) -> RateLimitLayer {
    let cfg = RateLimitConfig::builder()
        .by_user(rate)
        .headers(HeaderStyle::Legacy)
        .user_header("x-user-id")
        .build()
        .expect("valid config");
    RateLimitLayer::with_store(cfg, MemoryStore::new())
}

fn on_own_thread<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| s.spawn(f).join().expect("measurement panicked"))
}

/// What `Extensions::insert` costs for the `Decision` every response carries by default:
/// the map's box, its table and the value's box.
const DECISION_EXTENSION: f64 = 3.0;
/// The per-thread header chunk: one 16 KiB allocation every few thousand values.
const AMORTISED: f64 = 0.01;

fn allowed_allocations(insert_decision: bool) -> (f64, f64) {
    let trace = trace_wanted();
    on_own_thread(move || {
        let bare = per_request(service_fn(handler), StatusCode::OK, false);
        let layered = per_request(
            layer("1000000/s")
                .decision_extension(insert_decision)
                .layer(service_fn(handler)),
            StatusCode::OK,
            trace,
        );
        (bare, layered)
    })
}

#[test]
fn allowed_requests_allocate_nothing() {
    let (bare, layered) = allowed_allocations(false);
    let extra = layered - bare;
    println!(
        "allocations per allowed request (no Decision extension): bare service_fn {bare:.3}, \
         through tollgate {layered:.3}, tollgate's own {extra:.3}"
    );
    assert!(
        extra < AMORTISED,
        "tollgate allocates {extra} times per allowed request"
    );
}

#[test]
fn the_decision_extension_costs_only_its_own_boxes() {
    let (bare, layered) = allowed_allocations(true);
    let extra = layered - bare;
    println!(
        "allocations per allowed request (default, Decision in extensions): bare \
         service_fn {bare:.3}, through tollgate {layered:.3}, tollgate's own {extra:.3}"
    );
    assert!(
        extra < DECISION_EXTENSION + AMORTISED,
        "tollgate allocates {extra} times per allowed request"
    );
}

#[test]
fn rejected_requests_allocations_are_reported() {
    let rejected = on_own_thread(|| {
        let svc = layer("1/h").layer(service_fn(handler));
        per_request(svc, StatusCode::TOO_MANY_REQUESTS, false)
    });
    println!("allocations per rejected request (429 built by tollgate): {rejected:.3}");
    // The 429 is a new response: its header map (indices and entries), the Decision
    // extension's three boxes, and the box of the refused request's head that a layer
    // further out reads to give back its count (ARCHITECTURE.md, contract item 20); body
    // and header values come from the per-thread chunk (a 16 KiB chunk holds some fifty
    // 429 bodies).
    assert!(rejected < 6.1, "{rejected} allocations per 429");
}

#[test]
fn store_checks_of_known_keys_allocate_nothing() {
    let allocs = on_own_thread(|| {
        let store = MemoryStore::new();
        let ids: Vec<String> = (0..USERS).map(|i| format!("user-{i:04}")).collect();
        let now = 1_800_000_000_000_000;
        let check = |id: &String| {
            let key = Key::new(
                RuleKind::User,
                Subject::Named(id.as_bytes()),
                Rate::per_hour(1_000_000),
                Algorithm::FixedWindow,
            );
            match store.check(&StoreRequest::new(&[key], now)) {
                StoreFuture::Ready(Ok(o)) => assert!(o.iter().all(|o| o.is_allowed())),
                other => panic!("{other:?}"),
            }
        };
        ids.iter().for_each(check);
        let ((), allocs, _) = counted(false, || {
            for _ in 0..10 {
                ids.iter().for_each(check);
            }
        });
        allocs
    });
    assert_eq!(
        allocs,
        0,
        "allocations in {} checks of known keys",
        10 * USERS
    );
}

/// This process's resident set, in bytes (Linux; `None` elsewhere).
fn rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[test]
fn memory_per_tracked_key_at_one_million_keys() {
    const KEYS: usize = 1_000_000;
    let (held, evicted, bytes, rss_delta) = on_own_thread(|| {
        let ids: Vec<String> = (0..KEYS).map(|i| format!("user-{i:08}")).collect();
        let rate = Rate::per_hour(100);
        let now = 1_800_000_000_000_000;
        let rss_before = rss();
        let (store, _, bytes) = counted(false, || {
            let store = MemoryStore::with_max_keys(KEYS);
            for id in &ids {
                let key = Key::new(
                    RuleKind::User,
                    Subject::Named(id.as_bytes()),
                    rate,
                    Algorithm::FixedWindow,
                );
                match store.check(&StoreRequest::new(&[key], now)) {
                    StoreFuture::Ready(Ok(o)) => assert!(o.iter().all(|o| o.is_allowed())),
                    other => panic!("{other:?}"),
                }
            }
            store
        });
        let rss_delta = rss_before.zip(rss()).map(|(a, b)| b.saturating_sub(a));
        (store.len(), store.evictions(), bytes, rss_delta)
    });
    let per_key = bytes as f64 / held as f64;
    let rss_per_key = rss_delta.map(|d| d as f64 / held as f64);
    println!(
        "memory store after {KEYS} distinct 13-byte user ids (max_keys {KEYS}): {held} keys \
         held, {evicted} evicted; {bytes} bytes requested from the allocator = {per_key:.1} \
         bytes per key; resident set grew by {rss_delta:?} bytes = {rss_per_key:.1?} per key \
         (RSS includes the allocator's own overhead, and other tests running at the time)"
    );
    // A key whose 16-slot window is full evicts there before the store is full: at the
    // bound, a few hundred of a million.
    assert!(held >= KEYS * 99 / 100, "only {held} keys held");
    assert!(per_key <= 96.0, "{per_key:.1} bytes per tracked key");
}

/// Four rules (user, tenant in a tier, tool from the path, user×tool), and anonymous
/// callers counted by address, stay allocation-free on the memory path (their keys' memory
/// identities are built in a per-thread buffer).
#[test]
fn four_rules_tiers_and_client_addresses_allocate_nothing() {
    let extra = on_own_thread(|| {
        let cfg = RateLimitConfig::from_toml_str(
            r#"
            by_user = "1000000/s"
            by_tenant = "1000000/s"
            anonymous = "by_ip"
            [by_tool]
            search = "1000000/s"
            [by_user_tool]
            search = "1000000/s"
            [tiers.pro]
            by_tenant = "2000000/s"
            [tiers.pro.by_user_tool]
            search = "2000000/s"
            [tenants]
            acme = "pro"
            [identity]
            user_header = "x-user-id"
            tenant_header = "x-tenant-id"
            tool_path = "/tools/{name}"
            trusted_proxies = ["10.0.0.0/8"]
            "#,
        )
        .unwrap();
        let svc = RateLimitLayer::with_store(cfg, MemoryStore::new())
            .decision_extension(false)
            .layer(service_fn(handler));
        let make = |i: usize| {
            let mut req = Request::post("/tools/Search").body(()).unwrap();
            let peer = std::net::SocketAddr::from(([10, 0, 0, 1], 4000));
            req.extensions_mut().insert(peer);
            if i % 2 == 0 {
                let user = HeaderValue::from_str(&format!("user-{:04}", i % USERS)).unwrap();
                req.headers_mut().insert("x-user-id", user);
                req.headers_mut()
                    .insert("x-tenant-id", HeaderValue::from_static("acme"));
            } else {
                let client = HeaderValue::from_str(&format!("198.51.100.{}", i % 200)).unwrap();
                req.headers_mut().insert("x-forwarded-for", client);
            }
            req
        };
        let waker = Waker::from(Arc::new(Noop));
        let mut warm = Vec::with_capacity(REQUESTS);
        poll_all(&svc, &waker, (0..REQUESTS).map(make).collect(), &mut warm);
        let reqs: Vec<_> = (0..REQUESTS).map(make).collect();
        let mut responses = Vec::with_capacity(REQUESTS);
        let ((), allocs, _) = counted(trace_wanted(), || {
            poll_all(&svc, &waker, reqs, &mut responses)
        });
        for resp in &responses {
            assert_eq!(resp.status(), StatusCode::OK);
            assert!(resp.headers().contains_key("x-ratelimit-limit"));
        }
        let bare = per_request(service_fn(handler), StatusCode::OK, false);
        allocs as f64 / REQUESTS as f64 - bare
    });
    println!(
        "allocations per allowed request with four rules, a tier and client addresses: {extra:.3}"
    );
    assert!(
        extra < AMORTISED,
        "tollgate allocates {extra} times per request"
    );
}

/// A request body that hands out its frames one by one, already in memory (as a server's
/// read buffer holds them: shared `Bytes`, so slicing one allocates nothing).
struct Frames(std::collections::VecDeque<bytes::Bytes>);

impl http_body::Body for Frames {
    type Data = bytes::Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|d| Ok(http_body::Frame::data(d))))
    }
}

/// `REQUESTS` MCP `tools/call` requests, each body cut into `frames` frames, with a
/// `Content-Length` header.
fn mcp_requests(frames: usize) -> Vec<Request<Frames>> {
    let mut buffer = bytes::BytesMut::new();
    (0..REQUESTS)
        .map(|i| {
            let text = format!(
                r#"{{"jsonrpc":"2.0","id":{i},"method":"tools/call","params":{{"name":"search","arguments":{{"query":"rust tower middleware"}}}}}}"#
            );
            buffer.extend_from_slice(text.as_bytes());
            let body = buffer.split().freeze();
            let step = body.len().div_ceil(frames);
            let parts = (0..body.len())
                .step_by(step)
                .map(|at| body.slice(at..(at + step).min(body.len())))
                .collect();
            Request::post("/mcp")
                .header("content-type", "application/json")
                .header("content-length", body.len())
                .header("x-user-id", format!("user-{:04}", i % USERS))
                .body(Frames(parts))
                .expect("valid request")
        })
        .collect()
}

/// Allocations per MCP request through `svc`, counted as in [`per_request`].
fn mcp_per_request<S, B>(svc: S, frames: usize) -> f64
where
    S: Service<Request<Frames>, Response = Response<B>, Error = Infallible> + Clone,
{
    let waker = Waker::from(Arc::new(Noop));
    let mut cx = Context::from_waker(&waker);
    let mut run = |reqs: Vec<Request<Frames>>, out: &mut Vec<Response<B>>| {
        for req in reqs {
            let mut fut = pin!(svc.clone().oneshot(req));
            match fut.as_mut().poll(&mut cx) {
                Poll::Ready(resp) => out.push(resp.expect("infallible")),
                Poll::Pending => panic!("an in-memory body never waits"),
            }
        }
    };
    let mut warm = Vec::with_capacity(REQUESTS);
    run(mcp_requests(frames), &mut warm);
    let reqs = mcp_requests(frames);
    let mut responses = Vec::with_capacity(REQUESTS);
    let ((), allocs, _) = counted(trace_wanted(), || run(reqs, &mut responses));
    for resp in &responses {
        assert_eq!(resp.status(), StatusCode::OK);
    }
    allocs as f64 / REQUESTS as f64
}

/// The body peek: `McpLayer` in front of the rate limiter against the rate limiter alone,
/// over the same MCP requests (the handler does not read the body in either case).
#[test]
fn the_body_peek_allocates_one_buffer_at_most() {
    let mcp_cfg = RateLimitConfig::builder()
        .by_user("1000000/s")
        .tool("search", "1000000/s")
        .user_header("x-user-id")
        .mcp()
        .build()
        .expect("valid config");
    let figures = on_own_thread(move || {
        let handler = |_req: Request<tollgate::McpBody<Frames>>| {
            let mut resp = Response::new(());
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            std::future::ready(Ok::<_, Infallible>(resp))
        };
        let bare_handler = |_req: Request<Frames>| {
            let mut resp = Response::new(());
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            std::future::ready(Ok::<_, Infallible>(resp))
        };
        let limiter = || {
            RateLimitLayer::with_store(mcp_cfg.clone(), MemoryStore::new())
                .decision_extension(false)
        };
        [1, 2, 5].map(|frames| {
            let without = mcp_per_request(limiter().layer(service_fn(bare_handler)), frames);
            let with = mcp_per_request(
                tollgate::McpLayer::new(&mcp_cfg).layer(limiter().layer(service_fn(handler))),
                frames,
            );
            (frames, without, with)
        })
    });
    for (frames, without, with) in figures {
        let extra = with - without;
        println!(
            "allocations per MCP tools/call in {frames} frame(s): rate limiter alone \
             {without:.3}, with McpLayer {with:.3}, the peek's own {extra:.3}"
        );
        // One frame is kept as it came; more are gathered into one buffer sized from
        // Content-Length.
        let allowed = if frames == 1 { 0.0 } else { 1.0 };
        assert!(
            extra <= allowed + AMORTISED,
            "the peek allocates {extra} times per request in {frames} frames"
        );
    }
}
