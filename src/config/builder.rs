//! `RateLimitConfigBuilder`: a config in code, validated like a file at `build`.

use std::collections::BTreeMap;
use std::time::Duration;

use super::error::ConfigError;
use super::model::{
    Anonymous, BackendKind, Choice, FailMode, Fallback, HeaderStyle, Mode, RateLimitConfig, Refusal,
};
use super::schema::{Loose, Raw, RawCost, RawMcp, RawTier, Scalar};
use crate::algorithm::Algorithm;
use crate::rate::Rate;

impl RateLimitConfig {
    /// A builder that starts from the defaults (no limits).
    pub fn builder() -> RateLimitConfigBuilder {
        RateLimitConfigBuilder::default()
    }
}

/// A rate given to the builder: a [`Rate`] or its text (`"30/m"`), checked at `build`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateSpec(Scalar);

impl From<Rate> for RateSpec {
    fn from(rate: Rate) -> Self {
        RateSpec(Scalar::Text(rate.to_string()))
    }
}
impl From<&str> for RateSpec {
    fn from(text: &str) -> Self {
        RateSpec(Scalar::Text(text.to_owned()))
    }
}
impl From<String> for RateSpec {
    fn from(text: String) -> Self {
        RateSpec(Scalar::Text(text))
    }
}

/// Builds a [`RateLimitConfig`] in code; [`build`](Self::build) validates like a file.
///
/// ```
/// use tollgate::{Algorithm, RateLimitConfig, Rate};
/// let cfg = RateLimitConfig::builder()
///     .by_user("30/m")
///     .by_tenant(Rate::per_minute(3000))
///     .tool("search", "10/m")
///     .algorithm(Algorithm::SlidingWindow)
///     .build()
///     .unwrap();
/// assert_eq!(cfg.by_tenant(), Some(Rate::per_minute(3000)));
/// ```
#[derive(Clone, Debug, Default)]
pub struct RateLimitConfigBuilder {
    raw: Raw,
}

impl RateLimitConfigBuilder {
    /// Limit each user to `rate`.
    pub fn by_user(mut self, rate: impl Into<RateSpec>) -> Self {
        self.raw.by_user = Some(rate.into().0);
        self
    }
    /// Limit each tenant to `rate`.
    pub fn by_tenant(mut self, rate: impl Into<RateSpec>) -> Self {
        self.raw.by_tenant = Some(rate.into().0);
        self
    }
    /// Limit the tool `name` (shared by all callers) to `rate`.
    pub fn tool(mut self, name: impl Into<String>, rate: impl Into<RateSpec>) -> Self {
        self.raw
            .by_tool
            .get_or_insert_with(Vec::new)
            .push((name.into(), rate.into().0));
        self
    }
    /// Limit the MCP prompt `name` (`prompts/get`, shared by all callers) to `rate`.
    pub fn prompt(mut self, name: impl Into<String>, rate: impl Into<RateSpec>) -> Self {
        self.raw
            .by_prompt
            .get_or_insert_with(Vec::new)
            .push((name.into(), rate.into().0));
        self
    }
    /// Give each user their own counter of `rate` for the tool `name` (`by_user_tool`).
    pub fn user_tool(mut self, name: impl Into<String>, rate: impl Into<RateSpec>) -> Self {
        self.raw
            .by_user_tool
            .get_or_insert_with(Vec::new)
            .push((name.into(), rate.into().0));
        self
    }
    /// Turn on `[cost]`: rules are budgets of units, and each forwarded request carries a
    /// [`Charge`](crate::Charge) to settle its real cost with.
    pub fn costs(mut self) -> Self {
        self.raw.cost.get_or_insert_with(RawCost::default);
        self
    }
    /// A call of the tool `name` costs `units` (`[cost.tools]`; turns on `[cost]`).
    pub fn tool_cost(mut self, name: impl Into<String>, units: u64) -> Self {
        self.raw
            .cost
            .get_or_insert_with(RawCost::default)
            .tools
            .get_or_insert_with(Vec::new)
            .push((name.into(), Scalar::Int(i128::from(units))));
        self
    }
    /// A `prompts/get` of the MCP prompt `name` costs `units` (`[cost.prompts]`; turns on
    /// `[cost]`).
    pub fn prompt_cost(mut self, name: impl Into<String>, units: u64) -> Self {
        self.raw
            .cost
            .get_or_insert_with(RawCost::default)
            .prompts
            .get_or_insert_with(Vec::new)
            .push((name.into(), Scalar::Int(i128::from(units))));
        self
    }
    /// Read a call's cost from this header (`[identity] cost_header`).
    pub fn cost_header(mut self, name: impl Into<String>) -> Self {
        self.raw.identity.cost_header = Some(Scalar::Text(name.into()));
        self
    }
    /// Turn on `[mcp]` (its defaults unless set below).
    pub fn mcp(mut self) -> Self {
        self.raw.mcp.get_or_insert_with(RawMcp::default);
        self
    }
    /// `[mcp] refusal`: how refused MCP calls are answered (turns on `[mcp]`).
    pub fn mcp_refusal(mut self, refusal: Refusal) -> Self {
        self.raw.mcp.get_or_insert_with(RawMcp::default).refusal = Some(choice(refusal));
        self
    }
    /// `[mcp] max_body` in bytes (turns on `[mcp]`).
    pub fn mcp_max_body(mut self, bytes: usize) -> Self {
        self.raw.mcp.get_or_insert_with(RawMcp::default).max_body =
            Some(Scalar::Int(bytes as i128));
        self
    }
    /// `tier`'s per-user rate (`[tiers.<tier>] by_user`).
    pub fn tier_by_user(mut self, tier: impl Into<String>, rate: impl Into<RateSpec>) -> Self {
        self.raw_tier(tier.into()).by_user = Some(rate.into().0);
        self
    }
    /// `tier`'s per-tenant rate (`[tiers.<tier>] by_tenant`).
    pub fn tier_by_tenant(mut self, tier: impl Into<String>, rate: impl Into<RateSpec>) -> Self {
        self.raw_tier(tier.into()).by_tenant = Some(rate.into().0);
        self
    }
    /// `tier`'s rate for the tool `name` (`[tiers.<tier>.by_tool]`).
    pub fn tier_tool(
        mut self,
        tier: impl Into<String>,
        name: impl Into<String>,
        rate: impl Into<RateSpec>,
    ) -> Self {
        self.raw_tier(tier.into())
            .by_tool
            .get_or_insert_with(Vec::new)
            .push((name.into(), rate.into().0));
        self
    }
    /// `tier`'s per-user rate for the tool `name` (`[tiers.<tier>.by_user_tool]`).
    pub fn tier_user_tool(
        mut self,
        tier: impl Into<String>,
        name: impl Into<String>,
        rate: impl Into<RateSpec>,
    ) -> Self {
        self.raw_tier(tier.into())
            .by_user_tool
            .get_or_insert_with(Vec::new)
            .push((name.into(), rate.into().0));
        self
    }
    /// Put `tenant` in `tier` (`[tenants]`).
    pub fn tenant_tier(mut self, tenant: impl Into<String>, tier: impl Into<String>) -> Self {
        self.raw
            .tenants
            .get_or_insert_with(BTreeMap::new)
            .insert(tenant.into(), Scalar::Text(tier.into()));
        self
    }
    fn raw_tier(&mut self, tier: String) -> &mut RawTier {
        self.raw
            .tiers
            .get_or_insert_with(BTreeMap::new)
            .entry(tier)
            .or_default()
    }
    /// How requests without a user are counted.
    pub fn anonymous(mut self, anonymous: Anonymous) -> Self {
        self.raw.anonymous = Some(choice(anonymous));
        self
    }
    /// Take the tool from the request path, e.g. `"/tools/{name}"` (checked at `build`).
    pub fn tool_path(mut self, pattern: impl Into<String>) -> Self {
        self.raw.identity.tool_path = Some(Scalar::Text(pattern.into()));
        self
    }
    /// Believe `X-Forwarded-For` / `Forwarded` from peers in these networks (`"10.0.0.0/8"`,
    /// `"::1"`; checked at `build`).
    pub fn trusted_proxies<I, N>(mut self, networks: I) -> Self
    where
        I: IntoIterator<Item = N>,
        N: Into<String>,
    {
        self.raw.identity.trusted_proxies = Some(Loose::Ok(
            networks
                .into_iter()
                .map(|n| Scalar::Text(n.into()))
                .collect(),
        ));
        self
    }
    /// Group IPv6 clients by this prefix length (32 to 128; default 64).
    pub fn ipv6_prefix(mut self, prefix_len: u8) -> Self {
        self.raw.identity.ipv6_prefix = Some(Scalar::Int(i128::from(prefix_len)));
        self
    }
    /// The counting algorithm.
    pub fn algorithm(mut self, algorithm: Algorithm) -> Self {
        self.raw.algorithm = Some(choice(algorithm));
        self
    }
    /// Enforce, permissive or disabled.
    pub fn mode(mut self, mode: Mode) -> Self {
        self.raw.mode = Some(choice(mode));
        self
    }
    /// What happens when the store fails and no fallback answers.
    pub fn fail_mode(mut self, fail_mode: FailMode) -> Self {
        self.raw.fail_mode = Some(choice(fail_mode));
        self
    }
    /// Which rate headers to write.
    pub fn headers(mut self, style: HeaderStyle) -> Self {
        self.raw.headers = Some(choice(style));
        self
    }
    /// Read the user id from this header.
    pub fn user_header(mut self, name: impl Into<String>) -> Self {
        self.raw.identity.user_header = Some(Scalar::Text(name.into()));
        self
    }
    /// Read the tenant id from this header.
    pub fn tenant_header(mut self, name: impl Into<String>) -> Self {
        self.raw.identity.tenant_header = Some(Scalar::Text(name.into()));
        self
    }
    /// Read the tool name from this header.
    pub fn tool_header(mut self, name: impl Into<String>) -> Self {
        self.raw.identity.tool_header = Some(Scalar::Text(name.into()));
        self
    }
    /// Keep counters in Redis at `url`.
    pub fn redis(mut self, url: impl Into<String>) -> Self {
        self.raw.backend.kind = Some(choice(BackendKind::Redis));
        self.raw.backend.url = Some(Scalar::Text(url.into()));
        self
    }
    /// Keep counters in the Redis Cluster that `seeds` (URLs of some of its nodes)
    /// belong to.
    pub fn redis_cluster<I, U>(mut self, seeds: I) -> Self
    where
        I: IntoIterator<Item = U>,
        U: Into<String>,
    {
        self.raw.backend.kind = Some(choice(BackendKind::RedisCluster));
        self.raw.backend.urls = Some(Loose::Ok(
            seeds.into_iter().map(|u| Scalar::Text(u.into())).collect(),
        ));
        self
    }
    /// Trust the certificate authorities in this PEM file for `rediss://` (read and
    /// checked at `build`).
    pub fn tls_ca(mut self, path: impl Into<String>) -> Self {
        self.raw.backend.tls_ca = Some(Scalar::Text(path.into()));
        self
    }
    /// Skip certificate checks on `rediss://` (a throwaway test server only; logged).
    pub fn tls_insecure(mut self, on: bool) -> Self {
        self.raw.backend.tls_insecure = Some(Loose::Ok(on));
        self
    }
    /// Prefix of every Redis key.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.raw.backend.key_prefix = Some(Scalar::Text(prefix.into()));
        self
    }
    /// The most sockets opened to one Redis server (1 to 1024; at most 4 are opened).
    pub fn pool_size(mut self, size: u32) -> Self {
        self.raw.backend.pool_size = Some(Scalar::Int(i128::from(size)));
        self
    }
    /// Longest a Redis call may take.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.raw.backend.timeout_ms = Some(Scalar::Int(timeout.as_millis() as i128));
        self
    }
    /// What answers while Redis fails.
    pub fn fallback(mut self, fallback: Fallback) -> Self {
        self.raw.backend.fallback = Some(choice(fallback));
        self
    }
    /// Most keys the memory store holds.
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        self.raw.backend.max_keys = Some(Scalar::Int(max_keys as i128));
        self
    }
    /// Refused keys the Redis store remembers locally (0 turns the deny cache off).
    pub fn deny_cache(mut self, keys: usize) -> Self {
        self.raw.backend.deny_cache = Some(Scalar::Int(keys as i128));
        self
    }
    /// Most requests one Redis script call decides (1 turns coalescing off).
    pub fn max_batch(mut self, requests: usize) -> Self {
        self.raw.backend.max_batch = Some(Scalar::Int(requests as i128));
        self
    }
    /// Validates everything, reporting every problem.
    pub fn build(self) -> Result<RateLimitConfig, ConfigError> {
        RateLimitConfig::try_from(self.raw)
    }
}

/// A choice as the raw text a config file would hold.
fn choice<T: Choice>(value: T) -> Scalar {
    Scalar::Text(value.name().into())
}
