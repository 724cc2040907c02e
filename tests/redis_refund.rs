//! `settle.lua` in its exact-refund mode, which gives back a Redis Cluster reservation when
//! another slot refused the request, run directly on a private `redis-server` against key states set
//! by hand: it gives back exactly what the reservation took, or nothing (strict), never
//! more. The cluster tests (`tests/redis_cluster.rs`) run it through the store.
#![cfg(feature = "redis")]

mod common;

use common::redis::{fresh_prefix, packed_state, state_of, RedisServer};
use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;

/// As the store sends it: the state and the algorithms, then the settlement.
const REFUND: &str = concat!(
    include_str!("../src/store/lua/algorithms.lua"),
    include_str!("../src/store/lua/settle.lua")
);

/// A token bucket of 2 per 2 s: one token every second, a burst of two.
const LIMIT: i64 = 2;
const PERIOD: i64 = 2_000_000;
const INTERVAL: i64 = 1_000_000;

/// Runs the refund of one token-bucket key reserved at `at` (its arrival time then
/// `reserved`), on the caller's time `now` (or Redis `TIME` for -1): keys given back and
/// the key's arrival time after.
async fn refund(
    conn: &mut MultiplexedConnection,
    key: &str,
    at: i64,
    now: i64,
    reserved: i64,
) -> (i64, i64) {
    // The algorithm, the clock, an exact refund; then the key's count, period, when its
    // reservation was decided, the arrival time it wrote, and one unit given back.
    let given: i64 = redis::Script::new(REFUND)
        .key(key)
        .arg(3)
        .arg(now)
        .arg(1)
        .arg(LIMIT)
        .arg(PERIOD)
        .arg(at)
        .arg(reserved)
        .arg(-1)
        .invoke_async(conn)
        .await
        .unwrap();
    let value: Vec<u8> = conn.get(key).await.unwrap();
    let (t, _, _) = state_of(&value).expect("a state");
    (given, t as i64)
}

async fn set_arrival(conn: &mut MultiplexedConnection, key: &str, t: i64) {
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(packed_state(t as u64, 0, LIMIT as u32))
        .arg("PX")
        .arg(60_000)
        .query_async(conn)
        .await
        .unwrap();
}

/// A private server (kept alive by the caller), a connection to it and a fresh key name;
/// `None` where no redis-server can be started (the test then passes vacuously unless
/// Redis is required).
async fn bucket(test: &str) -> Option<(RedisServer, MultiplexedConnection, String)> {
    let server = RedisServer::private(test)?;
    let conn = server.conn().await;
    Some((server, conn, format!("{}:tb", fresh_prefix())))
}

async fn redis_now(conn: &mut MultiplexedConnection) -> i64 {
    let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(conn).await.unwrap();
    secs * 1_000_000 + micros
}

/// Nobody counted since the reservation: taking it out leaves the bucket as it was (or
/// idle from the reservation's time, which no later request can tell apart).
#[tokio::test]
async fn a_token_bucket_nobody_used_since_is_given_back() {
    let Some((_server, mut conn, key)) = bucket("a_token_bucket_nobody_used_since").await else {
        return;
    };
    let at = 1_700_000_000_000_000;
    // The bucket was idle: the reservation wrote at + one interval.
    set_arrival(&mut conn, &key, at + INTERVAL).await;
    assert_eq!(
        refund(&mut conn, &key, at, at, at + INTERVAL).await,
        (1, at)
    );
}

/// The reservation found the bucket idle and another request queued behind it: that one
/// would have started from its own, later time, so moving the arrival time back one
/// interval would give back more than the reservation took. Nothing is given back.
#[tokio::test]
async fn a_token_bucket_others_queued_behind_an_idle_reservation_keeps_it() {
    let Some((_server, mut conn, key)) = bucket("a_token_bucket_others_queued_behind").await else {
        return;
    };
    let at = redis_now(&mut conn).await;
    let reserved = at + INTERVAL;
    // A second request half a second later queued behind the reservation.
    set_arrival(&mut conn, &key, reserved + INTERVAL).await;
    for now in [at, -1] {
        assert_eq!(
            refund(&mut conn, &key, at, now, reserved).await,
            (0, reserved + INTERVAL),
            "now {now}"
        );
    }
}

/// The reservation queued behind a busy bucket, and a request queued behind it since: on
/// Redis's clock, before the reservation's arrival time has passed (so nobody can have
/// found the bucket idle since), taking one interval out is exact. On a caller's clock
/// the refund cannot know what came since, and keeps it.
#[tokio::test]
async fn a_token_bucket_busy_before_the_reservation_is_given_back_on_redis_time() {
    let Some((_server, mut conn, key)) = bucket("a_token_bucket_busy_before").await else {
        return;
    };
    let at = redis_now(&mut conn).await;
    // The bucket was busy until at + 5 s: the reservation wrote at + 6 s, a request since
    // at + 7 s. Without the reservation that request would have written at + 6 s.
    let reserved = at + 6 * INTERVAL;
    set_arrival(&mut conn, &key, reserved + INTERVAL).await;
    assert_eq!(
        refund(&mut conn, &key, at, at, reserved).await,
        (0, reserved + INTERVAL),
        "caller's clock: kept"
    );
    assert_eq!(
        refund(&mut conn, &key, at, -1, reserved).await,
        (1, reserved),
        "Redis's clock: given back"
    );
}

/// Once the reservation's arrival time has passed, a request since may have found the
/// bucket idle and started afresh: nothing is given back.
#[tokio::test]
async fn a_token_bucket_past_its_reservation_keeps_it() {
    let Some((_server, mut conn, key)) = bucket("a_token_bucket_past_its_reservation").await else {
        return;
    };
    let now = redis_now(&mut conn).await;
    // Reserved 10 s ago behind a busy bucket; a request since wrote a later time.
    let at = now - 10 * INTERVAL;
    let reserved = at + 3 * INTERVAL;
    set_arrival(&mut conn, &key, now + INTERVAL).await;
    assert_eq!(
        refund(&mut conn, &key, at, -1, reserved).await,
        (0, now + INTERVAL)
    );
}

/// Sixteen bytes the store never writes (a count above 10^9) are not a counter: nothing
/// is given back there, and the value stays as it was.
#[tokio::test]
async fn a_value_the_store_did_not_write_is_left_alone() {
    let Some((_server, mut conn, key)) = bucket("a_value_the_store_did_not_write").await else {
        return;
    };
    let at = redis_now(&mut conn).await;
    // Read as a fixed window, this would hold the reservation's window with a count.
    let foreign = packed_state(at as u64 - 1, u32::MAX, 0);
    let _: () = conn.set(&key, &foreign).await.unwrap();
    let given: i64 = redis::Script::new(REFUND)
        .key(&key)
        .arg(1)
        .arg(-1)
        .arg(1)
        .arg(LIMIT)
        .arg(PERIOD)
        .arg(at)
        .arg(0)
        .arg(-1)
        .invoke_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(given, 0);
    let kept: Vec<u8> = conn.get(&key).await.unwrap();
    assert_eq!(kept, foreign);
}
