//! `RateLimit<S>`: decides in `call`, answers 429 itself, forwards the rest.

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::Guard;
use bytes::Bytes;
use http::{Request, Response};
use tower_service::Service;

use crate::decision::Decision;
use crate::future::{Checking, ResponseFuture};
use crate::identity::{self, Target};
use crate::key::MAX_KEYS;
use crate::layer::{Policy, Shared};
use crate::mcp::jsonrpc::{no_call, FindCall, McpCall};
use crate::mcp::refusal;
use crate::response::{self, ResponseBody};
use crate::store::{Outcomes, StoreError, StoreErrorKind, StoreFuture, StoreRequest};
use crate::telemetry::{self, Decided, Started};
use crate::{FailMode, Key, Mode, Rate, RuleKind, Subject};

/// The rate-limiting service; see [`RateLimitLayer`](crate::RateLimitLayer).
///
/// Over the limit it answers `429` itself (an ordinary response, so `Error = S::Error`);
/// otherwise it calls the inner service and adds rate headers to its response.
pub struct RateLimit<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> RateLimit<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        RateLimit { inner, shared }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The policy in force now: a request loads it once and keeps it to its end.
    pub(crate) fn policy(&self) -> Guard<Arc<Policy>> {
        self.shared.live.policy.load()
    }
}

impl<S: Clone> Clone for RateLimit<S> {
    fn clone(&self) -> Self {
        RateLimit {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for RateLimit<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// Which rules a request is counted under: at most one each of user, tenant, tool and
/// user×tool.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan {
    rules: [Option<(RuleKind, Rate)>; MAX_KEYS],
    /// The tool or prompt whose rule applies (for the refusal's detail).
    tool: Option<(Target, u32)>,
    pub(crate) now: u64,
}

/// What to do with a request once the store has answered.
pub(crate) enum Action {
    /// Answer without calling the inner service.
    Respond(Response<Bytes>),
    /// Call the inner service; add the decision's headers to its response, if any.
    Forward(Option<Decision>),
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for RateLimit<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let policy = self.policy();
        self.call_with(req, no_call::<ReqB>, policy)
    }
}

impl<S> RateLimit<S> {
    /// [`Service::call`] on `policy` (loaded by the caller, so that
    /// [`McpLayer`](crate::McpLayer) reads the body and counts the request on one
    /// version), finding the JSON-RPC call it read from the body with `find` (in the body
    /// itself: no request extension, no allocation).
    pub(crate) fn call_with<ReqB, ResB>(
        &mut self,
        req: Request<ReqB>,
        find: FindCall<ReqB>,
        policy: Guard<Arc<Policy>>,
    ) -> ResponseFuture<S, ReqB>
    where
        S: Service<Request<ReqB>, Response = Response<ResB>> + Clone,
    {
        let shared = &*self.shared;
        if policy.mode == Mode::Disabled {
            telemetry::gauges(|| shared.clock.now_micros());
            return ResponseFuture::calling(self.inner.call(req), None, shared.decorate(&policy));
        }
        let now = shared.clock.now_micros();
        telemetry::gauges(|| now);
        let call = find(&req);
        let who = match identity::extract(&req, &policy.identity, policy.mcp_headers, call) {
            Ok(who) => who,
            Err(bad) if policy.mode == Mode::Enforce => {
                if let Some(suppressed) = shared.health.identity_log.may_log(now) {
                    tracing::debug!(
                        reason = bad.detail(),
                        suppressed,
                        "tollgate: refused an ambiguous identity"
                    );
                }
                policy.count(Decided::InvalidIdentity, None, None);
                return ResponseFuture::respond(response::bad_identity(bad.detail()));
            }
            Err(bad) => {
                if let Some(suppressed) = shared.health.identity_log.may_log(now) {
                    tracing::warn!(
                        reason = bad.detail(),
                        suppressed,
                        "tollgate: a refused identity field counted as absent (permissive)"
                    );
                }
                identity::extract_lenient(&req, &policy.identity, policy.mcp_headers, call)
            }
        };

        let placeholder = Key::new(
            RuleKind::User,
            Subject::Anonymous,
            Rate::per_second(1),
            policy.algorithm,
        );
        let mut keys = [placeholder; MAX_KEYS];
        let mut plan = Plan {
            rules: [None; MAX_KEYS],
            tool: None,
            now,
        };
        let (n, tool) =
            crate::plan::keys(shared, &policy, &req, &who, now, &mut keys, &mut plan.rules);
        plan.tool = tool;
        if n == 0 {
            policy.count(Decided::Allowed, None, None);
            let decision = Decision::unlimited(now);
            return ResponseFuture::calling(
                self.inner.call(req),
                Some(decision),
                shared.decorate(&policy),
            );
        }

        let request = StoreRequest::new(&keys[..n], now);
        let started = Started::now();
        let answer = catch_unwind(AssertUnwindSafe(|| shared.store.check(&request)))
            .unwrap_or_else(|_| StoreFuture::Ready(Err(panicked())));
        match answer {
            // Read in place: the answer is a few hundred bytes.
            StoreFuture::Ready(ref result) => {
                started.answered(&policy.metrics);
                match act(shared, &policy, &plan, result, &req, call) {
                    Action::Respond(resp) => ResponseFuture::respond(resp),
                    Action::Forward(decision) => ResponseFuture::calling(
                        self.inner.call(req),
                        decision,
                        shared.decorate(&policy),
                    ),
                }
            }
            StoreFuture::Pending(check) => {
                // The instance polled ready goes with the request; this one is a fresh clone.
                let clone = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, clone);
                let policy = Guard::into_inner(policy);
                let checking = Checking {
                    check,
                    started,
                    svc: Some(ready),
                    req: Some(req),
                    shared: self.shared.clone(),
                    policy,
                    plan,
                    find,
                };
                ResponseFuture::checking(checking)
            }
        }
    }
}

fn miscounted() -> StoreError {
    StoreError::new(
        StoreErrorKind::Protocol,
        "the store answered for a different number of keys",
    )
}

pub(crate) fn panicked() -> StoreError {
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
        Err(error) => return store_failed(shared, policy, plan, error),
    };
    // One answer per key, in key order, or the store is broken.
    if outcomes.len() != plan.rules.iter().flatten().count() {
        return store_failed(shared, policy, plan, &miscounted());
    }
    let decision = Decision::new(&plan.rules, outcomes.slots(), plan.now);
    let count = |decided| policy.count(decided, decision.rule(), plan.tool);
    if decision.is_allowed() {
        count(Decided::Allowed);
        return Action::Forward(Some(decision));
    }
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
            let mut resp = call
                .and_then(|call| {
                    refusal::refuse(
                        policy.refusal,
                        policy.headers,
                        &decision,
                        call,
                        named,
                        req.headers(),
                    )
                })
                .unwrap_or_else(|| response::too_many_requests(policy.headers, &decision, named));
            if shared.insert_decision {
                resp.extensions_mut().insert(decision);
            }
            Action::Respond(resp)
        }
    }
}

fn store_failed(shared: &Shared, policy: &Policy, plan: &Plan, error: &StoreError) -> Action {
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
        Action::Respond(response::backend_unavailable())
    } else {
        Action::Forward(None)
    }
}
