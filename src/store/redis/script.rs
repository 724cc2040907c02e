//! One call of the Redis script: a batch of jobs (one request each, or a cluster
//! request's keys on one hash slot) encoded as `batch.lua` takes them, sent on one
//! socket by a deadline, and its packed answer split back per job.

use std::time::Duration;

use redis::Script;

use super::conn::{invalid, Connector};
use crate::algorithm::Algorithm;
use crate::store::{Outcome, Outcomes, StoreError, StoreErrorKind};

/// What sends a script call: the connections, the script, and the bound on every call.
/// Shared by the store and its coalescing lanes.
pub(super) struct Caller {
    /// `None` when the store could not be built from a config (every call fails).
    pub(super) connector: Option<Connector>,
    /// `lua/algorithms.lua` + `lua/batch.lua`: decides one request or a batch.
    script: Script,
    pub(super) timeout: Duration,
}

impl Caller {
    pub(super) fn new(connector: Option<Connector>, timeout: Duration) -> Self {
        Caller {
            connector,
            script: Script::new(concat!(
                include_str!("../lua/algorithms.lua"),
                include_str!("../lua/batch.lua")
            )),
            timeout,
        }
    }

    pub(super) fn connector(&self) -> Result<&Connector, StoreError> {
        self.connector
            .as_ref()
            .ok_or_else(|| invalid("the redis backend could not be built"))
    }

    /// One script call deciding `job` alone.
    pub(super) async fn run_one(
        &self,
        job: &Job,
        lane: usize,
        deadline: tokio::time::Instant,
    ) -> Answer {
        let mut answers = self.run(std::iter::once(job), lane, deadline).await?;
        answers.pop().unwrap_or_else(|| {
            Err(StoreError::new(
                StoreErrorKind::Protocol,
                "the redis script answered nothing",
            ))
        })
    }

    /// One script call deciding `jobs` in order (they share one caller time), on socket
    /// `lane` (to one server; a cluster routes by the first key): one answer per job.
    pub(super) async fn run<'a>(
        &self,
        jobs: impl Iterator<Item = &'a Job> + Clone,
        lane: usize,
        deadline: tokio::time::Instant,
    ) -> Result<Vec<Answer>, StoreError> {
        let encoded = encode(jobs.clone());
        let mut invocation = self.script.prepare_invoke();
        for key in &encoded.keys {
            invocation.key(*key);
        }
        invocation
            .arg(encoded.now)
            .arg(encoded.requests)
            .arg(&encoded.packed[..]);
        let answer: Vec<u8> = self
            .connector()?
            .invoke(&invocation, lane, self.timeout, deadline)
            .await?;
        parse(&answer, jobs)
    }
}

/// One request (or, on a cluster, its keys on one hash slot) as the script takes it.
#[derive(Clone)]
pub(super) struct Job {
    pub(super) algorithm: Algorithm,
    /// The caller's time, when the store decides on it (else Redis `TIME`).
    pub(super) now: Option<u64>,
    /// The call's cost in units.
    pub(super) cost: u64,
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
    /// algorithm and number of keys (u8 each) and its cost (u32), then per key its index
    /// into KEYS (u16),
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
        // The script decides a cost above a key's count as one more than it (never
        // fits), so a larger one needs no more than 32 bits.
        packed.extend_from_slice(&u32::try_from(job.cost).unwrap_or(u32::MAX).to_le_bytes());
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
                by_fallback: false,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn job(keys: &[&str]) -> Job {
        Job {
            algorithm: Algorithm::FixedWindow,
            now: Some(7),
            cost: 1,
            keys: keys
                .iter()
                .map(|k| CallKey {
                    name: (*k).to_owned(),
                    count: 5,
                    period: 60_000_000,
                })
                .collect(),
        }
    }

    #[test]
    fn a_batch_sends_each_key_once_and_splits_the_answer_per_request() {
        let jobs = [job(&["a", "b"]), job(&["b"]), job(&["c", "a"])];
        let encoded = encode(jobs.iter());
        assert_eq!(encoded.keys, ["a", "b", "c"]);
        assert_eq!((encoded.now, encoded.requests), (7, 3));
        let mut expected = Vec::new();
        for (n, indices) in [(2u8, vec![1u16, 2]), (1, vec![2]), (2, vec![3, 1])] {
            expected.extend([1, n]);
            expected.extend(1u32.to_le_bytes());
            for i in indices {
                expected.extend(i.to_le_bytes());
                expected.extend(5u32.to_le_bytes());
                expected.extend(60_000_000f64.to_le_bytes());
            }
        }
        assert_eq!(encoded.packed, expected);

        // Per job a status byte, then per key allowed, remaining, reset_after and
        // retry_after; last the time decided at. The second job's key was refused.
        let key = |k: u32| {
            let mut bytes = vec![1];
            bytes.extend(k.to_le_bytes());
            bytes.extend((10 + u64::from(k)).to_le_bytes());
            bytes.extend(0u64.to_le_bytes());
            bytes
        };
        let mut values = vec![1];
        values.extend(key(0));
        values.extend(key(1));
        values.push(0);
        values.extend([0; 21]);
        values.push(1);
        values.extend(key(3));
        values.extend(key(4));
        values.extend(100u64.to_le_bytes());
        let answers = parse(&values, jobs.iter()).unwrap();
        let remaining: Vec<Option<Vec<u64>>> = answers
            .iter()
            .map(|a| {
                a.as_ref()
                    .ok()
                    .map(|(o, _)| o.iter().map(|o| o.remaining).collect())
            })
            .collect();
        assert_eq!(remaining, [Some(vec![0, 1]), None, Some(vec![3, 4])]);
        assert_eq!(
            answers[1].as_ref().unwrap_err().kind(),
            StoreErrorKind::Protocol
        );
        let (last, at) = answers[2].as_ref().unwrap();
        assert_eq!(*at, 100);
        assert_eq!(last.iter().last().unwrap().reset_at, 114);
    }

    #[test]
    fn unexpected_answers_are_protocol_errors() {
        let one = [job(&["a"])];
        let answer = |status: u8, allowed: u8, reset_after: u64| {
            let mut bytes = vec![status, allowed];
            bytes.extend(1u32.to_le_bytes());
            bytes.extend(reset_after.to_le_bytes());
            bytes.extend(0u64.to_le_bytes());
            bytes.extend(9u64.to_le_bytes());
            bytes
        };
        assert!(parse(&answer(1, 1, 2), one.iter()).is_ok());
        let bad = [
            // Too short: the time is missing.
            answer(1, 1, 2)[..22].to_vec(),
            // A status or an allowed flag other than 0 and 1.
            answer(2, 1, 2),
            answer(1, 7, 2),
            // A negative wait, packed unsigned.
            answer(1, 1, (-2i64) as u64),
        ];
        for bytes in bad {
            assert_eq!(
                parse(&bytes, one.iter()).unwrap_err().kind(),
                StoreErrorKind::Protocol
            );
        }
    }
}
