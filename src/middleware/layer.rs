//! `RateLimitLayer`: a small `Clone` holder of the one `Arc` every service shares.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tower_layer::Layer;

use super::handle::RateLimitHandle;
use super::service::RateLimit;
use super::shared::{Live, Shared, Stats};
use crate::clock::{Clock, SystemClock};
use crate::config::{BackendConfig, BackendKind, RateLimitConfig};
use crate::policy::metrics;
use crate::policy::Policy;
use crate::store::{for_config, Store};

/// Applies a [`RateLimitConfig`] to a service. Cloning the layer, or the services it
/// makes, shares every counter.
///
/// ```
/// use http::{Request, Response, StatusCode};
/// use std::convert::Infallible;
/// use tollgate::{ManualClock, RateLimitConfig, RateLimitLayer};
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let cfg = RateLimitConfig::builder().by_user("1/s").build().unwrap();
/// let svc = ServiceBuilder::new()
///     .layer(RateLimitLayer::new(cfg).with_clock(ManualClock::new()))
///     .service(service_fn(|_req: Request<String>| async {
///         Ok::<_, Infallible>(Response::new(String::from("hello")))
///     }));
///
/// let first = svc.clone().oneshot(Request::new(String::new())).await.unwrap();
/// assert_eq!(first.status(), StatusCode::OK);
/// assert_eq!(first.headers()["x-ratelimit-remaining"], "0");
///
/// let second = svc.clone().oneshot(Request::new(String::new())).await.unwrap();
/// assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
/// assert_eq!(second.headers()["retry-after"], "1");
/// # });
/// ```
#[derive(Clone)]
pub struct RateLimitLayer {
    pub(crate) shared: Arc<Shared>,
}

impl RateLimitLayer {
    /// A layer for `cfg`, with the store its `[backend]` names. Never fails: the config
    /// is valid by construction, and a Redis backend connects lazily (its fallback
    /// answers until Redis does).
    pub fn new(cfg: RateLimitConfig) -> Self {
        let store = for_config(&cfg);
        Self::build(&cfg, store, Some(cfg.backend().clone()))
    }

    /// A layer for `cfg` whose counters live in `store` (its `[backend]` is ignored).
    /// Layers given clones of one store share counters.
    pub fn with_store(cfg: RateLimitConfig, store: impl Store) -> Self {
        Self::build(&cfg, Arc::new(store), None)
    }

    fn build(cfg: &RateLimitConfig, store: Arc<dyn Store>, backend: Option<BackendConfig>) -> Self {
        let kind = match backend.as_ref().map(BackendConfig::kind) {
            Some(BackendKind::Memory) => "memory",
            Some(BackendKind::Redis) => "redis",
            Some(BackendKind::RedisCluster) => "redis_cluster",
            None => "custom",
        };
        metrics::register(&store);
        RateLimitLayer {
            shared: Arc::new(Shared {
                live: Arc::new(Live {
                    policy: ArcSwap::from_pointee(Policy::new(cfg, kind)),
                    backend,
                    kind,
                }),
                insert_decision: true,
                store,
                clock: Arc::new(SystemClock::new()),
                health: Arc::default(),
            }),
        }
    }

    /// A handle that changes this layer's rules while it serves: see [`RateLimitHandle`].
    /// Every clone of the layer, and every service made from it, follows the handle.
    pub fn handle(&self) -> RateLimitHandle {
        RateLimitHandle::new(self.shared.live.clone())
    }

    /// The same layer reading time from `clock` (e.g. a [`ManualClock`](crate::ManualClock)).
    pub fn with_clock(self, clock: impl Clock) -> Self {
        let clock: Arc<dyn Clock> = Arc::new(clock);
        self.modified(|shared| shared.clock = clock)
    }

    fn modified(self, change: impl FnOnce(&mut Shared)) -> Self {
        let mut shared = (*self.shared).clone();
        change(&mut shared);
        RateLimitLayer {
            shared: Arc::new(shared),
        }
    }

    /// Whether responses carry the [`Decision`](crate::Decision) in their extensions
    /// (default: yes). `http::Extensions` boxes every value it holds, so inserting costs
    /// three small heap allocations per response; turn it off when nothing reads it and
    /// the memory path then allocates nothing per allowed request.
    pub fn decision_extension(self, insert: bool) -> Self {
        self.modified(|shared| shared.insert_decision = insert)
    }

    /// Failure counts so far.
    pub fn stats(&self) -> Stats {
        let h = &self.shared.health;
        let store = self.shared.store.stats();
        Stats {
            store_errors: h.store_errors.load(Ordering::Relaxed),
            fail_open: h.fail_open.load(Ordering::Relaxed),
            fail_closed: h.fail_closed.load(Ordering::Relaxed),
            fallback_answers: store.fallback_answers,
            settle_failures: h.settle_failures.load(Ordering::Relaxed) + store.settle_failures,
        }
    }
}

impl fmt::Debug for RateLimitLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.shared;
        let p = s.live.policy.load();
        f.debug_struct("RateLimitLayer")
            .field("by_user", &p.rules.base.user)
            .field("by_tenant", &p.rules.base.tenant)
            .field("tools", &p.rules.tool_names())
            .field("prompts", &p.rules.prompt_names())
            .field("tiers", &p.rules.tier_names().collect::<Vec<_>>())
            .field("algorithm", &p.algorithm)
            .field("mode", &p.mode)
            .field("fail_mode", &p.fail_mode)
            .field("headers", &p.headers)
            .field("mcp_headers", &p.mcp_headers)
            .field("refusal", &p.refusal)
            .field("store", &s.store)
            .field("clock", &s.clock)
            .finish()
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit::new(inner, self.shared.clone())
    }
}
