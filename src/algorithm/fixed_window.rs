//! Fixed window: a window opens at a key's first counted request and lasts one period.
//! Mirrored by `fixed_window` in `src/store/lua/algorithms.lua`.

use super::state::{adjusted, State, Step};
use crate::rate::Rate;

/// A call of `cost` units at `now` (µs). It fits when the window has `cost` units left
/// (a cost of 0 always fits and counts nothing); one that does not fit waits for the
/// window's end, when every unit is back.
pub(super) fn check(state: Option<State>, now: u64, rate: Rate, cost: u64) -> Step {
    let period = rate.period_micros();
    let limit = rate.count();
    // A window whose end has passed is gone. A window that starts after `now` (the clock
    // stepped back) stays: the user waits for its end, never less.
    let (start, used) = match state {
        Some(s) if now < s.t.saturating_add(period) => (s.t, u64::from(s.cur)),
        _ => (now, 0),
    };
    let end = start.saturating_add(period);
    let reset_after = end - now;
    if cost == 0 || used + cost <= limit {
        Step {
            allowed: true,
            remaining: limit.saturating_sub(used + cost),
            reset_after,
            retry_after: 0,
            next: State {
                t: start,
                cur: (used + cost) as u32,
                prev: 0,
            },
        }
    } else {
        Step {
            allowed: false,
            remaining: limit.saturating_sub(used),
            reset_after,
            retry_after: reset_after,
            next: State {
                t: start,
                cur: used.min(u64::from(u32::MAX)) as u32,
                prev: 0,
            },
        }
    }
}

/// `state` after `delta` units more (or fewer) for a call counted at `at`: only while the
/// window that counted it is the stored one; `None` when it has ended (nothing to settle).
pub(super) fn settle(state: State, at: u64, rate: Rate, delta: i64, cap: u64) -> Option<State> {
    let in_window = state.t <= at && at < state.t.saturating_add(rate.period_micros());
    in_window.then(|| State {
        cur: adjusted(state.cur, delta, cap),
        ..state
    })
}
