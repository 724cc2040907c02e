//! Per-rule outcomes → one [`Decision`] (ARCHITECTURE.md, behaviour contract item 7).

use std::time::Duration;

use crate::key::{RuleKind, MAX_KEYS};
use crate::rate::Rate;
use crate::store::Outcome;

/// One applicable rule and what its counter said (tests build decisions from these).
#[cfg(test)]
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
///
/// Two decisions are equal when everything they state is: the rules with their rates and
/// answers, the speaking rule's figures, and the waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    // 88 bytes, not the 248 of four whole verdicts: a decision is moved through every
    // response future and boxed into the response's extensions, so it keeps only what it
    // states. The rules that do not speak are known by kind, rate and answer alone.
    rules: [Option<Rule>; MAX_KEYS],
    /// Index into `rules` of the speaking rule; [`NO_SPEAKER`] when no rule applied.
    speaker: u8,
    allowed: bool,
    /// The call costs more than a rule's whole limit: it can never fit.
    exceeds: bool,
    /// The units the call cost (counted under every rule when allowed), saturating.
    cost: u32,
    /// The speaking rule's remaining requests (0 without a speaker).
    remaining: u64,
    /// µs until the speaking rule resets (0 without a speaker).
    reset_after: u64,
    /// When the speaking rule resets, µs since the epoch: the store's own statement when
    /// it made one, else the decision's time plus `reset_after` (0 without a speaker).
    reset_at: u64,
    /// µs until every rejecting rule would allow the request (0 when allowed).
    retry_after: u64,
}

/// One applicable rule as a [`Decision`] keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Rule {
    kind: RuleKind,
    allowed: bool,
    rate: Rate,
}

const NO_SPEAKER: u8 = u8::MAX;

/// The rule that speaks for a decision, with its counter's figures.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Speaker {
    pub(crate) kind: RuleKind,
    pub(crate) rate: Rate,
    pub(crate) remaining: u64,
    /// µs until the rule resets.
    pub(crate) reset_after: u64,
}

impl Decision {
    /// Slot `i` of `rules` answered by slot `i` of `outcomes` (a rule applies where both
    /// are present), in rule order (user, tenant, tool, user×tool); `now` in µs since
    /// the epoch. The two arrays are read in place: the layer's plan and the store's
    /// answer, with no per-rule copy between them.
    pub(crate) fn new(
        rules: &[Option<(RuleKind, Rate)>; MAX_KEYS],
        outcomes: &[Option<Outcome>; MAX_KEYS],
        now: u64,
        cost: u64,
    ) -> Decision {
        // Allowed: the fewest remaining speaks. Refused: the longest wait among the
        // refusing rules (ARCHITECTURE.md, behaviour contract item 7). Only a strictly
        // better rank replaces a candidate, so rule order breaks ties. One plain pass
        // over the four slots, ranking both ways: this runs on every request.
        let mut allowed = true;
        let mut fewest: Option<(usize, &Outcome)> = None;
        let mut longest: Option<(usize, &Outcome)> = None;
        let mut retry_after = 0;
        let mut kept = [None; MAX_KEYS];
        for i in 0..MAX_KEYS {
            let (Some((kind, rate)), Some(o)) = (rules[i], &outcomes[i]) else {
                continue;
            };
            kept[i] = Some(Rule {
                kind,
                allowed: o.allowed,
                rate,
            });
            if o.allowed {
                if fewest.map_or(true, |(_, s)| o.remaining < s.remaining) {
                    fewest = Some((i, o));
                }
            } else {
                allowed = false;
                if longest.map_or(true, |(_, s)| o.retry_after > s.retry_after) {
                    longest = Some((i, o));
                }
                // A client that waits this long is allowed by every rejecting rule.
                retry_after = retry_after.max(o.retry_after);
            }
        }
        let speaker = if allowed { fewest } else { longest };
        let mut decision = Decision {
            rules: kept,
            speaker: NO_SPEAKER,
            allowed,
            exceeds: false,
            cost: u32::try_from(cost).unwrap_or(u32::MAX),
            remaining: 0,
            reset_after: 0,
            reset_at: 0,
            retry_after,
        };
        if let Some((i, o)) = speaker {
            decision.speaker = i as u8;
            decision.remaining = o.remaining;
            decision.reset_after = o.reset_after;
            // The store's own statement when it has one (Redis's clock, the same for
            // every instance), else this instance's clock.
            decision.reset_at = match o.reset_at {
                0 => now.saturating_add(o.reset_after),
                at => at,
            };
        }
        decision
    }

    /// A decision from whole verdicts, slot by slot (tests).
    #[cfg(test)]
    pub(crate) fn of_verdicts(verdicts: &[Option<Verdict>; MAX_KEYS], now: u64) -> Decision {
        let rules = verdicts.map(|v| v.map(|v| (v.kind, v.rate)));
        let outcomes = verdicts.map(|v| v.map(|v| v.outcome));
        Decision::new(&rules, &outcomes, now, 1)
    }

    /// A decision with no applicable rule: allowed, no rate headers.
    pub(crate) fn unlimited(now: u64, cost: u64) -> Decision {
        Decision::new(&[None; MAX_KEYS], &[None; MAX_KEYS], now, cost)
    }

    /// The rule among `rules` whose whole limit a call of `cost` units exceeds, if any
    /// (the first in rule order): then the call can never fit.
    pub(crate) fn exceeded(
        rules: &[Option<(RuleKind, Rate)>; MAX_KEYS],
        cost: u64,
    ) -> Option<usize> {
        rules
            .iter()
            .position(|r| r.is_some_and(|(_, rate)| cost > rate.count()))
    }

    /// The refusal of a call of `cost` units that rule `index` of `rules` can never
    /// allow: no store was asked, nothing counted, and no wait would help.
    pub(crate) fn exceeding(
        rules: &[Option<(RuleKind, Rate)>; MAX_KEYS],
        index: usize,
        now: u64,
        cost: u64,
    ) -> Decision {
        let mut kept = [None; MAX_KEYS];
        for (slot, rule) in kept.iter_mut().zip(rules) {
            *slot = rule.map(|(kind, rate)| Rule {
                kind,
                allowed: cost <= rate.count(),
                rate,
            });
        }
        Decision {
            rules: kept,
            speaker: index as u8,
            allowed: false,
            exceeds: true,
            cost: u32::try_from(cost).unwrap_or(u32::MAX),
            remaining: 0,
            reset_after: 0,
            reset_at: now,
            retry_after: 0,
        }
    }

    fn speaking_rule(&self) -> Option<&Rule> {
        self.rules.get(usize::from(self.speaker))?.as_ref()
    }

    /// The speaking rule and its figures, if any rule applied.
    pub(crate) fn speaking(&self) -> Option<Speaker> {
        self.speaking_rule().map(|r| Speaker {
            kind: r.kind,
            rate: r.rate,
            remaining: self.remaining,
            reset_after: self.reset_after,
        })
    }

    /// Whether every applicable rule allowed the request. In permissive mode a request
    /// can be forwarded although this is `false`.
    pub fn is_allowed(&self) -> bool {
        self.allowed
    }

    /// The rule that speaks for this decision, if any rule applied.
    pub fn rule(&self) -> Option<RuleKind> {
        self.speaking_rule().map(|r| r.kind)
    }

    /// The speaking rule's count per period.
    pub fn limit(&self) -> Option<u64> {
        self.speaking_rule().map(|r| r.rate.count())
    }

    /// Units the speaking rule has left: after this call when allowed; when refused,
    /// what it has now (fewer than the call costs).
    pub fn remaining(&self) -> Option<u64> {
        self.speaking_rule().map(|_| self.remaining)
    }

    /// Time until the speaking rule resets; zero without rules.
    pub fn reset_after(&self) -> Duration {
        Duration::from_micros(self.reset_after)
    }

    /// For a rejected request: how long until every rejecting rule would allow it;
    /// `None` when allowed, or when the call costs more than a rule's whole limit (no wait
    /// helps: [`Decision::exceeds_limit`]).
    pub fn retry_after(&self) -> Option<Duration> {
        (!self.allowed && !self.exceeds).then(|| Duration::from_micros(self.retry_after))
    }

    /// The units the call cost: counted under every rule when allowed (1 unless its
    /// [`Cost`](crate::Cost), cost header or `[cost]` price said otherwise). Saturates at
    /// `u32::MAX`, far above any limit.
    pub fn cost(&self) -> u64 {
        u64::from(self.cost)
    }

    /// Whether the call was refused because it costs more than a rule's whole limit
    /// (problem code `COST_EXCEEDS_LIMIT`): retrying cannot help.
    pub fn exceeds_limit(&self) -> bool {
        self.exceeds
    }

    /// The rules that rejected the request, in rule order.
    pub fn violated(&self) -> impl Iterator<Item = RuleKind> + '_ {
        self.rules
            .iter()
            .flatten()
            .filter(|r| !r.allowed)
            .map(|r| r.kind)
    }

    /// Every applicable rule with its rate, in rule order.
    pub fn rules(&self) -> impl Iterator<Item = (RuleKind, Rate)> + '_ {
        self.rules.iter().flatten().map(|r| (r.kind, r.rate))
    }

    /// Unix epoch seconds at which the speaking rule resets, rounded up.
    pub(crate) fn reset_epoch_secs(&self) -> Option<u64> {
        self.speaking_rule()
            .map(|_| self.reset_at.div_ceil(1_000_000))
    }

    /// Whole seconds to wait, rounded up, at least 1.
    pub(crate) fn retry_after_secs(&self) -> u64 {
        self.retry_after.div_ceil(1_000_000).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
                by_fallback: false,
            },
        })
    }
    use RuleKind::*;

    /// Regression: the rejecting rule with the
    /// soonest reset spoke for X-RateLimit-Limit/Reset while Retry-After was the longest
    /// wait, so a client following Reset came back too early.
    #[test]
    fn rejecting_rule_with_the_longest_wait_speaks() {
        let d = Decision::of_verdicts(
            &[
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
        let d = Decision::of_verdicts(
            &[Some(bucket), None, None, v(UserTool, false, 0, 10_000_000)],
            0,
        );
        assert_eq!(d.rule(), Some(UserTool));
        assert_eq!(d.retry_after_secs(), 10);
        assert_eq!(d.reset_epoch_secs(), Some(10));
    }

    #[test]
    fn ties_go_to_user_then_tenant_then_tool() {
        let d = Decision::of_verdicts(
            &[
                v(User, false, 0, 9),
                v(Tenant, false, 0, 9),
                v(Tool, false, 0, 9),
                v(UserTool, false, 0, 9),
            ],
            0,
        );
        assert_eq!(d.rule(), Some(User));
        let d = Decision::of_verdicts(
            &[
                v(User, true, 0, 9),
                v(Tenant, false, 0, 9),
                v(Tool, false, 0, 9),
                None,
            ],
            0,
        );
        assert_eq!(d.rule(), Some(Tenant));
        let d = Decision::of_verdicts(
            &[
                v(User, true, 3, 9),
                v(Tenant, true, 3, 1),
                v(Tool, true, 3, 1),
                v(UserTool, true, 3, 1),
            ],
            0,
        );
        assert_eq!(d.rule(), Some(User));
        let d = Decision::of_verdicts(&[None, v(Tenant, true, 2, 9), v(Tool, true, 2, 1), None], 0);
        assert_eq!(d.rule(), Some(Tenant));
        let d = Decision::of_verdicts(
            &[None, None, v(Tool, false, 0, 4), v(UserTool, false, 0, 4)],
            0,
        );
        assert_eq!(d.rule(), Some(Tool));
    }

    #[test]
    fn fewest_remaining_speaks_when_all_allow() {
        let d = Decision::of_verdicts(
            &[
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

    /// The decision is moved through every response future and boxed into the response's
    /// extensions; it was 248 bytes while it kept four whole verdicts.
    #[test]
    fn a_decision_stays_small() {
        assert!(std::mem::size_of::<Decision>() <= 88);
    }

    fn any_verdict() -> impl Strategy<Value = Option<Verdict>> {
        let kinds = prop_oneof![Just(User), Just(Tenant), Just(Tool), Just(UserTool)];
        proptest::option::of(
            (kinds, any::<bool>(), 0u64..4, 0u64..4, 0u64..4, 0u64..3).prop_map(
                |(kind, allowed, remaining, reset, retry, reset_at)| Verdict {
                    kind,
                    rate: Rate::per_minute(10),
                    outcome: Outcome {
                        allowed,
                        remaining: if allowed { remaining } else { 0 },
                        reset_after: reset,
                        retry_after: if allowed { 0 } else { retry + 1 },
                        reset_at: reset_at * 1_000_000,
                        by_fallback: false,
                    },
                },
            ),
        )
    }

    proptest! {
        /// The speaker, the wait and the reset are those of the rule that ranks first,
        /// ties going to rule order (the definition behaviour contract item 7 states,
        /// written as plainly as possible).
        #[test]
        fn the_speaker_is_the_first_of_the_best_ranked(
            verdicts in proptest::array::uniform4(any_verdict()),
            now in 0u64..3_000_000,
        ) {
            let d = Decision::of_verdicts(&verdicts, now);
            let present: Vec<(usize, Verdict)> = verdicts
                .iter()
                .enumerate()
                .filter_map(|(i, v)| v.map(|v| (i, v)))
                .collect();
            let allowed = present.iter().all(|(_, v)| v.outcome.allowed);
            let rank = |v: &Verdict| {
                if allowed {
                    (v.outcome.remaining, std::cmp::Reverse(0))
                } else {
                    (0, std::cmp::Reverse(v.outcome.retry_after))
                }
            };
            let speaker = present
                .iter()
                .filter(|(_, v)| allowed || !v.outcome.allowed)
                .min_by_key(|(_, v)| rank(v))
                .map(|(_, v)| *v);
            prop_assert_eq!(d.is_allowed(), allowed);
            prop_assert_eq!(d.rule(), speaker.map(|v| v.kind));
            prop_assert_eq!(d.remaining(), speaker.map(|v| v.outcome.remaining));
            prop_assert_eq!(
                d.reset_after(),
                Duration::from_micros(speaker.map_or(0, |v| v.outcome.reset_after))
            );
            prop_assert_eq!(
                d.reset_epoch_secs(),
                speaker.map(|v| match v.outcome.reset_at {
                    0 => now + v.outcome.reset_after,
                    at => at,
                }
                .div_ceil(1_000_000))
            );
            let wait = present
                .iter()
                .filter(|(_, v)| !v.outcome.allowed)
                .map(|(_, v)| v.outcome.retry_after)
                .max();
            prop_assert_eq!(d.retry_after(), wait.map(Duration::from_micros));
            prop_assert_eq!(
                d.violated().collect::<Vec<_>>(),
                present
                    .iter()
                    .filter(|(_, v)| !v.outcome.allowed)
                    .map(|(_, v)| v.kind)
                    .collect::<Vec<_>>()
            );
            prop_assert_eq!(d.rules().count(), present.len());
        }
    }

    #[test]
    fn no_rule_means_allowed_without_a_speaker() {
        let d = Decision::unlimited(5, 1);
        assert!(d.is_allowed());
        assert_eq!(
            (d.rule(), d.limit(), d.reset_epoch_secs()),
            (None, None, None)
        );
    }
}
