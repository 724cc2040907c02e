//! ARCHITECTURE.md, behaviour contract item 19: budgets in units. A call costs its
//! `Cost`, its cost header or its tool's `[cost]` price (else 1); it is allowed only if
//! every rule has that many units left, and then counted under every one; one that costs
//! more than a rule's whole limit is refused for good; its real cost is settled after it
//! ran. Run against every store through the tower API, with a `ManualClock`, for each
//! algorithm.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use common::{eventually, Backend};
use http::{Request, Response, StatusCode};
use tollgate::{
    Algorithm, Charge, Cost, Decision, Identity, ManualClock, RateLimitConfig, RateLimitLayer,
    ResponseBody, Settle, ToolName,
};
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

type Body = String;
type Resp = Response<ResponseBody<Body>>;

const ALGORITHMS: [Algorithm; 3] = [
    Algorithm::FixedWindow,
    Algorithm::SlidingWindow,
    Algorithm::TokenBucket,
];

/// What the handler does with the call's charge: settle it at this many units (awaiting
/// the store), settle twice, return a `Settle`, or nothing.
#[derive(Clone, Copy, Debug)]
enum Then {
    Nothing,
    Settle(u64),
    SettleTwice(u64, u64),
    Respond(u64),
}

/// `toml` under `alg`, with `[cost]` (budgets in units: calls' `Cost` and cost header are
/// read, and each carries a `Charge`) unless it configures its own.
fn cfg(alg: Algorithm, toml: &str) -> RateLimitConfig {
    let cost = if toml.contains("[cost") {
        ""
    } else {
        "\n[cost]"
    };
    RateLimitConfig::from_toml_str(&format!("algorithm = \"{}\"\n{toml}{cost}", alg.as_str()))
        .unwrap()
}

/// A service behind `layer` whose handler settles as each request's `Then` says.
fn service(
    layer: RateLimitLayer,
) -> impl Service<Request<Body>, Response = Resp, Error = Infallible, Future = impl Send> + Clone {
    ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(|req: Request<Body>| async move {
            let then = req
                .extensions()
                .get::<Then>()
                .copied()
                .unwrap_or(Then::Nothing);
            let charge = req.extensions().get::<Charge>().cloned();
            let mut resp = Response::new(Body::from("ok"));
            match (then, charge) {
                (Then::Settle(units), Some(charge)) => {
                    charge.settle(units).await.expect("settled");
                }
                (Then::SettleTwice(first, second), Some(charge)) => {
                    charge.settle(first).await.expect("settled");
                    assert!(charge.is_settled());
                    charge.settle(second).await.expect("ignored");
                }
                (Then::Respond(units), _) => {
                    resp.extensions_mut().insert(Settle(units));
                }
                _ => {}
            }
            Ok::<_, Infallible>(resp)
        }))
}

fn call(user: &str, tool: &str, cost: Option<u64>, then: Then) -> Request<Body> {
    let mut req = Request::new(Body::new());
    req.extensions_mut()
        .insert(Identity::user(user).with_tenant("acme"));
    req.extensions_mut().insert(ToolName::new(tool));
    if let Some(units) = cost {
        req.extensions_mut().insert(Cost(units));
    }
    req.extensions_mut().insert(then);
    req
}

async fn send<S>(svc: &S, req: Request<Body>) -> Resp
where
    S: Service<Request<Body>, Response = Resp, Error = Infallible> + Clone,
{
    svc.clone().oneshot(req).await.unwrap()
}

fn decision(resp: &Resp) -> Decision {
    *resp.extensions().get::<Decision>().expect("a decision")
}

fn remaining(resp: &Resp) -> u64 {
    decision(resp).remaining().expect("a rule speaks")
}

/// What `rule` (a one-rule config sharing the store) has left for `user` calling `tool`,
/// asked with a free call.
async fn left_for(
    b: &dyn Backend,
    clock: &ManualClock,
    alg: Algorithm,
    rule: &str,
    user: &str,
    tool: &str,
) -> u64 {
    let svc = service(b.layer(cfg(alg, rule), clock));
    let resp = send(&svc, call(user, tool, Some(0), Then::Nothing)).await;
    assert_eq!(resp.status(), StatusCode::OK, "a free call always passes");
    remaining(&resp)
}

/// [`left_for`] a call of no particular tool.
async fn left(b: &dyn Backend, clock: &ManualClock, alg: Algorithm, rule: &str, user: &str) -> u64 {
    left_for(b, clock, alg, rule, user, "probe").await
}

// ---- the cases ----

/// A priced tool drains the user's budget by its price; another tool costs one unit.
async fn a_priced_tool_drains_the_budget_by_its_price(b: &dyn Backend) {
    for alg in ALGORITHMS {
        let clock = ManualClock::new();
        let user = format!("drain-{alg}");
        let config = "by_user = \"100/m\"\n[cost.tools]\nsearch = 10";
        let svc = service(b.layer(cfg(alg, config), &clock));
        for i in 1..=10 {
            let resp = send(&svc, call(&user, "search", None, Then::Nothing)).await;
            assert_eq!(resp.status(), StatusCode::OK, "{alg} call {i}");
            assert_eq!(remaining(&resp), 100 - 10 * i, "{alg} call {i}");
            assert_eq!(decision(&resp).cost(), 10);
            assert_eq!(
                resp.headers()["x-ratelimit-remaining"],
                (100 - 10 * i).to_string().as_str()
            );
        }
        let refused = send(&svc, call(&user, "search", None, Then::Nothing)).await;
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS, "{alg}");
        // The IETF header states units too.
        let ietf = service(b.layer(cfg(alg, &format!("headers = \"ietf\"\n{config}")), &clock));
        let other = format!("ietf-{alg}");
        let resp = send(&ietf, call(&other, "search", None, Then::Nothing)).await;
        let current = resp.headers()["ratelimit"].to_str().unwrap();
        assert!(current.starts_with("\"user\";r=90;"), "{alg}: {current}");
        // An unpriced tool costs one unit.
        let cheap = send(&ietf, call(&other, "fetch", None, Then::Nothing)).await;
        assert_eq!(remaining(&cheap), 89, "{alg}");
    }
}

/// A call that does not fit one rule is refused and counted under none: the user, the
/// tenant and the tool keep exactly what they had.
async fn a_refused_expensive_call_leaves_every_rule_untouched(b: &dyn Backend) {
    for alg in ALGORITHMS {
        let clock = ManualClock::new();
        let user = format!("thrifty-{alg}");
        let rules = [
            "by_user = \"100/m\"",
            "by_tenant = \"1000/m\"",
            "[by_tool]\nsummarise = \"500/m\"",
        ];
        let svc = service(b.layer(cfg(alg, &rules.join("\n")), &clock));
        let spent = send(&svc, call(&user, "summarise", Some(50), Then::Nothing)).await;
        assert_eq!(spent.status(), StatusCode::OK, "{alg}");
        let refused = send(&svc, call(&user, "summarise", Some(60), Then::Nothing)).await;
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS, "{alg}");
        assert_eq!(
            decision(&refused).violated().collect::<Vec<_>>(),
            [tollgate::RuleKind::User]
        );
        assert_eq!(remaining(&refused), 50, "{alg}: what is left, in units");
        let body: serde_json::Value = serde_json::from_slice(
            &http_body_util::BodyExt::collect(refused.into_body())
                .await
                .unwrap()
                .to_bytes(),
        )
        .unwrap();
        assert_eq!(body["code"], "RATE_LIMIT");
        assert_eq!(body["cost"], 60);
        assert_eq!(body["remaining"], 50);
        assert_eq!(
            left(b, &clock, alg, rules[0], &user).await,
            50,
            "{alg} user"
        );
        assert_eq!(
            left(b, &clock, alg, rules[1], &user).await,
            950,
            "{alg} tenant"
        );
        assert_eq!(
            left_for(b, &clock, alg, rules[2], &user, "summarise").await,
            450,
            "{alg} tool"
        );
    }
}

/// The wait a refusal states is exactly when `c` units are there again: one microsecond
/// earlier the call is still refused, then it passes.
async fn retry_after_is_exact_for_the_cost(b: &dyn Backend) {
    for alg in ALGORITHMS {
        for cost in [3, 7] {
            let clock = ManualClock::new();
            let user = format!("patient-{alg}-{cost}");
            let svc = service(b.layer(cfg(alg, "by_user = \"10/m\""), &clock));
            // Spend 8 of 10, a few seconds into the period.
            clock.advance(Duration::from_millis(2_345));
            assert_eq!(
                send(&svc, call(&user, "x", Some(8), Then::Nothing))
                    .await
                    .status(),
                StatusCode::OK
            );
            clock.advance(Duration::from_millis(1_000));
            let refused = send(&svc, call(&user, "x", Some(cost), Then::Nothing)).await;
            assert_eq!(
                refused.status(),
                StatusCode::TOO_MANY_REQUESTS,
                "{alg} cost {cost}"
            );
            let wait = decision(&refused).retry_after().expect("a wait");
            assert!(refused.headers().contains_key("retry-after"));
            clock.advance(wait - Duration::from_micros(1));
            let early = send(&svc, call(&user, "x", Some(cost), Then::Nothing)).await;
            assert_eq!(
                early.status(),
                StatusCode::TOO_MANY_REQUESTS,
                "{alg} cost {cost} early"
            );
            clock.advance(Duration::from_micros(1));
            let on_time = send(&svc, call(&user, "x", Some(cost), Then::Nothing)).await;
            assert_eq!(
                on_time.status(),
                StatusCode::OK,
                "{alg} cost {cost} on time"
            );
        }
    }
}

/// A call that costs more than a rule's whole limit can never fit: `COST_EXCEEDS_LIMIT`,
/// no `Retry-After`, nothing counted.
async fn a_cost_above_the_limit_is_refused_without_a_wait(b: &dyn Backend) {
    for alg in ALGORITHMS {
        let clock = ManualClock::new();
        let user = format!("greedy-{alg}");
        let svc = service(b.layer(
            cfg(alg, "by_user = \"100/h\"\nby_tenant = \"5000/h\""),
            &clock,
        ));
        let refused = send(&svc, call(&user, "x", Some(101), Then::Nothing)).await;
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS, "{alg}");
        assert!(refused.headers().get("retry-after").is_none(), "{alg}");
        let d = decision(&refused);
        assert!(d.exceeds_limit() && d.retry_after().is_none(), "{alg}");
        assert_eq!(d.rule(), Some(tollgate::RuleKind::User));
        let body: serde_json::Value = serde_json::from_slice(
            &http_body_util::BodyExt::collect(refused.into_body())
                .await
                .unwrap()
                .to_bytes(),
        )
        .unwrap();
        assert_eq!(body["code"], "COST_EXCEEDS_LIMIT");
        assert_eq!(
            body["detail"],
            "Rate limit exceeded: user limit of 100/h (the call costs 101 units, more than \
             the whole limit: retrying cannot help)"
        );
        assert_eq!(
            (body["cost"].as_u64(), body["limit"].as_u64()),
            (Some(101), Some(100))
        );
        assert!(body.get("retry_after").is_none(), "{body}");
        // Nothing was counted: the whole budget is still there.
        assert_eq!(
            left(b, &clock, alg, "by_user = \"100/h\"", &user).await,
            100,
            "{alg}"
        );
        // Exactly the limit fits.
        let whole = send(&svc, call(&user, "x", Some(100), Then::Nothing)).await;
        assert_eq!(whole.status(), StatusCode::OK, "{alg}");
    }
}

/// Settling after the call charges the difference from its estimate, up or down; a second
/// settle is ignored; a charge dropped unsettled keeps the estimate; a `Settle` in the
/// response settles too.
async fn settling_charges_the_difference(b: &dyn Backend) {
    for alg in ALGORITHMS {
        let clock = ManualClock::new();
        let rule = "by_user = \"1000/h\"\n[cost.tools]\nsummarise = 100";
        let svc = service(b.layer(cfg(alg, rule), &clock));
        let user = |case: &str| format!("{case}-{alg}");
        for (case, then, left_after) in [
            ("up", Then::Settle(250), 750),
            ("down", Then::Settle(30), 970),
            ("twice", Then::SettleTwice(40, 400), 960),
            ("dropped", Then::Nothing, 900),
            ("response", Then::Respond(10), 990),
            ("free", Then::Settle(0), 1000),
        ] {
            let resp = send(&svc, call(&user(case), "summarise", None, then)).await;
            assert_eq!(resp.status(), StatusCode::OK, "{alg} {case}");
            assert_eq!(
                remaining(&resp),
                900,
                "{alg} {case}: charged the estimate first"
            );
            let seen = eventually(
                || async { left(b, &clock, alg, "by_user = \"1000/h\"", &user(case)).await },
                left_after,
            )
            .await;
            assert_eq!(seen, left_after, "{alg} {case}");
        }
    }
}

/// An actual cost above what is left still counts: the rule is in debt (remaining 0),
/// every later call is refused until the window, the slide or the refill has paid it off.
async fn debt_is_paid_off_over_time(b: &dyn Backend) {
    for alg in ALGORITHMS {
        let clock = ManualClock::new();
        let user = format!("indebted-{alg}");
        // `[cost]` puts a `Charge` in every forwarded request.
        let svc = service(b.layer(cfg(alg, "by_user = \"100/m\"\n[cost]"), &clock));
        let first = send(&svc, call(&user, "x", Some(60), Then::Settle(150))).await;
        assert_eq!(first.status(), StatusCode::OK);
        let refused = send(&svc, call(&user, "x", Some(1), Then::Nothing)).await;
        assert_eq!(
            refused.status(),
            StatusCode::TOO_MANY_REQUESTS,
            "{alg}: in debt"
        );
        assert_eq!(remaining(&refused), 0, "{alg}");
        // Waiting what the refusal says is enough, whatever the algorithm.
        let wait = decision(&refused).retry_after().unwrap();
        assert!(
            wait > Duration::from_secs(30),
            "{alg}: {wait:?} pays off a debt of 50"
        );
        clock.advance(wait);
        let paid = send(&svc, call(&user, "x", Some(1), Then::Nothing)).await;
        assert_eq!(paid.status(), StatusCode::OK, "{alg}: paid off");
        // At most twice the limit in one period, however far in debt.
        clock.advance(Duration::from_secs(600));
        let huge = send(&svc, call(&user, "x", Some(100), Then::Settle(1_000_000))).await;
        assert_eq!(huge.status(), StatusCode::OK);
        let refused = send(&svc, call(&user, "x", Some(1), Then::Nothing)).await;
        assert!(
            decision(&refused).retry_after().unwrap() <= Duration::from_secs(120),
            "{alg}"
        );
    }
}

/// A free call (cost 0) always passes and counts nowhere.
async fn a_free_call_counts_nowhere(b: &dyn Backend) {
    for alg in ALGORITHMS {
        let clock = ManualClock::new();
        let user = format!("free-{alg}");
        let svc = service(b.layer(
            cfg(alg, "by_user = \"2/m\"\n[cost.tools]\necho = 0"),
            &clock,
        ));
        for _ in 0..5 {
            let resp = send(&svc, call(&user, "echo", None, Then::Nothing)).await;
            assert_eq!(resp.status(), StatusCode::OK, "{alg}");
            assert_eq!(remaining(&resp), 2, "{alg}");
        }
        for _ in 0..2 {
            assert_eq!(
                send(&svc, call(&user, "x", None, Then::Nothing))
                    .await
                    .status(),
                StatusCode::OK
            );
        }
        assert_eq!(
            send(&svc, call(&user, "x", None, Then::Nothing))
                .await
                .status(),
            StatusCode::TOO_MANY_REQUESTS,
            "{alg}"
        );
        // Even a user with nothing left may call a free tool.
        assert_eq!(
            send(&svc, call(&user, "echo", None, Then::Nothing))
                .await
                .status(),
            StatusCode::OK
        );
    }
}

/// Concurrent calls of mixed costs: the admitted ones cost at most the limit in total and
/// are counted exactly; on one rule, a call is refused only if it did not fit (what was
/// left at the end, never more than when it was refused, is less than its cost). Two
/// rules together admit no more than either allows.
async fn concurrent_mixed_costs_admit_only_what_fits(b: &dyn Backend) {
    // A fixed spread of costs from 1 to 9 (no randomness to reproduce).
    let costs: Vec<u64> = (0..60u64).map(|i| 1 + (i * 7 + i / 3) % 9).collect();
    for alg in ALGORITHMS {
        let clock = ManualClock::new();
        for (rules, user) in [
            ("by_user = \"100/m\"", format!("mixed-{alg}")),
            (
                "by_user = \"100/m\"\nby_tenant = \"150/m\"",
                format!("mixed2-{alg}"),
            ),
        ] {
            let svc = service(b.layer(cfg(alg, rules), &clock));
            let tasks: Vec<_> = costs
                .iter()
                .map(|&cost| {
                    let svc = svc.clone();
                    let req = call(&user, "x", Some(cost), Then::Nothing);
                    tokio::spawn(async move { (cost, svc.oneshot(req).await.unwrap().status()) })
                })
                .collect();
            let (mut admitted, mut refused) = (0, Vec::new());
            for task in tasks {
                match task.await.unwrap() {
                    (cost, StatusCode::OK) => admitted += cost,
                    (cost, status) => {
                        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{alg}");
                        refused.push(cost);
                    }
                }
            }
            assert!(admitted <= 100, "{alg} {rules}: {admitted} units admitted");
            assert!(!refused.is_empty(), "{alg}: 60 calls cost more than 100");
            let left = left(b, &clock, alg, "by_user = \"100/m\"", &user).await;
            if rules.contains("by_tenant") {
                // On a cluster the two rules sit on two slots, and a refused call's
                // reservation may not be given back exactly (ARCHITECTURE.md, "Redis
                // Cluster"): strict, never lenient.
                assert!(left <= 100 - admitted, "{alg} {rules}: {left} left");
            } else {
                assert_eq!(left, 100 - admitted, "{alg} {rules}: counted exactly");
                for cost in refused {
                    assert!(
                        cost > left,
                        "{alg}: a call of {cost} was refused with {left} left"
                    );
                }
            }
        }
    }
}

common::suite!(
    a_priced_tool_drains_the_budget_by_its_price,
    a_refused_expensive_call_leaves_every_rule_untouched,
    retry_after_is_exact_for_the_cost,
    a_cost_above_the_limit_is_refused_without_a_wait,
    settling_charges_the_difference,
    debt_is_paid_off_over_time,
    a_free_call_counts_nowhere,
    concurrent_mixed_costs_admit_only_what_fits,
);

/// A cost header (`[identity] cost_header`) sets a call's cost when the request has no
/// `Cost`; a value that is not a whole number of units, or a header sent twice, is a 400
/// (never a silent cost of 1).
#[tokio::test]
async fn the_cost_header_is_read_and_bad_values_are_refused() {
    let clock = ManualClock::new();
    let config =
        "by_user = \"100/m\"\n[identity]\nuser_header = \"x-user-id\"\ncost_header = \"x-cost\"";
    let svc = service(common::Memory::default().layer(cfg(Algorithm::FixedWindow, config), &clock));
    let with = |values: &[&str]| {
        let mut req = Request::new(Body::new());
        req.headers_mut()
            .insert("x-user-id", http::HeaderValue::from_static("hal"));
        for v in values {
            req.headers_mut()
                .append("x-cost", http::HeaderValue::from_str(v).unwrap());
        }
        req
    };
    let ok = send(&svc, with(&[" 40 "])).await;
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(remaining(&ok), 60);
    for bad in [
        &["forty"][..],
        &["-1"],
        &["1.5"],
        &["12345678901234567890"],
        &["1", "2"],
    ] {
        let refused = send(&svc, with(bad)).await;
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST, "{bad:?}");
        let body = http_body_util::BodyExt::collect(refused.into_body())
            .await
            .unwrap()
            .to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["code"], "INVALID_IDENTITY", "{bad:?}");
        assert!(
            body["detail"].as_str().unwrap().contains("cost header"),
            "{body}"
        );
    }
    // The application's `Cost` wins over the header.
    let mut req = with(&["90"]);
    req.extensions_mut().insert(Cost(5));
    assert_eq!(remaining(&send(&svc, req).await), 55);
}

/// A priced MCP prompt costs its price (`[cost.prompts]`), with or without a rule of its
/// own.
#[tokio::test]
async fn a_priced_prompt_costs_its_price() {
    let clock = ManualClock::new();
    let config = "by_user = \"100/m\"\n[cost.prompts]\nsummary = 25\n[mcp]";
    let svc = service(common::Memory::default().layer(cfg(Algorithm::FixedWindow, config), &clock));
    let prompt = || {
        let mut req = Request::new(Body::new());
        req.extensions_mut().insert(Identity::user("pam"));
        for (name, value) in [
            ("mcp-protocol-version", "2026-07-28"),
            ("mcp-method", "prompts/get"),
            ("mcp-name", "Summary"),
        ] {
            req.headers_mut()
                .insert(name, http::HeaderValue::from_static(value));
        }
        req
    };
    assert_eq!(remaining(&send(&svc, prompt()).await), 75);
    assert_eq!(remaining(&send(&svc, prompt()).await), 50);
}

/// Redis: a costed check is still one script call, a settlement one more.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_checks_costed_calls_in_one_round_trip_and_settles_in_one_more() {
    let Some(server) = common::redis::RedisServer::private("redis_checks_costed_calls") else {
        return;
    };
    let mut conn = server.conn().await;
    let store = common::redis::caller_time_store(server.url(), &common::redis::fresh_prefix());
    let clock = ManualClock::new();
    let config = "by_user = \"1000/m\"\nby_tenant = \"5000/m\"\n[by_tool]\nsearch = \"800/m\"\n[cost.tools]\nsearch = 30";
    let layer = RateLimitLayer::with_store(cfg(Algorithm::SlidingWindow, config), store)
        .with_clock(clock.clone());
    let svc = service(layer);
    // The first check and the first settlement load their scripts (NOSCRIPT, then the
    // call again).
    let first = send(&svc, call("warm", "fetch", None, Then::Settle(2))).await;
    assert_eq!(first.status(), StatusCode::OK);
    let before = common::redis::command_calls(&mut conn, "evalsha").await;
    for i in 0..10u64 {
        let resp = send(&svc, call("rob", "search", None, Then::Nothing)).await;
        assert_eq!(remaining(&resp), 800 - 30 * (i + 1));
    }
    assert_eq!(
        common::redis::command_calls(&mut conn, "evalsha").await - before,
        10,
        "one script call per costed check of three rules"
    );
    let settled = send(&svc, call("rob", "search", None, Then::Settle(5))).await;
    assert_eq!(settled.status(), StatusCode::OK);
    assert_eq!(
        common::redis::command_calls(&mut conn, "evalsha").await - before,
        12,
        "the check, and one call for the settlement"
    );
    let after = send(&svc, call("rob", "search", None, Then::Nothing)).await;
    assert_eq!(remaining(&after), 800 - 30 * 10 - 5 - 30);
}

/// A call the memory fallback counted (Redis down) is settled in the fallback.
#[cfg(feature = "redis")]
#[tokio::test]
async fn a_call_the_fallback_counted_settles_there() {
    let redis = tollgate::RedisStore::builder("redis://127.0.0.1:1/0")
        .timeout(Duration::from_millis(20))
        .build()
        .unwrap();
    let store = tollgate::FallbackStore::new(redis, Some(tollgate::MemoryStore::new()));
    let clock = ManualClock::new();
    let layer = RateLimitLayer::with_store(
        cfg(Algorithm::FixedWindow, "by_user = \"100/m\"\n[cost]"),
        store,
    )
    .with_clock(clock.clone());
    let svc = service(layer.clone());
    let first = send(&svc, call("fay", "x", Some(50), Then::Settle(10))).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(remaining(&first), 50);
    let next = send(&svc, call("fay", "x", Some(1), Then::Nothing)).await;
    assert_eq!(remaining(&next), 89, "charged 10, not 50");
    assert_eq!(layer.stats().settle_failures, 0);
}

/// A store that cannot settle keeps the estimate, and the failure is counted.
#[tokio::test]
async fn a_store_that_cannot_settle_keeps_the_estimate_and_counts_the_failure() {
    #[derive(Debug, Default)]
    struct NoSettle(tollgate::MemoryStore);
    impl tollgate::Store for NoSettle {
        fn check(&self, request: &tollgate::StoreRequest<'_>) -> tollgate::StoreFuture {
            self.0.check(request)
        }
    }
    let clock = ManualClock::new();
    let layer = RateLimitLayer::with_store(
        cfg(Algorithm::FixedWindow, "by_user = \"100/m\"\n[cost]"),
        NoSettle::default(),
    )
    .with_clock(clock.clone());
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(service_fn(|req: Request<Body>| async move {
            let charge = req.extensions().get::<Charge>().unwrap().clone();
            if charge.estimate() == 40 {
                assert!(charge.settle(1).await.is_err());
            }
            Ok::<_, Infallible>(Response::new(Body::new()))
        }));
    assert_eq!(
        send(&svc, call("gus", "x", Some(40), Then::Nothing))
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(layer.stats().settle_failures, 1);
    let next = send(&svc, call("gus", "x", Some(1), Then::Nothing)).await;
    assert_eq!(remaining(&next), 59);
}
