//! Sliding-window counter. Windows are aligned to multiples of the period; a call of cost
//! `c` is allowed when `floor(prev × (P − e) / P) + cur + c ≤ limit`, where `e` is the time
//! elapsed in the current window, in whole milliseconds. Mirrored by `sliding_window` in
//! `src/store/lua/algorithms.lua`, which computes in doubles: every product here stays
//! at or below 2^53 (see [`supports`] and [`cap`]), so both agree exactly.

use super::state::{adjusted, State, Step};
use crate::rate::Rate;

/// Products of a count and a period in ms must stay exact in a double.
pub(super) fn supports(rate: Rate) -> bool {
    rate.count() * u64::from(rate.period_secs()) * 1_000 <= 1 << 53
}

/// The most units one window may hold (settling can put a rule in debt): twice the
/// limit, and no more than keeps `count × period in ms` exact in a double.
pub(super) fn cap(rate: Rate) -> u64 {
    let exact = (1u64 << 53) / (u64::from(rate.period_secs()) * 1_000);
    (2 * rate.count()).min(exact)
}

pub(super) fn check(state: Option<State>, now: u64, rate: Rate, cost: u64) -> Step {
    let period = rate.period_micros();
    let period_ms = period / 1_000;
    let limit = rate.count();
    // The clock stepped back behind the stored window: decide as at that window's start.
    let at = match state {
        Some(s) if s.t > now => s.t,
        _ => now,
    };
    let start = at - at % period;
    let (cur, prev) = match state {
        Some(s) if s.t == start => (u64::from(s.cur), u64::from(s.prev)),
        Some(s) if s.t.saturating_add(period) == start => (0, u64::from(s.cur)),
        _ => (0, 0),
    };
    let elapsed_ms = (at - start) / 1_000;
    let weighted = weigh(prev, period_ms - elapsed_ms, period_ms);
    let used = weighted + cur;
    let end = start.saturating_add(period);
    let reset_after = end - now;
    if cost == 0 || used + cost <= limit {
        return Step {
            allowed: true,
            remaining: limit.saturating_sub(used + cost),
            reset_after,
            retry_after: 0,
            next: State {
                t: start,
                cur: (cur + cost) as u32,
                prev: prev as u32,
            },
        };
    }
    // The first millisecond `e` at which floor(p × (P − e) / P) + c + cost ≤ limit, i.e.
    // floor(p × (P − e) / P) < room with room = limit − c − cost + 1: e = P −
    // ceil(room × P / p) + 1, in this window (p = prev, c = cur) or, when this window's
    // own count leaves no room for the cost, in the next one (p = cur, c = 0).
    let wait_until = if cur + cost <= limit {
        start.saturating_add(first_ms(limit - cur - cost + 1, prev, period_ms) * 1_000)
    } else {
        end.saturating_add(first_ms(limit + 1 - cost, cur, period_ms) * 1_000)
    };
    Step {
        allowed: false,
        remaining: limit.saturating_sub(used),
        reset_after,
        retry_after: (wait_until - now).max(1),
        next: State {
            t: start,
            cur: cur as u32,
            prev: prev as u32,
        },
    }
}

/// `state` after `delta` units more (or fewer) for a call counted at `at`: in the
/// aligned window that counted it, still the current one (`cur`) or, once the next has
/// begun, the previous one (`prev`); `None` once it weighs on nothing.
pub(super) fn settle(state: State, at: u64, rate: Rate, delta: i64, cap: u64) -> Option<State> {
    let period = rate.period_micros();
    let start = at - at % period;
    if state.t == start {
        Some(State {
            cur: adjusted(state.cur, delta, cap),
            ..state
        })
    } else if state.t == start.saturating_add(period) {
        Some(State {
            prev: adjusted(state.prev, delta, cap),
            ..state
        })
    } else {
        None
    }
}

fn weigh(prev: u64, left_ms: u64, period_ms: u64) -> u64 {
    (u128::from(prev) * u128::from(left_ms) / u128::from(period_ms)) as u64
}

fn first_ms(room: u64, prev: u64, period_ms: u64) -> u64 {
    let x = u128::from(room) * u128::from(period_ms);
    let ceil = x.div_ceil(u128::from(prev.max(1)));
    (u128::from(period_ms) + 1)
        .saturating_sub(ceil)
        .min(u128::from(period_ms)) as u64
}
