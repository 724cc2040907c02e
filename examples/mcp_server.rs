//! An MCP server on the official Rust SDK (`rmcp`, Streamable HTTP at `/mcp` in axum),
//! rate-limited by tollgate per user, per tenant, per tool and per prompt.
//!
//! ```text
//! cargo run --example mcp_server -- --config examples/mcp_server.toml --listen 127.0.0.1:3001
//! ```
//!
//! * Tools `echo`, `search`, `fetch` and `summarise` (they only pretend to search, fetch
//!   and summarise) and one prompt, `summary`. `summarise` is priced at 20 units in
//!   `[cost.tools]` and settles its call at the tokens it reports using, through the
//!   [`Charge`] tollgate put in the request (rmcp hands the tool the HTTP request's parts).
//! * `GET /healthz` answers 200 and is never limited.
//! * Callers are identified by the `x-user-id` and `x-tenant-id` headers, which the small
//!   middleware [`identity_from_headers`] turns into tollgate's [`Identity`]. A real
//!   deployment derives the identity from its authentication (an OAuth token's subject,
//!   an mTLS certificate) and never from a header a client can set.
//! * The stack on `/mcp`, outermost first: identity → [`McpLayer`] (reads the JSON-RPC
//!   body to find the tool or prompt, for clients that do not send `Mcp-Method` /
//!   `Mcp-Name`) → [`RateLimitLayer`] → the rmcp service. A refused `tools/call` comes back
//!   as a tool result with `isError: true` and the time to wait.
//!
//! Flags: `--config FILE`, `--listen ADDR`, `--help`.

#[path = "common/cli.rs"]
mod cli;
#[path = "common/flags.rs"]
mod flags;
#[path = "common/shutdown.rs"]
mod shutdown;

use std::process::ExitCode;

use axum::extract::Request;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use rmcp::handler::server::router::prompt::PromptRouter;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::Extension;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{PromptMessage, Role, ServerCapabilities, ServerConfig};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::ServerHandler;
use rmcp::{prompt, prompt_handler, prompt_router, schemars, tool, tool_handler, tool_router};
use tollgate::{Charge, Identity, McpLayer, RateLimitConfig, RateLimitLayer, MAX_IDENTITY_LEN};
use tower::ServiceBuilder;

const USAGE: &str = "\
tollgate example MCP server: tools echo, search, fetch, summarise and prompt summary at
/mcp, rate-limited per user, tenant, tool and prompt; summarise costs the tokens it uses.

USAGE:
    mcp_server [--config FILE] [--listen ADDR]

OPTIONS:
    --config FILE   TOML rate-limit config [default: the contents of examples/mcp_server.toml]
    --listen ADDR   address to listen on [default: 127.0.0.1:3001]; port 0 picks a free
                    port, and the address actually bound is printed
    -h, --help      print this help

Callers are identified by the x-user-id and x-tenant-id headers (trusted as if a proxy had
set them). Stop with Ctrl-C.";

const DEFAULT_CONFIG: &str = include_str!("mcp_server.toml");
const DEFAULT_LISTEN: &str = "127.0.0.1:3001";

static USER_HEADER: HeaderName = HeaderName::from_static("x-user-id");
static TENANT_HEADER: HeaderName = HeaderName::from_static("x-tenant-id");

// ---- the MCP server ----

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
struct EchoArgs {
    /// The text to send back.
    text: String,
}

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
struct SearchArgs {
    /// What to search for.
    query: String,
}

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
struct FetchArgs {
    /// The URL to fetch.
    url: String,
}

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
struct SummariseArgs {
    /// The text to summarise.
    text: String,
}

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
struct SummaryArgs {
    /// The topic to summarise.
    topic: String,
}

/// The MCP server: four tools and one prompt.
#[derive(Debug, Clone)]
pub struct Tools {
    tool_router: ToolRouter<Self>,
    prompt_router: PromptRouter<Self>,
}

impl Default for Tools {
    fn default() -> Self {
        Tools {
            tool_router: Self::tool_router(),
            prompt_router: Self::prompt_router(),
        }
    }
}

#[tool_router]
impl Tools {
    #[tool(description = "Send the text back")]
    fn echo(&self, Parameters(EchoArgs { text }): Parameters<EchoArgs>) -> String {
        text
    }

    #[tool(description = "Search (this example pretends): returns three titles")]
    fn search(&self, Parameters(SearchArgs { query }): Parameters<SearchArgs>) -> String {
        format!("3 results for {query:?}: A, B, C")
    }

    #[tool(description = "Fetch a URL (this example pretends): returns its length")]
    fn fetch(&self, Parameters(FetchArgs { url }): Parameters<FetchArgs>) -> String {
        format!("fetched {url}: 1234 bytes")
    }

    /// Charged its `[cost.tools]` price (an estimate) when it starts; settled at the
    /// tokens it used (here: the words read and written) once it knows them. Awaiting the
    /// settlement is optional; it makes the next call see it.
    #[tool(description = "Summarise a text (this example keeps its first five words)")]
    async fn summarise(
        &self,
        Extension(request): Extension<axum::http::request::Parts>,
        Parameters(SummariseArgs { text }): Parameters<SummariseArgs>,
    ) -> String {
        let summary: Vec<&str> = text.split_whitespace().take(5).collect();
        let tokens = (text.split_whitespace().count() + summary.len()) as u64;
        if let Some(charge) = request.extensions.get::<Charge>() {
            // A failure is logged and counted by tollgate; the call keeps its estimate.
            let _ = charge.settle(tokens).await;
        }
        format!("{} ({tokens} tokens)", summary.join(" "))
    }
}

#[prompt_router]
impl Tools {
    #[prompt(name = "summary", description = "Ask for a summary of a topic")]
    async fn summary(
        &self,
        Parameters(SummaryArgs { topic }): Parameters<SummaryArgs>,
    ) -> Vec<PromptMessage> {
        vec![PromptMessage::new_text(
            Role::User,
            format!("Summarise what is known about {topic} in five sentences."),
        )]
    }
}

#[tool_handler(router = self.tool_router)]
#[prompt_handler(router = self.prompt_router)]
impl ServerHandler for Tools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_prompts()
                .build(),
        )
    }
}

// ---- the HTTP app ----

/// The routes: `/healthz`, and `/mcp` behind the identity middleware, [`McpLayer`] and the
/// rate limiter (the layers run outermost first, in the order listed).
pub fn app(cfg: RateLimitConfig) -> Router {
    let mcp = StreamableHttpService::new(
        || Ok(Tools::default()),
        LocalSessionManager::default().into(),
        StreamableHttpServerConfig::default(),
    );
    // The MCP guide (docs/mcp.md) quotes from here to the end of the function.
    let limited = ServiceBuilder::new()
        .layer(middleware::from_fn(identity_from_headers)) // inserts tollgate::Identity
        .layer(McpLayer::new(&cfg)) // reads the JSON-RPC body
        .layer(RateLimitLayer::new(cfg)) // decides and answers refusals
        .service(mcp); // rmcp's StreamableHttpService
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .nest_service("/mcp", limited)
}

/// `x-user-id` / `x-tenant-id` → [`Identity`]. A header that is repeated, longer than
/// [`MAX_IDENTITY_LEN`] or not UTF-8 is refused with 400 rather than guessed at.
async fn identity_from_headers(mut req: Request, next: Next) -> Response {
    let identity = (|| {
        Ok::<_, &'static str>(Identity::new(
            single(req.headers(), &USER_HEADER, "x-user-id")?,
            single(req.headers(), &TENANT_HEADER, "x-tenant-id")?,
        ))
    })();
    match identity {
        Ok(identity) => {
            req.extensions_mut().insert(identity);
            next.run(req).await
        }
        Err(header) => invalid_identity(header),
    }
}

fn single(
    headers: &HeaderMap,
    name: &HeaderName,
    shown: &'static str,
) -> Result<Option<String>, &'static str> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let text = std::str::from_utf8(value.as_bytes())
        .map_err(|_| shown)?
        .trim();
    if values.next().is_some() || text.len() > MAX_IDENTITY_LEN {
        return Err(shown);
    }
    Ok(Some(text.to_owned()))
}

/// The same shape as tollgate's own 400; names the header, never its value.
fn invalid_identity(header: &'static str) -> Response {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": "Invalid identity",
        "status": 400,
        "code": "INVALID_IDENTITY",
        "detail": format!("the {header} header is repeated, longer than 256 bytes or not UTF-8"),
    });
    let mut resp = (StatusCode::BAD_REQUEST, body.to_string()).into_response();
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    resp
}

// ---- the binary ----

const CLI: cli::Cli = cli::Cli {
    name: "mcp_server",
    usage: USAGE,
    default_config: (DEFAULT_CONFIG, "the embedded examples/mcp_server.toml"),
    default_listen: DEFAULT_LISTEN,
    admin: false,
};

fn main() -> ExitCode {
    CLI.main(|cfg, args| async move { serve(cfg, &args.listen).await })
}

async fn serve(cfg: RateLimitConfig, listen: &str) -> Result<(), String> {
    // Built inside the runtime: a Redis backend may spawn its connection tasks here.
    shutdown::serve(
        app(cfg),
        listen,
        "mcp_server",
        "tollgate MCP server",
        "/mcp",
    )
    .await
}
