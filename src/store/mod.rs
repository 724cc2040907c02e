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

/// What a store is asked for one request.
#[derive(Clone, Copy, Debug)]
pub struct StoreRequest<'a> {
    pub(crate) keys: &'a [Key<'a>],
    pub(crate) now: u64,
}

impl<'a> StoreRequest<'a> {
    /// A request for `keys` at `now_micros` µs since the Unix epoch.
    pub fn new(keys: &'a [Key<'a>], now_micros: u64) -> Self {
        StoreRequest {
            keys,
            now: now_micros,
        }
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

/// One key's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub(crate) allowed: bool,
    pub(crate) remaining: u64,
    pub(crate) reset_after: u64,
    pub(crate) retry_after: u64,
    /// When the key resets, µs since the epoch on the store's clock (Redis `TIME` for a
    /// Redis store, so every instance states the same reset); 0 when not known.
    pub(crate) reset_at: u64,
}

impl Outcome {
    /// The key allows the request and has `remaining` left until it resets.
    pub fn allowed(remaining: u64, reset_after: Duration) -> Self {
        Outcome {
            allowed: true,
            remaining,
            reset_after: crate::clock::duration_micros(reset_after),
            retry_after: 0,
            reset_at: 0,
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
