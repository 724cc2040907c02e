//! The Redis store: one shared limit across every instance of a service.
//!
//! Each request is one `EVALSHA` of the algorithm's Lua script (`src/store/lua/`), carrying
//! all of the request's keys: the script reads every key, decides, and writes only when
//! every key allows (all-or-nothing), setting a `PEXPIRE` on each key it writes. Time comes
//! from Redis `TIME` unless [`RedisStoreBuilder::caller_time`] is set.
//!
//! Connections (`conn.rs`): to one server, up to four multiplexed sockets that requests
//! share round-robin, so no request waits for a checkout; to a Redis Cluster, redis-rs's
//! cluster connection. `rediss://` URLs speak TLS (feature `redis-tls`). A connection that
//! fails, times out or whose server cannot serve (a demoted primary's `READONLY`, a
//! cluster's `MOVED`) is forgotten and the next request connects again.
//!
//! On a cluster, a key's hash tag is its subject (`{=alice}`), so a user's keys, a tenant's
//! and a tool's may sit on different nodes. A request whose keys share one slot is still
//! one atomic script; one whose keys span slots reserves on each slot at once and gives
//! back (`lua/refund.lua`) what it took where another slot refused: never more than the
//! limit is admitted, and a refused request stays counted only for the moment between its
//! reservation and its refund (ARCHITECTURE.md, "Redis Cluster").

use std::fmt;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use redis::cluster::ClusterClient;
use redis::cluster_routing::Slot as HashSlot;
use redis::{Client, IntoConnectionInfo, Script};

use super::deny_cache::DenyCache;
use super::{Outcome, Outcomes, Store, StoreError, StoreErrorKind, StoreFuture, StoreRequest};
use crate::log_gate::LogGate;
use crate::Algorithm;

mod conn;
pub(crate) mod tls;

use conn::Connector;

/// Keys the deny cache holds by default.
const DENY_CACHE: usize = 10_000;

/// Counters in Redis, shared by every instance pointed at the same server (or cluster)
/// and prefix.
///
/// Build one with [`RedisStore::builder`] (one server) or [`RedisStore::cluster`] (a Redis
/// Cluster), or let [`RateLimitLayer::new`] build it from a config whose `[backend] kind`
/// is `"redis"` or `"redis_cluster"` (that path adds the circuit breaker and the fallback
/// store). Construction never connects and needs no runtime: the first request connects,
/// inside the runtime serving it. Every call, connecting included, is bounded by the
/// timeout. Clones share connections.
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
    /// `None` when the store could not be built from a config (every call fails).
    connector: Option<Connector>,
    prefix: String,
    pool_size: u32,
    timeout: Duration,
    caller_time: bool,
    next_socket: AtomicUsize,
    scripts: Scripts,
    deny: DenyCache,
    refund_log: RefundLog,
}

struct Scripts {
    fixed_window: Script,
    sliding_window: Script,
    token_bucket: Script,
    refund: Script,
}

/// Where the store's Redis is.
#[derive(Clone)]
enum Target {
    Single(String),
    Cluster(Vec<String>),
}

/// Builds a [`RedisStore`]; see [`RedisStore::builder`] and [`RedisStore::cluster`].
#[derive(Clone)]
pub struct RedisStoreBuilder {
    target: Target,
    prefix: String,
    pool_size: u32,
    timeout: Duration,
    caller_time: bool,
    deny_cache: usize,
    tls_ca: Option<Vec<u8>>,
    tls_insecure: bool,
}

impl fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A Redis URL may carry a password.
        f.debug_struct("RedisStoreBuilder")
            .field("cluster", &matches!(self.target, Target::Cluster(_)))
            .field("url", &"<set>")
            .field("key_prefix", &self.prefix)
            .field("pool_size", &self.pool_size)
            .field("timeout", &self.timeout)
            .field("caller_time", &self.caller_time)
            .field("deny_cache", &self.deny_cache)
            .field("tls_ca", &self.tls_ca.as_ref().map(|_| "<set>"))
            .field("tls_insecure", &self.tls_insecure)
            .finish()
    }
}

impl RedisStoreBuilder {
    /// Prefix of every key (default `rl`).
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Most connections to open to one server (default 16, at least 1); requests share
    /// up to four of them, multiplexed (more sockets add nothing against one
    /// single-threaded Redis). A cluster connection keeps one socket per node.
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

    /// How many refused keys to remember locally (default 10 000; 0 turns the cache
    /// off). While Redis has said a key refuses until T, requests carrying it are refused
    /// here until T without a round trip: an abusive caller costs memory-store time, not a
    /// Redis call. Such a locally refused request reports only the remembered keys as
    /// refused (the state of its other keys is not known without Redis).
    pub fn deny_cache(mut self, capacity: usize) -> Self {
        self.deny_cache = capacity;
        self
    }

    /// Trust the certificate authorities in `pem` (PEM text, one or more certificates)
    /// for `rediss://` connections, instead of the system's roots: a private CA.
    #[cfg(feature = "redis-tls")]
    pub fn tls_ca(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_ca = Some(pem.into());
        self
    }

    /// Accept any certificate on `rediss://` connections: the traffic is encrypted but
    /// anyone on the path can read it. For tests against a throwaway server only; the
    /// store logs a warning when it is built with this on.
    #[cfg(feature = "redis-tls")]
    pub fn tls_insecure(mut self, on: bool) -> Self {
        self.tls_insecure = on;
        self
    }

    /// The store. Fails when a URL cannot be parsed, names a scheme this build cannot
    /// serve (`rediss://` without the `redis-tls` feature, a socket path for a cluster),
    /// or the CA is not PEM; nothing connects yet.
    pub fn build(self) -> Result<RedisStore, StoreError> {
        let connector = self.connector()?;
        Ok(RedisStore::from_parts(Some(connector), self))
    }

    fn connector(&self) -> Result<Connector, StoreError> {
        let urls: &[String] = match &self.target {
            Target::Single(url) => std::slice::from_ref(url),
            Target::Cluster(urls) => urls,
        };
        let tls = urls.iter().any(|u| u.trim_start().starts_with("rediss://"));
        for url in urls {
            check_url(url, matches!(self.target, Target::Cluster(_)))?;
        }
        if tls {
            tls::prepare(self.tls_insecure);
        }
        match &self.target {
            Target::Single(url) => {
                let info = tls::connection_info(url, self.tls_insecure)?;
                let client = match (&self.tls_ca, tls) {
                    (Some(ca), true) => tls::client_with_ca(info, ca)?,
                    _ => Client::open(info).map_err(|_| invalid("the redis URL is invalid"))?,
                };
                Ok(Connector::single(client, self.pool_size))
            }
            Target::Cluster(urls) => {
                let builder = ClusterClient::builder(urls.iter().map(String::as_str))
                    .connection_timeout(self.timeout)
                    .response_timeout(self.timeout)
                    .retries(2);
                let builder = tls::cluster(builder, tls, self.tls_ca.as_deref(), self.tls_insecure);
                let client = builder
                    .build()
                    .map_err(|_| invalid("a redis cluster seed URL is invalid"))?;
                Ok(Connector::cluster(client))
            }
        }
    }
}

/// Refuses a URL whose scheme this build or this kind of store cannot serve.
fn check_url(url: &str, cluster: bool) -> Result<(), StoreError> {
    let url = url.trim();
    if url.starts_with("rediss://") && !cfg!(feature = "redis-tls") {
        return Err(invalid(
            "rediss:// needs tollgate built with its `redis-tls` feature",
        ));
    }
    if cluster && !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err(invalid(
            "a redis cluster is reached by redis:// or rediss:// URLs",
        ));
    }
    url.into_connection_info()
        .map(|_| ())
        .map_err(|_| invalid("the redis URL is invalid"))
}

/// Checks a `[backend]` URL at configuration time: the message for `backend.url` (or an
/// entry of `backend.urls`) when this build cannot serve it.
pub(crate) fn url_problem(url: &str, cluster: bool) -> Option<String> {
    check_url(url, cluster)
        .err()
        .map(|e| e.message().to_owned())
}

fn invalid(message: &'static str) -> StoreError {
    StoreError::new(StoreErrorKind::Unavailable, message)
}

impl RedisStore {
    /// A builder for a store on one server at `url` (`redis://`, `rediss://` or `unix://`).
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        Self::for_target(Target::Single(url.into()))
    }

    /// A builder for a store on the Redis Cluster that `seeds` (`redis://` or
    /// `rediss://` URLs of some of its nodes) belong to. The cluster's own map of slots is
    /// asked for on connecting and followed on `MOVED`/`ASK`.
    ///
    /// ```no_run
    /// use tollgate::RedisStore;
    ///
    /// let store = RedisStore::cluster(["redis://10.0.0.1:7000", "redis://10.0.0.2:7000"])
    ///     .key_prefix("myapp")
    ///     .build()
    ///     .expect("valid seed URLs");
    /// ```
    pub fn cluster<I, U>(seeds: I) -> RedisStoreBuilder
    where
        I: IntoIterator<Item = U>,
        U: Into<String>,
    {
        Self::for_target(Target::Cluster(seeds.into_iter().map(Into::into).collect()))
    }

    fn for_target(target: Target) -> RedisStoreBuilder {
        RedisStoreBuilder {
            target,
            prefix: "rl".into(),
            pool_size: 16,
            timeout: Duration::from_millis(50),
            caller_time: false,
            deny_cache: DENY_CACHE,
            tls_ca: None,
            tls_insecure: false,
        }
    }

    /// The store a config's `[backend]` describes. The config has checked its URLs, so
    /// this does not fail; should the client still refuse them, every call fails (the
    /// fallback answers) and the reason is logged.
    pub(crate) fn from_config(backend: &crate::BackendConfig) -> RedisStore {
        let builder = match backend.kind() {
            crate::BackendKind::RedisCluster => RedisStore::cluster(backend.urls().iter().cloned()),
            _ => RedisStore::builder(backend.url().unwrap_or_default()),
        };
        let mut builder = builder
            .key_prefix(backend.key_prefix())
            .pool_size(backend.pool_size())
            .timeout(backend.timeout())
            .deny_cache(backend.deny_cache());
        builder.tls_ca = backend.tls_ca().map(<[u8]>::to_vec);
        builder.tls_insecure = backend.tls_insecure();
        let connector = match builder.connector() {
            Ok(connector) => Some(connector),
            Err(error) => {
                tracing::error!(%error, "tollgate: the redis backend cannot be used; redis is never called");
                None
            }
        };
        RedisStore::from_parts(connector, builder)
    }

    fn from_parts(connector: Option<Connector>, b: RedisStoreBuilder) -> RedisStore {
        let script = |algorithm: &str| {
            Script::new(&format!(
                "{}{}",
                include_str!("../lua/common.lua"),
                algorithm
            ))
        };
        RedisStore {
            inner: Arc::new(Inner {
                connector,
                prefix: b.prefix,
                pool_size: b.pool_size,
                timeout: b.timeout,
                caller_time: b.caller_time,
                next_socket: AtomicUsize::new(0),
                scripts: Scripts {
                    fixed_window: script(include_str!("../lua/fixed_window.lua")),
                    sliding_window: script(include_str!("../lua/sliding_window.lua")),
                    token_bucket: script(include_str!("../lua/token_bucket.lua")),
                    refund: Script::new(include_str!("../lua/refund.lua")),
                },
                deny: DenyCache::new(b.deny_cache),
                refund_log: RefundLog::new(),
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
            .field(
                "cluster",
                &matches!(i.connector, Some(Connector::Cluster { .. })),
            )
            .field("key_prefix", &i.prefix)
            .field("pool_size", &i.pool_size)
            .field(
                "shared_connections",
                &i.connector
                    .as_ref()
                    .map_or(0, Connector::shared_connections),
            )
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
        let Some(connector) = &self.inner.connector else {
            return StoreFuture::Ready(Err(invalid("the redis backend could not be built")));
        };
        // The layer uses one algorithm for every rule of a request.
        let algorithm = keys[0].algorithm();
        if keys.len() > crate::key::MAX_KEYS || keys.iter().any(|k| k.algorithm() != algorithm) {
            return StoreFuture::Ready(Err(StoreError::new(
                StoreErrorKind::Internal,
                "a request must carry at most four keys of one algorithm",
            )));
        }
        let now = request.now_micros();
        let call = Call {
            algorithm,
            now: self.inner.caller_time.then_some(now),
            keys: keys
                .iter()
                .map(|key| CallKey {
                    name: key.encode(&self.inner.prefix),
                    count: key.rate().count() as i64,
                    period: key.rate().period_micros() as i64,
                })
                .collect(),
        };
        let groups = match connector {
            Connector::Single { .. } => vec![(0..call.keys.len()).collect()],
            Connector::Cluster { .. } => by_slot(&call.keys),
        };
        let inner = self.inner.clone();
        StoreFuture::Pending(Box::pin(async move {
            let deadline = tokio::time::Instant::now() + inner.timeout;
            let outcomes = inner.decide(&call, &groups, deadline).await?;
            let names: Vec<&str> = call.keys.iter().map(|k| k.name.as_str()).collect();
            inner.deny.record(&names, &outcomes, now);
            Ok(outcomes)
        }))
    }
}

/// One request's keys, encoded, with their rates.
struct Call {
    algorithm: Algorithm,
    /// The caller's time, when the store decides on it.
    now: Option<u64>,
    keys: Vec<CallKey>,
}

struct CallKey {
    name: String,
    count: i64,
    period: i64,
}

/// The request's key indices grouped by cluster hash slot, in key order.
fn by_slot(keys: &[CallKey]) -> Vec<Vec<usize>> {
    let mut groups: Vec<(HashSlot, Vec<usize>)> = Vec::with_capacity(keys.len());
    for (i, key) in keys.iter().enumerate() {
        let slot = HashSlot::for_key(key.name.as_bytes());
        match groups.iter_mut().find(|(s, _)| *s == slot) {
            Some((_, group)) => group.push(i),
            None => groups.push((slot, vec![i])),
        }
    }
    groups.into_iter().map(|(_, group)| group).collect()
}

impl Inner {
    fn script(&self, algorithm: Algorithm) -> &Script {
        match algorithm {
            Algorithm::FixedWindow => &self.scripts.fixed_window,
            Algorithm::SlidingWindow => &self.scripts.sliding_window,
            Algorithm::TokenBucket => &self.scripts.token_bucket,
        }
    }

    fn connector(&self) -> Result<&Connector, StoreError> {
        self.connector
            .as_ref()
            .ok_or_else(|| invalid("the redis backend could not be built"))
    }

    /// The request's outcomes. Keys on one slot (always, on one server): one atomic
    /// script. Keys on several slots: one script per slot, all at once (each reserves
    /// on its slot all-or-nothing); if any slot refused or failed, the slots that
    /// reserved are given back.
    async fn decide(
        &self,
        call: &Call,
        groups: &[Vec<usize>],
        deadline: tokio::time::Instant,
    ) -> Result<Outcomes, StoreError> {
        if let [group] = groups {
            let (outcomes, _) = self.reserve(call, group, deadline).await?;
            return Ok(outcomes);
        }
        let answers = futures_join(
            groups
                .iter()
                .map(|group| self.reserve(call, group, deadline)),
        )
        .await;
        let mut per_key: [Option<Outcome>; crate::key::MAX_KEYS] = [None; crate::key::MAX_KEYS];
        let mut error = None;
        let mut all = true;
        for (group, answer) in groups.iter().zip(&answers) {
            match answer {
                Ok((outcomes, _)) => {
                    for (&i, outcome) in group.iter().zip(outcomes.iter()) {
                        all &= outcome.allowed;
                        per_key[i] = Some(*outcome);
                    }
                }
                Err(e) => error = Some(e.clone()),
            }
        }
        if error.is_some() || !all {
            let refunds = groups.iter().zip(&answers).filter_map(|(group, answer)| {
                let (outcomes, decided_at) = answer.as_ref().ok()?;
                outcomes
                    .iter()
                    .all(|o| o.allowed)
                    .then(|| self.refund(call, group, *decided_at, deadline))
            });
            for given in futures_join(refunds).await {
                if let Err(error) = given {
                    if let Some(suppressed) = self.refund_log.may_log() {
                        tracing::warn!(%error, suppressed, "tollgate: a reservation on one redis cluster slot could not be given back; that key counts one refused request");
                    }
                }
            }
        }
        if let Some(error) = error {
            return Err(error);
        }
        let mut out = Outcomes::new();
        for outcome in per_key.into_iter().flatten() {
            out.push(outcome);
        }
        Ok(out)
    }

    /// Runs the algorithm's script on the keys of `group` (all on one slot): their
    /// outcomes, and the time the script decided at.
    async fn reserve(
        &self,
        call: &Call,
        group: &[usize],
        deadline: tokio::time::Instant,
    ) -> Result<(Outcomes, u64), StoreError> {
        let mut invocation = self.script(call.algorithm).prepare_invoke();
        invocation.arg(call.now.map_or(-1, |now| now as i64));
        for &i in group {
            let key = &call.keys[i];
            invocation.key(key.name.as_str());
            invocation.arg(key.count).arg(key.period);
        }
        let values = self
            .connector()?
            .invoke(&invocation, &self.next_socket, self.timeout, deadline)
            .await?;
        parse(&values, group.len())
    }

    /// Gives back what a reservation decided at `decided_at` took on the keys of `group`.
    async fn refund(
        &self,
        call: &Call,
        group: &[usize],
        decided_at: u64,
        deadline: tokio::time::Instant,
    ) -> Result<(), StoreError> {
        let mut invocation = self.scripts.refund.prepare_invoke();
        invocation.arg(match call.algorithm {
            Algorithm::FixedWindow => "fw",
            Algorithm::SlidingWindow => "sw",
            Algorithm::TokenBucket => "tb",
        });
        invocation.arg(decided_at as i64);
        for &i in group {
            let key = &call.keys[i];
            invocation.key(key.name.as_str());
            invocation.arg(key.count).arg(key.period);
        }
        self.connector()?
            .invoke(&invocation, &self.next_socket, self.timeout, deadline)
            .await
            .map(|_| ())
    }
}

/// Awaits every future, concurrently, in order.
async fn futures_join<F: std::future::Future>(
    futures: impl IntoIterator<Item = F>,
) -> Vec<F::Output> {
    let handles: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut results: Vec<Option<F::Output>> = handles.iter().map(|_| None).collect();
    let mut handles: Vec<Option<_>> = handles.into_iter().map(Some).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (handle, result) in handles.iter_mut().zip(results.iter_mut()) {
            if let Some(fut) = handle {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => {
                        *result = Some(value);
                        *handle = None;
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    results.into_iter().flatten().collect()
}

/// The refund failure log's gate, on a clock of its own.
struct RefundLog {
    base: std::time::Instant,
    gate: LogGate,
}

impl RefundLog {
    fn new() -> Self {
        RefundLog {
            base: std::time::Instant::now(),
            gate: LogGate::default(),
        }
    }

    fn may_log(&self) -> Option<u64> {
        let now = u64::try_from(self.base.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.gate.may_log(now)
    }
}

/// Four integers per key (allowed, remaining, reset_after µs, retry_after µs), then the
/// time the script decided at (µs, Redis's clock unless the caller's was passed).
fn parse(values: &[i64], n: usize) -> Result<(Outcomes, u64), StoreError> {
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
    Ok((out, decided_at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn construction_needs_no_runtime_and_never_connects() {
        let store = RedisStore::builder("redis://127.0.0.1:1/0")
            .build()
            .unwrap();
        assert!(store.inner.connector.as_ref().unwrap().is_idle());
        assert!(RedisStore::builder("not a url").build().is_err());
        assert!(RedisStore::cluster(["unix:///tmp/redis.sock"])
            .build()
            .is_err());
        assert!(
            RedisStore::cluster(["redis://127.0.0.1:1", "redis://127.0.0.1:2"])
                .build()
                .is_ok()
        );
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
        let (ok, decided_at) = parse(&[1, 4, 10, 0, 0, 0, 5, 5, 100], 2).unwrap();
        assert_eq!(decided_at, 100);
        assert_eq!(ok.len(), 2);
        assert_eq!(
            ok.iter().map(|o| o.reset_at).collect::<Vec<_>>(),
            [110, 105]
        );
    }
}
