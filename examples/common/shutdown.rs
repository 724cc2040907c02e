//! Graceful shutdown for the example servers: resolves on Ctrl-C, or SIGTERM on Unix.
//! Included by `examples/gateway.rs` and `examples/bench_server.rs` with `#[path]`.

/// Resolves on Ctrl-C, or SIGTERM on Unix; in-flight requests then finish. `name`
/// prefixes the messages on stderr.
pub async fn signal(name: &str) {
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
