//! The in-process store: one fixed table of per-key cells, each updated by atomic
//! operations on its own 32-byte slot. ARCHITECTURE.md, "The memory store", explains the
//! design; this file is its only implementation.
//!
//! - **A slot** holds one key: a 128-bit cell (the algorithm state, a status and a
//!   generation) and a 128-bit identity (a keyed 94-bit digest of the key's tag, period
//!   and bytes, with its period and algorithm in the clear).
//! - **A window** is 16 consecutive slots; a key lives in the window its digest picks.
//!   Looking a key up reads at most its window and writes nothing.
//! - **A check of a stored key** with one rule is a compare-and-swap of its cell; with
//!   several, each cell is locked (a status in the cell) in slot order, decided, written
//!   and unlocked. A refused check writes nothing.
//! - **Inserting** a key takes its window's insert lock (never taken by checks of stored
//!   keys), so one key never gets two slots; the insert also drops expired keys from its
//!   window and from one more window in turn, and at the bound evicts the key that loses
//!   least.

use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

use portable_atomic::AtomicU128;

use super::{Outcome, Outcomes, Store, StoreFuture, StoreRequest, StoreStats};
use crate::algorithm::{Algorithm, State, Step};
use crate::config::settings;
use crate::key::{with_memory_ids, Key, MAX_KEYS};

/// Slots a key may live in: one window, scanned from the slot its digest picks.
const WINDOW: usize = 16;
/// Slots per key of `max_keys`: windows are half full at the bound, so a window rarely
/// fills before the store does.
const SLOTS_PER_KEY: usize = 2;
/// Slots allocated together, on the first insert into them: 4 KiB, a page, the least a
/// touched slot costs anyway. A store of a few keys stays small, a full one is one
/// allocation per page. A power of two (smaller stores use a smaller one), so finding a
/// window's segment is a shift.
const SEGMENT_SLOTS: usize = 128;
/// Clocks beyond this (2^57 µs, about the year 6537) are decided as at this instant, so
/// every stored time fits the cell's 58 bits (a period is at most 366 days); their
/// outcomes still state resets from the real clock.
const NOW_MAX: u64 = 1 << 57;
/// Attempts at a check whose slots changed owner while it ran, before it is refused.
const ATTEMPTS: usize = 16;
/// How long a refused-for-want-of-room check tells the caller to wait (µs). Only a
/// window whose every slot is busy at once can cause it.
const NO_ROOM_RETRY: u64 = 1_000_000;

/// Counters in this process: one shared limit per process.
///
/// Keys live in one table of fixed size (two 32-byte slots per key of `max_keys`,
/// allocated as they are first used). A check of a key already stored reads its window
/// and writes only its own slot: a compare-and-swap with one rule, a lock in the slot
/// itself with several (taken in slot order, so all-or-nothing stays exact under any
/// concurrency, without deadlock). A refused request writes nothing.
///
/// The store never holds more than `max_keys` keys. Inserting a key drops expired keys as
/// it goes (its own window and one more each time); at the bound it evicts the key that
/// loses least: the one whose counter holds the fewest requests, then the one nearest its
/// expiry, so a flood of fresh identities evicts itself before anyone's used quota.
/// Evictions are counted ([`MemoryStore::evictions`]).
///
/// Clones share the counters.
#[derive(Clone)]
pub struct MemoryStore {
    inner: std::sync::Arc<Inner>,
}

struct Inner {
    segments: Box<[OnceLock<Box<[Slot]>>]>,
    /// Windows per segment, as a power of two.
    segment_shift: u32,
    windows: usize,
    /// One insert lock per window.
    insert_locks: Box<[AtomicBool]>,
    max_keys: usize,
    /// Keys held; an insert reserves its place here first, so the bound is global.
    held: AtomicUsize,
    evictions: AtomicU64,
    /// The next window an insert sweeps besides its own.
    sweep: AtomicUsize,
    /// Random keys of the identity digest.
    seeds: [u64; 4],
}

/// One key's place. All zero is an empty slot.
#[derive(Default)]
#[repr(C, align(32))]
struct Slot {
    cell: AtomicU128,
    ident: [AtomicU64; 2],
}

impl MemoryStore {
    /// A store holding at most 1 000 000 keys.
    pub fn new() -> Self {
        Self::with_max_keys(settings::MAX_KEYS.default as usize)
    }

    /// A store holding at most `max_keys` keys (at least 1).
    pub fn with_max_keys(max_keys: usize) -> Self {
        // Beyond 2^40 keys the table could not be allocated anyway; the clamp keeps the
        // sizes below from overflowing.
        let max_keys = max_keys.clamp(1, 1 << 40);
        let wanted = max_keys.saturating_mul(SLOTS_PER_KEY).div_ceil(WINDOW) * WINDOW;
        let segment_slots = wanted.next_power_of_two().min(SEGMENT_SLOTS);
        let segments = wanted.div_ceil(segment_slots);
        let windows = segments * segment_slots / WINDOW;
        MemoryStore {
            inner: std::sync::Arc::new(Inner {
                segments: (0..segments).map(|_| OnceLock::new()).collect(),
                segment_shift: (segment_slots / WINDOW).trailing_zeros(),
                windows,
                insert_locks: (0..windows).map(|_| AtomicBool::new(false)).collect(),
                max_keys,
                held: AtomicUsize::new(0),
                evictions: AtomicU64::new(0),
                sweep: AtomicUsize::new(0),
                seeds: random_seeds(),
            }),
        }
    }

    /// Keys held now (expired ones not yet dropped included).
    pub fn len(&self) -> usize {
        self.inner.held.load(Ordering::Acquire)
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bound on keys held.
    pub fn max_keys(&self) -> usize {
        self.inner.max_keys
    }

    /// Live keys evicted so far because the store (or a key's window) was full.
    pub fn evictions(&self) -> u64 {
        self.inner.evictions.load(Ordering::Relaxed)
    }

    /// Checks and counts `keys` at `now` (µs since the epoch), all-or-nothing.
    #[inline]
    pub(crate) fn check_now(&self, keys: &[Key<'_>], now: u64) -> Outcomes {
        with_memory_ids(keys, |ids| self.inner.check(&keys[..ids.len()], ids, now))
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("slots", &(self.inner.windows * WINDOW))
            .field("max_keys", &self.inner.max_keys)
            .finish_non_exhaustive()
    }
}

impl Store for MemoryStore {
    fn check(&self, request: &StoreRequest<'_>) -> StoreFuture {
        StoreFuture::Ready(Ok(self.check_now(request.keys, request.now)))
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            keys: Some(self.len() as u64),
            evictions: Some(self.evictions()),
            source: Some(std::sync::Arc::as_ptr(&self.inner) as usize),
            ..StoreStats::default()
        }
    }
}

// ---- the cell ----

/// What a cell says of its slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
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
struct Cell(u128);

const COUNT_MASK: u64 = (1 << 30) - 1;
const GEN_MASK: u64 = (1 << 8) - 1;

impl Cell {
    fn new(state: State, generation: u64, status: Status) -> Cell {
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

    fn status(self) -> Status {
        match (self.0 >> 64) as u64 & 3 {
            0 => Status::Free,
            1 => Status::Live,
            _ => Status::Locked,
        }
    }

    fn generation(self) -> u64 {
        (self.0 as u64 & 0x3f) | ((self.0 >> 64) as u64 >> 2 & 3) << 6
    }

    fn state(self) -> State {
        let high = (self.0 >> 64) as u64;
        State {
            t: self.0 as u64 >> 6,
            cur: (high >> 34 & COUNT_MASK) as u32,
            prev: (high >> 4 & COUNT_MASK) as u32,
        }
    }

    /// The key's state, or `None` for a free slot (a key not stored, or a claim not yet
    /// counted: both check as no state at all).
    fn stored(self) -> Option<State> {
        (self.status() != Status::Free).then(|| self.state())
    }

    fn with_status(self, status: Status) -> Cell {
        Cell::new(self.state(), self.generation(), status)
    }
}

/// The state to store for `key` after `step`. A token bucket uses neither count, so its
/// cell keeps the rate's count in `prev`: eviction needs it to tell how much a bucket has
/// used.
fn next_state(key: &Key<'_>, step: &Step) -> State {
    match key.algorithm {
        Algorithm::TokenBucket => State {
            prev: key.rate.count().min(COUNT_MASK) as u32,
            ..step.next
        },
        _ => step.next,
    }
}

// ---- the identity ----

/// A key's place and identity, computed once per request.
#[derive(Clone, Copy)]
struct Probe {
    window: usize,
    /// The slot of its window a scan starts at.
    start: usize,
    ident: [u64; 2],
}

/// The slots of `window` in its segment.
#[inline]
fn window_in(segment: &[Slot], window: usize, segment_shift: u32) -> &[Slot] {
    let at = (window & ((1 << segment_shift) - 1)) * WINDOW;
    &segment[at..at + WINDOW]
}

/// Four random 64-bit keys (from the standard library's randomly keyed hasher).
fn random_seeds() -> [u64; 4] {
    let state = std::collections::hash_map::RandomState::new();
    [0u8, 1, 2, 3].map(|i| state.hash_one(i) | 1)
}

/// Two 64-bit hashes of a key's identity (tag, period, bytes) in one pass: two lanes of
/// folded multiplication, each keyed by its own random seeds. Nobody outside the process
/// sees a digest, so identities cannot be chosen to collide.
#[inline]
fn digest(seeds: &[u64; 4], tag: u8, period: u32, bytes: &[u8]) -> [u64; 2] {
    #[inline(always)]
    fn fold(x: u64, y: u64) -> u64 {
        let p = u128::from(x) * u128::from(y);
        (p as u64) ^ (p >> 64) as u64
    }
    let head = u64::from(tag) << 56 | (bytes.len() as u64) << 32 | u64::from(period);
    let (mut a, mut b) = (
        fold(head ^ seeds[0], seeds[2]),
        fold(head ^ seeds[1], seeds[3]),
    );
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let w = u64::from_le_bytes(word.try_into().expect("eight bytes"));
        a = fold(a ^ w, seeds[2]);
        b = fold(b ^ w, seeds[3]);
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let w = tail_word(rest);
        a = fold(a ^ w, seeds[2]);
        b = fold(b ^ w, seeds[3]);
    }
    [fold(a, seeds[0]), fold(b, seeds[1])]
}

/// One to seven bytes as a word, read in at most two (possibly overlapping) pieces rather
/// than copied; the length is already in the digest, so overlaps cannot alias.
#[inline(always)]
fn tail_word(rest: &[u8]) -> u64 {
    let n = rest.len();
    if n >= 4 {
        let lo = u32::from_le_bytes(rest[..4].try_into().expect("four bytes"));
        let hi = u32::from_le_bytes(rest[n - 4..].try_into().expect("four bytes"));
        u64::from(hi) << 32 | u64::from(lo)
    } else {
        u64::from(rest[0]) << 16 | u64::from(rest[n / 2]) << 8 | u64::from(rest[n - 1])
    }
}

/// What an identity word says of its key, for sweeping and eviction.
fn ident_period_alg(ident1: u64) -> (u64, Algorithm) {
    let alg = match ident1 >> 30 & 3 {
        0 => Algorithm::FixedWindow,
        1 => Algorithm::SlidingWindow,
        _ => Algorithm::TokenBucket,
    };
    ((ident1 >> 32) * 1_000_000, alg)
}

impl Inner {
    #[inline]
    fn probe(&self, key: &Key<'_>, id: &[u8]) -> Probe {
        let period = key.rate.period_secs();
        let [a, b] = digest(&self.seeds, key.memory_tag(), period, id);
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
    fn window(&self, window: usize) -> Option<&[Slot]> {
        let segment = self.segments[window >> self.segment_shift].get()?;
        Some(window_in(segment, window, self.segment_shift))
    }

    /// [`Inner::window`], allocating its segment if needed.
    fn window_for_insert(&self, window: usize) -> &[Slot] {
        let segment = self.segments[window >> self.segment_shift].get_or_init(|| {
            (0..WINDOW << self.segment_shift)
                .map(|_| Slot::default())
                .collect()
        });
        window_in(segment, window, self.segment_shift)
    }

    /// The slot holding the probed key and its cell, if stored. Reads only.
    #[inline]
    fn find(&self, probe: &Probe) -> Option<(&Slot, Cell)> {
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

impl Slot {
    fn load(&self) -> Cell {
        Cell(self.cell.load(Ordering::Acquire))
    }

    fn holds(&self, ident: &[u64; 2]) -> bool {
        self.ident[0].load(Ordering::Acquire) == ident[0]
            && self.ident[1].load(Ordering::Acquire) == ident[1]
    }

    fn swap(&self, current: Cell, new: Cell) -> Result<(), Cell> {
        self.cell
            .compare_exchange(current.0, new.0, Ordering::AcqRel, Ordering::Acquire)
            .map(drop)
            .map_err(Cell)
    }

    fn store(&self, cell: Cell) {
        self.cell.store(cell.0, Ordering::Release);
    }

    /// The cell once no check holds it locked. Locks are held for a few hundred
    /// nanoseconds by running code (never across an await), so this spins briefly, then
    /// yields the core to the holder.
    fn unlocked(&self, mut cell: Cell) -> Cell {
        let mut spins = 0u32;
        while cell.status() == Status::Locked {
            back_off(&mut spins);
            cell = self.load();
        }
        cell
    }
}

// ---- checks ----

/// Why an attempt at a check must start again.
struct Moved;

impl Inner {
    #[inline]
    fn check(&self, keys: &[Key<'_>], ids: &[&[u8]], now: u64) -> Outcomes {
        if now <= NOW_MAX {
            return self.check_at(keys, ids, now);
        }
        let outcomes = self.check_at(keys, ids, NOW_MAX);
        // A clock past NOW_MAX: decided at NOW_MAX, but resets stated from the real clock.
        let mut out = Outcomes::new();
        for o in outcomes.iter() {
            out.push(o.with_reset_at_micros(now.saturating_add(o.reset_after)));
        }
        out
    }

    #[inline]
    fn check_at(&self, keys: &[Key<'_>], ids: &[&[u8]], now: u64) -> Outcomes {
        if let ([key], [id]) = (keys, ids) {
            let probe = self.probe(key, id);
            for _ in 0..ATTEMPTS {
                match self.check_one(key, &probe, now) {
                    Ok(Some(outcome)) => return Outcomes::one(outcome),
                    Ok(None) => {
                        let probes = [Some(probe)];
                        if let Ok(outcomes) = self.check_inserting(keys, &probes, now) {
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
            if let Ok(outcomes) = self.check_many(keys, probes, now) {
                return outcomes;
            }
        }
        refused(keys, now)
    }

    /// One stored key: a compare-and-swap of its cell. `None` if it is not stored.
    #[inline]
    fn check_one(&self, key: &Key<'_>, probe: &Probe, now: u64) -> Result<Option<Outcome>, Moved> {
        let Some((slot, cell)) = self.find(probe) else {
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
            let step = key.algorithm.check(Some(cell.state()), now, key.rate);
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
    ) -> Result<Outcomes, Moved> {
        let mut slots: [Option<&Slot>; MAX_KEYS] = [None; MAX_KEYS];
        for (slot, probe) in slots.iter_mut().zip(probes.iter().flatten()) {
            match self.find(probe) {
                Some((found, _)) => *slot = Some(found),
                None => return self.check_inserting(keys, probes, now),
            }
        }
        let mut locks = Locks::new(&self.held);
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
        Ok(locks.decide(keys, &slots, now))
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
    ) -> Result<Outcomes, Moved> {
        let mut windows = [usize::MAX; MAX_KEYS];
        for (w, probe) in windows.iter_mut().zip(probes.iter().flatten()) {
            *w = probe.window;
        }
        windows.sort_unstable();
        let mut guards: [Option<InsertGuard<'_>>; MAX_KEYS] = [None, None, None, None];
        for (i, &w) in windows.iter().enumerate() {
            if w != usize::MAX && (i == 0 || windows[i - 1] != w) {
                guards[i] = Some(InsertGuard::lock(&self.insert_locks[w]));
            }
        }
        self.sweep_next(now);

        let mut slots: [Option<&Slot>; MAX_KEYS] = [None; MAX_KEYS];
        for (slot, probe) in slots.iter_mut().zip(probes.iter().flatten()) {
            *slot = self.find(probe).map(|(found, _)| found);
        }
        // A stored key that refuses now refuses the request: answer without taking (or
        // evicting for) a slot. Counts only grow between now and the decision, so the
        // refusal holds; an allow is decided again under the locks below.
        if let Some(refusal) = refused_by_stored(keys, &slots, now) {
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
            match self.place(probe, &slots, now) {
                Some(slot) => {
                    slots[i] = Some(slot);
                    fresh[i] = true;
                }
                None => {
                    self.give_back(&fresh);
                    return Ok(refused(keys, now));
                }
            }
        }

        let mut locks = Locks::new(&self.held);
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
                self.give_back(&fresh);
                return Err(Moved);
            }
        }
        let outcomes = locks.decide(keys, &slots, now);
        drop(guards);
        Ok(outcomes)
    }

    /// A free slot in the probed key's window, with its place under the bound reserved;
    /// `None` when none can be made. The caller holds the window's insert lock; `taken`
    /// are slots this request already uses (never evicted for it).
    fn place(&self, probe: &Probe, taken: &[Option<&Slot>], now: u64) -> Option<&Slot> {
        let window = self.window_for_insert(probe.window);
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
                let other = self.sweep.fetch_add(1, Ordering::Relaxed) % self.windows;
                let guard = (other != probe.window)
                    .then(|| InsertGuard::try_lock(&self.insert_locks[other]))
                    .flatten();
                let other_window = guard.as_ref().and_then(|_| self.window(other));
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
    fn reserve(&self) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held < self.max_keys).then_some(held + 1)
            })
            .is_ok()
    }

    /// Gives back the places reserved for a request that will not be counted.
    fn give_back(&self, fresh: &[bool]) {
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
    fn sweep_next(&self, now: u64) {
        let w = self.sweep.fetch_add(1, Ordering::Relaxed) % self.windows;
        if let Some(_guard) = InsertGuard::try_lock(&self.insert_locks[w]) {
            if let Some(window) = self.window(w) {
                self.drop_expired(window, &[], now);
            }
        }
    }
}

/// The request's outcomes if one of its stored keys refuses it on the cells as they are
/// (new keys answer as empty ones); `None` if every stored key allows.
fn refused_by_stored(keys: &[Key<'_>], slots: &[Option<&Slot>], now: u64) -> Option<Outcomes> {
    let mut steps: [Option<Step>; MAX_KEYS] = [None; MAX_KEYS];
    for ((step, key), slot) in steps.iter_mut().zip(keys).zip(slots) {
        let state = slot.and_then(|s| s.load().stored());
        *step = Some(key.algorithm.check(state, now, key.rate));
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

/// The indices of `slots` in slot (address) order: every check locks in this order.
fn slot_order(slots: &[Option<&Slot>]) -> impl Iterator<Item = usize> {
    let mut order = [(usize::MAX, 0usize); MAX_KEYS];
    for (i, (o, slot)) in order.iter_mut().zip(slots).enumerate() {
        *o = (slot.map_or(usize::MAX, |s| s as *const Slot as usize), i);
    }
    order.sort_unstable();
    order.into_iter().take(slots.len()).map(|(_, i)| i)
}

/// Slots locked by one check. Dropped before [`Locks::decide`] (a check starting again,
/// or a panic), it writes every cell back as it found it and frees slots it claimed.
struct Locks<'a> {
    held: [Option<(&'a Slot, Cell)>; MAX_KEYS],
    len: usize,
    /// The store's count of keys held: a claimed slot written back free gives its place
    /// back.
    keys_held: &'a AtomicUsize,
}

impl<'a> Locks<'a> {
    fn new(keys_held: &'a AtomicUsize) -> Self {
        Locks {
            held: [None; MAX_KEYS],
            len: 0,
            keys_held,
        }
    }

    fn holds(&self, slot: &Slot) -> bool {
        self.held
            .iter()
            .flatten()
            .any(|(s, _)| std::ptr::eq(*s, slot))
    }

    /// Locks a stored key's slot; returns its cell as it was (free if the key has gone,
    /// then nothing is locked).
    fn lock(&mut self, slot: &'a Slot) -> Cell {
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
    fn claim(&mut self, slot: &'a Slot, ident: &[u64; 2]) {
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
    fn decide(
        mut self,
        keys: &[Key<'_>],
        slots: &[Option<&'a Slot>; MAX_KEYS],
        now: u64,
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
            *step = Some(key.algorithm.check(state, now, key.rate));
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

/// One wait for a lock held by running code: spin briefly, then yield the core to the
/// holder.
fn back_off(spins: &mut u32) {
    if *spins < 64 {
        std::hint::spin_loop();
        *spins += 1;
    } else {
        std::thread::yield_now();
    }
}

/// A window's insert lock, released on drop.
struct InsertGuard<'a>(&'a AtomicBool);

impl<'a> InsertGuard<'a> {
    /// Inserts into one window are rare and short: spin briefly, then yield.
    fn lock(flag: &'a AtomicBool) -> Self {
        let mut spins = 0u32;
        loop {
            if let Some(guard) = Self::try_lock(flag) {
                return guard;
            }
            back_off(&mut spins);
        }
    }

    fn try_lock(flag: &'a AtomicBool) -> Option<Self> {
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

/// One outcome per step, in key order.
fn outcomes_of(steps: &[Option<Step>], now: u64) -> Outcomes {
    let mut out = Outcomes::new();
    for step in steps.iter().flatten() {
        out.push(outcome(step, now));
    }
    out
}

fn outcome(step: &Step, now: u64) -> Outcome {
    Outcome {
        allowed: step.allowed,
        remaining: step.remaining,
        reset_after: step.reset_after,
        retry_after: step.retry_after,
        reset_at: now.saturating_add(step.reset_after),
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
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{RuleKind, Subject};
    use crate::rate::Rate;
    use std::sync::atomic::AtomicU64;
    use std::sync::{Arc, Barrier};

    fn user(id: &[u8], rate: Rate) -> Key<'_> {
        Key::new(
            RuleKind::User,
            Subject::Named(id),
            rate,
            Algorithm::FixedWindow,
        )
    }

    fn allowed(outcomes: &Outcomes) -> bool {
        outcomes.iter().all(Outcome::is_allowed)
    }

    /// Segments allocated so far.
    fn segments_in_use(store: &MemoryStore) -> usize {
        store
            .inner
            .segments
            .iter()
            .filter(|s| s.get().is_some())
            .count()
    }

    #[test]
    fn never_holds_more_than_max_keys_and_counts_evictions() {
        for max in [1, 10, 1_000, 5_000] {
            let store = MemoryStore::with_max_keys(max);
            let rate = Rate::per_hour(5);
            for i in 0..5 * max {
                let id = i.to_string();
                store.check_now(&[user(id.as_bytes(), rate)], 1_000_000 + i as u64);
                assert!(store.len() <= max, "{} > {max}", store.len());
            }
            assert!(
                store.evictions() >= (4 * max) as u64,
                "max {max}: {}",
                store.evictions()
            );
        }
    }

    #[test]
    fn expired_state_is_dropped_without_help() {
        let store = MemoryStore::with_max_keys(100_000);
        let rate = Rate::per_second(1);
        for i in 0..1_000u32 {
            let id = i.to_be_bytes();
            store.check_now(&[user(&id, rate)], 10_000_000);
        }
        assert_eq!(store.len(), 1_000);
        // Each insert sweeps its own window and the next in turn: after one insert per
        // window, every expired key is gone, and none of it counted as an eviction.
        let inserts = store.inner.windows as u32;
        for i in 0..inserts {
            let id = (1_000_000 + i).to_be_bytes();
            store.check_now(&[user(&id, rate)], 20_000_000);
        }
        assert_eq!(store.len(), inserts as usize);
        assert_eq!(store.evictions(), 0);
    }

    #[test]
    fn the_table_is_allocated_as_it_is_used() {
        let store = MemoryStore::with_max_keys(1_000_000);
        let slots = store.inner.windows * WINDOW;
        assert!(
            (2_000_000..2_000_000 + SEGMENT_SLOTS).contains(&slots),
            "{slots}"
        );
        assert_eq!(segments_in_use(&store), 0);
        store.check_now(&[user(b"alice", Rate::per_minute(1))], 1_000_000);
        assert_eq!(segments_in_use(&store), 1);
        // A store of one key still has a whole window.
        assert_eq!(MemoryStore::with_max_keys(1).inner.windows, 1);
    }

    #[test]
    fn anonymous_is_not_a_user_called_anonymous() {
        let store = MemoryStore::new();
        let rate = Rate::per_minute(1);
        let anon = Key::new(
            RuleKind::User,
            Subject::Anonymous,
            rate,
            Algorithm::FixedWindow,
        );
        assert!(allowed(&store.check_now(&[anon], 0)));
        assert!(allowed(&store.check_now(&[user(b"anonymous", rate)], 0)));
        assert!(!allowed(&store.check_now(&[anon], 0)));
    }

    /// Slots holding a key now.
    fn live_slots(store: &MemoryStore) -> usize {
        let inner = &store.inner;
        (0..inner.windows)
            .filter_map(|w| inner.window(w))
            .flatten()
            .filter(|s| s.load().status() != Status::Free)
            .count()
    }

    /// Review finding: inserting a request's new key swept its window and freed the
    /// request's own expired key, the check started again, and the new key's place under
    /// the bound was never given back, so the count of keys held crept up to `max_keys`.
    #[test]
    fn the_count_of_keys_held_matches_the_slots_through_expiry_and_refusals() {
        let store = MemoryStore::with_max_keys(4);
        let expiring = Rate::per_second(1);
        let tenant = |rate| {
            Key::new(
                RuleKind::Tenant,
                Subject::Named(b"t"),
                rate,
                Algorithm::FixedWindow,
            )
        };
        for i in 0..200u32 {
            let now = 1_000_000_000 + u64::from(i) * 2_000_000;
            let id = i.to_le_bytes();
            // The tenant's state has expired by now; the user is new.
            store.check_now(&[tenant(expiring), user(&id, Rate::per_hour(1))], now);
            // A refused request with a new key gives its place back.
            store.check_now(
                &[tenant(Rate::per_hour(1)), user(&id, Rate::per_hour(1))],
                now,
            );
            store.check_now(
                &[tenant(Rate::per_hour(1)), user(b"x", Rate::per_hour(1))],
                now,
            );
            assert_eq!(store.len(), live_slots(&store), "after {i}");
            assert!(store.len() <= 4);
        }
    }

    /// Review finding: a request refused by its stored key still evicted a live key to
    /// make room for its new one.
    #[test]
    fn a_request_refused_by_a_stored_key_evicts_nothing() {
        let store = MemoryStore::with_max_keys(8);
        let rate = Rate::per_hour(1);
        let now = 1_000_000_000;
        let tenant = Key::new(
            RuleKind::Tenant,
            Subject::Named(b"t"),
            rate,
            Algorithm::FixedWindow,
        );
        assert!(allowed(&store.check_now(&[tenant], now)));
        for i in 0..7u32 {
            assert!(allowed(
                &store.check_now(&[user(&i.to_le_bytes(), rate)], now)
            ));
        }
        assert_eq!(store.len(), 8);
        for i in 100..200u32 {
            let out = store.check_now(&[tenant, user(&i.to_le_bytes(), rate)], now);
            assert!(!allowed(&out));
        }
        assert_eq!(store.evictions(), 0);
        assert_eq!(store.len(), 8);
    }

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

    /// The issue this store was rebuilt for: a flood of 2 000 000 fresh identities into a
    /// store of 100 000 keys used to evict the most-used windows first, so a user at
    /// L − 1 got her quota back. Eviction now takes the key that loses least. (Two threads
    /// flood at once, each with its own identities.)
    #[test]
    fn a_flood_of_fresh_identities_never_gives_back_used_quota() {
        let store = MemoryStore::with_max_keys(100_000);
        let rate = Rate::per_hour(10);
        let start = 1_000_000_000;
        for _ in 0..9 {
            assert!(allowed(&store.check_now(&[user(b"carol", rate)], start)));
        }
        let floods: Vec<_> = (0..2u32)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..1_000_000u32 {
                        let id = (t << 31 | i).to_le_bytes();
                        store.check_now(&[user(&id, rate)], start + u64::from(i));
                    }
                })
            })
            .collect();
        floods.into_iter().for_each(|f| f.join().unwrap());
        assert!(store.len() <= 100_000);
        assert!(store.evictions() >= 1_900_000, "{}", store.evictions());
        // Her tenth request is her last.
        let now = start + 1_000_000;
        assert!(allowed(&store.check_now(&[user(b"carol", rate)], now)));
        assert!(!allowed(&store.check_now(&[user(b"carol", rate)], now)));
    }

    /// Ids of fresh `per_second(1)` user keys that fall in `window`.
    fn ids_in_window(store: &MemoryStore, window: usize, tag: u8, n: usize) -> Vec<[u8; 6]> {
        (0u32..)
            .map(|i| {
                let b = i.to_le_bytes();
                [b'f', tag, b[0], b[1], b[2], b[3]]
            })
            .filter(|id| store.inner.probe(&user(id, Rate::per_second(1)), id).window == window)
            .take(n)
            .collect()
    }

    /// Stress of the cell logic: threads race on one hot key, on a shared key combined with
    /// their own, and on fresh keys that fill those keys' windows, so slots are evicted
    /// and taken again beside them all the time, all at one instant. Every count must come
    /// out exact: a key admits exactly min(requests, limit), and a refused request counts
    /// under none of its keys.
    #[test]
    fn concurrent_checks_are_exact_and_all_or_nothing() {
        const THREADS: usize = 4;
        const ROUNDS: usize = 10;
        const REQUESTS: usize = 300;
        let hot = Rate::per_hour(500);
        let shared = Rate::per_hour(300);
        let own = Rate::per_hour(100);
        let tenant = |rate| {
            Key::new(
                RuleKind::Tenant,
                Subject::Named(b"shared"),
                rate,
                Algorithm::SlidingWindow,
            )
        };
        for round in 0..ROUNDS {
            let store = MemoryStore::with_max_keys(1_024);
            let hot_window = store.inner.probe(&user(b"hot", hot), b"hot").window;
            let shared_window = store.inner.probe(&tenant(shared), b"shared").window;
            let now = 1_000_000_000 + round as u64;
            let hot_allowed = Arc::new(AtomicU64::new(0));
            let pair_allowed = Arc::new(AtomicU64::new(0));
            let barrier = Arc::new(Barrier::new(THREADS));
            let threads: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (store, barrier) = (store.clone(), barrier.clone());
                    let (hot_allowed, pair_allowed) = (hot_allowed.clone(), pair_allowed.clone());
                    let window = if t % 2 == 0 {
                        hot_window
                    } else {
                        shared_window
                    };
                    let fresh = ids_in_window(&store, window, t as u8, REQUESTS);
                    std::thread::spawn(move || {
                        let mine = [b'u', t as u8];
                        let mut own_allowed = 0;
                        barrier.wait();
                        for id in &fresh {
                            if allowed(&store.check_now(&[user(b"hot", hot)], now)) {
                                hot_allowed.fetch_add(1, Ordering::Relaxed);
                            }
                            if allowed(&store.check_now(&[user(&mine, own), tenant(shared)], now)) {
                                pair_allowed.fetch_add(1, Ordering::Relaxed);
                                own_allowed += 1;
                            }
                            // A fresh key in a busy window: once the window is full, each
                            // one evicts another fresh key (one request, nearest expiry:
                            // they lose least), never the keys counted above.
                            store.check_now(&[user(id, Rate::per_second(1))], now);
                        }
                        own_allowed
                    })
                })
                .collect();
            let own: Vec<u64> = threads.into_iter().map(|t| t.join().unwrap()).collect();
            assert_eq!(hot_allowed.load(Ordering::Relaxed), 500, "round {round}");
            let pairs = pair_allowed.load(Ordering::Relaxed);
            assert_eq!(pairs, 300, "round {round}: {own:?}");
            assert!(own.iter().all(|&n| n <= 100), "round {round}: {own:?}");
            assert!(
                store.evictions() > 0,
                "round {round}: the windows never filled"
            );
        }
    }
}
