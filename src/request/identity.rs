//! Who is calling and which tool: request extensions first, configured headers second,
//! normalised per ARCHITECTURE.md, behaviour contract item 2.

use std::borrow::Cow;

use http::{HeaderMap, HeaderName, Request};

use super::extensions::{Cost, Identity, ToolName};
use super::jsonrpc::McpCall;
use super::mcp_headers::{decode_name, server_validates, target_of, McpHeaders};
use super::target::{BadIdentity, Named, Target};
use crate::config::settings::MAX_IDENTITY_LEN;
use crate::config::IdentityConfig;
use crate::key::Subject;

/// A request's identity, borrowed from it and normalised (trimmed; empty → absent).
pub(crate) struct Who<'r> {
    pub(crate) user: Subject<'r>,
    pub(crate) tenant: Option<&'r [u8]>,
    pub(crate) tool: Option<Named<'r>>,
    /// The tool came from the path (`[identity] tool_path`): still percent-encoded.
    pub(crate) tool_from_path: bool,
    /// The call's cost, from the `Cost` extension or `[identity] cost_header`.
    pub(crate) cost: Option<u64>,
}

/// `mcp`: whether `[mcp]` is configured (the `Mcp-*` headers are read); `costed`:
/// whether `[cost]` is (a call's `Cost` and cost header are read); `call`: the JSON-RPC
/// call [`McpLayer`](crate::McpLayer) read from the body, if any.
#[inline]
pub(crate) fn extract<'r, B>(
    req: &'r Request<B>,
    cfg: &IdentityConfig,
    mcp: bool,
    costed: bool,
    call: Option<McpCall<'r>>,
) -> Result<Who<'r>, BadIdentity> {
    let fields = Fields::read(req, cfg, mcp, costed, call);
    Ok(Who {
        user: fields.user?.map_or(Subject::Anonymous, Subject::Named),
        tenant: fields.tenant?,
        tool: fields.tool?,
        tool_from_path: fields.tool_from_path,
        cost: fields.cost?,
    })
}

/// As [`extract`], but a field tollgate refuses is treated as absent (permissive mode):
/// the user becomes anonymous, the tenant none; the other fields still count. An MCP
/// call whose headers disagree with its body counts under the body's tool, which is the
/// one the server runs.
pub(crate) fn extract_lenient<'r, B>(
    req: &'r Request<B>,
    cfg: &IdentityConfig,
    mcp: bool,
    costed: bool,
    call: Option<McpCall<'r>>,
) -> Who<'r> {
    let fields = Fields::read(req, cfg, mcp, costed, call);
    Who {
        user: fields
            .user
            .ok()
            .flatten()
            .map_or(Subject::Anonymous, Subject::Named),
        tenant: fields.tenant.ok().flatten(),
        tool: fields.tool.unwrap_or_else(|_| call.and_then(named_in_body)),
        tool_from_path: fields.tool_from_path,
        cost: fields.cost.ok().flatten(),
    }
}

/// Each field of a request's identity: trimmed, empty → absent, or why it is refused.
struct Fields<'r> {
    user: Result<Option<&'r [u8]>, BadIdentity>,
    tenant: Result<Option<&'r [u8]>, BadIdentity>,
    tool: Result<Option<Named<'r>>, BadIdentity>,
    tool_from_path: bool,
    cost: Result<Option<u64>, BadIdentity>,
}

/// The tool or prompt of an MCP call: from the body when [`McpLayer`](crate::McpLayer)
/// read it (the headers, if sent, must agree with it), else from `Mcp-Method` /
/// `Mcp-Name` when `[mcp]` is configured and the declared protocol revision obliges the
/// server to refuse headers that disagree with the body.
fn mcp_named<'r, B>(
    req: &'r Request<B>,
    mcp: bool,
    call: Option<McpCall<'r>>,
) -> Result<Option<Named<'r>>, BadIdentity> {
    if !mcp && call.is_none() {
        return Ok(None);
    }
    let headers = McpHeaders::read(req.headers())?;
    if let Some(call) = call {
        if headers.method.is_some_and(|m| m != call.method) {
            return Err(BadIdentity::HeaderMismatch);
        }
        if let (Some(raw), Some(body)) = (headers.name, call.name) {
            if call.target().is_some() && *decode_name(raw)? != *body {
                return Err(BadIdentity::HeaderMismatch);
            }
        }
        return Ok(named_in_body(call));
    }
    let (Some(target), Some(raw)) = (headers.method.and_then(target_of), headers.name) else {
        return Ok(None);
    };
    if !server_validates(req.headers()) {
        return Err(BadIdentity::Unvalidated);
    }
    let name = match decode_name(raw)? {
        Cow::Borrowed(name) => Cow::Borrowed(name.trim_ascii()),
        Cow::Owned(name) => Cow::Owned(name.trim_ascii().to_vec()),
    };
    Ok(Some(Named { target, name }).filter(|n| !n.name.is_empty()))
}

fn named_in_body(call: McpCall<'_>) -> Option<Named<'_>> {
    let target = call.target()?;
    let name = call.name?.trim_ascii();
    (!name.is_empty()).then_some(Named {
        target,
        name: Cow::Borrowed(name),
    })
}

impl<'r> Fields<'r> {
    fn read<B>(
        req: &'r Request<B>,
        cfg: &IdentityConfig,
        mcp: bool,
        costed: bool,
        call: Option<McpCall<'r>>,
    ) -> Self {
        let ext = req.extensions();
        let headers = req.headers();
        let (user, tenant) = match ext.get::<Identity>() {
            // Trimmed as headers are (ASCII whitespace), so one id is one user either way.
            Some(id) => (
                Ok(id.user.as_deref().map(|u| u.as_bytes().trim_ascii())),
                Ok(id.tenant.as_deref().map(|t| t.as_bytes().trim_ascii())),
            ),
            None => (
                header(headers, cfg.user_header(), "user"),
                header(headers, cfg.tenant_header(), "tenant"),
            ),
        };
        let mut tool_from_path = false;
        let tool_name = ext.get::<ToolName>();
        let tool = match (tool_name, cfg.tool_path_matcher()) {
            (Some(t), _) => Ok(Some(t.0.trim().as_bytes())),
            (None, Some(pattern)) => {
                let tool = pattern.tool(req.uri().path());
                tool_from_path = tool.is_some();
                Ok(tool.map(str::as_bytes))
            }
            (None, None) => header(headers, cfg.tool_header(), "tool"),
        };
        let tool = tool.map(|t| {
            t.filter(|t| !t.is_empty()).map(|name| Named {
                target: Target::Tool,
                name: Cow::Borrowed(name),
            })
        });
        // An app's own `ToolName` comes first; then the MCP call; then the tool header.
        let tool = match (tool_name, tool) {
            (Some(_), tool) => tool,
            (None, tool) => match mcp_named(req, mcp, call) {
                Ok(None) => tool,
                found => {
                    // The MCP call names it (not the path).
                    tool_from_path = false;
                    found
                }
            },
        };
        // With `[cost]`: the application's `Cost` first, then the upstream's estimate in
        // the header. Without it every call costs 1, and neither is looked at.
        let cost = if !costed {
            Ok(None)
        } else if let Some(cost) = ext.get::<Cost>() {
            Ok(Some(cost.0))
        } else {
            header(headers, cfg.cost_header(), "cost").and_then(|h| h.map(units).transpose())
        };
        Fields {
            user: bounded(user, "user"),
            tenant: bounded(tenant, "tenant"),
            tool,
            tool_from_path,
            cost,
        }
    }
}

/// A cost header's units: ASCII digits only (at most 19, so any value fits), never a
/// guess at anything else.
fn units(value: &[u8]) -> Result<u64, BadIdentity> {
    let digits = !value.is_empty() && value.len() <= 19 && value.iter().all(u8::is_ascii_digit);
    if !digits {
        return Err(BadIdentity::InvalidCost);
    }
    Ok(value.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// Empty → absent; longer than [`MAX_IDENTITY_LEN`] → refused.
fn bounded<'r>(
    id: Result<Option<&'r [u8]>, BadIdentity>,
    field: &'static str,
) -> Result<Option<&'r [u8]>, BadIdentity> {
    match id? {
        Some(id) if id.len() > MAX_IDENTITY_LEN => Err(BadIdentity::TooLong(field)),
        id => Ok(id.filter(|id| !id.is_empty())),
    }
}

/// A configured header's trimmed bytes (opaque: non-UTF-8 is fine). Two occurrences are
/// refused: "the last one wins" would let a client pick whose counter it uses.
fn header<'r>(
    headers: &'r HeaderMap,
    name: Option<&HeaderName>,
    field: &'static str,
) -> Result<Option<&'r [u8]>, BadIdentity> {
    let Some(name) = name else { return Ok(None) };
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(BadIdentity::Repeated(field));
    }
    Ok(first.map(|v| v.as_bytes().trim_ascii()))
}
