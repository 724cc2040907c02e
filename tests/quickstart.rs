//! The README's quick start (`examples/quickstart.rs`), tried as a new user would: the
//! README quotes the program verbatim and names the dependencies it needs, and the real
//! binary, on a free loopback port, applies every limit its config sets to requests like
//! the README's curl loop, while `/healthz` is never limited.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use common::example::{example_binary, Running};
use common::reply::Reply;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

const README: &str = include_str!("../README.md");
const SOURCE: &str = include_str!("../examples/quickstart.rs");
const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn quickstart_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| example_binary("quickstart"))
}

fn start() -> Running {
    Running::start(
        quickstart_binary(),
        "tollgate quickstart",
        &["--listen", "127.0.0.1:0"],
    )
}

impl Reply {
    fn limit(&self) -> Option<u64> {
        self.header("x-ratelimit-limit")
            .map(|v| v.parse().expect("a number"))
    }

    /// The rules a 429's problem+json body lists as refusing.
    fn violated(&self) -> Vec<String> {
        let body: serde_json::Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("{e}: body {:?}", self.body));
        body["violated"]
            .as_array()
            .unwrap_or_else(|| panic!("no violated in {body}"))
            .iter()
            .map(|rule| rule.as_str().expect("a rule name").to_owned())
            .collect()
    }
}

/// One HTTP/1.1 request on a fresh connection from the client address `from`.
async fn call(
    server: SocketAddr,
    from: Ipv4Addr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let exchange = async {
        let socket = TcpSocket::new_v4().expect("a socket");
        socket
            .bind(SocketAddr::new(IpAddr::V4(from), 0))
            .expect("bind the client address");
        let mut stream = socket.connect(server).await.expect("connect");
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nhost: {server}\r\nconnection: close\r\ncontent-length: 0\r\n"
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("read");
        String::from_utf8(raw).expect("UTF-8 response")
    };
    let text = tokio::time::timeout(IO_TIMEOUT, exchange)
        .await
        .expect("an answer in time");
    Reply::parse(&text)
}

const LOCAL: Ipv4Addr = Ipv4Addr::LOCALHOST;

async fn tool_call(server: &Running, tool: &str, user: &str, tenant: Option<&str>) -> Reply {
    let mut headers = vec![("x-user-id", user)];
    headers.extend(tenant.map(|t| ("x-tenant-id", t)));
    call(
        server.addr,
        LOCAL,
        "POST",
        &format!("/tools/{tool}"),
        &headers,
    )
    .await
}

#[test]
fn the_readme_quotes_the_example_verbatim() {
    let from = SOURCE
        .find("use std::net::SocketAddr;")
        .expect("the quoted part");
    // A quote of the example (built and run by the tests below), so not a doc test of its
    // own: the README marks it `ignore` for the doc-test harness.
    let quote = format!("```rust,ignore\n{}```\n", &SOURCE[from..]);
    assert!(README.contains(&quote), "README does not quote:\n{quote}");
}

/// The README's `[dependencies]` for the quick start: every crate the program uses, at the
/// versions this repository builds it with.
#[test]
fn the_readme_names_the_dependencies_the_example_uses() {
    let block = README
        .split("```toml\n")
        .filter_map(|rest| rest.split("```").next())
        .find(|block| block.starts_with("[dependencies]"))
        .expect("the quick start's [dependencies]");
    let manifest: toml::Table = toml::from_str(block).expect("valid TOML");
    let deps = manifest["dependencies"].as_table().expect("a table");
    let mut names: Vec<&str> = deps.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["axum", "tokio", "tollgate", "tracing-subscriber"]);
    for name in ["axum", "tokio", "tollgate", "tracing_subscriber"] {
        assert!(
            SOURCE.contains(&format!("{name}::")),
            "the example uses {name}"
        );
    }
    let ours = env!("CARGO_PKG_VERSION");
    let tollgate = deps["tollgate"].as_str().expect("a version");
    assert!(
        ours.starts_with(&format!("{tollgate}.")),
        "{tollgate} vs {ours}"
    );
    assert_eq!(deps["axum"].as_str(), Some("0.8"));
    let features = deps["tokio"]["features"]
        .as_array()
        .expect("tokio features");
    for needed in ["macros", "rt-multi-thread", "net"] {
        assert!(
            features.iter().any(|f| f.as_str() == Some(needed)),
            "{needed}"
        );
    }
}

/// The README's curl loop: alice of acme calls `search` eleven times; the tool's ten a
/// minute are shared by every caller, so the 11th is refused by the tool rule.
#[tokio::test]
async fn the_readme_curl_loop_is_refused_by_the_tool_limit_at_the_eleventh_call() {
    let server = start();
    for i in 0..10 {
        let reply = tool_call(&server, "search", "alice", Some("acme")).await;
        assert_eq!(reply.status, 200, "call {}: {reply:?}", i + 1);
        assert_eq!(reply.body, "search ran\n");
        assert_eq!(reply.limit(), Some(10), "the tool speaks: fewest left");
    }
    let refused = tool_call(&server, "search", "alice", Some("acme")).await;
    assert_eq!(refused.status, 429, "{refused:?}");
    assert_eq!(refused.violated(), ["tool"]);
    assert_eq!(refused.limit(), Some(10));
    assert!(refused.header("retry-after").is_some(), "{refused:?}");
    // Shared by every caller: another user of another tenant is refused too.
    let other = tool_call(&server, "search", "bob", Some("globex")).await;
    assert_eq!(other.violated(), ["tool"]);
    // Alice's other tools go on: her user limit is 30, of which the tool rule's refusal
    // took nothing.
    let echo = tool_call(&server, "echo", "alice", Some("acme")).await;
    assert_eq!((echo.status, echo.limit()), (200, Some(30)), "{echo:?}");
    assert_eq!(echo.header("x-ratelimit-remaining"), Some("19"));
}

/// `by_user = "30/m"` with the user from `x-user-id`: each user has their own thirty.
#[tokio::test]
async fn each_user_has_their_own_thirty_calls_a_minute() {
    let server = start();
    for i in 0..30 {
        let reply = tool_call(&server, "echo", "alice", Some("acme")).await;
        assert_eq!(reply.status, 200, "call {}: {reply:?}", i + 1);
    }
    let refused = tool_call(&server, "echo", "alice", Some("acme")).await;
    assert_eq!(refused.status, 429, "{refused:?}");
    assert_eq!(refused.violated(), ["user"]);
    assert_eq!(refused.limit(), Some(30));
    let carol = tool_call(&server, "echo", "carol", Some("acme")).await;
    assert_eq!(carol.status, 200, "another user of the tenant: {carol:?}");
}

/// `by_tenant = "100/m"` with the tenant from `x-tenant-id`: a tenant's users share it.
#[tokio::test]
async fn the_users_of_one_tenant_share_its_hundred_calls_a_minute() {
    let server = start();
    for i in 0..100 {
        let reply = tool_call(&server, "echo", &format!("user-{i}"), Some("globex")).await;
        assert_eq!(reply.status, 200, "user {i}: {reply:?}");
    }
    let refused = tool_call(&server, "echo", "user-100", Some("globex")).await;
    assert_eq!(refused.status, 429, "{refused:?}");
    assert_eq!(refused.violated(), ["tenant"]);
    assert_eq!(refused.limit(), Some(100));
    let elsewhere = tool_call(&server, "echo", "user-100", Some("acme")).await;
    assert_eq!(elsewhere.status, 200, "another tenant: {elsewhere:?}");
}

/// `/healthz`, added after `.layer(...)`, is never limited and carries no rate headers,
/// for a user who is refused everywhere else and for anonymous callers alike; the
/// router's 404s, inside the layer, are limited like the routes before it.
#[tokio::test]
async fn healthz_is_never_limited_and_carries_no_rate_headers() {
    let server = start();
    for _ in 0..30 {
        tool_call(&server, "echo", "dave", None).await;
    }
    assert_eq!(tool_call(&server, "echo", "dave", None).await.status, 429);
    let as_dave = [("x-user-id", "dave")];
    for headers in [&as_dave[..], &[]] {
        for _ in 0..40 {
            let reply = call(server.addr, LOCAL, "GET", "/healthz", headers).await;
            assert_eq!((reply.status, reply.body.as_str()), (200, "ok\n"));
            for (name, _) in &reply.headers {
                let name = name.to_ascii_lowercase();
                assert!(
                    !name.contains("ratelimit") && name != "retry-after",
                    "{name} on /healthz: {reply:?}"
                );
            }
        }
    }
    let as_erin = [("x-user-id", "erin")];
    let missing = call(server.addr, LOCAL, "GET", "/nope", &as_erin).await;
    assert_eq!(
        (missing.status, missing.limit()),
        (404, Some(30)),
        "{missing:?}"
    );
    let missing = call(server.addr, LOCAL, "GET", "/nope", &as_dave).await;
    assert_eq!(missing.status, 429, "{missing:?}");
}

/// `anonymous = "by_ip"` with the peer address from
/// `into_make_service_with_connect_info`: callers without a user are counted per client
/// address (Linux routes all of 127.0.0.0/8 over `lo`, so 127.0.0.2 is a second client).
#[tokio::test]
async fn anonymous_callers_are_counted_per_client_address() {
    let server = start();
    let echo = |from| call(server.addr, from, "POST", "/tools/echo", &[]);
    for i in 0..30 {
        let reply = echo(LOCAL).await;
        assert_eq!((reply.status, reply.limit()), (200, Some(30)), "call {i}");
    }
    assert_eq!(echo(LOCAL).await.violated(), ["user"]);
    let second = Ipv4Addr::new(127, 0, 0, 2);
    // Linux routes all of 127/8 to lo, so there the second address must be tried.
    let bindable = std::net::UdpSocket::bind((second, 0)).is_ok();
    assert!(
        bindable || !cfg!(target_os = "linux"),
        "127.0.0.2 cannot be bound"
    );
    if bindable {
        assert_eq!(
            echo(second).await.status,
            200,
            "another address, its own 30"
        );
    } else {
        eprintln!("cannot bind 127.0.0.2 here: the second client address is not tried");
    }
}
