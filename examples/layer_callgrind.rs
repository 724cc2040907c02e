//! A fixed number of requests through `RateLimit<service_fn>` (or the bare `service_fn`),
//! for counting instructions per request with callgrind, which is stable on a noisy
//! machine where timings are not.
//!
//! ```text
//! cargo build --release --example layer_callgrind
//! for n in 20000 220000; do
//!     valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.accept.$n \
//!         target/release/examples/layer_callgrind accept $n
//! done
//! # instructions per request: (Ir at 220000 - Ir at 20000) / 200000
//! ```
//!
//! Each request is built as `axum::serve` with connect info hands it on (an `x-user-id`
//! header, 1 000 users round-robin, and the peer's `ConnectInfo<SocketAddr>`), sent through
//! a clone of the service with `oneshot` on a current-thread runtime, as axum does, and
//! its status checked. The handler answers an empty axum body with a `content-type`
//! header, like a real one. Modes (tollgate's as in `benches/layer.rs`: memory store, one
//! `by_user` rule, legacy headers):
//!
//! * `bare`: no layer (subtract it to get a layer's own cost);
//! * `accept`: every request allowed (10^9 a minute), the `Decision` extension on;
//! * `accept_lean`: the same with `.decision_extension(false)`;
//! * `accept_none`: `headers = "none"` and no extension: counting alone;
//! * `reject`: every request a 429 (1 an hour, already used), one user;
//! * `governor`, `governor_headers`: tower_governor keyed by peer IP (one address), never
//!   refusing, without and with `.use_headers()`, as in `examples/bench_server.rs`.
//!
//! Differencing two counts of requests cancels the start-up and the first insert of each
//! user's key.

use std::convert::Infallible;
use std::hint::black_box;
use std::process::ExitCode;

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::ConnectInfo;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response, StatusCode};
use tollgate::{HeaderStyle, MemoryStore, RateLimitConfig, RateLimitLayer};
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::GovernorLayer;

const USERS: usize = 1_000;

fn handler(_req: Request<()>) -> std::future::Ready<Result<Response<Body>, Infallible>> {
    let mut resp = Response::new(Body::empty());
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    std::future::ready(Ok(resp))
}

fn layer(rate: &str, headers: HeaderStyle) -> RateLimitLayer {
    let cfg = RateLimitConfig::builder()
        .by_user(rate)
        .headers(headers)
        .user_header("x-user-id")
        .build()
        .expect("valid config");
    RateLimitLayer::with_store(cfg, MemoryStore::new())
}

async fn drive<S, B>(svc: &S, users: &[HeaderValue], n: usize, status: StatusCode)
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible> + Clone,
{
    let peer = ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40_000)));
    for i in 0..n {
        let mut req = Request::new(());
        req.headers_mut()
            .insert("x-user-id", users[i % users.len()].clone());
        req.extensions_mut().insert(peer);
        let resp = svc.clone().oneshot(req).await.expect("infallible");
        assert_eq!(resp.status(), status);
        black_box(resp);
    }
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(mode), Some(n)) = (args.next(), args.next().and_then(|n| n.parse().ok())) else {
        eprintln!(
            "usage: layer_callgrind bare|accept|accept_lean|accept_none|reject|governor|governor_headers REQUESTS"
        );
        return ExitCode::from(2);
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let users: Vec<HeaderValue> = (0..USERS)
        .map(|i| HeaderValue::from_str(&format!("user-{i:06}")).expect("ASCII"))
        .collect();
    let many = "1000000000/m";
    rt.block_on(async {
        match mode.as_str() {
            "bare" => drive(&service_fn(handler), &users, n, StatusCode::OK).await,
            "accept" => {
                let svc = layer(many, HeaderStyle::Legacy).layer(service_fn(handler));
                drive(&svc, &users, n, StatusCode::OK).await
            }
            "accept_lean" => {
                let svc = layer(many, HeaderStyle::Legacy)
                    .decision_extension(false)
                    .layer(service_fn(handler));
                drive(&svc, &users, n, StatusCode::OK).await
            }
            "accept_none" => {
                let svc = layer(many, HeaderStyle::None)
                    .decision_extension(false)
                    .layer(service_fn(handler));
                drive(&svc, &users, n, StatusCode::OK).await
            }
            "reject" => {
                let svc = layer("1/h", HeaderStyle::Legacy).layer(service_fn(handler));
                let one = [HeaderValue::from_static("abuser")];
                drive(&svc, &one, 1, StatusCode::OK).await;
                drive(&svc, &one, n, StatusCode::TOO_MANY_REQUESTS).await
            }
            "governor" => {
                let config = GovernorConfigBuilder::default()
                    .per_nanosecond(1)
                    .burst_size(1_000_000)
                    .finish()
                    .expect("valid quota");
                let svc = GovernorLayer::new(config).layer(service_fn(handler));
                drive(&svc, &users, n, StatusCode::OK).await
            }
            "governor_headers" => {
                let config = GovernorConfigBuilder::default()
                    .per_nanosecond(1)
                    .burst_size(1_000_000)
                    .use_headers()
                    .finish()
                    .expect("valid quota");
                let svc = GovernorLayer::new(config).layer(service_fn(handler));
                drive(&svc, &users, n, StatusCode::OK).await
            }
            other => {
                eprintln!("unknown mode {other:?}");
                std::process::exit(2);
            }
        }
    });
    ExitCode::SUCCESS
}
