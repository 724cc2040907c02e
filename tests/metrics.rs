//! Metrics (feature `metrics`; ARCHITECTURE.md, "Metrics"): the values after a scripted
//! sequence, read through `metrics-util`'s debugging recorder, and no label value ever
//! being a user or tenant id.
#![cfg(feature = "metrics")]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{counting_service, Body};
use http::{Request, StatusCode};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tollgate::{
    Identity, ManualClock, RateLimitConfig, RateLimitLayer, Store, StoreError, StoreErrorKind,
    StoreFuture, StoreRequest, ToolName,
};
use tower::ServiceExt;

const USERS: [&str; 3] = ["alice", "bob", "carol"];
const TENANT: &str = "acme";

fn call(user: &str, tool: Option<&str>) -> Request<Body> {
    let mut req = Request::new(Body::new());
    req.extensions_mut().insert(Identity::new(
        Some(user.to_owned()),
        Some(TENANT.to_owned()),
    ));
    if let Some(tool) = tool {
        req.extensions_mut().insert(ToolName::new(tool));
    }
    req
}

fn layer(toml: &str, clock: &ManualClock) -> RateLimitLayer {
    RateLimitLayer::new(RateLimitConfig::from_toml_str(toml).unwrap()).with_clock(clock.clone())
}

async fn status(layer: &RateLimitLayer, req: Request<Body>) -> StatusCode {
    let (svc, _) = counting_service(layer.clone());
    svc.oneshot(req).await.unwrap().status()
}

/// A store that always fails.
#[derive(Debug)]
struct Down;

impl Store for Down {
    fn check(&self, _request: &StoreRequest<'_>) -> StoreFuture {
        StoreFuture::Ready(Err(StoreError::new(StoreErrorKind::Unavailable, "down")))
    }
}

/// Every metric recorded: name and sorted labels → value.
type Recorded = BTreeMap<(String, Vec<(String, String)>), DebugValue>;

fn recorded(snapshotter: &Snapshotter) -> Recorded {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let (_, key) = key.into_parts();
            let mut labels: Vec<(String, String)> = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            ((key.name().to_owned(), labels), value)
        })
        .collect()
}

fn requests(recorded: &Recorded, decision: &str, rule: &str, tool: &str) -> u64 {
    let labels = vec![
        ("decision".to_owned(), decision.to_owned()),
        ("rule".to_owned(), rule.to_owned()),
        ("tool".to_owned(), tool.to_owned()),
    ];
    match recorded.get(&("tollgate_requests_total".to_owned(), labels)) {
        Some(DebugValue::Counter(n)) => *n,
        Some(other) => panic!("not a counter: {other:?}"),
        None => 0,
    }
}

/// Runs `script` on a current-thread runtime with a debugging recorder on this thread.
fn with_recorder(script: impl std::future::Future<Output = ()>) -> Recorded {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || runtime.block_on(script));
    recorded(&snapshotter)
}

#[test]
fn a_scripted_sequence_is_counted_by_decision_rule_and_tool() {
    let recorded = with_recorder(async {
        let clock = ManualClock::new();
        let enforce = layer(
            "by_user = \"5/m\"\n[by_tool]\nsearch = \"1/m\"\n[identity]\nuser_header = \"x-user\"",
            &clock,
        );
        // Allowed: the search call (the tool's counter, at 0 left, speaks) and a call
        // without a tool (the user's).
        assert_eq!(
            status(&enforce, call("alice", Some("Search"))).await,
            StatusCode::OK
        );
        assert_eq!(status(&enforce, call("alice", None)).await, StatusCode::OK);
        // Limited by the tool.
        for user in USERS {
            let refused = status(&enforce, call(user, Some("search"))).await;
            assert_eq!(refused, StatusCode::TOO_MANY_REQUESTS);
        }
        // A tool not configured is no label.
        assert_eq!(
            status(&enforce, call("bob", Some("other"))).await,
            StatusCode::OK
        );
        // An identity header sent twice: 400.
        let mut twice = Request::new(Body::new());
        twice
            .headers_mut()
            .append("x-user", "alice".parse().unwrap());
        twice.headers_mut().append("x-user", "bob".parse().unwrap());
        assert_eq!(status(&enforce, twice).await, StatusCode::BAD_REQUEST);

        // Permissive: over the limit, forwarded.
        let permissive = layer("by_user = \"1/m\"\nmode = \"permissive\"", &clock);
        for _ in 0..3 {
            assert_eq!(
                status(&permissive, call("carol", None)).await,
                StatusCode::OK
            );
        }

        // The store fails: open, then closed.
        let cfg = RateLimitConfig::from_toml_str("by_user = \"1/m\"").unwrap();
        let open = RateLimitLayer::with_store(cfg, Down).with_clock(clock.clone());
        assert_eq!(status(&open, call("alice", None)).await, StatusCode::OK);
        let cfg = RateLimitConfig::from_toml_str("by_user = \"1/m\"\nfail_mode = \"closed\"");
        let closed = RateLimitLayer::with_store(cfg.unwrap(), Down).with_clock(clock.clone());
        assert_eq!(
            status(&closed, call("alice", None)).await,
            StatusCode::SERVICE_UNAVAILABLE
        );
    });

    assert_eq!(requests(&recorded, "allowed", "tool", "search"), 1);
    // alice without a tool, bob's unconfigured tool, and permissive's first call.
    assert_eq!(requests(&recorded, "allowed", "user", ""), 3);
    assert_eq!(requests(&recorded, "limited", "tool", "search"), 3);
    assert_eq!(requests(&recorded, "invalid_identity", "none", ""), 1);
    assert_eq!(requests(&recorded, "shadow_limited", "user", ""), 2);
    assert_eq!(requests(&recorded, "fail_open", "none", ""), 1);
    assert_eq!(requests(&recorded, "fail_closed", "none", ""), 1);
    let total: u64 = recorded
        .iter()
        .filter(|((name, _), _)| name == "tollgate_requests_total")
        .map(|(_, v)| match v {
            DebugValue::Counter(n) => *n,
            _ => 0,
        })
        .sum();
    assert_eq!(total, 12, "{recorded:#?}");

    // Every store call was timed, by backend.
    let latency = |backend: &str| match recorded.get(&(
        "tollgate_store_latency_seconds".to_owned(),
        vec![("backend".to_owned(), backend.to_owned())],
    )) {
        Some(DebugValue::Histogram(samples)) => samples.len(),
        _ => 0,
    };
    // Six enforce calls reach the store (not the 400), and three permissive ones.
    assert_eq!(latency("memory"), 9, "{recorded:#?}");
    assert_eq!(latency("custom"), 2);
}

#[test]
fn no_label_value_is_ever_a_user_or_tenant_id() {
    // Ids that look like label values, separators, and tools named like users.
    let ids = [
        "alice",
        "bob",
        "search",
        "allowed",
        "user",
        "none",
        "a:b{c}=\"d\"",
    ];
    let recorded = with_recorder(async {
        let clock = ManualClock::new();
        let layer = layer(
            "by_user = \"1/m\"\nby_tenant = \"2/m\"\n[by_tool]\nsearch = \"1/m\"\n[by_user_tool]\nsearch = \"1/m\"",
            &clock,
        );
        for id in ids {
            for tool in [None, Some("search"), Some(id)] {
                let mut req = Request::new(Body::new());
                req.extensions_mut().insert(Identity::new(
                    Some(format!("u-{id}")),
                    Some(format!("t-{id}")),
                ));
                if let Some(tool) = tool {
                    req.extensions_mut().insert(ToolName::new(tool));
                }
                status(&layer, req).await;
            }
        }
    });
    let mut values = 0;
    for (name, labels) in recorded.keys() {
        for (label, value) in labels {
            values += 1;
            assert!(
                !value.starts_with("u-") && !value.starts_with("t-"),
                "{name}{{{label}={value:?}}} is an identity"
            );
            // Only a configured tool is ever a tool label.
            if label == "tool" {
                assert!(
                    ["search", ""].contains(&value.as_str()),
                    "tool label {value:?}"
                );
            }
        }
    }
    // Several series: allowed and limited, with and without the tool.
    assert!(values >= 9, "{recorded:#?}");
}

fn gauge(recorded: &Recorded, name: &str) -> Option<f64> {
    match recorded.get(&(name.to_owned(), vec![]))? {
        DebugValue::Gauge(v) => Some(v.into_inner()),
        DebugValue::Counter(n) => Some(*n as f64),
        other => panic!("{name}: {other:?}"),
    }
}

/// The store's figures become gauges, read at most once a second from the request path.
#[test]
fn the_memory_store_reports_its_keys_and_evictions() {
    let recorded = with_recorder(async {
        let clock = ManualClock::new();
        let layer = layer("by_user = \"5/m\"\n[backend]\nmax_keys = 100", &clock);
        for i in 0..300 {
            status(&layer, call(&format!("user-{i}"), None)).await;
        }
        // The first request read the empty store; a second later the next one reads it
        // again.
        clock.advance(Duration::from_millis(1_500));
        status(&layer, call("alice", None)).await;
    });
    let keys = gauge(&recorded, "tollgate_memory_keys").expect("keys");
    assert!((90.0..=100.0).contains(&keys), "{keys}");
    let evictions = gauge(&recorded, "tollgate_memory_evictions_total").expect("evictions");
    assert!(evictions >= 200.0, "{evictions}");
    assert_eq!(
        gauge(&recorded, "tollgate_fallback_answers_total"),
        Some(0.0)
    );
    assert_eq!(gauge(&recorded, "tollgate_circuit_open"), None);
}

/// Redis unreachable: the memory fallback answers, and the gauges say so.
#[cfg(feature = "redis")]
#[test]
fn a_failing_redis_shows_the_fallback_and_the_open_circuit() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let recorded = with_recorder(async move {
        let clock = ManualClock::new();
        let layer = layer(
            &format!(
                "by_user = \"5/m\"\n[backend]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:{port}\""
            ),
            &clock,
        );
        // Each answered by the fallback, which holds the limit of five itself.
        for _ in 0..5 {
            assert_eq!(status(&layer, call("alice", None)).await, StatusCode::OK);
        }
        clock.advance(Duration::from_millis(1_500));
        status(&layer, call("alice", None)).await;
    });
    let answers = gauge(&recorded, "tollgate_fallback_answers_total").expect("fallback");
    assert!(answers >= 5.0, "{recorded:#?}");
    assert_eq!(
        gauge(&recorded, "tollgate_circuit_open"),
        Some(1.0),
        "{recorded:#?}"
    );
    assert_eq!(gauge(&recorded, "tollgate_deny_cache_keys"), Some(0.0));
    assert!(gauge(&recorded, "tollgate_memory_keys").is_some());
}
