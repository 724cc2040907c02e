//! What a request names (a tool or an MCP prompt), and why tollgate may refuse to count a
//! request's identity rather than guess at it.

use std::borrow::Cow;

use crate::config::settings::MAX_IDENTITY_LEN;

// The messages of `BadIdentity::TooLong` state the bound.
const _: () = assert!(MAX_IDENTITY_LEN == 256);

/// Which rule table a called name is matched against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// `by_tool`: a `ToolName`, the tool header, or an MCP `tools/call`.
    Tool,
    /// `by_prompt`: an MCP `prompts/get`.
    Prompt,
}

/// The tool or prompt a request calls: trimmed, not yet lower-cased. Borrowed from the
/// request except for a base64-encoded `Mcp-Name`, which is decoded.
pub(crate) struct Named<'r> {
    pub(crate) target: Target,
    pub(crate) name: Cow<'r, [u8]>,
}

/// An identity tollgate refuses to count rather than guess at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BadIdentity {
    /// An identity header appears more than once.
    Repeated(&'static str),
    /// A user or tenant id is longer than [`MAX_IDENTITY_LEN`].
    TooLong(&'static str),
    /// `Mcp-Name` is `=?base64?…?=` around something that is not base64 of UTF-8 text.
    MalformedName,
    /// `Mcp-Method` or `Mcp-Name` disagrees with the JSON-RPC body tollgate read.
    HeaderMismatch,
    /// `Mcp-Method` / `Mcp-Name` name a tool or prompt, but the request declares no
    /// protocol revision whose servers must check them against the body.
    Unvalidated,
    /// The cost header is not a number of units.
    InvalidCost,
}

impl BadIdentity {
    /// What to tell the caller: names the field, never the value.
    pub(crate) fn detail(self) -> &'static str {
        match self {
            BadIdentity::Repeated("user") => "the user identity header appears more than once",
            BadIdentity::Repeated("tenant") => "the tenant identity header appears more than once",
            BadIdentity::Repeated("mcp-method") => "the Mcp-Method header appears more than once",
            BadIdentity::Repeated("mcp-name") => "the Mcp-Name header appears more than once",
            BadIdentity::Repeated("cost") => "the cost header appears more than once",
            BadIdentity::InvalidCost => {
                "the cost header is not a whole number of units (ASCII digits, at most 19)"
            }
            BadIdentity::Repeated(_) => "the tool header appears more than once",
            BadIdentity::MalformedName => {
                "the Mcp-Name header's =?base64?...?= value is not base64 of UTF-8 text"
            }
            BadIdentity::HeaderMismatch => {
                "the Mcp-Method or Mcp-Name header does not match the JSON-RPC body"
            }
            BadIdentity::Unvalidated => {
                "Mcp-Method and Mcp-Name are trusted only with an MCP-Protocol-Version of \
                 2026-07-28 or later, whose servers check them against the body"
            }
            BadIdentity::TooLong("user") => "the user id is longer than 256 bytes",
            BadIdentity::TooLong(_) => "the tenant id is longer than 256 bytes",
        }
    }
}
