//! # tollgate
//!
//! A tower middleware that rate-limits HTTP services per user, per tenant and per tool,
//! with the counters in this process ([`MemoryStore`]) or in Redis (`RedisStore`, feature
//! `redis`: one server, `rediss://` with feature `redis-tls`, or a Redis Cluster) so that
//! every instance of a service shares one limit.
//!
//! Over the limit, a caller gets `429 Too Many Requests` with a problem+json body and
//! headers saying when to come back; under it, the call goes through with headers saying
//! what is left. If tollgate itself fails, the service keeps serving (fail-open).
//!
//! ```
//! use axum::{body::Body, routing::post, Router};
//! use http::{Request, StatusCode};
//! use tollgate::{RateLimitConfig, RateLimitLayer};
//! use tower::ServiceExt;
//!
//! let cfg = RateLimitConfig::from_toml_str(r#"
//!     by_user = "30/m"
//!     by_tenant = "3000/m"
//!     [by_tool]
//!     search = "10/m"
//!     [identity]
//!     user_header = "x-user-id"
//!     tool_path = "/tools/{name}"
//! "#).expect("every mistake is reported here, at start-up");
//! let app: Router = Router::new()
//!     .route("/tools/{name}", post(|| async { "ok" }))
//!     .layer(RateLimitLayer::new(cfg));
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let call = |user: &str| {
//!     Request::post("/tools/Search").header("x-user-id", user).body(Body::empty()).unwrap()
//! };
//! for i in 0..10 {
//!     // Ten callers share the tool's ten calls a minute (the tool is the path's {name}).
//!     let resp = app.clone().oneshot(call(&format!("user-{i}"))).await.unwrap();
//!     assert_eq!(resp.status(), StatusCode::OK);
//! }
//! let refused = app.clone().oneshot(call("user-10")).await.unwrap();
//! assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
//! assert_eq!(refused.headers()["x-ratelimit-limit"], "10");
//! # });
//! ```
//!
//! Identities come from the [`Identity`], [`ToolName`] and [`Tier`] request extensions (set
//! them in your auth, routing and plan layers), or from headers named in `[identity]` —
//! only trust those behind a proxy that sets them — and the tool from the path
//! (`tool_path`). Requests without a user share one bucket, or with
//! `anonymous = "by_ip"` are counted per client address ([`Anonymous`]). Every setting is
//! described in the configuration reference, `docs::configuration`, beside the guides in
//! [`docs`], whose code blocks are compiled and run as doc tests.
//!
//! In front of an MCP server (Streamable HTTP), `[mcp]` makes tollgate read the tool or
//! prompt of each call from the `Mcp-Method` / `Mcp-Name` headers, and [`McpLayer`] from
//! the JSON-RPC body (for clients that send only the body); a refused `tools/call` is
//! answered as a tool result with `isError: true` that the agent reads (see [`McpLayer`]
//! and [`Refusal`]).
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]

// The layers, each importing only those below it (ARCHITECTURE.md, "The layers"):
// the tower surface; the answers; the compiled policy; reading a request; the stores;
// the configuration; and the ground floor (rates, algorithms, keys, the clock).
mod middleware;

mod answer;

mod policy;

mod request;

mod store;

mod config;

mod algorithm;
mod clock;
mod key;
mod log_gate;
mod rate;
mod tool_path;

pub use algorithm::Algorithm;
pub use answer::body::ResponseBody;
pub use answer::decision::Decision;
pub use answer::mcp::RATE_LIMIT_ERROR_CODE;
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::settings::MAX_IDENTITY_LEN;
pub use config::{
    Anonymous, BackendConfig, BackendKind, ConfigError, FailMode, Fallback, HeaderStyle,
    IdentityConfig, McpConfig, Mode, RateLimitConfig, RateLimitConfigBuilder, RateSpec, Refusal,
    TierConfig,
};
pub use key::{Key, RuleKind, Subject};
pub use middleware::future::ResponseFuture;
pub use middleware::handle::RateLimitHandle;
pub use middleware::layer::RateLimitLayer;
pub use middleware::mcp::{McpFuture, McpLayer, McpService};
pub use middleware::service::RateLimit;
pub use middleware::shared::Stats;
pub use rate::{Rate, RateError};
pub use request::extensions::{Identity, Tier, ToolName};
pub use request::mcp_body::McpBody;
#[cfg(feature = "redis")]
pub use store::fallback::FallbackStore;
pub use store::memory::MemoryStore;
#[cfg(feature = "redis")]
pub use store::redis::{RedisStore, RedisStoreBuilder};
pub use store::{
    Outcome, Outcomes, Store, StoreError, StoreErrorKind, StoreFuture, StoreRequest, StoreStats,
};

/// The reference and the guides, rendered from the repository's `docs/` folder (each
/// page's code blocks are compiled and run as doc tests).
pub mod docs {
    #[doc = include_str!("../docs/configuration.md")]
    pub mod configuration {}
}

/// The README's Rust code blocks, compiled and run as doc tests, so the documented
/// examples stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// Guides and the configuration reference, rendered from `docs/` (each page's code blocks
/// are compiled and run as doc tests).
pub mod docs {
    #[doc = include_str!("../docs/mcp.md")]
    pub mod mcp {}
    #[doc = include_str!("../docs/redis.md")]
    pub mod redis {}
    #[doc = include_str!("../docs/policy.md")]
    pub mod policy {}
    #[doc = include_str!("../docs/behaviour.md")]
    pub mod behaviour {}
}
