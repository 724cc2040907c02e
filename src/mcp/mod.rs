//! MCP-native limits: the tool or prompt of an MCP call from the SEP-2243 headers
//! (`Mcp-Method`, `Mcp-Name`) or from its JSON-RPC body ([`McpLayer`]), and refusals in
//! the form an agent reads (a tool result with `isError`, or a JSON-RPC error).

pub(crate) mod body;
pub(crate) mod headers;
pub(crate) mod jsonrpc;
pub(crate) mod layer;
pub(crate) mod refusal;
