//! Layers that stack (ARCHITECTURE.md, behaviour contract item 20): every answer a layer
//! writes itself carries the refused request's head ([`Answered`]), and a layer further
//! out that counted the request and finds that mark on the response gives its count back
//! ([`Refund`]) and leaves the answer as the refusing layer wrote it.

use std::sync::Arc;

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response};

use super::charge::Charge;
use super::shared::Shared;
use crate::key::{Key, RuleKind, Subject, MAX_KEYS};
use crate::policy::plan::{self, Plan};
use crate::policy::Policy;
use crate::rate::Rate;
use crate::request::identity;
use crate::request::jsonrpc::McpCall;
use crate::request::target::Target;
use crate::store::Outcomes;

/// The mark on an answer a tollgate layer wrote itself (a refusal, a 503, a 400), with the
/// head of the request it answered, so that a layer further out can find the keys it
/// counted that request under.
#[derive(Clone)]
pub(crate) struct Answered(Parts);

impl Answered {
    /// `resp`, marked as the answer to `req`.
    pub(crate) fn mark<B>(mut resp: Response<Bytes>, req: Request<B>) -> Response<Bytes> {
        let (head, _body) = req.into_parts();
        resp.extensions_mut().insert(Answered(head));
        resp
    }

    /// The mark on `resp`, if a tollgate layer wrote it.
    pub(crate) fn on<B>(resp: &Response<B>) -> Option<&Answered> {
        resp.extensions().get::<Answered>()
    }
}

/// What a layer that counted a forwarded request needs to give the count back if a layer
/// inside it refuses the request. With `[cost]` the request's `Charge` does it instead.
pub(crate) struct Refund(Option<Counted>);

struct Counted {
    shared: Arc<Shared>,
    policy: Arc<Policy>,
    rules: [Option<(RuleKind, Rate)>; MAX_KEYS],
    tool: Option<(Target, u32)>,
    now: u64,
    cost: u64,
    outcomes: Outcomes,
}

impl Refund {
    /// Nothing counted, or a `Charge` gives it back.
    pub(crate) fn none() -> Refund {
        Refund(None)
    }

    /// The request planned as `plan` was counted, and its check answered `outcomes`.
    pub(crate) fn counted(
        shared: &Arc<Shared>,
        policy: &Arc<Policy>,
        plan: &Plan,
        outcomes: &Outcomes,
    ) -> Refund {
        if policy.costed || plan.cost == 0 {
            return Refund::none();
        }
        Refund(Some(Counted {
            shared: Arc::clone(shared),
            policy: Arc::clone(policy),
            rules: plan.rules,
            tool: plan.tool,
            now: plan.now,
            cost: plan.cost,
            outcomes: *outcomes,
        }))
    }

    /// Gives back what was counted for the request an inner layer answered (`answered`
    /// holds its head): the keys are found again from the head as the check found them;
    /// if they differ (nothing to find them by), the count stays (strict, never lenient).
    pub(crate) fn give_back(self, answered: &Answered) {
        let Some(c) = self.0 else { return };
        let req = Request::from_parts(answered.0.clone(), ());
        // A tool or prompt found in the body (`McpLayer`) is not in the head: named again
        // as the call that was read.
        let call = c.tool.map(|(target, i)| match target {
            Target::Tool => McpCall {
                method: b"tools/call",
                name: Some(c.policy.rules.tool_name(i).as_bytes()),
                id: None,
            },
            Target::Prompt => McpCall {
                method: b"prompts/get",
                name: Some(c.policy.rules.prompt_name(i).as_bytes()),
                id: None,
            },
        });
        let policy = &*c.policy;
        let Ok(who) = identity::extract(
            &req,
            &policy.identity,
            policy.mcp_headers,
            policy.costed,
            call,
        ) else {
            return;
        };
        let placeholder = Key::new(
            RuleKind::User,
            Subject::Anonymous,
            Rate::per_second(1),
            policy.algorithm,
        );
        let mut keys = [placeholder; MAX_KEYS];
        let mut rules = [None; MAX_KEYS];
        let (n, _, _) = plan::keys(
            &c.shared.health.plan,
            policy,
            &req,
            &who,
            c.now,
            &mut keys,
            &mut rules,
        );
        if rules != c.rules {
            return;
        }
        // Applied at once in memory, from the store's task in Redis; a failure is logged
        // and counted as a failed settlement.
        let charge = Charge::counted(&c.shared, &c.policy, &keys[..n], &c.outcomes, c.cost);
        let _settling = charge.settle(0);
    }
}
