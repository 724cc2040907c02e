//! Metrics through the `metrics` facade (cargo feature `metrics`; ARCHITECTURE.md,
//! "Metrics"). Without the feature every function here is empty and inlined away, and
//! [`Started`] is zero-sized: the request path pays nothing.
//!
//! Labels are bounded by the config: a decision, a rule kind, and the name of a configured
//! tool or prompt. A user or tenant id is never a label value.

use std::sync::Arc;
#[cfg(feature = "metrics")]
use std::sync::{OnceLock, PoisonError};

use crate::key::RuleKind;
use crate::request::target::Target;
use crate::store::Store;

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
/// prompt the request was counted under, empty without one. A policy has its own handles:
/// a reload registers new ones with the recorder installed then.
#[derive(Debug)]
pub(crate) struct Metrics {
    /// By tool slot (0: none; then each tool; then each prompt), filled on first use.
    #[cfg(feature = "metrics")]
    by_tool: Box<[OnceLock<Handles>]>,
    /// The `tool` label of each slot past 0: the configured tools, then the prompts.
    #[cfg(feature = "metrics")]
    names: Box<[Arc<str>]>,
    /// How many of `names` are tools.
    #[cfg(feature = "metrics")]
    tools: usize,
    /// `tollgate_store_latency_seconds{backend}`, registered on first use.
    #[cfg(feature = "metrics")]
    latency: OnceLock<metrics::Histogram>,
    /// `tollgate_units_total{rule, direction}`: by rule kind, charged then refunded.
    #[cfg(feature = "metrics")]
    units: [[OnceLock<metrics::Counter>; 2]; RULES],
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    backend: &'static str,
}

/// One tool slot's handles, by decision and rule.
#[cfg(feature = "metrics")]
type Handles = Box<[OnceLock<metrics::Counter>]>;

/// The `rule` label's values: none, then each kind.
#[cfg(feature = "metrics")]
const RULES: usize = 6;
// A new rule kind needs a new column.
#[cfg(feature = "metrics")]
const _: () = assert!(RuleKind::UserTool as usize + 2 == RULES);
#[cfg(feature = "metrics")]
const DECISIONS: usize = 6;
#[cfg(feature = "metrics")]
const _: () = assert!(Decided::InvalidIdentity as usize + 1 == DECISIONS);

impl Metrics {
    /// Handles for the configured tools and prompts (their names, by number), and the
    /// latency of a `backend` store.
    pub(crate) fn new(
        _tools: &[Arc<str>],
        _prompts: &[Arc<str>],
        backend: &'static str,
    ) -> Metrics {
        Metrics {
            #[cfg(feature = "metrics")]
            by_tool: (0..1 + _tools.len() + _prompts.len())
                .map(|_| OnceLock::new())
                .collect(),
            #[cfg(feature = "metrics")]
            names: _tools.iter().chain(_prompts).cloned().collect(),
            #[cfg(feature = "metrics")]
            tools: _tools.len(),
            #[cfg(feature = "metrics")]
            latency: OnceLock::new(),
            #[cfg(feature = "metrics")]
            units: Default::default(),
            backend,
        }
    }

    /// Counts one request.
    #[inline(always)]
    pub(crate) fn count(
        &self,
        _decided: Decided,
        _rule: Option<RuleKind>,
        _tool: Option<(Target, u32)>,
    ) {
        #[cfg(feature = "metrics")]
        self.handle(_decided, _rule, _tool).increment(1);
    }

    /// Counts `delta` units under `rule`: charged when positive, refunded when negative.
    #[cfg(feature = "metrics")]
    pub(crate) fn units(&self, rule: RuleKind, delta: i64) {
        if delta == 0 {
            return;
        }
        let direction = usize::from(delta < 0);
        self.units[1 + rule as usize][direction]
            .get_or_init(|| {
                metrics::counter!(
                    "tollgate_units_total",
                    "rule" => rule.as_str(),
                    "direction" => if direction == 0 { "charged" } else { "refunded" }
                )
            })
            .increment(delta.unsigned_abs());
    }

    #[cfg(feature = "metrics")]
    fn handle(
        &self,
        decided: Decided,
        rule: Option<RuleKind>,
        tool: Option<(Target, u32)>,
    ) -> &metrics::Counter {
        let slot = match tool {
            None => 0,
            Some((Target::Tool, i)) => 1 + i as usize,
            Some((Target::Prompt, i)) => 1 + self.tools + i as usize,
        };
        let rule_index = rule.map_or(0, |r| 1 + r as usize);
        let cells = self.by_tool[slot]
            .get_or_init(|| (0..DECISIONS * RULES).map(|_| OnceLock::new()).collect());
        cells[decided as usize * RULES + rule_index].get_or_init(|| {
            use metrics::{Key, Label, SharedString};
            let name = match slot {
                0 => SharedString::const_str(""),
                slot => SharedString::from_shared(self.names[slot - 1].clone()),
            };
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

    /// Records the time from `self` to now in `metrics`' latency histogram.
    #[inline(always)]
    pub(crate) fn answered(self, _metrics: &Metrics) {
        #[cfg(feature = "metrics")]
        _metrics
            .latency
            .get_or_init(|| {
                metrics::histogram!("tollgate_store_latency_seconds", "backend" => _metrics.backend)
            })
            .record(self.0.elapsed().as_secs_f64());
    }
}

/// Every store a layer was built on, weakly (a dropped store drops out), for the gauges.
#[cfg(feature = "metrics")]
static STORES: std::sync::Mutex<Vec<std::sync::Weak<dyn Store>>> =
    std::sync::Mutex::new(Vec::new());

/// When the gauges are next read (µs).
#[cfg(feature = "metrics")]
static GAUGES_DUE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Adds a layer's store to those the gauges sum.
pub(crate) fn register(_store: &Arc<dyn Store>) {
    #[cfg(feature = "metrics")]
    {
        let mut stores = STORES.lock().unwrap_or_else(PoisonError::into_inner);
        stores.retain(|s| s.strong_count() > 0);
        if !stores
            .iter()
            .any(|s| std::ptr::addr_eq(s.as_ptr(), Arc::as_ptr(_store)))
        {
            stores.push(Arc::downgrade(_store));
        }
    }
}

/// Sets the gauges from every registered store's [`Store::stats`], summed over the
/// process (a store that several layers share, or that clones share, counted once), at
/// most once a second: the first request past the due time moves it on and reads the
/// stores. `now` gives the µs clock.
#[inline(always)]
pub(crate) fn gauges(_now: impl FnOnce() -> u64) {
    #[cfg(feature = "metrics")]
    {
        use std::sync::atomic::Ordering::Relaxed;
        let now = _now();
        let next = GAUGES_DUE.load(Relaxed);
        if now >= next
            && GAUGES_DUE
                .compare_exchange(next, now.saturating_add(1_000_000), Relaxed, Relaxed)
                .is_ok()
        {
            set_gauges();
        }
    }
}

#[cfg(feature = "metrics")]
fn set_gauges() {
    use std::panic::{catch_unwind, AssertUnwindSafe};
    let stores: Vec<Arc<dyn Store>> = STORES
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter_map(std::sync::Weak::upgrade)
        .collect();
    let mut seen = Vec::with_capacity(stores.len());
    let (mut keys, mut evictions, mut deny, mut open, mut fallback) = (None, None, None, None, 0);
    let add = |sum: &mut Option<u64>, value: Option<u64>| {
        if let Some(v) = value {
            *sum = Some(sum.unwrap_or(0) + v);
        }
    };
    for store in &stores {
        // A custom store's `stats` runs here, on a request: it must not take the request
        // down with it.
        let Ok(stats) = catch_unwind(AssertUnwindSafe(|| store.stats())) else {
            continue;
        };
        // Clones of one store report one source: count it once.
        let source = stats
            .source
            .unwrap_or(Arc::as_ptr(store) as *const () as usize);
        if seen.contains(&source) {
            continue;
        }
        seen.push(source);
        add(&mut keys, stats.keys);
        add(&mut evictions, stats.evictions);
        add(&mut deny, stats.deny_cache_keys);
        add(&mut open, stats.circuit_open.map(u64::from));
        fallback += stats.fallback_answers;
    }
    let set = |name: &'static str, value: Option<u64>| {
        if let Some(value) = value {
            metrics::gauge!(name).set(value as f64);
        }
    };
    set("tollgate_memory_keys", keys);
    set("tollgate_deny_cache_keys", deny);
    set("tollgate_circuit_open", open);
    // Totals the stores keep: set as they are (the facade's counters otherwise only add).
    if let Some(evictions) = evictions {
        metrics::counter!("tollgate_memory_evictions_total").absolute(evictions);
    }
    metrics::counter!("tollgate_fallback_answers_total").absolute(fallback);
}
