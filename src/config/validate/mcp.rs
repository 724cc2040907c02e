//! `[mcp]`: how refused MCP calls are answered, and how much of a body `McpLayer` reads.

use super::super::check::Check;
use super::super::model::{McpConfig, Refusal};
use super::super::schema::RawMcp;
use super::super::settings;

pub(super) fn mcp(c: &mut Check, m: &RawMcp) -> McpConfig {
    let refusal: Refusal = c.choice("mcp.refusal", &m.refusal);
    let max_body = c.size(&settings::MAX_BODY, &m.max_body) as usize;
    c.unknown("mcp.", &m.unknown);
    McpConfig { refusal, max_body }
}
