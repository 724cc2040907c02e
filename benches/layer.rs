//! The layer's overhead: `RateLimit<service_fn>` against the bare `service_fn`, in the same
//! run, memory store, one user rule, legacy headers, on a current-thread runtime.
//!
//! ```text
//! cargo bench --bench layer
//! cargo bench --bench layer -- --quick
//! ```
//!
//! Each iteration builds a request (with an `x-user-id` header), clones the service and
//! drives `oneshot` to completion, exactly as axum does per request; the bare rows do the
//! same work without tollgate, so `layer - bare` is the overhead. The inner handler
//! answers with a `content-type` header, like any real handler, so the response's header
//! map already exists. Rows:
//! - `bare` / `allowed`: every request under the limit (10^9/s), 1 000 users round-robin;
//! - `allowed_no_decision_extension`: the same with `.decision_extension(false)`;
//! - `allowed_metrics_prometheus` (with `--features metrics`): `allowed`, recording into a
//!   Prometheus recorder;
//! - `rejected`: every request a 429 (limit 1/h, already used), one user;
//! - `*_ready_call`: `ready().call()` on one service instance instead of a clone.

use std::convert::Infallible;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response, StatusCode};
use tollgate::{HeaderStyle, MemoryStore, RateLimitConfig, RateLimitLayer};
use tower::{service_fn, Layer, Service, ServiceExt};

const USERS: usize = 1_000;

fn handler(_req: Request<()>) -> std::future::Ready<Result<Response<()>, Infallible>> {
    let mut resp = Response::new(());
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    std::future::ready(Ok(resp))
}

fn layer(rate: &str) -> RateLimitLayer {
    let cfg = RateLimitConfig::builder()
        .by_user(rate)
        .headers(HeaderStyle::Legacy)
        .user_header("x-user-id")
        .build()
        .expect("valid config");
    RateLimitLayer::with_store(cfg, MemoryStore::new())
}

fn request(user: &HeaderValue) -> Request<()> {
    let mut req = Request::new(());
    req.headers_mut().insert("x-user-id", user.clone());
    req
}

/// Drives `iters` requests through clones of `svc` on `rt`, expecting `status`.
fn run<S, B>(
    rt: &tokio::runtime::Runtime,
    svc: &S,
    users: &[HeaderValue],
    iters: u64,
    status: StatusCode,
) -> Duration
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible> + Clone,
{
    rt.block_on(async {
        let began = Instant::now();
        for i in 0..iters as usize {
            let req = request(&users[i % users.len()]);
            let resp = svc.clone().oneshot(req).await.expect("infallible");
            assert_eq!(resp.status(), status);
            black_box(resp);
        }
        began.elapsed()
    })
}

/// The same with `ready().call()` on one instance.
fn run_ready<S, B>(
    rt: &tokio::runtime::Runtime,
    svc: &mut S,
    users: &[HeaderValue],
    iters: u64,
    status: StatusCode,
) -> Duration
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible>,
{
    rt.block_on(async {
        let began = Instant::now();
        for i in 0..iters as usize {
            let req = request(&users[i % users.len()]);
            let resp = svc
                .ready()
                .await
                .expect("infallible")
                .call(req)
                .await
                .expect("infallible");
            assert_eq!(resp.status(), status);
            black_box(resp);
        }
        began.elapsed()
    })
}

fn overhead(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let users: Vec<HeaderValue> = (0..USERS)
        .map(|i| HeaderValue::from_str(&format!("user-{i:06}")).expect("ASCII"))
        .collect();
    let one_user = [HeaderValue::from_static("abuser")];

    let mut group = c.benchmark_group("layer");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(30);

    let bare = service_fn(handler);
    group.bench_function("bare", |b| {
        b.iter_custom(|iters| run(&rt, &bare, &users, iters, StatusCode::OK))
    });
    let allowed = layer("1000000000/s").layer(service_fn(handler));
    group.bench_function("allowed", |b| {
        b.iter_custom(|iters| run(&rt, &allowed, &users, iters, StatusCode::OK))
    });
    let lean = layer("1000000000/s")
        .decision_extension(false)
        .layer(service_fn(handler));
    group.bench_function("allowed_no_decision_extension", |b| {
        b.iter_custom(|iters| run(&rt, &lean, &users, iters, StatusCode::OK))
    });
    // With `--features metrics`, the `allowed` row pays for the feature with no recorder
    // installed; this one records into a Prometheus recorder, as a deployment does. Its
    // service is fresh: a layer registers its metrics on its first request, which must
    // come with the recorder in place.
    #[cfg(feature = "metrics")]
    {
        let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let upkeep = prometheus.handle();
        let metered = layer("1000000000/s").layer(service_fn(handler));
        group.bench_function("allowed_metrics_prometheus", |b| {
            b.iter_custom(|iters| {
                let took = metrics::with_local_recorder(&prometheus, || {
                    run(&rt, &metered, &users, iters, StatusCode::OK)
                });
                // Drains the histogram's samples, outside the timed part.
                upkeep.run_upkeep();
                took
            })
        });
    }
    let rejected = layer("1/h").layer(service_fn(handler));
    // Use up the one request: from here on every request is a 429.
    run(&rt, &rejected, &one_user, 1, StatusCode::OK);
    group.bench_function("rejected", |b| {
        b.iter_custom(|iters| {
            run(
                &rt,
                &rejected,
                &one_user,
                iters,
                StatusCode::TOO_MANY_REQUESTS,
            )
        })
    });

    let mut bare = service_fn(handler);
    group.bench_function("bare_ready_call", |b| {
        b.iter_custom(|iters| run_ready(&rt, &mut bare, &users, iters, StatusCode::OK))
    });
    let mut allowed = layer("1000000000/s").layer(service_fn(handler));
    group.bench_function("allowed_ready_call", |b| {
        b.iter_custom(|iters| run_ready(&rt, &mut allowed, &users, iters, StatusCode::OK))
    });
    group.finish();
}

criterion_group!(benches, overhead);
criterion_main!(benches);
