//! The `Store` trait: where counters live. One call per request carries every key the
//! request is counted under; the store allows the request only if every key allows it,
//! and then counts it under every key (all-or-nothing).

mod configured;
#[cfg(feature = "redis")]
mod deny_cache;
#[cfg(feature = "redis")]
pub(crate) mod fallback;
pub(crate) mod memory;
#[cfg(feature = "redis")]
mod primary;
#[cfg(feature = "redis")]
pub(crate) mod redis;

pub(crate) use configured::for_config;

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::key::{Key, MAX_KEYS};

/// What a store is asked for one request: a call of [`cost`](StoreRequest::cost) units
/// under every key at once.
#[derive(Clone, Copy, Debug)]
pub struct StoreRequest<'a> {
    pub(crate) keys: &'a [Key<'a>],
    pub(crate) now: u64,
    pub(crate) cost: u64,
}

impl<'a> StoreRequest<'a> {
    /// A request for `keys` at `now_micros` µs since the Unix epoch, costing one unit.
    pub fn new(keys: &'a [Key<'a>], now_micros: u64) -> Self {
        StoreRequest {
            keys,
            now: now_micros,
            cost: 1,
        }
    }

    /// The same request costing `units` (ARCHITECTURE.md, behaviour contract item 19): it
    /// is allowed only if every key has at least `units` left, and then `units` are
    /// counted under every key. A cost of 0 is always allowed and counts nothing.
    pub fn with_cost(mut self, units: u64) -> Self {
        self.cost = units;
        self
    }

    /// The units the call costs (1 unless [`StoreRequest::with_cost`] said otherwise).
    pub fn cost(&self) -> u64 {
        self.cost
    }

    /// The keys, in rule order (user, tenant, tool, user×tool); at most four.
    pub fn keys(&self) -> &'a [Key<'a>] {
        self.keys
    }

    /// The caller's clock, µs since the Unix epoch.
    pub fn now_micros(&self) -> u64 {
        self.now
    }
}

/// A call's cost settled after it ran ([`Store::settle`]): the request's keys, the answer
/// its check got (which says when and on whose clock each key counted it), and how many
/// units more (`delta > 0`) or fewer (`delta < 0`) it really cost.
#[derive(Clone, Copy, Debug)]
pub struct Settlement<'a> {
    pub(crate) keys: &'a [Key<'a>],
    pub(crate) outcomes: &'a Outcomes,
    pub(crate) delta: i64,
    pub(crate) now: u64,
}

impl<'a> Settlement<'a> {
    /// `delta` units more (or fewer) for the call whose check of `keys` answered
    /// `outcomes`, settled at `now_micros` (the caller's clock).
    pub fn new(keys: &'a [Key<'a>], outcomes: &'a Outcomes, delta: i64, now_micros: u64) -> Self {
        Settlement {
            keys,
            outcomes,
            delta,
            now: now_micros,
        }
    }

    /// The keys, as the check had them.
    pub fn keys(&self) -> &'a [Key<'a>] {
        self.keys
    }

    /// The check's answer, one outcome per key. One exception: when a layer gives back a
    /// call that a layer inside it refused (ARCHITECTURE.md, behaviour contract item 20)
    /// and the store had answered that call's check at once ([`StoreFuture::Ready`]), each
    /// outcome states only when the call was decided: `reset_at_micros` is the caller's
    /// time of the check and `reset_after` is zero.
    pub fn outcomes(&self) -> &'a Outcomes {
        self.outcomes
    }

    /// Units more (positive) or fewer (negative) than the check counted.
    pub fn delta(&self) -> i64 {
        self.delta
    }

    /// The caller's clock when settling, µs since the Unix epoch.
    pub fn now_micros(&self) -> u64 {
        self.now
    }
}

/// One key's answer. Two are equal when everything they state is.
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    pub(crate) allowed: bool,
    /// A fallback answered, not the store asked (`FallbackStore`): a settlement of the
    /// call goes there. (Beside `allowed`, it costs no room.)
    pub(crate) by_fallback: bool,
    pub(crate) remaining: u64,
    pub(crate) reset_after: u64,
    pub(crate) retry_after: u64,
    /// When the key resets, µs since the epoch on the store's clock (Redis `TIME` for a
    /// Redis store, so every instance states the same reset); 0 when not known.
    pub(crate) reset_at: u64,
}

impl PartialEq for Outcome {
    fn eq(&self, other: &Outcome) -> bool {
        (
            self.allowed,
            self.remaining,
            self.reset_after,
            self.retry_after,
            self.reset_at,
        ) == (
            other.allowed,
            other.remaining,
            other.reset_after,
            other.retry_after,
            other.reset_at,
        )
    }
}

impl Eq for Outcome {}

impl Outcome {
    /// When the key counted the call, µs on the store's clock: its reset less the wait
    /// for it (0 when the store stated no reset time).
    pub(crate) fn decided_at(&self) -> u64 {
        self.reset_at.saturating_sub(self.reset_after)
    }

    /// The key allows the request and has `remaining` left until it resets.
    pub fn allowed(remaining: u64, reset_after: Duration) -> Self {
        Outcome {
            allowed: true,
            remaining,
            reset_after: crate::clock::duration_micros(reset_after),
            retry_after: 0,
            reset_at: 0,
            by_fallback: false,
        }
    }

    /// The key rejects the request; it would allow one after `retry_after` (at least
    /// 1 µs).
    pub fn rejected(reset_after: Duration, retry_after: Duration) -> Self {
        Outcome {
            allowed: false,
            remaining: 0,
            reset_after: crate::clock::duration_micros(reset_after),
            retry_after: crate::clock::duration_micros(retry_after).max(1),
            reset_at: 0,
            by_fallback: false,
        }
    }

    /// The same answer, stating when the key resets on the store's own clock (µs since
    /// the Unix epoch): `X-RateLimit-Reset` is then taken from it, so instances whose
    /// clocks differ still agree. 0 states nothing.
    pub fn with_reset_at_micros(mut self, reset_at: u64) -> Self {
        self.reset_at = reset_at;
        self
    }

    /// Whether this key allows the request.
    pub fn is_allowed(&self) -> bool {
        self.allowed
    }

    /// Requests the key has left until it resets (0 when it rejects).
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// Time until the key resets, to the microsecond.
    pub fn reset_after(&self) -> Duration {
        Duration::from_micros(self.reset_after)
    }

    /// For a rejecting key: how long until it would allow the request, to the
    /// microsecond (never zero); `None` when it allows.
    pub fn retry_after(&self) -> Option<Duration> {
        (!self.allowed).then(|| Duration::from_micros(self.retry_after))
    }

    /// When the key resets on the store's own clock, µs since the Unix epoch, if the
    /// store stated it ([`Outcome::with_reset_at_micros`]); otherwise the layer takes its
    /// own clock plus [`Outcome::reset_after`].
    pub fn reset_at_micros(&self) -> Option<u64> {
        (self.reset_at != 0).then_some(self.reset_at)
    }
}

/// The answers for one request, one per key, in the order of the request's keys.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcomes {
    items: [Option<Outcome>; MAX_KEYS],
}

impl Outcomes {
    /// No answers yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The answer of a one-key request.
    pub(crate) fn one(outcome: Outcome) -> Self {
        let mut out = Self::new();
        out.items[0] = Some(outcome);
        out
    }

    /// Appends the next key's answer. Returns `false` (and keeps nothing) past four.
    pub fn push(&mut self, outcome: Outcome) -> bool {
        match self.items.iter_mut().find(|o| o.is_none()) {
            Some(slot) => {
                *slot = Some(outcome);
                true
            }
            None => false,
        }
    }

    /// The answers in key order, then `None`.
    pub(crate) fn slots(&self) -> &[Option<Outcome>; MAX_KEYS] {
        &self.items
    }

    /// The same answers, marked as a fallback's.
    pub(crate) fn by_fallback(mut self) -> Self {
        for outcome in self.items.iter_mut().flatten() {
            outcome.by_fallback = true;
        }
        self
    }

    /// Whether a fallback gave these answers.
    pub(crate) fn answered_by_fallback(&self) -> bool {
        self.items[0].is_some_and(|o| o.by_fallback)
    }

    /// How many answers there are.
    pub fn len(&self) -> usize {
        self.items.iter().flatten().count()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.items[0].is_none()
    }

    /// The answers in key order.
    pub fn iter(&self) -> impl Iterator<Item = &Outcome> {
        self.items.iter().flatten()
    }
}

/// A store's answer: ready now (the memory store: no allocation, no await), or later.
/// These two shapes are all there will be, so a wrapper store may match them exhaustively.
pub enum StoreFuture {
    /// Answered synchronously.
    Ready(Result<Outcomes, StoreError>),
    /// Answered by a future (a network round trip).
    Pending(Pin<Box<dyn Future<Output = Result<Outcomes, StoreError>> + Send + 'static>>),
}

impl fmt::Debug for StoreFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreFuture::Ready(r) => f.debug_tuple("Ready").field(r).finish(),
            StoreFuture::Pending(_) => f.write_str("Pending(..)"),
        }
    }
}

/// A store's answer to [`Store::settle`]: applied now, or by a task already running
/// (dropping the future does not stop it).
pub enum SettleFuture {
    /// Applied (or refused) synchronously.
    Ready(Result<(), StoreError>),
    /// Sent from a task of the store's own; resolves when it is done.
    Pending(Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + 'static>>),
}

impl fmt::Debug for SettleFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SettleFuture::Ready(r) => f.debug_tuple("Ready").field(r).finish(),
            SettleFuture::Pending(_) => f.write_str("Pending(..)"),
        }
    }
}

impl Future for SettleFuture {
    type Output = Result<(), StoreError>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match &mut *self {
            SettleFuture::Ready(result) => {
                std::task::Poll::Ready(std::mem::replace(result, Ok(())))
            }
            SettleFuture::Pending(future) => future.as_mut().poll(cx),
        }
    }
}

/// Where counters live. Implementations must be all-or-nothing: allow only when every key
/// allows, and then count under every key; a rejected request counts nowhere.
///
/// `check` is called once per request, through one `Arc<dyn Store>`. A store that wraps
/// another should forward [`Store::stats`] too, so the layer's
/// [`Stats`](crate::Stats) still see the inner store's figures.
///
/// A store of your own needs only this trait, [`StoreRequest`], [`Outcome`] and
/// [`Outcomes`]. This one counts fixed windows in a map (a fixed window for every key,
/// whatever the key's algorithm):
///
/// ```
/// use std::collections::HashMap;
/// use std::sync::Mutex;
/// use std::time::Duration;
///
/// use http::{Request, StatusCode};
/// use tollgate::{
///     Identity, ManualClock, Outcome, Outcomes, RateLimitConfig, RateLimitLayer, Store,
///     StoreFuture, StoreRequest,
/// };
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
///
/// /// Encoded key → (start of its window, requests counted in it), all in µs.
/// #[derive(Debug, Default)]
/// struct Windows(Mutex<HashMap<String, (u64, u64)>>);
///
/// impl Store for Windows {
///     fn check(&self, request: &StoreRequest<'_>) -> StoreFuture {
///         let now = request.now_micros();
///         let mut windows = self.0.lock().unwrap();
///         // First every key's answer, then count only if all of them allow.
///         let mut answers = Outcomes::new();
///         let mut names = Vec::new();
///         for key in request.keys() {
///             let (count, period) = (key.rate().count(), key.rate().period().as_micros() as u64);
///             let start = now - now % period;
///             let name = key.encode("doc");
///             let used = match windows.get(&name) {
///                 Some(&(s, used)) if s == start => used,
///                 _ => 0,
///             };
///             let reset_after = Duration::from_micros(start + period - now);
///             answers.push(if used < count {
///                 Outcome::allowed(count - used - 1, reset_after)
///             } else {
///                 Outcome::rejected(reset_after, reset_after)
///             });
///             names.push((name, start, used));
///         }
///         if answers.iter().all(Outcome::is_allowed) {
///             for (name, start, used) in names {
///                 windows.insert(name, (start, used + 1));
///             }
///         }
///         StoreFuture::Ready(Ok(answers))
///     }
/// }
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let cfg = RateLimitConfig::from_toml_str(r#"by_user = "2/m""#).unwrap();
/// let clock = ManualClock::new();
/// let svc = ServiceBuilder::new()
///     .layer(RateLimitLayer::with_store(cfg, Windows::default()).with_clock(clock.clone()))
///     .service(service_fn(|_req: Request<()>| async {
///         Ok::<_, std::convert::Infallible>(http::Response::new(()))
///     }));
/// let alice = || {
///     let mut req = Request::new(());
///     req.extensions_mut().insert(Identity::user("alice"));
///     req
/// };
/// for remaining in ["1", "0"] {
///     let resp = svc.clone().oneshot(alice()).await.unwrap();
///     assert_eq!(resp.status(), StatusCode::OK);
///     assert_eq!(resp.headers()["x-ratelimit-remaining"], remaining);
/// }
/// let refused = svc.clone().oneshot(alice()).await.unwrap();
/// assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
/// clock.advance(Duration::from_secs(60));
/// assert_eq!(svc.clone().oneshot(alice()).await.unwrap().status(), StatusCode::OK);
/// # });
/// ```
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Checks and counts one request.
    fn check(&self, request: &StoreRequest<'_>) -> StoreFuture;

    /// Charges a call that [`Store::check`] counted `settlement.delta()` units more (or
    /// gives `-delta` back), under each of its keys, as its algorithm says (ARCHITECTURE.md,
    /// behaviour contract item 19): its real cost is known only once it has run. A store
    /// applies it at once ([`SettleFuture::Ready`]) or from a task of its own
    /// ([`SettleFuture::Pending`]: the work must go on if the future is dropped; awaiting
    /// it tells when it is done, and such a store counts its own failures in
    /// [`StoreStats::settle_failures`]). The default refuses: a store that cannot settle
    /// keeps every call's first cost.
    fn settle(&self, settlement: &Settlement<'_>) -> SettleFuture {
        let _ = settlement;
        SettleFuture::Ready(Err(StoreError::new(
            StoreErrorKind::Unsupported,
            "this store cannot settle a call's cost after the fact",
        )))
    }

    /// Forgets what the store has counted under `keys`, so that their next check starts
    /// as if nothing had been counted ([`RateLimitHandle::reset`](crate::RateLimitHandle::reset)).
    /// Ready or from a task of its own, as [`Store::settle`]. The default refuses.
    fn reset(&self, keys: &[Key<'_>]) -> SettleFuture {
        let _ = keys;
        SettleFuture::Ready(Err(StoreError::new(
            StoreErrorKind::Unsupported,
            "this store cannot reset counters",
        )))
    }

    /// What the store has counted about itself, read by
    /// [`RateLimitLayer::stats`](crate::RateLimitLayer::stats). The default says nothing
    /// happened ([`StoreStats::default`]).
    fn stats(&self) -> StoreStats {
        StoreStats::default()
    }
}

/// A shared store is a store: layers given clones of one `Arc` share its counters.
impl<T: Store + ?Sized> Store for std::sync::Arc<T> {
    fn check(&self, request: &StoreRequest<'_>) -> StoreFuture {
        (**self).check(request)
    }

    fn settle(&self, settlement: &Settlement<'_>) -> SettleFuture {
        (**self).settle(settlement)
    }

    fn reset(&self, keys: &[Key<'_>]) -> SettleFuture {
        (**self).reset(keys)
    }

    fn stats(&self) -> StoreStats {
        (**self).stats()
    }
}

/// A store's own counts since it was built ([`Store::stats`]). More fields may be added;
/// start from [`StoreStats::default`] and set the ones your store counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreStats {
    /// Requests answered by a fallback because the backend was failing (for example
    /// `FallbackStore`'s memory store while Redis is down).
    pub fallback_answers: u64,
    /// Keys held in process (a `MemoryStore`, or a `FallbackStore`'s memory fallback).
    pub keys: Option<u64>,
    /// Live keys evicted early because the in-process store was full.
    pub evictions: Option<u64>,
    /// Refused keys answered locally (the Redis deny cache).
    pub deny_cache_keys: Option<u64>,
    /// Whether a circuit breaker has stopped asking the backend for now.
    pub circuit_open: Option<bool>,
    /// Settlements the store took in hand but could not apply (a Redis call that
    /// failed); each was logged.
    pub settle_failures: u64,
    /// What the figures are of, when clones of one store share them (the address of
    /// their shared state), so that process-wide sums count them once.
    pub(crate) source: Option<usize>,
}

/// What kind of failure a store had.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The store did not answer in time.
    Timeout,
    /// The store cannot be reached, or is refusing work (circuit open, connection lost).
    Unavailable,
    /// The store answered something unexpected.
    Protocol,
    /// A bug: a panic or broken invariant inside tollgate or a custom store.
    Internal,
    /// The store does not do what it was asked (a custom store that cannot settle).
    Unsupported,
}

/// A store failure. Its message never contains a key or an identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreError {
    kind: StoreErrorKind,
    message: Cow<'static, str>,
}

impl StoreError {
    /// A failure of `kind`, described by `message` (which must not contain identities).
    pub fn new(kind: StoreErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        StoreError {
            kind,
            message: message.into(),
        }
    }

    /// The kind of failure.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }

    /// What went wrong (never a key or an identity).
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl std::error::Error for StoreError {}
