//! tollgate under axum's exact bounds: `Router::layer`, `Router::route_layer`, and a real
//! hyper server over loopback.

use std::convert::Infallible;

use axum::body::Body;
use axum::extract::Path;
use axum::routing::{get, post};
use axum::Router;
use http::{Request, StatusCode};
use tollgate::{Identity, RateLimitConfig, RateLimitLayer, ToolName};
use tower::ServiceExt;

fn cfg() -> RateLimitConfig {
    RateLimitConfig::from_toml_str(
        "by_user = \"2/m\"\n[by_tool]\nsearch = \"1/m\"\n[identity]\nuser_header = \"x-user-id\"",
    )
    .unwrap()
}

async fn tool(Path(name): Path<String>) -> String {
    format!("called {name}")
}

/// Compiles only if the service meets axum's bounds (`Clone + Send + Sync + 'static`,
/// `Error: Into<Infallible>`, `Future: Send`).
fn assert_axum_service<S>(_: &S)
where
    S: tower::Service<Request<Body>, Error = Infallible> + Clone + Send + Sync + 'static,
    S::Future: Send,
{
}

#[tokio::test]
async fn router_layer_limits_every_route() {
    let app = Router::new()
        .route("/tools/{name}", post(tool))
        .route("/healthz", get(|| async { "ok" }))
        .layer(RateLimitLayer::new(cfg()));
    let call = |path: &str| {
        Request::post(path)
            .header("x-user-id", "alice")
            .body(Body::empty())
            .unwrap()
    };
    assert_eq!(
        app.clone()
            .oneshot(call("/tools/echo"))
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        app.clone()
            .oneshot(call("/tools/echo"))
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let limited = app.clone().oneshot(call("/tools/echo")).await.unwrap();
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.headers()["x-ratelimit-limit"], "2");
}

#[tokio::test]
async fn route_layer_sees_the_tool_from_a_routing_middleware() {
    // The tool name comes from the matched path, so the layer must run after routing:
    // `route_layer`, with a middleware that turns the path into a ToolName.
    let app = Router::new()
        .route("/tools/{name}", post(tool))
        .route_layer(RateLimitLayer::new(cfg()))
        .route_layer(axum::middleware::from_fn(
            |Path(name): Path<String>, mut req: Request<Body>, next: axum::middleware::Next| async move {
                req.extensions_mut().insert(ToolName::new(name));
                req.extensions_mut().insert(Identity::user("bob"));
                next.run(req).await
            },
        ))
        .route("/healthz", get(|| async { "ok" }));
    let call = |path: &str| Request::post(path).body(Body::empty()).unwrap();
    assert_eq!(
        app.clone()
            .oneshot(call("/tools/Search"))
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let limited = app.clone().oneshot(call("/tools/search")).await.unwrap();
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    let body = http_body_util::BodyExt::collect(limited.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert!(std::str::from_utf8(&body)
        .unwrap()
        .contains("for tool 'search'"));
    for _ in 0..5 {
        let health = app
            .clone()
            .oneshot(Request::get("/healthz").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(
            health.status(),
            StatusCode::OK,
            "healthz is outside the route layer"
        );
    }
}

#[tokio::test]
async fn a_real_server_over_loopback() {
    let svc = tower::ServiceBuilder::new()
        .layer(RateLimitLayer::new(cfg()))
        .service(Router::new().route("/", get(|| async { "hello" })));
    assert_axum_service(&svc);
    let app = Router::new().fallback_service(svc);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let req = Request::get(format!("http://{addr}/"))
            .header("x-user-id", "carol")
            .body(http_body_util::Empty::new())
            .unwrap();
        statuses.push(client.request(req).await.unwrap().status());
    }
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    server.abort();
}

/// `anonymous = "by_ip"` under `axum::serve(.., into_make_service_with_connect_info)`:
/// tollgate reads `ConnectInfo<SocketAddr>` itself (feature `axum`), so two clients on
/// different loopback addresses have separate buckets, with `Router::layer` and no
/// middleware of the app's.
#[tokio::test]
async fn by_ip_counts_each_connecting_address_with_connect_info() {
    let cfg = RateLimitConfig::from_toml_str("by_user = \"2/m\"\nanonymous = \"by_ip\"").unwrap();
    let app = Router::new()
        .route("/", get(|| async { "hello" }))
        .layer(RateLimitLayer::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .await
        .unwrap()
    });
    let client_from = |ip: [u8; 4]| {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_local_address(Some(std::net::IpAddr::from(ip)));
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build::<_, http_body_util::Empty<bytes::Bytes>>(connector)
    };
    let mut statuses = Vec::new();
    for ip in [
        [127, 0, 0, 2],
        [127, 0, 0, 2],
        [127, 0, 0, 2],
        [127, 0, 0, 3],
    ] {
        let req = Request::get(format!("http://{addr}/"))
            .body(http_body_util::Empty::new())
            .unwrap();
        statuses.push(client_from(ip).request(req).await.unwrap().status());
    }
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::OK
        ]
    );
    server.abort();
}
