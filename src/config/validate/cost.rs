//! `[cost]`: what each tool and prompt costs, in units (ARCHITECTURE.md, behaviour
//! contract item 19).

use super::super::check::Check;
use super::super::model::CostConfig;
use super::super::schema::RawCost;
use super::super::settings::MAX_COST;

pub(super) fn cost(c: &mut Check, raw: &RawCost) -> CostConfig {
    let tools = c.prices("cost.tools", "tool", &raw.tools, MAX_COST);
    let prompts = c.prices("cost.prompts", "prompt", &raw.prompts, MAX_COST);
    c.unknown("cost.", &raw.unknown);
    CostConfig { tools, prompts }
}
