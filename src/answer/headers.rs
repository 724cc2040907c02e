//! The rate headers a decision is stated in (`X-RateLimit-*`, `RateLimit-Policy` /
//! `RateLimit`, `Retry-After`), formatted without a heap allocation per value.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::sync::OnceLock;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, RETRY_AFTER};
use http::HeaderMap;

use super::decision::Decision;
use crate::config::HeaderStyle;

static X_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static X_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static X_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
static POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Header values are cut from a per-thread buffer: each value is a slice of one shared
/// chunk, so formatting a header costs no heap allocation (one 16 KiB chunk serves a few
/// thousand values, then the next is allocated; a chunk is freed when its last value is).
const CHUNK: usize = 16 * 1024;
/// Longest value written at once (an IETF policy with four rules is under 160 bytes).
const LONGEST: usize = 256;

/// This thread's chunk, and the last limit and reset it stated: consecutive responses on
/// a thread mostly state the same ones (one rule's count; aligned windows, or one busy
/// user), so those values are kept and reused instead of formatted again.
struct Values {
    chunk: BytesMut,
    limit: Option<(u64, HeaderValue)>,
    reset: Option<(u64, HeaderValue)>,
}

thread_local! {
    static VALUES: RefCell<Values> = RefCell::new(Values {
        chunk: BytesMut::new(),
        limit: None,
        reset: None,
    });
}

impl Values {
    /// Bytes written by `write`, cut from the chunk.
    fn cut(&mut self, write: impl FnOnce(&mut BytesMut)) -> Bytes {
        let chunk = &mut self.chunk;
        if chunk.capacity() - chunk.len() < LONGEST {
            *chunk = BytesMut::with_capacity(CHUNK);
        }
        write(chunk);
        chunk.split().freeze()
    }

    fn value(&mut self, write: impl FnOnce(&mut BytesMut)) -> HeaderValue {
        HeaderValue::from_maybe_shared(self.cut(write)).expect("tollgate writes only visible ASCII")
    }

    fn number(&mut self, n: u64) -> HeaderValue {
        small_number(n).unwrap_or_else(|| {
            self.value(|buf| buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes()))
        })
    }

    /// `n`'s value, reusing the one in `slot` when it states `n`.
    fn recent(
        &mut self,
        slot: fn(&mut Values) -> &mut Option<(u64, HeaderValue)>,
        n: u64,
    ) -> HeaderValue {
        if let Some((last, value)) = slot(self) {
            if *last == n {
                return value.clone();
            }
        }
        let value = self.number(n);
        *slot(self) = Some((n, value.clone()));
        value
    }
}

/// Bytes written by `write`, cut from this thread's chunk.
pub(crate) fn cut(write: impl FnOnce(&mut BytesMut)) -> Bytes {
    VALUES.with(|values| values.borrow_mut().cut(write))
}

fn value(write: impl FnOnce(&mut BytesMut)) -> HeaderValue {
    VALUES.with(|values| values.borrow_mut().value(write))
}

fn number(n: u64) -> HeaderValue {
    small_number(n).unwrap_or_else(|| VALUES.with(|values| values.borrow_mut().number(n)))
}

/// Numbers below this are shared, static header values (remaining counts and limits of
/// everyday rates): cloning and dropping one costs nothing.
const SMALL_NUMBERS: usize = 4_096;

fn small_number(n: u64) -> Option<HeaderValue> {
    static SMALL: OnceLock<Box<[HeaderValue]>> = OnceLock::new();
    let small = SMALL.get_or_init(|| {
        // Built once per process: one 18 KB string, kept for the life of the process.
        let mut text = String::new();
        let mut ends = Vec::with_capacity(SMALL_NUMBERS);
        for i in 0..SMALL_NUMBERS {
            text.push_str(itoa::Buffer::new().format(i));
            ends.push(text.len());
        }
        let text: &'static str = Box::leak(text.into_boxed_str());
        let mut start = 0;
        ends.into_iter()
            .map(|end| {
                let value = HeaderValue::from_static(&text[start..end]);
                start = end;
                value
            })
            .collect()
    });
    usize::try_from(n).ok().and_then(|i| small.get(i)).cloned()
}

/// Writes the decision's rate headers in `style`; `Retry-After` too when `rejected`.
pub(crate) fn write_headers(
    style: HeaderStyle,
    decision: &Decision,
    headers: &mut HeaderMap,
    rejected: bool,
) {
    if rejected {
        headers.insert(RETRY_AFTER, number(decision.retry_after_secs()));
    }
    let Some(speaker) = decision.speaking() else {
        return;
    };
    if matches!(style, HeaderStyle::Legacy | HeaderStyle::Both) {
        // One visit to this thread's values for all three.
        let (limit, remaining, reset) = VALUES.with(|values| {
            let values = &mut *values.borrow_mut();
            (
                values.recent(|v| &mut v.limit, speaker.rate.count()),
                values.number(speaker.remaining),
                decision
                    .reset_epoch_secs()
                    .map(|reset| values.recent(|v| &mut v.reset, reset)),
            )
        });
        headers.insert(X_LIMIT.clone(), limit);
        headers.insert(X_REMAINING.clone(), remaining);
        if let Some(reset) = reset {
            headers.insert(X_RESET.clone(), reset);
        }
    }
    if matches!(style, HeaderStyle::Ietf | HeaderStyle::Both) {
        let policy = value(|buf| {
            for (i, (kind, rate)) in decision.rules().enumerate() {
                let sep = if i > 0 { ", " } else { "" };
                let _ = write!(
                    buf,
                    "{sep}\"{kind}\";q={};w={}",
                    rate.count(),
                    rate.period_secs()
                );
            }
        });
        let reset = speaker.reset_after.div_ceil(1_000_000);
        let current = value(|buf| {
            let _ = write!(
                buf,
                "\"{}\";r={};t={}",
                speaker.kind, speaker.remaining, reset
            );
        });
        headers.insert(POLICY.clone(), policy);
        headers.insert(RATELIMIT.clone(), current);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answer::decision::Verdict;
    use crate::key::RuleKind;
    use crate::rate::Rate;
    use crate::store::Outcome;

    /// The last limit and reset a thread wrote are reused: only when they state the same
    /// numbers (two layers with different limits alternate on one thread).
    #[test]
    fn reused_values_state_the_number_asked_for() {
        let decision = |count: u64, reset_secs: u64| {
            let verdict = Verdict {
                kind: RuleKind::User,
                rate: Rate::new(count, std::time::Duration::from_secs(60)).unwrap(),
                outcome: Outcome::allowed(count - 1, std::time::Duration::from_secs(30))
                    .with_reset_at_micros(reset_secs * 1_000_000),
            };
            Decision::of_verdicts(&[Some(verdict), None, None, None], 0)
        };
        for (count, reset) in [
            (10_000, 7_000),
            (20_000, 7_000),
            (10_000, 8_000),
            (10_000, 8_000),
        ] {
            let mut headers = HeaderMap::new();
            write_headers(
                HeaderStyle::Legacy,
                &decision(count, reset),
                &mut headers,
                false,
            );
            assert_eq!(headers["x-ratelimit-limit"], count.to_string().as_str());
            assert_eq!(
                headers["x-ratelimit-remaining"],
                (count - 1).to_string().as_str()
            );
            assert_eq!(headers["x-ratelimit-reset"], reset.to_string().as_str());
        }
    }
}
