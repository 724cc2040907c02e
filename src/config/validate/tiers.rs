//! `[tiers.*]` and `[tenants]`: each tier's rules, each tenant's tier; every problem named by
//! its field.

use std::collections::BTreeMap;

use super::super::check::Check;
use super::super::model::TierConfig;
use super::super::schema::{RawTier, Scalar};
use super::super::settings::{MAX_IDENTITY_LEN, MAX_TIER_NAME};
use crate::rate::Rate;

/// Whether `name` can name a tier: 1 to 32 of `[A-Za-z0-9_-]` (it is part of every key of
/// the tier's counters).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TIER_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// How a tier's section is named in messages: `tiers.pro`, or `tiers["odd name"]`.
pub(crate) fn tier_field(name: &str) -> String {
    if valid_name(name) {
        format!("tiers.{name}")
    } else {
        format!("tiers[{name:?}]")
    }
}

/// `[tiers.*]`, checked: every problem named by its field.
pub(super) fn tiers(
    c: &mut Check,
    raw: Option<&BTreeMap<String, RawTier>>,
) -> BTreeMap<String, TierConfig> {
    let mut tiers = BTreeMap::new();
    for (name, tier) in raw.into_iter().flatten() {
        let section = tier_field(name);
        let valid = valid_name(name);
        if !valid {
            c.err.push(
                section.clone(),
                format!("a tier name is 1 to {MAX_TIER_NAME} letters, digits, '_' or '-'"),
            );
        }
        let config = TierConfig {
            by_user: c.rate(&format!("{section}.by_user"), &tier.by_user),
            by_tenant: c.rate(&format!("{section}.by_tenant"), &tier.by_tenant),
            by_tool: c.names(&format!("{section}.by_tool"), "tool", &tier.by_tool),
            by_user_tool: c.names(
                &format!("{section}.by_user_tool"),
                "tool",
                &tier.by_user_tool,
            ),
        };
        if valid {
            tiers.insert(name.clone(), config);
        }
    }
    tiers
}

/// `[tenants]`: tenant id → the name of a configured tier.
pub(super) fn tenants(
    c: &mut Check,
    raw: Option<&BTreeMap<String, Scalar>>,
    tiers: &BTreeMap<String, TierConfig>,
) -> BTreeMap<String, String> {
    let mut tenants = BTreeMap::new();
    let mut written: BTreeMap<String, &str> = BTreeMap::new();
    for (tenant, tier) in raw.into_iter().flatten() {
        let field = format!("tenants[{tenant:?}]");
        let trimmed = tenant.trim_matches(|c: char| c.is_ascii_whitespace());
        let Some(tier) = c.text(&field, &Some(tier.clone())).map(str::to_owned) else {
            continue;
        };
        if trimmed.is_empty() {
            c.err.push(field, "tenant id is empty");
            continue;
        }
        if trimmed.len() > MAX_IDENTITY_LEN {
            c.err.push(
                field,
                format!(
                    "tenant id is longer than {MAX_IDENTITY_LEN} bytes: no request can carry it"
                ),
            );
            continue;
        }
        if let Some(first) = written.get(trimmed) {
            c.err.push(
                field,
                format!("same tenant as tenants[{first:?}] after trimming"),
            );
            continue;
        }
        written.insert(trimmed.to_owned(), tenant);
        if !tiers.contains_key(&tier) {
            let known: Vec<&str> = tiers.keys().map(String::as_str).collect();
            let expected = if known.is_empty() {
                "no [tiers.<name>] section is configured".to_owned()
            } else {
                format!("expected one of {}", known.join(", "))
            };
            c.err
                .push(field, format!("unknown tier {tier:?}: {expected}"));
            continue;
        }
        tenants.insert(trimmed.to_owned(), tier);
    }
    tenants
}

/// Every rate of the tier with the field naming it.
pub(super) fn rules_with_fields(tier: &TierConfig, name: &str) -> Vec<(String, Rate)> {
    let section = tier_field(name);
    let mut rules = Vec::new();
    rules.extend(tier.by_user.map(|r| (format!("{section}.by_user"), r)));
    rules.extend(tier.by_tenant.map(|r| (format!("{section}.by_tenant"), r)));
    for (tool, r) in &tier.by_tool {
        rules.push((format!("{section}.by_tool[{tool:?}]"), *r));
    }
    for (tool, r) in &tier.by_user_tool {
        rules.push((format!("{section}.by_user_tool[{tool:?}]"), *r));
    }
    rules
}
