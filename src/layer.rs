//! `RateLimitLayer`: a small `Clone` holder of the one `Arc` every service shares.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use hashbrown::HashMap;
use tower_layer::Layer;

use crate::config::IdentityConfig;
use crate::identity::Target;
use crate::log_gate::LogGate;
use crate::telemetry::{Decided, Metrics};
use crate::tier::RuleSet;
use crate::{
    Algorithm, BackendConfig, BackendKind, Clock, ConfigError, FailMode, HeaderStyle, Mode, Rate,
    RateLimit, RateLimitConfig, Refusal, RuleKind, Store, SystemClock,
};

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

/// Everything a request needs, shared by every clone of the layer and its services.
#[derive(Clone)]
pub(crate) struct Shared {
    /// The rules and settings a reload replaces (ARCHITECTURE.md, "Hot reload").
    pub(crate) live: Arc<Live>,
    pub(crate) insert_decision: bool,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) health: Arc<Health>,
}

impl Shared {
    pub(crate) fn decorate(&self, policy: &Policy) -> crate::future::Decorate {
        crate::future::Decorate {
            style: policy.headers,
            insert_decision: self.insert_decision,
        }
    }
}

/// The policy in force, swapped whole by [`RateLimitHandle::update`]: a request loads it
/// once (no lock, no shared write) and keeps that version to the end.
pub(crate) struct Live {
    pub(crate) policy: ArcSwap<Policy>,
    /// The `[backend]` the store was built from; `None` for a store given to
    /// [`RateLimitLayer::with_store`] (whose `[backend]` is ignored, on reload too).
    backend: Option<BackendConfig>,
    /// The store's kind, as the latency metric labels it.
    kind: &'static str,
}

/// What a config says about requests: everything but `[backend]`.
pub(crate) struct Policy {
    pub(crate) rules: Rules,
    pub(crate) algorithm: Algorithm,
    pub(crate) mode: Mode,
    pub(crate) fail_mode: FailMode,
    pub(crate) headers: HeaderStyle,
    pub(crate) identity: IdentityConfig,
    /// `[mcp]` is configured: the `Mcp-Method` / `Mcp-Name` headers are read.
    pub(crate) mcp_headers: bool,
    /// How a refused MCP call (one [`McpLayer`](crate::McpLayer) read) is answered.
    pub(crate) refusal: Refusal,
    /// This policy's metric handles (feature `metrics`).
    pub(crate) metrics: Metrics,
}

impl Policy {
    /// `backend`: the store's kind, as the latency metric labels it.
    fn new(cfg: &RateLimitConfig, backend: &'static str) -> Policy {
        let rules = Rules::new(cfg);
        Policy {
            metrics: Metrics::new(&rules, backend),
            rules,
            algorithm: cfg.algorithm(),
            mode: cfg.mode(),
            fail_mode: cfg.fail_mode(),
            headers: cfg.headers(),
            identity: cfg.identity().clone(),
            mcp_headers: cfg.mcp().is_some(),
            refusal: cfg.mcp().map_or(Refusal::ToolError, |m| m.refusal()),
        }
    }

    /// Counts one request in `tollgate_requests_total` (feature `metrics`).
    #[inline(always)]
    pub(crate) fn count(
        &self,
        decided: Decided,
        rule: Option<RuleKind>,
        tool: Option<(Target, u32)>,
    ) {
        self.metrics.count(decided, rule, tool, &self.rules);
    }
}

/// The configured rates, ready for lookup: the base rules, each tier's overrides, the
/// tenants' tiers, every tool any of them names (by number), and the MCP prompts.
pub(crate) struct Rules {
    pub(crate) base: RuleSet,
    tiers: Vec<(Box<str>, RuleSet)>,
    tier_index: HashMap<Box<str>, u32>,
    tenants: HashMap<Box<[u8]>, u32>,
    tools: Names,
    /// `[by_prompt]` (prompts have no tiers and no per-user rule): names and rates.
    prompts: Names,
    prompt_rates: Vec<Rate>,
}

/// Normalised names (tools, or prompts), numbered in the order first named.
#[derive(Default)]
struct Names {
    numbers: HashMap<Box<str>, u32>,
    /// Shared, so a metric label takes a name without copying it.
    names: Vec<Arc<str>>,
}

/// Longest name normalised without allocating.
const NAME_STACK: usize = 64;

impl Names {
    fn add(&mut self, name: &str) {
        if !self.numbers.contains_key(name) {
            self.numbers.insert(name.into(), self.names.len() as u32);
            self.names.push(name.into());
        }
    }

    /// The number of the name matching `raw` (already trimmed) after lower-casing (and
    /// percent-decoding, for a name taken from the path). ASCII names up to 64 bytes are
    /// folded on the stack.
    fn find(&self, raw: &[u8], encoded: bool) -> Option<u32> {
        if self.numbers.is_empty() {
            return None;
        }
        if encoded && raw.contains(&b'%') {
            let mut decoded = Vec::new();
            crate::tool_path::percent_decode_into(raw, &mut decoded);
            return self.find(decoded.trim_ascii(), false);
        }
        if raw.is_ascii() && raw.len() <= NAME_STACK {
            let mut buf = [0u8; NAME_STACK];
            let folded = &mut buf[..raw.len()];
            folded.copy_from_slice(raw);
            folded.make_ascii_lowercase();
            let name = std::str::from_utf8(folded).ok()?;
            return self.numbers.get(name).copied();
        }
        let name = std::str::from_utf8(raw).ok()?.trim().to_lowercase();
        self.numbers.get(name.as_str()).copied()
    }
}

impl Rules {
    fn new(cfg: &RateLimitConfig) -> Rules {
        let mut tools = Names::default();
        cfg.by_tool().for_each(|(n, _)| tools.add(n));
        cfg.by_user_tool().for_each(|(n, _)| tools.add(n));
        for (_, tier) in cfg.tiers() {
            tier.by_tool().for_each(|(n, _)| tools.add(n));
            tier.by_user_tool().for_each(|(n, _)| tools.add(n));
        }
        let table = |rates: &mut dyn Iterator<Item = (&str, Rate)>| {
            let mut out = vec![None; tools.names.len()];
            for (name, rate) in rates {
                out[tools.numbers[name] as usize] = Some(rate);
            }
            out
        };
        let base = RuleSet {
            user: cfg.by_user(),
            tenant: cfg.by_tenant(),
            tools: table(&mut cfg.by_tool()),
            user_tools: table(&mut cfg.by_user_tool()),
        };
        let tiers: Vec<(Box<str>, RuleSet)> = cfg
            .tiers()
            .map(|(name, tier)| {
                let set = RuleSet {
                    user: tier.by_user(),
                    tenant: tier.by_tenant(),
                    tools: table(&mut tier.by_tool()),
                    user_tools: table(&mut tier.by_user_tool()),
                };
                (name.into(), set)
            })
            .collect();
        let tier_index: HashMap<Box<str>, u32> = tiers
            .iter()
            .enumerate()
            .map(|(i, (name, _))| (name.clone(), i as u32))
            .collect();
        let tenants = cfg
            .tenants()
            .map(|(tenant, tier)| (tenant.as_bytes().into(), tier_index[tier]))
            .collect();
        let mut prompts = Names::default();
        let mut prompt_rates = Vec::new();
        for (name, rate) in cfg.by_prompt() {
            prompts.add(name);
            prompt_rates.push(rate);
        }
        Rules {
            base,
            tiers,
            tier_index,
            tenants,
            tools,
            prompts,
            prompt_rates,
        }
    }

    /// The number of the configured tool matching `raw` (trimmed; `encoded` when taken
    /// from the path).
    pub(crate) fn tool(&self, raw: &[u8], encoded: bool) -> Option<u32> {
        self.tools.find(raw, encoded)
    }

    /// The normalised name of tool number `index`.
    pub(crate) fn tool_name(&self, index: u32) -> &str {
        &self.tools.names[index as usize]
    }

    /// How many tools the rules name.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn tool_count(&self) -> usize {
        self.tools.names.len()
    }

    /// How many prompts `[by_prompt]` names.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn prompt_count(&self) -> usize {
        self.prompts.names.len()
    }

    /// The name of a configured tool (`Target::Tool`) or prompt, shared.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn named(&self, target: Target, index: u32) -> &Arc<str> {
        match target {
            Target::Tool => &self.tools.names[index as usize],
            Target::Prompt => &self.prompts.names[index as usize],
        }
    }

    /// The configured prompt matching `raw` (trimmed): its number and rate.
    pub(crate) fn prompt(&self, raw: &[u8]) -> Option<(u32, Rate)> {
        let i = self.prompts.find(raw, false)?;
        Some((i, self.prompt_rates[i as usize]))
    }

    /// The normalised name of prompt number `index`.
    pub(crate) fn prompt_name(&self, index: u32) -> &str {
        &self.prompts.names[index as usize]
    }

    /// The tier named `name`, if configured.
    pub(crate) fn tier_named(&self, name: &str) -> Option<u32> {
        if self.tier_index.is_empty() {
            return None;
        }
        self.tier_index.get(name).copied()
    }

    /// The tier `[tenants]` puts `tenant` in.
    pub(crate) fn tenant_tier(&self, tenant: &[u8]) -> Option<u32> {
        if self.tenants.is_empty() {
            return None;
        }
        self.tenants.get(tenant).copied()
    }

    /// A tier's name and rules.
    pub(crate) fn tier(&self, index: u32) -> (&str, &RuleSet) {
        let (name, set) = &self.tiers[index as usize];
        (name, set)
    }
}

/// Failure counters, and the gate that keeps failure logs to one line a second.
#[derive(Debug, Default)]
pub(crate) struct Health {
    pub(crate) store_errors: AtomicU64,
    pub(crate) fail_open: AtomicU64,
    pub(crate) fail_closed: AtomicU64,
    /// Store failures.
    pub(crate) log: LogGate,
    /// Refused identities (400s), and identities counted as anonymous in permissive mode.
    pub(crate) identity_log: LogGate,
    /// Refusals (429s): a client decides how often they happen.
    pub(crate) refusal_log: LogGate,
    /// Would-be refusals in permissive mode.
    pub(crate) permissive_log: LogGate,
    /// `anonymous = "by_ip"` requests without a peer address.
    pub(crate) peer_log: LogGate,
    /// `Tier` extensions naming no configured tier.
    pub(crate) tier_log: LogGate,
}

/// Failure counts since the layer was built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Store calls that failed (error, timeout or panic).
    pub store_errors: u64,
    /// Requests forwarded without a decision because the store failed (fail_mode open).
    pub fail_open: u64,
    /// Requests answered 503 because the store failed (fail_mode closed).
    pub fail_closed: u64,
    /// Requests a fallback store answered while Redis was failing (limits then held per
    /// instance).
    pub fallback_answers: u64,
}

impl RateLimitLayer {
    /// A layer for `cfg`, with the store its `[backend]` names. Never fails: the config
    /// is valid by construction, and a Redis backend connects lazily (its fallback
    /// answers until Redis does).
    pub fn new(cfg: RateLimitConfig) -> Self {
        let store = crate::store::for_config(&cfg);
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
        crate::telemetry::register(&store);
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
        RateLimitHandle {
            live: self.shared.live.clone(),
        }
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
        Stats {
            store_errors: h.store_errors.load(Ordering::Relaxed),
            fail_open: h.fail_open.load(Ordering::Relaxed),
            fail_closed: h.fail_closed.load(Ordering::Relaxed),
            fallback_answers: self.shared.store.stats().fallback_answers,
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
            .field("tools", &p.rules.tools.names)
            .field("prompts", &p.rules.prompts.names)
            .field(
                "tiers",
                &p.rules.tiers.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
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

/// Changes a [`RateLimitLayer`]'s rules while it serves, from [`RateLimitLayer::handle`].
/// Clones share the layer; the handle is `Send + Sync`.
///
/// [`update`](RateLimitHandle::update) swaps the whole policy at once: a request already
/// under way finishes on the rules it started with, and the next request sees the new
/// ones. Counters live in the store, which a reload keeps, so a rule whose counter key is
/// unchanged keeps counting where it was:
///
/// - a changed **count** keeps the memory store's counter (`30/m` → `60/m`: the 30 already
///   used stay used; a token bucket keeps how full it is as a share of its burst). In
///   Redis the count is part of the key name (ARCHITECTURE.md, behaviour contract item
///   15), so a changed count starts a fresh counter there.
/// - a changed **period** or **algorithm**, a rule moved into or out of a tier, or a
///   renamed tool starts a fresh counter;
/// - every other setting (`mode`, `fail_mode`, `headers`, `[identity]`, `[mcp]`,
///   `[tenants]`) applies from the next request, except `[mcp] max_body`, which
///   [`McpLayer`](crate::McpLayer) reads when it is built.
///
/// `[backend]` cannot change: the store is built once, so `update` refuses a config whose
/// `[backend]` differs (naming each changed field) and changes nothing; that needs a
/// restart. A layer built by [`RateLimitLayer::with_store`] ignores `[backend]`, on reload
/// too.
///
/// ```
/// use http::{Request, StatusCode};
/// use std::convert::Infallible;
/// use tollgate::{ManualClock, RateLimitConfig, RateLimitLayer};
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let layer = RateLimitLayer::new(RateLimitConfig::builder().by_user("1/m").build().unwrap())
///     .with_clock(ManualClock::new());
/// let handle = layer.handle();
/// let svc = ServiceBuilder::new()
///     .layer(layer)
///     .service(service_fn(|_req: Request<()>| async {
///         Ok::<_, Infallible>(http::Response::new(()))
///     }));
/// let call = || svc.clone().oneshot(Request::new(()));
/// assert_eq!(call().await.unwrap().status(), StatusCode::OK);
/// assert_eq!(call().await.unwrap().status(), StatusCode::TOO_MANY_REQUESTS);
///
/// // Two a minute from now on; the request already counted stays counted.
/// handle.update(RateLimitConfig::builder().by_user("2/m").build().unwrap()).unwrap();
/// assert_eq!(call().await.unwrap().status(), StatusCode::OK);
/// assert_eq!(call().await.unwrap().status(), StatusCode::TOO_MANY_REQUESTS);
///
/// // A new [backend] needs a restart: refused, and nothing changes.
/// let redis = RateLimitConfig::from_toml_str(
///     "by_user = \"100/m\"\n[backend]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379\"",
/// )
/// .unwrap();
/// let refused = handle.update(redis).unwrap_err();
/// assert_eq!(refused.problems().next().unwrap().0, "backend.kind");
/// assert_eq!(call().await.unwrap().status(), StatusCode::TOO_MANY_REQUESTS);
/// # });
/// ```
#[derive(Clone)]
pub struct RateLimitHandle {
    live: Arc<Live>,
}

impl RateLimitHandle {
    /// Applies `cfg` to the layer from the next request on (see the type's docs for what
    /// counters survive). Refuses, changing nothing, a config whose `[backend]` differs
    /// from the one the layer was built with: each changed field is named.
    pub fn update(&self, cfg: RateLimitConfig) -> Result<(), ConfigError> {
        if let Some(backend) = &self.live.backend {
            let changed = backend.changed_fields(cfg.backend());
            if !changed.is_empty() {
                let mut err = ConfigError::default();
                for field in changed {
                    err.push(
                        field,
                        "changed, but the store is built once: a new [backend] needs a \
                         restart (nothing was applied)",
                    );
                }
                return Err(err);
            }
        }
        let policy = Policy::new(&cfg, self.live.kind);
        self.live.policy.store(Arc::new(policy));
        Ok(())
    }
}

impl fmt::Debug for RateLimitHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitHandle").finish_non_exhaustive()
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit::new(inner, self.shared.clone())
    }
}
