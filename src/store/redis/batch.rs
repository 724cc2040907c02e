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

use super::script::{Answer, Caller, Job};
use crate::store::{StoreError, StoreErrorKind};

/// Lanes per store. Redis runs one script at a time, so coalescing wants the fewest,
/// largest batches that still keep it busy: with two lanes one batch runs while the other
/// travels or fills (a double buffer); one lane leaves Redis idle for every round trip,
/// and more lanes split the queue into smaller batches that each pay a call's fixed cost.
/// `cargo run --release --example redis_throughput` at 64 callers, one rule, gave
/// 1.44× coalescing off with one lane, 2.10× with two, 1.95× with three, 1.74× with four.
pub(super) const LANES: usize = 2;

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
    pub(super) async fn submit(&self, store: &Arc<Caller>, job: Job, deadline: Instant) -> Answer {
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
    store: Weak<Caller>,
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
    use crate::algorithm::Algorithm;
    use std::time::Duration;

    fn queued(deadline: Instant) -> (Queued, oneshot::Receiver<Answer>) {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            algorithm: Algorithm::FixedWindow,
            now: None,
            cost: 1,
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
