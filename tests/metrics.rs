//! Metrics (feature `metrics`; ARCHITECTURE.md, "Metrics"): the values after a scripted
//! sequence, read through `metrics-util`'s debugging recorder, and no label value ever
//! being a user or tenant id.
#![cfg(feature = "metrics")]

mod common;

use common::metrics::{with_recorder, Recorded};
use common::{counting_service, Body};
use http::{Request, StatusCode};
use metrics_util::debugging::DebugValue;
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

fn counter(recorded: &Recorded, name: &str, labels: &[(&str, &str)]) -> u64 {
    let labels = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    match recorded.get(&(name.to_owned(), labels)) {
        Some(DebugValue::Counter(n)) => *n,
        Some(other) => panic!("not a counter: {other:?}"),
        None => 0,
    }
}

/// A store that counts but cannot settle.
#[derive(Debug, Default)]
struct NoSettle(tollgate::MemoryStore);

impl Store for NoSettle {
    fn check(&self, request: &StoreRequest<'_>) -> StoreFuture {
        self.0.check(request)
    }
}

#[test]
fn units_are_counted_charged_and_refunded_per_rule_and_failed_settlements_too() {
    use tollgate::Charge;
    use tower::{service_fn, ServiceBuilder};

    // Each call is settled at the units its `x-used` header says (when it has one).
    async fn send(layer: &RateLimitLayer, req: Request<Body>) -> StatusCode {
        let svc = ServiceBuilder::new()
            .layer(layer.clone())
            .service(service_fn(|req: Request<Body>| async move {
                let used = req
                    .headers()
                    .get("x-used")
                    .map(|v| v.to_str().unwrap().parse());
                if let (Some(charge), Some(used)) = (req.extensions().get::<Charge>(), used) {
                    let _ = charge.settle(used.unwrap()).await;
                }
                Ok::<_, std::convert::Infallible>(http::Response::new(Body::new()))
            }));
        svc.oneshot(req).await.unwrap().status()
    }
    fn used(mut req: Request<Body>, units: u64) -> Request<Body> {
        req.headers_mut().insert("x-used", units.into());
        req
    }
    const TOML: &str = "by_user = \"100/m\"\n[by_tool]\nsummarise = \"1000/m\"\n\
                        [cost.tools]\nsummarise = 50";
    let recorded = with_recorder(async {
        let clock = ManualClock::new();
        let layer = layer(TOML, &clock);
        // Charged 50 under both rules, settled down to 20: 30 back under each.
        let first = used(call("alice", Some("summarise")), 20);
        assert_eq!(send(&layer, first).await, StatusCode::OK);
        // Charged 50, settled up to 70: 20 more under each.
        let second = used(call("bob", Some("summarise")), 70);
        assert_eq!(send(&layer, second).await, StatusCode::OK);
        // An unpriced call without a tool: 1 under the user's rule.
        assert_eq!(send(&layer, call("alice", None)).await, StatusCode::OK);
        // Refused (bob has 30 left of 100): nothing charged.
        let refused = call("bob", Some("summarise"));
        assert_eq!(send(&layer, refused).await, StatusCode::TOO_MANY_REQUESTS);

        // A store that cannot settle: the failure is counted.
        let cfg = RateLimitConfig::from_toml_str(TOML).unwrap();
        let stuck = RateLimitLayer::with_store(cfg, NoSettle::default()).with_clock(clock);
        let third = used(call("carol", Some("summarise")), 10);
        assert_eq!(send(&stuck, third).await, StatusCode::OK);
    });
    let units = |rule, direction| {
        counter(
            &recorded,
            "tollgate_units_total",
            &[("direction", direction), ("rule", rule)],
        )
    };
    // Charged: alice's, bob's and carol's 50 and bob's 20 more under each rule, and the
    // unpriced call under the user's; refunded: alice's 30 (carol's settlement failed).
    assert_eq!(units("user", "charged"), 50 + 20 + 50 + 1 + 50);
    assert_eq!(units("tool", "charged"), 50 + 20 + 50 + 50);
    assert_eq!(units("user", "refunded"), 30);
    assert_eq!(units("tool", "refunded"), 30);
    assert_eq!(
        counter(&recorded, "tollgate_settle_failures_total", &[]),
        1,
        "{recorded:#?}"
    );
}
