//! `RateLimit<S>`: decides in `call`, answers 429 itself, forwards the rest.

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::Guard;
use http::{Request, Response};
use tower_service::Service;

use super::act::{act, counted, panicked, refused, Action};
use super::charge::{attach, Charge};
use super::future::{Checking, ResponseFuture};
use super::hooks::RequestView;
use super::shared::Shared;
use super::stack::{self, Refund};
use crate::answer::body::ResponseBody;
use crate::answer::decision::Decision;
use crate::answer::problem;
use crate::config::Mode;
use crate::key::{OwnedKeys, MAX_KEYS};
use crate::policy::metrics::{self, Decided, Started};
use crate::policy::plan::{self, Plan};
use crate::policy::Policy;
use crate::request::identity;
use crate::request::jsonrpc::{no_call, FindCall};
use crate::store::{StoreFuture, StoreRequest};

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
        mut req: Request<ReqB>,
        find: FindCall<ReqB>,
        policy: Guard<Arc<Policy>>,
    ) -> ResponseFuture<S, ReqB>
    where
        S: Service<Request<ReqB>, Response = Response<ResB>> + Clone,
    {
        let shared = &*self.shared;
        if let Some(exempt) = &shared.exempt {
            if exempt(&RequestView::of(&req)) {
                return ResponseFuture::calling(
                    self.inner.call(req),
                    None,
                    shared.decorate(&policy),
                    Charge::uncounted(),
                    Refund::none(),
                );
            }
        }
        if policy.mode == Mode::Disabled {
            metrics::gauges(|| shared.clock.now_micros());
            let charge = policy.costed.then(Charge::uncounted);
            return {
                let charge = attach(shared, &mut req, charge, None);
                ResponseFuture::calling(
                    self.inner.call(req),
                    None,
                    shared.decorate(&policy),
                    charge,
                    Refund::none(),
                )
            };
        }
        let now = shared.clock.now_micros();
        metrics::gauges(|| now);
        let call = find(&req);
        let who = match identity::extract(
            &req,
            &policy.identity,
            policy.mcp_headers,
            policy.costed,
            call,
        ) {
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
                return ResponseFuture::respond(problem::bad_identity(bad.detail()), req);
            }
            Err(bad) => {
                if let Some(suppressed) = shared.health.identity_log.may_log(now) {
                    tracing::warn!(
                        reason = bad.detail(),
                        suppressed,
                        "tollgate: a refused identity field counted as absent (permissive)"
                    );
                }
                identity::extract_lenient(
                    &req,
                    &policy.identity,
                    policy.mcp_headers,
                    policy.costed,
                    call,
                )
            }
        };

        let mut keys = plan::blank_keys(policy.algorithm);
        let mut plan = Plan {
            rules: [None; MAX_KEYS],
            tool: None,
            now,
            cost: 1,
        };
        let (n, tool, cost) = plan::keys(
            &shared.health.plan,
            &policy,
            &req,
            &who,
            now,
            &mut keys,
            &mut plan.rules,
        );
        plan.tool = tool;
        plan.cost = cost;
        let charge = policy.costed.then(Charge::uncounted);
        if n == 0 {
            policy.count(Decided::Allowed, None, None);
            let decision = Decision::unlimited(now, cost);
            return {
                let charge = attach(shared, &mut req, charge, Some(&decision));
                ResponseFuture::calling(
                    self.inner.call(req),
                    Some(decision),
                    shared.decorate(&policy),
                    charge,
                    Refund::none(),
                )
            };
        }
        // A call that costs more than a rule's whole limit can never fit: refused here,
        // with nothing counted and no wait to state (ARCHITECTURE.md, behaviour contract
        // item 19).
        // (Without `[cost]` every call costs 1, which every rule fits.)
        let exceeded = if policy.costed {
            Decision::exceeded(&plan.rules, cost)
        } else {
            None
        };
        if let Some(rule) = exceeded {
            let decision = Decision::exceeding(&plan.rules, rule, now, cost);
            return match refused(shared, &policy, &plan, decision, &req, call) {
                Action::Respond(resp) => ResponseFuture::respond(resp, req),
                Action::Forward(decision) => {
                    let charge = attach(shared, &mut req, charge, decision.as_ref());
                    ResponseFuture::calling(
                        self.inner.call(req),
                        decision,
                        shared.decorate(&policy),
                        charge,
                        Refund::none(),
                    )
                }
            };
        }

        let request = StoreRequest::new(&keys[..n], now).with_cost(cost);
        let started = Started::now();
        let answer = catch_unwind(AssertUnwindSafe(|| shared.store.check(&request)))
            .unwrap_or_else(|_| StoreFuture::Ready(Err(panicked())));
        match answer {
            // Read in place: the answer is a few hundred bytes.
            StoreFuture::Ready(ref result) => {
                started.answered(&policy.metrics);
                match act(shared, &policy, &plan, result, &req, call) {
                    Action::Respond(resp) => ResponseFuture::respond(resp, req),
                    Action::Forward(decision) => {
                        let counted = counted(decision, result);
                        let refund = counted.map_or_else(Refund::none, |outcomes| {
                            Refund::ready(shared, &policy, &plan, &keys[..n], outcomes)
                        });
                        let charge = charge.map(|uncounted| match counted {
                            Some(outcomes) if cost > 0 => {
                                Charge::counted(&self.shared, &policy, &keys[..n], outcomes, cost)
                            }
                            _ => uncounted,
                        });
                        {
                            let charge = attach(shared, &mut req, charge, decision.as_ref());
                            ResponseFuture::calling(
                                self.inner.call(req),
                                decision,
                                shared.decorate(&policy),
                                charge,
                                refund,
                            )
                        }
                    }
                }
            }
            StoreFuture::Pending(check) => {
                // The instance polled ready goes with the request; this one is a fresh clone.
                let clone = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, clone);
                // A settlement after the response needs the keys, which borrow the request.
                let identity = stack::identity_of(&keys[..n]);
                let keys = policy.costed.then(|| OwnedKeys::new(&keys[..n]));
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
                    keys,
                    identity,
                };
                ResponseFuture::checking(checking)
            }
        }
    }
}
