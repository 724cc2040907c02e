//! An MCP `tools/call` through tollgate against the same rmcp server without it, in the
//! same run: `examples/mcp_server.rs`'s server (rmcp's Streamable HTTP service, in
//! process), called as a tower service, the response body read to its end.
//!
//! ```text
//! cargo bench --bench mcp
//! ```
//!
//! Rows (one criterion group, interleaved):
//! - `bare`: the rmcp service alone;
//! - `tollgate`: `McpLayer` + `RateLimitLayer` (memory store; user rule and a `search`
//!   rule, never refused; `[mcp]`) in front of it.
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

/// Sends `iters` calls through clones of `svc`; each answer must be the tool's result.
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
            let resp = svc.clone().oneshot(req).await.expect("served");
            assert_eq!(resp.status(), StatusCode::OK);
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            assert!(body.windows(13).any(|w| w == b"3 results for"), "{body:?}");
            black_box(body);
        }
        start.elapsed()
    })
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
}

criterion_group!(benches, mcp);
criterion_main!(benches);
