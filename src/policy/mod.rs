//! The compiled policy: everything a config says about requests (the rules, algorithm,
//! mode, fail mode, header style, `[identity]`, `[mcp]`), built in one piece and swapped
//! whole on reload; and a request's plan of keys under it.

pub(crate) mod metrics;
pub(crate) mod plan;
pub(crate) mod rules;

use crate::algorithm::Algorithm;
use crate::config::{FailMode, HeaderStyle, IdentityConfig, Mode, RateLimitConfig, Refusal};
use crate::key::{RuleKind, MAX_KEYS};
use crate::rate::Rate;
use crate::request::target::Target;
use metrics::{Decided, Metrics};
use rules::Rules;

/// What a config says about requests: everything but `[backend]`.
pub(crate) struct Policy {
    /// Which policy this is: a number no other policy of the process has (a request
    /// that outlives a reload can tell that the policy it started on has been replaced).
    pub(crate) generation: u64,
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
    /// `[cost]` is configured: rules are budgets, and forwarded calls carry a `Charge`.
    pub(crate) costed: bool,
}

impl Policy {
    /// `backend`: the store's kind, as the latency metric labels it.
    pub(crate) fn new(cfg: &RateLimitConfig, backend: &'static str) -> Policy {
        static GENERATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let rules = Rules::new(cfg);
        Policy {
            generation: GENERATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            metrics: Metrics::new(rules.tool_names(), rules.prompt_names(), backend),
            rules,
            algorithm: cfg.algorithm(),
            mode: cfg.mode(),
            fail_mode: cfg.fail_mode(),
            headers: cfg.headers(),
            identity: cfg.identity().clone(),
            mcp_headers: cfg.mcp().is_some(),
            refusal: cfg.mcp().map_or(Refusal::ToolError, |m| m.refusal()),
            costed: cfg.cost().is_some(),
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
        self.metrics.count(decided, rule, tool);
    }

    /// Counts `cost` units charged under each of `rules` (feature `metrics`).
    #[inline(always)]
    pub(crate) fn charged(&self, _rules: &[Option<(RuleKind, Rate)>; MAX_KEYS], _cost: u64) {
        #[cfg(feature = "metrics")]
        for (kind, _) in _rules.iter().flatten() {
            self.metrics.units(*kind, _cost as i64);
        }
    }

    /// Counts a settlement of `delta` units under each of `kinds`: charged when
    /// positive, refunded when negative (feature `metrics`).
    pub(crate) fn settled(&self, _kinds: impl Iterator<Item = RuleKind>, _delta: i64) {
        #[cfg(feature = "metrics")]
        for kind in _kinds {
            self.metrics.units(kind, _delta);
        }
    }
}
