//! Sliding-window counter. Windows are aligned to multiples of the period; a request is
//! allowed when `floor(prev × (P − e) / P) + cur < limit`, where `e` is the time elapsed
//! in the current window, in whole milliseconds. Mirrored by
//! `src/store/lua/sliding_window.lua`, which computes in doubles: every product here stays
//! below 2^53 (see [`supports`]), so both agree exactly.

use super::state::{State, Step};
use crate::rate::Rate;

/// Products of a count and a period in ms must stay exact in a double.
pub(super) fn supports(rate: Rate) -> bool {
    rate.count() * u64::from(rate.period_secs()) * 1_000 <= 1 << 53
}

pub(super) fn check(state: Option<State>, now: u64, rate: Rate) -> Step {
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
    if used < limit {
        return Step {
            allowed: true,
            remaining: limit - used - 1,
            reset_after,
            retry_after: 0,
            next: State {
                t: start,
                cur: (cur + 1) as u32,
                prev: prev as u32,
            },
        };
    }
    // The first millisecond `e` at which floor(p × (P − e) / P) < limit − c, i.e.
    // e = P − ceil((limit − c) × P / p) + 1, in this window or (when this window's own
    // count is already at the limit) in the next one, where p = cur and c = 0.
    let wait_until = if cur < limit {
        start.saturating_add(first_ms(limit - cur, prev, period_ms) * 1_000)
    } else {
        end.saturating_add(first_ms(limit, cur, period_ms) * 1_000)
    };
    Step {
        allowed: false,
        remaining: 0,
        reset_after,
        retry_after: (wait_until - now).max(1),
        next: State {
            t: start,
            cur: cur as u32,
            prev: prev as u32,
        },
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
