//! Token bucket as GCRA: one theoretical arrival time (TAT) per key. Burst = count; one
//! token every `period / count` µs (integer division, at least 1 µs). Mirrored by
//! `src/store/lua/token_bucket.lua`.

use super::{State, Step};
use crate::Rate;

pub(super) fn check(state: Option<State>, now: u64, rate: Rate) -> Step {
    let period = rate.period_micros();
    let limit = rate.count();
    let interval = (period / limit).max(1);
    let tat = state.map_or(now, |s| s.t.max(now));
    let next_tat = tat.saturating_add(interval);
    let span = next_tat - now;
    if span <= period {
        Step {
            allowed: true,
            remaining: ((period - span) / interval).min(limit - 1),
            reset_after: span,
            retry_after: 0,
            next: State {
                t: next_tat,
                cur: 0,
                prev: 0,
            },
        }
    } else {
        Step {
            allowed: false,
            remaining: 0,
            reset_after: tat - now,
            retry_after: span - period,
            next: State {
                t: tat,
                cur: 0,
                prev: 0,
            },
        }
    }
}
