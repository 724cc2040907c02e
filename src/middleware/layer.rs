//! `RateLimitLayer`: a small `Clone` holder of the one `Arc` every service shares.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tower_layer::Layer;

use super::handle::RateLimitHandle;
use super::hooks::{OnRefusal, RequestView};
use super::service::RateLimit;
use super::shared::{Live, RegistryId, Shared, Stats};
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
            shared: Shared::registered(Shared {
                live: Arc::new(Live {
                    policy: ArcSwap::from_pointee(Policy::new(cfg, kind)),
                    backend,
                    kind,
                }),
                insert_decision: true,
                request_decision: false,
                exempt: None,
                on_refusal: None,
                store,
                clock: Arc::new(SystemClock::new()),
                health: Arc::default(),
                id: RegistryId::default(),
            }),
        }
    }

    /// A handle that changes this layer's rules while it serves: see [`RateLimitHandle`].
    /// Every clone of the layer, and every service made from it, follows the handle.
    pub fn handle(&self) -> RateLimitHandle {
        RateLimitHandle::new(self.shared.clone())
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
            shared: Shared::registered(shared),
        }
    }

    /// Whether responses carry the [`Decision`](crate::Decision) in their extensions
    /// (default: yes). `http::Extensions` boxes every value it holds, so inserting costs
    /// three small heap allocations per response; turn it off when nothing reads it and
    /// the memory path then allocates nothing per allowed request.
    pub fn decision_extension(self, insert: bool) -> Self {
        self.modified(|shared| shared.insert_decision = insert)
    }

    /// Whether a forwarded request carries its [`Decision`](crate::Decision) in its
    /// extensions, for the handler (default: no). The handler then reads what tollgate
    /// decided for it (`Option<Extension<Decision>>` in axum): limit, remaining, when the
    /// speaking rule resets, the cost charged. Like the response's, it costs a few small
    /// heap allocations per request, so it is off unless asked for.
    ///
    /// ```
    /// use axum::{extract::Extension, routing::get, Router};
    /// use tollgate::{Decision, RateLimitConfig, RateLimitLayer};
    ///
    /// async fn search(decision: Option<Extension<Decision>>) -> String {
    ///     match decision.and_then(|Extension(d)| d.remaining()) {
    ///         Some(left) => format!("found; {left} searches left"),
    ///         None => "found".to_owned(),
    ///     }
    /// }
    /// let cfg = RateLimitConfig::from_toml_str(r#"by_user = "30/m""#).unwrap();
    /// let app: Router = Router::new()
    ///     .route("/search", get(search))
    ///     .layer(RateLimitLayer::new(cfg).decision_in_request(true));
    /// ```
    pub fn decision_in_request(self, insert: bool) -> Self {
        self.modified(|shared| shared.request_decision = insert)
    }

    /// Forwards the requests `exempt` picks untouched: nothing counted, no rate headers,
    /// no `Decision`, whatever the rules say (a health check, a metrics scrape). Called
    /// once per request before anything else; a second `exempt` adds to the first (a
    /// request either picks is exempt).
    ///
    /// ```
    /// use tollgate::{RateLimitConfig, RateLimitLayer};
    ///
    /// let cfg = RateLimitConfig::from_toml_str(r#"by_user = "30/m""#).unwrap();
    /// let layer = RateLimitLayer::new(cfg)
    ///     .exempt(|req| matches!(req.uri().path(), "/healthz" | "/metrics"));
    /// ```
    pub fn exempt(self, exempt: impl Fn(&RequestView<'_>) -> bool + Send + Sync + 'static) -> Self {
        self.modified(|shared| {
            shared.exempt = Some(match shared.exempt.take() {
                None => Arc::new(exempt),
                Some(first) => Arc::new(move |req: &RequestView<'_>| first(req) || exempt(req)),
            });
        })
    }

    /// Builds the response of every refusal (a `429`, and a `503` when failing closed)
    /// with `hook` instead of tollgate's problem+json: see [`OnRefusal`].
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http::{header, Response};
    /// use tollgate::{RateLimitConfig, RateLimitLayer, Refused};
    ///
    /// let cfg = RateLimitConfig::from_toml_str(r#"by_user = "30/m""#).unwrap();
    /// let layer = RateLimitLayer::new(cfg).on_refusal(|refusal: &Refused<'_>| {
    ///     let wait = refusal.decision().and_then(|d| d.retry_after()).map_or(1, |w| w.as_secs());
    ///     let mut resp = Response::new(Bytes::from(format!(
    ///         "<p>Slow down: try again in {wait} s.</p>"
    ///     )));
    ///     *resp.status_mut() = refusal.status();
    ///     resp.headers_mut()
    ///         .insert(header::CONTENT_TYPE, "text/html".parse().unwrap());
    ///     resp // tollgate adds Retry-After and the rate headers
    /// });
    /// ```
    pub fn on_refusal(self, hook: impl OnRefusal) -> Self {
        let hook: Arc<dyn OnRefusal> = Arc::new(hook);
        self.modified(|shared| shared.on_refusal = Some(hook))
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
