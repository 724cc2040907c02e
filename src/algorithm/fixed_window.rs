//! Fixed window: a window opens at a key's first counted request and lasts one period.
//! Mirrored by `src/store/lua/fixed_window.lua`.

use super::state::{State, Step};
use crate::rate::Rate;

pub(super) fn check(state: Option<State>, now: u64, rate: Rate) -> Step {
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
    if used < limit {
        Step {
            allowed: true,
            remaining: limit - used - 1,
            reset_after,
            retry_after: 0,
            next: State {
                t: start,
                cur: (used + 1) as u32,
                prev: 0,
            },
        }
    } else {
        Step {
            allowed: false,
            remaining: 0,
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
