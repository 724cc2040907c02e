//! `Primary`: what the circuit breaker (`fallback.rs`) needs of the store it guards, apart
//! from `Store::check`. The Redis store implements it; the breaker is generic over it.

use super::{Outcomes, Store, StoreFuture, StoreRequest};

/// What the breaker needs of the store it guards beyond [`Store::check`]: the answers it
/// gives without its backend (the Redis deny cache), kept apart so a cached answer is
/// never taken as a sign that the backend is healthy. Crate-private: only the crate's
/// own stores have a local answer, so it is not part of the public [`Store`] trait.
pub(crate) trait Primary: Store {
    /// The answer this store can give without asking its backend, if any. `check` must
    /// consult it too.
    fn answer_locally(&self, request: &StoreRequest<'_>) -> Option<Outcomes>;

    /// [`Store::check`] without [`Primary::answer_locally`]: always asks the backend.
    fn check_backend(&self, request: &StoreRequest<'_>) -> StoreFuture;
}
