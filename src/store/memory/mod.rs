//! The in-process store: one table of per-key cells, each updated by atomic operations on
//! its own 32-byte slot. ARCHITECTURE.md, "The memory store", explains the design. The
//! parts: `cell.rs` (a cell's bits), `digest.rs` (a key's identity), `table.rs` (slots,
//! windows, segments), `check.rs` (one request's check), `locks.rs` (several keys at
//! once), `evict.rs` (insertion, expiry and eviction).
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

mod cell;
mod check;
mod digest;
mod evict;
mod locks;
mod table;

use std::fmt;
use std::sync::atomic::Ordering;

use check::Inner;
use table::WINDOW;

use super::{Outcomes, SettleFuture, Settlement, Store, StoreFuture, StoreRequest, StoreStats};
use crate::config::settings;
use crate::key::{with_memory_ids, Key};

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

impl MemoryStore {
    /// A store holding at most 1 000 000 keys.
    pub fn new() -> Self {
        Self::with_max_keys(settings::MAX_KEYS.default as usize)
    }

    /// A store holding at most `max_keys` keys (at least 1).
    pub fn with_max_keys(max_keys: usize) -> Self {
        // Beyond 2^40 keys the table could not be allocated anyway; the clamp keeps the
        // table's sizes from overflowing.
        let max_keys = max_keys.clamp(1, 1 << 40);
        MemoryStore {
            inner: std::sync::Arc::new(Inner::new(max_keys)),
        }
    }

    /// Keys held now (expired ones not yet dropped included).
    pub fn len(&self) -> usize {
        self.inner.room.held.load(Ordering::Acquire)
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bound on keys held.
    pub fn max_keys(&self) -> usize {
        self.inner.room.max_keys
    }

    /// Live keys evicted so far because the store (or a key's window) was full.
    pub fn evictions(&self) -> u64 {
        self.inner.room.evictions.load(Ordering::Relaxed)
    }

    /// Checks and counts `request`, all-or-nothing.
    #[inline]
    pub(crate) fn check_request(&self, request: &StoreRequest<'_>) -> Outcomes {
        let (keys, now, cost) = (request.keys, request.now, request.cost);
        with_memory_ids(keys, |ids| {
            self.inner.check(&keys[..ids.len()], ids, now, cost)
        })
    }

    /// Checks and counts one unit under `keys` at `now` (µs since the epoch).
    #[cfg(test)]
    pub(crate) fn check_now(&self, keys: &[Key<'_>], now: u64) -> Outcomes {
        self.check_request(&StoreRequest::new(keys, now))
    }

    /// Applies `settlement` to the keys still stored.
    pub(crate) fn settle_now(&self, settlement: &Settlement<'_>) {
        let keys = settlement.keys;
        with_memory_ids(keys, |ids| {
            self.inner.settle(
                &keys[..ids.len()],
                ids,
                settlement.outcomes,
                settlement.delta,
                settlement.now,
            )
        })
    }
}

impl MemoryStore {
    /// Forgets the counts of `keys` ([`Store::reset`]).
    pub(crate) fn reset_now(&self, keys: &[Key<'_>]) {
        with_memory_ids(keys, |ids| self.inner.reset(&keys[..ids.len()], ids));
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
            .field("slots", &(self.inner.table.windows * WINDOW))
            .field("max_keys", &self.inner.room.max_keys)
            .finish_non_exhaustive()
    }
}

impl Store for MemoryStore {
    fn check(&self, request: &StoreRequest<'_>) -> StoreFuture {
        StoreFuture::Ready(Ok(self.check_request(request)))
    }

    fn settle(&self, settlement: &Settlement<'_>) -> SettleFuture {
        self.settle_now(settlement);
        SettleFuture::Ready(Ok(()))
    }

    fn reset(&self, keys: &[Key<'_>]) -> SettleFuture {
        self.reset_now(keys);
        SettleFuture::Ready(Ok(()))
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

#[cfg(test)]
mod tests {
    use super::cell::Status;
    use super::table::{SEGMENT_SLOTS, WINDOW};
    use super::*;
    use crate::algorithm::Algorithm;
    use crate::key::{RuleKind, Subject};
    use crate::rate::Rate;
    use crate::store::Outcome;
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
            .table
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
        let inserts = store.inner.table.windows as u32;
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
        let slots = store.inner.table.windows * WINDOW;
        assert!(
            (2_000_000..2_000_000 + SEGMENT_SLOTS).contains(&slots),
            "{slots}"
        );
        assert_eq!(segments_in_use(&store), 0);
        store.check_now(&[user(b"alice", Rate::per_minute(1))], 1_000_000);
        assert_eq!(segments_in_use(&store), 1);
        // A store of one key still has a whole window.
        assert_eq!(MemoryStore::with_max_keys(1).inner.table.windows, 1);
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
        (0..inner.table.windows)
            .filter_map(|w| inner.table.window(w))
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
