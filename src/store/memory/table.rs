//! The table: 32-byte slots in windows of sixteen, allocated a 4 KiB segment at a time as
//! they are first used; looking a key up reads at most its window and writes nothing.
//! Also the two waits a check may do: for a cell another check holds locked, and for a
//! window's insert lock.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

use portable_atomic::AtomicU128;

use super::cell::{Cell, Status};
use super::digest::digest;
use crate::algorithm::Algorithm;
use crate::key::Key;

/// Slots a key may live in: one window, scanned from the slot its digest picks.
pub(super) const WINDOW: usize = 16;
/// Slots per key of `max_keys`: windows are half full at the bound, so a window rarely
/// fills before the store does.
pub(super) const SLOTS_PER_KEY: usize = 2;
/// Slots allocated together, on the first insert into them: 4 KiB, a page, the least a
/// touched slot costs anyway. A store of a few keys stays small, a full one is one
/// allocation per page. A power of two (smaller stores use a smaller one), so finding a
/// window's segment is a shift.
pub(super) const SEGMENT_SLOTS: usize = 128;
/// Attempts at a check whose slots changed owner while it ran, or at making room for an
/// insert, before either gives up (and the request is refused).
pub(super) const ATTEMPTS: usize = 16;

/// One key's place. All zero is an empty slot.
#[derive(Default)]
#[repr(C, align(32))]
pub(super) struct Slot {
    cell: AtomicU128,
    pub(super) ident: [AtomicU64; 2],
}

impl Slot {
    pub(super) fn load(&self) -> Cell {
        Cell(self.cell.load(Ordering::Acquire))
    }

    pub(super) fn holds(&self, ident: &[u64; 2]) -> bool {
        self.ident[0].load(Ordering::Acquire) == ident[0]
            && self.ident[1].load(Ordering::Acquire) == ident[1]
    }

    pub(super) fn swap(&self, current: Cell, new: Cell) -> Result<(), Cell> {
        self.cell
            .compare_exchange(current.0, new.0, Ordering::AcqRel, Ordering::Acquire)
            .map(drop)
            .map_err(Cell)
    }

    pub(super) fn store(&self, cell: Cell) {
        self.cell.store(cell.0, Ordering::Release);
    }

    /// The cell once no check holds it locked. Locks are held for a few hundred
    /// nanoseconds by running code (never across an await), so this spins briefly, then
    /// yields the core to the holder.
    pub(super) fn unlocked(&self, mut cell: Cell) -> Cell {
        let mut spins = 0u32;
        while cell.status() == Status::Locked {
            back_off(&mut spins);
            cell = self.load();
        }
        cell
    }
}

/// A key's place and identity, computed once per request.
#[derive(Clone, Copy)]
pub(super) struct Probe {
    pub(super) window: usize,
    /// The slot of its window a scan starts at.
    pub(super) start: usize,
    pub(super) ident: [u64; 2],
}

/// The slots of `window` in its segment.
#[inline]
fn window_in(segment: &[Slot], window: usize, segment_shift: u32) -> &[Slot] {
    let at = (window & ((1 << segment_shift) - 1)) * WINDOW;
    &segment[at..at + WINDOW]
}

/// The slots, in windows of [`WINDOW`], allocated a segment at a time as first used, and
/// one insert lock per window.
pub(super) struct Table {
    pub(super) segments: Box<[OnceLock<Box<[Slot]>>]>,
    /// Windows per segment, as a power of two.
    segment_shift: u32,
    pub(super) windows: usize,
    /// One insert lock per window.
    pub(super) insert_locks: Box<[AtomicBool]>,
}

impl Table {
    /// A table for at most `max_keys` keys (already clamped to 1..=2^40).
    pub(super) fn new(max_keys: usize) -> Table {
        let wanted = max_keys.saturating_mul(SLOTS_PER_KEY).div_ceil(WINDOW) * WINDOW;
        let segment_slots = wanted.next_power_of_two().min(SEGMENT_SLOTS);
        let segments = wanted.div_ceil(segment_slots);
        let windows = segments * segment_slots / WINDOW;
        Table {
            segments: (0..segments).map(|_| OnceLock::new()).collect(),
            segment_shift: (segment_slots / WINDOW).trailing_zeros(),
            windows,
            insert_locks: (0..windows).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// Where `key` (whose memory identity is `id`) lives, and its identity, under the
    /// digest keyed by `seeds`.
    #[inline]
    pub(super) fn probe(&self, seeds: &[u64; 4], key: &Key<'_>, id: &[u8]) -> Probe {
        let period = key.rate.period_secs();
        let [a, b] = digest(seeds, key.memory_tag(), period, id);
        let alg = match key.algorithm {
            Algorithm::FixedWindow => 0,
            Algorithm::SlidingWindow => 1,
            Algorithm::TokenBucket => 2,
        };
        Probe {
            window: ((u128::from(a) * self.windows as u128) >> 64) as usize,
            start: (b & (WINDOW as u64 - 1)) as usize,
            ident: [a, u64::from(period) << 32 | alg << 30 | b >> 34],
        }
    }

    /// The slots of `window`, if its segment has been allocated.
    pub(super) fn window(&self, window: usize) -> Option<&[Slot]> {
        let segment = self.segments[window >> self.segment_shift].get()?;
        Some(window_in(segment, window, self.segment_shift))
    }

    /// [`Inner::window`], allocating its segment if needed.
    pub(super) fn window_for_insert(&self, window: usize) -> &[Slot] {
        let segment = self.segments[window >> self.segment_shift].get_or_init(|| {
            (0..WINDOW << self.segment_shift)
                .map(|_| Slot::default())
                .collect()
        });
        window_in(segment, window, self.segment_shift)
    }

    /// The slot holding the probed key and its cell, if stored. Reads only.
    #[inline(always)]
    pub(super) fn find(&self, probe: &Probe) -> Option<(&Slot, Cell)> {
        let window = self.window(probe.window)?;
        (0..WINDOW)
            .map(|i| &window[(probe.start + i) % WINDOW])
            .find_map(|slot| {
                if !slot.holds(&probe.ident) {
                    return None;
                }
                let cell = slot.load();
                (cell.status() != Status::Free).then_some((slot, cell))
            })
    }
}

/// One wait for a lock held by running code: spin briefly, then yield the core to the
/// holder.
pub(super) fn back_off(spins: &mut u32) {
    if *spins < 64 {
        std::hint::spin_loop();
        *spins += 1;
    } else {
        std::thread::yield_now();
    }
}

/// A window's insert lock, released on drop.
pub(super) struct InsertGuard<'a>(&'a AtomicBool);

impl<'a> InsertGuard<'a> {
    /// Inserts into one window are rare and short: spin briefly, then yield.
    pub(super) fn lock(flag: &'a AtomicBool) -> Self {
        let mut spins = 0u32;
        loop {
            if let Some(guard) = Self::try_lock(flag) {
                return guard;
            }
            back_off(&mut spins);
        }
    }

    pub(super) fn try_lock(flag: &'a AtomicBool) -> Option<Self> {
        flag.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
            .then(|| InsertGuard(flag))
    }
}

impl Drop for InsertGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}
