//! The Redis store: one shared limit across every instance of a service.
//!
//! One script (`src/store/lua/algorithms.lua` + `batch.lua`) decides one request or a
//! batch of them: it reads each key once, decides the requests in order (each
//! all-or-nothing across its keys), and writes each changed key once as `SET key state PX
//! ttl` (16 bytes: `t` u64, `c` and `p` u32, little-endian; `KEEPTTL` when its expiry
//! stays). Concurrent requests are coalesced into one call per batch over two lanes
//! (`batch.rs`).
//! Time comes from Redis `TIME` unless [`RedisStoreBuilder::caller_time`] is set.
//!
//! Connections (`conn.rs`): to one server, up to four multiplexed sockets (the two
//! coalescing lanes use two of them; with coalescing off requests share all four
//! round-robin), so no request waits for a checkout; to a Redis Cluster, redis-rs's
//! cluster connection. `rediss://` URLs speak TLS (feature `redis-tls`). A connection that
//! fails, times out or whose server cannot serve (a demoted primary's `READONLY`, a
//! cluster's `MOVED`) is forgotten and the next request connects again.
//!
//! On a cluster, a key's hash tag is its subject (`{=alice}`), so a user's keys, a tenant's
//! and a tool's may sit on different nodes. A request whose keys share one slot is still
//! one atomic script; one whose keys span slots reserves on each slot at once and gives
//! back (`lua/settle.lua`) what it took where another slot refused: never more than the
//! limit is admitted, and a refused request stays counted only for the moment between its
//! reservation and its refund (ARCHITECTURE.md, "Redis Cluster").

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::cluster::ClusterClient;
use redis::cluster_routing::Slot as HashSlot;
use redis::{Client, Script};

use super::deny_cache::DenyCache;
use super::primary::Primary;
use super::{
    Outcome, Outcomes, SettleFuture, Settlement, Store, StoreError, StoreErrorKind, StoreFuture,
    StoreRequest, StoreStats,
};
use crate::algorithm::Algorithm;
use crate::config::{self, settings, BackendConfig, BackendKind};
use crate::key::{Key, MAX_KEYS};
use crate::log_gate::LogGate;

mod batch;
mod conn;
mod script;
pub(crate) mod tls;

use batch::Coalescer;
use conn::invalid;
use conn::Connector;
use script::{Answer, CallKey, Caller, Job};

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
    /// The connections, the script and the timeout (shared with the coalescing lanes).
    caller: Arc<Caller>,
    prefix: String,
    pool_size: u32,
    caller_time: bool,
    next_socket: AtomicUsize,
    /// `lua/algorithms.lua` + `lua/settle.lua`: settles calls, refunds cluster reservations.
    settle: Script,
    /// `reset.lua`: deletes counters.
    reset: Script,
    /// `None` when coalescing is off (`max_batch = 1`) or on a cluster.
    coalescer: Option<Coalescer>,
    deny: DenyCache,
    refund_log: RefundLog,
    /// Settlements sent from a task that failed.
    settle_failures: AtomicU64,
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
    max_batch: usize,
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
            .field("max_batch", &self.max_batch)
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

    /// The most sockets to open to one server (default 4, at least 1; more than 4 act as
    /// 4): each is multiplexed and auto-pipelined, so requests share them round-robin
    /// and more add nothing against one single-threaded Redis; coalesced batches go over
    /// two. A cluster connection keeps one socket per node.
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
    /// turn it on to compare Redis with the memory store step by step. Do not mix stores
    /// with and without it on one key prefix: their times disagree, and expiries set on
    /// one clock may end early on the other.
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

    /// Most requests one script call decides (default 128, 1 to 1 024 as in the config).
    /// Concurrent requests are coalesced: while a call is in flight the next batch fills,
    /// and goes as one `EVALSHA` that decides them in order exactly as one call each
    /// would. A lone request goes at once. `1` turns coalescing off (one call per
    /// request). A cluster store sends one call per request and hash slot.
    pub fn max_batch(mut self, requests: usize) -> Self {
        self.max_batch = requests.clamp(1, 1_024);
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
                    // No retries: redis-rs re-sends a command whose connection failed
                    // after sending it, and a script Redis already ran would then count
                    // twice (a refund would give back twice). A redirect (MOVED, ASK)
                    // is a retry too: it fails this request (the fallback answers it)
                    // and the slot map is rebuilt for the next.
                    .retries(0);
                let builder = tls::cluster(builder, tls, self.tls_ca.as_deref(), self.tls_insecure);
                let client = builder
                    .build()
                    .map_err(|_| invalid("a redis cluster seed URL is invalid"))?;
                Ok(Connector::cluster(client))
            }
        }
    }
}

/// Refuses a URL whose scheme this build or this kind of store cannot serve: the check a
/// config's URLs pass at start-up, for a builder's URLs too.
fn check_url(url: &str, cluster: bool) -> Result<(), StoreError> {
    config::check_url(url, cluster).map_err(invalid)
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
            prefix: settings::KEY_PREFIX.into(),
            pool_size: settings::POOL_SIZE.default as u32,
            timeout: Duration::from_millis(settings::TIMEOUT_MS.default),
            caller_time: false,
            deny_cache: settings::DENY_CACHE.default as usize,
            max_batch: settings::MAX_BATCH.default as usize,
            tls_ca: None,
            tls_insecure: false,
        }
    }

    /// The store a config's `[backend]` describes. The config has checked its URLs, so
    /// this does not fail; should the client still refuse them, every call fails (the
    /// fallback answers) and the reason is logged.
    pub(crate) fn from_config(backend: &BackendConfig) -> RedisStore {
        let builder = match backend.kind() {
            BackendKind::RedisCluster => RedisStore::cluster(backend.urls().iter().cloned()),
            _ => RedisStore::builder(backend.url().unwrap_or_default()),
        };
        let mut builder = builder
            .key_prefix(backend.key_prefix())
            .pool_size(backend.pool_size())
            .timeout(backend.timeout())
            .deny_cache(backend.deny_cache())
            .max_batch(backend.max_batch());
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
        let coalescer = match &connector {
            Some(single @ Connector::Single { .. }) if b.max_batch > 1 => Some(Coalescer::new(
                single.shared_connections().min(batch::LANES),
                b.max_batch,
            )),
            _ => None,
        };
        // A refusal is cached only briefly (see the deny cache's docs): another instance
        // may reset the key, and on a cluster it may come from another request's passing
        // reservation.
        let deny_hold = super::deny_cache::DENY_HOLD;
        RedisStore {
            inner: Arc::new(Inner {
                caller: Arc::new(Caller::new(connector, b.timeout)),
                prefix: b.prefix,
                pool_size: b.pool_size,
                caller_time: b.caller_time,
                next_socket: AtomicUsize::new(0),
                reset: Script::new(include_str!("../lua/reset.lua")),
                settle: Script::new(concat!(
                    include_str!("../lua/algorithms.lua"),
                    include_str!("../lua/settle.lua")
                )),
                coalescer,
                deny: DenyCache::new(b.deny_cache, deny_hold),
                refund_log: RefundLog::new(),
                settle_failures: AtomicU64::new(0),
            }),
        }
    }

    /// Decides `requests` in this order, as the concurrent requests of one coalesced
    /// batch are decided: one script call for each run of up to `max_batch` requests with
    /// the same time (on one server; a cluster store takes one call per request and hash
    /// slot). Each answer is exactly what one call per request, in this order, would
    /// have given. For bulk checks, and to test coalescing deterministically.
    ///
    /// ```no_run
    /// # async fn run() {
    /// use tollgate::{Algorithm, Key, Rate, RedisStore, RuleKind, StoreRequest, Subject};
    ///
    /// let store = RedisStore::builder("redis://127.0.0.1:6379/0").build().unwrap();
    /// let rate = Rate::per_minute(1);
    /// let alice = [Key::new(RuleKind::User, Subject::Named(b"alice"), rate, Algorithm::FixedWindow)];
    /// let now = 1_700_000_000_000_000;
    /// let answers = store
    ///     .check_batch(&[StoreRequest::new(&alice, now), StoreRequest::new(&alice, now)])
    ///     .await;
    /// assert!(answers[0].as_ref().unwrap().iter().all(|o| o.is_allowed()));
    /// assert!(!answers[1].as_ref().unwrap().iter().all(|o| o.is_allowed()));
    /// # }
    /// ```
    pub fn check_batch(
        &self,
        requests: &[StoreRequest<'_>],
    ) -> impl std::future::Future<Output = Vec<Result<Outcomes, StoreError>>> + Send + 'static {
        let inner = self.inner.clone();
        let jobs: Vec<Result<Job, StoreError>> = requests.iter().map(|r| inner.job(r)).collect();
        let times: Vec<u64> = requests.iter().map(|r| r.now_micros()).collect();
        async move {
            let deadline = tokio::time::Instant::now() + inner.caller.timeout;
            let mut out: Vec<Result<Outcomes, StoreError>> = Vec::with_capacity(jobs.len());
            let max_batch = inner.coalescer.as_ref().map_or(1, |c| c.max_batch());
            let mut i = 0;
            while i < jobs.len() {
                let job = match &jobs[i] {
                    Err(e) => {
                        out.push(Err(e.clone()));
                        i += 1;
                        continue;
                    }
                    Ok(job) => job,
                };
                if matches!(inner.caller.connector, Some(Connector::Cluster { .. })) {
                    out.push(inner.decide_across_slots(job, deadline).await);
                    i += 1;
                    continue;
                }
                // A run of valid jobs with this job's time, up to max_batch.
                let mut end = i + 1;
                while end < jobs.len()
                    && end - i < max_batch
                    && matches!(&jobs[end], Ok(j) if j.now == job.now)
                {
                    end += 1;
                }
                let run = jobs[i..end].iter().flatten();
                let lane = inner.next_socket.fetch_add(1, Ordering::Relaxed);
                match inner.caller.run(run, lane, deadline).await {
                    Ok(answers) => out.extend(answers.into_iter().map(|a| a.map(|(o, _)| o))),
                    Err(e) => out.extend((i..end).map(|_| Err(e.clone()))),
                }
                i = end;
            }
            for ((job, answer), now) in jobs.iter().zip(&out).zip(times) {
                if let (Ok(job), Ok(outcomes)) = (job, answer) {
                    inner.deny.record(job.names(), outcomes, now, job.cost);
                }
            }
            out
        }
    }

    /// The key prefix.
    pub fn key_prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The bound on every call.
    pub fn timeout(&self) -> Duration {
        self.inner.caller.timeout
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        f.debug_struct("RedisStore")
            .field(
                "cluster",
                &matches!(i.caller.connector, Some(Connector::Cluster { .. })),
            )
            .field("key_prefix", &i.prefix)
            .field("pool_size", &i.pool_size)
            .field(
                "shared_connections",
                &i.caller
                    .connector
                    .as_ref()
                    .map_or(0, Connector::shared_connections),
            )
            .field("timeout", &i.caller.timeout)
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

    fn settle(&self, settlement: &Settlement<'_>) -> SettleFuture {
        self.inner.settle(settlement)
    }

    fn reset(&self, keys: &[Key<'_>]) -> SettleFuture {
        self.inner.reset(keys)
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            deny_cache_keys: Some(self.inner.deny.len() as u64),
            settle_failures: self.inner.settle_failures.load(Ordering::Relaxed),
            source: Some(Arc::as_ptr(&self.inner) as usize),
            ..StoreStats::default()
        }
    }
}

/// The deny cache is Redis's local answer: the breaker asks it apart from Redis itself.
impl Primary for RedisStore {
    fn answer_locally(&self, request: &StoreRequest<'_>) -> Option<Outcomes> {
        self.inner.deny.check(
            &self.inner.prefix,
            request.keys(),
            request.now_micros(),
            request.cost(),
        )
    }

    fn check_backend(&self, request: &StoreRequest<'_>) -> StoreFuture {
        if request.keys().is_empty() {
            return StoreFuture::Ready(Ok(Outcomes::new()));
        }
        let job = match self.inner.job(request) {
            Ok(job) => job,
            Err(e) => return StoreFuture::Ready(Err(e)),
        };
        let now = request.now_micros();
        let cluster = matches!(self.inner.caller.connector, Some(Connector::Cluster { .. }));
        let inner = self.inner.clone();
        StoreFuture::Pending(Box::pin(async move {
            let deadline = tokio::time::Instant::now() + inner.caller.timeout;
            let outcomes = if cluster {
                inner.decide_across_slots(&job, deadline).await?
            } else {
                inner.decide(&job, deadline).await?.0
            };
            inner.deny.record(job.names(), &outcomes, now, job.cost);
            Ok(outcomes)
        }))
    }
}

impl Inner {
    /// The job a request is for the script: its keys encoded, with their rates.
    fn job(&self, request: &StoreRequest<'_>) -> Result<Job, StoreError> {
        if self.caller.connector.is_none() {
            return Err(invalid("the redis backend could not be built"));
        }
        let keys = request.keys();
        // The layer uses one algorithm for every rule of a request.
        let algorithm = keys
            .first()
            .map_or(Algorithm::FixedWindow, |k| k.algorithm());
        if keys.len() > MAX_KEYS || keys.iter().any(|k| k.algorithm() != algorithm) {
            return Err(StoreError::new(
                StoreErrorKind::Internal,
                "a request must carry at most four keys of one algorithm",
            ));
        }
        Ok(Job {
            algorithm,
            now: self.caller_time.then_some(request.now_micros()),
            cost: request.cost(),
            keys: keys
                .iter()
                .map(|key| CallKey {
                    name: key.encode(&self.prefix),
                    // A rate's count is a u32 (at most 10^9).
                    count: u32::try_from(key.rate().count()).unwrap_or(u32::MAX),
                    period: key.rate().period_micros() as i64,
                })
                .collect(),
        })
    }

    fn connector(&self) -> Result<&Connector, StoreError> {
        self.caller.connector()
    }

    /// One job's answer: coalesced with concurrent ones when coalescing is on, else one
    /// script call of its own.
    async fn decide(self: &Arc<Self>, job: &Job, deadline: tokio::time::Instant) -> Answer {
        match &self.coalescer {
            Some(coalescer) => coalescer.submit(&self.caller, job.clone(), deadline).await,
            None => {
                let lane = self.next_socket.fetch_add(1, Ordering::Relaxed);
                self.caller.run_one(job, lane, deadline).await
            }
        }
    }

    /// A cluster request's outcomes. Keys on one slot: one atomic script. Keys on several
    /// slots: one script per slot, all at once (each reserves on its slot
    /// all-or-nothing); if any slot refused or failed, the slots that reserved are given
    /// back.
    async fn decide_across_slots(
        self: &Arc<Self>,
        job: &Job,
        deadline: tokio::time::Instant,
    ) -> Result<Outcomes, StoreError> {
        let groups = by_slot(&job.keys);
        if groups.len() == 1 {
            return Ok(self.decide(job, deadline).await?.0);
        }
        let parts: Vec<Job> = groups
            .iter()
            .map(|group| Job {
                algorithm: job.algorithm,
                now: job.now,
                cost: job.cost,
                keys: group.iter().map(|&i| job.keys[i].clone()).collect(),
            })
            .collect();
        let answers = futures_join(parts.iter().map(|part| self.decide(part, deadline))).await;
        let mut per_key: [Option<Outcome>; MAX_KEYS] = [None; MAX_KEYS];
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
            // The slots that reserved, each with what its keys answered.
            let reserved: Vec<(Job, Outcomes, u64)> = parts
                .iter()
                .zip(&answers)
                .filter_map(|(part, answer)| {
                    let (outcomes, decided_at) = answer.as_ref().ok()?;
                    outcomes
                        .iter()
                        .all(|o| o.allowed)
                        .then(|| (part.clone(), *outcomes, *decided_at))
                })
                .collect();
            // In a task of its own, so a caller that stops waiting (a client gone, an
            // outer timeout) cannot cancel it half-way and leave a refused request
            // counted; with a deadline of its own, as the request's may be nearly spent.
            let store = Arc::clone(self);
            let refunds = tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + store.caller.timeout;
                let given = futures_join(
                    reserved
                        .iter()
                        .map(|(part, outcomes, at)| store.refund(part, outcomes, *at, deadline)),
                )
                .await;
                for (given, (part, ..)) in given.into_iter().zip(&reserved) {
                    let kept = match given {
                        Ok(n) => part.keys.len().saturating_sub(n),
                        Err(_) => part.keys.len(),
                    };
                    if kept > 0 {
                        if let Some(suppressed) = store.refund_log.may_log() {
                            tracing::warn!(
                                kept,
                                suppressed,
                                "tollgate: a reservation on one redis cluster slot could not be given back (the node failed, the window ended, or others have since queued behind it in a token bucket); those keys count one refused request"
                            );
                        }
                    }
                }
            });
            // Waited for here too, so a request answers only once its refunds are done
            // (a caller that goes on at once would see its own reservation).
            let _ = refunds.await;
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

    /// Gives back what `part`'s reservation, decided at `decided_at` with `outcomes`,
    /// took; the number of its keys given back (`settle.lua` leaves a key alone when
    /// taking the reservation out would not be exact).
    async fn refund(
        &self,
        part: &Job,
        outcomes: &Outcomes,
        decided_at: u64,
        deadline: tokio::time::Instant,
    ) -> Result<usize, StoreError> {
        let delta = -i64::try_from(part.cost).unwrap_or(i64::MAX);
        let keys = part.keys.iter().zip(outcomes.iter()).map(|(key, outcome)| {
            // A token bucket's reservation wrote its arrival time `reset_after` past the
            // time it was decided at (unused by the windows).
            let reserved = decided_at.saturating_add(outcome.reset_after);
            (key, decided_at, reserved, delta)
        });
        self.adjust(part.algorithm, part.now, true, keys, deadline)
            .await
    }

    /// One `settle.lua` call over keys of one hash slot: for each, when its call was
    /// decided, the arrival time it wrote (token bucket) and the delta in units; `exact`
    /// for a cluster refund. The number of keys changed.
    async fn adjust<'k>(
        &self,
        algorithm: Algorithm,
        now: Option<u64>,
        exact: bool,
        keys: impl Iterator<Item = (&'k CallKey, u64, u64, i64)>,
        deadline: tokio::time::Instant,
    ) -> Result<usize, StoreError> {
        let mut invocation = self.settle.prepare_invoke();
        invocation.arg(i64::from(script::algorithm_code(algorithm)));
        invocation.arg(now.map_or(-1, |now| now as i64));
        invocation.arg(i64::from(exact));
        for (key, at, reserved, delta) in keys {
            invocation.key(key.name.as_str());
            invocation
                .arg(key.count)
                .arg(key.period)
                .arg(at as i64)
                .arg(reserved as i64)
                .arg(delta);
        }
        let lane = self.next_socket.fetch_add(1, Ordering::Relaxed);
        let changed: i64 = self
            .connector()?
            .invoke(&invocation, lane, self.caller.timeout, deadline)
            .await?;
        Ok(usize::try_from(changed).unwrap_or(0))
    }

    /// The indices of `keys` one script call each may take: all of them on one server,
    /// those of one hash slot on a cluster.
    fn groups(&self, keys: &[CallKey]) -> Vec<Vec<usize>> {
        match self.caller.connector {
            Some(Connector::Cluster { .. }) => by_slot(keys),
            _ => vec![(0..keys.len()).collect()],
        }
    }

    /// Deletes the counters `names` (on one hash slot) with `reset.lua`.
    async fn delete<'k>(
        &self,
        names: impl Iterator<Item = &'k str>,
        deadline: tokio::time::Instant,
    ) -> Result<i64, StoreError> {
        let mut invocation = self.reset.prepare_invoke();
        for name in names {
            invocation.key(name);
        }
        let lane = self.next_socket.fetch_add(1, Ordering::Relaxed);
        self.connector()?
            .invoke(&invocation, lane, self.caller.timeout, deadline)
            .await
    }

    /// Settles a call: one `settle.lua` call per hash slot its keys are on, from a task
    /// of its own (a caller that goes away cannot cancel it half-way), bounded by the
    /// timeout. A failure is counted and logged, never an identity.
    fn settle(self: &Arc<Self>, settlement: &Settlement<'_>) -> SettleFuture {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return SettleFuture::Ready(Err(StoreError::new(
                StoreErrorKind::Unavailable,
                "a redis settlement needs a tokio runtime to be sent from",
            )));
        };
        let job = match self.job(&StoreRequest::new(settlement.keys, settlement.now)) {
            Ok(job) => job,
            Err(error) => return SettleFuture::Ready(Err(error)),
        };
        // The keys whose counts may now allow sooner are no longer refused here.
        if settlement.delta < 0 {
            self.deny.forget(job.names());
        }
        let per_key: Vec<(u64, u64)> = settlement
            .outcomes
            .iter()
            .map(|o| (o.decided_at(), o.reset_at))
            .collect();
        let (delta, store) = (settlement.delta, Arc::clone(self));
        let task = runtime.spawn(async move {
            let deadline = tokio::time::Instant::now() + store.caller.timeout;
            let groups = store.groups(&job.keys);
            let calls = groups.iter().map(|group| {
                let keys = group.iter().filter_map(|&i| {
                    let (at, reserved) = *per_key.get(i)?;
                    Some((&job.keys[i], at, reserved, delta))
                });
                store.adjust(job.algorithm, job.now, false, keys, deadline)
            });
            // A call whose keys sit in several slots fails once, however many failed.
            let error = futures_join(calls)
                .await
                .into_iter()
                .find_map(Result::err);
            let Some(error) = error else {
                return Ok(());
            };
            store.settle_failures.fetch_add(1, Ordering::Relaxed);
            #[cfg(feature = "metrics")]
            metrics::counter!("tollgate_settle_failures_total").increment(1);
            if let Some(suppressed) = store.refund_log.may_log() {
                tracing::warn!(
                    %error,
                    suppressed,
                    "tollgate: a call's cost could not be settled in redis; it stays counted at its estimate"
                );
            }
            Err(error)
        });
        SettleFuture::Pending(Box::pin(async move {
            task.await.unwrap_or_else(|_| {
                Err(StoreError::new(
                    StoreErrorKind::Internal,
                    "the redis settlement task stopped before it finished",
                ))
            })
        }))
    }
}

impl Inner {
    /// Deletes the counters of `keys` (one `reset.lua` call per hash slot) and forgets
    /// them in this instance's deny cache. Another instance's deny cache may refuse them
    /// for at most [`DENY_HOLD`](super::deny_cache::DENY_HOLD) more. From a task of its
    /// own, bounded by the timeout.
    fn reset(self: &Arc<Self>, keys: &[Key<'_>]) -> SettleFuture {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return SettleFuture::Ready(Err(StoreError::new(
                StoreErrorKind::Unavailable,
                "a redis reset needs a tokio runtime to be sent from",
            )));
        };
        let job = match self.job(&StoreRequest::new(keys, 0)) {
            Ok(job) => job,
            Err(error) => return SettleFuture::Ready(Err(error)),
        };
        self.deny.forget(job.names());
        let store = Arc::clone(self);
        let task = runtime.spawn(async move {
            let deadline = tokio::time::Instant::now() + store.caller.timeout;
            let groups = store.groups(&job.keys);
            let calls = groups.iter().map(|group| {
                let keys = group.iter().map(|&i| job.keys[i].name.as_str());
                store.delete(keys, deadline)
            });
            let failed = futures_join(calls).await.into_iter().find_map(Result::err);
            // A check that was in flight while the keys were deleted may have cached its
            // refusal since: forgotten again.
            store.deny.forget(job.names());
            match failed {
                Some(error) => Err(error),
                None => Ok(()),
            }
        });
        SettleFuture::Pending(Box::pin(async move {
            task.await.unwrap_or_else(|_| {
                Err(StoreError::new(
                    StoreErrorKind::Internal,
                    "the redis reset task stopped before it finished",
                ))
            })
        }))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn construction_needs_no_runtime_and_never_connects() {
        let store = RedisStore::builder("redis://127.0.0.1:1/0")
            .build()
            .unwrap();
        assert!(store.inner.caller.connector.as_ref().unwrap().is_idle());
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
}
