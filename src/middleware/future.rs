//! `ResponseFuture`: a hand-written state machine, no box on the memory path.

use std::fmt;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::act::{act, counted, panicked, Action};
use super::charge::{attach, Charge, Settle};
use super::shared::{Decorate, Shared};
use super::stack::{Answered, Refund};
use crate::answer::body::ResponseBody;
use crate::answer::decision::Decision;
use crate::answer::headers;
use crate::key::OwnedKeys;
use crate::policy::metrics::Started;
use crate::policy::plan::Plan;
use crate::policy::Policy;
use crate::request::jsonrpc::FindCall;
use crate::store::{Outcomes, StoreError};

pub(crate) type Check =
    Pin<Box<dyn Future<Output = Result<Outcomes, StoreError>> + Send + 'static>>;

pin_project! {
    /// The future of [`RateLimit`](crate::RateLimit): checking the store (Redis only),
    /// then calling the inner service, or answering directly.
    pub struct ResponseFuture<S, ReqB>
    where
        S: Service<Request<ReqB>>,
    {
        #[pin]
        state: State<S, ReqB>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqB>
    where
        S: Service<Request<ReqB>>,
    {
        // Boxed: only a store that awaits (Redis, already a boxed future and a round
        // trip) gets here, and unboxed its request and plan made every future of the
        // memory path half as large again.
        Checking {
            checking: Box<Checking<S, ReqB>>,
        },
        Calling {
            #[pin]
            fut: S::Future,
            decision: Option<Decision>,
            decorate: Decorate,
            // Settled by a `Settle` the response carries (`[cost]` only).
            charge: Charge,
            // Given back if a layer inside refuses the request.
            refund: Refund,
        },
        Respond {
            resp: Option<Response<Bytes>>,
        },
    }
}

/// What a store check that awaits holds until the store answers.
pub(crate) struct Checking<S, ReqB> {
    pub(crate) check: Check,
    pub(crate) started: Started,
    pub(crate) svc: Option<S>,
    pub(crate) req: Option<Request<ReqB>>,
    pub(crate) shared: Arc<Shared>,
    /// The policy the request started on, kept to its end.
    pub(crate) policy: Arc<Policy>,
    pub(crate) plan: Plan,
    pub(crate) find: FindCall<ReqB>,
    /// The request's keys, kept when `[cost]` is on (its `Charge` settles under them).
    pub(crate) keys: Option<OwnedKeys>,
    /// Which identity the keys named (`stack::identity_of`), for a refund.
    pub(crate) identity: u64,
}

impl<S, ReqB> ResponseFuture<S, ReqB>
where
    S: Service<Request<ReqB>>,
{
    pub(crate) fn calling(
        fut: S::Future,
        decision: Option<Decision>,
        decorate: Decorate,
        charge: Charge,
        refund: Refund,
    ) -> Self {
        // Nothing to write and nothing to insert: nothing to carry.
        let decision = decision.filter(|_| decorate.writes());
        ResponseFuture {
            state: State::Calling {
                fut,
                decision,
                decorate,
                charge,
                refund,
            },
        }
    }

    /// tollgate's own answer to `req`, marked as such for any tollgate layer further out
    /// (`stack::Answered`).
    pub(crate) fn respond(resp: Response<Bytes>, req: Request<ReqB>) -> Self {
        ResponseFuture {
            state: State::Respond {
                resp: Some(Answered::mark(resp, req)),
            },
        }
    }

    pub(crate) fn checking(checking: Checking<S, ReqB>) -> Self {
        ResponseFuture {
            state: State::Checking {
                checking: Box::new(checking),
            },
        }
    }
}

impl<S, ReqB> fmt::Debug for ResponseFuture<S, ReqB>
where
    S: Service<Request<ReqB>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResponseFuture")
    }
}

impl<S, ReqB, ResB> Future for ResponseFuture<S, ReqB>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    type Output = Result<Response<ResponseBody<ResB>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Checking { checking } => {
                    let Checking {
                        check,
                        started,
                        svc,
                        req,
                        shared,
                        policy,
                        plan,
                        find,
                        keys,
                        identity,
                    } = &mut **checking;
                    let polled = catch_unwind(AssertUnwindSafe(|| check.as_mut().poll(cx)))
                        .unwrap_or_else(|_| Poll::Ready(Err(panicked())));
                    let result = ready!(polled);
                    started.answered(&policy.metrics);
                    let request = req.as_ref().expect("polled after completion");
                    let next = match act(shared, policy, plan, &result, request, find(request)) {
                        Action::Respond(resp) => {
                            let req = req.take().expect("polled after completion");
                            State::Respond {
                                resp: Some(Answered::mark(resp, req)),
                            }
                        }
                        Action::Forward(decision) => {
                            let mut svc = svc.take().expect("polled after completion");
                            let mut req = req.take().expect("polled after completion");
                            let counted = counted(decision, &result);
                            let charge = match (keys.take(), counted) {
                                (Some(keys), Some(outcomes)) if plan.cost > 0 => {
                                    Charge::counted_owned(shared, policy, keys, outcomes, plan.cost)
                                }
                                _ => Charge::uncounted(),
                            };
                            let refund = counted.map_or_else(Refund::none, |outcomes| {
                                Refund::awaited(shared, policy, plan, *identity, outcomes)
                            });
                            let charge = attach(
                                shared,
                                &mut req,
                                policy.costed.then_some(charge),
                                decision.as_ref(),
                            );
                            State::Calling {
                                fut: svc.call(req),
                                decision,
                                decorate: shared.decorate(policy),
                                charge,
                                refund,
                            }
                        }
                    };
                    state.set(next);
                }
                StateProj::Calling {
                    fut,
                    decision,
                    decorate,
                    charge,
                    refund,
                } => {
                    let mut resp = ready!(fut.poll(cx))?;
                    // A layer inside answered (refused) the request: it never ran, so this
                    // layer gives back what it counted and leaves that answer as written.
                    if let Some(answered) = Answered::on(&resp) {
                        std::mem::replace(refund, Refund::none()).give_back(answered);
                        let _settling = charge.settle(0);
                        return Poll::Ready(Ok(resp.map(ResponseBody::inner)));
                    }
                    if charge.is_counted() {
                        if let Some(Settle(units)) = resp.extensions_mut().remove::<Settle>() {
                            // Applied, or sent from the store's task: nothing to wait for.
                            let _settling = charge.settle(units);
                        }
                    }
                    if let Some(decision) = decision {
                        headers::write_headers(decorate.style, decision, resp.headers_mut(), false);
                        if decorate.insert_decision {
                            resp.extensions_mut().insert(*decision);
                        }
                    }
                    return Poll::Ready(Ok(resp.map(ResponseBody::inner)));
                }
                StateProj::Respond { resp } => {
                    let resp = resp.take().expect("polled after completion");
                    return Poll::Ready(Ok(resp.map(ResponseBody::full)));
                }
            }
        }
    }
}
