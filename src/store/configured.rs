//! The store a config's `[backend]` names, as `RateLimitLayer::new` builds it.

use std::sync::Arc;

#[cfg(feature = "redis")]
use super::fallback::FallbackStore;
use super::memory::MemoryStore;
#[cfg(feature = "redis")]
use super::redis::RedisStore;
use super::Store;
#[cfg(feature = "redis")]
use crate::config::Fallback;
use crate::config::{BackendKind, RateLimitConfig};

/// The store a config's `[backend]` names.
pub(crate) fn for_config(cfg: &RateLimitConfig) -> Arc<dyn Store> {
    match cfg.backend().kind() {
        BackendKind::Memory => Arc::new(MemoryStore::with_max_keys(cfg.backend().max_keys())),
        // Redis behind a circuit breaker; the fallback (if any) answers while it fails.
        #[cfg(feature = "redis")]
        BackendKind::Redis | BackendKind::RedisCluster => {
            let backend = cfg.backend();
            let fallback = match backend.fallback() {
                Fallback::Memory => Some(MemoryStore::with_max_keys(backend.max_keys())),
                Fallback::None => None,
            };
            Arc::new(FallbackStore::new(
                RedisStore::from_config(backend),
                fallback,
            ))
        }
        // Validation refuses the Redis kinds unless the feature is on.
        #[cfg(not(feature = "redis"))]
        BackendKind::Redis | BackendKind::RedisCluster => {
            Arc::new(MemoryStore::with_max_keys(cfg.backend().max_keys()))
        }
    }
}
