//! The tower surface: [`RateLimitLayer`](layer::RateLimitLayer) and its handle, the
//! [`RateLimit`](service::RateLimit) service and its response future, `McpLayer`, and
//! what they share. One request's path: `service` reads it and asks the store, `act` turns
//! the answer into a response or a forward, `future` finishes what awaits (ARCHITECTURE.md,
//! "One request").

pub(crate) mod act;
pub(crate) mod charge;
pub(crate) mod future;
pub(crate) mod handle;
pub(crate) mod hooks;
pub(crate) mod layer;
pub(crate) mod mcp;
pub(crate) mod peek;
pub(crate) mod service;
pub(crate) mod shared;
pub(crate) mod stack;
