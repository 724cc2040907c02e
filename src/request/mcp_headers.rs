//! The SEP-2243 request headers (`Mcp-Method`, `Mcp-Name`, `MCP-Protocol-Version`): read,
//! checked for repeats, and the `=?base64?…?=` form of `Mcp-Name` decoded.

use std::borrow::Cow;

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use http::{HeaderMap, HeaderName};

use super::target::{BadIdentity, Target};

static MCP_METHOD: HeaderName = HeaderName::from_static("mcp-method");
static MCP_NAME: HeaderName = HeaderName::from_static("mcp-name");
static MCP_PROTOCOL_VERSION: HeaderName = HeaderName::from_static("mcp-protocol-version");

/// The first protocol revision whose servers must refuse a request whose `Mcp-*` headers
/// disagree with its body.
const VALIDATING_REVISION: &[u8] = b"2026-07-28";

/// Padding optional: a sender that strips it still means the same name.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A request's `Mcp-Method` and `Mcp-Name`, each present at most once.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct McpHeaders<'r> {
    pub(crate) method: Option<&'r [u8]>,
    pub(crate) name: Option<&'r [u8]>,
}

impl<'r> McpHeaders<'r> {
    /// Reads both headers; either sent twice is refused (which one would the server use?).
    pub(crate) fn read(headers: &'r HeaderMap) -> Result<Self, BadIdentity> {
        Ok(McpHeaders {
            method: single(headers, &MCP_METHOD, "mcp-method")?,
            name: single(headers, &MCP_NAME, "mcp-name")?,
        })
    }
}

fn single<'r>(
    headers: &'r HeaderMap,
    name: &HeaderName,
    field: &'static str,
) -> Result<Option<&'r [u8]>, BadIdentity> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(BadIdentity::Repeated(field));
    }
    Ok(first.map(|v| v.as_bytes()))
}

/// The rule table a JSON-RPC method's name is matched against, if any.
pub(crate) fn target_of(method: &[u8]) -> Option<Target> {
    match method {
        b"tools/call" => Some(Target::Tool),
        b"prompts/get" => Some(Target::Prompt),
        _ => None,
    }
}

/// Whether the request declares a protocol revision whose servers validate the `Mcp-*`
/// headers against the body (dates compare as text: `YYYY-MM-DD`).
pub(crate) fn server_validates(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(&MCP_PROTOCOL_VERSION).iter();
    match (values.next(), values.next()) {
        (Some(v), None) => {
            let v = v.as_bytes();
            v.len() == VALIDATING_REVISION.len()
                && v.iter().enumerate().all(|(i, b)| match i {
                    4 | 7 => *b == b'-',
                    _ => b.is_ascii_digit(),
                })
                && v >= VALIDATING_REVISION
        }
        _ => false,
    }
}

/// `Mcp-Name`'s value: as sent, or decoded from `=?base64?…?=` (which must hold valid
/// base64 of UTF-8 text; anything else is refused, never guessed at).
pub(crate) fn decode_name(raw: &[u8]) -> Result<Cow<'_, [u8]>, BadIdentity> {
    let Some(inner) = raw
        .strip_prefix(b"=?base64?")
        .and_then(|rest| rest.strip_suffix(b"?="))
    else {
        return Ok(Cow::Borrowed(raw));
    };
    let bytes = BASE64
        .decode(inner)
        .map_err(|_| BadIdentity::MalformedName)?;
    if std::str::from_utf8(&bytes).is_err() {
        return Err(BadIdentity::MalformedName);
    }
    Ok(Cow::Owned(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn base64_names_are_decoded_and_bad_ones_refused() {
        assert_eq!(&*decode_name(b"search").unwrap(), b"search");
        // "Hello, 世界" from the specification's examples.
        assert_eq!(
            &*decode_name(b"=?base64?SGVsbG8sIOS4lueVjA==?=").unwrap(),
            "Hello, 世界".as_bytes()
        );
        assert_eq!(
            &*decode_name(b"=?base64?SGVsbG8sIOS4lueVjA?=").unwrap(),
            "Hello, 世界".as_bytes()
        );
        for bad in [&b"=?base64?***?="[..], b"=?base64?/w==?=", b"=?base64?A?="] {
            assert_eq!(decode_name(bad), Err(BadIdentity::MalformedName), "{bad:?}");
        }
        // Markers are case-sensitive: anything else is a plain name.
        assert_eq!(
            &*decode_name(b"=?BASE64?eA==?=").unwrap(),
            b"=?BASE64?eA==?="
        );
    }

    #[test]
    fn only_a_validating_revision_counts() {
        let with = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(&MCP_PROTOCOL_VERSION, HeaderValue::from_static(v));
            server_validates(&h)
        };
        assert!(with("2026-07-28"));
        assert!(with("2027-01-01"));
        assert!(!with("2025-11-25"));
        assert!(!with("2026-07-2"));
        assert!(!with("2026-07-28x"));
        assert!(!with("9999_99_99"));
        assert!(!server_validates(&HeaderMap::new()));
        let mut twice = HeaderMap::new();
        twice.append(
            &MCP_PROTOCOL_VERSION,
            HeaderValue::from_static("2026-07-28"),
        );
        twice.append(
            &MCP_PROTOCOL_VERSION,
            HeaderValue::from_static("2026-07-28"),
        );
        assert!(!server_validates(&twice));
    }
}
