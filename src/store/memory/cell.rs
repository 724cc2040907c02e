//! A key's cell: the algorithm state (`t`, `cur`, `prev`), a status and a generation,
//! packed into 128 bits so that one compare-and-swap updates it; the state a step leaves;
//! and the outcome a step states.

use crate::algorithm::{Algorithm, State, Step};
use crate::key::Key;
use crate::store::{Outcome, Outcomes};

/// What a cell says of its slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Status {
    /// No key (never used, expired or evicted).
    Free,
    /// A key, free to be updated by compare-and-swap.
    Live,
    /// A key (or a key being inserted) held by one check until it writes the cell back.
    Locked,
}

/// A cell's value: `t` (58 bits) and six bits of an 8-bit generation in the low word;
/// `cur` and `prev` (30 bits each, counts are at most 10^9), the generation's other two
/// bits and the status (2 bits) in the high word. The generation changes whenever a free slot is taken, so a check that read a key's
/// cell before the slot changed owner cannot write it after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Cell(pub(super) u128);

pub(super) const COUNT_MASK: u64 = (1 << 30) - 1;
pub(super) const GEN_MASK: u64 = (1 << 8) - 1;

impl Cell {
    pub(super) fn new(state: State, generation: u64, status: Status) -> Cell {
        let low = (state.t.min((1 << 58) - 1) << 6) | (generation & 0x3f);
        let status = match status {
            Status::Free => 0,
            Status::Live => 1,
            Status::Locked => 2,
        };
        let high = (u64::from(state.cur) & COUNT_MASK) << 34
            | (u64::from(state.prev) & COUNT_MASK) << 4
            | (generation & GEN_MASK) >> 6 << 2
            | status;
        Cell(u128::from(high) << 64 | u128::from(low))
    }

    pub(super) fn status(self) -> Status {
        match (self.0 >> 64) as u64 & 3 {
            0 => Status::Free,
            1 => Status::Live,
            _ => Status::Locked,
        }
    }

    pub(super) fn generation(self) -> u64 {
        (self.0 as u64 & 0x3f) | ((self.0 >> 64) as u64 >> 2 & 3) << 6
    }

    pub(super) fn state(self) -> State {
        let high = (self.0 >> 64) as u64;
        State {
            t: self.0 as u64 >> 6,
            cur: (high >> 34 & COUNT_MASK) as u32,
            prev: (high >> 4 & COUNT_MASK) as u32,
        }
    }

    /// The key's state, or `None` for a free slot (a key not stored, or a claim not yet
    /// counted: both check as no state at all).
    pub(super) fn stored(self) -> Option<State> {
        (self.status() != Status::Free).then(|| self.state())
    }

    pub(super) fn with_status(self, status: Status) -> Cell {
        Cell::new(self.state(), self.generation(), status)
    }
}

/// The state to store for `key` after `step`. A token bucket uses neither count, so its
/// cell keeps the rate's count in `prev`: eviction needs it to tell how much a bucket has
/// used.
pub(super) fn next_state(key: &Key<'_>, step: &Step) -> State {
    match key.algorithm {
        Algorithm::TokenBucket => State {
            prev: key.rate.count().min(COUNT_MASK) as u32,
            ..step.next
        },
        _ => step.next,
    }
}

/// One outcome per step, in key order.
pub(super) fn outcomes_of(steps: &[Option<Step>], now: u64) -> Outcomes {
    let mut out = Outcomes::new();
    for step in steps.iter().flatten() {
        out.push(outcome(step, now));
    }
    out
}

pub(super) fn outcome(step: &Step, now: u64) -> Outcome {
    Outcome {
        allowed: step.allowed,
        remaining: step.remaining,
        reset_after: step.reset_after,
        retry_after: step.retry_after,
        reset_at: now.saturating_add(step.reset_after),
        by_fallback: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_round_trip_every_field() {
        for (t, cur, prev, generation) in [
            (0, 0, 0, 0),
            (1_800_000_000_000_000, 1_000_000_000, 999_999_999, 63),
            ((1 << 58) - 1, COUNT_MASK as u32, 1, 255),
            (12_345, 7, 0, 256),
        ] {
            for status in [Status::Free, Status::Live, Status::Locked] {
                let cell = Cell::new(State { t, cur, prev }, generation, status);
                assert_eq!(cell.state(), State { t, cur, prev });
                assert_eq!(cell.generation(), generation & GEN_MASK);
                assert_eq!(cell.status(), status);
            }
        }
    }
}
