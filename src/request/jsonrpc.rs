//! The few fields of a JSON-RPC request tollgate needs (`id`, `method`, `params.name`),
//! parsed by serde_json into borrowed fields and kept as positions in the body's bytes
//! (no copy, no allocation, unless a string holds escapes).

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::mcp_headers::target_of;
use super::target::Target;

/// What [`McpLayer`](crate::McpLayer) found in a body: one JSON-RPC request or
/// notification, as positions in the body it was parsed from.
#[derive(Clone, Debug)]
pub(crate) struct Parsed {
    method: Text,
    name: Option<Text>,
    id: Option<Range<usize>>,
}

/// A string of the body: where it is, or its unescaped copy when it held escapes.
#[derive(Clone, Debug)]
enum Text {
    At(Range<usize>),
    Unescaped(Box<str>),
}

impl Text {
    fn of(body: &[u8], text: Cow<'_, str>) -> Text {
        match text {
            Cow::Borrowed(s) => Text::At(within(body, s.as_bytes())),
            Cow::Owned(s) => Text::Unescaped(s.into_boxed_str()),
        }
    }

    fn get<'a>(&'a self, body: &'a [u8]) -> &'a [u8] {
        match self {
            Text::At(range) => &body[range.clone()],
            Text::Unescaped(s) => s.as_bytes(),
        }
    }
}

/// Where `part` (borrowed from `body` by the parser) sits in `body`.
fn within(body: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - body.as_ptr() as usize;
    start..start + part.len()
}

impl Parsed {
    /// The call, read from `body` (the bytes it was parsed from).
    pub(crate) fn view<'a>(&'a self, body: &'a [u8]) -> McpCall<'a> {
        McpCall {
            method: self.method.get(body),
            name: self.name.as_ref().map(|n| n.get(body)),
            id: self.id.clone().map(|range| &body[range]),
        }
    }
}

/// One JSON-RPC call, borrowed from its body.
#[derive(Clone, Copy, Debug)]
pub(crate) struct McpCall<'a> {
    /// `method`, unescaped.
    pub(crate) method: &'a [u8],
    /// `params.name` of a `tools/call` or `prompts/get`, unescaped.
    pub(crate) name: Option<&'a [u8]>,
    /// The `id` exactly as sent (`7`, `"abc"`, `null`); `None` for a notification.
    pub(crate) id: Option<&'a [u8]>,
}

/// How the rate limiter finds the call in a request: [`McpLayer`](crate::McpLayer) reads
/// it from its `McpBody`; a request that did not pass through it has none.
pub(crate) type FindCall<B> = fn(&http::Request<B>) -> Option<McpCall<'_>>;

/// [`FindCall`] for requests that did not pass through [`McpLayer`](crate::McpLayer).
pub(crate) fn no_call<B>(_: &http::Request<B>) -> Option<McpCall<'_>> {
    None
}

impl McpCall<'_> {
    /// Which rule table `name` is matched against.
    pub(crate) fn target(&self) -> Option<Target> {
        target_of(self.method)
    }
}

#[derive(Deserialize)]
struct Message<'a> {
    // `jsonrpc`, `params.arguments` and every other member are skipped unread.
    #[serde(borrow, default, deserialize_with = "raw_id")]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    method: Str<'a>,
    #[serde(borrow)]
    params: Option<Params<'a>>,
}

#[derive(Deserialize)]
struct Params<'a> {
    #[serde(borrow)]
    name: Option<Str<'a>>,
}

/// A JSON string borrowed from the input when it holds no escapes (serde's own
/// `Cow<str>` copies whenever it is wrapped, e.g. in `Option`).
struct Str<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// A present `id` as its raw text, `null` included (`Option` alone would read `null` as
/// absent, and a request with `"id": null` must be answered with `"id": null`).
fn raw_id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// The call in `body`, or `None` when it is not one JSON-RPC request object with a string
/// `method` (malformed JSON, a batch array, a response, a duplicated member): such bodies
/// get no tool rule.
pub(crate) fn parse(body: &[u8]) -> Option<Parsed> {
    let message: Message<'_> = serde_json::from_slice(body).ok()?;
    let id = message.id.map(|raw| within(body, raw.get().as_bytes()));
    let name = if target_of(message.method.0.as_bytes()).is_some() {
        message
            .params
            .and_then(|p| p.name)
            .map(|n| Text::of(body, n.0))
    } else {
        None
    };
    Some(Parsed {
        method: Text::of(body, message.method.0),
        name,
        id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(json: &'static str) -> Option<McpCall<'static>> {
        let parsed = Box::leak(Box::new(parse(json.as_bytes())?));
        Some(parsed.view(json.as_bytes()))
    }

    #[test]
    fn a_tools_call_gives_its_name_and_raw_id() {
        let c = call(r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"search","arguments":{"q":[1,{"x":null}]}}}"#).unwrap();
        assert_eq!(c.method, b"tools/call");
        assert_eq!(c.name, Some(&b"search"[..]));
        assert_eq!(c.id, Some(&b"7"[..]));
        assert_eq!(c.target(), Some(Target::Tool));
    }

    #[test]
    fn ids_are_kept_as_sent() {
        let id = |json| call(json).unwrap().id;
        assert_eq!(id(r#"{"id":"a\"b","method":"x"}"#), Some(&br#""a\"b""#[..]));
        assert_eq!(id(r#"{"id": 1.50 ,"method":"x"}"#), Some(&b"1.50"[..]));
        assert_eq!(id(r#"{"id":null,"method":"x"}"#), Some(&b"null"[..]));
        assert_eq!(id(r#"{"method":"notifications/initialized"}"#), None);
    }

    #[test]
    fn escaped_names_are_unescaped_and_prompts_named() {
        let c =
            call(r#"{"id":1,"method":"prompts\/get","params":{"name":"sum\u006dary"}}"#).unwrap();
        assert_eq!(c.target(), Some(Target::Prompt));
        assert_eq!(c.name, Some(&b"summary"[..]));
    }

    #[test]
    fn other_shapes_are_not_calls() {
        assert!(call(r#"[{"id":1,"method":"tools/call","params":{"name":"search"}}]"#).is_none());
        assert!(call(r#"{"id":1,"method":"tools/call","params":{"name":"search"}"#).is_none());
        assert!(call(r#"{"id":1,"result":{}}"#).is_none());
        assert!(call(r#"{"id":1,"method":5}"#).is_none());
        assert!(call("").is_none());
        // Which of two methods would the server run? Neither is guessed at.
        assert!(call(r#"{"id":1,"method":"tools/list","method":"tools/call"}"#).is_none());
        // A name that is not a string: not a call tollgate can name.
        assert!(call(r#"{"id":1,"method":"tools/call","params":{"name":5}}"#).is_none());
        // Names of methods without a name rule are not kept.
        assert!(
            call(r#"{"id":1,"method":"tools/list","params":{"name":"x"}}"#)
                .unwrap()
                .name
                .is_none()
        );
    }
}
