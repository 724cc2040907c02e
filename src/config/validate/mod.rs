//! Validation: the schema (`Raw`) checked section by section into the model, every
//! problem reported at once, each naming its field. One checker per section: `rules`,
//! `tiers` (and `[tenants]`), `identity`, `mcp`, `cost`, `backend`.

mod backend;
mod cost;
mod identity;
mod mcp;
mod rules;
mod tiers;

#[cfg(feature = "redis")]
pub(crate) use backend::check_url;
#[cfg(test)]
pub(crate) use identity::canonical;
pub(crate) use tiers::tier_field;

use super::check::Check;
use super::error::ConfigError;
use super::model::{FailMode, HeaderStyle, Mode, RateLimitConfig};
use super::schema::Raw;
use crate::algorithm::Algorithm;

impl TryFrom<Raw> for RateLimitConfig {
    type Error = ConfigError;

    fn try_from(raw: Raw) -> Result<RateLimitConfig, ConfigError> {
        let mut c = Check::default();
        let rules = rules::rules(&mut c, &raw);
        let tiers = tiers::tiers(&mut c, raw.tiers.as_ref());
        let tenants = tiers::tenants(&mut c, raw.tenants.as_ref(), &tiers);
        let algorithm: Algorithm = c.choice("algorithm", &raw.algorithm);
        let mode: Mode = c.choice("mode", &raw.mode);
        let fail_mode: FailMode = c.choice("fail_mode", &raw.fail_mode);
        let headers: HeaderStyle = c.choice("headers", &raw.headers);
        rules::supported(&mut c, algorithm, &rules, &tiers);
        let identity = identity::identity(&mut c, &raw);
        let mcp = raw.mcp.as_ref().map(|m| mcp::mcp(&mut c, m));
        let cost = raw.cost.as_ref().map(|raw| cost::cost(&mut c, raw));
        if identity.cost_header.is_some() && cost.is_none() {
            c.err.push(
                "identity.cost_header",
                "only used with a [cost] section (which turns budgets in units on)",
            );
        }
        let backend = backend::backend(&mut c, &raw.backend);

        c.unknown("", &raw.unknown);
        for (name, tier) in raw.tiers.iter().flatten() {
            let section = format!("{}.", tier_field(name));
            c.unknown(&section, &tier.unknown);
        }
        c.unknown("identity.", &raw.identity.unknown);
        c.unknown("backend.", &raw.backend.unknown);

        if !c.err.is_empty() {
            return Err(c.err);
        }
        Ok(RateLimitConfig {
            by_user: rules.by_user,
            by_tenant: rules.by_tenant,
            by_tool: rules.by_tool,
            by_prompt: rules.by_prompt,
            by_user_tool: rules.by_user_tool,
            tiers,
            tenants,
            algorithm,
            mode,
            fail_mode,
            headers,
            identity,
            mcp,
            cost,
            backend,
        })
    }
}
