//! The rules: `by_user`, `by_tenant`, `[by_tool]`, `[by_prompt]`, `[by_user_tool]`, and
//! the `algorithm` that counts them (which must compute every configured rate exactly).

use std::collections::BTreeMap;

use super::super::check::Check;
use super::super::model::TierConfig;
use super::super::schema::Raw;
use super::tiers::rules_with_fields;
use crate::algorithm::Algorithm;
use crate::rate::Rate;

/// The base rules, checked.
pub(super) struct Rules {
    pub(super) by_user: Option<Rate>,
    pub(super) by_tenant: Option<Rate>,
    pub(super) by_tool: BTreeMap<String, Rate>,
    pub(super) by_prompt: BTreeMap<String, Rate>,
    pub(super) by_user_tool: BTreeMap<String, Rate>,
}

pub(super) fn rules(c: &mut Check, raw: &Raw) -> Rules {
    Rules {
        by_user: c.rate("by_user", &raw.by_user),
        by_tenant: c.rate("by_tenant", &raw.by_tenant),
        by_tool: c.names("by_tool", "tool", &raw.by_tool),
        by_prompt: c.names("by_prompt", "prompt", &raw.by_prompt),
        by_user_tool: c.names("by_user_tool", "tool", &raw.by_user_tool),
    }
}

/// Reports every rate, base or a tier's, that `algorithm` cannot compute exactly.
pub(super) fn supported(
    c: &mut Check,
    algorithm: Algorithm,
    rules: &Rules,
    tiers: &BTreeMap<String, TierConfig>,
) {
    let mut all: Vec<(String, Rate)> = rules
        .by_user
        .map(|r| ("by_user".to_owned(), r))
        .into_iter()
        .chain(rules.by_tenant.map(|r| ("by_tenant".to_owned(), r)))
        .chain(
            rules
                .by_tool
                .iter()
                .map(|(name, r)| (format!("by_tool[{name:?}]"), *r)),
        )
        .chain(
            rules
                .by_prompt
                .iter()
                .map(|(name, r)| (format!("by_prompt[{name:?}]"), *r)),
        )
        .chain(
            rules
                .by_user_tool
                .iter()
                .map(|(name, r)| (format!("by_user_tool[{name:?}]"), *r)),
        )
        .collect();
    for (name, tier) in tiers {
        all.extend(rules_with_fields(tier, name));
    }
    for (field, rate) in all {
        if !algorithm.supports(rate) {
            c.err.push(
                field,
                format!("rate \"{rate}\" is too large for sliding_window: count × period in milliseconds must not exceed 2^53"),
            );
        }
    }
}
