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

    /// One rule's check at `now` (µs since the epoch). `state` is what the store holds
    /// for the key, if anything.
    #[inline]
    pub(crate) fn check(self, state: Option<State>, now: u64, rate: Rate) -> Step {
        match self {
            Algorithm::FixedWindow => fixed_window::check(state, now, rate),
            Algorithm::SlidingWindow => sliding_window::check(state, now, rate),
            Algorithm::TokenBucket => token_bucket::check(state, now, rate),
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
                let step = alg.check(state, now, rate);
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
            let step = Algorithm::TokenBucket.check(state, T0, rate);
            assert!(step.allowed, "call {i}");
            assert_eq!(step.remaining, 4 - i);
            state = Some(step.next);
        }
        let sixth = Algorithm::TokenBucket.check(state, T0, rate);
        assert!(!sixth.allowed);
        assert_eq!(sixth.retry_after, 200_000);
        assert!(
            !Algorithm::TokenBucket
                .check(state, T0 + 199_999, rate)
                .allowed
        );
        let later = Algorithm::TokenBucket.check(state, T0 + 200_000, rate);
        assert!(later.allowed);
        assert_eq!(later.remaining, 0);
    }

    #[test]
    fn fixed_window_starts_at_first_request_and_resets_after_one_period() {
        let rate = Rate::per_minute(2);
        let start = T0 + 12_345;
        let a = Algorithm::FixedWindow.check(None, start, rate);
        assert!(a.allowed && a.remaining == 1 && a.reset_after == 60_000_000);
        let b = Algorithm::FixedWindow.check(Some(a.next), start + 1_000_000, rate);
        assert!(b.allowed && b.remaining == 0 && b.reset_after == 59_000_000);
        let c = Algorithm::FixedWindow.check(Some(b.next), start + 2_000_000, rate);
        assert!(!c.allowed && c.retry_after == 58_000_000);
        let d = Algorithm::FixedWindow.check(Some(b.next), start + 60_000_000, rate);
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
                    let step = alg.check(state, now, rate);
                    if step.allowed {
                        state = Some(step.next);
                        continue;
                    }
                    assert!(step.retry_after > 0, "{alg} {rate}");
                    assert!(
                        !alg.check(state, now + step.retry_after - 1, rate).allowed,
                        "{alg} {rate} early"
                    );
                    now += step.retry_after;
                    assert!(alg.check(state, now, rate).allowed, "{alg} {rate} on time");
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
                let step = alg.check(state, now, rate);
                if step.allowed { state = Some(step.next); }
            }
            let state = state.unwrap_or_default();
            let at = alg.expires_at(&state, rate.period_micros()) + later;
            prop_assert_eq!(alg.check(Some(state), at, rate), alg.check(None, at, rate));
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
            let step = alg.check(Some(State { t: T0 + t, cur, prev }), T0 + now, rate);
            prop_assert!(step.remaining < rate.count());
            if step.allowed { prop_assert_eq!(step.retry_after, 0); } else { prop_assert!(step.retry_after > 0); }
        }
    }
}
