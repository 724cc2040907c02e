//! `RateLimitConfig`: what to limit and how, validated as a whole at start-up.
//!
//! A config that exists is valid: deserializing, [`RateLimitConfig::from_toml_str`] and
//! [`RateLimitConfigBuilder::build`] all run the same validation and report every problem
//! at once in a [`ConfigError`], one line per problem, each naming its field.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use http::HeaderName;
use serde::de::{self, IgnoredAny};
use serde::Deserialize;

use crate::tier::TierConfig;
use crate::{Algorithm, Rate};

/// What happens to a request over its limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Mode {
    /// Over the limit → `429 Too Many Requests`; the inner service is not called.
    #[default]
    Enforce,
    /// Count and decide as `Enforce`, but never reject: a would-be rejection is logged at
    /// `warn` (rule and tool only) and the call goes through with its rate headers.
    Permissive,
    /// Pass every request straight through: count nothing, add nothing.
    Disabled,
}

/// What happens when the store fails and no fallback answers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailMode {
    /// Forward the request without rate headers (the service keeps serving).
    #[default]
    Open,
    /// Answer `503` with code `BACKEND_UNAVAILABLE` and `Retry-After: 1`.
    Closed,
}

/// Which rate headers responses carry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HeaderStyle {
    /// `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset` (epoch seconds).
    #[default]
    Legacy,
    /// `RateLimit-Policy` and `RateLimit` from draft-ietf-httpapi-ratelimit-headers.
    Ietf,
    /// Both sets.
    Both,
    /// No rate headers (a 429 still carries `Retry-After`).
    None,
}

/// Where counters live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BackendKind {
    /// In this process: [`MemoryStore`](crate::MemoryStore).
    #[default]
    Memory,
    /// In one Redis server (or a primary with replicas behind one address), shared by
    /// every instance (feature `redis`).
    Redis,
    /// In a Redis Cluster reached through `urls` (seed nodes), shared by every instance
    /// (feature `redis`).
    RedisCluster,
}

/// What answers while Redis is failing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Fallback {
    /// A local memory store with the same rules (limits then hold per instance).
    #[default]
    Memory,
    /// Nothing: [`FailMode`] decides.
    None,
}

/// How requests without a user are counted (`anonymous = ...`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Anonymous {
    /// One `anonymous` bucket shared by every request without a user.
    #[default]
    Shared,
    /// One bucket per client address (IPv6 grouped by `[identity] ipv6_prefix`), read
    /// from the connection and, through `[identity] trusted_proxies`, from
    /// `X-Forwarded-For` or `Forwarded`. Without a peer address a request falls back to
    /// the shared bucket (logged, rate-limited).
    ByIp,
}

/// `[identity]`: where identities come from besides the [`Identity`](crate::Identity) and
/// [`ToolName`](crate::ToolName) extensions. Headers are read only when named; trust them
/// only behind a proxy that sets them and strips them from clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityConfig {
    user_header: Option<HeaderName>,
    tenant_header: Option<HeaderName>,
    tool_header: Option<HeaderName>,
    tool_path: Option<crate::tool_path::ToolPath>,
    trusted_proxies: Vec<ipnet::IpNet>,
    ipv6_prefix: u8,
    pub(crate) anonymous: Anonymous,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            user_header: None,
            tenant_header: None,
            tool_header: None,
            tool_path: None,
            trusted_proxies: Vec::new(),
            ipv6_prefix: 64,
            anonymous: Anonymous::Shared,
        }
    }
}

impl IdentityConfig {
    /// Header carrying the user id.
    pub fn user_header(&self) -> Option<&HeaderName> {
        self.user_header.as_ref()
    }
    /// Header carrying the tenant id.
    pub fn tenant_header(&self) -> Option<&HeaderName> {
        self.tenant_header.as_ref()
    }
    /// Header carrying the tool name.
    pub fn tool_header(&self) -> Option<&HeaderName> {
        self.tool_header.as_ref()
    }
    /// The path pattern the tool name is taken from (`"/tools/{name}"`), when a request
    /// has no [`ToolName`](crate::ToolName) extension.
    pub fn tool_path(&self) -> Option<&str> {
        self.tool_path.as_ref().map(|p| p.as_str())
    }
    pub(crate) fn tool_path_matcher(&self) -> Option<&crate::tool_path::ToolPath> {
        self.tool_path.as_ref()
    }
    /// Networks of the proxies whose `X-Forwarded-For` / `Forwarded` entries are
    /// believed, as (network address, prefix length).
    pub fn trusted_proxies(&self) -> impl Iterator<Item = (IpAddr, u8)> + '_ {
        self.trusted_proxies
            .iter()
            .map(|net| (net.network(), net.prefix_len()))
    }
    pub(crate) fn trusted_nets(&self) -> &[ipnet::IpNet] {
        &self.trusted_proxies
    }
    /// The prefix length IPv6 clients are grouped by with `anonymous = "by_ip"` (default
    /// 64).
    pub fn ipv6_prefix(&self) -> u8 {
        self.ipv6_prefix
    }
}

/// How a refused MCP call is answered (`[mcp] refusal`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Refusal {
    /// HTTP 200 with a JSON-RPC result the agent reads: for `tools/call`, a tool result
    /// with `isError: true` and a text saying which tool and when to retry; for other
    /// methods (`prompts/get` has no error result), the `jsonrpc_error` form.
    #[default]
    ToolError,
    /// HTTP 200 with a JSON-RPC error, code `-32029`, whose `data` carries `retry_after`,
    /// `violated` and the tool or prompt.
    JsonRpcError,
    /// The plain `429` problem+json answer, as for any HTTP request.
    Http,
}

/// `[mcp]`: read MCP tool and prompt names from `Mcp-Method` / `Mcp-Name` headers and
/// (through [`McpLayer`](crate::McpLayer)) from JSON-RPC bodies; answer refusals in MCP
/// form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct McpConfig {
    refusal: Refusal,
    max_body: usize,
}

impl Default for McpConfig {
    fn default() -> Self {
        McpConfig {
            refusal: Refusal::ToolError,
            max_body: DEFAULT_MAX_BODY,
        }
    }
}

/// `[mcp] max_body` when not given: 1 MiB.
const DEFAULT_MAX_BODY: usize = 1 << 20;
/// The largest `[mcp] max_body` accepted: 64 MiB.
const LARGEST_MAX_BODY: usize = 64 << 20;

impl McpConfig {
    /// How refusals of MCP calls are answered (default `tool_error`).
    pub fn refusal(&self) -> Refusal {
        self.refusal
    }
    /// The most body bytes [`McpLayer`](crate::McpLayer) reads to find the tool
    /// (default 1 MiB); a larger body is passed on unparsed.
    pub fn max_body(&self) -> usize {
        self.max_body
    }
}

/// `[backend]`: where counters live and how Redis is reached.
#[derive(Clone, PartialEq, Eq)]
pub struct BackendConfig {
    kind: BackendKind,
    url: Option<String>,
    urls: Vec<String>,
    tls_ca: Option<TlsCa>,
    tls_insecure: bool,
    key_prefix: String,
    pool_size: u32,
    timeout: Duration,
    fallback: Fallback,
    max_keys: usize,
    deny_cache: usize,
    max_batch: usize,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            kind: BackendKind::Memory,
            url: None,
            urls: Vec::new(),
            tls_ca: None,
            tls_insecure: false,
            key_prefix: "rl".into(),
            pool_size: 16,
            timeout: Duration::from_millis(50),
            fallback: Fallback::Memory,
            max_keys: 1_000_000,
            deny_cache: 10_000,
            max_batch: 128,
        }
    }
}

impl BackendConfig {
    /// `memory` or `redis`.
    pub fn kind(&self) -> BackendKind {
        self.kind
    }
    /// The Redis URL (`redis://`, `rediss://` or `unix://`), when `kind = "redis"`.
    pub fn url(&self) -> Option<&str> {
        self.url.as_deref()
    }
    /// The seed nodes' URLs, when `kind = "redis_cluster"`.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }
    /// The certificate authorities (PEM, read from `tls_ca` at start-up) that `rediss://`
    /// connections trust instead of the system's roots.
    pub fn tls_ca(&self) -> Option<&[u8]> {
        self.tls_ca.as_ref().map(|ca| ca.pem.as_slice())
    }
    /// Whether `rediss://` connections skip certificate checks (`tls_insecure = true`).
    pub fn tls_insecure(&self) -> bool {
        self.tls_insecure
    }
    /// Prefix of every Redis key (default `rl`).
    pub fn key_prefix(&self) -> &str {
        &self.key_prefix
    }
    /// Redis connections kept (default 16).
    pub fn pool_size(&self) -> u32 {
        self.pool_size
    }
    /// Longest a Redis call may take before the fallback answers (default 50 ms).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
    /// What answers while Redis fails (default `memory`).
    pub fn fallback(&self) -> Fallback {
        self.fallback
    }
    /// Most keys a memory store holds (default 1 000 000).
    pub fn max_keys(&self) -> usize {
        self.max_keys
    }
    /// Refused keys the Redis store remembers locally (default 10 000; 0 turns it off).
    pub fn deny_cache(&self) -> usize {
        self.deny_cache
    }
    /// Most requests one Redis script call decides (default 128; 1 turns coalescing off).
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// The fields (as named in a config file) whose values differ in `other`. A CA file
    /// is compared by its contents: a CA rotated in place is a change of `tls_ca`.
    pub(crate) fn changed_fields(&self, other: &BackendConfig) -> Vec<&'static str> {
        // Destructured, so that a field added to the struct cannot be left out here.
        let BackendConfig {
            kind,
            url,
            urls,
            tls_ca,
            tls_insecure,
            key_prefix,
            pool_size,
            timeout,
            fallback,
            max_keys,
            deny_cache,
            max_batch,
        } = self;
        let fields = [
            ("backend.kind", *kind != other.kind),
            ("backend.url", *url != other.url),
            ("backend.urls", *urls != other.urls),
            ("backend.tls_ca", *tls_ca != other.tls_ca),
            ("backend.tls_insecure", *tls_insecure != other.tls_insecure),
            ("backend.key_prefix", *key_prefix != other.key_prefix),
            ("backend.pool_size", *pool_size != other.pool_size),
            ("backend.timeout_ms", *timeout != other.timeout),
            ("backend.fallback", *fallback != other.fallback),
            ("backend.max_keys", *max_keys != other.max_keys),
            ("backend.deny_cache", *deny_cache != other.deny_cache),
            ("backend.max_batch", *max_batch != other.max_batch),
        ];
        fields
            .into_iter()
            .filter_map(|(name, changed)| changed.then_some(name))
            .collect()
    }
}

impl fmt::Debug for BackendConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A Redis URL may carry a password.
        f.debug_struct("BackendConfig")
            .field("kind", &self.kind)
            .field("url", &self.url.as_ref().map(|_| "<set>"))
            .field("urls", &self.urls.len())
            .field("tls_ca", &self.tls_ca.as_ref().map(|ca| &ca.path))
            .field("tls_insecure", &self.tls_insecure)
            .field("key_prefix", &self.key_prefix)
            .field("pool_size", &self.pool_size)
            .field("timeout", &self.timeout)
            .field("fallback", &self.fallback)
            .field("max_keys", &self.max_keys)
            .field("deny_cache", &self.deny_cache)
            .field("max_batch", &self.max_batch)
            .finish()
    }
}

/// A CA file's path (for messages) and contents.
#[derive(Clone, PartialEq, Eq)]
struct TlsCa {
    path: String,
    pem: Vec<u8>,
}

/// A validated rate-limit configuration. See the crate docs for the TOML reference.
///
/// ```
/// use tollgate::{RateLimitConfig, Rate};
///
/// let cfg = RateLimitConfig::from_toml_str(r#"
///     by_user = "30/m"
///     [by_tool]
///     " Search " = "10/m"
/// "#).unwrap();
/// assert_eq!(cfg.by_user(), Some(Rate::per_minute(30)));
/// assert_eq!(cfg.tool_rate("search"), Some(Rate::per_minute(10)));
///
/// let err = RateLimitConfig::from_toml_str(r#"
///     by_user = "abc/m"
///     mode = "strict"
/// "#).unwrap_err();
/// assert_eq!(err.to_string(), "by_user: invalid rate \"abc/m\": count must be a positive \
///     integer no larger than 1000000000\nmode: unknown mode \"strict\": expected enforce, \
///     permissive or disabled");
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "Raw")]
pub struct RateLimitConfig {
    by_user: Option<Rate>,
    by_tenant: Option<Rate>,
    by_tool: BTreeMap<String, Rate>,
    by_prompt: BTreeMap<String, Rate>,
    by_user_tool: BTreeMap<String, Rate>,
    tiers: BTreeMap<String, TierConfig>,
    /// Trimmed tenant id → tier name.
    tenants: BTreeMap<String, String>,
    algorithm: Algorithm,
    mode: Mode,
    fail_mode: FailMode,
    headers: HeaderStyle,
    identity: IdentityConfig,
    mcp: Option<McpConfig>,
    backend: BackendConfig,
}

impl RateLimitConfig {
    /// A builder that starts from the defaults (no limits).
    pub fn builder() -> RateLimitConfigBuilder {
        RateLimitConfigBuilder::default()
    }

    /// Parses and validates TOML; syntax errors and every invalid value are reported.
    pub fn from_toml_str(text: &str) -> Result<RateLimitConfig, ConfigError> {
        let raw: Raw = toml::from_str(text).map_err(|e| {
            let mut err = ConfigError::default();
            err.push("toml", e.message().trim());
            err
        })?;
        RateLimitConfig::try_from(raw)
    }

    /// The per-user rate.
    pub fn by_user(&self) -> Option<Rate> {
        self.by_user
    }
    /// The per-tenant rate.
    pub fn by_tenant(&self) -> Option<Rate> {
        self.by_tenant
    }
    /// Per-tool rates, by normalised (trimmed, lower-cased) tool name.
    pub fn by_tool(&self) -> impl Iterator<Item = (&str, Rate)> + '_ {
        self.by_tool
            .iter()
            .map(|(name, rate)| (name.as_str(), *rate))
    }
    /// The rate of one tool; `name` is normalised as requests are.
    pub fn tool_rate(&self, name: &str) -> Option<Rate> {
        self.by_tool.get(&normalize_tool(name)).copied()
    }
    /// Per-prompt rates (MCP `prompts/get`), by normalised prompt name.
    pub fn by_prompt(&self) -> impl Iterator<Item = (&str, Rate)> + '_ {
        self.by_prompt
            .iter()
            .map(|(name, rate)| (name.as_str(), *rate))
    }
    /// The rate of one prompt; `name` is normalised as requests are.
    pub fn prompt_rate(&self, name: &str) -> Option<Rate> {
        self.by_prompt.get(&normalize_tool(name)).copied()
    }
    /// The `[mcp]` section, when present.
    pub fn mcp(&self) -> Option<&McpConfig> {
        self.mcp.as_ref()
    }
    /// Per-user, per-tool rates (`by_user_tool`), by normalised tool name: each user has
    /// their own counter for each of these tools.
    pub fn by_user_tool(&self) -> impl Iterator<Item = (&str, Rate)> + '_ {
        self.by_user_tool
            .iter()
            .map(|(name, rate)| (name.as_str(), *rate))
    }
    /// The configured tiers (`[tiers.<name>]`), by name.
    pub fn tiers(&self) -> impl Iterator<Item = (&str, &TierConfig)> + '_ {
        self.tiers.iter().map(|(name, tier)| (name.as_str(), tier))
    }
    /// One tier's rules.
    pub fn tier(&self, name: &str) -> Option<&TierConfig> {
        self.tiers.get(name)
    }
    /// `[tenants]`: each listed tenant (trimmed) with its tier's name.
    pub fn tenants(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.tenants
            .iter()
            .map(|(t, tier)| (t.as_str(), tier.as_str()))
    }
    /// How requests without a user are counted.
    pub fn anonymous(&self) -> Anonymous {
        self.identity.anonymous
    }
    /// The counting algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
    /// Enforce, permissive or disabled.
    pub fn mode(&self) -> Mode {
        self.mode
    }
    /// What happens when the store fails.
    pub fn fail_mode(&self) -> FailMode {
        self.fail_mode
    }
    /// Which rate headers are written.
    pub fn headers(&self) -> HeaderStyle {
        self.headers
    }
    /// Identity headers.
    pub fn identity(&self) -> &IdentityConfig {
        &self.identity
    }
    /// Backend settings.
    pub fn backend(&self) -> &BackendConfig {
        &self.backend
    }
}

/// Every problem found in a configuration. `Display` prints one per line, each starting
/// with the field it concerns, e.g. `by_tool["search"]: invalid rate "abc/m": ...`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigError {
    problems: Vec<(String, String)>,
}

impl ConfigError {
    pub(crate) fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.problems.push((field.into(), message.into()));
    }

    /// `(field, message)` for each problem, in the order found.
    pub fn problems(&self) -> impl Iterator<Item = (&str, &str)> {
        self.problems.iter().map(|(f, m)| (f.as_str(), m.as_str()))
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (field, message)) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{field}: {message}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

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
    /// Turn on `[mcp]` (its defaults unless set below).
    pub fn mcp(mut self) -> Self {
        self.raw.mcp.get_or_insert_with(RawMcp::default);
        self
    }
    /// `[mcp] refusal`: how refused MCP calls are answered (turns on `[mcp]`).
    pub fn mcp_refusal(mut self, refusal: Refusal) -> Self {
        let name = match refusal {
            Refusal::ToolError => "tool_error",
            Refusal::JsonRpcError => "jsonrpc_error",
            Refusal::Http => "http",
        };
        self.raw.mcp.get_or_insert_with(RawMcp::default).refusal = Some(Scalar::Text(name.into()));
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
        let name = match anonymous {
            Anonymous::Shared => "shared",
            Anonymous::ByIp => "by_ip",
        };
        self.raw.anonymous = Some(Scalar::Text(name.into()));
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
        self.raw.algorithm = Some(Scalar::Text(algorithm.as_str().into()));
        self
    }
    /// Enforce, permissive or disabled.
    pub fn mode(mut self, mode: Mode) -> Self {
        self.raw.mode = Some(Scalar::Text(mode_name(mode).into()));
        self
    }
    /// What happens when the store fails and no fallback answers.
    pub fn fail_mode(mut self, fail_mode: FailMode) -> Self {
        let name = match fail_mode {
            FailMode::Open => "open",
            FailMode::Closed => "closed",
        };
        self.raw.fail_mode = Some(Scalar::Text(name.into()));
        self
    }
    /// Which rate headers to write.
    pub fn headers(mut self, style: HeaderStyle) -> Self {
        let name = match style {
            HeaderStyle::Legacy => "legacy",
            HeaderStyle::Ietf => "ietf",
            HeaderStyle::Both => "both",
            HeaderStyle::None => "none",
        };
        self.raw.headers = Some(Scalar::Text(name.into()));
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
        self.raw.backend.kind = Some(Scalar::Text("redis".into()));
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
        self.raw.backend.kind = Some(Scalar::Text("redis_cluster".into()));
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
    /// Redis connections kept.
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
        let name = match fallback {
            Fallback::Memory => "memory",
            Fallback::None => "none",
        };
        self.raw.backend.fallback = Some(Scalar::Text(name.into()));
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

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Enforce => "enforce",
        Mode::Permissive => "permissive",
        Mode::Disabled => "disabled",
    }
}

fn is_tls_url(url: &str) -> bool {
    url.starts_with("rediss://")
}

#[cfg(feature = "redis-tls")]
fn pem_has_certificates(pem: &[u8]) -> bool {
    crate::store::redis::tls::pem_has_certificates(pem)
}

/// Without TLS a CA is never used (`rediss://` is refused), but a file that is not PEM is
/// still reported.
#[cfg(not(feature = "redis-tls"))]
fn pem_has_certificates(pem: &[u8]) -> bool {
    pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----")
}

/// Trims and lower-cases a tool name, as configuration keys and requests both are.
pub(crate) fn normalize_tool(name: &str) -> String {
    name.trim().to_lowercase()
}

/// `"1MiB"` → 1048576; `None` when it is not a size.
fn parse_size(text: &str) -> Option<i128> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() || digits.len() > 12 {
        return None;
    }
    let n: i128 = digits.parse().ok()?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        _ => return None,
    };
    Some(n * scale)
}

// ---- raw form and validation ----

/// A scalar as written, kept loose so a wrong type is one reported problem among others
/// rather than an abort.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Scalar {
    Text(String),
    Int(i128),
    Other(&'static str),
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a number")
            }
            fn visit_str<E>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar::Text(v.to_owned()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v.into()))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Scalar, E> {
                Ok(Scalar::Other("a float"))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Scalar, E> {
                Ok(Scalar::Other("a boolean"))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut a: A) -> Result<Scalar, A::Error> {
                while a.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Scalar::Other("an array"))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut a: A) -> Result<Scalar, A::Error> {
                while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Scalar::Other("a table"))
            }
        }
        d.deserialize_any(V)
    }
}

/// A value of the expected shape, or what was found instead (so a wrong type is one
/// reported problem naming its field, not a parse error).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Loose<T> {
    Ok(T),
    Found(&'static str),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Loose<T> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = toml::Value::deserialize(d)?;
        let found = match &value {
            toml::Value::String(_) => "a string",
            toml::Value::Integer(_) => "an integer",
            toml::Value::Float(_) => "a float",
            toml::Value::Boolean(_) => "a boolean",
            toml::Value::Datetime(_) => "a date",
            toml::Value::Array(_) => "an array",
            toml::Value::Table(_) => "a table",
        };
        Ok(T::deserialize(value).map_or(Loose::Found(found), Loose::Ok))
    }
}

fn deserialize_tools<'de, D: de::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<(String, Scalar)>>, D::Error> {
    let map = Option::<BTreeMap<String, Scalar>>::deserialize(d)?;
    Ok(map.map(|m| m.into_iter().collect()))
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
struct Raw {
    by_user: Option<Scalar>,
    by_tenant: Option<Scalar>,
    #[serde(deserialize_with = "deserialize_tools")]
    by_tool: Option<Vec<(String, Scalar)>>,
    #[serde(deserialize_with = "deserialize_tools")]
    by_prompt: Option<Vec<(String, Scalar)>>,
    #[serde(deserialize_with = "deserialize_tools")]
    by_user_tool: Option<Vec<(String, Scalar)>>,
    tiers: Option<BTreeMap<String, RawTier>>,
    tenants: Option<BTreeMap<String, Scalar>>,
    anonymous: Option<Scalar>,
    algorithm: Option<Scalar>,
    mode: Option<Scalar>,
    fail_mode: Option<Scalar>,
    headers: Option<Scalar>,
    identity: RawIdentity,
    mcp: Option<RawMcp>,
    backend: RawBackend,
    #[serde(flatten)]
    unknown: BTreeMap<String, IgnoredAny>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
struct RawMcp {
    refusal: Option<Scalar>,
    max_body: Option<Scalar>,
    #[serde(flatten)]
    unknown: BTreeMap<String, IgnoredAny>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct RawTier {
    pub(crate) by_user: Option<Scalar>,
    pub(crate) by_tenant: Option<Scalar>,
    #[serde(deserialize_with = "deserialize_tools")]
    pub(crate) by_tool: Option<Vec<(String, Scalar)>>,
    #[serde(deserialize_with = "deserialize_tools")]
    pub(crate) by_user_tool: Option<Vec<(String, Scalar)>>,
    #[serde(flatten)]
    unknown: BTreeMap<String, IgnoredAny>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
struct RawIdentity {
    user_header: Option<Scalar>,
    tenant_header: Option<Scalar>,
    tool_header: Option<Scalar>,
    tool_path: Option<Scalar>,
    trusted_proxies: Option<Loose<Vec<Scalar>>>,
    ipv6_prefix: Option<Scalar>,
    #[serde(flatten)]
    unknown: BTreeMap<String, IgnoredAny>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
struct RawBackend {
    kind: Option<Scalar>,
    url: Option<Scalar>,
    urls: Option<Loose<Vec<Scalar>>>,
    tls_ca: Option<Scalar>,
    tls_insecure: Option<Loose<bool>>,
    key_prefix: Option<Scalar>,
    pool_size: Option<Scalar>,
    timeout_ms: Option<Scalar>,
    fallback: Option<Scalar>,
    max_keys: Option<Scalar>,
    deny_cache: Option<Scalar>,
    max_batch: Option<Scalar>,
    #[serde(flatten)]
    unknown: BTreeMap<String, IgnoredAny>,
}

/// Collects problems while turning raw values into typed ones.
pub(crate) struct Check {
    pub(crate) err: ConfigError,
}

impl Check {
    pub(crate) fn text<'a>(&mut self, field: &str, value: &'a Option<Scalar>) -> Option<&'a str> {
        match value {
            None => None,
            Some(Scalar::Text(t)) => Some(t),
            Some(Scalar::Int(_)) => {
                self.err.push(field, "expected a string, found an integer");
                None
            }
            Some(Scalar::Other(what)) => {
                self.err
                    .push(field, format!("expected a string, found {what}"));
                None
            }
        }
    }

    pub(crate) fn rate(&mut self, field: &str, value: &Option<Scalar>) -> Option<Rate> {
        if let Some(Scalar::Int(n)) = value {
            self.err.push(
                field,
                format!("expected a rate like \"{n}/m\", found the bare number {n}"),
            );
            return None;
        }
        let text = self.text(field, value)?;
        match text.parse::<Rate>() {
            Ok(rate) => Some(rate),
            Err(e) => {
                self.err.push(field, e.to_string());
                None
            }
        }
    }

    fn choice<T: Copy>(
        &mut self,
        field: &str,
        what: &str,
        value: &Option<Scalar>,
        options: &[(&str, T)],
        default: T,
    ) -> T {
        let Some(text) = self.text(field, value) else {
            return default;
        };
        let wanted = text.trim().to_ascii_lowercase();
        if let Some((_, v)) = options.iter().find(|(name, _)| *name == wanted) {
            return *v;
        }
        let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
        let expected = match names.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
            _ => names.join(""),
        };
        self.err.push(
            field,
            format!("unknown {what} {text:?}: expected {expected}"),
        );
        default
    }

    fn int(
        &mut self,
        field: &str,
        value: &Option<Scalar>,
        range: (i128, i128),
        default: i128,
    ) -> i128 {
        match value {
            None => default,
            Some(Scalar::Int(n)) if (range.0..=range.1).contains(n) => *n,
            Some(Scalar::Int(n)) => {
                self.err.push(
                    field,
                    format!("{n} is out of range: must be {} to {}", range.0, range.1),
                );
                default
            }
            Some(Scalar::Text(_)) => {
                self.err.push(field, "expected an integer, found a string");
                default
            }
            Some(Scalar::Other(what)) => {
                self.err
                    .push(field, format!("expected an integer, found {what}"));
                default
            }
        }
    }

    fn header(&mut self, field: &str, value: &Option<Scalar>) -> Option<HeaderName> {
        let text = self.text(field, value)?;
        match HeaderName::from_bytes(text.trim().as_bytes()) {
            Ok(name) => Some(name),
            Err(_) => {
                self.err
                    .push(field, format!("{text:?} is not a valid HTTP header name"));
                None
            }
        }
    }

    fn flag(&mut self, field: &str, value: &Option<Loose<bool>>) -> bool {
        match value {
            None => false,
            Some(Loose::Ok(on)) => *on,
            Some(Loose::Found(what)) => {
                self.err
                    .push(field, format!("expected true or false, found {what}"));
                false
            }
        }
    }

    fn strings(&mut self, field: &str, value: &Option<Loose<Vec<Scalar>>>) -> Vec<String> {
        match value {
            None => Vec::new(),
            Some(Loose::Ok(items)) => items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| {
                    let item = Some(item.clone());
                    self.text(&format!("{field}[{i}]"), &item)
                        .map(|t| t.trim().to_owned())
                })
                .collect(),
            Some(Loose::Found(what)) => {
                self.err
                    .push(field, format!("expected an array of strings, found {what}"));
                Vec::new()
            }
        }
    }

    /// Reads a CA file at start-up, so a missing or wrong file is reported here.
    fn ca_file(&mut self, field: &str, path: &str) -> Option<TlsCa> {
        match std::fs::read(path) {
            Ok(pem) if pem_has_certificates(&pem) => Some(TlsCa {
                path: path.to_owned(),
                pem,
            }),
            Ok(_) => {
                self.err
                    .push(field, format!("{path:?} holds no PEM certificate"));
                None
            }
            Err(e) => {
                self.err
                    .push(field, format!("cannot read {path:?}: {}", e.kind()));
                None
            }
        }
    }

    /// Where Redis is: `url` for one server, `urls` for a cluster; each URL one this
    /// build can serve.
    fn redis_target(
        &mut self,
        kind: BackendKind,
        url: Option<&str>,
        urls: &[String],
        urls_written: Option<usize>,
    ) {
        let cluster = kind == BackendKind::RedisCluster;
        match kind {
            BackendKind::Memory => {}
            BackendKind::Redis => {
                match url {
                    None => self
                        .err
                        .push("backend.url", "required when backend.kind = \"redis\""),
                    Some(u) => self.redis_url("backend.url", u, false),
                }
                if !urls.is_empty() {
                    self.err.push(
                        "backend.urls",
                        "only for backend.kind = \"redis_cluster\"; one server takes backend.url",
                    );
                }
            }
            BackendKind::RedisCluster => {
                if url.is_some() {
                    self.err.push(
                        "backend.url",
                        "a cluster takes its seed nodes in backend.urls = [\"redis://host:port\", ...]",
                    );
                }
                match urls_written {
                    None => self.err.push(
                        "backend.urls",
                        "required when backend.kind = \"redis_cluster\": the URLs of one or more of its nodes",
                    ),
                    Some(0) => self
                        .err
                        .push("backend.urls", "must name at least one node of the cluster"),
                    Some(_) => {}
                }
                for (i, u) in urls.iter().enumerate() {
                    self.redis_url(&format!("backend.urls[{i}]"), u, true);
                }
                if urls.iter().any(|u| is_tls_url(u)) && !urls.iter().all(|u| is_tls_url(u)) {
                    self.err.push(
                        "backend.urls",
                        "mixes rediss:// and redis://: a cluster speaks TLS on every node or on none",
                    );
                }
            }
        }
        if kind != BackendKind::Memory && !cfg!(feature = "redis") {
            self.err.push(
                "backend.kind",
                format!(
                    "{:?} needs tollgate built with its `redis` feature",
                    if cluster { "redis_cluster" } else { "redis" }
                ),
            );
        }
    }

    fn redis_url(&mut self, field: &str, url: &str, cluster: bool) {
        if !["redis://", "rediss://", "unix://", "redis+unix://"]
            .iter()
            .any(|s| url.starts_with(s))
        {
            self.err.push(
                field,
                "must start with redis://, rediss://, unix:// or redis+unix://",
            );
            return;
        }
        #[cfg(feature = "redis")]
        if let Some(problem) = crate::store::redis::url_problem(url, cluster) {
            self.err.push(field, problem);
        }
        let _ = cluster;
    }

    /// A `[by_tool]`-like table: names trimmed and lower-cased, none empty, no two alike.
    pub(crate) fn names(
        &mut self,
        table: &str,
        what: &str,
        entries: &Option<Vec<(String, Scalar)>>,
    ) -> BTreeMap<String, Rate> {
        let mut rates = BTreeMap::new();
        let mut written: BTreeMap<String, String> = BTreeMap::new();
        for (name, rate) in entries.iter().flatten() {
            let field = format!("{table}[{name:?}]");
            let rate = self.rate(&field, &Some(rate.clone()));
            let normalized = normalize_tool(name);
            if normalized.is_empty() {
                self.err.push(field, format!("{what} name is empty"));
                continue;
            }
            if let Some(first) = written.get(&normalized) {
                self.err.push(
                    field,
                    format!("same {what} as {table}[{first:?}] after trimming and lower-casing"),
                );
                continue;
            }
            written.insert(normalized.clone(), name.clone());
            if let Some(rate) = rate {
                rates.insert(normalized, rate);
            }
        }
        rates
    }

    /// A byte size: an integer, or text such as `"1MiB"`, `"512 KiB"`, `"65536"` (units
    /// `B`, `KiB`/`KB`, `MiB`/`MB`; both binary, as a buffer size is).
    fn size(&mut self, field: &str, value: &Option<Scalar>, default: usize, max: usize) -> usize {
        let bytes = match value {
            None => return default,
            Some(Scalar::Int(n)) => Some(*n),
            Some(Scalar::Text(text)) => parse_size(text),
            Some(Scalar::Other(what)) => {
                self.err.push(
                    field,
                    format!("expected a size like \"1MiB\", found {what}"),
                );
                return default;
            }
        };
        match bytes {
            Some(n) if n >= 1 && n <= max as i128 => n as usize,
            Some(n) => {
                self.err.push(
                    field,
                    format!("{n} bytes is out of range: must be 1 byte to 64 MiB"),
                );
                default
            }
            None => {
                let shown = match value {
                    Some(Scalar::Text(t)) => t.as_str(),
                    _ => "",
                };
                self.err.push(
                    field,
                    format!("invalid size {shown:?}: expected bytes or a number with B, KiB or MiB, like \"1MiB\""),
                );
                default
            }
        }
    }

    fn unknown(&mut self, section: &str, keys: &BTreeMap<String, IgnoredAny>) {
        for key in keys.keys() {
            let plain = !key.is_empty()
                && key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            // A key that is empty or holds spaces, quotes or newlines is quoted, so every
            // problem names its field on one line.
            let field = if plain {
                format!("{section}{key}")
            } else {
                format!("{section}{key:?}")
            };
            self.err.push(field, "unknown field");
        }
    }
}

impl TryFrom<Raw> for RateLimitConfig {
    type Error = ConfigError;

    fn try_from(raw: Raw) -> Result<RateLimitConfig, ConfigError> {
        let mut c = Check {
            err: ConfigError::default(),
        };
        let by_user = c.rate("by_user", &raw.by_user);
        let by_tenant = c.rate("by_tenant", &raw.by_tenant);

        let by_tool = c.names("by_tool", "tool", &raw.by_tool);
        let by_prompt = c.names("by_prompt", "prompt", &raw.by_prompt);
        let by_user_tool = c.names("by_user_tool", "tool", &raw.by_user_tool);
        let tiers = crate::tier::check_tiers(&mut c, raw.tiers.as_ref());
        let tenants = crate::tier::check_tenants(&mut c, raw.tenants.as_ref(), &tiers);

        let algorithm = c.choice(
            "algorithm",
            "algorithm",
            &raw.algorithm,
            &[
                ("fixed_window", Algorithm::FixedWindow),
                ("sliding_window", Algorithm::SlidingWindow),
                ("token_bucket", Algorithm::TokenBucket),
            ],
            Algorithm::FixedWindow,
        );
        let mode = c.choice(
            "mode",
            "mode",
            &raw.mode,
            &[
                ("enforce", Mode::Enforce),
                ("permissive", Mode::Permissive),
                ("disabled", Mode::Disabled),
            ],
            Mode::Enforce,
        );
        let fail_mode = c.choice(
            "fail_mode",
            "fail mode",
            &raw.fail_mode,
            &[("open", FailMode::Open), ("closed", FailMode::Closed)],
            FailMode::Open,
        );
        let headers = c.choice(
            "headers",
            "header style",
            &raw.headers,
            &[
                ("legacy", HeaderStyle::Legacy),
                ("ietf", HeaderStyle::Ietf),
                ("both", HeaderStyle::Both),
                ("none", HeaderStyle::None),
            ],
            HeaderStyle::Legacy,
        );

        let mut rules: Vec<(String, Rate)> = by_user
            .map(|r| ("by_user".to_owned(), r))
            .into_iter()
            .chain(by_tenant.map(|r| ("by_tenant".to_owned(), r)))
            .chain(
                by_tool
                    .iter()
                    .map(|(name, r)| (format!("by_tool[{name:?}]"), *r)),
            )
            .chain(
                by_prompt
                    .iter()
                    .map(|(name, r)| (format!("by_prompt[{name:?}]"), *r)),
            )
            .chain(
                by_user_tool
                    .iter()
                    .map(|(name, r)| (format!("by_user_tool[{name:?}]"), *r)),
            )
            .collect();
        for (name, tier) in &tiers {
            rules.extend(tier.rules_with_fields(name));
        }
        for (field, rate) in rules {
            if !algorithm.supports(rate) {
                c.err.push(
                    field,
                    format!("rate \"{rate}\" is too large for sliding_window: count × period in milliseconds must not exceed 2^53"),
                );
            }
        }

        let anonymous = c.choice(
            "anonymous",
            "anonymous bucket",
            &raw.anonymous,
            &[("shared", Anonymous::Shared), ("by_ip", Anonymous::ByIp)],
            Anonymous::Shared,
        );
        let ri = &raw.identity;
        let tool_header = c.header("identity.tool_header", &ri.tool_header);
        let tool_path = c.text("identity.tool_path", &ri.tool_path).and_then(|p| {
            match crate::tool_path::ToolPath::parse(p) {
                Ok(path) => Some(path),
                Err(problem) => {
                    c.err.push("identity.tool_path", problem);
                    None
                }
            }
        });
        if tool_path.is_some() && tool_header.is_some() {
            c.err.push(
                "identity.tool_path",
                "set identity.tool_header or identity.tool_path, not both (a client could name another tool in the header than the one its path calls)",
            );
        }
        let trusted_proxies = crate::client_ip::check_networks(
            &mut c,
            "identity.trusted_proxies",
            &ri.trusted_proxies,
        );
        let ipv6_prefix = c.int("identity.ipv6_prefix", &ri.ipv6_prefix, (32, 128), 64) as u8;
        if anonymous != Anonymous::ByIp {
            if ri.trusted_proxies.is_some() {
                c.err.push(
                    "identity.trusted_proxies",
                    "only used with anonymous = \"by_ip\"",
                );
            }
            if ri.ipv6_prefix.is_some() {
                c.err.push(
                    "identity.ipv6_prefix",
                    "only used with anonymous = \"by_ip\"",
                );
            }
        }
        let identity = IdentityConfig {
            user_header: c.header("identity.user_header", &ri.user_header),
            tenant_header: c.header("identity.tenant_header", &ri.tenant_header),
            tool_header,
            tool_path,
            trusted_proxies,
            ipv6_prefix,
            anonymous,
        };

        let mcp = raw.mcp.as_ref().map(|m| {
            let refusal = c.choice(
                "mcp.refusal",
                "refusal",
                &m.refusal,
                &[
                    ("tool_error", Refusal::ToolError),
                    ("jsonrpc_error", Refusal::JsonRpcError),
                    ("http", Refusal::Http),
                ],
                Refusal::ToolError,
            );
            let max_body = c.size(
                "mcp.max_body",
                &m.max_body,
                DEFAULT_MAX_BODY,
                LARGEST_MAX_BODY,
            );
            c.unknown("mcp.", &m.unknown);
            McpConfig { refusal, max_body }
        });

        let b = &raw.backend;
        let defaults = BackendConfig::default();
        let kind = c.choice(
            "backend.kind",
            "backend",
            &b.kind,
            &[
                ("memory", BackendKind::Memory),
                ("redis", BackendKind::Redis),
                ("redis_cluster", BackendKind::RedisCluster),
            ],
            BackendKind::Memory,
        );
        let url = c.text("backend.url", &b.url).map(|u| u.trim().to_owned());
        let urls = c.strings("backend.urls", &b.urls);
        let tls_ca_path = c.text("backend.tls_ca", &b.tls_ca).map(str::trim);
        let tls_insecure = c.flag("backend.tls_insecure", &b.tls_insecure);
        let tls_ca = tls_ca_path.and_then(|path| c.ca_file("backend.tls_ca", path));
        let urls_written = b.urls.as_ref().map(|u| match u {
            Loose::Ok(items) => items.len(),
            Loose::Found(_) => 1,
        });
        c.redis_target(kind, url.as_deref(), &urls, urls_written);
        let tls = match kind {
            BackendKind::Redis => url.as_deref().is_some_and(is_tls_url),
            BackendKind::RedisCluster => urls.iter().any(|u| is_tls_url(u)),
            BackendKind::Memory => false,
        };
        if kind != BackendKind::Memory && !tls {
            if tls_ca_path.is_some() {
                c.err.push("backend.tls_ca", "only for rediss:// URLs");
            }
            if tls_insecure {
                c.err
                    .push("backend.tls_insecure", "only for rediss:// URLs");
            }
        }
        if tls_ca_path.is_some() && tls_insecure {
            c.err.push(
                "backend.tls_insecure",
                "checks no certificate, so backend.tls_ca would be ignored: set one or the other",
            );
        }
        let key_prefix = c
            .text("backend.key_prefix", &b.key_prefix)
            .map(str::to_owned)
            .unwrap_or(defaults.key_prefix);
        if key_prefix.is_empty()
            || key_prefix.len() > 64
            || !key_prefix
                .bytes()
                .all(|b| b.is_ascii_graphic() && !matches!(b, b'{' | b'}'))
        {
            c.err.push(
                "backend.key_prefix",
                "must be 1 to 64 printable ASCII characters without spaces, '{' or '}'",
            );
        }
        let pool_size = c.int("backend.pool_size", &b.pool_size, (1, 1024), 16) as u32;
        let timeout_ms = c.int("backend.timeout_ms", &b.timeout_ms, (1, 60_000), 50) as u64;
        let fallback = c.choice(
            "backend.fallback",
            "fallback",
            &b.fallback,
            &[("memory", Fallback::Memory), ("none", Fallback::None)],
            Fallback::Memory,
        );
        let max_keys = c.int(
            "backend.max_keys",
            &b.max_keys,
            (1, 1_000_000_000),
            1_000_000,
        ) as usize;
        let deny_cache =
            c.int("backend.deny_cache", &b.deny_cache, (0, 10_000_000), 10_000) as usize;
        let max_batch = c.int("backend.max_batch", &b.max_batch, (1, 1024), 128) as usize;

        c.unknown("", &raw.unknown);
        for (name, tier) in raw.tiers.iter().flatten() {
            let section = format!("{}.", crate::tier::tier_field(name));
            c.unknown(&section, &tier.unknown);
        }
        c.unknown("identity.", &raw.identity.unknown);
        c.unknown("backend.", &raw.backend.unknown);

        if !c.err.problems.is_empty() {
            return Err(c.err);
        }
        Ok(RateLimitConfig {
            by_user,
            by_tenant,
            by_tool,
            by_prompt,
            by_user_tool,
            tiers,
            tenants,
            algorithm,
            mode,
            fail_mode,
            headers,
            identity,
            mcp,
            backend: BackendConfig {
                kind,
                url,
                urls,
                tls_ca,
                tls_insecure,
                key_prefix,
                pool_size,
                timeout: Duration::from_millis(timeout_ms),
                fallback,
                max_keys,
                deny_cache,
                max_batch,
            },
        })
    }
}
