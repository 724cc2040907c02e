//! Key flood (ARCHITECTURE.md, behaviour contract item 12): 2,000,000 distinct identities
//! through the layer over a memory store bounded at 100,000 keys, in-process (`oneshot`,
//! `ManualClock` advancing 10 µs per request, so nothing expires on its own and the bound
//! must evict). Then a legitimate user must still be limited exactly.
//!
//! ```text
//! cargo run --release --example flood [-- IDENTITIES [MAX_KEYS]]
//! ```
//!
//! Prints peak RSS (VmHWM), the store's `len()` and `evictions()`, and the time taken.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use tollgate::{Identity, ManualClock, MemoryStore, RateLimitConfig, RateLimitLayer};
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

const LIMIT: u64 = 5;

/// A line of /proc/self/status, in KiB (0 where /proc is missing).
fn proc_status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn request(user: &str) -> Request<String> {
    let mut req = Request::new(String::new());
    req.extensions_mut().insert(Identity::user(user));
    req
}

fn main() {
    let mut args = std::env::args().skip(1);
    let identities: u64 = args
        .next()
        .map_or(2_000_000, |a| a.parse().expect("IDENTITIES"));
    let max_keys: usize = args
        .next()
        .map_or(100_000, |a| a.parse().expect("MAX_KEYS"));

    let cfg = RateLimitConfig::builder()
        .by_user(format!("{LIMIT}/m"))
        .max_keys(max_keys)
        .build()
        .expect("a valid config");
    let store = MemoryStore::with_max_keys(max_keys);
    let clock = ManualClock::new();
    let layer = RateLimitLayer::with_store(cfg, store.clone()).with_clock(clock.clone());
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(service_fn(|_req: Request<String>| async {
            Ok::<_, Infallible>(Response::new(String::from("ok")))
        }));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");

    let status = |user: &str| {
        let svc = svc.clone();
        let req = request(user);
        rt.block_on(async move { svc.oneshot(req).await.expect("infallible").status() })
    };

    let baseline_kib = proc_status_kib("VmRSS:");
    // A user blocked before the flood: does the flood buy her quota back?
    for _ in 0..LIMIT {
        assert_eq!(status("mallory"), StatusCode::OK);
    }
    assert_eq!(status("mallory"), StatusCode::TOO_MANY_REQUESTS);

    let started = Instant::now();
    let mut svc_flood = svc.clone();
    let mut refused = 0u64;
    let mut name = String::with_capacity(24);
    rt.block_on(async {
        for i in 0..identities {
            name.clear();
            name.push_str("flood-");
            name.push_str(itoa::Buffer::new().format(i));
            let resp = svc_flood
                .ready()
                .await
                .expect("infallible")
                .call(request(&name))
                .await
                .expect("infallible");
            if resp.status() != StatusCode::OK {
                refused += 1;
            }
            clock.advance(Duration::from_micros(10));
        }
    });
    let flood_time = started.elapsed();
    let len = store.len();
    let evictions = store.evictions();
    let peak_kib = proc_status_kib("VmHWM:");
    // Still inside mallory's minute (the flood took 20 s of clock): still refused?
    let mallory_after = status("mallory");

    // A legitimate user after the flood: exactly LIMIT pass, then 429, then the window.
    let mut alice = Vec::new();
    for _ in 0..LIMIT + 2 {
        alice.push(status("alice"));
    }
    let limited_ok = alice[..LIMIT as usize].iter().all(|s| *s == StatusCode::OK)
        && alice[LIMIT as usize..]
            .iter()
            .all(|s| *s == StatusCode::TOO_MANY_REQUESTS);
    clock.advance(Duration::from_secs(60));
    let after_window = status("alice");

    println!("identities         {identities}");
    println!("max_keys           {max_keys}");
    println!(
        "flood              {:.2} s ({:.0} requests/s), {refused} refused",
        flood_time.as_secs_f64(),
        identities as f64 / flood_time.as_secs_f64()
    );
    println!("store.len()        {len}");
    println!("store.evictions()  {evictions}");
    println!("rss before flood   {baseline_kib} KiB");
    println!("peak rss (VmHWM)   {peak_kib} KiB");
    println!(
        "peak - before      {} KiB ≈ {} bytes per tracked key",
        peak_kib.saturating_sub(baseline_kib),
        peak_kib.saturating_sub(baseline_kib) * 1024 / max_keys.max(1) as u64
    );
    println!(
        "alice after flood  {:?} then {:?} after the window",
        alice.iter().map(|s| s.as_u16()).collect::<Vec<_>>(),
        after_window.as_u16()
    );
    println!(
        "mallory            blocked before the flood, {} right after it",
        mallory_after.as_u16()
    );
    println!("layer stats        {:?}", layer.stats());

    assert!(len <= max_keys, "the store holds {len} > {max_keys} keys");
    assert!(
        evictions >= identities.saturating_sub(max_keys as u64),
        "evictions not counted"
    );
    assert_eq!(refused, 0, "every flood identity was new");
    assert!(limited_ok, "alice was not limited exactly: {alice:?}");
    assert_eq!(after_window, StatusCode::OK, "alice after her window");
    assert_eq!(
        mallory_after,
        StatusCode::TOO_MANY_REQUESTS,
        "the flood lifted mallory's block"
    );
    assert_eq!(layer.stats().store_errors, 0);
}
