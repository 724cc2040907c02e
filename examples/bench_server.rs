//! One axum hello-world server for the HTTP A/B (`scripts/http-ab.sh`): the same route,
//! the same runtime and the same `axum::serve` setup in every mode, so two modes differ
//! by their layer alone.
//!
//! ```text
//! cargo build --release --example bench_server --example loadgen
//! taskset -c 0 target/release/examples/bench_server --mode tollgate --listen 127.0.0.1:3000 &
//! taskset -c 1 target/release/examples/loadgen --target http://127.0.0.1:3000/ \
//!     --users 100 --concurrency 64 --duration 3 --json
//! ```
//!
//! `GET /` answers `Hello, World!`. Modes (`--mode`), each a layer over the whole router:
//!
//! * `bare`: no layer.
//! * `governor`: tower_governor as its README sets it up, keyed by peer IP
//!   (`ConnectInfo<SocketAddr>`), one token every nanosecond and a burst of 1 000 000, so
//!   nothing is ever refused.
//! * `governor_headers`: the same with `.use_headers()` (`x-ratelimit-limit` and
//!   `x-ratelimit-remaining` on every response).
//! * `tollgate`: one `by_user` rule (`x-user-id`, as loadgen sends it), 10^9 a minute so
//!   every call is counted and accepted, legacy headers, the `Decision` extension on (the
//!   defaults).
//! * `tollgate_lean`: the same rule and legacy headers without the `Decision` extension
//!   (`RateLimitLayer::decision_extension(false)`): what governor's `.use_headers()` does.
//! * `tollgate_none`: the same rule with `headers = "none"` and
//!   `RateLimitLayer::decision_extension(false)`: counting alone.
//!
//! Every mode is served with `into_make_service_with_connect_info::<SocketAddr>()`
//! (governor needs the peer address; the others get the same setup). The one line on
//! stdout names the bound address. Stop with Ctrl-C or SIGTERM.

#[path = "common/flags.rs"]
mod flags;
#[path = "common/shutdown.rs"]
mod shutdown;

use std::process::ExitCode;

use axum::routing::get;
use axum::Router;
use tollgate::{HeaderStyle, RateLimitConfig, RateLimitLayer};
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::GovernorLayer;

use flags::Flags;

const USAGE: &str = "\
bench_server: an axum hello-world (GET /) behind one rate-limit layer, for scripts/http-ab.sh.

USAGE:
    bench_server --mode MODE [--listen ADDR]

OPTIONS:
    --mode MODE     bare | governor | governor_headers | tollgate | tollgate_lean |
                    tollgate_none
    --listen ADDR   address to listen on [default: 127.0.0.1:3000]; port 0 picks a free
                    port, and the address actually bound is printed
    -h, --help      print this help";

#[derive(Clone, Copy, Debug)]
enum Mode {
    Bare,
    Governor,
    GovernorHeaders,
    Tollgate,
    TollgateLean,
    TollgateNone,
}

impl Mode {
    fn parse(name: &str) -> Option<Mode> {
        Some(match name {
            "bare" => Mode::Bare,
            "governor" => Mode::Governor,
            "governor_headers" => Mode::GovernorHeaders,
            "tollgate" => Mode::Tollgate,
            "tollgate_lean" => Mode::TollgateLean,
            "tollgate_none" => Mode::TollgateNone,
            _ => return None,
        })
    }
}

/// tower_governor's quota: replenish one every nanosecond, burst 1 000 000. Refusing
/// anything would need a million requests in a millisecond.
const GOVERNOR_BURST: u32 = 1_000_000;
/// tollgate's rule: never reached at any rate this machine can send.
const TOLLGATE_RATE: &str = "1000000000/m";

fn main() -> ExitCode {
    let (mode, listen) = match parse(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("bench_server: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench_server: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(mode, &listen)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_server: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `Ok(None)`: `--help` was asked for.
fn parse(args: impl Iterator<Item = String>) -> Result<Option<(Mode, String)>, String> {
    let mut mode = None;
    let mut listen = "127.0.0.1:3000".to_owned();
    let mut flags = Flags::new(args);
    while let Some(flag) = flags.next_flag() {
        let mut value = || flags.value(&flag);
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--mode" => {
                let v = value()?;
                mode = Some(Mode::parse(&v).ok_or_else(|| format!("unknown mode {v:?}"))?);
            }
            "--listen" => listen = value()?,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let mode = mode.ok_or("--mode is required")?;
    Ok(Some((mode, listen)))
}

async fn hello() -> &'static str {
    "Hello, World!"
}

fn app(mode: Mode) -> Result<Router, String> {
    let router = Router::new().route("/", get(hello));
    Ok(match mode {
        Mode::Bare => router,
        Mode::Governor => {
            let config = GovernorConfigBuilder::default()
                .per_nanosecond(1)
                .burst_size(GOVERNOR_BURST)
                .finish()
                .ok_or("invalid governor quota")?;
            router.layer(GovernorLayer::new(config))
        }
        Mode::GovernorHeaders => {
            let config = GovernorConfigBuilder::default()
                .per_nanosecond(1)
                .burst_size(GOVERNOR_BURST)
                .use_headers()
                .finish()
                .ok_or("invalid governor quota")?;
            router.layer(GovernorLayer::new(config))
        }
        Mode::Tollgate => router.layer(tollgate(HeaderStyle::Legacy)?),
        Mode::TollgateLean => {
            router.layer(tollgate(HeaderStyle::Legacy)?.decision_extension(false))
        }
        Mode::TollgateNone => router.layer(tollgate(HeaderStyle::None)?.decision_extension(false)),
    })
}

fn tollgate(headers: HeaderStyle) -> Result<RateLimitLayer, String> {
    let cfg = RateLimitConfig::builder()
        .by_user(TOLLGATE_RATE)
        .user_header("x-user-id")
        .headers(headers)
        .build()
        .map_err(|e| format!("invalid tollgate config: {e}"))?;
    Ok(RateLimitLayer::new(cfg))
}

async fn serve(mode: Mode, listen: &str) -> Result<(), String> {
    let banner = format!("bench_server ({mode:?})");
    shutdown::serve(app(mode)?, listen, "bench_server", &banner, "").await
}
