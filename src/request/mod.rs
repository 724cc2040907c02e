//! Reading a request: who calls (the `Identity` extension or configured headers), its
//! client address (`by_ip`), which tool or MCP prompt it calls (the `ToolName` extension,
//! the path, a header, the `Mcp-*` headers or the JSON-RPC body), and why an identity may
//! be refused. Nothing here counts or decides.

pub(crate) mod client_ip;
pub(crate) mod extensions;
pub(crate) mod identity;
pub(crate) mod jsonrpc;
pub(crate) mod mcp_body;
pub(crate) mod mcp_headers;
pub(crate) mod target;
