//! The three algorithms as pure integer functions of (state, now, rate).
//!
//! Each `check` returns the outcome for one rule and the state to write if the request is
//! allowed everywhere; the caller writes it only then (all-or-nothing). The Lua scripts in
//! `src/store/lua/` mirror these functions line for line, on the same integers
//! (microseconds since the Unix epoch), so memory and Redis agree exactly.

mod fixed_window;
mod sliding_window;
mod state;
mod token_bucket;

pub(crate) use state::{State, Step};

use crate::rate::MAX_COUNT;

use std::fmt;

use crate::rate::Rate;

/// How requests are counted against a [`Rate`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Algorithm {
    /// A window starts at a key's first counted request and lasts one period. Cheap and
    /// easy to explain; up to twice the count can pass around a window edge.
    #[default]
    FixedWindow,
    /// Sliding-window counter: the previous aligned window, weighted by how much of it
    /// still overlaps the last period, plus the current window. Smooth at the edges.
    SlidingWindow,
    /// GCRA token bucket: a burst of `count`, then one request every `period / count`.
    TokenBucket,
}

impl Algorithm {
    /// The name used in configuration: `fixed_window`, `sliding_window`, `token_bucket`.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::FixedWindow => "fixed_window",
            Algorithm::SlidingWindow => "sliding_window",
            Algorithm::TokenBucket => "token_bucket",
        }
    }

    /// One rule's check of a call of `cost` units at `now` (µs since the epoch). `state`
    /// is what the store holds for the key, if anything. A cost above the rule's limit
    /// never fits (the layer refuses such a call before asking a store); it is decided as
    /// a cost of one more than the limit, which is refused.
    #[inline]
    pub(crate) fn check(self, state: Option<State>, now: u64, rate: Rate, cost: u64) -> Step {
        let cost = cost.min(rate.count() + 1);
        match self {
            Algorithm::FixedWindow => fixed_window::check(state, now, rate, cost),
            Algorithm::SlidingWindow => sliding_window::check(state, now, rate, cost),
            Algorithm::TokenBucket => token_bucket::check(state, now, rate, cost),
        }
    }

    /// A call of one unit (tests).
    #[cfg(test)]
    pub(crate) fn check1(self, state: Option<State>, now: u64, rate: Rate) -> Step {
        self.check(state, now, rate, 1)
    }

    /// `state` after a call counted at `at` (µs, on the store's clock) is charged `delta`
    /// units more (or, negative, given `-delta` back) at `now`; `None` when the state no
    /// longer holds that call's count (its window has ended), so nothing changes. A rule
    /// may go into debt this way, up to [`Algorithm::cap`]: later calls are refused until
    /// the window, the slide or the refill has paid it off.
    pub(crate) fn settle(
        self,
        state: State,
        at: u64,
        now: u64,
        rate: Rate,
        delta: i64,
    ) -> Option<State> {
        match self {
            Algorithm::FixedWindow => fixed_window::settle(state, at, rate, delta, self.cap(rate)),
            Algorithm::SlidingWindow => {
                sliding_window::settle(state, at, rate, delta, self.cap(rate))
            }
            Algorithm::TokenBucket => Some(token_bucket::settle(state, now, rate, delta)),
        }
    }

    /// The most units a window may hold once settled into debt: twice the limit (one
    /// limit's worth of debt), at most 10^9 (a stored count's range), and for a sliding
    /// window no more than keeps its products exact. A token bucket's debt is bounded
    /// the same way, at one full bucket beyond empty.
    pub(crate) fn cap(self, rate: Rate) -> u64 {
        let cap = (2 * rate.count()).min(MAX_COUNT);
        match self {
            Algorithm::SlidingWindow => cap.min(sliding_window::cap(rate)),
            _ => cap,
        }
    }

    /// When `state` stops mattering (µs since the epoch): from then on, checking with it
    /// gives the same answer as checking with no state at all.
    #[inline]
    pub(crate) fn expires_at(self, state: &State, period_micros: u64) -> u64 {
        match self {
            Algorithm::FixedWindow => state.t.saturating_add(period_micros),
            // The previous window still weighs on the next one.
            Algorithm::SlidingWindow => state.t.saturating_add(2 * period_micros),
            Algorithm::TokenBucket => state.t,
        }
    }

    /// Whether `rate` can be computed exactly by this algorithm in Lua's doubles.
    pub(crate) fn supports(self, rate: Rate) -> bool {
        match self {
            Algorithm::SlidingWindow => sliding_window::supports(rate),
            _ => true,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    const T0: u64 = 1_000 * 1_000_000;

    /// Runs allowed requests through `alg` as a store would: write only on allow.
    fn run(alg: Algorithm, rate: Rate, times: &[u64]) -> Vec<bool> {
        let mut state = None;
        times
            .iter()
            .map(|&now| {
                let step = alg.check1(state, now, rate);
                if step.allowed {
                    state = Some(step.next);
                }
                step.allowed
            })
            .collect()
    }

    fn allowed(v: &[bool]) -> usize {
        v.iter().filter(|a| **a).count()
    }

    #[test]
    fn sliding_window_contract_examples() {
        let rate = Rate::per_second(5);
        let mut times = vec![T0; 5];
        times.extend([T0 + 500_000; 5]);
        assert_eq!(allowed(&run(Algorithm::SlidingWindow, rate, &times)), 5);

        let mut times = vec![T0 + 900_000; 5];
        times.extend([T0 + 1_100_000; 5]);
        let n = allowed(&run(Algorithm::SlidingWindow, rate, &times));
        assert!((5..=6).contains(&n), "{n}");
    }

    #[test]
    fn token_bucket_contract_example() {
        let rate = Rate::per_second(5);
        let mut state = None;
        for i in 0..5 {
            let step = Algorithm::TokenBucket.check1(state, T0, rate);
            assert!(step.allowed, "call {i}");
            assert_eq!(step.remaining, 4 - i);
            state = Some(step.next);
        }
        let sixth = Algorithm::TokenBucket.check1(state, T0, rate);
        assert!(!sixth.allowed);
        assert_eq!(sixth.retry_after, 200_000);
        assert!(
            !Algorithm::TokenBucket
                .check1(state, T0 + 199_999, rate)
                .allowed
        );
        let later = Algorithm::TokenBucket.check1(state, T0 + 200_000, rate);
        assert!(later.allowed);
        assert_eq!(later.remaining, 0);
    }

    #[test]
    fn fixed_window_starts_at_first_request_and_resets_after_one_period() {
        let rate = Rate::per_minute(2);
        let start = T0 + 12_345;
        let a = Algorithm::FixedWindow.check1(None, start, rate);
        assert!(a.allowed && a.remaining == 1 && a.reset_after == 60_000_000);
        let b = Algorithm::FixedWindow.check1(Some(a.next), start + 1_000_000, rate);
        assert!(b.allowed && b.remaining == 0 && b.reset_after == 59_000_000);
        let c = Algorithm::FixedWindow.check1(Some(b.next), start + 2_000_000, rate);
        assert!(!c.allowed && c.retry_after == 58_000_000);
        let d = Algorithm::FixedWindow.check1(Some(b.next), start + 60_000_000, rate);
        assert!(d.allowed && d.remaining == 1);
    }

    #[test]
    fn retry_after_is_exact_for_every_algorithm() {
        // Waiting `retry_after` allows the request; waiting 1 µs less does not.
        for alg in [
            Algorithm::FixedWindow,
            Algorithm::SlidingWindow,
            Algorithm::TokenBucket,
        ] {
            for rate in [
                Rate::per_second(3),
                Rate::per_minute(7),
                Rate::new(5, Duration::from_secs(10)).unwrap(),
            ] {
                let mut state = None;
                let mut now = T0 + 123_456;
                for _ in 0..200 {
                    let step = alg.check1(state, now, rate);
                    if step.allowed {
                        state = Some(step.next);
                        continue;
                    }
                    assert!(step.retry_after > 0, "{alg} {rate}");
                    assert!(
                        !alg.check1(state, now + step.retry_after - 1, rate).allowed,
                        "{alg} {rate} early"
                    );
                    now += step.retry_after;
                    assert!(alg.check1(state, now, rate).allowed, "{alg} {rate} on time");
                }
            }
        }
    }

    proptest! {
        /// Never more than 2 × count in any span of one period (a fixed window's edge, or a
        /// full bucket followed by its refill).
        #[test]
        fn never_more_than_the_limit_per_period(
            alg in prop_oneof![Just(Algorithm::FixedWindow), Just(Algorithm::SlidingWindow), Just(Algorithm::TokenBucket)],
            count in 1u32..20,
            secs in 1u32..5,
            gaps in proptest::collection::vec(0u64..400_000, 1..300),
        ) {
            let rate = Rate::new(u64::from(count), Duration::from_secs(u64::from(secs))).unwrap();
            let mut now = T0;
            let times: Vec<u64> = gaps.iter().map(|g| { now += g; now }).collect();
            let results = run(alg, rate, &times);
            let passed: Vec<u64> = times.iter().zip(&results).filter(|(_, a)| **a).map(|(t, _)| *t).collect();
            let period = rate.period_micros();
            for (i, &t) in passed.iter().enumerate() {
                let in_span = passed[i..].iter().take_while(|&&u| u < t + period).count();
                prop_assert!(in_span as u64 <= 2 * rate.count(), "{} in one period", in_span);
            }
        }

        /// Calls of any cost (ARCHITECTURE.md, behaviour contract item 19): a call is refused
        /// only if it does not fit what is left (its cost is more than the refusal's
        /// `remaining`); an allowed one leaves `remaining` after its cost; units admitted in
        /// one fixed window never pass the limit, and in any span of one period never pass
        /// twice the limit, whatever the algorithm.
        #[test]
        fn costs_are_admitted_only_when_they_fit(
            alg in prop_oneof![Just(Algorithm::FixedWindow), Just(Algorithm::SlidingWindow), Just(Algorithm::TokenBucket)],
            count in 1u32..30,
            secs in 1u32..5,
            calls in proptest::collection::vec((0u64..400_000, 0u64..35), 1..200),
        ) {
            let rate = Rate::new(u64::from(count), Duration::from_secs(u64::from(secs))).unwrap();
            let limit = rate.count();
            let mut state = None;
            let mut now = T0;
            let mut admitted: Vec<(u64, u64, u64)> = Vec::new();
            for (gap, cost) in calls {
                now += gap;
                let step = alg.check(state, now, rate, cost);
                if step.allowed {
                    prop_assert!(cost == 0 || cost <= limit);
                    if cost > 0 {
                        state = Some(step.next);
                        admitted.push((now, cost, step.next.t));
                    }
                } else {
                    prop_assert!(cost > step.remaining, "refused {} with {} left", cost, step.remaining);
                    prop_assert!(step.retry_after > 0);
                }
            }
            let period = rate.period_micros();
            for (i, &(t, _, _)) in admitted.iter().enumerate() {
                let in_span: u64 = admitted[i..].iter().take_while(|a| a.0 < t + period).map(|a| a.1).sum();
                prop_assert!(in_span <= 2 * limit, "{} units in one period", in_span);
            }
            if alg == Algorithm::FixedWindow {
                let mut per_window = std::collections::BTreeMap::new();
                for (_, cost, start) in &admitted {
                    *per_window.entry(*start).or_insert(0) += cost;
                }
                prop_assert!(per_window.values().all(|&units| units <= limit), "{:?}", per_window);
            }
        }

        /// Dropping state at `expires_at` never changes a decision.
        #[test]
        fn expired_state_is_the_same_as_no_state(
            alg in prop_oneof![Just(Algorithm::FixedWindow), Just(Algorithm::SlidingWindow), Just(Algorithm::TokenBucket)],
            count in 1u32..50,
            secs in 1u32..100,
            gaps in proptest::collection::vec(0u64..3_000_000, 1..40),
            later in 0u64..10_000_000,
        ) {
            let rate = Rate::new(u64::from(count), Duration::from_secs(u64::from(secs))).unwrap();
            let mut state = None;
            let mut now = T0;
            for g in gaps {
                now += g;
                let step = alg.check1(state, now, rate);
                if step.allowed { state = Some(step.next); }
            }
            let state = state.unwrap_or_default();
            let at = alg.expires_at(&state, rate.period_micros()) + later;
            prop_assert_eq!(alg.check1(Some(state), at, rate), alg.check1(None, at, rate));
        }

        #[test]
        fn outcomes_are_sane(
            alg in prop_oneof![Just(Algorithm::FixedWindow), Just(Algorithm::SlidingWindow), Just(Algorithm::TokenBucket)],
            count in 1u32..1000,
            secs in 1u32..100_000,
            t in 0u64..10_000_000_000,
            cur in 0u32..1000, prev in 0u32..1000,
            now in 0u64..10_000_000_000,
        ) {
            let rate = Rate::new(u64::from(count), Duration::from_secs(u64::from(secs))).unwrap();
            let step = alg.check1(Some(State { t: T0 + t, cur, prev }), T0 + now, rate);
            prop_assert!(step.remaining < rate.count());
            if step.allowed { prop_assert_eq!(step.retry_after, 0); } else { prop_assert!(step.retry_after > 0); }
        }
    }
}
