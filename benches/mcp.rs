//! An MCP `tools/call` through tollgate against the same rmcp server without it, in the
//! same run: `examples/mcp_server.rs`'s server (rmcp's Streamable HTTP service, in
//! process), called as a tower service, the response body read to its end.
//!
//! ```text
//! cargo bench --bench mcp
//! ```
//!
//! Rows (one criterion group):
//! - `bare`: the rmcp service alone;
//! - `tollgate`: `McpLayer` + `RateLimitLayer` (memory store; user rule and a `search`
//!   rule, never refused; `[mcp]`) in front of it;
//!
//! Then, outside criterion's rows, a paired comparison is printed: rounds of calls timed
//! back to back through each (alternating which goes first), so load from elsewhere on a
//! shared machine hits both alike; the criterion rows run seconds apart and drift with it.
//!
//! Requests are what a 2026-07-28 client sends (stateless: the revision and capabilities
//! in `_meta`, and the `Mcp-Method` / `Mcp-Name` headers), 100 users round-robin.

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/mcp_server.rs"]
mod mcp_server;

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use tollgate::{McpLayer, MemoryStore, RateLimitConfig, RateLimitLayer};
use tower::{Service, ServiceBuilder, ServiceExt};

const USERS: usize = 100;

fn request(i: usize) -> Request<Full<Bytes>> {
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":{i},"method":"tools/call","params":{{"name":"search","arguments":{{"query":"tower middleware"}},"_meta":{{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{{}}}}}}}}"#
    );
    Request::post("/mcp")
        .header("host", "127.0.0.1")
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/call")
        .header("mcp-name", "search")
        .header("x-user-id", format!("user-{:03}", i % USERS))
        .body(Full::new(Bytes::from(body)))
        .expect("valid request")
}

/// One call through a clone of `svc`; the answer must be the tool's result.
async fn call<S, B>(svc: &S, req: Request<Full<Bytes>>)
where
    S: Service<Request<Full<Bytes>>, Response = http::Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let resp = svc.clone().oneshot(req).await.expect("served");
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert!(body.windows(13).any(|w| w == b"3 results for"), "{body:?}");
    black_box(body);
}

/// Sends `iters` calls through clones of `svc`.
fn run<S, B>(rt: &tokio::runtime::Runtime, svc: &S, iters: u64) -> Duration
where
    S: Service<Request<Full<Bytes>>, Response = http::Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let requests: Vec<_> = (0..iters as usize).map(request).collect();
    rt.block_on(async {
        let start = Instant::now();
        for req in requests {
            call(svc, req).await;
        }
        start.elapsed()
    })
}

/// Per round, `pairs` calls through each service, back to back (alternating which goes
/// first): the seconds spent in each.
fn paired_round<S, T, B, C>(
    rt: &tokio::runtime::Runtime,
    without: &S,
    with: &T,
    pairs: usize,
) -> (f64, f64)
where
    S: Service<Request<Full<Bytes>>, Response = http::Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
    T: Service<Request<Full<Bytes>>, Response = http::Response<C>> + Clone,
    T::Error: std::fmt::Debug,
    C: http_body::Body,
    C::Error: std::fmt::Debug,
{
    rt.block_on(async {
        let (mut bare, mut limited) = (Duration::ZERO, Duration::ZERO);
        for i in 0..pairs {
            let (a, b) = (request(i), request(i));
            let t0 = Instant::now();
            if i % 2 == 0 {
                call(without, a).await;
                let t1 = Instant::now();
                call(with, b).await;
                bare += t1 - t0;
                limited += t1.elapsed();
            } else {
                call(with, b).await;
                let t1 = Instant::now();
                call(without, a).await;
                limited += t1 - t0;
                bare += t1.elapsed();
            }
        }
        (bare.as_secs_f64(), limited.as_secs_f64())
    })
}

/// The paired comparison: `ROUNDS` rounds of `PAIRS` pairs; prints the median ratio and
/// the median extra time per call, with their ranges.
fn paired_summary<S, T, B, C>(rt: &tokio::runtime::Runtime, without: &S, with: &T)
where
    S: Service<Request<Full<Bytes>>, Response = http::Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
    T: Service<Request<Full<Bytes>>, Response = http::Response<C>> + Clone,
    T::Error: std::fmt::Debug,
    C: http_body::Body,
    C::Error: std::fmt::Debug,
{
    const ROUNDS: usize = 21;
    const PAIRS: usize = 500;
    paired_round(rt, without, with, PAIRS); // warm-up
    let mut ratios = Vec::with_capacity(ROUNDS);
    let mut extra_us = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let (bare, limited) = paired_round(rt, without, with, PAIRS);
        ratios.push(limited / bare);
        extra_us.push((limited - bare) / PAIRS as f64 * 1e6);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let (ratio, rlo, rhi) = median(&mut ratios);
    let (extra, elo, ehi) = median(&mut extra_us);
    println!(
        "mcp_tools_call/paired: tollgate / bare = {ratio:.3} (median of {ROUNDS} rounds of \
         {PAIRS} back-to-back pairs; range {rlo:.3}–{rhi:.3}); extra per call {extra:.2} µs \
         (range {elo:.2}–{ehi:.2})"
    );
}

fn mcp(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let server = StreamableHttpService::new(
        || Ok(mcp_server::Tools::default()),
        LocalSessionManager::default().into(),
        StreamableHttpServerConfig::default().with_sse_keep_alive(None),
    );
    let cfg = RateLimitConfig::from_toml_str(
        "by_user = \"1000000/s\"\n[by_tool]\nsearch = \"1000000/s\"\n[identity]\nuser_header = \"x-user-id\"\n[mcp]",
    )
    .expect("valid config");
    let limited = ServiceBuilder::new()
        .layer(McpLayer::new(&cfg))
        .layer(RateLimitLayer::with_store(cfg, MemoryStore::new()).decision_extension(false))
        .service(server.clone());

    let mut group = c.benchmark_group("mcp_tools_call");
    group.bench_function("bare", |b| b.iter_custom(|iters| run(&rt, &server, iters)));
    group.bench_function("tollgate", |b| {
        b.iter_custom(|iters| run(&rt, &limited, iters))
    });
    group.finish();
    paired_summary(&rt, &server, &limited);
}

criterion_group!(benches, mcp);
criterion_main!(benches);
