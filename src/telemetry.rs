//! Metrics through the `metrics` facade (cargo feature `metrics`; ARCHITECTURE.md,
//! "Metrics"). Without the feature every function here is empty and inlined away, and
//! [`Started`] is zero-sized: the request path pays nothing.
//!
//! Labels are bounded by the config: a decision, a rule kind, and the name of a configured
//! tool or prompt. A user or tenant id is never a label value.

use std::sync::Arc;

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

/// `tollgate_requests_total{decision, rule, tool}`: `rule` is the rule that decided (the
/// refusing one, or the one whose headers speak), `none` without one; `tool` is the
/// configured tool or prompt the request was counted under, empty without one.
#[cfg(feature = "metrics")]
pub(crate) fn request(decided: Decided, rule: Option<RuleKind>, tool: Option<&Arc<str>>) {
    use metrics::{Key, Label, SharedString};
    let tool = tool.map_or(SharedString::const_str(""), |t| {
        SharedString::from_shared(t.clone())
    });
    let labels = vec![
        Label::from_static_parts("decision", decided.as_str()),
        Label::from_static_parts("rule", rule.map_or("none", RuleKind::as_str)),
        Label::new("tool", tool),
    ];
    let key = Key::from_parts("tollgate_requests_total", labels);
    metrics::with_recorder(|r| r.register_counter(&key, &METADATA).increment(1));
}

#[cfg(not(feature = "metrics"))]
#[inline(always)]
pub(crate) fn request(_: Decided, _: Option<RuleKind>, _: Option<&Arc<str>>) {}

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

    /// `tollgate_store_latency_seconds{backend}`: from `self` to now.
    #[inline(always)]
    pub(crate) fn answered(self, _backend: &'static str) {
        #[cfg(feature = "metrics")]
        metrics::histogram!("tollgate_store_latency_seconds", "backend" => _backend)
            .record(self.0.elapsed().as_secs_f64());
    }
}
