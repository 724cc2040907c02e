//! A primary store (Redis) behind a circuit breaker, with a local store answering while it
//! fails.
//!
//! After [`FAILURES_TO_OPEN`] consecutive failures the circuit opens: for [`COOL_DOWN`]
//! no request reaches the primary (the fallback answers at once, or the error is returned
//! without awaiting anything). Then one request probes the primary; success closes the
//! circuit, failure keeps it open for another cool-down. Transitions and fallbacks are
//! logged at most about once a second, never with a key or an identity.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::memory::MemoryStore;
use super::primary::Primary;
use super::redis::RedisStore;
use super::{
    Outcomes, SettleFuture, Settlement, Store, StoreError, StoreErrorKind, StoreFuture,
    StoreRequest, StoreStats,
};
use crate::key::{Key, OwnedKeys};
use crate::log_gate::LogGate;

/// Consecutive failures that open the circuit.
pub(crate) const FAILURES_TO_OPEN: u32 = 3;
/// How long an open circuit keeps requests away from the primary before a probe.
pub(crate) const COOL_DOWN: Duration = Duration::from_secs(1);

/// A [`RedisStore`] guarded by a circuit breaker, with a [`MemoryStore`] (if any)
/// answering while Redis fails. `RateLimitLayer::new` builds this for
/// `[backend] kind = "redis"`; build it yourself when you construct the Redis store in
/// code:
///
/// ```no_run
/// use tollgate::{FallbackStore, MemoryStore, RateLimitConfig, RateLimitLayer, RedisStore};
///
/// let cfg = RateLimitConfig::from_toml_str("by_user = \"30/m\"").unwrap();
/// let redis = RedisStore::builder("redis://127.0.0.1:6379/0").build().unwrap();
/// let store = FallbackStore::new(redis, Some(MemoryStore::new()));
/// let layer = RateLimitLayer::with_store(cfg, store);
/// ```
///
/// After three consecutive failures the circuit opens for one second: no request reaches
/// Redis, the fallback answers at once (or the error is returned without waiting, and the
/// layer's `fail_mode` decides). Then one request probes Redis; success closes the
/// circuit. Refusals the Redis store's deny cache answers locally neither close the
/// circuit nor use up the probe. Clones share the circuit and the fallback's counters;
/// [`Store::stats`] counts the fallback's answers.
#[derive(Clone)]
pub struct FallbackStore {
    inner: Arc<Inner<RedisStore>>,
}

struct Inner<P> {
    primary: P,
    fallback: Option<MemoryStore>,
    breaker: Breaker,
    fallback_log: FallbackLog,
    fallback_answers: AtomicU64,
}

impl FallbackStore {
    /// `primary`, answered for by `fallback` (or by nobody) while it fails.
    pub fn new(primary: RedisStore, fallback: Option<MemoryStore>) -> Self {
        FallbackStore {
            inner: Arc::new(Inner::new(primary, fallback)),
        }
    }
}

impl fmt::Debug for FallbackStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FallbackStore")
            .field("primary", &self.inner.primary)
            .field("fallback", &self.inner.fallback)
            .field("circuit_open", &self.inner.breaker.is_open())
            .finish()
    }
}

impl Store for FallbackStore {
    fn check(&self, request: &StoreRequest<'_>) -> StoreFuture {
        self.inner.check(request)
    }

    /// A call settles where it was counted: in the fallback if the fallback answered its
    /// check, else in Redis.
    fn settle(&self, settlement: &Settlement<'_>) -> SettleFuture {
        match &self.inner.fallback {
            Some(memory) if settlement.outcomes().answered_by_fallback() => {
                memory.settle(settlement)
            }
            _ => self.inner.primary.settle(settlement),
        }
    }

    /// Both forget the keys: the fallback's counts would otherwise answer again the next
    /// time Redis fails.
    fn reset(&self, keys: &[Key<'_>]) -> SettleFuture {
        if let Some(memory) = &self.inner.fallback {
            memory.reset_now(keys);
        }
        self.inner.primary.reset(keys)
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            source: Some(Arc::as_ptr(&self.inner) as *const () as usize),
            ..self.inner.stats()
        }
    }
}

impl<P: Primary> Inner<P> {
    fn new(primary: P, fallback: Option<MemoryStore>) -> Self {
        Inner {
            primary,
            fallback,
            breaker: Breaker::new(),
            fallback_log: FallbackLog::new(),
            fallback_answers: AtomicU64::new(0),
        }
    }

    /// The primary's figures, the fallback's keys, and this wrapper's own.
    fn stats(&self) -> StoreStats {
        let local = self.fallback.as_ref().map(Store::stats).unwrap_or_default();
        StoreStats {
            fallback_answers: self.fallback_answers.load(Ordering::Relaxed),
            keys: local.keys,
            evictions: local.evictions,
            circuit_open: Some(self.breaker.is_open()),
            ..self.primary.stats()
        }
    }

    fn check(self: &Arc<Self>, request: &StoreRequest<'_>) -> StoreFuture {
        let inner = &**self;
        // A cached answer says nothing of the primary's health: it neither closes the
        // circuit nor uses up the probe.
        if let Some(outcomes) = inner.primary.answer_locally(request) {
            return StoreFuture::Ready(Ok(outcomes));
        }
        if !inner.breaker.admit() {
            // Open circuit: no await, no allocation beyond what the fallback does.
            return StoreFuture::Ready(inner.answer_without_primary(request, None));
        }
        match inner.primary.check_backend(request) {
            StoreFuture::Ready(Ok(outcomes)) => {
                inner.breaker.success();
                StoreFuture::Ready(Ok(outcomes))
            }
            StoreFuture::Ready(Err(error)) => {
                inner.breaker.failed(&error);
                StoreFuture::Ready(inner.answer_without_primary(request, Some(&error)))
            }
            StoreFuture::Pending(pending) => {
                let this = self.clone();
                let owned = this
                    .fallback
                    .as_ref()
                    .map(|_| OwnedKeys::new(request.keys()));
                let (now, cost) = (request.now_micros(), request.cost());
                StoreFuture::Pending(Box::pin(async move {
                    match pending.await {
                        Ok(outcomes) => {
                            this.breaker.success();
                            Ok(outcomes)
                        }
                        Err(error) => {
                            this.breaker.failed(&error);
                            match &owned {
                                Some(owned) => owned.with(|keys| {
                                    let request = StoreRequest::new(keys, now).with_cost(cost);
                                    this.answer_without_primary(&request, Some(&error))
                                }),
                                None => this.answer_without_primary(
                                    &StoreRequest::new(&[], 0),
                                    Some(&error),
                                ),
                            }
                        }
                    }
                }))
            }
        }
    }
}

impl<P> Inner<P> {
    /// The fallback's answer, or the error (`error`, or "circuit open").
    fn answer_without_primary(
        &self,
        request: &StoreRequest<'_>,
        error: Option<&StoreError>,
    ) -> Result<Outcomes, StoreError> {
        let error = error.cloned().unwrap_or_else(|| {
            StoreError::new(
                StoreErrorKind::Unavailable,
                "redis circuit open: not calling redis during its cool-down",
            )
        });
        match &self.fallback {
            Some(memory) => {
                self.fallback_answers.fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = self.fallback_log.may_log() {
                    tracing::warn!(
                        %error,
                        suppressed,
                        "tollgate: redis unavailable; the local memory store is answering (limits hold per instance)"
                    );
                }
                Ok(memory.check_request(request).by_fallback())
            }
            // The layer logs (rate-limited) and applies fail_mode.
            None => Err(error),
        }
    }
}

/// The circuit breaker: lock-free, time from a monotonic clock (a test's manual clock
/// must not keep Redis out for ever).
struct Breaker {
    base: Instant,
    failures: AtomicU32,
    /// 0 = closed; otherwise µs since `base` when the next probe may go (the circuit is
    /// open or half-open).
    open_until: AtomicU64,
}

impl Breaker {
    fn new() -> Self {
        Breaker {
            base: Instant::now(),
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        // +1: 0 means "closed".
        u64::try_from(self.base.elapsed().as_micros()).unwrap_or(u64::MAX - 1) + 1
    }

    fn is_open(&self) -> bool {
        self.open_until.load(Ordering::Relaxed) != 0
    }

    /// Whether this request may call the primary: always when closed; when open, only the
    /// one request that claims the probe after the cool-down.
    fn admit(&self) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        let now = self.now();
        now >= until
            && self
                .open_until
                .compare_exchange(
                    until,
                    now + cool_down_micros(),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    fn success(&self) {
        self.failures.store(0, Ordering::Relaxed);
        if self.open_until.swap(0, Ordering::AcqRel) != 0 {
            tracing::info!("tollgate: redis answers again; circuit closed");
        }
    }

    /// Counts `error` against the primary only when it says the primary is down or slow.
    /// An error the primary *answered* (Redis `WRONGTYPE` on one key, `OOM` on a write,
    /// an unexpected reply) costs one fast round trip, not a timeout, and says nothing
    /// about other keys: opening the circuit for it would hand every user to the fallback
    /// (a fresh local quota) or to fail_mode (503 for everyone) because of one bad key.
    fn failed(&self, error: &StoreError) {
        match error.kind() {
            StoreErrorKind::Timeout | StoreErrorKind::Unavailable => self.failure(),
            StoreErrorKind::Protocol | StoreErrorKind::Internal | StoreErrorKind::Unsupported => {}
        }
    }

    fn failure(&self) {
        let failures = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if failures < FAILURES_TO_OPEN {
            return;
        }
        let next = self.now() + cool_down_micros();
        let was = self.open_until.swap(next, Ordering::AcqRel);
        if was == 0 {
            // Opening happens at most once per cool-down plus a failed call.
            tracing::warn!(
                failures,
                cool_down_ms = COOL_DOWN.as_millis() as u64,
                "tollgate: redis failing; circuit opened"
            );
        }
    }
}

fn cool_down_micros() -> u64 {
    COOL_DOWN.as_micros() as u64
}

/// The fallback's log gate, on a clock of its own (stores are not given the layer's).
struct FallbackLog {
    base: Instant,
    gate: LogGate,
}

impl FallbackLog {
    fn new() -> Self {
        FallbackLog {
            base: Instant::now(),
            gate: LogGate::default(),
        }
    }

    fn may_log(&self) -> Option<u64> {
        let now = u64::try_from(self.base.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.gate.may_log(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithm::Algorithm;
    use crate::key::{Key, RuleKind, Subject};
    use crate::rate::Rate;
    use crate::store::Outcome;
    use std::sync::atomic::AtomicUsize;

    /// A primary that fails (synchronously) while `failing` is set, counting its calls.
    #[derive(Debug, Default)]
    struct Flaky {
        failing: std::sync::atomic::AtomicBool,
        calls: AtomicUsize,
    }

    impl Store for Flaky {
        fn check(&self, request: &StoreRequest<'_>) -> StoreFuture {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.failing.load(Ordering::SeqCst) {
                StoreFuture::Ready(Err(StoreError::new(StoreErrorKind::Unavailable, "down")))
            } else {
                StoreFuture::Ready(Ok(MemoryStore::new().check_request(request)))
            }
        }
    }

    /// Neither fake primary has a local answer.
    impl Primary for Flaky {
        fn answer_locally(&self, _request: &StoreRequest<'_>) -> Option<Outcomes> {
            None
        }
        fn check_backend(&self, request: &StoreRequest<'_>) -> StoreFuture {
            self.check(request)
        }
    }

    /// The breaker around a fake primary, as [`FallbackStore`] holds it around Redis.
    fn guard<P: Primary>(primary: P, fallback: Option<MemoryStore>) -> Arc<Inner<P>> {
        Arc::new(Inner::new(primary, fallback))
    }

    fn ready(f: StoreFuture) -> Result<Outcomes, StoreError> {
        match f {
            StoreFuture::Ready(r) => r,
            StoreFuture::Pending(_) => panic!("expected a ready answer"),
        }
    }

    #[test]
    fn opens_after_consecutive_failures_then_probes_after_the_cool_down() {
        let store = guard(Flaky::default(), None);
        let flaky = &store.primary;
        let rate = Rate::per_minute(2);
        let keys = [Key::new(
            RuleKind::User,
            Subject::Named(b"u"),
            rate,
            Algorithm::FixedWindow,
        )];
        let req = StoreRequest::new(&keys, 1_000_000);
        flaky.failing.store(true, Ordering::SeqCst);
        for _ in 0..FAILURES_TO_OPEN {
            assert_eq!(
                ready(store.check(&req)).unwrap_err().kind(),
                StoreErrorKind::Unavailable
            );
        }
        assert_eq!(
            flaky.calls.load(Ordering::SeqCst),
            FAILURES_TO_OPEN as usize
        );
        // Open: the primary is not called, the error comes back at once.
        for _ in 0..100 {
            assert!(ready(store.check(&req)).is_err());
        }
        assert_eq!(
            flaky.calls.load(Ordering::SeqCst),
            FAILURES_TO_OPEN as usize
        );
        // After the cool-down one probe goes through; success closes the circuit.
        flaky.failing.store(false, Ordering::SeqCst);
        std::thread::sleep(COOL_DOWN + Duration::from_millis(50));
        assert!(ready(store.check(&req)).is_ok());
        assert!(!store.breaker.is_open());
        assert!(ready(store.check(&req)).is_ok());
        assert_eq!(
            flaky.calls.load(Ordering::SeqCst),
            FAILURES_TO_OPEN as usize + 2
        );
    }

    /// A primary that answers every request with an error of one kind.
    #[derive(Debug)]
    struct Erring(StoreErrorKind, AtomicUsize);

    impl Store for Erring {
        fn check(&self, _request: &StoreRequest<'_>) -> StoreFuture {
            self.1.fetch_add(1, Ordering::SeqCst);
            StoreFuture::Ready(Err(StoreError::new(self.0, "answered an error")))
        }
    }

    impl Primary for Erring {
        fn answer_locally(&self, _request: &StoreRequest<'_>) -> Option<Outcomes> {
            None
        }
        fn check_backend(&self, request: &StoreRequest<'_>) -> StoreFuture {
            self.check(request)
        }
    }

    /// Regression (tests/redis_fault_load.rs, WRONGTYPE and OOM under load): errors the
    /// primary answered counted as the primary failing, so one wrong-typed key opened the
    /// circuit for every user.
    #[test]
    fn only_down_or_slow_opens_the_circuit() {
        let rate = Rate::per_minute(2);
        let keys = [Key::new(
            RuleKind::User,
            Subject::Named(b"u"),
            rate,
            Algorithm::FixedWindow,
        )];
        let req = StoreRequest::new(&keys, 1_000_000);
        for (kind, opens) in [
            (StoreErrorKind::Timeout, true),
            (StoreErrorKind::Unavailable, true),
            (StoreErrorKind::Protocol, false),
            (StoreErrorKind::Internal, false),
        ] {
            let store = guard(Erring(kind, AtomicUsize::new(0)), None);
            let primary = &store.primary;
            for _ in 0..10 {
                assert!(ready(store.check(&req)).is_err());
            }
            assert_eq!(store.breaker.is_open(), opens, "{kind:?}");
            let expected = if opens { FAILURES_TO_OPEN as usize } else { 10 };
            assert_eq!(primary.1.load(Ordering::SeqCst), expected, "{kind:?}");
        }
    }

    /// A primary that is down but answers one subject from a local cache.
    #[derive(Debug, Default)]
    struct DownWithCache {
        backend_calls: AtomicUsize,
    }

    impl Store for DownWithCache {
        fn check(&self, request: &StoreRequest<'_>) -> StoreFuture {
            match self.answer_locally(request) {
                Some(o) => StoreFuture::Ready(Ok(o)),
                None => self.check_backend(request),
            }
        }
    }

    impl Primary for DownWithCache {
        fn answer_locally(&self, request: &StoreRequest<'_>) -> Option<Outcomes> {
            (request.keys()[0].subject() == Subject::Named(b"cached")).then(|| {
                let mut o = Outcomes::new();
                o.push(Outcome::rejected(
                    Duration::from_secs(9),
                    Duration::from_secs(9),
                ));
                o
            })
        }

        fn check_backend(&self, _request: &StoreRequest<'_>) -> StoreFuture {
            self.backend_calls.fetch_add(1, Ordering::SeqCst);
            StoreFuture::Ready(Err(StoreError::new(StoreErrorKind::Timeout, "hung")))
        }
    }

    /// Regression (review): the Redis deny cache's answers counted as Redis succeeding, so
    /// while a refused user kept calling, the circuit never opened and every other request
    /// paid the full timeout of a hung Redis.
    #[test]
    fn cached_answers_neither_close_the_circuit_nor_keep_it_closed() {
        let store = guard(DownWithCache::default(), Some(MemoryStore::new()));
        let primary = &store.primary;
        let rate = Rate::per_minute(2);
        let key = |id: &'static [u8]| {
            [Key::new(
                RuleKind::User,
                Subject::Named(id),
                rate,
                Algorithm::FixedWindow,
            )]
        };
        let (normal, cached) = (key(b"normal"), key(b"cached"));
        for _ in 0..FAILURES_TO_OPEN {
            assert!(ready(store.check(&StoreRequest::new(&normal, 1))).is_ok());
            let refused = ready(store.check(&StoreRequest::new(&cached, 1))).unwrap();
            assert!(!refused.iter().all(|o| o.is_allowed()));
        }
        assert!(store.breaker.is_open());
        assert_eq!(
            primary.backend_calls.load(Ordering::SeqCst),
            FAILURES_TO_OPEN as usize
        );
        // Open: the fallback answers, the backend is left alone, cached answers still come.
        for _ in 0..10 {
            assert!(ready(store.check(&StoreRequest::new(&normal, 1))).is_ok());
            assert!(ready(store.check(&StoreRequest::new(&cached, 1))).is_ok());
        }
        assert!(store.breaker.is_open());
        assert_eq!(
            primary.backend_calls.load(Ordering::SeqCst),
            FAILURES_TO_OPEN as usize
        );
        assert_eq!(store.stats().fallback_answers, FAILURES_TO_OPEN as u64 + 10);
    }

    #[test]
    fn the_fallback_enforces_the_same_rules_while_the_primary_fails() {
        let store = guard(Flaky::default(), Some(MemoryStore::new()));
        store.primary.failing.store(true, Ordering::SeqCst);
        let rate = Rate::per_minute(2);
        let keys = [Key::new(
            RuleKind::User,
            Subject::Named(b"u"),
            rate,
            Algorithm::FixedWindow,
        )];
        let req = StoreRequest::new(&keys, 1_000_000);
        let allowed = (0..10)
            .filter(|_| {
                ready(store.check(&req))
                    .unwrap()
                    .iter()
                    .all(|o| o.is_allowed())
            })
            .count();
        assert_eq!(allowed, 2);
    }

    #[test]
    fn owned_requests_round_trip() {
        let rate = Rate::per_minute(2);
        let keys = [
            Key::new(
                RuleKind::User,
                Subject::Anonymous,
                rate,
                Algorithm::SlidingWindow,
            ),
            Key::new(
                RuleKind::Tenant,
                Subject::Named(b"t:{x}"),
                rate,
                Algorithm::SlidingWindow,
            )
            .with_tier("pro"),
            Key::new(
                RuleKind::Tool,
                Subject::Named(b"search"),
                rate,
                Algorithm::SlidingWindow,
            ),
            Key::user_tool(
                Subject::Client("2001:db8::".parse().unwrap(), 64),
                "search",
                rate,
                Algorithm::SlidingWindow,
            ),
        ];
        OwnedKeys::new(&keys).with(|again| {
            assert_eq!(again, keys);
        });
    }
}
