//! Layers that stack (ARCHITECTURE.md, behaviour contract item 20): every answer a layer
//! writes itself carries the refused request's head ([`Answered`]), and a layer further
//! out that counted the request and finds that mark on the response gives its count back
//! ([`Refund`]) and leaves the answer as the refusing layer wrote it.

use std::sync::Arc;
use std::time::Duration;

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
use crate::store::{Outcome, Outcomes};

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

    /// The mark on `resp`, if a tollgate layer wrote it (most responses have no
    /// extensions at all: that is asked first, inline).
    #[inline(always)]
    pub(crate) fn on<B>(resp: &Response<B>) -> Option<&Answered> {
        let extensions = resp.extensions();
        if extensions.is_empty() {
            return None;
        }
        extensions.get::<Answered>()
    }
}

/// What a layer that counted a forwarded request needs to give the count back if a layer
/// inside it refuses the request. With `[cost]` the request's `Charge` does it instead.
///
/// A store that answered at once (the memory store) decided on the caller's clock, at the
/// plan's time: that time is all the refund needs of its answer, so the refund stays a few
/// words in every response future (ARCHITECTURE.md, "One request"). A store that awaited
/// (Redis) may have decided on its own clock: its answer is kept whole, boxed, beside a
/// round trip that costs far more.
pub(crate) enum Refund {
    None,
    /// Counted by a store that answered at once.
    Ready(Counted),
    /// Counted by a store that awaited, with its answer.
    Awaited(Box<(Counted, Outcomes)>),
}

/// Without `[cost]` a call counts one unit, so that is what is given back.
pub(crate) struct Counted {
    shared: Arc<Shared>,
    /// The policy the request was counted under (`Policy::generation`): the refund finds
    /// the keys again only under that one.
    generation: u64,
    tool: Option<(Target, u32)>,
    now: u64,
    /// A fallback answered the check (a `FallbackStore` settles there).
    by_fallback: bool,
}

impl Refund {
    /// Nothing counted, or a `Charge` gives it back.
    pub(crate) fn none() -> Refund {
        Refund::None
    }

    /// The request planned as `plan` was counted by a store that answered at once with
    /// `outcomes`.
    #[inline(always)]
    pub(crate) fn ready(
        shared: &Arc<Shared>,
        policy: &Policy,
        plan: &Plan,
        outcomes: &Outcomes,
    ) -> Refund {
        match Counted::new(shared, policy, plan, outcomes) {
            Some(counted) => Refund::Ready(counted),
            None => Refund::None,
        }
    }

    /// The request planned as `plan` was counted by a store that awaited, answering
    /// `outcomes`.
    pub(crate) fn awaited(
        shared: &Arc<Shared>,
        policy: &Policy,
        plan: &Plan,
        outcomes: &Outcomes,
    ) -> Refund {
        match Counted::new(shared, policy, plan, outcomes) {
            Some(counted) => Refund::Awaited(Box::new((counted, *outcomes))),
            None => Refund::None,
        }
    }

    /// Gives back what was counted for the request an inner layer answered (`answered`
    /// holds its head): the keys are found again from the head as the check found them;
    /// if they differ (nothing to find them by), the count stays (strict, never lenient).
    pub(crate) fn give_back(self, answered: &Answered) {
        let (c, outcomes) = match self {
            Refund::None => return,
            Refund::Ready(c) => (c, None),
            Refund::Awaited(boxed) => {
                let (c, outcomes) = *boxed;
                (c, Some(outcomes))
            }
        };
        let policy = c.shared.live.policy.load_full();
        if policy.generation != c.generation {
            return; // reloaded since: the keys may be other ones now
        }
        let req = Request::from_parts(answered.0.clone(), ());
        // A tool or prompt found in the body (`McpLayer`) is not in the head: named again
        // as the call that was read.
        let call = c.tool.map(|(target, i)| match target {
            Target::Tool => McpCall {
                method: b"tools/call",
                name: Some(policy.rules.tool_name(i).as_bytes()),
                id: None,
            },
            Target::Prompt => McpCall {
                method: b"prompts/get",
                name: Some(policy.rules.prompt_name(i).as_bytes()),
                id: None,
            },
        });
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
        let (n, tool, _) = plan::keys(
            &c.shared.health.plan,
            &policy,
            &req,
            &who,
            c.now,
            &mut keys,
            &mut rules,
        );
        if tool != c.tool {
            return;
        }
        // A store that answered at once decided at the plan's time, on the caller's clock.
        let outcomes = outcomes.unwrap_or_else(|| {
            let mut decided = Outcomes::new();
            for _ in 0..n {
                decided.push(Outcome::allowed(0, Duration::ZERO).with_reset_at_micros(c.now));
            }
            if c.by_fallback {
                decided.by_fallback()
            } else {
                decided
            }
        });
        if outcomes.len() != n {
            return;
        }
        // Applied at once in memory, from the store's task in Redis; a failure is logged
        // and counted as a failed settlement.
        let charge = Charge::counted(&c.shared, &policy, &keys[..n], &outcomes, 1);
        let _settling = charge.settle(0);
    }
}

impl Counted {
    #[inline(always)]
    fn new(
        shared: &Arc<Shared>,
        policy: &Policy,
        plan: &Plan,
        outcomes: &Outcomes,
    ) -> Option<Counted> {
        (!policy.costed).then(|| Counted {
            shared: Arc::clone(shared),
            generation: policy.generation,
            tool: plan.tool,
            now: plan.now,
            by_fallback: outcomes.answered_by_fallback(),
        })
    }
}
