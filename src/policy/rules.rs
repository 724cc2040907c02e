//! The configured rates, compiled for lookup: the base rules and each tier's overrides as
//! [`RuleSet`]s, tools and prompts by number (with their `[cost]` prices), and each
//! `[tenants]` entry's tier.

use std::fmt;
use std::sync::Arc;

use hashbrown::HashMap;

use crate::config::RateLimitConfig;
use crate::rate::Rate;
use crate::tool_path::percent_decode_into;

/// The configured rates, ready for lookup: the base rules, each tier's overrides, the
/// tenants' tiers, every tool any of them names (by number), and the MCP prompts.
pub(crate) struct Rules {
    pub(crate) base: RuleSet,
    tiers: Vec<(Box<str>, RuleSet)>,
    tier_index: HashMap<Box<str>, u32>,
    tenants: HashMap<Box<[u8]>, u32>,
    tools: Names,
    /// Each tool's `[cost.tools]` price, by number.
    tool_costs: Vec<Option<u64>>,
    /// `[by_prompt]` (prompts have no tiers and no per-user rule) and `[cost.prompts]`:
    /// names, rates and prices.
    prompts: Names,
    prompt_rates: Vec<Option<Rate>>,
    prompt_costs: Vec<Option<u64>>,
}

/// Normalised names (tools, or prompts), numbered in the order first named.
#[derive(Default)]
struct Names {
    numbers: HashMap<Box<str>, u32>,
    /// Shared, so a metric label takes a name without copying it.
    names: Vec<Arc<str>>,
}

/// Longest name normalised without allocating.
const NAME_STACK: usize = 64;

impl Names {
    fn add(&mut self, name: &str) {
        if !self.numbers.contains_key(name) {
            self.numbers.insert(name.into(), self.names.len() as u32);
            self.names.push(name.into());
        }
    }

    /// The number of the name matching `raw` (already trimmed) after lower-casing (and
    /// percent-decoding, for a name taken from the path). ASCII names up to 64 bytes are
    /// folded on the stack.
    fn find(&self, raw: &[u8], encoded: bool) -> Option<u32> {
        if self.numbers.is_empty() {
            return None;
        }
        if encoded && raw.contains(&b'%') {
            let mut decoded = Vec::new();
            percent_decode_into(raw, &mut decoded);
            return self.find(decoded.trim_ascii(), false);
        }
        if raw.is_ascii() && raw.len() <= NAME_STACK {
            let mut buf = [0u8; NAME_STACK];
            let folded = &mut buf[..raw.len()];
            folded.copy_from_slice(raw);
            folded.make_ascii_lowercase();
            let name = std::str::from_utf8(folded).ok()?;
            return self.numbers.get(name).copied();
        }
        let name = std::str::from_utf8(raw).ok()?.trim().to_lowercase();
        self.numbers.get(name.as_str()).copied()
    }
}

impl Rules {
    pub(crate) fn new(cfg: &RateLimitConfig) -> Rules {
        let mut tools = Names::default();
        cfg.by_tool().for_each(|(n, _)| tools.add(n));
        cfg.by_user_tool().for_each(|(n, _)| tools.add(n));
        for (_, tier) in cfg.tiers() {
            tier.by_tool().for_each(|(n, _)| tools.add(n));
            tier.by_user_tool().for_each(|(n, _)| tools.add(n));
        }
        let cost = cfg.cost();
        cost.iter()
            .flat_map(|c| c.tools())
            .for_each(|(n, _)| tools.add(n));
        let table = |rates: &mut dyn Iterator<Item = (&str, Rate)>| {
            let mut out = vec![None; tools.names.len()];
            for (name, rate) in rates {
                out[tools.numbers[name] as usize] = Some(rate);
            }
            out
        };
        let base = RuleSet {
            user: cfg.by_user(),
            tenant: cfg.by_tenant(),
            tools: table(&mut cfg.by_tool()),
            user_tools: table(&mut cfg.by_user_tool()),
        };
        let tiers: Vec<(Box<str>, RuleSet)> = cfg
            .tiers()
            .map(|(name, tier)| {
                let set = RuleSet {
                    user: tier.by_user(),
                    tenant: tier.by_tenant(),
                    tools: table(&mut tier.by_tool()),
                    user_tools: table(&mut tier.by_user_tool()),
                };
                (name.into(), set)
            })
            .collect();
        let tier_index: HashMap<Box<str>, u32> = tiers
            .iter()
            .enumerate()
            .map(|(i, (name, _))| (name.clone(), i as u32))
            .collect();
        let tenants = cfg
            .tenants()
            .map(|(tenant, tier)| (tenant.as_bytes().into(), tier_index[tier]))
            .collect();
        let mut tool_costs = vec![None; tools.names.len()];
        for (name, units) in cost.iter().flat_map(|c| c.tools()) {
            tool_costs[tools.numbers[name] as usize] = Some(units);
        }
        let mut prompts = Names::default();
        cfg.by_prompt().for_each(|(n, _)| prompts.add(n));
        cost.iter()
            .flat_map(|c| c.prompts())
            .for_each(|(n, _)| prompts.add(n));
        let mut prompt_rates = vec![None; prompts.names.len()];
        for (name, rate) in cfg.by_prompt() {
            prompt_rates[prompts.numbers[name] as usize] = Some(rate);
        }
        let mut prompt_costs = vec![None; prompts.names.len()];
        for (name, units) in cost.iter().flat_map(|c| c.prompts()) {
            prompt_costs[prompts.numbers[name] as usize] = Some(units);
        }
        Rules {
            base,
            tiers,
            tier_index,
            tenants,
            tools,
            tool_costs,
            prompts,
            prompt_rates,
            prompt_costs,
        }
    }

    /// The number of the configured tool matching `raw` (trimmed; `encoded` when taken
    /// from the path).
    pub(crate) fn tool(&self, raw: &[u8], encoded: bool) -> Option<u32> {
        self.tools.find(raw, encoded)
    }

    /// The normalised name of tool number `index`.
    pub(crate) fn tool_name(&self, index: u32) -> &str {
        &self.tools.names[index as usize]
    }

    /// Every configured tool's name, by number, shared (a metric label takes one without
    /// copying it).
    pub(crate) fn tool_names(&self) -> &[Arc<str>] {
        &self.tools.names
    }

    /// Every `[by_prompt]` prompt's name, by number, shared.
    pub(crate) fn prompt_names(&self) -> &[Arc<str>] {
        &self.prompts.names
    }

    /// Every tier's name, in tier order.
    pub(crate) fn tier_names(&self) -> impl Iterator<Item = &str> {
        self.tiers.iter().map(|(name, _)| &**name)
    }

    /// The configured prompt matching `raw` (trimmed): its number and rate.
    pub(crate) fn prompt(&self, raw: &[u8]) -> Option<(u32, Option<Rate>)> {
        let i = self.prompts.find(raw, false)?;
        Some((i, self.prompt_rates[i as usize]))
    }

    /// Tool number `index`'s `[cost.tools]` price.
    pub(crate) fn tool_cost(&self, index: u32) -> Option<u64> {
        self.tool_costs[index as usize]
    }

    /// Prompt number `index`'s `[cost.prompts]` price.
    pub(crate) fn prompt_cost(&self, index: u32) -> Option<u64> {
        self.prompt_costs[index as usize]
    }

    /// The normalised name of prompt number `index`.
    pub(crate) fn prompt_name(&self, index: u32) -> &str {
        &self.prompts.names[index as usize]
    }

    /// The tier named `name`, if configured.
    pub(crate) fn tier_named(&self, name: &str) -> Option<u32> {
        if self.tier_index.is_empty() {
            return None;
        }
        self.tier_index.get(name).copied()
    }

    /// The tier `[tenants]` puts `tenant` in.
    pub(crate) fn tenant_tier(&self, tenant: &[u8]) -> Option<u32> {
        if self.tenants.is_empty() {
            return None;
        }
        self.tenants.get(tenant).copied()
    }

    /// A tier's name and rules.
    pub(crate) fn tier(&self, index: u32) -> (&str, &RuleSet) {
        let (name, set) = &self.tiers[index as usize];
        (name, set)
    }
}

/// A compiled rule set: the base rules, or one tier's overrides. Tool rates are indexed
/// by the tool's number in [`Rules`].
pub(crate) struct RuleSet {
    pub(crate) user: Option<Rate>,
    pub(crate) tenant: Option<Rate>,
    pub(crate) tools: Vec<Option<Rate>>,
    pub(crate) user_tools: Vec<Option<Rate>>,
}

impl fmt::Debug for RuleSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuleSet")
            .field("user", &self.user)
            .field("tenant", &self.tenant)
            .field("tools", &self.tools.iter().flatten().count())
            .field("user_tools", &self.user_tools.iter().flatten().count())
            .finish()
    }
}
