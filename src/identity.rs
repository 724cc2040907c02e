//! Who is calling and which tool: request extensions first, configured headers second,
//! normalised per ARCHITECTURE.md, behaviour contract item 2.

use std::fmt;

use http::{HeaderMap, HeaderName, Request};

use crate::config::IdentityConfig;
use crate::Subject;

/// Longest user or tenant id accepted, in bytes. Longer ids are refused (400), never
/// truncated: truncation would merge distinct identities.
pub const MAX_IDENTITY_LEN: usize = 256;

/// The caller, as an upstream auth layer established it. Insert it into the request's
/// extensions; tollgate reads it before any header. `Debug` redacts both ids.
///
/// ```
/// use tollgate::Identity;
/// let who = Identity::user("alice").with_tenant("acme");
/// assert_eq!(who.user.as_deref(), Some("alice"));
/// assert_eq!(format!("{who:?}"), "Identity { user: Some(<redacted>), tenant: Some(<redacted>) }");
/// ```
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The user id; `None`, empty or all-whitespace → the shared `anonymous` bucket.
    pub user: Option<String>,
    /// The tenant id; `None` or empty → no tenant rule applies.
    pub tenant: Option<String>,
}

impl Identity {
    /// An identity for `user`, without a tenant.
    pub fn user(user: impl Into<String>) -> Self {
        Identity {
            user: Some(user.into()),
            tenant: None,
        }
    }

    /// An anonymous caller.
    pub fn anonymous() -> Self {
        Identity::default()
    }

    /// The same identity within `tenant`.
    pub fn with_tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = Some(tenant.into());
        self
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redact = |v: &Option<String>| v.as_ref().map(|_| Redacted);
        f.debug_struct("Identity")
            .field("user", &redact(&self.user))
            .field("tenant", &redact(&self.tenant))
            .finish()
    }
}

struct Redacted;
impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The tool a request calls, as an upstream routing layer established it. Names are
/// trimmed and lower-cased before they are matched against `by_tool`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ToolName(pub String);

impl ToolName {
    /// A tool name.
    pub fn new(name: impl Into<String>) -> Self {
        ToolName(name.into())
    }

    /// The name as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A request's identity, borrowed from it and normalised (trimmed; empty → absent).
#[derive(Clone, Copy)]
pub(crate) struct Who<'r> {
    pub(crate) user: Subject<'r>,
    pub(crate) tenant: Option<&'r [u8]>,
    /// Trimmed but not yet lower-cased: matched against the configured tools.
    pub(crate) tool: Option<&'r [u8]>,
    /// The tool came from the path (`[identity] tool_path`): still percent-encoded.
    pub(crate) tool_from_path: bool,
}

/// An identity tollgate refuses to count rather than guess at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BadIdentity {
    /// An identity header appears more than once.
    Repeated(&'static str),
    /// A user or tenant id is longer than [`MAX_IDENTITY_LEN`].
    TooLong(&'static str),
}

impl BadIdentity {
    /// What to tell the caller: names the field, never the value.
    pub(crate) fn detail(self) -> &'static str {
        match self {
            BadIdentity::Repeated("user") => "the user identity header appears more than once",
            BadIdentity::Repeated("tenant") => "the tenant identity header appears more than once",
            BadIdentity::Repeated(_) => "the tool header appears more than once",
            BadIdentity::TooLong("user") => "the user id is longer than 256 bytes",
            BadIdentity::TooLong(_) => "the tenant id is longer than 256 bytes",
        }
    }
}

pub(crate) fn extract<'r, B>(
    req: &'r Request<B>,
    cfg: &IdentityConfig,
) -> Result<Who<'r>, BadIdentity> {
    let fields = Fields::read(req, cfg);
    Ok(Who {
        user: fields.user?.map_or(Subject::Anonymous, Subject::Named),
        tenant: fields.tenant?,
        tool: fields.tool?,
        tool_from_path: fields.tool_from_path,
    })
}

/// As [`extract`], but a field tollgate refuses is treated as absent (permissive mode):
/// the user becomes anonymous, the tenant none; the other fields still count.
pub(crate) fn extract_lenient<'r, B>(req: &'r Request<B>, cfg: &IdentityConfig) -> Who<'r> {
    let fields = Fields::read(req, cfg);
    Who {
        user: fields
            .user
            .ok()
            .flatten()
            .map_or(Subject::Anonymous, Subject::Named),
        tenant: fields.tenant.ok().flatten(),
        tool: fields.tool.ok().flatten(),
        tool_from_path: fields.tool_from_path,
    }
}

/// Each field of a request's identity: trimmed, empty → absent, or why it is refused.
struct Fields<'r> {
    user: Result<Option<&'r [u8]>, BadIdentity>,
    tenant: Result<Option<&'r [u8]>, BadIdentity>,
    tool: Result<Option<&'r [u8]>, BadIdentity>,
    tool_from_path: bool,
}

impl<'r> Fields<'r> {
    fn read<B>(req: &'r Request<B>, cfg: &IdentityConfig) -> Self {
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
        let tool = match (ext.get::<ToolName>(), cfg.tool_path_matcher()) {
            (Some(t), _) => Ok(Some(t.0.trim().as_bytes())),
            (None, Some(pattern)) => {
                let tool = pattern.tool(req.uri().path());
                tool_from_path = tool.is_some();
                Ok(tool.map(str::as_bytes))
            }
            (None, None) => header(headers, cfg.tool_header(), "tool"),
        };
        Fields {
            user: bounded(user, "user"),
            tenant: bounded(tenant, "tenant"),
            tool: tool.map(|t| t.filter(|t| !t.is_empty())),
            tool_from_path,
        }
    }
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
