//! Counter keys. A key names one counter: the rule, the subject (user, tenant or tool),
//! the period and the algorithm. Two different keys never encode alike, whatever bytes a
//! subject holds: the memory store compares the fields themselves, and the Redis
//! encoding percent-escapes every byte outside `[A-Za-z0-9._~-]` (`%` included), so it
//! is injective and never contains `:`, `{`, `}`, spaces or newlines from a subject.

use std::fmt;
use std::fmt::Write as _;

use crate::{Algorithm, Rate};

/// Which rule a counter belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RuleKind {
    /// The per-user rule (`by_user`).
    User,
    /// The per-tenant rule (`by_tenant`).
    Tenant,
    /// The per-tool rule (`by_tool`).
    Tool,
    /// The per-prompt rule (`by_prompt`): an MCP `prompts/get`, counted apart from tools.
    Prompt,
}

impl RuleKind {
    /// `"user"`, `"tenant"` or `"tool"`: the names used in headers and bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            RuleKind::User => "user",
            RuleKind::Tenant => "tenant",
            RuleKind::Tool => "tool",
            RuleKind::Prompt => "prompt",
        }
    }
}

impl fmt::Display for RuleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whose counter: a named subject, or the one shared bucket of anonymous users.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subject<'a> {
    /// Requests without a user share this bucket; it is distinct from every named user,
    /// including one literally called "anonymous".
    Anonymous,
    /// A user id, tenant id or normalised tool name, as bytes.
    Named(&'a [u8]),
}

impl fmt::Debug for Subject<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Anonymous => f.write_str("Anonymous"),
            Subject::Named(_) => f.write_str("Named(<redacted>)"),
        }
    }
}

/// One counter's key, borrowed from the request. `Debug` never shows the subject.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key<'a> {
    pub(crate) kind: RuleKind,
    pub(crate) subject: Subject<'a>,
    pub(crate) rate: Rate,
    pub(crate) algorithm: Algorithm,
}

impl<'a> Key<'a> {
    /// The rule.
    pub fn kind(&self) -> RuleKind {
        self.kind
    }

    /// Whose counter it is.
    pub fn subject(&self) -> Subject<'a> {
        self.subject
    }

    /// The rate this counter is held to.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// The algorithm that counts it.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The key as a Redis key name: `<prefix>:<alg>:<rule>:<period secs>:{<subject>}`, the
    /// subject `-` for anonymous or `=` followed by the percent-escaped bytes. The braces
    /// make the subject the Redis Cluster hash tag: every key of one user (one tenant, one
    /// tool) lives on one cluster slot, and subjects spread over the cluster. A subject's
    /// own braces are escaped, so the tag is always exactly the subject.
    ///
    /// ```
    /// use tollgate::{Algorithm, Key, Rate, RuleKind, Subject};
    /// let key = Key::new(RuleKind::User, Subject::Named(b"a:b{c}"), Rate::per_minute(30), Algorithm::FixedWindow);
    /// assert_eq!(key.encode("rl"), "rl:fw:u:60:{=a%3Ab%7Bc%7D}");
    /// ```
    pub fn encode(&self, prefix: &str) -> String {
        let mut out = String::with_capacity(prefix.len() + 24);
        self.encode_into(prefix, &mut out);
        out
    }

    /// Appends [`Key::encode`]'s result to `out`.
    pub fn encode_into(&self, prefix: &str, out: &mut String) {
        let alg = match self.algorithm {
            Algorithm::FixedWindow => "fw",
            Algorithm::SlidingWindow => "sw",
            Algorithm::TokenBucket => "tb",
        };
        let kind = match self.kind {
            RuleKind::User => "u",
            RuleKind::Tenant => "t",
            RuleKind::Tool => "k",
            RuleKind::Prompt => "p",
        };
        let _ = write!(out, "{prefix}:{alg}:{kind}:{}:{{", self.rate.period_secs());
        match self.subject {
            Subject::Anonymous => out.push('-'),
            Subject::Named(bytes) => {
                out.push('=');
                for &b in bytes {
                    if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-') {
                        out.push(b as char);
                    } else {
                        let _ = write!(out, "%{b:02X}");
                    }
                }
            }
        }
        out.push('}');
    }

    /// A key for `subject`'s counter under `kind`, held to `rate` by `algorithm`.
    pub fn new(kind: RuleKind, subject: Subject<'a>, rate: Rate, algorithm: Algorithm) -> Self {
        Key {
            kind,
            subject,
            rate,
            algorithm,
        }
    }
}

impl fmt::Debug for Key<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("kind", &self.kind)
            .field("subject", &self.subject)
            .field("rate", &self.rate)
            .field("algorithm", &self.algorithm)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(kind: RuleKind, subject: Subject<'_>, secs: u64) -> String {
        let rate = Rate::new(1, std::time::Duration::from_secs(secs)).unwrap();
        Key::new(kind, subject, rate, Algorithm::SlidingWindow).encode("rl")
    }

    #[test]
    fn separators_and_lookalikes_stay_apart() {
        let cases: &[&[u8]] = &[
            b"a:b",
            b"a%3Ab",
            b"a",
            b"a\n",
            b"{x}",
            b"%",
            b"-",
            b"=",
            b"",
            b"anonymous",
        ];
        let mut seen = std::collections::HashSet::new();
        for id in cases {
            assert!(seen.insert(key(RuleKind::User, Subject::Named(id), 60)));
        }
        assert!(seen.insert(key(RuleKind::User, Subject::Anonymous, 60)));
        assert!(seen.insert(key(RuleKind::Tenant, Subject::Named(b"a"), 60)));
        assert!(seen.insert(key(RuleKind::User, Subject::Named(b"a"), 1)));
        for k in &seen {
            // The subject is the cluster hash tag: exactly one `{…}`, holding no separator.
            let tag = k.splitn(5, ':').nth(4).unwrap();
            let subject = tag.strip_prefix('{').and_then(|t| t.strip_suffix('}'));
            let subject = subject.unwrap_or_else(|| panic!("no hash tag: {k}"));
            assert!(!subject.contains([':', '{', '}', '\n', ' ']), "{k}");
        }
    }

    #[test]
    fn debug_hides_the_subject() {
        let rate = Rate::per_second(1);
        let shown = format!(
            "{:?}",
            Key::new(
                RuleKind::User,
                Subject::Named(b"alice"),
                rate,
                Algorithm::FixedWindow
            )
        );
        assert!(!shown.contains("alice"), "{shown}");
    }

    proptest! {
        #[test]
        fn encoding_is_injective(
            a in proptest::collection::vec(any::<u8>(), 0..24),
            b in proptest::collection::vec(any::<u8>(), 0..24),
            ka in 0usize..4, kb in 0usize..4, pa in 1u64..4, pb in 1u64..4,
        ) {
            let kinds = [
                RuleKind::User,
                RuleKind::Tenant,
                RuleKind::Tool,
                RuleKind::Prompt,
            ];
            let ea = key(kinds[ka], Subject::Named(&a), pa);
            let eb = key(kinds[kb], Subject::Named(&b), pb);
            prop_assert_eq!(ea == eb, (a, ka, pa) == (b, kb, pb));
        }
    }
}
