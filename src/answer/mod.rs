//! What tollgate says: the [`Decision`](decision::Decision) one request's rules add up to,
//! the rate headers that state it, the answers it writes itself (429, 503, 400, and a
//! refused MCP call in MCP form), and the response body type.

pub(crate) mod body;
pub(crate) mod decision;
pub(crate) mod headers;
pub(crate) mod mcp;
pub(crate) mod problem;
