//! The Redis store's local deny cache.
//!
//! When Redis refuses a key, its answer says when that key will allow again (`retry_after`).
//! Until then every request carrying the key is refused anyway — a refused request counts
//! nowhere — so the store answers it here, without a round trip. The cache is exact in
//! that direction: it refuses only while Redis itself would (it counts from the moment the
//! request was sent, so it lets go a round trip early rather than late). What it cannot
//! know is the state of the request's other keys: a locally refused request reports only
//! the cached keys as refused, and the others as allowing with nothing known of their
//! quota.
//!
//! A refusal can also end early: another instance may reset the key
//! (`RateLimitHandle::reset`), and on a Redis Cluster a request whose keys span slots
//! holds a reservation on one slot until another slot's refusal gives it back (a round
//! trip), so a request refused meanwhile would be allowed right after. So the cache
//! refuses locally for at most [`DENY_HOLD`], still stating the wait Redis gave: a reset
//! anywhere is seen by every instance within that.

use std::cell::RefCell;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use hashbrown::{DefaultHashBuilder, HashMap};

use super::{Outcome, Outcomes};
use crate::key::Key;

const SHARDS: usize = 16;

/// How long the cache refuses a key locally (µs), whatever wait Redis stated: an abusive
/// caller costs one round trip a second per key and instance, a reset on another instance
/// is seen here within a second, and on a cluster a refusal another request's passing
/// reservation caused is not repeated for long.
pub(crate) const DENY_HOLD: u64 = 1_000_000;

/// Keys refused by Redis, with when they allow again; bounded.
pub(crate) struct DenyCache {
    shards: Box<[Shard]>,
    per_shard: usize,
    /// The bound on entries across all shards.
    capacity: usize,
    /// Entries held, so an empty cache costs one load per request.
    held: AtomicUsize,
    /// The longest a key is refused locally (µs); `u64::MAX` for no bound.
    hold: u64,
    hasher: DefaultHashBuilder,
}

type Shard = Mutex<HashMap<Box<str>, Deny>>;

#[derive(Clone, Copy)]
struct Deny {
    /// The cost Redis refused: a call of at least this cost is refused here; a cheaper
    /// one may fit, so it goes to Redis.
    cost: u64,
    /// Caller's clock, µs: the key is refused here until then.
    until: u64,
    /// Caller's clock, µs: when Redis said the key allows again.
    allows: u64,
    /// Caller's clock, µs: when the key resets.
    resets: u64,
    /// The store's clock, µs: when the key resets (as Redis stated it).
    reset_at: u64,
}

impl Deny {
    fn reset_after_from(&self, now: u64) -> u64 {
        self.resets.saturating_sub(now)
    }
}

thread_local! {
    /// Where keys are encoded for a lookup, so a lookup allocates nothing.
    static ENCODED: RefCell<String> = const { RefCell::new(String::new()) };
}

impl DenyCache {
    /// A cache of at most `capacity` keys (0: never caches), each refused locally for at
    /// most `hold` µs (`u64::MAX`: as long as Redis said).
    pub(crate) fn new(capacity: usize, hold: u64) -> Self {
        DenyCache {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            // Rounded up, so a capacity below the number of shards still caches; the
            // global count keeps the total within `capacity`.
            per_shard: capacity.div_ceil(SHARDS),
            capacity,
            held: AtomicUsize::new(0),
            hold,
            hasher: DefaultHashBuilder::default(),
        }
    }

    /// The answer for a call of `cost` units under `keys` at `now`, if one of them is
    /// known to refuse it: the cached keys refused, the others allowing with nothing known
    /// of their quota.
    pub(crate) fn check(
        &self,
        prefix: &str,
        keys: &[Key<'_>],
        now: u64,
        cost: u64,
    ) -> Option<Outcomes> {
        if self.held.load(Ordering::Relaxed) == 0 {
            return None;
        }
        ENCODED.with(|buf| {
            let mut buf = buf.borrow_mut();
            let mut out = Outcomes::new();
            let mut refused = false;
            for key in keys {
                buf.clear();
                key.encode_into(prefix, &mut buf);
                let deny = self.shard(&buf).get(buf.as_str()).copied();
                match deny {
                    Some(deny) if deny.until > now && cost >= deny.cost => {
                        refused = true;
                        out.push(Outcome {
                            allowed: false,
                            remaining: 0,
                            reset_after: deny.reset_after_from(now),
                            retry_after: deny.allows.saturating_sub(now),
                            reset_at: deny.reset_at,
                            by_fallback: false,
                        });
                    }
                    _ => {
                        out.push(Outcome {
                            allowed: true,
                            remaining: 0,
                            reset_after: 0,
                            retry_after: 0,
                            reset_at: 0,
                            by_fallback: false,
                        });
                    }
                }
            }
            refused.then_some(out)
        })
    }

    /// Remembers every key Redis refused in `outcomes` (answering a call of `cost` units
    /// sent at `now`).
    pub(crate) fn record<'k>(
        &self,
        encoded: impl IntoIterator<Item = &'k str>,
        outcomes: &Outcomes,
        now: u64,
        cost: u64,
    ) {
        if self.per_shard == 0 {
            return;
        }
        for (key, outcome) in encoded.into_iter().zip(outcomes.iter()) {
            if outcome.allowed {
                continue;
            }
            let deny = Deny {
                cost,
                until: now.saturating_add(outcome.retry_after.min(self.hold)),
                allows: now.saturating_add(outcome.retry_after),
                resets: now.saturating_add(outcome.reset_after),
                reset_at: outcome.reset_at,
            };
            let mut shard = self.shard(key);
            if let Some(held) = shard.get_mut(key) {
                *held = deny;
                continue;
            }
            if shard.len() >= self.per_shard || !self.take_place() {
                let before = shard.len();
                shard.retain(|_, d| d.until > now);
                self.held.fetch_sub(before - shard.len(), Ordering::Relaxed);
                if shard.len() >= self.per_shard || !self.take_place() {
                    // Full of live denials: this one goes to Redis each time instead.
                    continue;
                }
            }
            shard.insert(key.into(), deny);
        }
    }

    /// Forgets the keys in `encoded`: their counts changed here (a settlement gave units
    /// back), so Redis decides their next call.
    pub(crate) fn forget<'k>(&self, encoded: impl IntoIterator<Item = &'k str>) {
        if self.held.load(Ordering::Relaxed) == 0 {
            return;
        }
        for key in encoded {
            if self.shard(key).remove(key).is_some() {
                self.held.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Reserves one entry under the global bound.
    fn take_place(&self) -> bool {
        self.held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                (held < self.capacity).then_some(held + 1)
            })
            .is_ok()
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, HashMap<Box<str>, Deny>> {
        let index = (self.hasher.hash_one(key) as usize) % SHARDS;
        self.shards[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Entries held now.
    pub(super) fn len(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithm::Algorithm;
    use crate::key::{RuleKind, Subject};
    use crate::rate::Rate;

    fn key(id: &[u8]) -> Key<'_> {
        Key::new(
            RuleKind::User,
            Subject::Named(id),
            Rate::per_minute(1),
            Algorithm::FixedWindow,
        )
    }

    fn refused(retry_after: u64) -> Outcomes {
        let mut out = Outcomes::new();
        out.push(Outcome {
            allowed: false,
            remaining: 0,
            reset_after: retry_after,
            retry_after,
            reset_at: 0,
            by_fallback: false,
        });
        out
    }

    #[test]
    fn refuses_exactly_until_redis_said() {
        let cache = DenyCache::new(100, u64::MAX);
        assert!(cache.check("rl", &[key(b"a")], 0, 1).is_none());
        cache.record([key(b"a").encode("rl").as_str()], &refused(5_000), 1_000, 1);
        let hit = cache
            .check("rl", &[key(b"a"), key(b"b")], 2_000, 1)
            .unwrap();
        let outcomes: Vec<_> = hit.iter().copied().collect();
        assert!(!outcomes[0].allowed && outcomes[0].retry_after == 4_000);
        assert!(outcomes[1].allowed, "an uncached key is not refused");
        assert!(cache.check("rl", &[key(b"a")], 5_999, 1).is_some());
        assert!(
            cache.check("rl", &[key(b"a")], 6_000, 1).is_none(),
            "Redis decides again"
        );
        assert!(cache.check("rl", &[key(b"b")], 2_000, 1).is_none());
        assert!(
            cache.check("other", &[key(b"a")], 2_000, 1).is_none(),
            "prefix is part of the key"
        );
    }

    #[test]
    fn a_bounded_hold_refuses_briefly_but_states_redis_wait() {
        let cache = DenyCache::new(100, DENY_HOLD);
        let minute = 60_000_000;
        cache.record([key(b"a").encode("rl").as_str()], &refused(minute), 0, 1);
        let hit = cache.check("rl", &[key(b"a")], DENY_HOLD - 1, 1).unwrap();
        assert_eq!(
            hit.iter().next().unwrap().retry_after,
            minute - DENY_HOLD + 1,
            "the wait Redis stated"
        );
        assert!(
            cache.check("rl", &[key(b"a")], DENY_HOLD, 1).is_none(),
            "Redis decides again after the hold"
        );
        // A wait shorter than the hold is kept as it is.
        cache.record([key(b"b").encode("rl").as_str()], &refused(500), 0, 1);
        assert!(cache.check("rl", &[key(b"b")], 499, 1).is_some());
        assert!(cache.check("rl", &[key(b"b")], 500, 1).is_none());
    }

    #[test]
    fn stays_within_its_capacity() {
        let cache = DenyCache::new(32, u64::MAX);
        for i in 0..1_000u32 {
            let id = i.to_be_bytes();
            cache.record([key(&id).encode("rl").as_str()], &refused(1_000_000), 0, 1);
            assert!(cache.len() <= 32, "{}", cache.len());
        }
        // Expired denials make room again.
        cache.record(
            [key(b"late").encode("rl").as_str()],
            &refused(10),
            2_000_000,
            1,
        );
        assert!(cache.check("rl", &[key(b"late")], 2_000_001, 1).is_some());
        assert_eq!(DenyCache::new(0, u64::MAX).per_shard, 0);
    }

    /// A request's four keys (user, tenant, tool, user×tool): the answer holds four
    /// outcomes, the refused ones as Redis said.
    #[test]
    fn answers_for_all_four_keys_of_a_request() {
        let cache = DenyCache::new(100, u64::MAX);
        let rate = Rate::per_minute(1);
        let alg = Algorithm::FixedWindow;
        let keys = [
            Key::new(RuleKind::User, Subject::Named(b"u"), rate, alg),
            Key::new(RuleKind::Tenant, Subject::Named(b"t"), rate, alg).with_tier("pro"),
            Key::new(RuleKind::Tool, Subject::Named(b"search"), rate, alg),
            Key::user_tool(Subject::Named(b"u"), "search", rate, alg),
        ];
        let names: Vec<String> = keys.iter().map(|k| k.encode("rl")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut outcomes = Outcomes::new();
        for (i, retry) in [0, 0, 2_000, 7_000].into_iter().enumerate() {
            assert!(
                outcomes.push(Outcome {
                    allowed: retry == 0,
                    remaining: 0,
                    reset_after: retry,
                    retry_after: retry,
                    reset_at: 0,
                    by_fallback: false,
                }),
                "key {i}"
            );
        }
        cache.record(names.iter().copied(), &outcomes, 0, 1);
        let hit = cache.check("rl", &keys, 1_000, 1).unwrap();
        let allowed: Vec<bool> = hit.iter().map(|o| o.allowed).collect();
        assert_eq!(allowed, [true, true, false, false]);
        let waits: Vec<u64> = hit.iter().map(|o| o.retry_after).collect();
        assert_eq!(waits, [0, 0, 1_000, 6_000]);
    }

    /// Regression: `deny_cache` 1 to 15 was documented as
    /// a size but cached nothing (16 shards of zero). Now it holds exactly that many.
    #[test]
    fn a_capacity_below_the_shard_count_is_honoured() {
        for capacity in [1, 5, 15] {
            let cache = DenyCache::new(capacity, u64::MAX);
            for i in 0..100u32 {
                let id = i.to_be_bytes();
                cache.record([key(&id).encode("rl").as_str()], &refused(1_000_000), 0, 1);
                assert!(cache.len() <= capacity, "{capacity}: {}", cache.len());
            }
            assert_eq!(cache.len(), capacity, "a full cache of {capacity}");
            let cached = (0..100u32)
                .filter(|i| cache.check("rl", &[key(&i.to_be_bytes())], 1, 1).is_some())
                .count();
            assert_eq!(cached, capacity);
        }
    }
}
