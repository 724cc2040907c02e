//! Serving an example's router until Ctrl-C, or SIGTERM on Unix, then finishing in-flight
//! requests. Included by `examples/gateway.rs`, `examples/mcp_server.rs`,
//! `examples/bench_server.rs` and `examples/hyper_server.rs` (which uses only [`bind`] and
//! [`signal`]) with `#[path]`.

use std::net::SocketAddr;

/// Binds `listen`, prints `{banner} listening on http://{addr}{path}` (the one line on
/// stdout: scripts and tests read the port from it), and serves `app` with the peer
/// address in every request (`ConnectInfo<SocketAddr>`) until [`signal`] resolves.
pub async fn serve(
    app: axum::Router,
    listen: &str,
    name: &'static str,
    banner: &str,
    path: &str,
) -> Result<(), String> {
    let listener = bind(listen, banner, path).await?;
    serve_on(listener, app, name).await
}

/// Serves `app` on `listener` as [`serve`] does.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    name: &'static str,
) -> Result<(), String> {
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(signal(name))
    .await
    .map_err(|e| format!("server error: {e}"))
}

/// Binds `listen` and prints `{banner} listening on http://{addr}{path}`, the address
/// actually bound (port 0 picks a free one).
pub async fn bind(
    listen: &str,
    banner: &str,
    path: &str,
) -> Result<tokio::net::TcpListener, String> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let addr: SocketAddr = listener
        .local_addr()
        .map_err(|e| format!("cannot read the bound address: {e}"))?;
    println!("{banner} listening on http://{addr}{path}");
    Ok(listener)
}

/// Resolves on Ctrl-C, or SIGTERM on Unix; in-flight requests then finish. `name`
/// prefixes the messages on stderr.
pub async fn signal(name: &'static str) {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            eprintln!("{name}: cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(e) => {
                eprintln!("{name}: cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    eprintln!("{name}: shutting down (finishing in-flight requests)");
}
