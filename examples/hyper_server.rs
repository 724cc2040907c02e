//! tollgate on a bare hyper 1 server: no axum, no router. A tokio accept loop serves each
//! connection with hyper's HTTP/1 server through hyper-util's `TowerToHyperService`.
//!
//! ```text
//! cargo run --example hyper_server                         # 5 calls a minute per client address
//! cargo run --example hyper_server -- --config my.toml --listen 127.0.0.1:3002
//!
//! curl -i http://127.0.0.1:3002/
//! ```
//!
//! The tower stack of every connection, outermost first:
//!
//! 1. `map_request` inserts the connection's peer `SocketAddr` into the request's
//!    extensions. That is all `anonymous = "by_ip"` needs: without axum there is no
//!    `ConnectInfo`, and tollgate reads a plain `SocketAddr` extension instead.
//! 2. [`RateLimitLayer`], built once and cloned per connection (clones share every
//!    counter).
//! 3. [`hello`], the handler.
//!
//! Flags: `--config FILE`, `--listen ADDR`, `--help` (see [`USAGE`]).

#[path = "common/cli.rs"]
mod cli;
#[path = "common/flags.rs"]
mod flags;
// Only `bind` and `signal`: its `serve` is for axum routers.
#[allow(dead_code)]
#[path = "common/shutdown.rs"]
mod shutdown;

use std::convert::Infallible;
use std::process::ExitCode;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tollgate::{RateLimitConfig, RateLimitLayer};
use tower::ServiceBuilder;

const USAGE: &str = "\
tollgate example on plain hyper: GET / says hello, rate-limited per client address.

USAGE:
    hyper_server [--config FILE] [--listen ADDR]

OPTIONS:
    --config FILE   TOML rate-limit config. Without it:
                      by_user = \"5/m\", anonymous = \"by_ip\"
    --listen ADDR   address to listen on [default: 127.0.0.1:3002]; port 0 picks a free
                    port, and the address actually bound is printed
    -h, --help      print this help

Every request carries its peer address as a SocketAddr extension, so callers (all
anonymous here) are counted per client address. Stop with Ctrl-C or SIGTERM (graceful
shutdown).";

/// The limits used without `--config`: every caller is anonymous, so each client address
/// gets five calls a minute.
const DEFAULT_CONFIG: &str = r#"
by_user = "5/m"
anonymous = "by_ip"
"#;

/// How long shutdown waits for in-flight requests before giving up on them.
const DRAIN: Duration = Duration::from_secs(10);

const CLI: cli::Cli = cli::Cli {
    name: "hyper_server",
    usage: USAGE,
    default_config: (DEFAULT_CONFIG, "the embedded default config"),
    default_listen: "127.0.0.1:3002",
    admin: false,
};

fn main() -> ExitCode {
    CLI.main(|cfg, args| async move { serve(cfg, &args.listen).await })
}

async fn serve(cfg: RateLimitConfig, listen: &str) -> Result<(), String> {
    // Built inside the runtime: a Redis backend may spawn its connection tasks here.
    let limiter = RateLimitLayer::new(cfg);
    let listener = shutdown::bind(listen, "tollgate hyper_server", "").await?;
    let graceful = GracefulShutdown::new();
    let stop = shutdown::signal("hyper_server");
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait, then accept again.
                    eprintln!("hyper_server: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let svc = ServiceBuilder::new()
            .map_request(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(peer);
                req
            })
            .layer(limiter.clone())
            .service_fn(hello);
        // hyper drops a connection that has not sent its headers within 30 s, once it has
        // a timer.
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                eprintln!("hyper_server: connection from a client ended: {e}");
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => eprintln!("hyper_server: shut down cleanly"),
        () = tokio::time::sleep(DRAIN) => {
            eprintln!("hyper_server: gave up on in-flight requests after {DRAIN:?}");
        }
    }
    Ok(())
}

/// The handler: tollgate has already let the request through when this runs.
async fn hello(_req: Request<Incoming>) -> Result<Response<String>, Infallible> {
    Ok(Response::new("hello\n".to_owned()))
}
