//! A small MCP-style tool gateway protected by tollgate.
//!
//! ```text
//! cargo run --example gateway                                  # embedded default limits
//! cargo run --example gateway -- --config examples/gateway.toml --listen 127.0.0.1:3000
//!
//! curl -i -X POST -H 'x-user-id: alice' -d '{"q":1}' http://127.0.0.1:3000/tools/echo
//! curl -i http://127.0.0.1:3000/healthz
//! ```
//!
//! * `POST /tools/{name}` is a tool call. The tool is the path segment, handed to tollgate
//!   as the [`ToolName`] request extension; the handler answers JSON
//!   (`{"tool":"echo","ok":true,"echo":<request body>}`).
//! * `summarise` is priced at 10 units in `[cost.tools]` (every other call costs 1), and
//!   `POST /tools/{name}?used=N` makes the handler settle the call at N units with its
//!   [`Charge`], as a tool that counts the tokens it used would; the reply then says
//!   `"charge":{"estimate":10,"settled":N}`.
//! * `GET /healthz` is never limited, nor is `GET /metrics` (Prometheus text; only when
//!   built with `--features metrics`).
//! * Identity comes from the `x-user-id` / `x-tenant-id` headers. This example plays the
//!   trusted proxy that set them and turns them into the [`Identity`] extension. In a real
//!   deployment these headers must be set by your auth proxy and stripped from client
//!   requests, or any client can pick whose quota it spends.
//! * The server is made with `into_make_service_with_connect_info::<SocketAddr>()`, so
//!   every request carries its peer address and `anonymous = "by_ip"` (see
//!   `examples/gateway-policy.toml`) counts callers without `x-user-id` per client address.
//!
//! * `--admin ADDR` opens a second listener for operators (never the public one; bind it
//!   to loopback or protect it, as it answers for any user): `GET
//!   /limits?user=U&tool=T` says what each rule has left for that user calling that tool,
//!   counting nothing; `POST /limits/reset?user=U&tool=T` clears those counters (204).
//!   `tenant=` may be added to both.
//!
//! Flags: `--config FILE`, `--listen ADDR`, `--admin ADDR`, `--help` (see [`USAGE`]). `kill -HUP <pid>`
//! reloads `--config`: a good file replaces the rules, a bad one is logged and changes
//! nothing.

#[path = "common/cli.rs"]
mod cli;
#[path = "common/flags.rs"]
mod flags;
// `serve` binds and serves in one: the gateway binds its two listeners itself.
#[allow(dead_code)]
#[path = "common/shutdown.rs"]
mod shutdown;

use std::process::ExitCode;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use tollgate::{
    Charge, Identity, RateLimitConfig, RateLimitHandle, RateLimitLayer, ToolName, MAX_IDENTITY_LEN,
};
use tower::ServiceBuilder;

const USAGE: &str = "\
tollgate example gateway: POST /tools/{name} rate-limited per user, tenant and tool.

USAGE:
    gateway [--config FILE] [--listen ADDR] [--admin ADDR]

OPTIONS:
    --config FILE   TOML rate-limit config (see examples/gateway.toml). Without it:
                      by_user = \"30/m\", by_tenant = \"3000/m\", [by_tool] search = \"10/m\",
                      [cost.tools] summarise = 10 (units; every other call costs 1)
    --listen ADDR   address to listen on [default: 127.0.0.1:3000]; port 0 picks a free
                    port, and the address actually bound is printed
    --admin ADDR    also listen on ADDR for operators (keep it private: loopback or
                    behind your auth): GET /limits?user=U&tool=T shows what each rule
                    has left, counting nothing; POST /limits/reset?user=U&tool=T clears
                    those counters (tenant=T too). Its address is printed second
    -h, --help      print this help

Identity is read from the x-user-id and x-tenant-id headers, which this example trusts
as if a proxy had set them. Requests carry their peer address, so a config with
anonymous = \"by_ip\" (examples/gateway-policy.toml) counts anonymous callers per client
address. POST /tools/{name}?used=N settles the call at N units once it has run (with
a [cost] section; the reply shows the charge). SIGHUP reloads --config (a bad file is logged and changes nothing; a changed
[backend] needs a restart). Stop with Ctrl-C or SIGTERM (graceful shutdown).";

/// The limits used without `--config`.
const DEFAULT_CONFIG: &str = r#"
by_user = "30/m"
by_tenant = "3000/m"

[by_tool]
search = "10/m"

[cost.tools]
summarise = 10
"#;

const DEFAULT_LISTEN: &str = "127.0.0.1:3000";

static USER_HEADER: HeaderName = HeaderName::from_static("x-user-id");
static TENANT_HEADER: HeaderName = HeaderName::from_static("x-tenant-id");

const CLI: cli::Cli = cli::Cli {
    name: "gateway",
    usage: USAGE,
    default_config: (DEFAULT_CONFIG, "the embedded default config"),
    default_listen: DEFAULT_LISTEN,
    admin: true,
};

fn main() -> ExitCode {
    CLI.main(|cfg, args| async move { serve(cfg, args).await })
}

async fn serve(cfg: RateLimitConfig, args: cli::Args) -> Result<(), String> {
    eprintln!("gateway: {}", summary(&cfg));
    // Built inside the runtime: a Redis backend may spawn its connection tasks here.
    // Nothing in this gateway reads the `Decision` from response extensions (the headers
    // carry it to clients), so it is not inserted: that saves three allocations a call.
    // The recorder goes in before the first request: tollgate registers its metrics then.
    #[cfg(feature = "metrics")]
    let metrics = metrics_route()?;
    let limiter = RateLimitLayer::new(cfg).decision_extension(false);
    // Listening for SIGHUP starts before the address is printed: from then on a SIGHUP
    // reloads instead of ending the process (its default action).
    #[cfg(unix)]
    tokio::spawn(reload_on_sighup(hangups()?, limiter.handle(), args.config));
    let handle = limiter.handle();
    let app = app(limiter);
    #[cfg(feature = "metrics")]
    let app = app.merge(metrics);
    // Served with the peer address in every request (`ConnectInfo<SocketAddr>`), so
    // tollgate can count anonymous callers by client address (`anonymous = "by_ip"`).
    let listener = shutdown::bind(&args.listen, "tollgate gateway", "").await?;
    if let Some(admin) = &args.admin {
        let admin = shutdown::bind(admin, "tollgate gateway admin", "").await?;
        tokio::spawn(async move {
            if let Err(e) = axum::serve(admin, admin_app(handle)).await {
                eprintln!("gateway: admin listener: {e}");
            }
        });
    }
    shutdown::serve_on(listener, app, "gateway").await?;
    eprintln!("gateway: shut down cleanly");
    Ok(())
}

/// The gateway's routes.
///
/// `Router::layer` runs *before* routing, when the `{name}` path parameter is not known
/// yet, and would also cover `/healthz` and unmatched paths. So the limiter goes on the
/// tool route with `MethodRouter::route_layer`, which runs after routing and only for a
/// matched method: `Path` is available there, and `/healthz`, a 404 or a 405 (`GET
/// /tools/x`) never touch the limiter or spend anyone's quota.
/// Within that stack (outermost first): identity from the proxy headers, then the tool
/// name from the path, then tollgate, which reads both extensions.
fn app(limiter: RateLimitLayer) -> Router {
    let tool_call = post(call_tool).route_layer(
        ServiceBuilder::new()
            .layer(middleware::from_fn(identity_from_proxy_headers))
            .layer(middleware::from_fn(tool_from_path))
            .layer(limiter),
    );
    Router::new()
        .route("/healthz", get(healthz))
        .route("/tools/{name}", tool_call)
}

/// `GET /metrics` in Prometheus text format (built with `--features metrics`): tollgate's
/// metrics, recorded through the `metrics` facade into this process's Prometheus
/// recorder. Not limited, like `/healthz`.
#[cfg(feature = "metrics")]
fn metrics_route() -> Result<Router, String> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    // Store latency from a microsecond (memory) to a second (a Redis timeout).
    let buckets = [1e-6, 1e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 1.0];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("tollgate_store_latency_seconds".into()),
            &buckets,
        )
        .and_then(PrometheusBuilder::install_recorder)
        .map_err(|e| format!("cannot install the Prometheus recorder: {e}"))?;
    // Histogram samples wait in the recorder until a render or an upkeep: drain them even
    // when nobody scrapes.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(Router::new().route("/metrics", get(move || std::future::ready(handle.render()))))
}

/// On each SIGHUP, reads `--config` again and applies it: a good file replaces the rules
/// (one summary line), a bad one changes nothing and every problem is logged, each naming
/// its field. Counters carry over as `RateLimitHandle` documents.
#[cfg(unix)]
async fn reload_on_sighup(
    mut hangups: tokio::signal::unix::Signal,
    handle: tollgate::RateLimitHandle,
    config: Option<String>,
) {
    while hangups.recv().await.is_some() {
        let Some(path) = &config else {
            eprintln!("gateway: SIGHUP ignored: started without --config, nothing to reload");
            continue;
        };
        let applied = cli::read_config(path).and_then(|cfg| {
            let line = summary(&cfg);
            handle
                .update(cfg)
                .map(|()| line)
                .map_err(|e| format!("{path} cannot be applied:\n{e}"))
        });
        match applied {
            Ok(line) => eprintln!("gateway: reloaded {path}: {line}"),
            Err(e) => eprintln!("gateway: reload failed, the old rules stay: {e}"),
        }
    }
}

#[cfg(unix)]
fn hangups() -> Result<tokio::signal::unix::Signal, String> {
    use tokio::signal::unix::{signal, SignalKind};
    signal(SignalKind::hangup()).map_err(|e| format!("cannot listen for SIGHUP: {e}"))
}

/// The limits `cfg` sets, on one line (never any identity).
fn summary(cfg: &RateLimitConfig) -> String {
    let show = |r: Option<tollgate::Rate>| r.map_or_else(|| "none".to_owned(), |r| r.to_string());
    let tools: Vec<String> = cfg
        .by_tool()
        .map(|(name, rate)| format!("{name}={rate}"))
        .collect();
    let user_tools: Vec<String> = cfg
        .by_user_tool()
        .map(|(name, rate)| format!("{name}={rate}"))
        .collect();
    let tiers: Vec<&str> = cfg.tiers().map(|(name, _)| name).collect();
    let costs: Vec<String> = cfg.cost().map_or_else(Vec::new, |cost| {
        cost.tools()
            .map(|(name, units)| format!("{name}={units}"))
            .chain(
                cost.prompts()
                    .map(|(name, units)| format!("prompt:{name}={units}")),
            )
            .collect()
    });
    format!(
        "by_user={} by_tenant={} by_tool=[{}] by_user_tool=[{}] cost=[{}] tiers=[{}] anonymous={:?} algorithm={:?} mode={:?} backend={:?}",
        show(cfg.by_user()),
        show(cfg.by_tenant()),
        tools.join(", "),
        user_tools.join(", "),
        costs.join(", "),
        tiers.join(", "),
        cfg.anonymous(),
        cfg.algorithm(),
        cfg.mode(),
        cfg.backend().kind(),
    )
}

// ---- the admin listener (`--admin ADDR`) ----

/// The operators' routes: peek and reset through the layer's handle. Nothing here logs an
/// identity.
fn admin_app(handle: RateLimitHandle) -> Router {
    Router::new()
        .route("/limits", get(peek))
        .route("/limits/reset", post(reset))
        .with_state(handle)
}

/// `GET /limits?user=U&tool=T`: each applicable rule's `rule`, `limit` (its count),
/// `rate`, `remaining` and `reset_after` (seconds, rounded up), counting nothing.
async fn peek(State(handle): State<RateLimitHandle>, RawQuery(query): RawQuery) -> Response {
    let (identity, tool) = match lookup(query.as_deref()) {
        Ok(found) => found,
        Err(detail) => return bad_query(detail),
    };
    match handle.peek(&identity, tool.as_deref()).await {
        Ok(rules) => {
            let rules: Vec<serde_json::Value> = rules
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "rule": r.rule.as_str(),
                        "limit": r.limit.count(),
                        "rate": r.limit.to_string(),
                        "remaining": r.remaining,
                        "reset_after": r.reset_after.as_micros().div_ceil(1_000_000) as u64,
                    })
                })
                .collect();
            Json(serde_json::json!({ "rules": rules })).into_response()
        }
        Err(_) => store_unavailable(),
    }
}

/// `POST /limits/reset?user=U&tool=T`: clears those counters; 204.
async fn reset(State(handle): State<RateLimitHandle>, RawQuery(query): RawQuery) -> Response {
    let (identity, tool) = match lookup(query.as_deref()) {
        Ok(found) => found,
        Err(detail) => return bad_query(detail),
    };
    match handle.reset(&identity, tool.as_deref()).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(_) => store_unavailable(),
    }
}

/// The 400 for a query `lookup` refuses (naming no value).
fn bad_query(detail: &str) -> Response {
    problem(
        StatusCode::BAD_REQUEST,
        "Invalid query",
        "INVALID_QUERY",
        detail,
    )
}

/// `user`, `tenant` and `tool` from the query (percent-decoded; each at most once, each
/// at most 256 bytes; no `user`: the shared anonymous counter).
fn lookup(query: Option<&str>) -> Result<(Identity, Option<String>), &'static str> {
    let (mut user, mut tenant, mut tool) = (None, None, None);
    for (name, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        let slot = match &*name {
            "user" => &mut user,
            "tenant" => &mut tenant,
            "tool" => &mut tool,
            _ => return Err("the query takes only user, tenant and tool"),
        };
        if slot.is_some() {
            return Err("user, tenant and tool may each appear once");
        }
        if value.len() > MAX_IDENTITY_LEN {
            return Err("user, tenant and tool are at most 256 bytes");
        }
        *slot = Some(value.into_owned());
    }
    Ok((Identity::new(user, tenant), tool))
}

fn store_unavailable() -> Response {
    problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "Store unavailable",
        "BACKEND_UNAVAILABLE",
        "the rate-limit store did not answer",
    )
}

async fn healthz() -> &'static str {
    "ok"
}

/// The tool call itself: `echo` sends the request body back, every other tool just
/// says it ran. With `?used=N` ([`Used`]) the call is settled at N units once it has run
/// (the [`Charge`] is there when the config has a `[cost]` section), as a tool that
/// counts the tokens it used would; the reply shows what it was charged and settled at.
async fn call_tool(
    Path(name): Path<String>,
    used: Option<Extension<Used>>,
    charge: Option<Extension<Charge>>,
    body: Bytes,
) -> Json<serde_json::Value> {
    let mut reply = serde_json::json!({ "tool": name, "ok": true });
    if name == "echo" {
        reply["echo"] = serde_json::from_slice(&body).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&body).into_owned())
        });
    }
    if let (Some(Extension(Used(used))), Some(Extension(charge))) = (used, charge) {
        // Awaited only so the reply can say it is applied; a real tool may drop it. A call
        // nothing counted (free, or let through while the store failed) settles nothing.
        let settled = charge.estimate() > 0 && charge.settle(used).await.is_ok();
        reply["charge"] = serde_json::json!({
            "estimate": charge.estimate(),
            "settled": if settled { Some(used) } else { None },
        });
    }
    Json(reply)
}

/// `?used=N`: the units a call used, read before the call is counted.
#[derive(Clone, Copy)]
struct Used(u64);

/// The `used` query parameter: absent, or a whole number of units (percent-decoded).
fn used(query: Option<&str>) -> Result<Option<Used>, &'static str> {
    let mut used = None;
    for (name, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if name != "used" {
            continue;
        }
        if used.is_some() {
            return Err("the used parameter appears more than once");
        }
        let units = value
            .parse::<u64>()
            .map_err(|_| "the used parameter is not a whole number of units")?;
        used = Some(Used(units));
    }
    Ok(used)
}

/// Hands the `{name}` segment to tollgate as [`ToolName`] (tollgate trims and lower-cases
/// it, so `/tools/Search` and `/tools/search` share the `search` limit).
/// A bad `?used` is refused here, before tollgate counts the call.
async fn tool_from_path(Path(name): Path<String>, mut req: Request, next: Next) -> Response {
    match used(req.uri().query()) {
        Ok(Some(used)) => {
            req.extensions_mut().insert(used);
        }
        Ok(None) => {}
        Err(detail) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "Invalid used",
                "INVALID_USED",
                detail,
            )
        }
    }
    req.extensions_mut().insert(ToolName::new(name));
    next.run(req).await
}

/// The trusted-proxy step: `x-user-id` / `x-tenant-id` become the [`Identity`] extension.
///
/// A header that is repeated, longer than [`MAX_IDENTITY_LEN`] or not UTF-8 is refused
/// with 400 rather than guessed at (first or last value, truncated, lossily decoded):
/// any guess would let a caller spend someone else's quota. The answer names the header,
/// never its value.
async fn identity_from_proxy_headers(mut req: Request, next: Next) -> Response {
    let identity = match identity(req.headers()) {
        Ok(identity) => identity,
        Err(detail) => return invalid_identity(detail),
    };
    req.extensions_mut().insert(identity);
    next.run(req).await
}

fn identity(headers: &HeaderMap) -> Result<Identity, &'static str> {
    Ok(Identity::new(
        single(headers, &USER_HEADER, IdErrors::USER)?,
        single(headers, &TENANT_HEADER, IdErrors::TENANT)?,
    ))
}

struct IdErrors {
    repeated: &'static str,
    too_long: &'static str,
    not_utf8: &'static str,
}

impl IdErrors {
    const USER: IdErrors = IdErrors {
        repeated: "the x-user-id header appears more than once",
        too_long: "the x-user-id header is longer than 256 bytes",
        not_utf8: "the x-user-id header is not valid UTF-8",
    };
    const TENANT: IdErrors = IdErrors {
        repeated: "the x-tenant-id header appears more than once",
        too_long: "the x-tenant-id header is longer than 256 bytes",
        not_utf8: "the x-tenant-id header is not valid UTF-8",
    };
}

fn single(
    headers: &HeaderMap,
    name: &HeaderName,
    errors: IdErrors,
) -> Result<Option<String>, &'static str> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(errors.repeated);
    }
    let text = std::str::from_utf8(value.as_bytes()).map_err(|_| errors.not_utf8)?;
    let text = text.trim();
    if text.len() > MAX_IDENTITY_LEN {
        return Err(errors.too_long);
    }
    Ok(Some(text.to_owned()))
}

/// Same shape as tollgate's own 400 for identities it reads from headers.
fn invalid_identity(detail: &'static str) -> Response {
    problem(
        StatusCode::BAD_REQUEST,
        "Invalid identity",
        "INVALID_IDENTITY",
        detail,
    )
}

/// An `application/problem+json` answer, the shape tollgate's own refusals have.
fn problem(status: StatusCode, title: &str, code: &str, detail: &str) -> Response {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": title,
        "status": status.as_u16(),
        "code": code,
        "detail": detail,
    });
    let mut resp = (status, body.to_string()).into_response();
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    resp
}
