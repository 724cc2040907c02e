//! What happens to a request once the store has answered: forwarded with its decision,
//! answered here (429, or 503 when failing closed), or forwarded undecided (fail-open)
//! (ARCHITECTURE.md, behaviour contract items 7–11).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::header::{HeaderValue, RETRY_AFTER};
use http::{Request, Response};

use super::hooks::{Refused, RequestView};
use super::shared::Shared;
use crate::answer::decision::Decision;
use crate::answer::headers::write_headers;
use crate::answer::mcp;
use crate::config::{FailMode, Mode};
use crate::key::RuleKind;
use crate::policy::metrics::Decided;
use crate::policy::plan::Plan;
use crate::policy::Policy;
use crate::request::jsonrpc::McpCall;
use crate::request::target::Target;
use crate::store::{Outcomes, StoreError, StoreErrorKind};

/// What to do with a request once the store has answered.
pub(crate) enum Action {
    /// Answer without calling the inner service.
    Respond(Response<Bytes>),
    /// Call the inner service; add the decision's headers to its response, if any.
    Forward(Option<Decision>),
}

fn miscounted() -> StoreError {
    StoreError::new(
        StoreErrorKind::Protocol,
        "the store answered for a different number of keys",
    )
}

pub(super) fn panicked() -> StoreError {
    StoreError::new(StoreErrorKind::Internal, "the store panicked")
}

/// Turns the store's answer into what happens to the request (ARCHITECTURE.md, behaviour
/// contract items 7–11).
pub(crate) fn act<B>(
    shared: &Shared,
    policy: &Policy,
    plan: &Plan,
    result: &Result<Outcomes, StoreError>,
    req: &Request<B>,
    call: Option<McpCall<'_>>,
) -> Action {
    let outcomes = match result {
        Ok(outcomes) => outcomes,
        Err(error) => return store_failed(shared, policy, plan, error, req),
    };
    // One answer per key, in key order, or the store is broken.
    if outcomes.len() != plan.rules.iter().flatten().count() {
        return store_failed(shared, policy, plan, &miscounted(), req);
    }
    let decision = Decision::new(&plan.rules, outcomes.slots(), plan.now, plan.cost);
    if decision.is_allowed() {
        policy.count(Decided::Allowed, decision.rule(), plan.tool);
        policy.charged(&plan.rules, plan.cost);
        return Action::Forward(Some(decision));
    }
    refused(shared, policy, plan, decision, req, call)
}

/// The store's answer for a forwarded request that its rules allowed, so counted (a
/// `Charge` settles it, a `Refund` gives it back); `None` when nothing was counted
/// (permissive mode's refusals, a failed store, no decision).
pub(crate) fn counted(
    decision: Option<Decision>,
    result: &Result<Outcomes, StoreError>,
) -> Option<&Outcomes> {
    match (decision, result) {
        (Some(d), Ok(outcomes)) if d.is_allowed() => Some(outcomes),
        _ => None,
    }
}

/// A refused call (its rules refused it, or it costs more than one's whole limit): in
/// enforce mode the 429 (in MCP form for a call `McpLayer` read), in permissive mode a
/// logged forward.
pub(crate) fn refused<B>(
    shared: &Shared,
    policy: &Policy,
    plan: &Plan,
    decision: Decision,
    req: &Request<B>,
    call: Option<McpCall<'_>>,
) -> Action {
    let count = |decided| policy.count(decided, decision.rule(), plan.tool);
    let named = plan.tool.map(|(target, i)| match target {
        Target::Tool => (RuleKind::Tool, policy.rules.tool_name(i)),
        Target::Prompt => (RuleKind::Prompt, policy.rules.prompt_name(i)),
    });
    let tool = named.map(|(_, name)| name);
    let rule = decision.rule().map_or("", RuleKind::as_str);
    match policy.mode {
        Mode::Permissive => {
            count(Decided::ShadowLimited);
            // A client triggers this line: rate-limited like every other (ARCHITECTURE.md,
            // behaviour contract item 13).
            if let Some(suppressed) = shared.health.permissive_log.may_log(plan.now) {
                tracing::warn!(
                    rule,
                    tool = tool.unwrap_or(""),
                    suppressed,
                    "tollgate: rate limit exceeded; request forwarded (permissive mode)"
                );
            }
            Action::Forward(Some(decision))
        }
        _ => {
            count(Decided::Limited);
            if let Some(suppressed) = shared.health.refusal_log.may_log(plan.now) {
                tracing::debug!(
                    rule,
                    tool = tool.unwrap_or(""),
                    suppressed,
                    "tollgate: rate limit exceeded"
                );
            }
            // An MCP call McpLayer read is answered in MCP form (it carries the `id`).
            let mcp = call.and_then(|call| {
                mcp::refuse(
                    policy.refusal,
                    policy.headers,
                    &decision,
                    call,
                    named,
                    req.headers(),
                )
            });
            let mut resp = mcp.unwrap_or_else(|| {
                let refusal = Refused {
                    request: RequestView::of(req),
                    decision: Some(&decision),
                    style: policy.headers,
                    named,
                };
                answer(shared, &refusal, plan.now)
            });
            if shared.insert_decision {
                resp.extensions_mut().insert(decision);
            }
            Action::Respond(resp)
        }
    }
}

fn store_failed<B>(
    shared: &Shared,
    policy: &Policy,
    plan: &Plan,
    error: &StoreError,
    req: &Request<B>,
) -> Action {
    let health = &shared.health;
    health.store_errors.fetch_add(1, Ordering::Relaxed);
    let closed = policy.fail_mode == FailMode::Closed;
    let decided = if closed {
        Decided::FailClosed
    } else {
        Decided::FailOpen
    };
    policy.count(decided, None, plan.tool);
    if closed {
        health.fail_closed.fetch_add(1, Ordering::Relaxed);
    } else {
        health.fail_open.fetch_add(1, Ordering::Relaxed);
    }
    if let Some(suppressed) = health.log.may_log(plan.now) {
        tracing::error!(
            %error,
            suppressed,
            action = if closed { "503" } else { "forwarded" },
            "tollgate: rate-limit store failed"
        );
    }
    if closed {
        let refusal = Refused {
            request: RequestView::of(req),
            decision: None,
            style: policy.headers,
            named: None,
        };
        Action::Respond(answer(shared, &refusal, plan.now))
    } else {
        Action::Forward(None)
    }
}

/// The response to `refusal`: the application's hook's (with tollgate's rate headers
/// unless it opts out), else tollgate's own problem+json. A hook that panics is answered
/// with tollgate's own response, and logged (rate-limited).
fn answer(shared: &Shared, refusal: &Refused<'_>, now: u64) -> Response<Bytes> {
    let Some(hook) = &shared.on_refusal else {
        return refusal.default_response();
    };
    let Ok(mut resp) = catch_unwind(AssertUnwindSafe(|| hook.on_refusal(refusal))) else {
        if let Some(suppressed) = shared.health.refusal_log.may_log(now) {
            tracing::error!(
                suppressed,
                "tollgate: the on_refusal hook panicked; answered with tollgate's own refusal"
            );
        }
        return refusal.default_response();
    };
    if hook.rate_headers() {
        match refusal.decision {
            Some(decision) if !decision.exceeds_limit() => {
                write_headers(refusal.style, decision, resp.headers_mut(), true);
            }
            Some(_) => {}
            None => {
                resp.headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
        }
    }
    resp
}
