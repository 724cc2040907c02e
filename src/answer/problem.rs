//! The answers tollgate writes itself: the 429 (rate limited), the 503 (the store is down
//! and `fail_mode = "closed"`) and the 400 (an identity it will not guess at), each
//! `application/problem+json` without a user or tenant id.

use std::fmt::Write as _;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};

use super::decision::Decision;
use super::headers::{cut, write_headers};
use crate::config::HeaderStyle;
use crate::key::RuleKind;

static PROBLEM_JSON: HeaderValue = HeaderValue::from_static("application/problem+json");

/// The 429 answer: rate headers, `Retry-After`, and a problem+json body that names the
/// rules, the tool or prompt when its rule is among them, and the call's cost when it is
/// not 1, but never a user or tenant. A call that costs more than a rule's whole limit
/// gets code `COST_EXCEEDS_LIMIT`, and no `Retry-After`: no wait would help.
pub(crate) fn too_many_requests(
    style: HeaderStyle,
    decision: &Decision,
    named: Option<(RuleKind, &str)>,
) -> Response<Bytes> {
    let exceeds = decision.exceeds_limit();
    let body = cut(|buf| {
        buf.extend_from_slice(
            b"{\"type\":\"https://iana.org/assignments/http-problem-types#quota-exceeded\",",
        );
        if exceeds {
            buf.extend_from_slice(
                b"\"title\":\"Cost exceeds the limit\",\"status\":429,\"code\":\"COST_EXCEEDS_LIMIT\"",
            );
        } else {
            buf.extend_from_slice(
                b"\"title\":\"Rate limit exceeded\",\"status\":429,\"code\":\"RATE_LIMIT\"",
            );
        }
        named_into(buf, decision, named);
        buf.extend_from_slice(b",\"detail\":\"");
        detail_into(buf, decision, named);
        buf.extend_from_slice(b"\"");
        if decision.cost() != 1 || exceeds {
            let _ = write!(buf, ",\"cost\":{}", decision.cost());
        }
        match decision.speaking() {
            Some(v) if exceeds => {
                let _ = write!(buf, ",\"limit\":{}", v.rate.count());
            }
            Some(v) if decision.cost() != 1 => {
                let _ = write!(buf, ",\"remaining\":{}", v.remaining);
            }
            _ => {}
        }
        if !exceeds {
            let _ = write!(buf, ",\"retry_after\":{}", decision.retry_after_secs());
        }
        buf.extend_from_slice(b",\"violated\":");
        violated_into(buf, decision);
        buf.extend_from_slice(b"}");
    });
    let mut resp = problem(StatusCode::TOO_MANY_REQUESTS, body);
    if !exceeds {
        write_headers(style, decision, resp.headers_mut(), true);
    }
    resp
}

/// The call's tool or prompt (`named`) when its rule is among those that refused it (a
/// user × tool rule is the tool's), whichever rule speaks.
pub(crate) fn refusing_target<'n>(
    decision: &Decision,
    named: Option<(RuleKind, &'n str)>,
) -> Option<(RuleKind, &'n str)> {
    let (kind, name) = named?;
    decision
        .violated()
        .any(|v| v == kind || (kind == RuleKind::Tool && v == RuleKind::UserTool))
        .then_some((kind, name))
}

/// `,"tool":"search"` (or `"prompt"`) when the call's tool or prompt has a rule among
/// those that refused it, whichever rule speaks.
pub(crate) fn named_into(buf: &mut BytesMut, decision: &Decision, named: Option<(RuleKind, &str)>) {
    if let Some((kind, name)) = refusing_target(decision, named) {
        let _ = write!(buf, ",\"{kind}\":\"");
        json_escape_into(buf, name);
        buf.extend_from_slice(b"\"");
    }
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
    let cost = decision.cost();
    match decision.speaking() {
        Some(_) if decision.exceeds_limit() => {
            let _ = write!(
                buf,
                " (the call costs {cost} units, more than the whole limit: retrying cannot help)"
            );
        }
        Some(v) if cost != 1 => {
            let _ = write!(buf, " (the call costs {cost} units; {} left)", v.remaining);
        }
        _ => {}
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
    use crate::answer::decision::Verdict;
    use crate::rate::Rate;
    use crate::store::Outcome;

    #[test]
    fn json_strings_escape_quotes_and_controls() {
        let mut out = BytesMut::new();
        json_escape_into(&mut out, "a\"b\\c\n");
        assert_eq!(&out[..], br#"a\"b\\c\u000a"#);
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
