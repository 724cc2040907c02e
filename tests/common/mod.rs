//! Shared test harness: a backend makes layers whose counters live in one kind of store,
//! so the behaviour suite runs, from one definition, against every store.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use http::{Request, Response};
use tollgate::{ManualClock, MemoryStore, RateLimitConfig, RateLimitLayer};
use tower::{service_fn, ServiceBuilder};

pub mod example;
#[cfg(feature = "metrics")]
pub mod metrics;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "redis")]
pub mod redis_cluster;
#[cfg(feature = "redis-tls")]
pub mod redis_tls;
pub mod reply;

#[allow(unused_macros)]
/// Defines each case (an `async fn case(b: &dyn Backend)` of the test file) as a test
/// for each backend: memory, Redis, Redis over TLS and a Redis Cluster.
macro_rules! suite {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(&crate::common::Memory::default()).await;
                }
            )*
        }

        #[cfg(feature = "redis")]
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(backend) = crate::common::redis::RedisBackend::start(stringify!($case)) else {
                        return;
                    };
                    super::$case(&backend).await;
                }
            )*

            /// Every case on one TLS-only server (one per case would start 20 servers).
            #[cfg(feature = "redis-tls")]
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn every_case_over_tls() {
                let Some(server) = crate::common::redis_tls::TlsRedis::start("every_case_over_tls") else {
                    return;
                };
                $(
                    eprintln!("over TLS: {}", stringify!($case));
                    super::$case(&crate::common::redis_tls::TlsBackend::on(&server)).await;
                )*
            }

            /// Every case on one Redis Cluster (3 masters, 3 replicas): the keys of one
            /// request sit on different masters in most cases.
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn every_case_on_a_cluster() {
                let Some(cluster) = crate::common::redis_cluster::RedisCluster::start("every_case_on_a_cluster") else {
                    return;
                };
                $(
                    eprintln!("on a cluster: {}", stringify!($case));
                    super::$case(&crate::common::redis_cluster::ClusterBackend::on(&cluster)).await;
                )*
            }
        }
    };
}
#[allow(unused_imports)]
pub(crate) use suite;

/// Makes a layer for `cfg` whose store is fresh (no counters shared with other tests)
/// and whose time comes from `clock`.
pub trait Backend {
    /// The backend's name, for messages.
    fn name(&self) -> &'static str;
    /// A layer over a fresh store. Calling it twice on one backend value gives two layers
    /// sharing one store (as two instances sharing Redis would).
    fn layer(&self, cfg: RateLimitConfig, clock: &ManualClock) -> RateLimitLayer;
}

/// The in-process store.
#[derive(Default)]
pub struct Memory {
    store: Mutex<Option<MemoryStore>>,
}

impl Backend for Memory {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn layer(&self, cfg: RateLimitConfig, clock: &ManualClock) -> RateLimitLayer {
        let mut slot = self.store.lock().unwrap();
        let store = slot
            .get_or_insert_with(|| MemoryStore::with_max_keys(cfg.backend().max_keys()))
            .clone();
        RateLimitLayer::with_store(cfg, store).with_clock(clock.clone())
    }
}

pub type Body = String;

/// A service that answers 200 "ok" and counts its calls.
pub fn counting_service(
    layer: RateLimitLayer,
) -> (
    impl tower::Service<
            Request<Body>,
            Response = Response<tollgate::ResponseBody<Body>>,
            Error = Infallible,
            Future = impl Send,
        > + Clone
        + Send,
    Arc<std::sync::atomic::AtomicUsize>,
) {
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = calls.clone();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(move |_req: Request<Body>| {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { Ok::<_, Infallible>(Response::new(Body::from("ok"))) }
        }));
    (svc, calls)
}

/// Waits for a settlement a store sends from a task of its own to show (the test's awaits
/// already cover every store but the fallback paths; this bounds a slow machine).
pub async fn eventually<F, Fut>(mut read: F, want: u64) -> u64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = u64>,
{
    let mut seen = read().await;
    for _ in 0..100 {
        if seen == want {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        seen = read().await;
    }
    seen
}

/// Captures every log line of the current thread's `tracing` subscriber while it lives.
pub struct CapturedLogs {
    lines: Arc<Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
    _silent: tracing::Dispatch,
}

#[derive(Clone)]
struct LogSink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLogs {
    /// Captures lines at `level` and above, on this thread (run the code under test on a
    /// current-thread runtime).
    pub fn start(level: tracing::Level) -> Self {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = LogSink(lines.clone());
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(level)
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish();
        // With a single dispatcher registered, tracing-core computes a callsite's interest
        // from whatever thread hits it first: another test's thread, without a subscriber,
        // would cache "never" for it. A second (silent) dispatcher makes it ask every one.
        let silent = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());
        let guard = tracing::subscriber::set_default(subscriber);
        tracing::callsite::rebuild_interest_cache();
        CapturedLogs {
            lines,
            _guard: guard,
            _silent: silent,
        }
    }

    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.lines.lock().unwrap()).into_owned()
    }
}

/// Four tasks sending requests without pause (2 ms apart, as `users` users each), every
/// one of which must be answered 200: the steady load a fault test runs its fault under.
/// Bounded: 40 s and 200 000 requests per task at most.
pub struct SteadyLoad {
    stop: Arc<std::sync::atomic::AtomicBool>,
    sent: Arc<std::sync::atomic::AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl SteadyLoad {
    /// Starts the load on clones of `svc`.
    pub fn start<S>(svc: S, users: u64) -> SteadyLoad
    where
        S: tower::Service<Request<Body>, Error = Infallible> + Clone + Send + 'static,
        S::Response: HasStatus,
        S::Future: Send,
    {
        use std::sync::atomic::Ordering;
        use tower::ServiceExt;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let tasks = (0..4)
            .map(|t| {
                let (svc, stop, sent) = (svc.clone(), stop.clone(), sent.clone());
                tokio::spawn(async move {
                    let started = std::time::Instant::now();
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed)
                        && started.elapsed() < std::time::Duration::from_secs(40)
                        && n < 200_000
                    {
                        let mut req = Request::new(Body::new());
                        req.extensions_mut()
                            .insert(tollgate::Identity::user(format!("load-{t}-{}", n % users)));
                        let status = svc.clone().oneshot(req).await.unwrap().status();
                        assert_eq!(status, http::StatusCode::OK, "task {t} request {n}");
                        sent.fetch_add(1, Ordering::Relaxed);
                        n += 1;
                        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                    }
                })
            })
            .collect();
        SteadyLoad { stop, sent, tasks }
    }

    /// Stops the load; how many requests were answered (a task's failed assertion panics
    /// here).
    pub async fn finish(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A response's status, whatever its body type.
pub trait HasStatus {
    /// The status.
    fn status(&self) -> http::StatusCode;
}

impl<B> HasStatus for Response<B> {
    fn status(&self) -> http::StatusCode {
        Response::status(self)
    }
}
