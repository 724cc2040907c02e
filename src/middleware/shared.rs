//! What every clone of a layer and its services shares: the policy in force (swapped by a
//! reload), the store, the clock, and the health counters with their log gates.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use arc_swap::ArcSwap;

use super::hooks::{Exempt, OnRefusal};
use crate::clock::Clock;
use crate::config::{BackendConfig, HeaderStyle};
use crate::log_gate::LogGate;
use crate::policy::plan::Warnings;
use crate::policy::Policy;
use crate::store::Store;

/// Everything a request needs, shared by every clone of the layer and its services.
#[derive(Clone)]
pub(crate) struct Shared {
    /// The rules and settings a reload replaces (ARCHITECTURE.md, "Hot reload").
    pub(crate) live: Arc<Live>,
    pub(crate) insert_decision: bool,
    /// Whether a forwarded request carries its `Decision` to the handler.
    pub(crate) request_decision: bool,
    /// Requests forwarded untouched (`RateLimitLayer::exempt`).
    pub(crate) exempt: Option<Exempt>,
    /// Shapes refusals in place of the problem+json (`RateLimitLayer::on_refusal`).
    pub(crate) on_refusal: Option<Arc<dyn OnRefusal>>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) health: Arc<Health>,
    /// This value's place in [`REGISTRY`] and the serial number it was registered under
    /// (a place is taken again once its layer has gone), given by [`Shared::registered`].
    pub(crate) id: RegistryId,
}

/// Where a [`Shared`] is in [`REGISTRY`]: its place, and its serial number there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RegistryId {
    place: u32,
    serial: u32,
}

/// Every `Shared` of the process, by [`RegistryId`]: a response future names the layer
/// that counted its request by number (a refund after an inner layer's refusal finds it
/// here), so an allowed request writes no reference count shared with other threads
/// (ARCHITECTURE.md, contract item 20). A place whose layer has gone is taken again,
/// under a new serial number.
static REGISTRY: Mutex<Vec<(u32, Weak<Shared>)>> = Mutex::new(Vec::new());

impl Shared {
    /// `shared` under a number of its own in the registry.
    pub(crate) fn registered(mut shared: Shared) -> Arc<Shared> {
        static SERIALS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
        let serial = SERIALS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut registry = REGISTRY.lock().unwrap_or_else(PoisonError::into_inner);
        let free = registry.iter().position(|(_, w)| w.strong_count() == 0);
        let place = free.unwrap_or(registry.len());
        shared.id = RegistryId {
            place: u32::try_from(place).unwrap_or(u32::MAX),
            serial,
        };
        let arc = Arc::new(shared);
        let entry = (serial, Arc::downgrade(&arc));
        match registry.get_mut(place) {
            Some(slot) => *slot = entry,
            None => registry.push(entry),
        }
        arc
    }

    /// The `Shared` registered as `id`, while its layer or a service of it lives.
    pub(crate) fn by_id(id: RegistryId) -> Option<Arc<Shared>> {
        let registry = REGISTRY.lock().unwrap_or_else(PoisonError::into_inner);
        registry
            .get(id.place as usize)
            .filter(|(serial, _)| *serial == id.serial)
            .and_then(|(_, weak)| weak.upgrade())
    }

    pub(crate) fn decorate(&self, policy: &Policy) -> Decorate {
        Decorate {
            style: policy.headers,
            insert_decision: self.insert_decision,
        }
    }
}

/// The policy in force, swapped whole by [`RateLimitHandle::update`](crate::RateLimitHandle::update): a request loads it
/// once (no lock, no shared write) and keeps that version to the end.
pub(crate) struct Live {
    pub(crate) policy: ArcSwap<Policy>,
    /// The `[backend]` the store was built from; `None` for a store given to
    /// [`RateLimitLayer::with_store`](crate::RateLimitLayer::with_store) (whose `[backend]` is ignored, on reload too).
    pub(crate) backend: Option<BackendConfig>,
    /// The store's kind, as the latency metric labels it.
    pub(crate) kind: &'static str,
}

/// How a forwarded response is decorated.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Decorate {
    pub(crate) style: HeaderStyle,
    pub(crate) insert_decision: bool,
}

impl Decorate {
    /// Whether a forwarded response gets anything from its decision.
    pub(crate) fn writes(self) -> bool {
        self.insert_decision || self.style != HeaderStyle::None
    }
}

/// Failure counters, and the gate that keeps failure logs to one line a second.
#[derive(Debug, Default)]
pub(crate) struct Health {
    pub(crate) store_errors: AtomicU64,
    pub(crate) fail_open: AtomicU64,
    pub(crate) fail_closed: AtomicU64,
    /// Settlements the store refused (a store that failed to settle later counts them in
    /// its own stats).
    pub(crate) settle_failures: AtomicU64,
    /// Store failures.
    pub(crate) log: LogGate,
    /// Refused identities (400s), and identities counted as anonymous in permissive mode.
    pub(crate) identity_log: LogGate,
    /// Refusals (429s): a client decides how often they happen.
    pub(crate) refusal_log: LogGate,
    /// Would-be refusals in permissive mode.
    pub(crate) permissive_log: LogGate,
    /// What building a request's plan warns of.
    pub(crate) plan: Warnings,
    /// Settlements that failed.
    pub(crate) settle_log: LogGate,
}

/// Failure counts since the layer was built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Store calls that failed (error, timeout or panic).
    pub store_errors: u64,
    /// Requests forwarded without a decision because the store failed (fail_mode open).
    pub fail_open: u64,
    /// Requests answered 503 because the store failed (fail_mode closed).
    pub fail_closed: u64,
    /// Requests a fallback store answered while Redis was failing (limits then held per
    /// instance).
    pub fallback_answers: u64,
    /// Calls whose settlement ([`Charge::settle`](crate::Charge::settle)) failed: they
    /// stay counted at their first cost.
    pub settle_failures: u64,
}
