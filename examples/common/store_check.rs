//! One memory-store check as the layer makes it, shared by `benches/store.rs` and
//! `examples/store_callgrind.rs` (included with `#[path]`), so the bench's timings and the
//! example's instruction counts measure the same call.

use std::hint::black_box;

use tollgate::{Key, MemoryStore, Store, StoreFuture, StoreRequest};

/// Checks `keys` at `now`; panics if the check is not accepted, so a measurement can
/// never quietly take the reject path.
#[inline]
pub fn check(store: &MemoryStore, keys: &[Key<'_>], now: u64) {
    match store.check(&StoreRequest::new(keys, now)) {
        StoreFuture::Ready(Ok(outcomes)) => {
            assert!(outcomes.iter().all(|o| o.is_allowed()), "rejected");
            black_box(outcomes);
        }
        other => panic!("the memory store answers synchronously: {other:?}"),
    }
}
