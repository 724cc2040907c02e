//! Refusals in MCP form: a JSON-RPC answer an agent can read, as JSON or as one SSE
//! `message` event, carrying the usual rate headers and `Retry-After`.

use std::fmt::Write as _;

use bytes::Bytes;
use http::header::{HeaderValue, ACCEPT, CONTENT_TYPE};
use http::{HeaderMap, Response, StatusCode};

use super::decision::Decision;
use super::headers::{cut, write_headers};
use super::problem::{detail_into, json_escape_into, violated_into};
use crate::config::{HeaderStyle, Refusal};
use crate::key::RuleKind;
use crate::request::jsonrpc::McpCall;
use crate::request::mcp_headers::server_validates;

/// The JSON-RPC error code of a rate-limit refusal. JSON-RPC reserves -32768 to -32000,
/// and MCP keeps -32020 to -32099 of it for codes its specification defines (emitting
/// another is forbidden), so the code sits just outside: -31429, "429" for recognition.
pub const RATE_LIMIT_ERROR_CODE: i32 = -31429;

static JSON: HeaderValue = HeaderValue::from_static("application/json");
static EVENT_STREAM: HeaderValue = HeaderValue::from_static("text/event-stream");

/// The refusal of `call` in the configured form, or `None` where only the HTTP 429 fits
/// (`refusal = "http"`, or a notification: it has no `id` to answer).
pub(crate) fn refuse(
    refusal: Refusal,
    style: HeaderStyle,
    decision: &Decision,
    call: McpCall<'_>,
    named: Option<(RuleKind, &str)>,
    request_headers: &HeaderMap,
) -> Option<Response<Bytes>> {
    // JSON-RPC ids are strings, numbers or null; anything else (an object, an array,
    // possibly spanning lines, which would break SSE framing) is answered over HTTP.
    let id = call
        .id
        .filter(|id| matches!(id.first(), Some(b'"' | b'-' | b'0'..=b'9' | b'n')))?;
    let tool_result = match refusal {
        Refusal::Http => return None,
        // `prompts/get` and other methods have no error-shaped result: the error form.
        Refusal::ToolError => call.method == b"tools/call",
        Refusal::JsonRpcError => false,
    };
    let sse = only_event_stream(request_headers);
    let retry = decision.retry_after_secs();
    let body = cut(|buf| {
        if sse {
            buf.extend_from_slice(b"event: message\ndata: ");
        }
        buf.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":");
        buf.extend_from_slice(id);
        if tool_result {
            buf.extend_from_slice(b",\"result\":{\"content\":[{\"type\":\"text\",\"text\":\"");
            detail_into(buf, decision, named);
            if decision.exceeds_limit() {
                buf.extend_from_slice(b".\"}],\"isError\":true");
            } else {
                let unit = if retry == 1 { "second" } else { "seconds" };
                let _ = write!(buf, ". Retry after {retry} {unit}.\"}}],\"isError\":true");
            }
            // From 2026-07-28 on, a server must say what kind of result it sends.
            if server_validates(request_headers) {
                buf.extend_from_slice(b",\"resultType\":\"complete\"");
            }
            buf.extend_from_slice(b"}}");
        } else {
            let message = if decision.exceeds_limit() {
                "Cost exceeds the limit"
            } else {
                "Rate limit exceeded"
            };
            let _ = write!(
                buf,
                ",\"error\":{{\"code\":{RATE_LIMIT_ERROR_CODE},\"message\":\"{message}\",\"data\":{{"
            );
            if !decision.exceeds_limit() {
                let _ = write!(buf, "\"retry_after\":{retry},");
            }
            if decision.cost() != 1 || decision.exceeds_limit() {
                let _ = write!(buf, "\"cost\":{},", decision.cost());
            }
            match decision.remaining() {
                Some(left) if decision.cost() != 1 && !decision.exceeds_limit() => {
                    let _ = write!(buf, "\"remaining\":{left},");
                }
                _ => {}
            }
            buf.extend_from_slice(b"\"violated\":");
            violated_into(buf, decision);
            if let Some((kind, name)) = named {
                let _ = write!(buf, ",\"{kind}\":\"");
                json_escape_into(buf, name);
                buf.extend_from_slice(b"\"");
            }
            buf.extend_from_slice(b"}}}");
        }
        if sse {
            buf.extend_from_slice(b"\n\n");
        }
    });
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::OK;
    let content_type = if sse { &EVENT_STREAM } else { &JSON };
    resp.headers_mut()
        .insert(CONTENT_TYPE, content_type.clone());
    if !decision.exceeds_limit() {
        write_headers(style, decision, resp.headers_mut(), true);
    }
    Some(resp)
}

/// Whether the client accepts `text/event-stream` but not JSON. MCP clients must list
/// both and servers may answer either; one that lists only the stream gets the stream.
fn only_event_stream(headers: &HeaderMap) -> bool {
    let mut json = false;
    let mut sse = false;
    for value in headers.get_all(ACCEPT) {
        for range in value.as_bytes().split(|b| *b == b',') {
            let mut parts = range.split(|b| *b == b';');
            let essence = parts.next().unwrap_or_default().trim_ascii();
            let refused = parts.any(|p| {
                let p = p.trim_ascii();
                p.len() >= 2
                    && p[..2].eq_ignore_ascii_case(b"q=")
                    && p[2..].iter().all(|b| matches!(b, b'0' | b'.'))
            });
            if refused {
                continue;
            }
            let is = |s: &[u8]| essence.eq_ignore_ascii_case(s);
            json |= is(b"application/json") || is(b"application/*") || is(b"*/*");
            sse |= is(b"text/event-stream");
        }
    }
    sse && !json
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(v: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(ACCEPT, HeaderValue::from_static(v));
        h
    }

    #[test]
    fn the_stream_only_when_json_is_not_accepted() {
        assert!(only_event_stream(&accept("text/event-stream")));
        assert!(only_event_stream(&accept(
            "TEXT/Event-Stream; charset=utf-8"
        )));
        assert!(only_event_stream(&accept(
            "text/event-stream, application/json;q=0"
        )));
        assert!(!only_event_stream(&accept(
            "application/json, text/event-stream"
        )));
        assert!(!only_event_stream(&accept("text/event-stream, */*;q=0.1")));
        assert!(!only_event_stream(&accept("application/json")));
        assert!(!only_event_stream(&HeaderMap::new()));
    }
}
