//! The in-process store: sharded, exact under concurrency, bounded, self-evicting.

use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hashbrown::hash_table::{Entry as TableEntry, HashTable};
use hashbrown::DefaultHashBuilder;

use super::{Outcome, Outcomes, Store, StoreFuture, StoreRequest};
use crate::algorithm::{State, Step};
use crate::key::{with_memory_ids, Key, MAX_KEYS};
use crate::Algorithm;

/// How often (µs) a shard drops expired entries on its own, while it is being written.
const PURGE_EVERY: u64 = 1_000_000;
/// Shards up to a million keys: their headers stay in cache (more shards made the
/// 100 000-key check 2.5 × slower here).
const SHARDS_AT_A_MILLION: usize = 64;
/// Shards are only split while each keeps at least this many keys.
const MIN_KEYS_PER_SHARD: usize = 1_024;
/// Beyond a million keys, shards are added so none holds more than this many: a shard's
/// once-a-second purge scans it under its lock, and must stay short.
const MAX_KEYS_PER_SHARD: usize = 16_384;

/// Counters in this process: one shared limit per process.
///
/// Keys are spread over up to 64 shards, each behind its own lock, so threads working on
/// different keys rarely meet. A request's keys are locked together (in shard order), so
/// all-or-nothing holds exactly under any concurrency. The store never holds more than
/// `max_keys` keys: writes drop expired entries as they go, and at the bound the entries
/// nearest their expiry are evicted and counted ([`MemoryStore::evictions`]) — keys that
/// still have quota before keys at their limit, so a flood of fresh identities does not
/// lift anyone's block.
///
/// Clones share the counters.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    shards: Box<[Shard]>,
    shard_shift: u32,
    max_keys: usize,
    /// Keys held across all shards; an insert reserves a place here first, so the bound
    /// is global (no shard is full while others are empty).
    held: AtomicUsize,
    hasher: DefaultHashBuilder,
}

#[repr(align(128))]
struct Shard(Mutex<Table>);

struct Table {
    map: HashTable<Entry>,
    next_purge: u64,
    evictions: u64,
}

/// 40 bytes: the expiry is derived from the state, not stored.
struct Entry {
    subject: Box<[u8]>,
    period_secs: u32,
    tag: u8,
    /// The last counted request used the key's last unit of quota: evicted last, so a
    /// flood of fresh identities cannot lift a block.
    saturated: bool,
    state: State,
}

impl Entry {
    fn expires_at(&self) -> u64 {
        let alg = match (self.tag >> 2) & 3 {
            0 => Algorithm::FixedWindow,
            1 => Algorithm::SlidingWindow,
            _ => Algorithm::TokenBucket,
        };
        alg.expires_at(&self.state, u64::from(self.period_secs) * 1_000_000)
    }
}

impl MemoryStore {
    /// A store holding at most 1 000 000 keys.
    pub fn new() -> Self {
        Self::with_max_keys(1_000_000)
    }

    /// A store holding at most `max_keys` keys (at least 1).
    pub fn with_max_keys(max_keys: usize) -> Self {
        let max_keys = max_keys.max(1);
        let mut shards = 1;
        while shards < SHARDS_AT_A_MILLION && max_keys / (shards * 2) >= MIN_KEYS_PER_SHARD {
            shards *= 2;
        }
        while max_keys / shards > MAX_KEYS_PER_SHARD {
            shards *= 2;
        }
        MemoryStore {
            inner: Arc::new(Inner {
                shards: (0..shards)
                    .map(|_| {
                        Shard(Mutex::new(Table {
                            map: HashTable::new(),
                            next_purge: 0,
                            evictions: 0,
                        }))
                    })
                    .collect(),
                shard_shift: 64 - shards.trailing_zeros(),
                max_keys,
                held: AtomicUsize::new(0),
                hasher: DefaultHashBuilder::default(),
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

    /// Live keys evicted so far because the store was full.
    pub fn evictions(&self) -> u64 {
        self.inner.shards.iter().map(|s| lock(s).evictions).sum()
    }

    /// Checks and counts `keys` at `now` (µs since the epoch), all-or-nothing.
    pub(crate) fn check_now(&self, keys: &[Key<'_>], now: u64) -> Outcomes {
        with_memory_ids(keys, |ids| self.check_ids(keys, ids, now))
    }

    /// [`MemoryStore::check_now`], each key identified by its tag, rate and `ids[i]`.
    fn check_ids(&self, keys: &[Key<'_>], ids: &[&[u8]], now: u64) -> Outcomes {
        let inner = &*self.inner;
        let mut out = Outcomes::new();
        let keys = &keys[..ids.len()];
        match keys {
            [] => {}
            [key] => {
                let probe = Probe::new(inner, key, ids[0]);
                let mut table = lock(&inner.shards[probe.shard]);
                let step = table.step(&probe, key, now);
                if step.allowed {
                    table.write(inner, &probe, key, &step, now);
                }
                out.push(outcome(&step, now));
            }
            _ => {
                let mut probes = [None; MAX_KEYS];
                for ((slot, key), id) in probes.iter_mut().zip(keys).zip(ids) {
                    *slot = Some(Probe::new(inner, key, id));
                }
                let probes = &probes[..keys.len()];
                // Lock each distinct shard once, in ascending order: no deadlock, and the
                // whole check-then-write is one atomic step for these keys.
                let mut order: [usize; MAX_KEYS] = [usize::MAX; MAX_KEYS];
                for (o, p) in order.iter_mut().zip(probes.iter().flatten()) {
                    *o = p.shard;
                }
                order.sort_unstable();
                let mut guards: Guards<'_> = [None, None, None, None];
                let mut held = 0;
                for shard in order.into_iter().filter(|s| *s != usize::MAX) {
                    if held == 0 || guards[held - 1].as_ref().map(|g| g.0) != Some(shard) {
                        guards[held] = Some((shard, lock(&inner.shards[shard])));
                        held += 1;
                    }
                }
                let mut steps: [Option<Step>; MAX_KEYS] = [None; MAX_KEYS];
                for ((step, probe), key) in steps.iter_mut().zip(probes.iter().flatten()).zip(keys)
                {
                    *step = Some(table_of(&mut guards, probe.shard).step(probe, key, now));
                }
                let all = steps.iter().flatten().all(|s| s.allowed);
                for ((step, probe), key) in steps.iter().zip(probes.iter().flatten()).zip(keys) {
                    let step = step.as_ref().expect("one step per key");
                    if all {
                        table_of(&mut guards, probe.shard).write(inner, probe, key, step, now);
                    }
                    out.push(outcome(step, now));
                }
            }
        }
        out
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
            .field("shards", &self.inner.shards.len())
            .field("max_keys", &self.inner.max_keys)
            .finish_non_exhaustive()
    }
}

impl Store for MemoryStore {
    fn check(&self, request: &StoreRequest<'_>) -> StoreFuture {
        StoreFuture::Ready(Ok(self.check_now(request.keys, request.now)))
    }
}

fn lock(shard: &Shard) -> MutexGuard<'_, Table> {
    // A panic elsewhere while holding the lock cannot leave a table half-written (every
    // write is one assignment), so a poisoned lock is safe to keep using.
    shard.0.lock().unwrap_or_else(PoisonError::into_inner)
}

type Guards<'a> = [Option<(usize, MutexGuard<'a, Table>)>; MAX_KEYS];

fn table_of<'g>(guards: &'g mut Guards<'_>, shard: usize) -> &'g mut Table {
    let found = guards.iter_mut().flatten().find(|g| g.0 == shard);
    &mut found.expect("every probed shard is locked").1
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

/// A key's hash, shard, compact tag and identity bytes, computed once per request.
#[derive(Clone, Copy)]
struct Probe<'k> {
    hash: u64,
    shard: usize,
    tag: u8,
    id: &'k [u8],
}

impl<'k> Probe<'k> {
    fn new(inner: &Inner, key: &Key<'_>, id: &'k [u8]) -> Probe<'k> {
        let tag = key.memory_tag();
        let hash = hash_of(inner, tag, key.rate.period_secs(), id);
        let shard = if inner.shards.len() == 1 {
            0
        } else {
            (hash >> inner.shard_shift) as usize
        };
        Probe {
            hash,
            shard,
            tag,
            id,
        }
    }
}

fn hash_of(inner: &Inner, tag: u8, period_secs: u32, subject: &[u8]) -> u64 {
    inner.hasher.hash_one((tag, period_secs, subject))
}

impl Table {
    fn step(&self, probe: &Probe<'_>, key: &Key<'_>, now: u64) -> Step {
        let subject = probe.id;
        let period = key.rate.period_secs();
        let state = self
            .map
            .find(probe.hash, |e| {
                e.tag == probe.tag && e.period_secs == period && *e.subject == *subject
            })
            .map(|e| e.state);
        key.algorithm.check(state, now, key.rate)
    }

    fn write(&mut self, inner: &Inner, probe: &Probe<'_>, key: &Key<'_>, step: &Step, now: u64) {
        if now >= self.next_purge || self.next_purge - now > PURGE_EVERY {
            self.drop_expired(inner, now);
            self.next_purge = now.saturating_add(PURGE_EVERY);
        }
        let subject = probe.id;
        let period = key.rate.period_secs();
        let matches =
            |e: &Entry| e.tag == probe.tag && e.period_secs == period && *e.subject == *subject;
        let saturated = step.remaining == 0;
        if let Some(e) = self.map.find_mut(probe.hash, matches) {
            e.state = step.next;
            e.saturated = saturated;
            return;
        }
        if !self.reserve_place(inner, now) {
            // Full, and this shard has nothing to give back: the request is decided, but
            // its state is not kept (the key starts afresh next time).
            return;
        }
        let hasher = |e: &Entry| hash_of(inner, e.tag, e.period_secs, &e.subject);
        match self.map.entry(probe.hash, matches, hasher) {
            TableEntry::Occupied(_) => unreachable!("looked up above"),
            TableEntry::Vacant(v) => {
                v.insert(Entry {
                    subject: subject.into(),
                    period_secs: period,
                    tag: probe.tag,
                    saturated,
                    state: step.next,
                });
            }
        }
    }

    /// Takes one place under the global bound, making room in this shard if the store is
    /// full: first by dropping its expired entries, then by evicting the sixteenth of its
    /// entries nearest their expiry. False if no place could be made.
    fn reserve_place(&mut self, inner: &Inner, now: u64) -> bool {
        let take = || {
            inner
                .held
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                    (held < inner.max_keys).then_some(held + 1)
                })
                .is_ok()
        };
        if take() {
            return true;
        }
        if self.drop_expired(inner, now) == 0 && self.evict_nearest(inner) == 0 {
            return false;
        }
        if take() {
            return true;
        }
        // Other shards' inserts took the places freed here: free more, and take one.
        self.evict_nearest(inner) > 0 && take()
    }

    fn drop_expired(&mut self, inner: &Inner, now: u64) -> usize {
        let before = self.map.len();
        self.map.retain(|e| e.expires_at() > now);
        let dropped = before - self.map.len();
        inner.held.fetch_sub(dropped, Ordering::AcqRel);
        dropped
    }

    fn evict_nearest(&mut self, inner: &Inner) -> usize {
        let fair_share = inner.max_keys / inner.shards.len();
        let batch = (fair_share / 16).clamp(1, self.map.len().max(1));
        if self.map.is_empty() {
            return 0;
        }
        // Entries with quota left go first, each group nearest its expiry first.
        let rank = |e: &Entry| (e.saturated, e.expires_at());
        let mut ranks: Vec<(bool, u64)> = self.map.iter().map(rank).collect();
        let (_, &mut threshold, _) = ranks.select_nth_unstable(batch - 1);
        let below = ranks.iter().filter(|r| **r < threshold).count();
        let mut ties = batch - below;
        let before = self.map.len();
        self.map.retain(|e| {
            let r = rank(e);
            if r < threshold {
                false
            } else if r == threshold && ties > 0 {
                ties -= 1;
                false
            } else {
                true
            }
        });
        let evicted = before - self.map.len();
        inner.held.fetch_sub(evicted, Ordering::AcqRel);
        self.evictions += evicted as u64;
        evicted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Rate, RuleKind, Subject};

    fn user(id: &[u8], rate: Rate) -> Key<'_> {
        Key::new(
            RuleKind::User,
            Subject::Named(id),
            rate,
            Algorithm::FixedWindow,
        )
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
        // Writes after the keys expired sweep them away; no eviction is counted.
        // Enough writes to reach every shard.
        for i in 0..5_000u32 {
            let id = (1_000_000 + i).to_be_bytes();
            store.check_now(&[user(&id, rate)], 20_000_000);
        }
        assert_eq!(store.len(), 5_000);
        assert_eq!(store.evictions(), 0);
    }

    #[test]
    fn shards_stay_small_enough_to_purge_quickly() {
        for (max_keys, shards) in [
            (1, 1),
            (2_047, 1),
            (100_000, 64),
            (1_000_000, 64),
            (10_000_000, 1_024),
            (1_000_000_000, 65_536),
        ] {
            let store = MemoryStore::with_max_keys(max_keys);
            assert_eq!(store.inner.shards.len(), shards, "{max_keys}");
            assert!(max_keys / shards <= MAX_KEYS_PER_SHARD);
        }
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
        assert!(store.check_now(&[anon], 0).iter().all(Outcome::is_allowed));
        assert!(store
            .check_now(&[user(b"anonymous", rate)], 0)
            .iter()
            .all(Outcome::is_allowed));
        assert!(!store.check_now(&[anon], 0).iter().all(Outcome::is_allowed));
    }
}
