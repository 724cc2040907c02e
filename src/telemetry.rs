//! Metrics through the `metrics` facade (cargo feature `metrics`; ARCHITECTURE.md,
//! "Metrics"). Without the feature every function here is empty and inlined away, and
//! [`Started`] is zero-sized: the request path pays nothing.
//!
//! Labels are bounded by the config: a decision, a rule kind, and the name of a configured
//! tool or prompt. A user or tenant id is never a label value.

#[cfg(feature = "metrics")]
use std::sync::OnceLock;

use crate::identity::Target;
use crate::layer::Rules;
use crate::RuleKind;

/// What happened to a request, as the `decision` label says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decided {
    Allowed,
    Limited,
    /// Over the limit in permissive mode: forwarded.
    ShadowLimited,
    FailOpen,
    FailClosed,
    InvalidIdentity,
}

impl Decided {
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    fn as_str(self) -> &'static str {
        match self {
            Decided::Allowed => "allowed",
            Decided::Limited => "limited",
            Decided::ShadowLimited => "shadow_limited",
            Decided::FailOpen => "fail_open",
            Decided::FailClosed => "fail_closed",
            Decided::InvalidIdentity => "invalid_identity",
        }
    }
}

/// The handles of `tollgate_requests_total{decision, rule, tool}`, one per label set,
/// each registered with the recorder on first use and then reused: counting a request is
/// one atomic add, with no allocation. `rule` is the rule that decided (the refusing one,
/// or the one whose headers speak), `none` without one; `tool` is the configured tool or
/// prompt the request was counted under, empty without one. A policy has its own handles,
/// so a reload (or a recorder installed after the first request) registers them anew.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// By tool slot (0: none; then each tool; then each prompt), filled on first use.
    #[cfg(feature = "metrics")]
    by_tool: Box<[OnceLock<Handles>]>,
}

/// One tool slot's handles, by decision and rule.
#[cfg(feature = "metrics")]
type Handles = Box<[OnceLock<metrics::Counter>]>;

/// The `rule` label's values: none, then each kind.
#[cfg(feature = "metrics")]
const RULES: usize = 6;
#[cfg(feature = "metrics")]
const DECISIONS: usize = 6;

impl Counters {
    /// Handles for `rules`' tools and prompts.
    pub(crate) fn new(_rules: &Rules) -> Counters {
        Counters {
            #[cfg(feature = "metrics")]
            by_tool: (0..1 + _rules.tool_count() + _rules.prompt_count())
                .map(|_| OnceLock::new())
                .collect(),
        }
    }

    /// Counts one request.
    #[inline(always)]
    pub(crate) fn count(
        &self,
        _decided: Decided,
        _rule: Option<RuleKind>,
        _tool: Option<(Target, u32)>,
        _rules: &Rules,
    ) {
        #[cfg(feature = "metrics")]
        self.handle(_decided, _rule, _tool, _rules).increment(1);
    }

    #[cfg(feature = "metrics")]
    fn handle(
        &self,
        decided: Decided,
        rule: Option<RuleKind>,
        tool: Option<(Target, u32)>,
        rules: &Rules,
    ) -> &metrics::Counter {
        let slot = match tool {
            None => 0,
            Some((Target::Tool, i)) => 1 + i as usize,
            Some((Target::Prompt, i)) => 1 + rules.tool_count() + i as usize,
        };
        let rule_index = rule.map_or(0, |r| 1 + r as usize);
        let cells = self.by_tool[slot]
            .get_or_init(|| (0..DECISIONS * RULES).map(|_| OnceLock::new()).collect());
        cells[decided as usize * RULES + rule_index].get_or_init(|| {
            use metrics::{Key, Label, SharedString};
            let name = tool.map_or(SharedString::const_str(""), |(target, i)| {
                SharedString::from_shared(rules.named(target, i).clone())
            });
            let labels = vec![
                Label::from_static_parts("decision", decided.as_str()),
                Label::from_static_parts("rule", rule.map_or("none", RuleKind::as_str)),
                Label::new("tool", name),
            ];
            let key = Key::from_parts("tollgate_requests_total", labels);
            metrics::with_recorder(|r| r.register_counter(&key, &METADATA))
        })
    }
}

#[cfg(feature = "metrics")]
static METADATA: metrics::Metadata<'static> =
    metrics::Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// The `tollgate_store_latency_seconds{backend}` histogram of one layer, registered on
/// first use.
#[derive(Debug)]
pub(crate) struct Latency {
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    backend: &'static str,
    #[cfg(feature = "metrics")]
    histogram: OnceLock<metrics::Histogram>,
}

impl Latency {
    pub(crate) fn new(backend: &'static str) -> Latency {
        Latency {
            backend,
            #[cfg(feature = "metrics")]
            histogram: OnceLock::new(),
        }
    }
}

/// When a store call started (with the feature; nothing without it).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Started(#[cfg(feature = "metrics")] std::time::Instant);

impl Started {
    #[inline(always)]
    pub(crate) fn now() -> Started {
        Started(
            #[cfg(feature = "metrics")]
            std::time::Instant::now(),
        )
    }

    /// Records the time from `self` to now.
    #[inline(always)]
    pub(crate) fn answered(self, _latency: &Latency) {
        #[cfg(feature = "metrics")]
        _latency
            .histogram
            .get_or_init(|| {
                metrics::histogram!("tollgate_store_latency_seconds", "backend" => _latency.backend)
            })
            .record(self.0.elapsed().as_secs_f64());
    }
}

/// Sets the store's gauges from [`Store::stats`](crate::Store::stats), at most once a
/// second (µs clock `now`): the first request past `due` moves it on and reads the store.
#[cfg(feature = "metrics")]
pub(crate) fn gauges(due: &std::sync::atomic::AtomicU64, now: u64, store: &dyn crate::Store) {
    use std::sync::atomic::Ordering::Relaxed;
    let next = due.load(Relaxed);
    if now < next
        || due
            .compare_exchange(next, now.saturating_add(1_000_000), Relaxed, Relaxed)
            .is_err()
    {
        return;
    }
    let stats = store.stats();
    let set = |name: &'static str, value: Option<u64>| {
        if let Some(value) = value {
            metrics::gauge!(name).set(value as f64);
        }
    };
    set("tollgate_memory_keys", stats.keys);
    set("tollgate_deny_cache_keys", stats.deny_cache_keys);
    set("tollgate_circuit_open", stats.circuit_open.map(u64::from));
    // Totals the store keeps: set as they are (the facade's counters otherwise only add).
    if let Some(evictions) = stats.evictions {
        metrics::counter!("tollgate_memory_evictions_total").absolute(evictions);
    }
    metrics::counter!("tollgate_fallback_answers_total").absolute(stats.fallback_answers);
}

#[cfg(not(feature = "metrics"))]
#[inline(always)]
pub(crate) fn gauges(_: &std::sync::atomic::AtomicU64, _: u64, _: &dyn crate::Store) {}
