//! The README's quick start as a program: an axum app limited per user, per tenant and
//! per tool, its health check outside the limit. The README quotes it from the first
//! `use` to the end, and `tests/quickstart.rs` checks the quote and runs the binary.
//!
//! ```text
//! cargo run --example quickstart                            # on 127.0.0.1:3003
//! cargo run --example quickstart -- --listen 127.0.0.1:0    # a free port, printed
//! ```

use std::net::SocketAddr;

use axum::{extract::Path, routing::get, routing::post, Router};
use tokio::net::TcpListener;
use tollgate::{RateLimitConfig, RateLimitLayer};

const LIMITS: &str = r#"
    by_user   = "30/m"       # each user
    by_tenant = "100/m"      # each tenant: all its users together
    anonymous = "by_ip"      # no user: one counter per client address
    [by_tool]
    search = "10/m"          # the search tool: all callers together
    [identity]               # trust these only from a proxy that sets them
    user_header   = "x-user-id"
    tenant_header = "x-tenant-id"
    tool_path     = "/tools/{name}"   # the tool is the path's {name}
"#;

#[tokio::main]
async fn main() {
    // tollgate warns through `tracing` (Redis failing, a client address missing):
    // without a subscriber, nobody sees it.
    tracing_subscriber::fmt::init();
    let cfg = RateLimitConfig::from_toml_str(LIMITS).expect("LIMITS is valid");
    let tool = |Path(name): Path<String>| async move { name + " ran\n" };
    let app = Router::new()
        .route("/tools/{name}", post(tool))
        .layer(RateLimitLayer::new(cfg))
        // Added after `.layer(...)`, so never limited.
        .route("/healthz", get(|| async { "ok\n" }));

    // `--listen ADDR` (port 0: any free port), else 127.0.0.1:3003.
    let listen = std::env::args().skip_while(|arg| arg != "--listen").nth(1);
    let listen = listen.as_deref().unwrap_or("127.0.0.1:3003");
    let listener = TcpListener::bind(listen).await.unwrap();
    let addr = listener.local_addr().unwrap();
    println!("tollgate quickstart listening on http://{addr}");
    // Each request then carries its peer address, which `anonymous = "by_ip"` counts by.
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app).await.unwrap();
}
