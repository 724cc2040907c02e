//! Coalescing: the checks of concurrent requests decided in one script call.
//!
//! Two of the store's sockets to one server have a lane each ([`LANES`]): a queue and a
//! task that sends it. A request joins a lane's queue; the lane's task takes what has queued (up to
//! `max_batch`, all with the same caller time) and sends it as ONE `EVALSHA` of
//! `lua/batch.lua`, which reads each key once, decides the requests in queue order
//! exactly as one script per request would, and writes each changed key once. While that
//! batch is in flight the next one fills, so an idle store adds no wait (a lone request
//! goes at once, from its own task) and a busy one sends fewer, larger calls.
//!
//! Each request keeps its own deadline: one whose deadline passed before its batch was
//! sent is not sent; each caller stops waiting at its own deadline; a batch is bounded by
//! its latest one and, if it fails or times out, fails only its own requests (the
//! fallback answers them as for any failure).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{Inner, Outcome, Outcomes, StoreError, StoreErrorKind};
use crate::Algorithm;

/// Lanes per store. Redis runs one script at a time, so coalescing wants the fewest,
/// largest batches that still keep it busy: with two lanes one batch runs while the other
/// travels or fills (a double buffer); one lane leaves Redis idle for every round trip,
/// and more lanes split the queue into smaller batches that each pay a call's fixed cost.
/// `cargo run --release --example redis_throughput` at 64 callers, one rule, gave
/// 1.44× coalescing off with one lane, 2.10× with two, 1.95× with three, 1.74× with four.
pub(super) const LANES: usize = 2;

/// One request (or, on a cluster, its keys on one hash slot) as the script takes it.
#[derive(Clone)]
pub(super) struct Job {
    pub(super) algorithm: Algorithm,
    /// The caller's time, when the store decides on it (else Redis `TIME`).
    pub(super) now: Option<u64>,
    /// Shared, so handing a job to a lane copies no key.
    pub(super) keys: std::sync::Arc<[CallKey]>,
}

impl Job {
    /// The job's key names, in order.
    pub(super) fn names(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.name.as_str())
    }
}

/// A key's name and its rate.
#[derive(Clone)]
pub(super) struct CallKey {
    pub(super) name: String,
    /// At most 10^9 (a rate's count is checked at start-up).
    pub(super) count: u32,
    /// µs.
    pub(super) period: i64,
}

/// A job's answer: its keys' outcomes and the time the script decided at.
pub(super) type Answer = Result<(Outcomes, u64), StoreError>;

/// The script's number for `algorithm`.
pub(super) fn algorithm_code(algorithm: Algorithm) -> u8 {
    match algorithm {
        Algorithm::FixedWindow => 1,
        Algorithm::SlidingWindow => 2,
        Algorithm::TokenBucket => 3,
    }
}

/// `lua/batch.lua`'s KEYS (each key once) and ARGV for `jobs`, which share one time.
pub(super) struct Encoded<'a> {
    pub(super) keys: Vec<&'a str>,
    /// ARGV[1]: the caller's time, or -1 for Redis `TIME`.
    pub(super) now: i64,
    /// ARGV[2]: how many requests.
    pub(super) requests: i64,
    /// ARGV[3]: the requests, packed (see the script's header): per request its
    /// algorithm and number of keys (u8 each), then per key its index into KEYS (u16),
    /// count (u32) and period in µs (f64, exact: periods are far below 2^53 µs),
    /// little-endian. One argument instead of 2 + 3n numbers, each of which Redis would
    /// parse and Lua convert.
    pub(super) packed: Vec<u8>,
}

pub(super) fn encode<'a>(jobs: impl Iterator<Item = &'a Job> + Clone) -> Encoded<'a> {
    let mut keys: Vec<&str> = Vec::new();
    let mut index: hashbrown::HashMap<&str, u16> = hashbrown::HashMap::new();
    let now = jobs
        .clone()
        .next()
        .and_then(|j| j.now)
        .map_or(-1, |n| n as i64);
    let mut requests = 0;
    let mut packed = Vec::new();
    for job in jobs {
        requests += 1;
        packed.push(algorithm_code(job.algorithm));
        packed.push(job.keys.len() as u8);
        for key in job.keys.iter() {
            // At most max_batch (≤ 1 024, clamped by the builder and the config) requests
            // of four keys: far below u16::MAX.
            let i = *index.entry(key.name.as_str()).or_insert_with(|| {
                keys.push(key.name.as_str());
                keys.len() as u16
            });
            packed.extend_from_slice(&i.to_le_bytes());
            packed.extend_from_slice(&key.count.to_le_bytes());
            packed.extend_from_slice(&(key.period as f64).to_le_bytes());
        }
    }
    Encoded {
        keys,
        now,
        requests,
        packed,
    }
}

/// Bytes of the script's answer per key: allowed (u8), remaining (u32), reset_after and
/// retry_after µs (u64 each).
const KEY_BYTES: usize = 1 + 4 + 8 + 8;

/// Splits the script's packed answer (per job a status byte, then [`KEY_BYTES`] per key;
/// last the time it decided at, all little-endian) back into one answer per job. A
/// status of 0 means Redis refused one of the job's keys (a key of another type, a write
/// refused for lack of memory): that job alone fails, as it would have in a call of its
/// own.
pub(super) fn parse<'a>(
    answer: &[u8],
    jobs: impl Iterator<Item = &'a Job> + Clone,
) -> Result<Vec<Answer>, StoreError> {
    let shape = || {
        StoreError::new(
            StoreErrorKind::Protocol,
            "the redis script answered an unexpected shape",
        )
    };
    let (count, keys) = jobs
        .clone()
        .fold((0, 0), |(n, k), job| (n + 1, k + job.keys.len()));
    if answer.len() != count + KEY_BYTES * keys + 8 {
        return Err(shape());
    }
    let u64_at = |bytes: &[u8]| u64::from_le_bytes(bytes.try_into().expect("eight bytes"));
    let (mut rest, at) = answer.split_at(answer.len() - 8);
    let decided_at = u64_at(at);
    // Every time the script states is below 2^53 µs (it computes in doubles): anything
    // larger is a negative number packed unsigned, or a broken script.
    const MAX: u64 = 1 << 53;
    let mut answers = Vec::with_capacity(count);
    for job in jobs {
        let (status, tail) = rest.split_at(1);
        let (mine, tail) = tail.split_at(KEY_BYTES * job.keys.len());
        rest = tail;
        let mut out = Outcomes::new();
        for key in mine.chunks_exact(KEY_BYTES) {
            let reset_after = u64_at(&key[5..13]);
            let retry_after = u64_at(&key[13..21]);
            if key[0] > 1 || reset_after > MAX || retry_after > MAX || decided_at > MAX {
                return Err(shape());
            }
            out.push(Outcome {
                allowed: key[0] == 1,
                remaining: u64::from(u32::from_le_bytes(
                    key[1..5].try_into().expect("four bytes"),
                )),
                reset_after,
                retry_after,
                reset_at: decided_at.saturating_add(reset_after),
            });
        }
        answers.push(match status[0] {
            1 => Ok((out, decided_at)),
            0 => Err(StoreError::new(
                StoreErrorKind::Protocol,
                "redis refused a key of this request (another type, or out of memory)",
            )),
            _ => return Err(shape()),
        });
    }
    Ok(answers)
}

/// A job waiting in a lane.
struct Queued {
    job: Job,
    deadline: Instant,
    reply: oneshot::Sender<Answer>,
}

/// The lanes of one store ([`LANES`], each on its own socket).
pub(super) struct Coalescer {
    lanes: Box<[Lane]>,
    next: AtomicUsize,
    max_batch: usize,
}

struct Lane {
    /// The lane task's queue; replaced when that task is gone (its runtime shut down).
    queue: Mutex<Option<mpsc::UnboundedSender<Queued>>>,
    /// Callers waiting on this lane (queued, in a batch in flight, or sent alone).
    waiting: AtomicUsize,
}

/// One caller counted in [`Lane::waiting`] until it returns (answered, timed out or
/// dropped).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Coalescer {
    pub(super) fn new(lanes: usize, max_batch: usize) -> Self {
        Coalescer {
            lanes: (0..lanes.max(1))
                .map(|_| Lane {
                    queue: Mutex::new(None),
                    waiting: AtomicUsize::new(0),
                })
                .collect(),
            next: AtomicUsize::new(0),
            max_batch,
        }
    }

    /// Most requests in one batch.
    pub(super) fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// `job`'s answer, decided in a batch on one of the lanes, by `deadline`.
    pub(super) async fn submit(&self, store: &Arc<Inner>, job: Job, deadline: Instant) -> Answer {
        let lane = self.next.fetch_add(1, Ordering::Relaxed) % self.lanes.len();
        let waiting = &self.lanes[lane].waiting;
        // Nobody waits on this lane: the request is alone, and goes at once from this task
        // (no hop through the lane's task), as with coalescing off.
        if waiting
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            let _waiting = Waiting(waiting);
            return store.run_one(&job, lane, deadline).await;
        }
        waiting.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(waiting);
        let store = Arc::downgrade(store);
        let (reply, answer) = oneshot::channel();
        let queued = Queued {
            job,
            deadline,
            reply,
        };
        {
            let mut queue = self.lanes[lane]
                .queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let unsent = match queue.as_ref() {
                Some(sender) => sender.send(queued).err().map(|e| e.0),
                None => Some(queued),
            };
            if let Some(queued) = unsent {
                // No lane task yet, or its runtime shut down: start one on this runtime.
                let (sender, receiver) = mpsc::unbounded_channel();
                tokio::spawn(run_lane(store, lane, self.max_batch, receiver));
                // Cannot fail: the receiver was just made and is alive.
                let _ = sender.send(queued);
                *queue = Some(sender);
            }
        }
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(StoreError::new(
                StoreErrorKind::Unavailable,
                "the redis batch was dropped (its runtime shut down)",
            )),
            Err(_) => Err(super::conn::timed_out("redis did not answer in time")),
        }
    }
}

/// The requests still worth sending at `now`, and those whose deadline has passed while
/// they queued (they are answered with a timeout, never sent: Redis must not count a
/// request its caller has already given up on). One whose caller has gone is dropped.
fn still_wanted(batch: Vec<Queued>, now: Instant) -> (Vec<Queued>, Vec<Queued>) {
    batch
        .into_iter()
        .filter(|q| !q.reply.is_closed())
        .partition(|q| q.deadline > now)
}

/// A lane's task: sends what has queued as one batch at a time, until the store is gone.
async fn run_lane(
    store: Weak<Inner>,
    lane: usize,
    max_batch: usize,
    mut queue: mpsc::UnboundedReceiver<Queued>,
) {
    let mut next: Option<Queued> = None;
    loop {
        let first = match next.take() {
            Some(q) => q,
            None => match queue.recv().await {
                Some(q) => q,
                None => return,
            },
        };
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match queue.try_recv() {
                // One batch, one time: a request on another caller time starts the next.
                Ok(q) if q.job.now == batch[0].job.now => batch.push(q),
                Ok(q) => {
                    next = Some(q);
                    break;
                }
                Err(_) => break,
            }
        }
        let (batch, late) = still_wanted(batch, Instant::now());
        for q in late {
            let _ = q.reply.send(Err(super::conn::timed_out(
                "the deadline passed before the redis batch was sent",
            )));
        }
        // Bounded by the latest deadline: each caller stops waiting at its own, and a batch
        // cut short by its most impatient member would fail (and be counted by Redis
        // anyway, when it arrives) for everyone.
        let Some(deadline) = batch.iter().map(|q| q.deadline).max() else {
            continue;
        };
        let Some(store) = store.upgrade() else {
            return;
        };
        match store
            .run(batch.iter().map(|q| &q.job), lane, deadline)
            .await
        {
            Ok(answers) => {
                for (q, answer) in batch.into_iter().zip(answers) {
                    let _ = q.reply.send(answer);
                }
            }
            Err(error) => {
                for q in batch {
                    let _ = q.reply.send(Err(error.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn queued(deadline: Instant) -> (Queued, oneshot::Receiver<Answer>) {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            algorithm: Algorithm::FixedWindow,
            now: None,
            keys: Vec::new().into(),
        };
        (
            Queued {
                job,
                deadline,
                reply,
            },
            answer,
        )
    }

    #[test]
    fn a_request_past_its_deadline_or_abandoned_is_not_sent() {
        let now = Instant::now();
        let (late, _late_rx) = queued(now - Duration::from_millis(1));
        let (due, _due_rx) = queued(now + Duration::from_millis(50));
        let (gone, gone_rx) = queued(now + Duration::from_millis(50));
        drop(gone_rx);
        let (send, late) = still_wanted(vec![late, due, gone], now);
        assert_eq!(send.len(), 1);
        assert_eq!(send[0].deadline, now + Duration::from_millis(50));
        assert_eq!(late.len(), 1);
    }
}
