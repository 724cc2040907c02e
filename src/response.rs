//! What tollgate writes: rate headers, and the 429 / 503 / 400 problem+json responses.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::{Decision, HeaderStyle, RuleKind};

static X_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static X_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static X_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
static POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static PROBLEM_JSON: HeaderValue = HeaderValue::from_static("application/problem+json");

pin_project! {
    /// The body of a response that went through tollgate: the inner service's body, or
    /// the problem+json body of a response tollgate answered itself.
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Inner { #[pin] body: B },
        Full { data: Option<Bytes> },
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn inner(body: B) -> Self {
        ResponseBody {
            kind: Kind::Inner { body },
        }
    }

    pub(crate) fn full(data: Bytes) -> Self {
        ResponseBody {
            kind: Kind::Full { data: Some(data) },
        }
    }
}

impl<B> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Inner { .. } => f.write_str("ResponseBody::Inner"),
            Kind::Full { .. } => f.write_str("ResponseBody::Full"),
        }
    }
}

impl<B: Body<Data = Bytes>> Body for ResponseBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Inner { body } => body.poll_frame(cx),
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

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

/// The 429 answer: rate headers, `Retry-After`, and a problem+json body that names the
/// rules (and the tool, when the tool's rule was exceeded) but never a user or tenant.
pub(crate) fn too_many_requests(
    style: HeaderStyle,
    decision: &Decision,
    named: Option<(RuleKind, &str)>,
) -> Response<Bytes> {
    let retry = decision.retry_after_secs();
    let body = cut(|buf| {
        buf.extend_from_slice(
            b"{\"type\":\"https://iana.org/assignments/http-problem-types#quota-exceeded\",\
              \"title\":\"Rate limit exceeded\",\"status\":429,\"code\":\"RATE_LIMIT\",\
              \"detail\":\"",
        );
        detail_into(buf, decision, named);
        let _ = write!(buf, "\",\"retry_after\":{retry},\"violated\":");
        violated_into(buf, decision);
        buf.extend_from_slice(b"}");
    });
    let mut resp = problem(StatusCode::TOO_MANY_REQUESTS, body);
    write_headers(style, decision, resp.headers_mut(), true);
    resp
}

/// Writes, JSON-escaped, the detail of a refusal. It describes the speaking rule, as every
/// header does (ARCHITECTURE.md, behaviour contract items 7 and 9): `Rate limit exceeded
/// for tool 'search'` when the tool's (or the prompt's) rule speaks, `... for tool
/// 'search': per-user limit of 5/m` for the per-user tool rule, else `Rate limit exceeded:
/// user limit of 30/m`. `named` is a configured (normalised) name, never a user or tenant.
pub(crate) fn detail_into(
    buf: &mut BytesMut,
    decision: &Decision,
    named: Option<(RuleKind, &str)>,
) {
    buf.extend_from_slice(b"Rate limit exceeded");
    match (decision.speaking(), named) {
        (Some(v), Some((kind, name)))
            if v.kind == kind || (v.kind == RuleKind::UserTool && kind == RuleKind::Tool) =>
        {
            let _ = write!(buf, " for {kind} '");
            json_escape_into(buf, name);
            buf.extend_from_slice(b"'");
            if v.kind == RuleKind::UserTool {
                let _ = write!(buf, ": per-user limit of {}", v.rate);
            }
        }
        (Some(v), _) => {
            let _ = write!(buf, ": {} limit of {}", v.kind, v.rate);
        }
        (None, _) => {}
    }
}

/// Writes the refusing rules as a JSON array: `["tool"]`.
pub(crate) fn violated_into(buf: &mut BytesMut, decision: &Decision) {
    buf.extend_from_slice(b"[");
    for (i, kind) in decision.violated().enumerate() {
        let sep = if i > 0 { "," } else { "" };
        let _ = write!(buf, "{sep}\"{kind}\"");
    }
    buf.extend_from_slice(b"]");
}

/// The 503 answer when the store is down, no fallback answers and fail_mode = closed.
pub(crate) fn backend_unavailable() -> Response<Bytes> {
    let mut resp = problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "{\"type\":\"about:blank\",\"title\":\"Rate limiter unavailable\",\"status\":503,\
         \"code\":\"BACKEND_UNAVAILABLE\",\"detail\":\"The rate-limit backend is unavailable; \
         retry shortly.\",\"retry_after\":1}",
    );
    resp.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

/// The 400 answer for an identity tollgate will not guess at.
pub(crate) fn bad_identity(detail: &str) -> Response<Bytes> {
    let body = cut(|buf| {
        buf.extend_from_slice(
            b"{\"type\":\"about:blank\",\"title\":\"Invalid identity\",\"status\":400,\
              \"code\":\"INVALID_IDENTITY\",\"detail\":\"",
        );
        json_escape_into(buf, detail);
        buf.extend_from_slice(b"\"}");
    });
    problem(StatusCode::BAD_REQUEST, body)
}

fn problem(status: StatusCode, body: impl Into<Bytes>) -> Response<Bytes> {
    let mut resp = Response::new(body.into());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, PROBLEM_JSON.clone());
    resp
}

/// Appends `s` escaped for the inside of a JSON string.
pub(crate) fn json_escape_into(out: &mut BytesMut, s: &str) {
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => {
                let mut utf8 = [0; 4];
                out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::Verdict;
    use crate::store::Outcome;
    use crate::Rate;

    #[test]
    fn json_strings_escape_quotes_and_controls() {
        let mut out = BytesMut::new();
        json_escape_into(&mut out, "a\"b\\c\n");
        assert_eq!(&out[..], br#"a\"b\\c\u000a"#);
    }

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

    #[test]
    fn the_429_body_is_valid_json_whatever_the_tool_is_called() {
        let rejected = Outcome::rejected(
            std::time::Duration::from_secs(30),
            std::time::Duration::from_millis(29_001),
        );
        let verdict = Verdict {
            kind: RuleKind::Tool,
            rate: Rate::per_minute(10),
            outcome: rejected,
        };
        let decision = Decision::of_verdicts(&[None, None, Some(verdict), None], 1_000_000);
        let resp = too_many_requests(
            HeaderStyle::Legacy,
            &decision,
            Some((RuleKind::Tool, "se\"ar\\ch\n🦀")),
        );
        assert_eq!(resp.headers()["retry-after"], "30");
        let body = std::str::from_utf8(resp.body()).unwrap();
        assert!(
            body.ends_with(
                r#""detail":"Rate limit exceeded for tool 'se\"ar\\ch\u000a🦀'","retry_after":30,"violated":["tool"]}"#
            ),
            "{body}"
        );
    }
}
