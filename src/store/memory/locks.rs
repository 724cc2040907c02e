//! Several keys checked together, all-or-nothing: each cell is locked (a status in the
//! cell itself) in slot order, so no two checks can deadlock; the request is decided on
//! the locked states, and every cell written back (new states only if all allow).

use std::sync::atomic::{AtomicUsize, Ordering};

use super::cell::{next_state, outcomes_of, Cell, Status};
use super::table::Slot;
use crate::algorithm::{State, Step};
use crate::key::{Key, MAX_KEYS};
use crate::store::Outcomes;

/// The indices of `slots` in slot (address) order: every check locks in this order.
pub(super) fn slot_order(slots: &[Option<&Slot>]) -> impl Iterator<Item = usize> {
    let mut order = [(usize::MAX, 0usize); MAX_KEYS];
    for (i, (o, slot)) in order.iter_mut().zip(slots).enumerate() {
        *o = (slot.map_or(usize::MAX, |s| s as *const Slot as usize), i);
    }
    order.sort_unstable();
    order.into_iter().take(slots.len()).map(|(_, i)| i)
}

/// Slots locked by one check. Dropped before [`Locks::decide`] (a check starting again,
/// or a panic), it writes every cell back as it found it and frees slots it claimed.
pub(super) struct Locks<'a> {
    held: [Option<(&'a Slot, Cell)>; MAX_KEYS],
    len: usize,
    /// The store's count of keys held: a claimed slot written back free gives its place
    /// back.
    keys_held: &'a AtomicUsize,
}

impl<'a> Locks<'a> {
    pub(super) fn new(keys_held: &'a AtomicUsize) -> Self {
        Locks {
            held: [None; MAX_KEYS],
            len: 0,
            keys_held,
        }
    }

    pub(super) fn holds(&self, slot: &Slot) -> bool {
        self.held
            .iter()
            .flatten()
            .any(|(s, _)| std::ptr::eq(*s, slot))
    }

    /// Locks a stored key's slot; returns its cell as it was (free if the key has gone,
    /// then nothing is locked).
    pub(super) fn lock(&mut self, slot: &'a Slot) -> Cell {
        let mut cell = slot.load();
        loop {
            cell = slot.unlocked(cell);
            if cell.status() == Status::Free {
                return cell;
            }
            match slot.swap(cell, cell.with_status(Status::Locked)) {
                Ok(()) => {
                    self.held[self.len] = Some((slot, cell));
                    self.len += 1;
                    return cell;
                }
                Err(actual) => cell = actual,
            }
        }
    }

    /// Takes a free slot for a new key (its window's insert lock held, so nobody else
    /// can): the key's identity (lookups skip a free slot whatever it holds), then a new
    /// generation, locked with no state.
    pub(super) fn claim(&mut self, slot: &'a Slot, ident: &[u64; 2]) {
        let free = slot.load();
        slot.ident[0].store(ident[0], Ordering::Release);
        slot.ident[1].store(ident[1], Ordering::Release);
        let claimed = Cell::new(State::default(), free.generation() + 1, Status::Locked);
        slot.store(claimed);
        // Written back as free (the new generation kept) unless the request is counted.
        self.held[self.len] = Some((slot, claimed.with_status(Status::Free)));
        self.len += 1;
    }

    /// Decides the request on the locked states; writes the new states if every key
    /// allows, else writes every cell back unchanged. Unlocks everything.
    pub(super) fn decide(
        mut self,
        keys: &[Key<'_>],
        slots: &[Option<&'a Slot>; MAX_KEYS],
        now: u64,
        cost: u64,
    ) -> Outcomes {
        let before = |slot: &Slot| -> Cell {
            self.held
                .iter()
                .flatten()
                .find(|(s, _)| std::ptr::eq(*s, slot))
                .expect("every slot locked")
                .1
        };
        let mut steps: [Option<Step>; MAX_KEYS] = [None; MAX_KEYS];
        for ((step, key), slot) in steps.iter_mut().zip(keys).zip(slots) {
            let state = before(slot.expect("locked")).stored();
            *step = Some(key.algorithm.check(state, now, key.rate, cost));
        }
        let all = steps.iter().flatten().all(|s| s.allowed);
        if all {
            // A key listed twice is written once per listing; the last write stands, as
            // in the other stores.
            for ((step, key), slot) in steps.iter().flatten().zip(keys).zip(slots) {
                let slot = slot.expect("locked");
                let generation = before(slot).generation();
                slot.store(Cell::new(next_state(key, step), generation, Status::Live));
            }
            self.len = 0;
        }
        outcomes_of(&steps, now)
    }
}

impl Drop for Locks<'_> {
    fn drop(&mut self) {
        for (slot, cell) in self.held[..self.len].iter().flatten() {
            slot.store(*cell);
            if cell.status() == Status::Free {
                self.keys_held.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}
