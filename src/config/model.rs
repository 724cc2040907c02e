//! The public model of a configuration: `RateLimitConfig` and its sections, each value
//! already checked (a config that exists is valid; `validate/` makes them).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use http::HeaderName;
use serde::Deserialize;

use super::error::ConfigError;
use super::schema::Raw;
use super::settings;
use crate::algorithm::Algorithm;
use crate::rate::Rate;
use crate::tool_path::ToolPath;

/// A setting whose value is one of a few names (`mode = "enforce"`): the names are
/// defined here once, for validation, the builder and messages alike.
pub(crate) trait Choice: Copy + Default + 'static {
    /// What a message calls the setting's values (`unknown fail mode "x"`).
    const WHAT: &'static str;
    /// Every value, in the order a message lists them.
    const ALL: &'static [Self];
    /// The value's name in a config file.
    fn name(self) -> &'static str;
}

/// `impl Choice` for an enum from its `(variant, name)` pairs.
macro_rules! choice {
    ($ty:ty, $what:literal, $($variant:ident => $name:literal),+ $(,)?) => {
        impl Choice for $ty {
            const WHAT: &'static str = $what;
            const ALL: &'static [Self] = &[$(<$ty>::$variant),+];
            fn name(self) -> &'static str {
                match self {
                    $(<$ty>::$variant => $name),+
                }
            }
        }
    };
}

choice!(Algorithm, "algorithm",
    FixedWindow => "fixed_window", SlidingWindow => "sliding_window", TokenBucket => "token_bucket");
choice!(Mode, "mode", Enforce => "enforce", Permissive => "permissive", Disabled => "disabled");
choice!(FailMode, "fail mode", Open => "open", Closed => "closed");
choice!(HeaderStyle, "header style",
    Legacy => "legacy", Ietf => "ietf", Both => "both", None => "none");
choice!(BackendKind, "backend",
    Memory => "memory", Redis => "redis", RedisCluster => "redis_cluster");
choice!(Fallback, "fallback", Memory => "memory", None => "none");
choice!(Anonymous, "anonymous bucket", Shared => "shared", ByIp => "by_ip");
choice!(Refusal, "refusal",
    ToolError => "tool_error", JsonRpcError => "jsonrpc_error", Http => "http");

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
    pub(crate) user_header: Option<HeaderName>,
    pub(crate) tenant_header: Option<HeaderName>,
    pub(crate) tool_header: Option<HeaderName>,
    pub(crate) tool_path: Option<ToolPath>,
    pub(crate) cost_header: Option<HeaderName>,
    pub(crate) trusted_proxies: Vec<ipnet::IpNet>,
    pub(crate) ipv6_prefix: u8,
    pub(crate) anonymous: Anonymous,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            user_header: None,
            tenant_header: None,
            tool_header: None,
            tool_path: None,
            cost_header: None,
            trusted_proxies: Vec::new(),
            ipv6_prefix: settings::IPV6_PREFIX.default as u8,
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
    /// Header carrying a call's cost in units (an upstream's estimate), when the request
    /// has no [`Cost`](crate::Cost) extension.
    pub fn cost_header(&self) -> Option<&HeaderName> {
        self.cost_header.as_ref()
    }
    /// The path pattern the tool name is taken from (`"/tools/{name}"`), when a request
    /// has no [`ToolName`](crate::ToolName) extension.
    pub fn tool_path(&self) -> Option<&str> {
        self.tool_path.as_ref().map(|p| p.as_str())
    }
    pub(crate) fn tool_path_matcher(&self) -> Option<&ToolPath> {
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
    pub(crate) refusal: Refusal,
    pub(crate) max_body: usize,
}

impl Default for McpConfig {
    fn default() -> Self {
        McpConfig {
            refusal: Refusal::ToolError,
            max_body: settings::MAX_BODY.default as usize,
        }
    }
}

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

/// `[cost]`: the price in units of each tool and prompt (`[cost.tools]`,
/// `[cost.prompts]`), by normalised name; any other call costs one unit unless its
/// [`Cost`](crate::Cost) extension or `[identity] cost_header` says otherwise.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CostConfig {
    pub(crate) tools: BTreeMap<String, u64>,
    pub(crate) prompts: BTreeMap<String, u64>,
}

impl CostConfig {
    /// Each priced tool with its price in units.
    pub fn tools(&self) -> impl Iterator<Item = (&str, u64)> + '_ {
        self.tools
            .iter()
            .map(|(name, units)| (name.as_str(), *units))
    }
    /// Each priced MCP prompt with its price in units.
    pub fn prompts(&self) -> impl Iterator<Item = (&str, u64)> + '_ {
        self.prompts
            .iter()
            .map(|(name, units)| (name.as_str(), *units))
    }
    /// The price of one tool; `name` is normalised as requests are.
    pub fn tool(&self, name: &str) -> Option<u64> {
        self.tools.get(&normalize_tool(name)).copied()
    }
}

/// `[backend]`: where counters live and how Redis is reached.
#[derive(Clone, PartialEq, Eq)]
pub struct BackendConfig {
    pub(crate) kind: BackendKind,
    pub(crate) url: Option<String>,
    pub(crate) urls: Vec<String>,
    pub(crate) tls_ca: Option<TlsCa>,
    pub(crate) tls_insecure: bool,
    pub(crate) key_prefix: String,
    pub(crate) pool_size: u32,
    pub(crate) timeout: Duration,
    pub(crate) fallback: Fallback,
    pub(crate) max_keys: usize,
    pub(crate) deny_cache: usize,
    pub(crate) max_batch: usize,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            kind: BackendKind::Memory,
            url: None,
            urls: Vec::new(),
            tls_ca: None,
            tls_insecure: false,
            key_prefix: settings::KEY_PREFIX.into(),
            pool_size: settings::POOL_SIZE.default as u32,
            timeout: Duration::from_millis(settings::TIMEOUT_MS.default),
            fallback: Fallback::Memory,
            max_keys: settings::MAX_KEYS.default as usize,
            deny_cache: settings::DENY_CACHE.default as usize,
            max_batch: settings::MAX_BATCH.default as usize,
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
    /// The most sockets opened to one Redis server (default 4; at most 4 are opened
    /// whatever this says: each multiplexes every request, and more add nothing against
    /// one single-threaded server).
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
pub(crate) struct TlsCa {
    pub(crate) path: String,
    pub(crate) pem: Vec<u8>,
}

/// A validated rate-limit configuration. Every field, its default and its accepted values:
/// [`docs::configuration`](crate::docs::configuration).
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
    pub(crate) by_user: Option<Rate>,
    pub(crate) by_tenant: Option<Rate>,
    pub(crate) by_tool: BTreeMap<String, Rate>,
    pub(crate) by_prompt: BTreeMap<String, Rate>,
    pub(crate) by_user_tool: BTreeMap<String, Rate>,
    pub(crate) tiers: BTreeMap<String, TierConfig>,
    /// Trimmed tenant id → tier name.
    pub(crate) tenants: BTreeMap<String, String>,
    pub(crate) algorithm: Algorithm,
    pub(crate) mode: Mode,
    pub(crate) fail_mode: FailMode,
    pub(crate) headers: HeaderStyle,
    pub(crate) identity: IdentityConfig,
    pub(crate) mcp: Option<McpConfig>,
    pub(crate) cost: Option<CostConfig>,
    pub(crate) backend: BackendConfig,
}

impl RateLimitConfig {
    /// Parses and validates TOML; syntax errors and every invalid value are reported.
    pub fn from_toml_str(text: &str) -> Result<RateLimitConfig, ConfigError> {
        let raw: Raw = toml::from_str(text).map_err(|e| ConfigError::from_toml(text, &e))?;
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
    /// The `[cost]` section, when present: rules are budgets of units, and calls can be
    /// settled after they ran ([`Charge`](crate::Charge)).
    pub fn cost(&self) -> Option<&CostConfig> {
        self.cost.as_ref()
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

/// One tier's rules (`[tiers.<name>]`): each is `None` (or absent from a table) when the
/// tier inherits the base rule.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TierConfig {
    pub(crate) by_user: Option<Rate>,
    pub(crate) by_tenant: Option<Rate>,
    pub(crate) by_tool: BTreeMap<String, Rate>,
    pub(crate) by_user_tool: BTreeMap<String, Rate>,
}

impl TierConfig {
    /// The tier's per-user rate, if it overrides `by_user`.
    pub fn by_user(&self) -> Option<Rate> {
        self.by_user
    }
    /// The tier's per-tenant rate, if it overrides `by_tenant`.
    pub fn by_tenant(&self) -> Option<Rate> {
        self.by_tenant
    }
    /// The tools whose `by_tool` rate the tier overrides.
    pub fn by_tool(&self) -> impl Iterator<Item = (&str, Rate)> + '_ {
        self.by_tool.iter().map(|(n, r)| (n.as_str(), *r))
    }
    /// The tools whose `by_user_tool` rate the tier overrides.
    pub fn by_user_tool(&self) -> impl Iterator<Item = (&str, Rate)> + '_ {
        self.by_user_tool.iter().map(|(n, r)| (n.as_str(), *r))
    }
}

/// Trims and lower-cases a tool name, as configuration keys and requests both are.
pub(crate) fn normalize_tool(name: &str) -> String {
    name.trim().to_lowercase()
}
