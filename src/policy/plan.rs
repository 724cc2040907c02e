//! Which counters a request is checked against: the tier picks each rule's rate, an
//! anonymous caller may become its client network, and up to four keys are built in rule
//! order user, tenant, tool, user×tool (ARCHITECTURE.md, behaviour contract items 1, 16
//! and 17). Keys borrow from the request and the compiled rules: nothing is allocated.

use http::Request;

use super::Policy;
use crate::config::Anonymous;
use crate::key::{Key, RuleKind, Subject, MAX_KEYS};
use crate::log_gate::LogGate;
use crate::rate::Rate;
use crate::request::client_ip;
use crate::request::extensions::Tier;
use crate::request::identity::{self, Who};
use crate::request::jsonrpc::McpCall;
use crate::request::target::BadIdentity;
use crate::request::target::Target;

/// Which rules a request is counted under: at most one each of user, tenant, tool and
/// user×tool.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan {
    pub(crate) rules: [Option<(RuleKind, Rate)>; MAX_KEYS],
    /// The tool or prompt whose rule applies (for the refusal's detail).
    pub(crate) tool: Option<(Target, u32)>,
    pub(crate) now: u64,
    /// What the call costs, in units.
    pub(crate) cost: u64,
}

/// The warnings building a plan may log, each kept to about a line a second: a client can
/// cause both (ARCHITECTURE.md, behaviour contract item 13).
#[derive(Debug, Default)]
pub(crate) struct Warnings {
    /// `Tier` extensions naming no configured tier.
    pub(crate) unknown_tier: LogGate,
    /// `anonymous = "by_ip"` requests without a peer address.
    pub(crate) no_peer: LogGate,
}

/// Fills `keys` and `rules_out` (the first `n` slots) for `req`; returns `n`, the tool
/// or MCP prompt whose rule applies (for the refusal's detail), if any, and what the call
/// costs in units: its `Cost` extension or cost header, else its tool's or prompt's
/// `[cost]` price, else 1. A prompt (`[by_prompt]`) takes the tool's place: one shared
/// counter per prompt, no tiers.
/// Keys to be filled by [`keys`]: every slot a placeholder until then.
#[inline(always)]
pub(crate) fn blank_keys<'r>(algorithm: crate::algorithm::Algorithm) -> [Key<'r>; MAX_KEYS] {
    let placeholder = Key::new(
        RuleKind::User,
        Subject::Anonymous,
        Rate::per_second(1),
        algorithm,
    );
    [placeholder; MAX_KEYS]
}

/// The keys of `req` found as its check found them (its identity read as `call`, the
/// policy and `mcp_headers`, whether the `Mcp-*` headers are read, say), with each key's rule; the number of keys and the tool whose rule applies.
/// Peek and reset find an identity's keys this way, and an outer layer the keys it counted
/// a request under.
#[allow(clippy::too_many_arguments)]
pub(crate) fn keys_of<'r, B>(
    warnings: &Warnings,
    policy: &'r Policy,
    req: &'r Request<B>,
    call: Option<McpCall<'r>>,
    mcp_headers: bool,
    now: u64,
    keys_out: &mut [Key<'r>; MAX_KEYS],
    rules_out: &mut [Option<(RuleKind, Rate)>; MAX_KEYS],
) -> Result<(usize, Option<(Target, u32)>), BadIdentity> {
    let who = identity::extract(req, &policy.identity, mcp_headers, policy.costed, call)?;
    let (n, tool, _) = keys(warnings, policy, req, &who, now, keys_out, rules_out);
    Ok((n, tool))
}

pub(crate) fn keys<'r, B>(
    warnings: &Warnings,
    policy: &'r Policy,
    req: &'r Request<B>,
    who: &Who<'r>,
    now: u64,
    keys: &mut [Key<'r>; MAX_KEYS],
    rules_out: &mut [Option<(RuleKind, Rate)>; MAX_KEYS],
) -> (usize, Option<(Target, u32)>, u64) {
    let rules = &policy.rules;
    // The tier: the app's `Tier` extension, else `[tenants]`; a tier's own rules count
    // in counters of their own (the tier is in the key), the rules it does not name are
    // the base rules and their counters.
    let tier = match req.extensions().get::<Tier>() {
        Some(t) => rules.tier_named(t.as_str()).or_else(|| {
            if let Some(suppressed) = warnings.unknown_tier.may_log(now) {
                tracing::warn!(
                    suppressed,
                    "tollgate: a Tier extension names no configured tier; the base rules apply"
                );
            }
            None
        }),
        None => who.tenant.and_then(|t| rules.tenant_tier(t)),
    }
    .map(|i| rules.tier(i));
    let pick = |base: Option<Rate>, over: Option<Rate>| match (over, tier) {
        (Some(rate), Some((name, _))) => Some((rate, Some(name))),
        _ => base.map(|rate| (rate, None)),
    };
    let called = |target| who.tool.as_ref().filter(|t| t.target == target);
    let tool = called(Target::Tool)
        .and_then(|t| rules.tool(&t.name, who.tool_from_path))
        .map(|i| (i, rules.tool_name(i)));
    let prompt = called(Target::Prompt).and_then(|p| rules.prompt(&p.name));
    let cost = who
        .cost
        .or_else(|| tool.and_then(|(i, _)| rules.tool_cost(i)))
        .or_else(|| prompt.and_then(|(i, _)| rules.prompt_cost(i)))
        .unwrap_or(1);
    let prompt = prompt.and_then(|(i, rate)| Some((i, rate?, rules.prompt_name(i))));
    let set = tier.map(|(_, set)| set);
    let user_rule = pick(rules.base.user, set.and_then(|s| s.user));
    let tenant_rule = pick(rules.base.tenant, set.and_then(|s| s.tenant));
    let tool_rule = tool.and_then(|(i, _)| {
        let i = i as usize;
        pick(rules.base.tools[i], set.and_then(|s| s.tools[i]))
    });
    let user_tool_rule = tool.and_then(|(i, _)| {
        let i = i as usize;
        pick(rules.base.user_tools[i], set.and_then(|s| s.user_tools[i]))
    });
    // Anonymous callers by client address, looked up only when a per-user rule applies.
    let user = match who.user {
        Subject::Anonymous
            if policy.identity.anonymous == Anonymous::ByIp
                && (user_rule.is_some() || user_tool_rule.is_some()) =>
        {
            client_ip::subject(req, &policy.identity).unwrap_or_else(|| {
                if let Some(suppressed) = warnings.no_peer.may_log(now) {
                    tracing::warn!(
                        suppressed,
                        "tollgate: anonymous = \"by_ip\" but the request carries no peer address, so it counts in the shared anonymous bucket: serve axum with `into_make_service_with_connect_info::<SocketAddr>()` (tollgate's `axum` feature, on by default), or insert the peer's `SocketAddr` into the request extensions (plain hyper)"
                    );
                }
                Subject::Anonymous
            })
        }
        user => user,
    };
    let alg = policy.algorithm;
    // Each key is written straight into its slot, in rule order.
    let mut n = 0;
    let mut push = |key: Key<'r>| {
        rules_out[n] = Some((key.kind, key.rate));
        keys[n] = key;
        n += 1;
    };
    if let Some((rate, tier)) = user_rule {
        push(tiered(Key::new(RuleKind::User, user, rate, alg), tier));
    }
    if let (Some(tenant), Some((rate, tier))) = (who.tenant, tenant_rule) {
        push(tiered(
            Key::new(RuleKind::Tenant, Subject::Named(tenant), rate, alg),
            tier,
        ));
    }
    match (tool, tool_rule, prompt) {
        (Some((_, name)), Some((rate, tier)), _) => push(tiered(
            Key::new(RuleKind::Tool, Subject::Named(name.as_bytes()), rate, alg),
            tier,
        )),
        (_, _, Some((_, rate, name))) => push(Key::new(
            RuleKind::Prompt,
            Subject::Named(name.as_bytes()),
            rate,
            alg,
        )),
        _ => {}
    }
    if let (Some((_, name)), Some((rate, tier))) = (tool, user_tool_rule) {
        push(tiered(Key::user_tool(user, name, rate, alg), tier));
    }
    let named = tool
        .filter(|_| tool_rule.is_some() || user_tool_rule.is_some())
        .map(|(i, _)| (Target::Tool, i))
        .or(prompt.map(|(i, _, _)| (Target::Prompt, i)));
    (n, named, cost)
}

/// `key` under `tier`'s rule, when the rule came from a tier.
fn tiered<'k>(key: Key<'k>, tier: Option<&'k str>) -> Key<'k> {
    match tier {
        Some(name) => key.with_tier(name),
        None => key,
    }
}
