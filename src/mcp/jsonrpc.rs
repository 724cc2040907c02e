//! The few fields of a JSON-RPC request tollgate needs (`id`, `method`, `params.name`),
//! parsed by serde_json into borrowed fields and kept as slices of the body's bytes.

use std::borrow::Cow;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::identity::Target;
use crate::mcp::headers::target_of;

/// What [`McpLayer`](crate::McpLayer) read from a request body: one JSON-RPC request or
/// notification. Inserted into the request's extensions for the rate limiter.
#[derive(Clone, Debug)]
pub(crate) struct McpCall {
    /// `method`, unescaped.
    pub(crate) method: Bytes,
    /// `params.name` of a `tools/call` or `prompts/get`, unescaped.
    pub(crate) name: Option<Bytes>,
    /// The `id` exactly as sent (`7`, `"abc"`, `null`); `None` for a notification.
    pub(crate) id: Option<Bytes>,
}

impl McpCall {
    /// Which rule table `name` is matched against.
    pub(crate) fn target(&self) -> Option<Target> {
        target_of(&self.method)
    }
}

#[derive(Deserialize)]
struct Message<'a> {
    // `jsonrpc`, `params.arguments` and every other member are skipped unread.
    #[serde(borrow, default, deserialize_with = "raw_id")]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    method: Cow<'a, str>,
    #[serde(borrow)]
    params: Option<Params<'a>>,
}

#[derive(Deserialize)]
struct Params<'a> {
    #[serde(borrow)]
    name: Option<Cow<'a, str>>,
}

/// The call in `body`, or `None` when it is not one JSON-RPC request object with a string
/// `method` (malformed JSON, a batch array, a response): such bodies get no tool rule.
pub(crate) fn parse(body: &Bytes) -> Option<McpCall> {
    let message: Message<'_> = serde_json::from_slice(body).ok()?;
    let id = message.id.map(|raw| body.slice_ref(raw.get().as_bytes()));
    let name = if target_of(message.method.as_bytes()).is_some() {
        message.params.and_then(|p| p.name).map(|n| share(body, n))
    } else {
        None
    };
    Some(McpCall {
        method: share(body, message.method),
        name,
        id,
    })
}

/// A borrowed string as a slice of `body` (no copy); an unescaped one is copied.
fn share(body: &Bytes, text: Cow<'_, str>) -> Bytes {
    match text {
        Cow::Borrowed(s) => body.slice_ref(s.as_bytes()),
        Cow::Owned(s) => Bytes::from(s),
    }
}

/// A present `id` as its raw text, `null` included (`Option` alone would read `null` as
/// absent, and a request with `"id": null` must be answered with `"id": null`).
fn raw_id<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(json: &'static str) -> Option<McpCall> {
        parse(&Bytes::from_static(json.as_bytes()))
    }

    #[test]
    fn a_tools_call_gives_its_name_and_raw_id() {
        let c = call(r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"search","arguments":{"q":[1,{"x":null}]}}}"#).unwrap();
        assert_eq!(&c.method[..], b"tools/call");
        assert_eq!(c.name.as_deref(), Some(&b"search"[..]));
        assert_eq!(c.id.as_deref(), Some(&b"7"[..]));
        assert_eq!(c.target(), Some(Target::Tool));
    }

    #[test]
    fn ids_are_kept_as_sent() {
        let id = |json| call(json).unwrap().id;
        assert_eq!(
            id(r#"{"id":"a\"b","method":"x"}"#).as_deref(),
            Some(&br#""a\"b""#[..])
        );
        assert_eq!(
            id(r#"{"id": 1.50 ,"method":"x"}"#).as_deref(),
            Some(&b"1.50"[..])
        );
        assert_eq!(
            id(r#"{"id":null,"method":"x"}"#).as_deref(),
            Some(&b"null"[..])
        );
        assert_eq!(id(r#"{"method":"notifications/initialized"}"#), None);
    }

    #[test]
    fn escaped_names_are_unescaped_and_prompts_named() {
        let c =
            call(r#"{"id":1,"method":"prompts\/get","params":{"name":"sum\u006dary"}}"#).unwrap();
        assert_eq!(c.target(), Some(Target::Prompt));
        assert_eq!(c.name.as_deref(), Some(&b"summary"[..]));
    }

    #[test]
    fn other_shapes_are_not_calls() {
        assert!(call(r#"[{"id":1,"method":"tools/call","params":{"name":"search"}}]"#).is_none());
        assert!(call(r#"{"id":1,"method":"tools/call","params":{"name":"search"}"#).is_none());
        assert!(call(r#"{"id":1,"result":{}}"#).is_none());
        assert!(call(r#"{"id":1,"method":5}"#).is_none());
        assert!(call("").is_none());
        // A name that is not a string: the call is seen, without a name.
        let c = call(r#"{"id":1,"method":"tools/call","params":{"name":5}}"#);
        assert!(c.is_none() || c.unwrap().name.is_none());
        // Names of methods without a name rule are not kept.
        assert!(
            call(r#"{"id":1,"method":"tools/list","params":{"name":"x"}}"#)
                .unwrap()
                .name
                .is_none()
        );
    }
}
