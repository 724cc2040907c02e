//! MCP-native limits through the tower API: the tool or prompt of an MCP call
//! from the `Mcp-Method` / `Mcp-Name` headers and from the JSON-RPC body (`McpLayer`),
//! header/body disagreement, and each `[mcp] refusal` form.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use tollgate::{
    Identity, ManualClock, McpBody, McpLayer, MemoryStore, RateLimitConfig, RateLimitLayer,
    ResponseBody, ToolName,
};
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

type Resp = Response<ResponseBody<String>>;

/// Top-level settings of a test go before the tables (`by_user` replaces this one).
const USER: &str = "by_user = \"100/m\"";
const LIMITS: &str = r#"
[by_tool]
search = "2/m"
fetch = "3/m"
[by_prompt]
search = "1/m"
summary = "1/m"
[identity]
user_header = "x-user-id"
"#;

/// The body the inner service saw, per call.
type Seen = Arc<Mutex<Vec<Bytes>>>;

/// A server that records the body it received and answers 200 "served".
fn recorder<B>(
    seen: &Seen,
) -> impl Service<Request<B>, Response = Response<String>, Error = Infallible, Future = impl Send> + Clone
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Debug,
{
    let record = seen.clone();
    service_fn(move |req: Request<B>| {
        let record = record.clone();
        async move {
            let bytes = req.into_body().collect().await.unwrap().to_bytes();
            record.lock().unwrap().push(bytes);
            Ok::<_, Infallible>(Response::new(String::from("served")))
        }
    })
}

/// `extra` is either top-level settings or tables (`[mcp]`), never both.
fn config(extra: &str) -> RateLimitConfig {
    let text = if extra.starts_with('[') {
        format!("{USER}\n{LIMITS}\n{extra}")
    } else if extra.contains("by_user") {
        format!("{extra}\n{LIMITS}")
    } else {
        format!("{USER}\n{extra}\n{LIMITS}")
    };
    RateLimitConfig::from_toml_str(&text).unwrap()
}

fn limiter(cfg: &RateLimitConfig) -> RateLimitLayer {
    RateLimitLayer::with_store(cfg.clone(), MemoryStore::new()).with_clock(ManualClock::new())
}

/// `McpLayer` outside the rate limiter: names from the body and the headers.
fn with_body(
    extra: &str,
) -> (
    impl Service<Request<Full<Bytes>>, Response = Resp, Error = Infallible> + Clone,
    Seen,
) {
    let cfg = config(extra);
    let seen = Seen::default();
    let svc = ServiceBuilder::new()
        .layer(McpLayer::new(&cfg))
        .layer(limiter(&cfg))
        .service(recorder::<McpBody<Full<Bytes>>>(&seen));
    (svc, seen)
}

/// The rate limiter alone: names from the `Mcp-*` headers only.
fn headers_only(
    extra: &str,
) -> (
    impl Service<Request<Full<Bytes>>, Response = Resp, Error = Infallible> + Clone,
    Seen,
) {
    let cfg = config(extra);
    let seen = Seen::default();
    let svc = ServiceBuilder::new()
        .layer(limiter(&cfg))
        .service(recorder::<Full<Bytes>>(&seen));
    (svc, seen)
}

fn rpc(id: Value, method: &str, name: Option<&str>) -> Request<Full<Bytes>> {
    let mut msg = json!({ "jsonrpc": "2.0", "method": method });
    if !id.is_null() || method != "notifications/initialized" {
        msg["id"] = id;
    }
    if let Some(name) = name {
        msg["params"] = json!({ "name": name, "arguments": { "q": "rust" } });
    }
    Request::post("/mcp")
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("x-user-id", "alice")
        .body(Full::new(Bytes::from(msg.to_string())))
        .unwrap()
}

/// A request as a 2026-07-28 client sends it: the body and the mirrored headers.
fn modern(id: Value, method: &str, name: Option<&str>) -> Request<Full<Bytes>> {
    let mut req = rpc(id, method, name);
    let h = req.headers_mut();
    h.insert("mcp-protocol-version", "2026-07-28".parse().unwrap());
    h.insert("mcp-method", method.parse().unwrap());
    if let Some(name) = name {
        h.insert("mcp-name", name.parse().unwrap());
    }
    req
}

async fn send(
    svc: &(impl Service<Request<Full<Bytes>>, Response = Resp, Error = Infallible> + Clone),
    req: Request<Full<Bytes>>,
) -> (Response<()>, Bytes) {
    let resp = svc.clone().oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (Response::from_parts(parts, ()), bytes)
}

fn json_of(bytes: &Bytes) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|e| panic!("{e}: {bytes:?}"))
}

// ---- names from the headers ----

#[tokio::test]
async fn mcp_headers_limit_the_named_tool_without_the_body_layer() {
    let (svc, seen) = headers_only("[mcp]");
    for i in 0..2 {
        let (resp, _) = send(&svc, modern(json!(i), "tools/call", Some("search"))).await;
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let (resp, body) = send(&svc, modern(json!(3), "tools/call", Some("search"))).await;
    // Without McpLayer the `id` is unknown: the HTTP form.
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(json_of(&body)["violated"], json!(["tool"]));
    // Another tool is not limited by search's rule.
    let (resp, _) = send(&svc, modern(json!(4), "tools/call", Some("echo"))).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(seen.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn without_an_mcp_section_the_headers_are_ignored() {
    let (svc, _) = headers_only("");
    for i in 0..5 {
        let (resp, _) = send(&svc, modern(json!(i), "tools/call", Some("search"))).await;
        assert_eq!(resp.status(), StatusCode::OK, "call {i}");
    }
}

#[tokio::test]
async fn a_base64_name_is_decoded_and_normalised() {
    let (svc, _) = headers_only("[mcp]");
    // " Search" (a leading space must travel wrapped), then "SEARCH": both are `search`.
    for (i, raw) in ["=?base64?IFNlYXJjaA==?=", "SEARCH"]
        .into_iter()
        .enumerate()
    {
        let mut req = modern(json!(i), "tools/call", None);
        req.headers_mut().insert("mcp-name", raw.parse().unwrap());
        let (resp, _) = send(&svc, req).await;
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let (resp, _) = send(&svc, modern(json!(9), "tools/call", Some("search"))).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn malformed_or_repeated_mcp_headers_are_an_invalid_identity() {
    let (svc, seen) = headers_only("[mcp]");
    let mut bad = modern(json!(1), "tools/call", None);
    bad.headers_mut()
        .insert("mcp-name", "=?base64?not base64!?=".parse().unwrap());
    let mut twice = modern(json!(2), "tools/call", Some("search"));
    twice
        .headers_mut()
        .append("mcp-name", "echo".parse().unwrap());
    let mut methods = modern(json!(3), "tools/call", Some("search"));
    methods
        .headers_mut()
        .append("mcp-method", "tools/list".parse().unwrap());
    for req in [bad, twice, methods] {
        let (resp, body) = send(&svc, req).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        let body = json_of(&body);
        assert_eq!(body["code"], "INVALID_IDENTITY");
        assert!(!body["detail"].as_str().unwrap().contains("echo"), "{body}");
    }
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn headers_of_a_revision_whose_server_need_not_check_them_are_refused() {
    let (svc, seen) = headers_only("[mcp]");
    for version in [Some("2025-11-25"), None] {
        let mut req = modern(json!(1), "tools/call", Some("echo"));
        match version {
            Some(v) => req
                .headers_mut()
                .insert("mcp-protocol-version", v.parse().unwrap()),
            None => req.headers_mut().remove("mcp-protocol-version"),
        };
        let (resp, body) = send(&svc, req).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert!(json_of(&body)["detail"]
            .as_str()
            .unwrap()
            .contains("MCP-Protocol-Version"));
    }
    assert!(seen.lock().unwrap().is_empty());
    // With McpLayer the body decides, so an older revision's headers are checked instead.
    let (svc, _) = with_body("[mcp]");
    let mut req = modern(json!(1), "tools/call", Some("search"));
    req.headers_mut()
        .insert("mcp-protocol-version", "2025-11-25".parse().unwrap());
    let (resp, _) = send(&svc, req).await;
    assert_eq!(resp.status(), StatusCode::OK);
}

// ---- names from the body ----

#[tokio::test]
async fn the_body_names_the_tool_for_clients_without_the_headers() {
    let (svc, seen) = with_body("");
    for i in 0..2 {
        let (resp, _) = send(&svc, rpc(json!(i), "tools/call", Some(" Search "))).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["x-ratelimit-remaining"], (1 - i).to_string());
    }
    let (resp, body) = send(&svc, rpc(json!(2), "tools/call", Some("search"))).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(json_of(&body)["result"]["isError"], json!(true));
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn prompts_are_limited_by_their_own_table() {
    let (svc, _) = with_body("");
    // The tool `search` does not spend the prompt `search`, nor the other way round.
    let (resp, _) = send(&svc, rpc(json!(1), "tools/call", Some("search"))).await;
    assert_eq!(resp.headers()["x-ratelimit-remaining"], "1");
    let (resp, _) = send(&svc, rpc(json!(2), "prompts/get", Some("search"))).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-ratelimit-remaining"], "0");
    let (resp, body) = send(&svc, rpc(json!(3), "prompts/get", Some("search"))).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body = json_of(&body);
    // prompts/get has no error-shaped result: the JSON-RPC error form, naming the prompt.
    assert_eq!(
        body["error"]["code"],
        json!(tollgate::RATE_LIMIT_ERROR_CODE)
    );
    assert_eq!(body["error"]["data"]["violated"], json!(["prompt"]));
    assert_eq!(body["error"]["data"]["prompt"], "search");
    assert_eq!(body["id"], json!(3));
    let (resp, _) = send(&svc, rpc(json!(4), "tools/call", Some("search"))).await;
    assert_eq!(resp.headers()["x-ratelimit-remaining"], "0");
}

#[tokio::test]
async fn other_methods_and_notifications_get_no_tool_rule() {
    let (svc, seen) = with_body("");
    for i in 0..5 {
        for (method, name) in [
            ("initialize", None),
            ("tools/list", None),
            ("notifications/initialized", None),
            // A name on a method without a name rule is not a tool.
            ("resources/read", Some("search")),
        ] {
            let id = if method.starts_with("notifications/") {
                Value::Null
            } else {
                json!(i)
            };
            let (resp, _) = send(&svc, rpc(id, method, name)).await;
            assert_eq!(resp.status(), StatusCode::OK);
            // Only the user rule (100/m) applies.
            assert_eq!(resp.headers()["x-ratelimit-limit"], "100", "{method}");
        }
    }
    assert_eq!(seen.lock().unwrap().len(), 20);
}

#[tokio::test]
async fn a_batch_or_a_malformed_body_is_passed_on_with_no_tool_rule() {
    let (svc, seen) = with_body("");
    let call = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search"}});
    let bodies = [
        json!([call.clone(), call.clone(), call.clone()]).to_string(),
        format!("{call}garbage"),
        String::from(
            "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":",
        ),
        String::from("\u{0}\u{1}not json at all"),
    ];
    for text in &bodies {
        for _ in 0..3 {
            let mut req = rpc(json!(1), "tools/call", Some("search"));
            *req.body_mut() = Full::new(Bytes::from(text.clone()));
            let (resp, _) = send(&svc, req).await;
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(resp.headers()["x-ratelimit-limit"], "100");
        }
    }
    let seen = seen.lock().unwrap();
    let expected: Vec<Bytes> = bodies
        .iter()
        .flat_map(|b| std::iter::repeat(Bytes::from(b.clone())).take(3))
        .collect();
    assert_eq!(*seen, expected);
}

#[tokio::test]
async fn a_body_over_the_bound_is_passed_on_whole_and_unparsed() {
    let (svc, seen) = with_body("[mcp]\nmax_body = \"1KiB\"");
    let big = "x".repeat(4096);
    for i in 0..3 {
        let req = rpc(json!(i), "tools/call", Some(&big));
        let mut req = req;
        let text = json!({"jsonrpc":"2.0","id":i,"method":"tools/call","params":{"name":"search","arguments":{"pad":big}}}).to_string();
        *req.body_mut() = Full::new(Bytes::from(text));
        let (resp, _) = send(&svc, req).await;
        // Not read, so no tool rule: only the user's.
        assert_eq!(resp.headers()["x-ratelimit-limit"], "100");
    }
    assert!(seen.lock().unwrap().iter().all(|b| b.len() > 4096));
}

#[tokio::test]
async fn non_json_or_non_post_requests_are_not_read() {
    let (svc, seen) = with_body("");
    let call = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search"}})
        .to_string();
    for _ in 0..3 {
        let text = Request::post("/mcp")
            .header("content-type", "text/plain")
            .body(Full::new(Bytes::from(call.clone())))
            .unwrap();
        let get = Request::get("/mcp")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(call.clone())))
            .unwrap();
        for req in [text, get] {
            let (resp, _) = send(&svc, req).await;
            assert_eq!(resp.status(), StatusCode::OK);
        }
    }
    assert_eq!(seen.lock().unwrap().len(), 6);
}

#[tokio::test]
async fn an_apps_tool_name_comes_before_the_mcp_call() {
    let (svc, _) = with_body("");
    for i in 0..4 {
        let mut req = rpc(json!(i), "tools/call", Some("search"));
        req.extensions_mut().insert(ToolName::new("echo"));
        req.extensions_mut().insert(Identity::user("bob"));
        let (resp, _) = send(&svc, req).await;
        assert_eq!(resp.status(), StatusCode::OK);
    }
}

// ---- headers and body together ----

#[tokio::test]
async fn headers_that_disagree_with_the_body_are_refused_before_counting() {
    let (svc, seen) = with_body("");
    let disagreeing = [
        ("tools/call", "echo"),    // the name
        ("tools/list", "search"),  // the method
        ("prompts/get", "search"), // a prompt claimed, a tool called
    ];
    for (method, name) in disagreeing {
        let mut req = modern(json!(1), "tools/call", Some("search"));
        req.headers_mut()
            .insert("mcp-method", method.parse().unwrap());
        req.headers_mut().insert("mcp-name", name.parse().unwrap());
        let (resp, body) = send(&svc, req).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{method} {name}");
        assert_eq!(json_of(&body)["code"], "INVALID_IDENTITY");
    }
    assert!(seen.lock().unwrap().is_empty());
    // Nothing was counted: search still has both of its calls.
    let (resp, _) = send(&svc, modern(json!(2), "tools/call", Some("search"))).await;
    assert_eq!(resp.headers()["x-ratelimit-remaining"], "1");
    // Agreeing headers, base64 included, are fine.
    let mut req = modern(json!(3), "tools/call", Some("search"));
    req.headers_mut()
        .insert("mcp-name", "=?base64?c2VhcmNo?=".parse().unwrap());
    let (resp, _) = send(&svc, req).await;
    assert_eq!(resp.headers()["x-ratelimit-remaining"], "0");
}

#[tokio::test]
async fn in_permissive_mode_a_disagreeing_call_counts_under_the_bodys_tool() {
    let (svc, seen) = with_body("mode = \"permissive\"");
    for _ in 0..3 {
        let mut req = modern(json!(1), "tools/call", Some("search"));
        req.headers_mut()
            .insert("mcp-name", "echo".parse().unwrap());
        let (resp, _) = send(&svc, req).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["x-ratelimit-limit"], "2");
    }
    assert_eq!(seen.lock().unwrap().len(), 3);
}

// ---- refusal forms ----

/// Spends search's two calls, then returns the third call's answer.
async fn refused(extra: &str, id: Value, accept: &str) -> (Response<()>, Bytes) {
    let (svc, seen) = with_body(extra);
    for i in 0..2 {
        send(&svc, rpc(json!(i), "tools/call", Some("search"))).await;
    }
    let mut req = rpc(id, "tools/call", Some("search"));
    req.headers_mut().insert("accept", accept.parse().unwrap());
    let answer = send(&svc, req).await;
    assert_eq!(
        seen.lock().unwrap().len(),
        2,
        "the refused call reached the server"
    );
    answer
}

const BOTH: &str = "application/json, text/event-stream";

#[tokio::test]
async fn tool_error_is_a_tool_result_with_the_id_as_sent() {
    for id in [json!(7), json!("call-7"), json!(null), json!(-1.5e3)] {
        let (resp, body) = refused("", id.clone(), BOTH).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "application/json");
        assert_eq!(resp.headers()["retry-after"], "60");
        assert_eq!(resp.headers()["x-ratelimit-remaining"], "0");
        assert_eq!(resp.headers()["x-ratelimit-limit"], "2");
        let body = json_of(&body);
        assert_eq!(body["id"], id);
        assert_eq!(
            body["result"],
            json!({"content":[{"type":"text","text":"Rate limit exceeded for tool 'search'. Retry after 60 seconds."}],"isError":true})
        );
    }
    // The id's text is echoed byte for byte.
    let (_, body) = refused("", json!(-1.5e3), BOTH).await;
    assert!(
        body.starts_with(br#"{"jsonrpc":"2.0","id":-1500.0,"#),
        "{body:?}"
    );
}

#[tokio::test]
async fn a_2026_07_28_request_gets_a_result_with_its_result_type() {
    let (svc, _) = with_body("");
    for i in 0..2 {
        send(&svc, modern(json!(i), "tools/call", Some("search"))).await;
    }
    let (_, body) = send(&svc, modern(json!(2), "tools/call", Some("search"))).await;
    let body = json_of(&body);
    assert_eq!(body["result"]["resultType"], "complete");
    assert_eq!(body["result"]["isError"], json!(true));
}

#[tokio::test]
async fn jsonrpc_error_carries_the_code_and_what_was_violated() {
    let (resp, body) = refused("[mcp]\nrefusal = \"jsonrpc_error\"", json!("a"), BOTH).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["retry-after"], "60");
    assert_eq!(
        json_of(&body),
        json!({"jsonrpc":"2.0","id":"a","error":{"code":-31429,"message":"Rate limit exceeded",
               "data":{"retry_after":60,"violated":["tool"],"tool":"search"}}})
    );
}

/// `[cost.tools]` prices a `tools/call` whether the tool came from the body or from the
/// `Mcp-Name` header, and the refusal states the cost and what is left.
#[tokio::test]
async fn a_priced_tool_costs_its_price_and_its_refusal_says_so() {
    const PRICED: &str = "[cost.tools]\nfetch = 2\n[cost.prompts]\nsummary = 2";
    async fn spend(
        svc: &(impl Service<Request<Full<Bytes>>, Response = Resp, Error = Infallible> + Clone),
        read: &str,
    ) {
        // fetch has 3 units a minute: one call leaves 1, too few for another.
        let (resp, _) = send(svc, modern(json!(1), "tools/call", Some("fetch"))).await;
        assert_eq!(resp.headers()["x-ratelimit-remaining"], "1", "{read}");
        let (resp, body) = send(svc, modern(json!(2), "tools/call", Some("fetch"))).await;
        assert_eq!(resp.headers()["retry-after"], "60", "{read}");
        let body = json_of(&body);
        if read == "body" {
            assert_eq!(
                body["result"]["content"][0]["text"],
                "Rate limit exceeded for tool 'fetch' (the call costs 2 units; 1 left). \
                 Retry after 60 seconds."
            );
        } else {
            // Without the body the JSON-RPC id is unknown: the problem+json 429.
            assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(
                body["detail"],
                "Rate limit exceeded for tool 'fetch' (the call costs 2 units; 1 left)"
            );
            assert_eq!((&body["cost"], &body["remaining"]), (&json!(2), &json!(1)));
        }
        // A prompt costing more than its whole limit (1/m) can never be fetched.
        let (resp, body) = send(svc, modern(json!(3), "prompts/get", Some("summary"))).await;
        assert!(resp.headers().get("retry-after").is_none(), "{read}");
        let body = json_of(&body);
        if read == "body" {
            assert_eq!(
                body["error"],
                json!({"code":-31429,"message":"Cost exceeds the limit",
                       "data":{"cost":2,"violated":["prompt"],"prompt":"summary"}})
            );
        } else {
            assert_eq!(body["code"], "COST_EXCEEDS_LIMIT");
            assert_eq!(body["prompt"], "summary");
        }
    }
    spend(&with_body(PRICED).0, "body").await;
    // The Mcp-* headers are read with an [mcp] section.
    spend(&headers_only(&format!("{PRICED}\n[mcp]")).0, "headers").await;
    let (svc, _) = with_body(&format!("{PRICED}\n[mcp]\nrefusal = \"jsonrpc_error\""));
    send(&svc, rpc(json!(1), "tools/call", Some("fetch"))).await;
    let (_, body) = send(&svc, rpc(json!(2), "tools/call", Some("fetch"))).await;
    assert_eq!(
        json_of(&body)["error"]["data"],
        json!({"retry_after":60,"cost":2,"remaining":1,"violated":["tool"],"tool":"fetch"})
    );
}

#[tokio::test]
async fn http_refusal_is_the_problem_json_429() {
    let (resp, body) = refused("[mcp]\nrefusal = \"http\"", json!(1), BOTH).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    assert_eq!(resp.headers()["retry-after"], "60");
    assert_eq!(
        json_of(&body)["detail"],
        "Rate limit exceeded for tool 'search'"
    );
}

#[tokio::test]
async fn a_client_accepting_only_the_event_stream_gets_one_message_event() {
    for extra in ["", "[mcp]\nrefusal = \"jsonrpc_error\""] {
        let (resp, body) = refused(extra, json!(5), "text/event-stream").await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        assert_eq!(resp.headers()["retry-after"], "60");
        let text = std::str::from_utf8(&body).unwrap();
        let data = text
            .strip_prefix("event: message\ndata: ")
            .and_then(|t| t.strip_suffix("\n\n"))
            .unwrap_or_else(|| panic!("not one SSE message event: {text:?}"));
        assert!(!data.contains('\n'));
        assert_eq!(
            json_of(&Bytes::copy_from_slice(data.as_bytes()))["id"],
            json!(5)
        );
    }
}

#[tokio::test]
async fn a_user_limit_refusal_says_which_rule_without_the_user() {
    let (svc, _) = with_body("by_user = \"1/m\"");
    let mut req = rpc(json!(1), "tools/call", Some("echo"));
    req.headers_mut()
        .insert("x-user-id", "mallory-the-user".parse().unwrap());
    send(&svc, req).await;
    let mut req = rpc(json!(2), "tools/call", Some("echo"));
    req.headers_mut()
        .insert("x-user-id", "mallory-the-user".parse().unwrap());
    let (resp, body) = send(&svc, req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let text = std::str::from_utf8(&body).unwrap();
    assert!(!text.contains("mallory"), "{text}");
    assert_eq!(
        json_of(&body)["result"]["content"][0]["text"],
        "Rate limit exceeded: user limit of 1/m. Retry after 60 seconds."
    );
}

#[tokio::test]
async fn a_refused_request_without_a_tool_result_gets_the_jsonrpc_error_form() {
    let (svc, _) = with_body("by_user = \"1/m\"");
    send(&svc, rpc(json!(1), "initialize", None)).await;
    let (resp, body) = send(&svc, rpc(json!(2), "tools/list", None)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["retry-after"], "60");
    let body = json_of(&body);
    assert_eq!(body["id"], json!(2));
    assert_eq!(body["error"]["code"], json!(-31429));
    assert_eq!(body["error"]["data"]["violated"], json!(["user"]));
    assert!(body["error"]["data"].get("tool").is_none(), "{body}");
}

#[tokio::test]
async fn a_refused_notification_gets_the_http_answer() {
    let (svc, _) = with_body("by_user = \"1/m\"");
    send(&svc, rpc(json!(1), "tools/list", None)).await;
    let (resp, _) = send(&svc, rpc(Value::Null, "notifications/initialized", None)).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
}

// ---- hostile input ----

mod hostile {
    use super::*;
    use proptest::prelude::*;

    fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(b"tools/call".to_vec()),
            Just(b"prompts/get".to_vec()),
            Just(b"search".to_vec()),
            Just(b"fetch".to_vec()),
            Just(b"=?base64?c2VhcmNo?=".to_vec()),
            "=\\?base64\\?[A-Za-z0-9+/=*]{0,12}\\?=".prop_map(String::into_bytes),
            // Any bytes a header value may hold (visible ASCII, spaces, tabs, obs-text).
            proptest::collection::vec(prop_oneof![0x20u8..0x7f, Just(b'\t'), 0x80u8..=0xff], 0..40),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever the `Mcp-*` headers and the body hold, the answer is the server's (200),
        /// a refusal of the identity (400) or a rate-limit answer, never a panic; and a
        /// call whose body was read is counted only under the tool its body names: never
        /// `search`'s rule (limit 2) for a body naming `fetch` (limit 3), nor the reverse.
        #[test]
        fn hostile_mcp_headers_and_bodies_never_crash_nor_move_counters(
            method in proptest::option::of(header_bytes()),
            name in proptest::option::of(header_bytes()),
            version in proptest::option::of(prop_oneof![
                Just(b"2026-07-28".to_vec()),
                Just(b"2025-11-25".to_vec()),
                header_bytes(),
            ]),
            body_name in prop_oneof![Just("search".to_owned()), Just(" Fetch".to_owned()), "[ -~]{0,12}"],
            body in prop_oneof![
                Just(None),
                proptest::collection::vec(any::<u8>(), 0..200).prop_map(Some),
            ],
            with_layer in any::<bool>(),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let mut req = rpc(json!(1), "tools/call", Some(&body_name));
                let body_is_the_call = body.is_none();
                if let Some(body) = body {
                    *req.body_mut() = Full::new(Bytes::from(body));
                }
                for (header, value) in [("mcp-method", &method), ("mcp-name", &name), ("mcp-protocol-version", &version)] {
                    if let Some(value) = value {
                        if let Ok(value) = http::HeaderValue::from_bytes(value) {
                            req.headers_mut().insert(header, value);
                        }
                    }
                }
                let (status, limit) = if with_layer {
                    let (svc, _) = with_body("[mcp]");
                    let (resp, _) = send(&svc, req).await;
                    (resp.status(), resp.headers().get("x-ratelimit-limit").cloned())
                } else {
                    let (svc, _) = headers_only("[mcp]");
                    let (resp, _) = send(&svc, req).await;
                    (resp.status(), resp.headers().get("x-ratelimit-limit").cloned())
                };
                prop_assert!(
                    [StatusCode::OK, StatusCode::BAD_REQUEST].contains(&status),
                    "{}", status
                );
                // With the call's body read, the only tool rule it can be counted under is
                // the body's own. (An unparsable body falls back to trusted headers, and
                // the server refuses it.)
                if with_layer && body_is_the_call && status == StatusCode::OK {
                    let named = body_name.trim().to_lowercase();
                    match limit.as_ref().and_then(|l| l.to_str().ok()) {
                        Some("2") => prop_assert_eq!(named, "search"),
                        Some("3") => prop_assert_eq!(named, "fetch"),
                        _ => prop_assert!(named != "search" && named != "fetch", "{}", named),
                    }
                }
                Ok(())
            })?;
        }
    }
}

// ---- a store that answers later (as Redis does) ----

/// The memory store's answer, handed back from a future that yields once first, so the
/// rate limiter takes its asynchronous path (the one Redis takes).
#[derive(Debug, Clone, Default)]
struct Later(MemoryStore);

impl tollgate::Store for Later {
    fn check(&self, request: &tollgate::StoreRequest<'_>) -> tollgate::StoreFuture {
        let tollgate::StoreFuture::Ready(answer) = self.0.check(request) else {
            unreachable!("the memory store answers at once")
        };
        tollgate::StoreFuture::Pending(Box::pin(async move {
            tokio::task::yield_now().await;
            answer
        }))
    }
}

#[tokio::test]
async fn after_an_asynchronous_store_the_refusal_is_still_in_mcp_form() {
    let cfg = config("");
    let seen = Seen::default();
    let svc = ServiceBuilder::new()
        .layer(McpLayer::new(&cfg))
        .layer(RateLimitLayer::with_store(cfg, Later::default()).with_clock(ManualClock::new()))
        .service(recorder::<McpBody<Full<Bytes>>>(&seen));
    for i in 0..2 {
        let (resp, _) = send(&svc, rpc(json!(i), "tools/call", Some("search"))).await;
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let (resp, body) = send(&svc, rpc(json!("late"), "tools/call", Some("search"))).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["retry-after"], "60");
    let body = json_of(&body);
    assert_eq!(body["id"], "late");
    assert_eq!(body["result"]["isError"], json!(true));
    // The two allowed calls reached the server with their bodies intact.
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    for (i, body) in seen.iter().enumerate() {
        let sent = rpc(json!(i), "tools/call", Some("search")).into_body();
        let sent = sent.collect().await.unwrap().to_bytes();
        assert_eq!(body, &sent);
    }
}
