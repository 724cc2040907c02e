//! Insertion and eviction: a new key takes a free slot of its window (its window's insert
//! lock held); each insert drops the expired keys of its window and of one more in turn,
//! and at the bound evicts the live key that loses least (fewest requests counted, then
//! nearest expiry), so a flood of fresh identities evicts itself before anyone's quota.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::cell::{outcomes_of, Cell, Status};
use super::digest::ident_period_alg;
use super::table::{InsertGuard, Probe, Slot, Table, ATTEMPTS, WINDOW};
use crate::algorithm::{Algorithm, Step};
use crate::key::{Key, MAX_KEYS};
use crate::store::Outcomes;

/// The bound on keys held, and the counts and cursor that insertion keeps.
pub(super) struct Room {
    pub(super) max_keys: usize,
    /// Keys held; an insert reserves its place here first, so the bound is global.
    pub(super) held: AtomicUsize,
    pub(super) evictions: AtomicU64,
    /// The next window an insert sweeps besides its own.
    sweep: AtomicUsize,
}

impl Room {
    pub(super) fn new(max_keys: usize) -> Room {
        Room {
            max_keys,
            held: AtomicUsize::new(0),
            evictions: AtomicU64::new(0),
            sweep: AtomicUsize::new(0),
        }
    }
}

impl Room {
    /// A free slot in the probed key's window, with its place under the bound reserved;
    /// `None` when none can be made. The caller holds the window's insert lock; `taken`
    /// are slots this request already uses (never evicted for it).
    pub(super) fn place<'t>(
        &self,
        table: &'t Table,
        probe: &Probe,
        taken: &[Option<&Slot>],
        now: u64,
    ) -> Option<&'t Slot> {
        let window = table.window_for_insert(probe.window);
        self.drop_expired(window, taken, now);
        let free = (0..WINDOW)
            .map(|i| &window[(probe.start + i) % WINDOW])
            .find(|s| s.load().status() == Status::Free && !is_taken(taken, s));
        if let Some(free) = free {
            if self.reserve() {
                return Some(free);
            }
            // The store is full: sweep the next window in turn and evict from it or from
            // this one, whichever key loses least; the place freed is then this key's.
            // Up to `ATTEMPTS` windows are tried (one may be busy, empty or changing).
            for _ in 0..ATTEMPTS {
                let other = self.sweep.fetch_add(1, Ordering::Relaxed) % table.windows;
                let guard = (other != probe.window)
                    .then(|| InsertGuard::try_lock(&table.insert_locks[other]))
                    .flatten();
                let other_window = guard.as_ref().and_then(|_| table.window(other));
                if let Some(w) = other_window {
                    self.drop_expired(w, taken, now);
                    if self.reserve() {
                        return Some(free);
                    }
                }
                let victim = least_loss(window, taken, now)
                    .into_iter()
                    .chain(other_window.and_then(|w| least_loss(w, taken, now)))
                    .min_by_key(|v| v.0);
                if victim.is_some_and(|v| self.evict(v)) {
                    return Some(free);
                }
            }
            return None;
        }
        // The window is full: evict its key that loses least. Its place under the
        // bound passes to this key.
        for _ in 0..ATTEMPTS {
            let victim = least_loss(window, taken, now)?;
            if self.evict(victim) {
                return Some(victim.1);
            }
        }
        None
    }

    /// Frees the victim's slot unless its cell changed since it was chosen; counts the
    /// eviction unless its state had expired.
    fn evict(&self, (loss, slot, cell): Victim<'_>) -> bool {
        let freed = slot.swap(cell, cell.with_status(Status::Free)).is_ok();
        if freed && loss != EXPIRED {
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
        freed
    }

    /// Takes one place under the bound.
    pub(super) fn reserve(&self) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held < self.max_keys).then_some(held + 1)
            })
            .is_ok()
    }

    /// Gives back the places reserved for a request that will not be counted.
    pub(super) fn give_back(&self, fresh: &[bool]) {
        let n = fresh.iter().filter(|f| **f).count();
        self.held.fetch_sub(n, Ordering::AcqRel);
    }

    /// Frees every expired key of `window` (its insert lock held) but those in `taken`
    /// (the request being inserted uses them).
    fn drop_expired(&self, window: &[Slot], taken: &[Option<&Slot>], now: u64) {
        for slot in window.iter().filter(|s| !is_taken(taken, s)) {
            let cell = slot.load();
            if cell.status() == Status::Live
                && loss(slot, cell, now).is_none()
                && slot.swap(cell, cell.with_status(Status::Free)).is_ok()
            {
                self.held.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// Sweeps the next window in turn, if nobody is inserting there: expired keys are
    /// dropped even where nothing new arrives.
    pub(super) fn sweep_next(&self, table: &Table, now: u64) {
        let w = self.sweep.fetch_add(1, Ordering::Relaxed) % table.windows;
        if let Some(_guard) = InsertGuard::try_lock(&table.insert_locks[w]) {
            if let Some(window) = table.window(w) {
                self.drop_expired(window, &[], now);
            }
        }
    }
}

/// The request's outcomes if one of its stored keys refuses it on the cells as they are
/// (new keys answer as empty ones); `None` if every stored key allows.
pub(super) fn refused_by_stored(
    keys: &[Key<'_>],
    slots: &[Option<&Slot>],
    now: u64,
    cost: u64,
) -> Option<Outcomes> {
    let mut steps: [Option<Step>; MAX_KEYS] = [None; MAX_KEYS];
    for ((step, key), slot) in steps.iter_mut().zip(keys).zip(slots) {
        let state = slot.and_then(|s| s.load().stored());
        *step = Some(key.algorithm.check(state, now, key.rate, cost));
    }
    if steps.iter().flatten().all(|s| s.allowed) {
        return None;
    }
    Some(outcomes_of(&steps, now))
}

fn is_taken(taken: &[Option<&Slot>], slot: &Slot) -> bool {
    taken.iter().flatten().any(|t| std::ptr::eq(*t, slot))
}

/// What evicting a live key would lose, as (requests its counter holds, expiry), or
/// `None` if its state has expired (dropping it loses nothing).
fn loss(slot: &Slot, cell: Cell, now: u64) -> Option<(u64, u64)> {
    let (period, alg) = ident_period_alg(slot.ident[1].load(Ordering::Acquire));
    let state = cell.state();
    let expires = alg.expires_at(&state, period);
    if expires <= now {
        return None;
    }
    let window_end = state.t.saturating_add(period);
    let used = match alg {
        Algorithm::FixedWindow => u64::from(state.cur),
        Algorithm::SlidingWindow if now < window_end => u64::from(state.cur + state.prev),
        Algorithm::SlidingWindow => u64::from(state.cur),
        // Tokens in use: the time until the bucket is full, in intervals (the count is
        // kept in `prev`).
        Algorithm::TokenBucket => {
            ((state.t - now) as u128 * u128::from(state.prev)).div_ceil(u128::from(period)) as u64
        }
    };
    Some((used, expires))
}

type Victim<'a> = ((u64, u64), &'a Slot, Cell);

/// The loss of a key whose state has expired: nothing, and first to go.
const EXPIRED: (u64, u64) = (0, 0);

/// The live, unlocked key of `window` that loses least, not among `taken`.
fn least_loss<'a>(window: &'a [Slot], taken: &[Option<&Slot>], now: u64) -> Option<Victim<'a>> {
    window
        .iter()
        .filter(|s| !is_taken(taken, s))
        .filter_map(|slot| {
            let cell = slot.load();
            (cell.status() == Status::Live)
                .then(|| (loss(slot, cell, now).unwrap_or(EXPIRED), slot, cell))
        })
        .min_by_key(|v| v.0)
}
