//! Peek and reset (ARCHITECTURE.md, behaviour contract item 20): what every rule would say
//! for a call now, read without counting (a check of cost 0), and forgetting a call's
//! counters. The keys are found as a request's are, from a request made up of the
//! identity and the tool.

use std::fmt;
use std::time::Duration;

use http::Request;

use super::shared::Shared;
use crate::key::{Key, RuleKind, MAX_KEYS};
use crate::policy::plan;
use crate::policy::Policy;
use crate::rate::Rate;
use crate::request::extensions::{Identity, ToolName};
use crate::store::{SettleFuture, StoreError, StoreErrorKind, StoreFuture, StoreRequest};

/// One rule as [`RateLimitHandle::peek`](crate::RateLimitHandle::peek) found it.
#[derive(Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RuleState {
    /// The rule: user, tenant, tool or user × tool.
    pub rule: RuleKind,
    /// Its rate (for the identity's tier).
    pub limit: Rate,
    /// Units left now (0 when it refuses, or is in debt).
    pub remaining: u64,
    /// Until the rule is back to its whole limit (fixed window: the window's end).
    pub reset_after: Duration,
}

impl fmt::Debug for RuleState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuleState")
            .field("rule", &self.rule)
            .field("limit", &self.limit.to_string())
            .field("remaining", &self.remaining)
            .field("reset_after", &self.reset_after)
            .finish()
    }
}

/// A made-up request for `identity` calling `tool`: the keys come from it as from a real
/// one.
fn request(identity: &Identity, tool: Option<&str>) -> Request<()> {
    let mut req = Request::new(());
    req.extensions_mut().insert(identity.clone());
    if let Some(tool) = tool {
        req.extensions_mut().insert(ToolName::new(tool));
    }
    req
}

/// Runs `with` on the keys of `identity` calling `tool` under `policy`, with each key's
/// rule; an identity tollgate would refuse (over-long) is an error naming no value.
fn with_keys<R>(
    shared: &Shared,
    policy: &Policy,
    identity: &Identity,
    tool: Option<&str>,
    now: u64,
    with: impl FnOnce(&[Key<'_>], &[(RuleKind, Rate)]) -> R,
) -> Result<R, StoreError> {
    let req = request(identity, tool);
    let mut keys = plan::blank_keys(policy.algorithm);
    let mut rules = [None; MAX_KEYS];
    let (n, _) = plan::keys_of(
        &shared.health.plan,
        policy,
        &req,
        None,
        false,
        now,
        &mut keys,
        &mut rules,
    )
    .map_err(|bad| StoreError::new(StoreErrorKind::Unsupported, bad.detail()))?;
    let mut kinds = [(RuleKind::User, Rate::per_second(1)); MAX_KEYS];
    for (slot, rule) in kinds.iter_mut().zip(rules.iter().flatten()) {
        *slot = *rule;
    }
    Ok(with(&keys[..n], &kinds[..n]))
}

pub(crate) async fn peek(
    shared: &Shared,
    policy: &Policy,
    identity: &Identity,
    tool: Option<&str>,
) -> Result<Vec<RuleState>, StoreError> {
    let now = shared.clock.now_micros();
    let (answer, rules) = with_keys(shared, policy, identity, tool, now, |keys, rules| {
        let request = StoreRequest::new(keys, now).with_cost(0);
        (shared.store.check(&request), rules.to_vec())
    })?;
    if rules.is_empty() {
        return Ok(Vec::new());
    }
    let outcomes = match answer {
        StoreFuture::Ready(result) => result?,
        StoreFuture::Pending(check) => check.await?,
    };
    Ok(rules
        .iter()
        .zip(outcomes.iter())
        .map(|(&(rule, limit), outcome)| RuleState {
            rule,
            limit,
            remaining: outcome.remaining(),
            reset_after: outcome.reset_after(),
        })
        .collect())
}

pub(crate) async fn reset(
    shared: &Shared,
    policy: &Policy,
    identity: &Identity,
    tool: Option<&str>,
) -> Result<(), StoreError> {
    let now = shared.clock.now_micros();
    let answer = with_keys(shared, policy, identity, tool, now, |keys, _| {
        (!keys.is_empty()).then(|| shared.store.reset(keys))
    })?;
    match answer {
        None | Some(SettleFuture::Ready(Ok(()))) => Ok(()),
        Some(SettleFuture::Ready(Err(error))) => Err(error),
        Some(SettleFuture::Pending(task)) => task.await,
    }
}
