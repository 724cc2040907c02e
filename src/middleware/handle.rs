//! `RateLimitHandle`: changes a layer's rules while it serves (ARCHITECTURE.md, "Hot
//! reload").

use std::fmt;
use std::sync::Arc;

use super::peek::{self, RuleState};
use super::shared::Shared;
use crate::config::{ConfigError, RateLimitConfig};
use crate::policy::Policy;
use crate::request::extensions::Identity;
use crate::store::StoreError;

/// Changes a [`RateLimitLayer`](crate::RateLimitLayer)'s rules while it serves, from
/// [`RateLimitLayer::handle`](crate::RateLimitLayer::handle).
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
/// restart. A layer built by [`RateLimitLayer::with_store`](crate::RateLimitLayer::with_store) ignores `[backend]`, on reload
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
    shared: Arc<Shared>,
}

impl RateLimitHandle {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        RateLimitHandle { shared }
    }

    /// What each rule that applies to `identity` calling `tool` would say of a call now —
    /// its rate, the units left, how long until it is whole again — read without counting
    /// anything (a check of cost 0, which changes no counter and inserts no key), from
    /// the store every instance shares. Rules in rule order; none when no rule applies.
    /// `tool` is a tool (not an MCP prompt); the tier is the one `[tenants]` gives the
    /// identity's tenant (not a `Tier` extension's); an anonymous caller counted by address
    /// cannot be named. Peek and reset read the clock the layer had when the handle was
    /// taken: take it after [`with_clock`](crate::RateLimitLayer::with_clock).
    ///
    /// ```
    /// use tollgate::{Identity, RateLimitConfig, RateLimitLayer, RuleKind};
    ///
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let cfg = RateLimitConfig::from_toml_str("by_user = \"30/m\"\n[by_tool]\nsearch = \"10/m\"").unwrap();
    /// let layer = RateLimitLayer::new(cfg);
    /// let handle = layer.handle();
    /// let ann = Identity::user("ann");
    /// let rules = handle.peek(&ann, Some("search")).await.unwrap();
    /// assert_eq!(rules.len(), 2);
    /// assert_eq!((rules[1].rule, rules[1].remaining), (RuleKind::Tool, 10));
    /// // Clears ann's counters and the search tool's (every caller's) alike.
    /// handle.reset(&ann, Some("search")).await.unwrap();
    /// # });
    /// ```
    pub async fn peek(
        &self,
        identity: &Identity,
        tool: Option<&str>,
    ) -> Result<Vec<RuleState>, StoreError> {
        let policy = self.shared.live.policy.load_full();
        peek::peek(&self.shared, &policy, identity, tool).await
    }

    /// Forgets what every rule that applies to `identity` calling `tool` has counted, so
    /// the next such call starts afresh: the user's counter, the tenant's (every user of
    /// it), the tool's (every caller), the user × tool one. In memory and Redis (every
    /// slot of a cluster); the deny cache of this instance forgets the keys at once, and
    /// another instance's refuses them for at most one second more. A store that cannot
    /// reset answers [`StoreErrorKind::Unsupported`](crate::StoreErrorKind::Unsupported).
    pub async fn reset(&self, identity: &Identity, tool: Option<&str>) -> Result<(), StoreError> {
        let policy = self.shared.live.policy.load_full();
        peek::reset(&self.shared, &policy, identity, tool).await
    }

    /// Applies `cfg` to the layer from the next request on (see the type's docs for what
    /// counters survive). Refuses, changing nothing, a config whose `[backend]` differs
    /// from the one the layer was built with: each changed field is named.
    pub fn update(&self, cfg: RateLimitConfig) -> Result<(), ConfigError> {
        if let Some(backend) = &self.shared.live.backend {
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
        let policy = Policy::new(&cfg, self.shared.live.kind);
        self.shared.live.policy.store(Arc::new(policy));
        Ok(())
    }
}

impl fmt::Debug for RateLimitHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitHandle").finish_non_exhaustive()
    }
}
