//! The composition docs/app.md recommends ("Composing with other tower layers"),
//! outermost first: tower-http's `TraceLayer`, tollgate, tower's `TimeoutLayer`, then
//! tower's `ConcurrencyLimitLayer` taken inside the call (a `service_fn` calling
//! `oneshot`), then the handler. Time is tokio's paused clock (it jumps ahead only when
//! every task waits), the rate limiter's time a `ManualClock` that never moves: no
//! sleeps, nothing measured.
//!
//! "Without waiting" below is `tokio::time::timeout(WAIT, ..)` on the paused clock: a
//! request that waits for a permit lets the clock jump to `WAIT` and fails; one answered
//! at once never sees the clock move.

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use common::{Backend, Body, Memory};
use http::{Request, Response, StatusCode};
use tokio::sync::{mpsc, Notify};
use tollgate::{Identity, ManualClock, RateLimitConfig, RateLimitLayer};
use tower::limit::ConcurrencyLimitLayer;
use tower::timeout::error::Elapsed;
use tower::timeout::TimeoutLayer;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_http::trace::TraceLayer;

/// The stack's own timeout.
const TIMEOUT: Duration = Duration::from_secs(10);
/// How long "without waiting" may take on the paused clock: less than `TIMEOUT`, so a
/// request stuck behind a permit is caught here rather than by the stack's timeout.
const WAIT: Duration = Duration::from_secs(1);

/// The README's order, around [`handler`].
fn recommended(
    limiter: RateLimitLayer,
    permits: usize,
) -> impl Service<
    Request<Body>,
    Response = Response<impl http_body::Body>,
    Error = BoxError,
    Future = impl Send,
> + Clone {
    let work = ServiceBuilder::new()
        .layer(ConcurrencyLimitLayer::new(permits))
        .service_fn(handler);
    ServiceBuilder::new()
        .layer(TraceLayer::new_for_http())
        .layer(limiter)
        .layer(TimeoutLayer::new(TIMEOUT))
        .service_fn(move |req: Request<Body>| work.clone().oneshot(req))
}

/// In a request's extensions: the handler says it started, then waits to be released.
#[derive(Clone)]
struct Hold {
    started: mpsc::UnboundedSender<()>,
    release: Arc<Notify>,
}

/// In a request's extensions: the handler never finishes.
#[derive(Clone)]
struct Hang;

async fn handler(req: Request<Body>) -> Result<Response<Body>, Infallible> {
    if let Some(hold) = req.extensions().get::<Hold>().cloned() {
        hold.started.send(()).expect("the test is listening");
        hold.release.notified().await;
    }
    if req.extensions().get::<Hang>().is_some() {
        std::future::pending::<()>().await;
    }
    Ok(Response::new(Body::from("ok")))
}

fn layer(rate: &str) -> RateLimitLayer {
    let cfg = RateLimitConfig::builder().by_user(rate).build().unwrap();
    Memory::default().layer(cfg, &ManualClock::new())
}

fn request(user: &str) -> Request<Body> {
    let mut req = Request::new(Body::new());
    req.extensions_mut().insert(Identity::user(user));
    req
}

fn with<T: Clone + Send + Sync + 'static>(mut req: Request<Body>, ext: T) -> Request<Body> {
    req.extensions_mut().insert(ext);
    req
}

fn remaining<B>(resp: &Response<B>) -> u64 {
    resp.headers()["x-ratelimit-remaining"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// Starts a request that takes the permit and keeps it until `release` is notified;
/// returns once its handler runs.
async fn hold_permit<S>(
    svc: &S,
    user: &str,
) -> (
    Arc<Notify>,
    tokio::task::JoinHandle<Result<S::Response, BoxError>>,
)
where
    S: Service<Request<Body>, Error = BoxError> + Clone + Send + 'static,
    S::Response: Send,
    S::Future: Send,
{
    let (started, mut running) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let hold = Hold {
        started,
        release: release.clone(),
    };
    let task = tokio::spawn(svc.clone().oneshot(with(request(user), hold)));
    running
        .recv()
        .await
        .expect("the held request reached the handler");
    (release, task)
}

/// With the only permit held by a slow request, a caller over its rate limit is still
/// answered 429 at once: tollgate decides before anything waits for a permit. The
/// refusals take no permit: once the slow request ends, the next one gets it.
/// (Fails with `ConcurrencyLimitLayer` outside tollgate, and also with it directly under
/// tollgate in one `ServiceBuilder`: tollgate's `poll_ready` forwards, and the limit
/// takes its permit in `poll_ready`, so refusals would queue for one.)
#[tokio::test(start_paused = true)]
async fn refusals_neither_wait_for_nor_take_a_concurrency_permit() {
    let svc = recommended(layer("2/m"), 1);
    for _ in 0..2 {
        let resp = svc.clone().oneshot(request("alice")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let (release, bob) = hold_permit(&svc, "bob").await;

    // The limit is in force: a caller under its rate waits for bob's permit.
    let queued = tokio::time::timeout(WAIT, svc.clone().oneshot(request("carol"))).await;
    assert!(
        queued.is_err(),
        "carol should wait for the permit bob holds"
    );

    for i in 0..5 {
        let refused = tokio::time::timeout(WAIT, svc.clone().oneshot(request("alice")))
            .await
            .unwrap_or_else(|_| panic!("refusal {i} waited for the permit bob holds"))
            .unwrap();
        assert_eq!(
            refused.status(),
            StatusCode::TOO_MANY_REQUESTS,
            "refusal {i}"
        );
    }

    release.notify_one();
    assert_eq!(bob.await.unwrap().unwrap().status(), StatusCode::OK);
    // Five refusals later the one permit is free: dave gets it without waiting.
    let next = tokio::time::timeout(WAIT, svc.clone().oneshot(request("dave")))
        .await
        .expect("the permit is free again")
        .unwrap();
    assert_eq!(next.status(), StatusCode::OK);
}

/// A handler that overruns the timeout gives the timeout error; tollgate counted that
/// request once, when it let it through (remaining goes 4, then 2 after it), and its
/// permit is freed when it times out: the next request gets the only permit.
#[tokio::test(start_paused = true)]
async fn a_timed_out_request_is_counted_once_and_frees_its_permit() {
    let svc = recommended(layer("5/m"), 1);
    let first = svc.clone().oneshot(request("alice")).await.unwrap();
    assert_eq!(remaining(&first), 4);

    let err = svc
        .clone()
        .oneshot(with(request("alice"), Hang))
        .await
        .err()
        .expect("the handler never answers");
    assert!(err.is::<Elapsed>(), "the timeout's error, got {err}");

    let after = tokio::time::timeout(WAIT, svc.clone().oneshot(request("alice")))
        .await
        .expect("the timed-out request's permit is free")
        .unwrap();
    assert_eq!(after.status(), StatusCode::OK);
    assert_eq!(
        remaining(&after),
        2,
        "the timed-out request counted exactly once"
    );
}

/// The timeout covers the wait for a permit too, so no request waits longer than it,
/// however long another holds the permit; the one that timed out waiting was counted once.
/// (Fails with `TimeoutLayer` under the concurrency limit, where it covers the handler
/// only.)
#[tokio::test(start_paused = true)]
async fn the_timeout_bounds_the_wait_for_a_permit() {
    let svc = recommended(layer("5/m"), 1);
    let (release, bob) = hold_permit(&svc, "bob").await;

    let waited = tokio::time::timeout(2 * TIMEOUT, svc.clone().oneshot(request("alice")))
        .await
        .expect("the stack's timeout ends the wait");
    let err = waited.err().expect("bob still holds the permit");
    assert!(err.is::<Elapsed>(), "the timeout's error, got {err}");

    release.notify_one();
    assert_eq!(bob.await.unwrap().unwrap().status(), StatusCode::OK);
    let after = svc.clone().oneshot(request("alice")).await.unwrap();
    assert_eq!(
        remaining(&after),
        3,
        "the request that timed out counted once"
    );
}
