//! The example MCP server (`examples/mcp_server.rs`: rmcp, Streamable HTTP, behind
//! tollgate) driven by rmcp's own Streamable HTTP client over a real socket, once at
//! protocol revision 2026-07-28 (the client sends `Mcp-Method` / `Mcp-Name`) and once at
//! 2025-11-25 (it sends only the body).

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/mcp_server.rs"]
mod mcp_server;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::Response;
use http::{HeaderName, HeaderValue, StatusCode};
use rmcp::model::{CallToolRequestParams, ClientConfig, GetPromptRequestParams, ProtocolVersion};
use rmcp::service::RunningService;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{ClientLifecycleMode, ClientServiceExt, RoleClient, ServiceExt};
use serde_json::{json, Value};
use tollgate::RateLimitConfig;

/// One request as the server saw it: its JSON-RPC method (from the body), the `Mcp-Method`
/// and `Mcp-Name` headers, and the `X-RateLimit-Limit` and `-Remaining` of the answer.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    mcp_method: Option<String>,
    mcp_name: Option<String>,
    limit: Option<String>,
    remaining: Option<u64>,
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// The example's app, its requests recorded, on a free loopback port.
async fn start() -> (String, Log) {
    let cfg = RateLimitConfig::from_toml_str(include_str!("../examples/mcp_server.toml")).unwrap();
    let log = Log::default();
    let record = log.clone();
    let app = mcp_server::app(cfg).layer(middleware::from_fn(move |req: Request, next: Next| {
        let record = record.clone();
        async move { recorded(req, next, record).await }
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/mcp"), log)
}

async fn recorded(req: Request, next: Next, log: Log) -> Response {
    let (parts, body) = req.into_parts();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let (mcp_method, mcp_name) = (header("mcp-method"), header("mcp-name"));
    let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    let method = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| v["method"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("({} {})", parts.method, parts.uri.path()));
    let resp = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    let limit = resp
        .headers()
        .get("x-ratelimit-limit")
        .map(|v| v.to_str().unwrap().to_owned());
    let remaining = resp
        .headers()
        .get("x-ratelimit-remaining")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    log.lock().unwrap().push(Seen {
        method,
        mcp_method,
        mcp_name,
        limit,
        remaining,
    });
    resp
}

#[derive(Clone, Copy, Debug)]
enum Revision {
    /// 2026-07-28: `server/discover`, then stateless requests with the `Mcp-*` headers.
    Headers,
    /// 2025-11-25: `initialize`, a session, and only the body.
    BodyOnly,
}

async fn client(
    url: &str,
    user: &str,
    revision: Revision,
) -> RunningService<RoleClient, ClientConfig> {
    let headers = HashMap::from([(
        HeaderName::from_static("x-user-id"),
        HeaderValue::from_str(user).unwrap(),
    )]);
    let transport = StreamableHttpClientTransport::from_config(
        StreamableHttpClientTransportConfig::with_uri(url.to_owned()).custom_headers(headers),
    );
    match revision {
        Revision::Headers => ClientConfig::default()
            .serve_with_lifecycle(
                transport,
                ClientLifecycleMode::Discover {
                    preferred_versions: vec![ProtocolVersion::V_2026_07_28],
                },
            )
            .await
            .unwrap(),
        Revision::BodyOnly => ClientConfig::default()
            .with_protocol_version(ProtocolVersion::V_2025_11_25)
            .serve(transport)
            .await
            .unwrap(),
    }
}

fn call(tool: &str, args: Value) -> CallToolRequestParams {
    CallToolRequestParams::new(tool.to_owned()).with_arguments(args.as_object().unwrap().clone())
}

fn text_of(result: &rmcp::model::CallToolResult) -> String {
    serde_json::to_value(&result.content).unwrap()[0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

async fn sixth_search_is_a_tool_error(revision: Revision) {
    let (url, log) = start().await;
    let alice = client(&url, "alice", revision).await;
    let tools = alice.list_tools(Default::default()).await.unwrap();
    assert_eq!(tools.tools.len(), 4);

    for i in 0..5 {
        let result = alice
            .call_tool(call("search", json!({"query": format!("q{i}")})))
            .await
            .unwrap();
        assert_ne!(result.is_error, Some(true), "search {i}: {result:?}");
    }
    let refused = alice
        .call_tool(call("search", json!({"query": "q5"})))
        .await
        .unwrap();
    assert_eq!(refused.is_error, Some(true), "{refused:?}");
    let text = text_of(&refused);
    assert!(
        text.starts_with("Rate limit exceeded for tool 'search'. Retry after "),
        "{text}"
    );
    let secs: u64 = text
        .trim_start_matches("Rate limit exceeded for tool 'search'. Retry after ")
        .trim_end_matches(" seconds.")
        .parse()
        .unwrap();
    assert!((1..=60).contains(&secs), "{text}");
    assert!(!text.contains("alice"));

    // echo has no tool rule: it keeps working.
    let echoed = alice
        .call_tool(call("echo", json!({"text": "still here"})))
        .await
        .unwrap();
    assert_ne!(echoed.is_error, Some(true));
    assert_eq!(text_of(&echoed), "still here");
    // The prompt has its own table.
    let prompt = alice
        .get_prompt(
            GetPromptRequestParams::new("summary")
                .with_arguments(json!({"topic": "rust"}).as_object().unwrap().clone()),
        )
        .await
        .unwrap();
    assert_eq!(prompt.messages.len(), 1);

    // The tool's limit is shared: another user's search is refused too.
    let bob = client(&url, "bob", revision).await;
    let refused = bob
        .call_tool(call("search", json!({"query": "b"})))
        .await
        .unwrap();
    assert_eq!(refused.is_error, Some(true));
    let fetched = bob
        .call_tool(call("fetch", json!({"url": "http://x"})))
        .await
        .unwrap();
    assert_ne!(fetched.is_error, Some(true));

    alice.cancel().await.unwrap();
    bob.cancel().await.unwrap();

    let log = log.lock().unwrap().clone();
    let searches: Vec<&Seen> = log
        .iter()
        .filter(|s| s.method == "tools/call" && s.limit.as_deref() == Some("5"))
        .collect();
    assert_eq!(searches.len(), 7, "{log:#?}");
    for seen in &log {
        let is_search = seen.method == "tools/call" && seen.limit.as_deref() == Some("5");
        if seen.method == "prompts/get" {
            assert_eq!(seen.limit.as_deref(), Some("10"), "{seen:?}");
        } else if !is_search {
            // initialize, discovery, lists, notifications, echo, fetch, the prompt, the
            // session's GET and DELETE: the user's rule (30/m) speaks, never search's.
            assert_eq!(seen.limit.as_deref(), Some("30"), "{seen:?}");
        }
    }
    let with_headers = log.iter().filter(|s| s.mcp_method.is_some()).count();
    match revision {
        Revision::Headers => {
            assert!(
                log.iter().any(|s| s.mcp_name.as_deref() == Some("search")),
                "{log:#?}"
            );
            assert!(with_headers > 0);
        }
        Revision::BodyOnly => assert_eq!(with_headers, 0, "{log:#?}"),
    }
}

#[tokio::test]
async fn revision_2026_07_28_with_mcp_headers() {
    sixth_search_is_a_tool_error(Revision::Headers).await;
}

#[tokio::test]
async fn revision_2025_11_25_body_only() {
    sixth_search_is_a_tool_error(Revision::BodyOnly).await;
}

/// Headers that disagree with the body: the example (which reads bodies) refuses them
/// before counting; and where tollgate trusts the headers without reading the body, the
/// rmcp server itself refuses them (SEP-2243's mandatory check), so `search` never runs.
#[tokio::test]
async fn disagreeing_headers_never_run_a_tool_counted_as_another() {
    // A stateless 2026-07-28 request carries its revision and capabilities in `_meta`.
    let body = json!({"jsonrpc":"2.0","id":1,"method":"tools/call",
                      "params":{"name":"search","arguments":{"query":"x"},
                                "_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28",
                                         "io.modelcontextprotocol/clientCapabilities":{}}}});
    let post = |url: String, name: &'static str| {
        reqwest::Client::new()
            .post(url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", "tools/call")
            .header("mcp-name", name)
            .header("x-user-id", "mallory")
            .body(body.to_string())
            .send()
    };

    let (url, _) = start().await;
    let resp = post(url, "echo").await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let problem: Value = resp.json().await.unwrap();
    assert_eq!(problem["code"], "INVALID_IDENTITY");

    // The rate limiter alone, trusting the headers: the server refuses the mismatch.
    let cfg = RateLimitConfig::from_toml_str("[by_tool]\nsearch = \"5/m\"\n[mcp]").unwrap();
    let mcp = rmcp::transport::streamable_http_server::StreamableHttpService::new(
        || Ok(mcp_server::Tools::default()),
        rmcp::transport::streamable_http_server::session::local::LocalSessionManager::default()
            .into(),
        Default::default(),
    );
    let app = axum::Router::new().nest_service(
        "/mcp",
        tower::ServiceBuilder::new()
            .layer(tollgate::RateLimitLayer::new(cfg))
            .service(mcp),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let resp = post(format!("http://{addr}/mcp"), "echo").await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let error: Value = resp.json().await.unwrap();
    assert_eq!(error["error"]["code"], -32020, "{error}");
    // The same request with agreeing headers runs: the refusal was the mismatch.
    let resp = post(format!("http://{addr}/mcp"), "search").await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let text = resp.text().await.unwrap();
    assert!(text.contains("3 results for"), "{text}");
}

/// `summarise` is charged its price (20 units of the user's 30) when it starts and settles
/// at the tokens it reports using; a call that no longer fits is refused with a text that
/// states its cost and what is left.
#[tokio::test]
async fn summarise_is_settled_at_the_tokens_it_used() {
    let (url, log) = start().await;
    let alice = client(&url, "alice", Revision::Headers).await;
    let done = alice
        .call_tool(call(
            "summarise",
            json!({"text": "one two three four five six seven"}),
        ))
        .await
        .unwrap();
    assert_ne!(done.is_error, Some(true), "{done:?}");
    assert_eq!(text_of(&done), "one two three four five (12 tokens)");
    let echoed = alice
        .call_tool(call("echo", json!({"text": "x"})))
        .await
        .unwrap();
    assert_ne!(echoed.is_error, Some(true));
    let calls: Vec<u64> = log
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.method == "tools/call")
        .map(|s| s.remaining.expect("rate headers on every call"))
        .collect();
    let [after_estimate, after_echo] = calls[..] else {
        panic!("two tool calls: {calls:?}")
    };
    // Charged 20 up front, settled at 12: 8 came back before the echo took its 1.
    assert_eq!(after_echo, after_estimate + 8 - 1, "{calls:?}");

    // 20 more units do not fit in what is left: the refusal says what it costs.
    let refused = alice
        .call_tool(call("summarise", json!({"text": "again"})))
        .await
        .unwrap();
    assert_eq!(refused.is_error, Some(true), "{refused:?}");
    let text = text_of(&refused);
    let expected = format!(
        "Rate limit exceeded: user limit of 30/m (the call costs 20 units; {after_echo} left). Retry after "
    );
    assert!(text.starts_with(&expected), "{text}");
    alice.cancel().await.unwrap();
}

/// The MCP guide (docs/mcp.md) quotes the example's config whole and the end of its `app`
/// (the layer order) verbatim; the README's "MCP servers" section shows the same placement.
#[test]
fn the_readme_quotes_the_example() {
    let readme = include_str!("../README.md");
    let guide = include_str!("../docs/mcp.md");
    let toml = include_str!("../examples/mcp_server.toml");
    assert!(guide.contains(&format!("```toml\n{toml}```")));
    let source = include_str!("../examples/mcp_server.rs");
    let from = source
        .find("    let limited = ServiceBuilder::new()")
        .expect("the quoted part of app");
    let to = from + source[from..].find("\n}\n").expect("the end of app") + 1;
    // A quote of the example (built and run by these tests), so not a doc test of its own:
    // the pages mark it `ignore` for the doc-test harness that compiles their other blocks.
    let quote = format!("```rust,ignore\n{}```", &source[from..to]);
    assert!(
        guide.contains(&quote),
        "docs/mcp.md does not quote:\n{quote}"
    );
    let placement = ".layer(McpLayer::new(&cfg)).layer(RateLimitLayer::new(cfg))";
    assert!(readme.contains(placement), "the README shows {placement}");
    let lines: Vec<&str> = source[from..to].lines().map(str::trim).collect();
    let mcp = lines
        .iter()
        .position(|l| l.starts_with(".layer(McpLayer::new(&cfg))"))
        .expect("McpLayer in app");
    assert!(lines[mcp + 1].starts_with(".layer(RateLimitLayer::new(cfg))"));
}

/// `cargo run --example mcp_server -- --config FILE --listen ADDR`, as the MCP guide runs it:
/// the real binary, `/healthz`, and the sixth search within a minute refused.
#[tokio::test]
async fn the_example_binary_serves_and_limits() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let exe = std::env::current_exe().unwrap();
    let profile = exe.parent().and_then(|p| p.parent()).unwrap();
    let bin = profile.join("examples").join("mcp_server");
    // Always asked for, so the binary is never older than its sources (a no-op when
    // `cargo test` has just built it).
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .args(["build", "--example", "mcp_server"])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    assert!(
        build.status().unwrap().success(),
        "cargo build --example mcp_server"
    );
    let mut child = Command::new(&bin)
        .args([
            "--config",
            "examples/mcp_server.toml",
            "--listen",
            "127.0.0.1:0",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().unwrap();
    let child = Kill(child);
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    })
    .await
    .unwrap();
    let url = line
        .trim()
        .strip_prefix("tollgate MCP server listening on ")
        .unwrap_or_else(|| panic!("{line:?}"))
        .to_owned();
    let base = url.trim_end_matches("/mcp");
    let http = reqwest::Client::new();
    let health = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let mut last = Value::Null;
    for i in 1..=6 {
        let body = json!({"jsonrpc":"2.0","id":i,"method":"tools/call",
            "params":{"name":"search","arguments":{"query":"rust"},
                      "_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28",
                               "io.modelcontextprotocol/clientCapabilities":{}}}});
        let resp = http
            .post(&url)
            .header("x-user-id", "alice")
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", "tools/call")
            .header("mcp-name", "search")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let text = resp.text().await.unwrap();
        // The server answers in SSE framing, tollgate's refusal in JSON.
        let json = text.trim().trim_start_matches("data: ").trim();
        last = serde_json::from_str(json).unwrap_or(Value::Null);
        if i < 6 {
            assert!(text.contains("3 results for"), "call {i}: {text}");
        }
    }
    assert_eq!(last["result"]["isError"], json!(true), "{last}");
    drop(child);
}

/// A body with a duplicated member gets no tool rule from tollgate (which of the two would
/// the server run?); rmcp's server refuses such a body, so no tool runs uncounted.
#[tokio::test]
async fn a_body_with_a_duplicated_member_runs_no_tool() {
    let (url, _) = start().await;
    let http = reqwest::Client::new();
    let post = |body: Value, session: Option<&str>| {
        let mut req = http
            .post(&url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("x-user-id", "carol")
            .body(body.to_string());
        if let Some(session) = session {
            req = req
                .header("mcp-session-id", session)
                .header("mcp-protocol-version", "2025-06-18");
        }
        req.send()
    };
    let init = post(
        json!({"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18",
               "capabilities":{},"clientInfo":{"name":"test","version":"1"}}}),
        None,
    )
    .await
    .unwrap();
    let session = init.headers()["mcp-session-id"]
        .to_str()
        .unwrap()
        .to_owned();
    drop(init.text().await);
    let ack = post(
        json!({"jsonrpc":"2.0","method":"notifications/initialized"}),
        Some(&session),
    )
    .await
    .unwrap();
    assert_eq!(ack.status(), StatusCode::ACCEPTED);
    // serde_json's `json!` cannot repeat a key: the body is written by hand.
    let duplicated = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"echo","name":"search","arguments":{"text":"x","query":"y"}}}"#;
    let resp = http
        .post(&url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("x-user-id", "carol")
        .header("mcp-session-id", &session)
        .header("mcp-protocol-version", "2025-06-18")
        .body(duplicated)
        .send()
        .await
        .unwrap();
    let text = resp.text().await.unwrap();
    assert!(text.contains("\"error\""), "{text}");
    assert!(
        !text.contains("3 results") && !text.contains("\"result\""),
        "{text}"
    );
}
