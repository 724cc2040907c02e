//! `[identity] tool_path`: the tool name taken from the request path (`/tools/{name}`),
//! for requests without a [`ToolName`](crate::ToolName) extension.

use std::fmt;

/// A checked path pattern: literal segments, `{name}` once, other `{...}` segments match
/// any one segment.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct ToolPath {
    text: String,
    segments: Vec<Segment>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Any,
    Name,
}

impl fmt::Debug for ToolPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.text)
    }
}

impl ToolPath {
    /// Checks a pattern: `/` then segments separated by `/`, exactly one of them `{name}`.
    pub(crate) fn parse(text: &str) -> Result<ToolPath, String> {
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!("{text:?} must start with '/'"));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let mut segments = Vec::new();
        for segment in rest.split('/') {
            let parsed = match segment {
                "" => return Err(format!("{text:?} has an empty segment")),
                "{name}" => Segment::Name,
                s if s.starts_with("{*") => {
                    return Err(format!(
                        "{text:?}: a catch-all segment ({s}) cannot be matched; name each segment"
                    ))
                }
                s if s.starts_with('{')
                    && s.ends_with('}')
                    && s.len() > 2
                    && !s[1..s.len() - 1].contains(['{', '}']) =>
                {
                    Segment::Any
                }
                s if s.contains(['{', '}']) => {
                    return Err(format!(
                    "{text:?}: a segment is either literal or a whole {{placeholder}}, found {s:?}"
                ))
                }
                s => Segment::Literal(s.to_owned()),
            };
            segments.push(parsed);
        }
        match segments.iter().filter(|s| **s == Segment::Name).count() {
            1 => Ok(ToolPath {
                text: text.to_owned(),
                segments,
            }),
            0 => Err(format!("{text:?} has no {{name}} segment")),
            _ => Err(format!("{text:?} has more than one {{name}} segment")),
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.text
    }

    /// The (still percent-encoded) `{name}` segment of `path`, if `path` matches. A single
    /// trailing `/` is ignored, as many routers do.
    pub(crate) fn tool<'p>(&self, path: &'p str) -> Option<&'p str> {
        let rest = path.strip_prefix('/')?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let mut found = None;
        let mut parts = rest.split('/');
        for segment in &self.segments {
            let part = parts.next()?;
            if part.is_empty() {
                return None;
            }
            match segment {
                Segment::Literal(lit) if lit != part => return None,
                Segment::Name => found = Some(part),
                _ => {}
            }
        }
        if parts.next().is_some() {
            return None;
        }
        found
    }
}

/// Percent-decodes `raw` into `out` (cleared first). A malformed escape is kept as written.
pub(crate) fn percent_decode_into(raw: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b == b'%' {
            if let (Some(h), Some(l)) = (
                raw.get(i + 1).and_then(|c| (*c as char).to_digit(16)),
                raw.get(i + 2).and_then(|c| (*c as char).to_digit(16)),
            ) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b);
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_checked() {
        assert!(ToolPath::parse("/tools/{name}").is_ok());
        assert!(ToolPath::parse("/v1/{tenant}/tools/{name}/").is_ok());
        for bad in [
            "tools/{name}",
            "/tools",
            "/{name}/{name}",
            "/a//{name}",
            "/a/{*rest}/{name}",
            "/a{b}/{name}",
            "/",
        ] {
            assert!(ToolPath::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_name_segment_is_taken_only_from_a_matching_path() {
        let p = ToolPath::parse("/tools/{name}").unwrap();
        assert_eq!(p.tool("/tools/search"), Some("search"));
        assert_eq!(p.tool("/tools/search/"), Some("search"));
        assert_eq!(p.tool("/tools/"), None);
        assert_eq!(p.tool("/tools/search/x"), None);
        assert_eq!(p.tool("/other/search"), None);
        assert_eq!(p.tool("tools/search"), None);
        let p = ToolPath::parse("/v1/{tenant}/tools/{name}").unwrap();
        assert_eq!(p.tool("/v1/acme/tools/fetch"), Some("fetch"));
        assert_eq!(p.tool("/v1//tools/fetch"), None);
    }

    #[test]
    fn percent_escapes_are_decoded() {
        let mut out = Vec::new();
        percent_decode_into(b"s%65arch%2", &mut out);
        assert_eq!(out, b"search%2");
        percent_decode_into(b"%zz%41", &mut out);
        assert_eq!(out, b"%zzA");
    }
}
