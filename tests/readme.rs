//! Every TOML snippet in README.md and in the guides under docs/ is a valid configuration,
//! as written: a new user's first try is a copied snippet. (A snippet naming a CA file on
//! the reader's machine, `backend.tls_ca`, may only fail because that file is not on this
//! one; the README's Cargo `[dependencies]` is a manifest, checked in tests/quickstart.rs.)
//! The snippets do what the text beside them says.

use tollgate::RateLimitConfig;

const README: &str = include_str!("../README.md");

/// README.md and every page under docs/ (read when the test runs, so a new page is
/// covered without a change here), as (path, text).
fn pages() -> Vec<(String, String)> {
    let mut pages = vec![("README.md".to_owned(), README.to_owned())];
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .expect("docs/")
        .map(|entry| entry.expect("a docs/ entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .collect();
    names.sort();
    for path in names {
        let text = std::fs::read_to_string(&path).expect("a readable page");
        let name = format!("docs/{}", path.file_name().unwrap().to_string_lossy());
        pages.push((name, text));
    }
    assert!(pages.len() >= 5, "README and the guides: {}", pages.len());
    pages
}

/// A Cargo manifest fragment (the quick start's `[dependencies]`), not a tollgate config.
fn is_manifest(block: &str) -> bool {
    block.starts_with("[dependencies]")
}

fn toml_blocks(markdown: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (n, line) in markdown.lines().enumerate() {
        match &mut current {
            None if line.trim_start() == "```toml" => current = Some((n + 1, String::new())),
            Some(_) if line.trim_start() == "```" => blocks.extend(current.take()),
            Some((_, text)) => {
                text.push_str(line);
                text.push('\n');
            }
            None => {}
        }
    }
    blocks
}

#[test]
fn every_toml_snippet_in_the_readme_is_a_valid_config() {
    let blocks = toml_blocks(README);
    assert!(blocks.len() >= 4, "found only {} toml blocks", blocks.len());
    let manifests = blocks.iter().filter(|(_, text)| is_manifest(text)).count();
    assert_eq!(
        manifests, 1,
        "only the quick start's [dependencies] is not a config"
    );
    for (page, text) in pages() {
        for (line, text) in toml_blocks(&text) {
            if page == "README.md" && is_manifest(&text) {
                continue;
            }
            if let Err(err) = RateLimitConfig::from_toml_str(&text) {
                for (field, message) in err.problems() {
                    assert!(
                        field == "backend.tls_ca" && message.starts_with("cannot read"),
                        "{page} line {line}: {field}: {message}\n{text}"
                    );
                }
            }
        }
    }
}

/// The README's headline: its first ```rust block, and the TOML in it.
fn headline() -> (&'static str, &'static str) {
    let block = README
        .split("```rust\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a rust block");
    let toml = block
        .split("r#\"")
        .nth(1)
        .and_then(|rest| rest.split("\"#").next())
        .expect("the headline's TOML");
    assert!(
        block.contains(".layer(RateLimitLayer::new(cfg))"),
        "{block}"
    );
    (block, toml)
}

/// The README's headline example, as written: its TOML is taken from the first ```rust
/// block, and the app is built as it shows (`Router::layer`, no middleware). Regression:
/// the headline configured `[by_tool] search` with no source for the tool, so the tool
/// limit silently never applied.
#[tokio::test]
async fn the_headline_example_limits_the_tool_as_written() {
    use axum::{body::Body, routing::post, Router};
    use http::{Request, StatusCode};
    use tollgate::RateLimitLayer;
    use tower::ServiceExt;

    let (_, toml) = headline();
    let cfg = RateLimitConfig::from_toml_str(toml).unwrap();
    let app = Router::new()
        .route("/tools/{name}", post(|| async { "called" }))
        .layer(RateLimitLayer::new(cfg));
    let call = |tool: &str| {
        Request::post(format!("/tools/{tool}"))
            .body(Body::empty())
            .unwrap()
    };
    for i in 0..10 {
        let resp = app.clone().oneshot(call("search")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "call {i}");
    }
    let refused = app.clone().oneshot(call("search")).await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.headers()["x-ratelimit-limit"], "10");
    let other = app.clone().oneshot(call("fetch")).await.unwrap();
    assert_eq!(
        other.status(),
        StatusCode::OK,
        "other tools have no tool rule"
    );
}

/// The headline's tenant rule applies as written: its `[identity]` names the tenant's
/// header, and the users of one tenant share the tenant's limit. Regression: the headline
/// set `by_tenant` with no source for the tenant, so the tenant limit never applied.
#[tokio::test]
async fn the_headline_example_limits_the_tenant_as_written() {
    use axum::{body::Body, routing::post, Router};
    use http::{Request, StatusCode};
    use tollgate::RateLimitLayer;
    use tower::ServiceExt;

    let (block, toml) = headline();
    assert!(block.contains("by_tenant"), "{block}");
    let cfg = RateLimitConfig::from_toml_str(toml).unwrap();
    let tenant_limit = cfg.by_tenant().expect("a tenant rule").count();
    let user_limit = cfg.by_user().expect("a user rule").count();
    let app = Router::new()
        .route("/tools/{name}", post(|| async { "called" }))
        .layer(RateLimitLayer::new(cfg));
    let call = |user: &str, tenant: &str| {
        Request::post("/tools/echo")
            .header("x-user-id", user)
            .header("x-tenant-id", tenant)
            .body(Body::empty())
            .unwrap()
    };
    // The tenant's calls, each user staying within its own limit.
    for n in 0..tenant_limit {
        let user = format!("user-{}", n / user_limit);
        let resp = app.clone().oneshot(call(&user, "acme")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "call {n} by {user}");
    }
    let fresh = format!("user-{}", tenant_limit / user_limit + 1);
    let refused = app.clone().oneshot(call(&fresh, "acme")).await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        refused.headers()["x-ratelimit-limit"],
        tenant_limit.to_string().as_str()
    );
    let other = app.clone().oneshot(call(&fresh, "globex")).await.unwrap();
    assert_eq!(other.status(), StatusCode::OK, "another tenant has its own");
}

fn blocks(markdown: &str, lang: &str) -> Vec<String> {
    let fence = format!("```{lang}");
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match &mut current {
            None if line.trim_start() == fence => current = Some(String::new()),
            Some(_) if line.trim_start() == "```" => out.extend(current.take()),
            Some(text) => {
                text.push_str(line);
                text.push('\n');
            }
            None => {}
        }
    }
    out
}

/// The JSON in the README and the guides (the 429 body, the MCP refusals) is JSON with the
/// fields each form carries, and the README's error example is exactly what tollgate says
/// for those three mistakes.
#[test]
fn the_readme_json_and_error_examples_are_what_tollgate_writes() {
    let readme = README;
    assert!(!blocks(readme, "json").is_empty());
    let json: Vec<String> = pages()
        .iter()
        .flat_map(|(_, text)| blocks(text, "json"))
        .collect();
    assert!(
        json.iter().any(|block| block.contains("\"jsonrpc\"")),
        "an MCP refusal is shown"
    );
    for block in json {
        let value: serde_json::Value = serde_json::from_str(&block).expect(&block);
        if value.get("jsonrpc").is_some() {
            // An MCP refusal: a JSON-RPC response with an id, a tool error or an error.
            assert!(value.get("id").is_some(), "{block}");
            let tool_error = value["result"]["isError"] == serde_json::json!(true);
            let error = value["error"]["code"].is_i64();
            assert!(tool_error || error, "{block}");
            continue;
        }
        for field in ["type", "title", "status", "code", "detail", "violated"] {
            assert!(value.get(field).is_some(), "{field} missing in {block}");
        }
        // Waiting helps every refusal but one that can never fit.
        let waits = value["code"] != "COST_EXCEEDS_LIMIT";
        assert_eq!(value.get("retry_after").is_some(), waits, "{block}");
    }
    let errors = blocks(readme, "text")
        .into_iter()
        .find(|b| b.contains("backend.url"))
        .expect("the error example");
    let got = RateLimitConfig::from_toml_str(
        "algorithm = \"leaky\"\n[by_tool]\nsearch = \"abc/m\"\n[backend]\nkind = \"redis\"",
    )
    .unwrap_err()
    .to_string();
    let mut want: Vec<&str> = errors.lines().collect();
    let mut got: Vec<&str> = got.lines().collect();
    want.sort_unstable();
    got.sort_unstable();
    assert_eq!(got, want);
}

/// The snippet containing `marker`, in the README or a guide.
fn snippet(marker: &str) -> RateLimitConfig {
    let blocks: Vec<String> = pages()
        .iter()
        .flat_map(|(_, text)| toml_blocks(text))
        .map(|(_, text)| text)
        .filter(|text| text.contains(marker))
        .collect();
    assert_eq!(blocks.len(), 1, "one snippet holds {marker:?}");
    RateLimitConfig::from_toml_str(&blocks[0]).unwrap()
}

type Svc = tower::util::BoxCloneService<
    http::Request<String>,
    http::Response<tollgate::ResponseBody<String>>,
    std::convert::Infallible,
>;

fn service(cfg: RateLimitConfig) -> Svc {
    let layer = tollgate::RateLimitLayer::with_store(cfg, tollgate::MemoryStore::new())
        .with_clock(tollgate::ManualClock::new());
    tower::util::BoxCloneService::new(tower::ServiceBuilder::new().layer(layer).service(
        tower::service_fn(|_req: http::Request<String>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(String::from("ok")))
        }),
    ))
}

async fn limit_of(svc: &Svc, req: http::Request<String>) -> (u16, Option<String>) {
    use tower::ServiceExt;
    let resp = svc.clone().oneshot(req).await.unwrap();
    let limit = resp
        .headers()
        .get("x-ratelimit-limit")
        .map(|v| v.to_str().unwrap().to_owned());
    (resp.status().as_u16(), limit)
}

fn who(user: &str, tenant: Option<&str>, path: &str) -> http::Request<String> {
    let mut req = http::Request::post(path).body(String::new()).unwrap();
    let mut id = tollgate::Identity::user(user);
    if let Some(t) = tenant {
        id = id.with_tenant(t);
    }
    req.extensions_mut().insert(id);
    req
}

/// Each feature's snippet (docs/policy.md) does what the text beside it says.
#[tokio::test]
async fn each_policy_snippet_does_what_the_readme_says() {
    // The tool from the path.
    let svc = service(snippet(
        "[by_tool]\nsearch = \"10/m\"\n[identity]\ntool_path",
    ));
    let (status, limit) = limit_of(&svc, who("a", None, "/tools/Search")).await;
    assert_eq!((status, limit.as_deref()), (200, Some("10")));

    // Per-user tool limits: 5 each, 100 together.
    let svc = service(snippet("each user's share of it"));
    for _ in 0..5 {
        let mut req = who("a", None, "/");
        req.extensions_mut()
            .insert(tollgate::ToolName::new("search"));
        assert_eq!(limit_of(&svc, req).await.0, 200);
    }
    let mut req = who("a", None, "/");
    req.extensions_mut()
        .insert(tollgate::ToolName::new("search"));
    assert_eq!(limit_of(&svc, req).await, (429, Some("5".into())));
    let mut req = who("b", None, "/");
    req.extensions_mut()
        .insert(tollgate::ToolName::new("search"));
    assert_eq!(limit_of(&svc, req).await.0, 200);

    // Anonymous callers by client address, behind a trusted proxy.
    let svc = service(snippet(
        "anonymous = \"by_ip\"\n[identity]\ntrusted_proxies",
    ));
    let from = |peer: [u8; 4], xff: &str| {
        let mut req = http::Request::new(String::new());
        req.extensions_mut()
            .insert(std::net::SocketAddr::from((peer, 1000)));
        if !xff.is_empty() {
            req.headers_mut()
                .insert("x-forwarded-for", xff.parse().unwrap());
        }
        req
    };
    for _ in 0..30 {
        assert_eq!(
            limit_of(&svc, from([10, 1, 1, 1], "198.51.100.1")).await.0,
            200
        );
    }
    assert_eq!(
        limit_of(&svc, from([10, 1, 1, 1], "198.51.100.1")).await.0,
        429
    );
    assert_eq!(
        limit_of(&svc, from([10, 1, 1, 1], "198.51.100.2")).await.0,
        200
    );
    assert_eq!(limit_of(&svc, from([198, 51, 100, 1], "")).await.0, 429);

    // Tiers: acme is pro (600/m per user), others get the base 60/m; by_tenant inherited.
    let svc = service(snippet("by_tenant = \"6000/m\""));
    let pro = limit_of(&svc, who("a", Some("acme"), "/")).await;
    let free = limit_of(&svc, who("a", Some("globex"), "/")).await;
    assert_eq!(
        (pro.1.as_deref(), free.1.as_deref()),
        (Some("600"), Some("60"))
    );
    let mut req = who("b", Some("globex"), "/");
    req.extensions_mut().insert(tollgate::Tier::new("pro"));
    assert_eq!(limit_of(&svc, req).await.1.as_deref(), Some("600"));
}

/// The `x-ratelimit-limit` of a request from user `a` of `tenant` (by header) for `tool`.
async fn header_limit(svc: &Svc, tenant: Option<&str>, tool: Option<&str>) -> Option<String> {
    let mut req = http::Request::post("/").body(String::new()).unwrap();
    req.headers_mut().insert("x-user-id", "a".parse().unwrap());
    if let Some(t) = tenant {
        req.headers_mut().insert("x-tenant-id", t.parse().unwrap());
    }
    if let Some(tool) = tool {
        req.extensions_mut().insert(tollgate::ToolName::new(tool));
    }
    limit_of(svc, req).await.1
}

/// The Tiers snippet as written, with identities from the headers its `[identity]` names
/// (no extensions): a tenant listed in `[tenants]` gets its tier's rates. Regression: the
/// snippet had `[tenants]` but no source for the tenant, so the tier never applied.
#[tokio::test]
async fn the_tiers_snippet_takes_the_tenant_from_its_header() {
    let svc = service(snippet("by_tenant = \"6000/m\""));
    assert_eq!(
        header_limit(&svc, Some("acme"), None).await.as_deref(),
        Some("600")
    );
    assert_eq!(
        header_limit(&svc, Some("globex"), None).await.as_deref(),
        Some("60")
    );
    assert_eq!(header_limit(&svc, None, None).await.as_deref(), Some("60"));
    // The tool's rate is the tier's too: 100 for pro, 10 for the base rules.
    assert_eq!(
        header_limit(&svc, Some("acme"), Some("search"))
            .await
            .as_deref(),
        Some("100")
    );
    assert_eq!(
        header_limit(&svc, Some("globex"), Some("search"))
            .await
            .as_deref(),
        Some("10")
    );
}

/// The budgets snippet (README): a priced tool spends its price from the user's budget,
/// an unpriced call 1.
#[tokio::test]
async fn the_budgets_snippet_spends_each_tools_price() {
    let svc = service(snippet("# with [cost]: units, not calls"));
    let left = |resp: &http::Response<_>| resp.headers()["x-ratelimit-remaining"].clone();
    let call = |tool: &str| {
        let mut req = who("ann", None, "/");
        req.extensions_mut().insert(tollgate::ToolName::new(tool));
        req
    };
    use tower::ServiceExt;
    let resp = svc.clone().oneshot(call("Search")).await.unwrap();
    assert_eq!(left(&resp), "99990");
    let resp = svc.clone().oneshot(call("summarise")).await.unwrap();
    assert_eq!(left(&resp), "99490");
    let resp = svc.clone().oneshot(call("echo")).await.unwrap();
    assert_eq!(left(&resp), "99489");
}

/// The two refusals the budgets guide (docs/cost.md) shows are what tollgate writes for
/// the calls it describes.
#[tokio::test]
async fn the_budgets_guide_refusals_are_what_tollgate_writes() {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let guide = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/cost.md"))
        .expect("docs/cost.md");
    let shown: Vec<serde_json::Value> = blocks(&guide, "json")
        .iter()
        .map(|b| serde_json::from_str(b).expect(b))
        .collect();
    let svc = service(
        RateLimitConfig::from_toml_str(
            "by_user = \"1000/h\"\n[by_tool]\nsummarise = \"600/h\"\n\
             [cost.tools]\nsummarise = 500\nimport = 2000",
        )
        .unwrap(),
    );
    let mut written = Vec::new();
    for tool in ["summarise", "summarise", "import"] {
        let mut req = who("ann", None, "/");
        req.extensions_mut().insert(tollgate::ToolName::new(tool));
        let resp = svc.clone().oneshot(req).await.unwrap();
        if resp.status() == 429 {
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            written.push(serde_json::from_slice::<serde_json::Value>(&body).unwrap());
        }
    }
    assert_eq!(shown, written);
}
