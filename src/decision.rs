//! Per-rule outcomes → one [`Decision`] (ARCHITECTURE.md, behaviour contract item 7).

use std::cmp::Reverse;
use std::time::Duration;

use crate::key::MAX_KEYS;
use crate::store::Outcome;
use crate::{Rate, RuleKind};

/// One applicable rule and what its counter said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Verdict {
    pub(crate) kind: RuleKind,
    pub(crate) rate: Rate,
    pub(crate) outcome: Outcome,
}

/// What tollgate decided for one request. Every response the layer touched carries it in
/// its extensions, so outer layers can log or reshape it. It holds no identity.
///
/// When rules reject, the rejecting rule with the longest wait speaks for the decision:
/// `Retry-After`, `X-RateLimit-Limit`/`Reset`, `RateLimit` and the 429 body all describe
/// it, so a client that obeys any of them is not refused again by another rule. When all
/// allow, the rule with the fewest remaining speaks. Ties go to the first in rule order:
/// user, tenant, tool, user×tool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    verdicts: [Option<Verdict>; MAX_KEYS],
    speaker: Option<u8>,
    allowed: bool,
    retry_after: u64,
    now: u64,
}

impl Decision {
    /// `verdicts` in rule order (user, tenant, tool, user×tool); `now` in µs since the
    /// epoch.
    pub(crate) fn new(verdicts: [Option<Verdict>; MAX_KEYS], now: u64) -> Decision {
        let allowed = verdicts.iter().flatten().all(|v| v.outcome.allowed);
        // Allowed: the fewest remaining. Refused: the longest wait among the refusing
        // rules (ARCHITECTURE.md, behaviour contract item 7). min_by_key keeps the first
        // of equals: rule order breaks ties.
        let by_rank = |v: &Verdict| {
            if allowed {
                (v.outcome.remaining, Reverse(0))
            } else {
                (0, Reverse(v.outcome.retry_after))
            }
        };
        let speaker = verdicts
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.as_ref().map(|v| (i, v)))
            .filter(|(_, v)| allowed || !v.outcome.allowed)
            .min_by_key(|(_, v)| by_rank(v))
            .map(|(i, _)| i as u8);
        // A client that waits this long is allowed by every rejecting rule.
        let retry_after = verdicts
            .iter()
            .flatten()
            .filter(|v| !v.outcome.allowed)
            .map(|v| v.outcome.retry_after)
            .max()
            .unwrap_or(0);
        Decision {
            verdicts,
            speaker,
            allowed,
            retry_after,
            now,
        }
    }

    /// A decision with no applicable rule: allowed, no rate headers.
    pub(crate) fn unlimited(now: u64) -> Decision {
        Decision::new([None; MAX_KEYS], now)
    }

    fn speaking(&self) -> Option<&Verdict> {
        self.speaker
            .and_then(|i| self.verdicts[usize::from(i)].as_ref())
    }

    /// Whether every applicable rule allowed the request. In permissive mode a request
    /// can be forwarded although this is `false`.
    pub fn is_allowed(&self) -> bool {
        self.allowed
    }

    /// The rule that speaks for this decision, if any rule applied.
    pub fn rule(&self) -> Option<RuleKind> {
        self.speaking().map(|v| v.kind)
    }

    /// The speaking rule's count per period.
    pub fn limit(&self) -> Option<u64> {
        self.speaking().map(|v| v.rate.count())
    }

    /// Requests the speaking rule has left (0 when rejected).
    pub fn remaining(&self) -> Option<u64> {
        self.speaking().map(|v| v.outcome.remaining)
    }

    /// Time until the speaking rule resets; zero without rules.
    pub fn reset_after(&self) -> Duration {
        Duration::from_micros(self.speaking().map_or(0, |v| v.outcome.reset_after))
    }

    /// For a rejected request: how long until every rejecting rule would allow it.
    pub fn retry_after(&self) -> Option<Duration> {
        (!self.allowed).then(|| Duration::from_micros(self.retry_after))
    }

    /// The rules that rejected the request, in rule order.
    pub fn violated(&self) -> impl Iterator<Item = RuleKind> + '_ {
        self.verdicts
            .iter()
            .flatten()
            .filter(|v| !v.outcome.allowed)
            .map(|v| v.kind)
    }

    /// Every applicable rule with its rate, in rule order.
    pub fn rules(&self) -> impl Iterator<Item = (RuleKind, Rate)> + '_ {
        self.verdicts.iter().flatten().map(|v| (v.kind, v.rate))
    }

    pub(crate) fn verdicts(&self) -> impl Iterator<Item = &Verdict> {
        self.verdicts.iter().flatten()
    }

    pub(crate) fn speaking_verdict(&self) -> Option<&Verdict> {
        self.speaking()
    }

    /// Unix epoch seconds at which the speaking rule resets, rounded up.
    pub(crate) fn reset_epoch_secs(&self) -> Option<u64> {
        self.speaking().map(|v| {
            // The store's own statement when it has one (Redis's clock, the same for
            // every instance), else this instance's clock.
            let at = match v.outcome.reset_at {
                0 => self.now.saturating_add(v.outcome.reset_after),
                at => at,
            };
            at.div_ceil(1_000_000)
        })
    }

    /// Whole seconds to wait, rounded up, at least 1.
    pub(crate) fn retry_after_secs(&self) -> u64 {
        self.retry_after.div_ceil(1_000_000).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(kind: RuleKind, allowed: bool, remaining: u64, reset: u64) -> Option<Verdict> {
        Some(Verdict {
            kind,
            rate: Rate::per_minute(10),
            outcome: Outcome {
                allowed,
                remaining,
                reset_after: reset,
                retry_after: if allowed { 0 } else { reset },
                reset_at: 0,
            },
        })
    }
    use RuleKind::*;

    /// Regression: the rejecting rule with the
    /// soonest reset spoke for X-RateLimit-Limit/Reset while Retry-After was the longest
    /// wait, so a client following Reset came back too early.
    #[test]
    fn rejecting_rule_with_the_longest_wait_speaks() {
        let d = Decision::new(
            [
                v(User, true, 5, 1),
                v(Tenant, false, 0, 30_000_000),
                v(Tool, false, 0, 20_000_000),
                v(UserTool, false, 0, 25_000_000),
            ],
            0,
        );
        assert!(!d.is_allowed());
        assert_eq!(d.rule(), Some(Tenant));
        assert_eq!(d.violated().collect::<Vec<_>>(), [Tenant, Tool, UserTool]);
        assert_eq!(d.retry_after(), Some(Duration::from_secs(30)));
        assert_eq!(d.reset_after(), Duration::from_secs(30));
        assert_eq!(d.reset_epoch_secs(), Some(30));
        assert_eq!(d.retry_after_secs(), 30);
        // The wait decides, not the reset: a token bucket refusing for 2 s whose bucket
        // is full again in 50 s speaks over a window refusing for 10 s.
        let mut bucket = v(User, false, 0, 50_000_000).unwrap();
        bucket.outcome.retry_after = 2_000_000;
        let d = Decision::new(
            [Some(bucket), None, None, v(UserTool, false, 0, 10_000_000)],
            0,
        );
        assert_eq!(d.rule(), Some(UserTool));
        assert_eq!(d.retry_after_secs(), 10);
        assert_eq!(d.reset_epoch_secs(), Some(10));
    }

    #[test]
    fn ties_go_to_user_then_tenant_then_tool() {
        let d = Decision::new(
            [
                v(User, false, 0, 9),
                v(Tenant, false, 0, 9),
                v(Tool, false, 0, 9),
                v(UserTool, false, 0, 9),
            ],
            0,
        );
        assert_eq!(d.rule(), Some(User));
        let d = Decision::new(
            [
                v(User, true, 0, 9),
                v(Tenant, false, 0, 9),
                v(Tool, false, 0, 9),
                None,
            ],
            0,
        );
        assert_eq!(d.rule(), Some(Tenant));
        let d = Decision::new(
            [
                v(User, true, 3, 9),
                v(Tenant, true, 3, 1),
                v(Tool, true, 3, 1),
                v(UserTool, true, 3, 1),
            ],
            0,
        );
        assert_eq!(d.rule(), Some(User));
        let d = Decision::new([None, v(Tenant, true, 2, 9), v(Tool, true, 2, 1), None], 0);
        assert_eq!(d.rule(), Some(Tenant));
        let d = Decision::new(
            [None, None, v(Tool, false, 0, 4), v(UserTool, false, 0, 4)],
            0,
        );
        assert_eq!(d.rule(), Some(Tool));
    }

    #[test]
    fn fewest_remaining_speaks_when_all_allow() {
        let d = Decision::new(
            [
                v(User, true, 7, 1),
                v(Tenant, true, 2, 50),
                v(Tool, true, 4, 3),
                v(UserTool, true, 3, 3),
            ],
            0,
        );
        assert!(d.is_allowed());
        assert_eq!(
            (d.rule(), d.remaining(), d.retry_after()),
            (Some(Tenant), Some(2), None)
        );
    }

    #[test]
    fn no_rule_means_allowed_without_a_speaker() {
        let d = Decision::unlimited(5);
        assert!(d.is_allowed());
        assert_eq!(
            (d.rule(), d.limit(), d.reset_epoch_secs()),
            (None, None, None)
        );
    }
}
