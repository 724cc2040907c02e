//! `rediss://` against a real TLS-only redis-server with certificates made at test time:
//! a private CA through `tls_ca`, the explicit `tls_insecure` opt-out, and certificate
//! errors that show as failures (fallback, 503, a log line), never as silent local limits.
//! ARCHITECTURE.md, behaviour contract item 14.
#![cfg(feature = "redis-tls")]

mod common;

use common::redis_tls::TlsRedis;
use common::{counting_service, Body};
use http::{Request, StatusCode};
use tollgate::{Identity, RateLimitConfig, RateLimitLayer};
use tower::ServiceExt;

fn req(user: &str) -> Request<Body> {
    let mut req = Request::new(Body::new());
    req.extensions_mut().insert(Identity::user(user));
    req
}

fn config(server: &TlsRedis, backend: &str) -> RateLimitConfig {
    RateLimitConfig::from_toml_str(&format!(
        "by_user = \"2/m\"\n[backend]\nkind = \"redis\"\nurl = \"{}\"\nkey_prefix = \"{}\"\ntimeout_ms = 2000\n{backend}",
        server.url(),
        common::redis::fresh_prefix()
    ))
    .unwrap()
}

/// Statuses of three requests by one user (limit 2/m).
async fn three_calls(layer: RateLimitLayer) -> Vec<StatusCode> {
    let (svc, _) = counting_service(layer);
    let mut out = Vec::new();
    for _ in 0..3 {
        out.push(svc.clone().oneshot(req("alice")).await.unwrap().status());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_through_tls_ca_is_trusted() {
    let Some(server) = TlsRedis::start("a_private_ca_through_tls_ca_is_trusted") else {
        return;
    };
    let ca = server.ca_path();
    let layer = RateLimitLayer::new(config(
        &server,
        &format!("tls_ca = {:?}\nfallback = \"none\"\n", ca.to_str().unwrap()),
    ));
    let statuses = three_calls(layer.clone()).await;
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    assert_eq!(layer.stats().store_errors, 0, "{:?}", layer.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_insecure_connects_without_checking_and_says_so() {
    let Some(server) = TlsRedis::start("tls_insecure_connects_without_checking_and_says_so") else {
        return;
    };
    let captured = common::CapturedLogs::start(tracing::Level::WARN);
    let cfg = config(&server, "tls_insecure = true\nfallback = \"none\"\n");
    let layer = RateLimitLayer::new(cfg);
    let logs = captured.text();
    drop(captured);
    assert!(
        logs.contains("tls_insecure = true") && logs.contains("NOT checked"),
        "{logs}"
    );
    let statuses = three_calls(layer.clone()).await;
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    assert_eq!(layer.stats().store_errors, 0);
}

/// A certificate signed by a CA the store does not trust (the wrong `tls_ca`, or the
/// system's roots for a private CA) fails every call: with the fallback, it answers and
/// the circuit opens; with `fallback = "none"` and `fail_mode = "closed"`, 503. Either way
/// the failure is logged and counted, never a quiet fall to per-instance counting.
#[test]
fn an_untrusted_certificate_is_a_visible_failure() {
    let Some(server) = TlsRedis::start("an_untrusted_certificate_is_a_visible_failure") else {
        return;
    };
    let wrong = server.wrong_ca_path();
    let captured = common::CapturedLogs::start(tracing::Level::WARN);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for trust in [format!("tls_ca = {:?}\n", wrong.to_str().unwrap()), String::new()] {
            let layer = RateLimitLayer::new(config(&server, &format!("{trust}fallback = \"memory\"\n")));
            let statuses = three_calls(layer.clone()).await;
            // The fallback answers with the same rules, per instance.
            assert_eq!(
                statuses,
                [StatusCode::OK, StatusCode::OK, StatusCode::TOO_MANY_REQUESTS],
                "{trust}"
            );
            assert_eq!(layer.stats().fallback_answers, 3, "{trust}: {:?}", layer.stats());

            let closed_cfg = RateLimitConfig::from_toml_str(&format!(
                "by_user = \"2/m\"\nfail_mode = \"closed\"\n[backend]\nkind = \"redis\"\nurl = \"{}\"\ntimeout_ms = 2000\nfallback = \"none\"\n{trust}",
                server.url()
            ))
            .unwrap();
            let layer = RateLimitLayer::new(closed_cfg);
            let statuses = three_calls(layer.clone()).await;
            assert!(
                statuses.iter().all(|s| *s == StatusCode::SERVICE_UNAVAILABLE),
                "{trust}: {statuses:?}"
            );
            assert_eq!(layer.stats().fail_closed, 3);
        }
    });
    let logs = captured.text();
    assert!(logs.contains("redis connection failed"), "{logs}");
    assert!(!logs.contains("alice"), "{logs}");
}

#[test]
fn tls_settings_are_checked_at_start_up_each_naming_its_field() {
    let dir = std::env::temp_dir().join(format!("tollgate-tls-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let not_pem = dir.join("not-a-cert.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let cases = [
        (
            "url = \"rediss://127.0.0.1:6380\"\ntls_ca = \"/nonexistent/ca.pem\"".to_owned(),
            "backend.tls_ca: cannot read \"/nonexistent/ca.pem\"",
        ),
        (
            format!(
                "url = \"rediss://127.0.0.1:6380\"\ntls_ca = {:?}",
                not_pem.to_str().unwrap()
            ),
            "holds no PEM certificate",
        ),
        (
            "url = \"redis://127.0.0.1:6379\"\ntls_insecure = true".to_owned(),
            "backend.tls_insecure: only for rediss:// URLs",
        ),
        (
            "url = \"rediss://127.0.0.1:6380\"\ntls_insecure = \"yes\"".to_owned(),
            "backend.tls_insecure: expected true or false, found a string",
        ),
    ];
    for (backend, expected) in cases {
        let err =
            RateLimitConfig::from_toml_str(&format!("[backend]\nkind = \"redis\"\n{backend}"))
                .unwrap_err()
                .to_string();
        assert!(err.contains(expected), "{backend}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
