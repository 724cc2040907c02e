//! The Redis store: one shared limit across every instance of a service.
//!
//! Each request is one `EVALSHA` of the algorithm's Lua script (`src/store/lua/`), carrying
//! all of the request's keys: the script reads every key, decides, and writes only when
//! every key allows (all-or-nothing), setting a `PEXPIRE` on each key it writes. Time comes
//! from Redis `TIME` unless [`RedisStoreBuilder::caller_time`] is set.
//!
//! Connections: up to four sockets (`pool_size`, at most 4), each a
//! `redis::aio::MultiplexedConnection` opened and checked (`PING`) by bb8-redis's connection
//! manager. Requests are spread over them round-robin and send on clones (clones share one
//! auto-pipelined socket), so no request ever waits for a checkout. A connection that
//! fails, or does not answer within the timeout, is forgotten; the next request on its
//! slot opens and checks a new one.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bb8::ManageConnection;
use bb8_redis::RedisConnectionManager;
use redis::aio::MultiplexedConnection;
use redis::{RedisError, Script};

use super::deny_cache::DenyCache;
use super::{Outcome, Outcomes, Store, StoreError, StoreErrorKind, StoreFuture, StoreRequest};
use crate::Algorithm;

/// Keys the deny cache holds by default.
const DENY_CACHE: usize = 10_000;

/// Most multiplexed connections requests are spread over (each one is auto-pipelined, so
/// a few suffice for any concurrency).
const MAX_SHARED_CONNECTIONS: u32 = 4;

/// Counters in Redis, shared by every instance pointed at the same server and prefix.
///
/// Build one with [`RedisStore::builder`], or let [`RateLimitLayer::new`] build it from a
/// config whose `[backend] kind = "redis"` (that path adds the circuit breaker and the
/// fallback store). Construction never connects and needs no runtime: the first request
/// connects, inside the runtime serving it. Every call, connecting included, is bounded by
/// the timeout. Clones share connections.
///
/// ```no_run
/// use std::time::Duration;
/// use tollgate::{RateLimitConfig, RateLimitLayer, RedisStore};
///
/// let store = RedisStore::builder("redis://127.0.0.1:6379/0")
///     .key_prefix("myapp")
///     .timeout(Duration::from_millis(50))
///     .build()
///     .expect("a valid redis URL");
/// let cfg = RateLimitConfig::builder().by_user("30/m").build().unwrap();
/// let layer = RateLimitLayer::with_store(cfg, store);
/// ```
///
/// [`RateLimitLayer::new`]: crate::RateLimitLayer::new
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` when the URL could not be parsed (from a config: every call fails).
    manager: Option<RedisConnectionManager>,
    prefix: String,
    pool_size: u32,
    timeout: Duration,
    caller_time: bool,
    slots: Box<[Slot]>,
    next_slot: AtomicUsize,
    generation: AtomicU64,
    scripts: Scripts,
    deny: DenyCache,
}

struct Scripts {
    fixed_window: Script,
    sliding_window: Script,
    token_bucket: Script,
}

/// One shared connection, kept while it works.
struct Slot {
    held: Mutex<Option<Held>>,
    /// Held by the one request that opens the empty slot's connection; the others wait
    /// for it rather than each opening one (each open is a connect and a PING, so a
    /// burst meeting a cold store queued a PING per caller and outlived the timeout).
    filling: tokio::sync::Mutex<()>,
}

struct Held {
    conn: MultiplexedConnection,
    generation: u64,
}

/// Builds a [`RedisStore`]; see [`RedisStore::builder`].
#[derive(Clone)]
pub struct RedisStoreBuilder {
    url: String,
    prefix: String,
    pool_size: u32,
    timeout: Duration,
    caller_time: bool,
    deny_cache: usize,
}

impl fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A Redis URL may carry a password.
        f.debug_struct("RedisStoreBuilder")
            .field("url", &"<set>")
            .field("key_prefix", &self.prefix)
            .field("pool_size", &self.pool_size)
            .field("timeout", &self.timeout)
            .field("caller_time", &self.caller_time)
            .field("deny_cache", &self.deny_cache)
            .finish()
    }
}

impl RedisStoreBuilder {
    /// Prefix of every key (default `rl`).
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Most connections to open (default 16, at least 1); requests share up to four of
    /// them, multiplexed (more sockets add nothing against one single-threaded Redis).
    pub fn pool_size(mut self, size: u32) -> Self {
        self.pool_size = size.max(1);
        self
    }

    /// Longest a call may take, connecting included (default 50 ms).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Decide on the caller's clock (the layer's [`Clock`](crate::Clock)) instead of Redis
    /// `TIME`. Off by default: with server time, instances with skewed clocks agree. Tests
    /// turn it on to compare Redis with the memory store step by step.
    pub fn caller_time(mut self, on: bool) -> Self {
        self.caller_time = on;
        self
    }

    /// How many refused keys to remember locally (default 10 000; below 16 turns the cache
    /// off). While Redis has said a key refuses until T, requests carrying it are refused
    /// here until T without a round trip: an abusive caller costs memory-store time, not a
    /// Redis call. Such a locally refused request reports only the remembered keys as
    /// refused (the state of its other keys is not known without Redis).
    pub fn deny_cache(mut self, capacity: usize) -> Self {
        self.deny_cache = capacity;
        self
    }

    /// The store. Fails only when the URL cannot be parsed; nothing connects yet.
    pub fn build(self) -> Result<RedisStore, StoreError> {
        let manager = RedisConnectionManager::new(self.url.as_str()).map_err(|_| invalid_url())?;
        Ok(RedisStore::from_parts(Some(manager), self))
    }
}

impl RedisStore {
    /// A builder for a store at `url` (`redis://`, `rediss://` or `unix://`).
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder {
            url: url.into(),
            prefix: "rl".into(),
            pool_size: 16,
            timeout: Duration::from_millis(50),
            caller_time: false,
            deny_cache: DENY_CACHE,
        }
    }

    /// The store a config's `[backend]` describes. Never fails: a URL that cannot be
    /// parsed gives a store whose every call fails (the fallback answers).
    pub(crate) fn from_config(backend: &crate::BackendConfig) -> RedisStore {
        let builder = RedisStore::builder(backend.url().unwrap_or_default())
            .key_prefix(backend.key_prefix())
            .pool_size(backend.pool_size())
            .timeout(backend.timeout())
            .deny_cache(backend.deny_cache());
        let manager = RedisConnectionManager::new(builder.url.as_str()).ok();
        if manager.is_none() {
            tracing::error!(
                "tollgate: backend.url is not a valid Redis URL; Redis is never called"
            );
        }
        RedisStore::from_parts(manager, builder)
    }

    fn from_parts(manager: Option<RedisConnectionManager>, b: RedisStoreBuilder) -> RedisStore {
        let shared = b.pool_size.min(MAX_SHARED_CONNECTIONS);
        RedisStore {
            inner: Arc::new(Inner {
                manager,
                prefix: b.prefix,
                pool_size: b.pool_size,
                timeout: b.timeout,
                caller_time: b.caller_time,
                slots: (0..shared)
                    .map(|_| Slot {
                        held: Mutex::new(None),
                        filling: tokio::sync::Mutex::new(()),
                    })
                    .collect(),
                next_slot: AtomicUsize::new(0),
                generation: AtomicU64::new(0),
                scripts: Scripts {
                    fixed_window: Script::new(concat!(
                        include_str!("lua/common.lua"),
                        include_str!("lua/fixed_window.lua")
                    )),
                    sliding_window: Script::new(concat!(
                        include_str!("lua/common.lua"),
                        include_str!("lua/sliding_window.lua")
                    )),
                    token_bucket: Script::new(concat!(
                        include_str!("lua/common.lua"),
                        include_str!("lua/token_bucket.lua")
                    )),
                },
                deny: DenyCache::new(b.deny_cache),
            }),
        }
    }

    /// The key prefix.
    pub fn key_prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The bound on every call.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        f.debug_struct("RedisStore")
            .field("key_prefix", &i.prefix)
            .field("pool_size", &i.pool_size)
            .field("shared_connections", &i.slots.len())
            .field("timeout", &i.timeout)
            .field("caller_time", &i.caller_time)
            .finish_non_exhaustive()
    }
}

impl Store for RedisStore {
    fn check(&self, request: &StoreRequest<'_>) -> StoreFuture {
        match self.answer_locally(request) {
            Some(refused) => StoreFuture::Ready(Ok(refused)),
            None => self.check_backend(request),
        }
    }

    fn answer_locally(&self, request: &StoreRequest<'_>) -> Option<Outcomes> {
        self.inner
            .deny
            .check(&self.inner.prefix, request.keys(), request.now_micros())
    }

    fn check_backend(&self, request: &StoreRequest<'_>) -> StoreFuture {
        let keys = request.keys();
        if keys.is_empty() {
            return StoreFuture::Ready(Ok(Outcomes::new()));
        }
        if self.inner.manager.is_none() {
            return StoreFuture::Ready(Err(invalid_url()));
        }
        // The layer uses one algorithm for every rule of a request.
        let algorithm = keys[0].algorithm();
        if keys.len() > 3 || keys.iter().any(|k| k.algorithm() != algorithm) {
            return StoreFuture::Ready(Err(StoreError::new(
                StoreErrorKind::Internal,
                "a request must carry at most three keys of one algorithm",
            )));
        }
        let now = request.now_micros();
        let mut encoded = Vec::with_capacity(keys.len());
        let mut args = Vec::with_capacity(1 + 2 * keys.len());
        args.push(if self.inner.caller_time {
            now as i64
        } else {
            -1
        });
        for key in keys {
            encoded.push(key.encode(&self.inner.prefix));
            args.push(key.rate().count() as i64);
            args.push(key.rate().period_micros() as i64);
        }
        let inner = self.inner.clone();
        let n = keys.len();
        StoreFuture::Pending(Box::pin(async move {
            let deadline = tokio::time::Instant::now() + inner.timeout;
            inner
                .call(algorithm, &encoded, &args, deadline)
                .await
                .and_then(|values| parse(&values, n))
                .inspect(|outcomes| inner.deny.record(&encoded, outcomes, now))
        }))
    }
}

impl Inner {
    fn script(&self, algorithm: Algorithm) -> &Script {
        match algorithm {
            Algorithm::FixedWindow => &self.scripts.fixed_window,
            Algorithm::SlidingWindow => &self.scripts.sliding_window,
            Algorithm::TokenBucket => &self.scripts.token_bucket,
        }
    }

    /// One script call on one of the shared connections, all of it (connecting included)
    /// done by `deadline`. A connection that fails or does not answer in time is forgotten,
    /// so the next request opens a fresh one: a silently dead socket costs one timeout, not
    /// one per request until the kernel notices.
    async fn call(
        &self,
        algorithm: Algorithm,
        keys: &[String],
        args: &[i64],
        deadline: tokio::time::Instant,
    ) -> Result<Vec<i64>, StoreError> {
        let index = self.next_slot.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let (mut conn, generation) =
            match tokio::time::timeout_at(deadline, self.connection(index, deadline)).await {
                Ok(connected) => connected?,
                Err(_) => return Err(timed_out("no redis connection in time")),
            };
        let mut invocation = self.script(algorithm).prepare_invoke();
        for key in keys {
            invocation.key(key.as_str());
        }
        for arg in args {
            invocation.arg(*arg);
        }
        // EVALSHA; on NOSCRIPT (a restart, SCRIPT FLUSH) redis-rs loads it and retries once.
        let answer =
            tokio::time::timeout_at(deadline, invocation.invoke_async::<Vec<i64>>(&mut conn));
        match answer.await {
            Ok(Ok(values)) => Ok(values),
            Ok(Err(e)) => {
                if broken(&e) {
                    self.release(index, generation);
                }
                Err(redis_error(&e))
            }
            Err(_) => {
                self.release(index, generation);
                Err(timed_out("redis did not answer in time"))
            }
        }
    }

    /// A clone of slot `index`'s connection, opening one if the slot is empty. Each slot
    /// has a socket of its own, made and checked (PING) by bb8-redis's connection manager.
    async fn connection(
        &self,
        index: usize,
        deadline: tokio::time::Instant,
    ) -> Result<(MultiplexedConnection, u64), StoreError> {
        let slot = &self.slots[index];
        if let Some(held) = lock(slot).as_ref() {
            return Ok((held.conn.clone(), held.generation));
        }
        // One connection per empty slot: wait for a request already opening it.
        let _filling = slot.filling.lock().await;
        if let Some(held) = lock(slot).as_ref() {
            return Ok((held.conn.clone(), held.generation));
        }
        let manager = self.manager.as_ref().ok_or_else(invalid_url)?;
        let opened = tokio::time::timeout_at(deadline, async {
            let mut conn = manager.connect().await?;
            manager.is_valid(&mut conn).await?;
            Ok::<_, RedisError>(conn)
        });
        let conn = match opened.await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(redis_error(&e)),
            Err(_) => return Err(timed_out("no redis connection in time")),
        };
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        *lock(slot) = Some(Held {
            conn: conn.clone(),
            generation,
        });
        Ok((conn, generation))
    }

    /// Forgets slot `index`'s connection if it is still the one that failed; the next
    /// request on the slot opens and checks a new one.
    fn release(&self, index: usize, generation: u64) {
        let mut guard = lock(&self.slots[index]);
        if guard.as_ref().is_some_and(|h| h.generation == generation) {
            *guard = None;
        }
    }
}

fn lock(slot: &Slot) -> std::sync::MutexGuard<'_, Option<Held>> {
    slot.held.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether the connection should be given up (rather than the error being the server's
/// answer to this one command).
fn broken(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
        || e.is_timeout()
}

/// An identity-free error: redis errors can echo keys, so only their category is kept.
fn redis_error(e: &RedisError) -> StoreError {
    if e.is_timeout() {
        StoreError::new(StoreErrorKind::Timeout, "redis timed out")
    } else if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        StoreError::new(StoreErrorKind::Unavailable, "redis connection failed")
    } else {
        StoreError::new(
            StoreErrorKind::Protocol,
            format!("redis answered an error ({})", e.category()),
        )
    }
}

fn timed_out(message: &'static str) -> StoreError {
    StoreError::new(StoreErrorKind::Timeout, message)
}

fn invalid_url() -> StoreError {
    StoreError::new(StoreErrorKind::Unavailable, "the redis URL is invalid")
}

/// Four integers per key (allowed, remaining, reset_after µs, retry_after µs), then the
/// time the script decided at (µs, Redis's clock unless the caller's was passed).
fn parse(values: &[i64], n: usize) -> Result<Outcomes, StoreError> {
    if values.len() != 4 * n + 1 || values.iter().any(|v| *v < 0) {
        return Err(StoreError::new(
            StoreErrorKind::Protocol,
            "the redis script answered an unexpected shape",
        ));
    }
    let decided_at = values[4 * n] as u64;
    let mut out = Outcomes::new();
    for chunk in values[..4 * n].chunks_exact(4) {
        let reset_after = chunk[2] as u64;
        out.push(Outcome {
            allowed: chunk[0] == 1,
            remaining: chunk[1] as u64,
            reset_after,
            retry_after: chunk[3] as u64,
            reset_at: decided_at.saturating_add(reset_after),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn construction_needs_no_runtime_and_never_connects() {
        let store = RedisStore::builder("redis://127.0.0.1:1/0")
            .build()
            .unwrap();
        assert!(store.inner.slots.iter().all(|slot| lock(slot).is_none()));
        assert!(RedisStore::builder("not a url").build().is_err());
    }

    #[test]
    fn unexpected_answers_are_protocol_errors() {
        assert_eq!(
            parse(&[1, 2, 3, 0], 1).unwrap_err().kind(),
            StoreErrorKind::Protocol
        );
        assert_eq!(
            parse(&[1, -2, 3, 0, 9], 1).unwrap_err().kind(),
            StoreErrorKind::Protocol
        );
        let ok = parse(&[1, 4, 10, 0, 0, 0, 5, 5, 100], 2).unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(
            ok.iter().map(|o| o.reset_at).collect::<Vec<_>>(),
            [110, 105]
        );
    }
}
