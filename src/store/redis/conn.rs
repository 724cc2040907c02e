//! Connections to Redis: one server (up to four multiplexed sockets) or a Redis Cluster
//! (redis-rs's cluster connection, which follows `MOVED`/`ASK` and keeps a socket per
//! node). Every call is bounded by its deadline, connecting included. A connection that
//! cannot serve — it failed, timed out, or its server answered that it cannot take writes
//! or does not own the key (`READONLY`, `LOADING`, `MASTERDOWN`, `MOVED`, `ASK`,
//! `TRYAGAIN`, `CLUSTERDOWN`, `CROSSSLOT`) — is forgotten, so the next call connects
//! again, resolving the host again: after a failover behind the same name, the next
//! connection reaches the new primary. See ARCHITECTURE.md, behaviour contract item 14.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Client, ErrorKind, FromRedisValue, RedisError, ScriptInvocation,
};
use tokio::time::Instant;

use crate::config::settings;
use crate::store::{StoreError, StoreErrorKind};

/// How Redis is reached.
pub(super) enum Connector {
    /// One server: requests spread round-robin over a few multiplexed sockets.
    Single {
        client: Client,
        slots: Box<[Slot<MultiplexedConnection>]>,
    },
    /// A Redis Cluster: one cluster connection (itself a socket per node, routed by slot).
    Cluster {
        client: Box<ClusterClient>,
        slot: Slot<ClusterConnection>,
    },
}

/// One shared connection, kept while it works.
pub(super) struct Slot<C> {
    held: Mutex<Option<Held<C>>>,
    /// Held by the one request that opens the empty slot's connection; the others wait
    /// for it rather than each opening one (each open is a connect and a PING, so a
    /// burst meeting a cold store queued a PING per caller and outlived the timeout).
    filling: tokio::sync::Mutex<()>,
}

struct Held<C> {
    conn: C,
    generation: u64,
}

static GENERATION: AtomicU64 = AtomicU64::new(0);

impl<C: Clone> Slot<C> {
    fn new() -> Self {
        Slot {
            held: Mutex::new(None),
            filling: tokio::sync::Mutex::new(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Held<C>>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn current(&self) -> Option<(C, u64)> {
        self.lock().as_ref().map(|h| (h.conn.clone(), h.generation))
    }

    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.lock().is_none()
    }

    /// A clone of the slot's connection, opening one with `open` if the slot is empty
    /// (one opener at a time; the others wait for it and share what it opened).
    async fn get<F, Fut>(&self, open: F) -> Result<(C, u64), StoreError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<C, RedisError>>,
    {
        if let Some(current) = self.current() {
            return Ok(current);
        }
        let _filling = self.filling.lock().await;
        if let Some(current) = self.current() {
            return Ok(current);
        }
        let conn = open().await.map_err(|e| redis_error(&e))?;
        let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
        *self.lock() = Some(Held {
            conn: conn.clone(),
            generation,
        });
        Ok((conn, generation))
    }

    /// Forgets the connection if it is still the one that failed.
    fn release(&self, generation: u64) {
        let mut guard = self.lock();
        if guard.as_ref().is_some_and(|h| h.generation == generation) {
            *guard = None;
        }
    }
}

impl Connector {
    /// Up to `pool_size` (at most four) sockets to the server `client` names.
    pub(super) fn single(client: Client, pool_size: u32) -> Self {
        // Each socket is auto-pipelined, so a few suffice for any concurrency.
        let shared = pool_size.clamp(1, settings::MAX_SOCKETS);
        Connector::Single {
            client,
            slots: (0..shared).map(|_| Slot::new()).collect(),
        }
    }

    /// The cluster `client` names.
    pub(super) fn cluster(client: ClusterClient) -> Self {
        Connector::Cluster {
            client: Box::new(client),
            slot: Slot::new(),
        }
    }

    /// How many sockets requests share (for `Debug`).
    pub(super) fn shared_connections(&self) -> usize {
        match self {
            Connector::Single { slots, .. } => slots.len(),
            Connector::Cluster { .. } => 1,
        }
    }

    /// Whether no connection is open (nothing has connected yet, or the last one failed).
    #[cfg(test)]
    pub(super) fn is_idle(&self) -> bool {
        match self {
            Connector::Single { slots, .. } => slots.iter().all(Slot::is_empty),
            Connector::Cluster { slot, .. } => slot.is_empty(),
        }
    }

    /// Runs `invocation` (EVALSHA; on `NOSCRIPT` redis-rs loads the script and retries
    /// once), all of it done by `deadline`, on socket `lane` (modulo their number) of a
    /// single server.
    pub(super) async fn invoke<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
        lane: usize,
        timeout: Duration,
        deadline: Instant,
    ) -> Result<T, StoreError> {
        match self {
            Connector::Single { client, slots } => {
                let index = lane % slots.len();
                let slot = &slots[index];
                let open = || async {
                    let config = AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(timeout))
                        .set_response_timeout(None);
                    let mut conn = client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?;
                    redis::cmd("PING").query_async::<()>(&mut conn).await?;
                    Ok(conn)
                };
                run(slot, open, invocation, deadline, true).await
            }
            Connector::Cluster { client, slot } => {
                let open = || client.get_async_connection();
                run(slot, open, invocation, deadline, false).await
            }
        }
    }
}

/// One call on `slot`'s connection, bounded by `deadline`; a connection that cannot serve
/// is forgotten, so a silently dead socket or a demoted primary costs one failed call,
/// not one per request until the kernel notices. A cluster connection is kept through a
/// timeout (`drop_on_timeout` false): it is a socket per node, which redis-rs reconnects
/// itself, and one slow node must not cost the healthy ones a reconnect.
async fn run<T, C, F, Fut>(
    slot: &Slot<C>,
    open: F,
    invocation: &ScriptInvocation<'_>,
    deadline: Instant,
    drop_on_timeout: bool,
) -> Result<T, StoreError>
where
    T: FromRedisValue,
    C: ConnectionLike + Clone + Send,
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<C, RedisError>>,
{
    let (mut conn, generation) = match tokio::time::timeout_at(deadline, slot.get(open)).await {
        Ok(connected) => connected?,
        Err(_) => return Err(timed_out("no redis connection in time")),
    };
    match tokio::time::timeout_at(deadline, invocation.invoke_async::<T>(&mut conn)).await {
        Ok(Ok(values)) => Ok(values),
        Ok(Err(e)) => {
            if cannot_serve(&e) {
                slot.release(generation);
            }
            Err(redis_error(&e))
        }
        Err(_) => {
            if drop_on_timeout {
                slot.release(generation);
            }
            Err(timed_out("redis did not answer in time"))
        }
    }
}

/// Whether the connection should be given up rather than the error being the server's
/// answer to this one command: it is broken, or its server cannot serve this store
/// (a replica after a failover, a node still loading, a cluster node that no longer owns
/// the slot or has lost its quorum).
fn cannot_serve(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
        || e.is_timeout()
        || server_cannot_serve(e)
}

/// Server answers (by their error code) that say the server cannot serve this store.
const CANNOT_SERVE: [&str; 8] = [
    "READONLY",
    "LOADING",
    "MASTERDOWN",
    "MOVED",
    "ASK",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "CROSSSLOT",
];

fn server_cannot_serve(e: &RedisError) -> bool {
    e.code().is_some_and(|code| CANNOT_SERVE.contains(&code))
}

/// An identity-free error: redis errors can echo keys, so only their category is kept.
/// Failures that say this server cannot serve the store are `Unavailable` (they count
/// toward the circuit breaker, so the fallback answers); an error the server answered for
/// one command (`WRONGTYPE`, `OOM`) is `Protocol` and does not.
pub(super) fn redis_error(e: &RedisError) -> StoreError {
    if e.is_timeout() {
        StoreError::new(StoreErrorKind::Timeout, "redis timed out")
    } else if server_cannot_serve(e) {
        StoreError::new(
            StoreErrorKind::Unavailable,
            format!(
                "redis cannot serve this store ({}); reconnecting",
                e.category()
            ),
        )
    } else if e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
        || matches!(
            e.kind(),
            ErrorKind::InvalidClientConfig | ErrorKind::AuthenticationFailed
        )
    {
        StoreError::new(
            StoreErrorKind::Unavailable,
            format!("redis connection failed ({})", e.category()),
        )
    } else {
        StoreError::new(
            StoreErrorKind::Protocol,
            format!("redis answered an error ({})", e.category()),
        )
    }
}

/// An `Unavailable` error: a store that cannot be used as built (a URL, a CA), so every
/// call fails to its fallback.
pub(super) fn invalid(message: &'static str) -> StoreError {
    StoreError::new(StoreErrorKind::Unavailable, message)
}

pub(super) fn timed_out(message: &'static str) -> StoreError {
    StoreError::new(StoreErrorKind::Timeout, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failover_answers_mean_the_connection_cannot_serve() {
        for code in CANNOT_SERVE {
            let e = redis::make_extension_error(code.to_owned(), Some("detail".into()));
            assert!(cannot_serve(&e), "{code}");
            assert_eq!(
                redis_error(&e).kind(),
                StoreErrorKind::Unavailable,
                "{code}"
            );
        }
        // An answer about one command keeps the connection and spares the breaker.
        for code in ["WRONGTYPE", "OOM", "ERR"] {
            let e = redis::make_extension_error(code.to_owned(), None);
            assert!(!cannot_serve(&e), "{code}");
            assert_eq!(redis_error(&e).kind(), StoreErrorKind::Protocol, "{code}");
        }
    }
}
