//! The check of one request, all-or-nothing across its keys: one stored key is a
//! compare-and-swap of its cell (a refusal writes nothing); several are locked in slot
//! order and decided together (`locks.rs`); a key not stored yet is inserted first
//! (`evict.rs`), under its window's insert lock.

use std::sync::atomic::Ordering;

use super::cell::{next_state, outcome, Cell, Status};
use super::digest::random_seeds;
use super::evict::{refused_by_stored, Room};
use super::locks::{slot_order, Locks};
use super::table::{InsertGuard, Probe, Slot, Table, ATTEMPTS};
use crate::key::{Key, MAX_KEYS};
use crate::store::{Outcome, Outcomes};

/// Clocks beyond this (2^57 µs, about the year 6537) are decided as at this instant, so
/// every stored time fits the cell's 58 bits (a period is at most 366 days); their
/// outcomes still state resets from the real clock.
const NOW_MAX: u64 = 1 << 57;
/// How long a refused-for-want-of-room check tells the caller to wait (µs). Only a
/// window whose every slot is busy at once can cause it.
const NO_ROOM_RETRY: u64 = 1_000_000;

/// The store itself: the table, the bound and what insertion counts, and the digest's
/// random keys.
pub(super) struct Inner {
    pub(super) table: Table,
    pub(super) room: Room,
    /// Random keys of the identity digest.
    seeds: [u64; 4],
}

/// Why an attempt at a check must start again.
struct Moved;

impl Inner {
    pub(super) fn new(max_keys: usize) -> Inner {
        Inner {
            table: Table::new(max_keys),
            room: Room::new(max_keys),
            seeds: random_seeds(),
        }
    }

    /// Where `key` lives, and its identity.
    #[inline]
    pub(super) fn probe(&self, key: &Key<'_>, id: &[u8]) -> Probe {
        self.table.probe(&self.seeds, key, id)
    }

    #[inline]
    pub(super) fn check(&self, keys: &[Key<'_>], ids: &[&[u8]], now: u64, cost: u64) -> Outcomes {
        if now <= NOW_MAX {
            return self.check_at(keys, ids, now, cost);
        }
        let outcomes = self.check_at(keys, ids, NOW_MAX, cost);
        // A clock past NOW_MAX: decided at NOW_MAX, but resets stated from the real clock.
        let mut out = Outcomes::new();
        for o in outcomes.iter() {
            out.push(o.with_reset_at_micros(now.saturating_add(o.reset_after)));
        }
        out
    }

    #[inline]
    fn check_at(&self, keys: &[Key<'_>], ids: &[&[u8]], now: u64, cost: u64) -> Outcomes {
        if cost == 0 {
            return self.check_free(keys, ids, now);
        }
        if let ([key], [id]) = (keys, ids) {
            let probe = self.probe(key, id);
            for _ in 0..ATTEMPTS {
                match self.check_one(key, &probe, now, cost) {
                    Ok(Some(outcome)) => return Outcomes::one(outcome),
                    Ok(None) => {
                        let probes = [Some(probe)];
                        if let Ok(outcomes) = self.check_inserting(keys, &probes, now, cost) {
                            return outcomes;
                        }
                    }
                    Err(Moved) => {}
                }
            }
            return refused(keys, now);
        }
        let mut probes = [None; MAX_KEYS];
        for ((slot, key), id) in probes.iter_mut().zip(keys).zip(ids) {
            *slot = Some(self.probe(key, id));
        }
        let probes = &probes[..keys.len()];
        for _ in 0..ATTEMPTS {
            if let Ok(outcomes) = self.check_many(keys, probes, now, cost) {
                return outcomes;
            }
        }
        refused(keys, now)
    }

    /// A call of cost 0: always allowed, counted nowhere, so each key is only read (a
    /// key not stored answers as an empty one, and is not inserted).
    #[cold]
    #[inline(never)]
    fn check_free(&self, keys: &[Key<'_>], ids: &[&[u8]], now: u64) -> Outcomes {
        let mut out = Outcomes::new();
        for (key, id) in keys.iter().zip(ids) {
            let state = self
                .table
                .find(&self.probe(key, id))
                .and_then(|(slot, cell)| slot.unlocked(cell).stored());
            out.push(outcome(&key.algorithm.check(state, now, key.rate, 0), now));
        }
        out
    }

    /// Settles `delta` units for the call whose check of `keys` answered `outcomes`
    /// ([`crate::store::Store::settle`]): each stored key's cell is changed by
    /// compare-and-swap as its algorithm says; a key no longer stored, or whose window has
    /// ended, is left alone.
    pub(super) fn settle(
        &self,
        keys: &[Key<'_>],
        ids: &[&[u8]],
        outcomes: &Outcomes,
        delta: i64,
        now: u64,
    ) {
        let now = now.min(NOW_MAX);
        for ((key, id), outcome) in keys.iter().zip(ids).zip(outcomes.iter()) {
            let at = outcome.decided_at().min(NOW_MAX);
            self.swap_stored(&self.probe(key, id), |cell| {
                let state = key
                    .algorithm
                    .settle(cell.state(), at, now, key.rate, delta)?;
                Some(Cell::new(state, cell.generation(), Status::Live))
            });
        }
    }

    /// Forgets each of `keys` that is stored ([`crate::store::Store::reset`]): its slot is
    /// freed under its window's insert lock, as if its state had expired, so the key's
    /// next check starts afresh.
    pub(super) fn reset(&self, keys: &[Key<'_>], ids: &[&[u8]]) {
        for (key, id) in keys.iter().zip(ids) {
            let probe = self.probe(key, id);
            let _insert = InsertGuard::lock(&self.table.insert_locks[probe.window]);
            if self.swap_stored(&probe, |cell| Some(cell.with_status(Status::Free))) {
                self.room.held.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// Replaces the cell of the probed key, if it is stored, with what `next` makes of it
    /// (`None`: leave it), by compare-and-swap, retried on the cell another check left;
    /// whether it was replaced. A slot that changed owner meanwhile is left alone.
    fn swap_stored(&self, probe: &Probe, mut next: impl FnMut(Cell) -> Option<Cell>) -> bool {
        let Some((slot, mut cell)) = self.table.find(probe) else {
            return false;
        };
        loop {
            cell = slot.unlocked(cell);
            if cell.status() == Status::Free || !slot.holds(&probe.ident) {
                return false;
            }
            let Some(new) = next(cell) else {
                return false;
            };
            match slot.swap(cell, new) {
                Ok(()) => return true,
                Err(actual) => cell = actual,
            }
        }
    }

    /// One stored key: a compare-and-swap of its cell. `None` if it is not stored.
    #[inline]
    fn check_one(
        &self,
        key: &Key<'_>,
        probe: &Probe,
        now: u64,
        cost: u64,
    ) -> Result<Option<Outcome>, Moved> {
        let Some((slot, cell)) = self.table.find(probe) else {
            return Ok(None);
        };
        let mut cell = cell;
        loop {
            cell = slot.unlocked(cell);
            // The identity is read after the cell: if the swap below succeeds, the slot
            // has not changed owner since, so it held this key when the cell was read.
            if cell.status() == Status::Free || !slot.holds(&probe.ident) {
                return Err(Moved);
            }
            let step = key.algorithm.check(Some(cell.state()), now, key.rate, cost);
            if !step.allowed {
                return Ok(Some(outcome(&step, now)));
            }
            let next = Cell::new(next_state(key, &step), cell.generation(), Status::Live);
            match slot.swap(cell, next) {
                Ok(()) => return Ok(Some(outcome(&step, now))),
                Err(actual) => cell = actual,
            }
        }
    }

    /// Several keys, all stored: each slot locked in slot order, then decided together.
    fn check_many(
        &self,
        keys: &[Key<'_>],
        probes: &[Option<Probe>],
        now: u64,
        cost: u64,
    ) -> Result<Outcomes, Moved> {
        let mut slots: [Option<&Slot>; MAX_KEYS] = [None; MAX_KEYS];
        for (slot, probe) in slots.iter_mut().zip(probes.iter().flatten()) {
            match self.table.find(probe) {
                Some((found, _)) => *slot = Some(found),
                None => return self.check_inserting(keys, probes, now, cost),
            }
        }
        let mut locks = Locks::new(&self.room.held);
        for index in slot_order(&slots[..keys.len()]) {
            let slot = slots[index].expect("found");
            if locks.holds(slot) {
                continue;
            }
            let cell = locks.lock(slot);
            if cell.status() == Status::Free
                || !slot.holds(&probes[index].as_ref().expect("probed").ident)
            {
                return Err(Moved);
            }
        }
        Ok(locks.decide(keys, &slots, now, cost))
    }

    /// Some keys not stored yet: the windows' insert locks are taken (in window order),
    /// missing keys are given slots (sweeping and, at the bound, evicting), then every
    /// slot is locked in slot order and the request decided as [`Inner::check_many`] does.
    /// A refused request gives the slots it took back.
    fn check_inserting(
        &self,
        keys: &[Key<'_>],
        probes: &[Option<Probe>],
        now: u64,
        cost: u64,
    ) -> Result<Outcomes, Moved> {
        let mut windows = [usize::MAX; MAX_KEYS];
        for (w, probe) in windows.iter_mut().zip(probes.iter().flatten()) {
            *w = probe.window;
        }
        windows.sort_unstable();
        let mut guards: [Option<InsertGuard<'_>>; MAX_KEYS] = [None, None, None, None];
        for (i, &w) in windows.iter().enumerate() {
            if w != usize::MAX && (i == 0 || windows[i - 1] != w) {
                guards[i] = Some(InsertGuard::lock(&self.table.insert_locks[w]));
            }
        }
        self.room.sweep_next(&self.table, now);

        let mut slots: [Option<&Slot>; MAX_KEYS] = [None; MAX_KEYS];
        for (slot, probe) in slots.iter_mut().zip(probes.iter().flatten()) {
            *slot = self.table.find(probe).map(|(found, _)| found);
        }
        // A stored key that refuses now refuses the request: answer without taking (or
        // evicting for) a slot. Counts only grow between now and the decision, so the
        // refusal holds; an allow is decided again under the locks below.
        if let Some(refusal) = refused_by_stored(keys, &slots, now, cost) {
            return Ok(refusal);
        }
        let mut fresh = [false; MAX_KEYS];
        for i in 0..keys.len() {
            if slots[i].is_some() {
                continue;
            }
            let probe = probes[i].as_ref().expect("probed");
            // The same key twice in one request shares the slot just taken.
            if let Some(j) = (0..i).find(|&j| probes[j].map(|p| p.ident) == Some(probe.ident)) {
                slots[i] = slots[j];
                continue;
            }
            match self.room.place(&self.table, probe, &slots, now) {
                Some(slot) => {
                    slots[i] = Some(slot);
                    fresh[i] = true;
                }
                None => {
                    self.room.give_back(&fresh);
                    return Ok(refused(keys, now));
                }
            }
        }

        let mut locks = Locks::new(&self.room.held);
        for index in slot_order(&slots[..keys.len()]) {
            let slot = slots[index].expect("placed");
            if locks.holds(slot) {
                continue;
            }
            if fresh[index] {
                locks.claim(slot, &probes[index].as_ref().expect("probed").ident);
                fresh[index] = false;
            } else if locks.lock(slot).status() == Status::Free {
                // Only holders of this window's insert lock free a slot, and `place` keeps
                // this request's: not expected. Places reserved but not claimed yet go
                // back here; claimed ones as `locks` drops.
                self.room.give_back(&fresh);
                return Err(Moved);
            }
        }
        let outcomes = locks.decide(keys, &slots, now, cost);
        drop(guards);
        Ok(outcomes)
    }
}

/// Every key refuses: the request could not be stored (see [`NO_ROOM_RETRY`]).
fn refused(keys: &[Key<'_>], now: u64) -> Outcomes {
    let mut out = Outcomes::new();
    for _ in keys {
        out.push(Outcome {
            allowed: false,
            remaining: 0,
            reset_after: NO_ROOM_RETRY,
            retry_after: NO_ROOM_RETRY,
            reset_at: now.saturating_add(NO_ROOM_RETRY),
            by_fallback: false,
        });
    }
    out
}
