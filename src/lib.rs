//! # tollgate
//!
//! A tower middleware that rate-limits HTTP services per user, per tenant and per tool,
//! with the counters in this process ([`MemoryStore`]) or in Redis ([`RedisStore`],
//! feature `redis`: one server, `rediss://` with feature `redis-tls`, or a Redis Cluster)
//! so that every instance of a service shares one limit.
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
//!     by_tenant = "15/m"
//!     [by_tool]
//!     search = "10/m"
//!     [identity]
//!     user_header = "x-user-id"      # set by your auth proxy, stripped from clients
//!     tenant_header = "x-tenant-id"
//!     tool_path = "/tools/{name}"    # the tool is the path's {name}
//! "#).expect("every mistake is reported here, at start-up");
//! let app: Router = Router::new()
//!     .route("/tools/{name}", post(|| async { "ok" }))
//!     .layer(RateLimitLayer::new(cfg));
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let call = |tool: &str, user: &str, tenant: &str| {
//!     Request::post(format!("/tools/{tool}"))
//!         .header("x-user-id", user)
//!         .header("x-tenant-id", tenant)
//!         .body(Body::empty())
//!         .unwrap()
//! };
//! // Ten callers share the tool's ten calls a minute.
//! for i in 0..10 {
//!     let resp = app.clone().oneshot(call("Search", &format!("user-{i}"), "acme")).await.unwrap();
//!     assert_eq!(resp.status(), StatusCode::OK);
//! }
//! let refused = app.clone().oneshot(call("search", "user-10", "globex")).await.unwrap();
//! assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
//! assert_eq!(refused.headers()["x-ratelimit-limit"], "10");
//! // The tenant's fifteen calls a minute are shared by its users, whatever the tool:
//! // acme has used ten.
//! for i in 0..5 {
//!     let resp = app.clone().oneshot(call("fetch", &format!("user-{i}"), "acme")).await.unwrap();
//!     assert_eq!(resp.status(), StatusCode::OK);
//! }
//! let refused = app.clone().oneshot(call("fetch", "user-0", "acme")).await.unwrap();
//! assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
//! assert_eq!(refused.headers()["x-ratelimit-limit"], "15");
//! # });
//! ```
//!
//! ## Where things are
//!
//! - [`RateLimitConfig`] is what to limit and how: every field, its default, its accepted
//!   values and its errors are in [`docs::configuration`]. It comes from TOML, any serde
//!   format or [`RateLimitConfig::builder`], and one that exists is valid.
//! - [`RateLimitLayer`] applies it to a service; [`RateLimitHandle`] changes it while it
//!   serves; [`RateLimitLayer::stats`] counts what failed.
//! - Identities come from the [`Identity`], [`ToolName`] and [`Tier`] request extensions
//!   (set them in your auth, routing and plan layers), or from headers named in
//!   `[identity]` — only trust those behind a proxy that sets them — and the tool from the
//!   path (`tool_path`). Requests without a user share one bucket, or with
//!   `anonymous = "by_ip"` are counted per client address ([`Anonymous`]).
//! - Every response tollgate touched carries its [`Decision`]; refusals are
//!   problem+json (or, for MCP, what an agent reads: [`Refusal`]).
//! - [`Store`] is where counters live: [`MemoryStore`], [`RedisStore`] behind
//!   [`FallbackStore`], or a store of your own.
//! - In front of an MCP server, `[mcp]` reads the tool or prompt of each call from the
//!   `Mcp-Method` / `Mcp-Name` headers, and [`McpLayer`] from the JSON-RPC body
//!   ([`docs::mcp`]).
//! - The guides: [`docs::policy`] (tools from paths, per-user tool limits, clients by
//!   address, tiers, reloading), [`docs::redis`] (one limit across instances, TLS,
//!   failover, Redis Cluster), [`docs::behaviour`] (the whole behaviour, and metrics).
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
    Anonymous, BackendConfig, BackendKind, ConfigError, CostConfig, FailMode, Fallback,
    HeaderStyle, IdentityConfig, McpConfig, Mode, RateLimitConfig, RateLimitConfigBuilder,
    RateSpec, Refusal, TierConfig,
};
pub use key::{Key, RuleKind, Subject};
pub use middleware::charge::{Charge, Settle, Settling};
pub use middleware::future::ResponseFuture;
pub use middleware::handle::RateLimitHandle;
pub use middleware::hooks::{OnRefusal, Refused, RequestView};
pub use middleware::layer::RateLimitLayer;
pub use middleware::mcp::{McpFuture, McpLayer, McpService};
pub use middleware::peek::RuleState;
pub use middleware::service::RateLimit;
pub use middleware::shared::Stats;
pub use rate::{Rate, RateError};
pub use request::extensions::{Cost, Identity, Tier, ToolName};
pub use request::mcp_body::McpBody;
#[cfg(feature = "redis")]
pub use store::fallback::FallbackStore;
pub use store::memory::MemoryStore;
#[cfg(feature = "redis")]
pub use store::redis::{RedisStore, RedisStoreBuilder};
pub use store::{
    Outcome, Outcomes, SettleFuture, Settlement, Store, StoreError, StoreErrorKind, StoreFuture,
    StoreRequest, StoreStats,
};

/// The README's Rust code blocks, compiled and run as doc tests, so the documented
/// examples stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// Guides and the configuration reference, rendered from `docs/` (each page's code blocks
/// are compiled and run as doc tests).
pub mod docs {
    #[doc = include_str!("../docs/configuration.md")]
    pub mod configuration {}
    #[doc = include_str!("../docs/mcp.md")]
    pub mod mcp {}
    #[doc = include_str!("../docs/redis.md")]
    pub mod redis {}
    #[doc = include_str!("../docs/policy.md")]
    pub mod policy {}
    #[doc = include_str!("../docs/behaviour.md")]
    pub mod behaviour {}
    #[doc = include_str!("../docs/cost.md")]
    pub mod cost {}
    #[doc = include_str!("../docs/app.md")]
    pub mod app {}
}
#[cfg(test)]
mod size_probe {
    #[test]
    fn sizes() {
        eprintln!("Outcomes {}", std::mem::size_of::<crate::store::Outcomes>());
        eprintln!(
            "StoreFuture {}",
            std::mem::size_of::<crate::store::StoreFuture>()
        );
        eprintln!(
            "Decision {}",
            std::mem::size_of::<crate::answer::decision::Decision>()
        );
        eprintln!("Plan {}", std::mem::size_of::<crate::policy::plan::Plan>());
        eprintln!(
            "Who {}",
            std::mem::size_of::<crate::request::identity::Who<'static>>()
        );
        eprintln!("Key {}", std::mem::size_of::<crate::key::Key<'static>>());
        eprintln!(
            "StoreRequest {}",
            std::mem::size_of::<crate::store::StoreRequest<'static>>()
        );
        type F = crate::middleware::future::ResponseFuture<
            tower::util::ServiceFn<
                fn(
                    http::Request<()>,
                )
                    -> std::future::Ready<Result<http::Response<()>, std::convert::Infallible>>,
            >,
            (),
        >;
        eprintln!("ResponseFuture {}", std::mem::size_of::<F>());
    }
}
