//! Tiers: named sets of rules that override the base rules for some tenants (`[tenants]`)
//! or for requests whose [`Tier`] extension names them. A tier overrides the rules it
//! names and inherits the rest; its own rules count in counters of their own (the tier is
//! part of the key), so tiers never mix counts.

use std::collections::BTreeMap;
use std::fmt;

use crate::config::{Check, RawTier, Scalar};
use crate::Rate;

/// The tier of a request, as the application's plan lookup established it. Insert it into
/// the request's extensions (next to [`Identity`](crate::Identity)); it wins over
/// `[tenants]`. A tier the config does not name counts under the base rules (logged,
/// rate-limited).
///
/// ```
/// use tollgate::{Identity, Tier};
/// let mut req = http::Request::new(());
/// req.extensions_mut().insert(Identity::user("alice").with_tenant("acme"));
/// req.extensions_mut().insert(Tier::new("pro"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Tier(pub String);

impl Tier {
    /// The tier called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Tier(name.into())
    }

    /// The tier's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One tier's rules (`[tiers.<name>]`): each is `None` (or absent from a table) when the
/// tier inherits the base rule.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TierConfig {
    by_user: Option<Rate>,
    by_tenant: Option<Rate>,
    by_tool: BTreeMap<String, Rate>,
    by_user_tool: BTreeMap<String, Rate>,
}

impl TierConfig {
    /// The tier's per-user rate, if it overrides `by_user`.
    pub fn by_user(&self) -> Option<Rate> {
        self.by_user
    }
    /// The tier's per-tenant rate, if it overrides `by_tenant`.
    pub fn by_tenant(&self) -> Option<Rate> {
        self.by_tenant
    }
    /// The tools whose `by_tool` rate the tier overrides.
    pub fn by_tool(&self) -> impl Iterator<Item = (&str, Rate)> + '_ {
        self.by_tool.iter().map(|(n, r)| (n.as_str(), *r))
    }
    /// The tools whose `by_user_tool` rate the tier overrides.
    pub fn by_user_tool(&self) -> impl Iterator<Item = (&str, Rate)> + '_ {
        self.by_user_tool.iter().map(|(n, r)| (n.as_str(), *r))
    }

    /// Every rate of the tier with the field naming it.
    pub(crate) fn rules_with_fields(&self, name: &str) -> Vec<(String, Rate)> {
        let section = tier_field(name);
        let mut rules = Vec::new();
        rules.extend(self.by_user.map(|r| (format!("{section}.by_user"), r)));
        rules.extend(self.by_tenant.map(|r| (format!("{section}.by_tenant"), r)));
        for (tool, r) in &self.by_tool {
            rules.push((format!("{section}.by_tool[{tool:?}]"), *r));
        }
        for (tool, r) in &self.by_user_tool {
            rules.push((format!("{section}.by_user_tool[{tool:?}]"), *r));
        }
        rules
    }
}

/// Longest tier name.
pub(crate) const MAX_TIER_NAME: usize = 32;

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
pub(crate) fn check_tiers(
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
                "a tier name is 1 to 32 letters, digits, '_' or '-'",
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
pub(crate) fn check_tenants(
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
        if trimmed.len() > crate::MAX_IDENTITY_LEN {
            c.err.push(
                field,
                "tenant id is longer than 256 bytes: no request can carry it",
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

/// A compiled rule set: the base rules, or one tier's overrides. Tool rates are indexed
/// by the tool's number in [`crate::layer::Rules`].
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
