//! Layers that stack (ARCHITECTURE.md, behaviour contract item 20): every answer a layer
//! writes itself carries the refused request's head ([`Answered`]), and a layer further
//! out that counted the request and finds that mark on the response gives its count back
//! ([`Refund`]) and leaves the answer as the refusing layer wrote it.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};

use super::charge::Charge;
use super::shared::{RegistryId, Shared};
use crate::key::{Key, Subject, MAX_KEYS};
use crate::policy::plan::{self, Plan};
use crate::policy::Policy;
use crate::request::jsonrpc::McpCall;
use crate::request::target::Target;
use crate::store::{Outcome, Outcomes};

/// The mark on an answer a tollgate layer wrote itself (a refusal, a 503, a 400), with the
/// head of the request it answered (the very headers and extensions, moved, not copied),
/// so that a layer further out can find the keys it counted that request under.
pub(crate) struct Answered(Request<()>);

impl Clone for Answered {
    /// Only if an application clones the response's extensions; tollgate never does.
    fn clone(&self) -> Self {
        let mut head = Request::new(());
        *head.method_mut() = self.0.method().clone();
        *head.uri_mut() = self.0.uri().clone();
        *head.version_mut() = self.0.version();
        *head.headers_mut() = self.0.headers().clone();
        *head.extensions_mut() = self.0.extensions().clone();
        Answered(head)
    }
}

impl Answered {
    /// `resp`, marked as the answer to `req`.
    pub(crate) fn mark<B>(mut resp: Response<Bytes>, req: Request<B>) -> Response<Bytes> {
        resp.extensions_mut().insert(Answered(req.map(|_| ())));
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
/// It names the layer by its registry number and holds no reference count, so an allowed
/// request writes nothing another thread reads. A store that answered at once (the memory
/// store) decided on the caller's clock at the plan's time, and that time is all the
/// refund needs of its answer; a store that awaited (Redis) may have decided on its own
/// clock, so its answer is kept whole, boxed, beside a round trip that costs far more.
pub(crate) enum Refund {
    None,
    /// Counted by a store that answered at once.
    Ready(Counted),
    /// Counted by a store that awaited, with its answer.
    Awaited(Box<(Counted, Outcomes)>),
}

/// Without `[cost]` a call counts one unit, so that is what is given back.
pub(crate) struct Counted {
    shared: RegistryId,
    /// The policy the request was counted under (`Policy::generation`): the keys are found
    /// again only under that one.
    generation: u64,
    tool: Option<(Target, u32)>,
    now: u64,
    /// Which user, tenant or client the keys named: the addresses of the very bytes the
    /// identity was read from (or the client address). An identity that a layer between
    /// this one and the refusing one replaced reads from other bytes, so its keys are not
    /// taken for this request's.
    identity: u64,
    /// A fallback answered the check (a `FallbackStore` settles there).
    by_fallback: bool,
}

impl Refund {
    /// Nothing counted, or a `Charge` gives it back.
    pub(crate) fn none() -> Refund {
        Refund::None
    }

    /// The request planned as `plan`, under `keys`, was counted by a store that answered
    /// at once with `outcomes`.
    #[inline(always)]
    pub(crate) fn ready(
        shared: &Shared,
        policy: &Policy,
        plan: &Plan,
        keys: &[Key<'_>],
        outcomes: &Outcomes,
    ) -> Refund {
        match Counted::new(shared, policy, plan, identity_of(keys), outcomes) {
            Some(counted) => Refund::Ready(counted),
            None => Refund::None,
        }
    }

    /// The same for a store that awaited; `identity` is [`identity_of`] the keys.
    pub(crate) fn awaited(
        shared: &Shared,
        policy: &Policy,
        plan: &Plan,
        identity: u64,
        outcomes: &Outcomes,
    ) -> Refund {
        match Counted::new(shared, policy, plan, identity, outcomes) {
            Some(counted) => Refund::Awaited(Box::new((counted, *outcomes))),
            None => Refund::None,
        }
    }

    /// Gives back what was counted for the request an inner layer answered (`answered`
    /// holds its head): its keys are found again from the head as the check found them,
    /// and given back only if they are the same keys (strict, never lenient).
    pub(crate) fn give_back(self, answered: &Answered) {
        let (c, outcomes) = match self {
            Refund::None => return,
            Refund::Ready(c) => (c, None),
            Refund::Awaited(boxed) => {
                let (c, outcomes) = *boxed;
                (c, Some(outcomes))
            }
        };
        let Some(shared) = Shared::by_id(c.shared) else {
            return; // the layer has gone
        };
        let policy = shared.live.policy.load_full();
        if policy.generation != c.generation {
            return; // reloaded since: the keys may be other ones now
        }
        // A tool or prompt found in the body (`McpLayer`) is not in the head: named again
        // as the call that was read. The `Mcp-*` headers are not compared with it again
        // (they were when the request was counted).
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
        let mut keys = plan::blank_keys(policy.algorithm);
        let mut rules = [None; MAX_KEYS];
        let found = plan::keys_of(
            &shared.health.plan,
            &policy,
            &answered.0,
            call,
            false,
            c.now,
            &mut keys,
            &mut rules,
        );
        let Ok((n, tool)) = found else { return };
        if tool != c.tool || identity_of(&keys[..n]) != c.identity {
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
        let charge = Charge::counted(&shared, &policy, &keys[..n], &outcomes, 1);
        let _settling = charge.settle(0);
    }
}

impl Counted {
    #[inline(always)]
    fn new(
        shared: &Shared,
        policy: &Policy,
        plan: &Plan,
        identity: u64,
        outcomes: &Outcomes,
    ) -> Option<Counted> {
        (!policy.costed).then(|| Counted {
            shared: shared.id,
            generation: policy.generation,
            tool: plan.tool,
            now: plan.now,
            identity,
            by_fallback: outcomes.answered_by_fallback(),
        })
    }
}

/// Where the subjects of `keys` were read from: the addresses and lengths of their bytes
/// (a user's or tenant's in the request, a tool's in the policy), or the client address.
/// A layer between this one and the refusing one that replaced the identity leaves them
/// reading other bytes.
#[inline(always)]
pub(crate) fn identity_of(keys: &[Key<'_>]) -> u64 {
    let mut acc = 0u64;
    for key in keys {
        let word = match key.subject {
            Subject::Named(bytes) => (bytes.as_ptr() as u64) ^ ((bytes.len() as u64) << 48),
            Subject::Anonymous => 1,
            Subject::Client(addr, len) => client_word(addr, len),
        };
        acc = acc.rotate_left(17) ^ word;
    }
    acc
}

#[cold]
fn client_word(addr: std::net::IpAddr, len: u8) -> u64 {
    let bits = match addr {
        std::net::IpAddr::V4(v4) => u128::from(u32::from(v4)),
        std::net::IpAddr::V6(v6) => u128::from(v6),
    };
    (bits as u64) ^ ((bits >> 64) as u64) ^ (u64::from(len) << 56)
}
