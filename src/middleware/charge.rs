//! `Charge`: settles a call's cost once it is known (ARCHITECTURE.md, behaviour contract
//! item 19), and `Settle`, the response extension that does it for a handler.

use std::fmt;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Request;

use super::shared::Shared;
use crate::answer::decision::Decision;
use crate::key::{Key, OwnedKeys};
use crate::policy::Policy;
use crate::store::{Outcomes, SettleFuture, Settlement, StoreError, StoreErrorKind};

/// A forwarded call's charge, in the request's extensions (not an exempt one's) when the config has a `[cost]`
/// section: settle the call at its real cost once it is known (tokens used, bytes
/// streamed, time spent) with [`Charge::settle`], and tollgate charges, or gives back,
/// the difference from what the call was charged when it was let through, under every
/// rule that counted it, in the store that counted it.
///
/// - A call is settled at most once: a second settle is ignored. A charge dropped without
///   settling keeps the first cost.
/// - An actual cost above what a rule had left is still charged: the rule goes into debt
///   (its remaining shows 0) and later calls are refused until the window, the slide or
///   the refill has paid it off. A rule's debt is capped at one limit's worth.
/// - Settling after the window that counted the call has ended changes nothing there
///   (that window's count is gone); a token bucket is charged or given tokens whenever
///   it is settled.
/// - The charge of a call nothing counted (no rule applied, the store failed, permissive
///   mode let a refused call through) settles nothing.
///
/// `Clone + Send + Sync`: hand a clone to whatever finishes the call (a body wrapper that
/// settles when its stream ends). A handler that knows the cost when it answers can
/// return [`Settle`] in its response's extensions instead.
///
/// ```
/// use std::convert::Infallible;
/// use http::{Request, Response};
/// use tollgate::{Charge, ManualClock, RateLimitConfig, RateLimitLayer};
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let cfg = RateLimitConfig::from_toml_str(r#"
///     by_user = "1000/h"
///     [cost.tools]
///     summarise = 500      # an estimate, charged when the call starts
///     [identity]
///     user_header = "x-user-id"
///     tool_path = "/tools/{name}"
/// "#).unwrap();
/// let svc = ServiceBuilder::new()
///     .layer(RateLimitLayer::new(cfg).with_clock(ManualClock::new()))
///     .service(service_fn(|req: Request<()>| async move {
///         // ... the call used 120 tokens (awaited here only to know it is applied):
///         let charge = req.extensions().get::<Charge>().expect("[cost] is on").clone();
///         charge.settle(120).await.expect("settled");
///         Ok::<_, Infallible>(Response::new(()))
///     }));
/// let call = || Request::post("/tools/summarise").header("x-user-id", "ann").body(()).unwrap();
/// let first = svc.clone().oneshot(call()).await.unwrap();
/// assert_eq!(first.headers()["x-ratelimit-remaining"], "500");
/// // Charged 120, not 500: 880 left before the next call's 500.
/// let second = svc.clone().oneshot(call()).await.unwrap();
/// assert_eq!(second.headers()["x-ratelimit-remaining"], "380");
/// # });
/// ```
#[derive(Clone)]
pub struct Charge {
    counted: Option<Arc<Counted>>,
}

/// What a counted call's charge needs to settle it.
struct Counted {
    shared: Arc<Shared>,
    policy: Arc<Policy>,
    keys: OwnedKeys,
    outcomes: Outcomes,
    estimate: u64,
    settled: AtomicBool,
}

impl Charge {
    /// The charge of a call counted at `estimate` units under `keys`, whose check
    /// answered `outcomes`.
    pub(crate) fn counted(
        shared: &Arc<Shared>,
        policy: &Arc<Policy>,
        keys: &[Key<'_>],
        outcomes: &Outcomes,
        estimate: u64,
    ) -> Charge {
        Self::counted_owned(shared, policy, OwnedKeys::new(keys), outcomes, estimate)
    }

    /// [`Charge::counted`] with the keys already owned.
    pub(crate) fn counted_owned(
        shared: &Arc<Shared>,
        policy: &Arc<Policy>,
        keys: OwnedKeys,
        outcomes: &Outcomes,
        estimate: u64,
    ) -> Charge {
        Charge {
            counted: Some(Arc::new(Counted {
                shared: Arc::clone(shared),
                policy: Arc::clone(policy),
                keys,
                outcomes: *outcomes,
                estimate,
                settled: AtomicBool::new(false),
            })),
        }
    }

    /// Whether a store counted the call (so settling it changes something).
    pub(crate) fn is_counted(&self) -> bool {
        self.counted.is_some()
    }

    /// The charge of a call nothing counted: settling it changes nothing.
    pub(crate) fn uncounted() -> Charge {
        Charge { counted: None }
    }

    /// Settles the call at `units`, its real cost: the difference from what it was
    /// charged is charged or given back under every rule that counted it. Never blocks:
    /// a Redis store settles from a task of its own. The returned [`Settling`] need not be
    /// awaited (dropping it stops nothing); awaiting it tells when the store has applied
    /// the settlement. Settling a call twice, or a call nothing counted, does nothing. A
    /// failure is logged (rate-limited, never an identity) and counted in
    /// [`Stats::settle_failures`](crate::Stats::settle_failures).
    pub fn settle(&self, units: u64) -> Settling {
        let Some(counted) = &self.counted else {
            return Settling::done();
        };
        if counted.settled.swap(true, Ordering::AcqRel) {
            return Settling::done();
        }
        let delta = i128::from(units) - i128::from(counted.estimate);
        let delta = delta.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
        if delta == 0 {
            return Settling::done();
        }
        let shared = &counted.shared;
        let now = shared.clock.now_micros();
        let answer = counted.keys.with(|keys| {
            let settlement = Settlement::new(keys, &counted.outcomes, delta, now);
            let answer = catch_unwind(AssertUnwindSafe(|| shared.store.settle(&settlement)));
            // Units are counted once the store has taken the settlement on; one that a
            // store's task later fails to apply is counted among the failures too.
            if matches!(
                answer,
                Ok(SettleFuture::Ready(Ok(())) | SettleFuture::Pending(_))
            ) {
                counted.policy.settled(keys.iter().map(|k| k.kind), delta);
            }
            answer
        });
        let error = match answer {
            Ok(SettleFuture::Ready(Ok(()))) => return Settling::done(),
            // The store counts and logs what fails in its task.
            Ok(pending @ SettleFuture::Pending(_)) => return Settling(pending),
            Ok(SettleFuture::Ready(Err(error))) => error,
            Err(_) => StoreError::new(
                StoreErrorKind::Internal,
                "the store panicked while settling",
            ),
        };
        shared
            .health
            .settle_failures
            .fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        metrics::counter!("tollgate_settle_failures_total").increment(1);
        if let Some(suppressed) = shared.health.settle_log.may_log(now) {
            tracing::warn!(
                %error,
                suppressed,
                "tollgate: a call's cost could not be settled; it stays counted at its estimate"
            );
        }
        Settling(SettleFuture::Ready(Err(error)))
    }

    /// The units the call was charged when it was let through (0 when nothing counted
    /// it).
    pub fn estimate(&self) -> u64 {
        self.counted.as_ref().map_or(0, |c| c.estimate)
    }

    /// Whether the call has been settled.
    pub fn is_settled(&self) -> bool {
        self.counted
            .as_ref()
            .is_some_and(|c| c.settled.load(Ordering::Acquire))
    }
}

impl fmt::Debug for Charge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Charge")
            .field("estimate", &self.estimate())
            .field("settled", &self.is_settled())
            .finish_non_exhaustive()
    }
}

/// A settlement under way, from [`Charge::settle`]: await it to know the store has
/// applied it (`Err` says why not); drop it and the settlement goes on regardless.
pub struct Settling(SettleFuture);

impl Settling {
    fn done() -> Settling {
        Settling(SettleFuture::Ready(Ok(())))
    }
}

impl Future for Settling {
    type Output = Result<(), StoreError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

impl fmt::Debug for Settling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Settling").field(&self.0).finish()
    }
}

/// The real cost of a call, in units, put in its response's extensions by a handler that
/// knows it when it answers: the layer settles the call's [`Charge`] with it as the
/// response passes (at most once, as `Charge::settle`).
///
/// ```
/// use http::Response;
/// use tollgate::Settle;
/// let mut resp = Response::new(());
/// resp.extensions_mut().insert(Settle(120));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Settle(pub u64);

/// Puts `charge` (when `[cost]` is on) and, when asked for, the decision into the
/// request's extensions, for the handler; the response future keeps the charge to settle
/// a `Settle` the response carries.
#[inline(always)]
pub(crate) fn attach<B>(
    shared: &Shared,
    req: &mut Request<B>,
    charge: Option<Charge>,
    decision: Option<&Decision>,
) -> Charge {
    if shared.request_decision {
        if let Some(decision) = decision {
            req.extensions_mut().insert(*decision);
        }
    }
    match charge {
        Some(charge) => {
            req.extensions_mut().insert(charge.clone());
            charge
        }
        None => Charge::uncounted(),
    }
}
