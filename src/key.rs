//! Counter keys. A key names one counter: the rule (and the tier whose rule it is), the
//! subject (user, client network, tenant or tool; for a user×tool rule also the tool), the
//! rate and the algorithm. Two different keys never encode alike, whatever bytes a
//! subject holds: the memory store compares the fields themselves, and the Redis
//! encoding percent-escapes every byte outside `[A-Za-z0-9._~-]` (`%` included), so it
//! is injective and never contains `:`, `{`, `}`, spaces or newlines from a subject.

use std::cell::RefCell;
use std::fmt;
use std::fmt::Write as _;
use std::net::IpAddr;

use crate::algorithm::Algorithm;
use crate::rate::Rate;

/// Which rule a counter belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum RuleKind {
    /// The per-user rule (`by_user`).
    User,
    /// The per-tenant rule (`by_tenant`).
    Tenant,
    /// The per-tool rule (`by_tool`): one counter per tool, shared by every caller.
    Tool,
    /// The per-prompt rule (`by_prompt`): an MCP `prompts/get`, counted apart from tools.
    Prompt,
    /// The per-user, per-tool rule (`by_user_tool`): each user's own counter for a tool.
    UserTool,
}

impl RuleKind {
    /// `"user"`, `"tenant"`, `"tool"` or `"user_tool"`: the names used in headers and
    /// bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            RuleKind::User => "user",
            RuleKind::Tenant => "tenant",
            RuleKind::Tool => "tool",
            RuleKind::Prompt => "prompt",
            RuleKind::UserTool => "user_tool",
        }
    }
}

impl fmt::Display for RuleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whose counter: a named subject, the one shared bucket of anonymous users, or (with
/// `anonymous = "by_ip"`) the network of an anonymous client.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Subject<'a> {
    /// Requests without a user share this bucket; it is distinct from every named user,
    /// including one literally called "anonymous".
    Anonymous,
    /// A user id, tenant id or normalised tool name, as bytes.
    Named(&'a [u8]),
    /// An anonymous caller counted by its client address: the address masked to the
    /// prefix length (32 for IPv4, `ipv6_prefix` for IPv6), and that length. Distinct from
    /// every named user and from [`Subject::Anonymous`].
    Client(IpAddr, u8),
}

impl fmt::Debug for Subject<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Anonymous => f.write_str("Anonymous"),
            Subject::Named(_) => f.write_str("Named(<redacted>)"),
            Subject::Client(..) => f.write_str("Client(<redacted>)"),
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
    /// The tier whose rule this is; `None` for the base rules.
    pub(crate) tier: Option<&'a str>,
    /// The tool of a user×tool key (normalised).
    pub(crate) tool: Option<&'a str>,
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

    /// The tier whose rule this counter belongs to (`None`: the base rules).
    pub fn tier(&self) -> Option<&'a str> {
        self.tier
    }

    /// The tool of a [`RuleKind::UserTool`] key.
    pub fn tool(&self) -> Option<&'a str> {
        self.tool
    }

    /// The key as a Redis key name:
    /// `<prefix>:<alg>:<rule>[@<tier>]:<period secs>:<count>:{<subject>}[:<tool>]`. The
    /// subject is `-` for anonymous, `@` followed by the escaped client network for an
    /// anonymous client counted by address, or `=` followed by the percent-escaped bytes;
    /// a user×tool key (`ut`) appends its escaped tool after the subject. The braces make
    /// the subject the Redis Cluster hash tag: every key of one user (its user×tool keys
    /// included) lives on one cluster slot, and subjects spread over the cluster. A
    /// subject's own braces are escaped, so the tag is always exactly the subject. The
    /// count is part of the name, so two layers that give one rule different counts never
    /// share a counter (ARCHITECTURE.md, behaviour contract item 15).
    ///
    /// ```
    /// use tollgate::{Algorithm, Key, Rate, RuleKind, Subject};
    /// let key = Key::new(RuleKind::User, Subject::Named(b"a:b{c}"), Rate::per_minute(30), Algorithm::FixedWindow);
    /// assert_eq!(key.encode("rl"), "rl:fw:u:60:30:{=a%3Ab%7Bc%7D}");
    /// let key = Key::user_tool(Subject::Named(b"alice"), "search", Rate::per_minute(5), Algorithm::FixedWindow)
    ///     .with_tier("pro");
    /// assert_eq!(key.encode("rl"), "rl:fw:ut@pro:60:5:{=alice}:search");
    /// ```
    pub fn encode(&self, prefix: &str) -> String {
        let mut out = String::with_capacity(prefix.len() + 32);
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
            RuleKind::UserTool => "ut",
        };
        let _ = write!(out, "{prefix}:{alg}:{kind}");
        if let Some(tier) = self.tier {
            out.push('@');
            escape_into(tier.as_bytes(), out);
        }
        let _ = write!(out, ":{}:{}:{{", self.rate.period_secs(), self.rate.count());
        match self.subject {
            Subject::Anonymous => out.push('-'),
            Subject::Named(bytes) => {
                out.push('=');
                escape_into(bytes, out);
            }
            Subject::Client(addr, prefix_len) => {
                out.push('@');
                let mut text = [0u8; 64];
                let n = client_text(addr, prefix_len, &mut text);
                escape_into(&text[..n], out);
            }
        }
        out.push('}');
        if let Some(tool) = self.tool {
            out.push(':');
            escape_into(tool.as_bytes(), out);
        }
    }

    /// A key for `subject`'s counter under `kind`, held to `rate` by `algorithm`.
    pub fn new(kind: RuleKind, subject: Subject<'a>, rate: Rate, algorithm: Algorithm) -> Self {
        Key {
            kind,
            subject,
            rate,
            algorithm,
            tier: None,
            tool: None,
        }
    }

    /// A [`RuleKind::UserTool`] key: `user`'s own counter for `tool` (a normalised name).
    pub fn user_tool(user: Subject<'a>, tool: &'a str, rate: Rate, algorithm: Algorithm) -> Self {
        Key {
            tool: Some(tool),
            ..Key::new(RuleKind::UserTool, user, rate, algorithm)
        }
    }

    /// The same key under `tier`'s rule: a counter of its own, never mixed with the base
    /// rule's or another tier's.
    pub fn with_tier(mut self, tier: &'a str) -> Self {
        self.tier = Some(tier);
        self
    }

    /// The tag the memory store keeps with an entry: rule (anonymous users apart),
    /// algorithm, and which extra parts the entry's identity bytes hold.
    pub(crate) fn memory_tag(&self) -> u8 {
        let kind = match (self.kind, self.subject) {
            (_, Subject::Anonymous) => 3,
            (RuleKind::User | RuleKind::UserTool, _) => 0,
            (RuleKind::Tenant, _) => 1,
            (RuleKind::Tool | RuleKind::Prompt, _) => 2,
        };
        let alg = match self.algorithm {
            Algorithm::FixedWindow => 0,
            Algorithm::SlidingWindow => 1,
            Algorithm::TokenBucket => 2,
        };
        let client = u8::from(matches!(self.subject, Subject::Client(..)));
        let user_tool = u8::from(self.kind == RuleKind::UserTool);
        let tier = u8::from(self.tier.is_some());
        let prompt = u8::from(self.kind == RuleKind::Prompt);
        kind | alg << 2 | client << 4 | user_tool << 5 | tier << 6 | prompt << 7
    }

    /// Whether the memory identity is the subject's bytes alone (the common case).
    fn is_plain(&self) -> bool {
        self.memory_tag() & 0b0111_0000 == 0
    }

    /// The bytes that, with [`Key::memory_tag`] and the rate, identify the counter in the
    /// memory store: the subject's bytes for a plain key; otherwise the tier and the tool,
    /// each length-prefixed, then the subject (the tag says which parts are there, so
    /// the bytes are injective).
    fn write_memory_id(&self, out: &mut Vec<u8>) {
        if let Some(tier) = self.tier {
            out.push(tier.len().min(255) as u8);
            out.extend_from_slice(&tier.as_bytes()[..tier.len().min(255)]);
        }
        if let Some(tool) = self.tool {
            out.extend_from_slice(&(tool.len() as u64).to_le_bytes());
            out.extend_from_slice(tool.as_bytes());
        }
        match self.subject {
            Subject::Anonymous => {}
            Subject::Named(bytes) => out.extend_from_slice(bytes),
            Subject::Client(IpAddr::V4(a), len) => {
                out.extend_from_slice(&[4, len]);
                out.extend_from_slice(&a.octets());
            }
            Subject::Client(IpAddr::V6(a), len) => {
                out.extend_from_slice(&[6, len]);
                out.extend_from_slice(&a.octets());
            }
        }
    }
}

/// A request's keys, owned: kept past the request (the fallback answering after Redis
/// failed, a `Charge` settling after the response), then lent out as [`Key`]s again.
#[derive(Clone)]
pub(crate) struct OwnedKeys {
    keys: Vec<OwnedKey>,
}

#[derive(Clone)]
struct OwnedKey {
    kind: RuleKind,
    subject: OwnedSubject,
    rate: Rate,
    algorithm: Algorithm,
    tier: Option<Box<str>>,
    tool: Option<Box<str>>,
}

#[derive(Clone)]
enum OwnedSubject {
    Anonymous,
    Named(Box<[u8]>),
    Client(IpAddr, u8),
}

impl OwnedKeys {
    pub(crate) fn new(keys: &[Key<'_>]) -> Self {
        OwnedKeys {
            keys: keys
                .iter()
                .take(MAX_KEYS)
                .map(|k| OwnedKey {
                    kind: k.kind,
                    subject: match k.subject {
                        Subject::Anonymous => OwnedSubject::Anonymous,
                        Subject::Named(bytes) => OwnedSubject::Named(bytes.into()),
                        Subject::Client(addr, len) => OwnedSubject::Client(addr, len),
                    },
                    rate: k.rate,
                    algorithm: k.algorithm,
                    tier: k.tier.map(Into::into),
                    tool: k.tool.map(Into::into),
                })
                .collect(),
        }
    }

    /// Calls `f` with the keys, borrowed from `self`.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&[Key<'_>]) -> R) -> R {
        let placeholder = Key::new(
            RuleKind::User,
            Subject::Anonymous,
            Rate::per_second(1),
            Algorithm::FixedWindow,
        );
        let mut keys = [placeholder; MAX_KEYS];
        for (slot, k) in keys.iter_mut().zip(&self.keys) {
            let subject = match &k.subject {
                OwnedSubject::Anonymous => Subject::Anonymous,
                OwnedSubject::Named(bytes) => Subject::Named(bytes),
                OwnedSubject::Client(addr, len) => Subject::Client(*addr, *len),
            };
            let mut key = Key::new(k.kind, subject, k.rate, k.algorithm);
            key.tool = k.tool.as_deref();
            key.tier = k.tier.as_deref();
            *slot = key;
        }
        f(&keys[..self.keys.len()])
    }
}

/// At most this many keys per request (user, tenant, tool, user×tool).
pub(crate) const MAX_KEYS: usize = 4;

thread_local! {
    /// Where the memory identities of keys with a tier, a tool or a client address are
    /// written, so building them allocates only on a thread's first such request.
    static MEMORY_IDS: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Calls `f` with each key's memory identity (see [`Key::write_memory_id`]), for up to
/// [`MAX_KEYS`] keys. Plain keys lend their subject's bytes; the others are written to a
/// per-thread buffer.
pub(crate) fn with_memory_ids<R>(keys: &[Key<'_>], f: impl FnOnce(&[&[u8]]) -> R) -> R {
    let keys = &keys[..keys.len().min(MAX_KEYS)];
    if keys.iter().all(Key::is_plain) {
        let mut ids: [&[u8]; MAX_KEYS] = [&[]; MAX_KEYS];
        for (id, key) in ids.iter_mut().zip(keys) {
            *id = plain(key);
        }
        return f(&ids[..keys.len()]);
    }
    MEMORY_IDS.with(|buf| {
        // A store called from inside another's check on this thread (a wrapper) gets a
        // buffer of its own.
        let mut owned;
        let mut borrowed = buf.try_borrow_mut();
        let buf: &mut Vec<u8> = match &mut borrowed {
            Ok(b) => b,
            Err(_) => {
                owned = Vec::new();
                &mut owned
            }
        };
        buf.clear();
        let mut ranges = [(0, 0); MAX_KEYS];
        for (range, key) in ranges.iter_mut().zip(keys) {
            if !key.is_plain() {
                let start = buf.len();
                key.write_memory_id(buf);
                *range = (start, buf.len());
            }
        }
        let mut ids: [&[u8]; MAX_KEYS] = [&[]; MAX_KEYS];
        for ((id, key), (start, end)) in ids.iter_mut().zip(keys).zip(ranges) {
            *id = if key.is_plain() {
                plain(key)
            } else {
                &buf[start..end]
            };
        }
        f(&ids[..keys.len()])
    })
}

/// A plain key's memory identity: its subject's bytes.
fn plain<'k>(key: &Key<'k>) -> &'k [u8] {
    match key.subject {
        Subject::Named(bytes) => bytes,
        _ => &[],
    }
}

/// Percent-escapes every byte outside `[A-Za-z0-9._~-]`.
fn escape_into(bytes: &[u8], out: &mut String) {
    for &b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// `203.0.113.7/32` or `2001:db8::/64` into `buf`; its length.
fn client_text(addr: IpAddr, prefix_len: u8, buf: &mut [u8; 64]) -> usize {
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    let _ = std::io::Write::write_fmt(&mut cursor, format_args!("{addr}/{prefix_len}"));
    cursor.position() as usize
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
        // Client networks: apart from each other, from anonymous and from named users.
        for (addr, len) in [("203.0.113.7", 32), ("2001:db8::", 64), ("2001:db8::", 48)] {
            let subject = Subject::Client(addr.parse().unwrap(), len);
            assert!(seen.insert(key(RuleKind::User, subject, 60)));
        }
        assert!(seen.insert(key(RuleKind::User, Subject::Named(b"@203.0.113.7/32"), 60)));
        // A tier's counter, and a user's own counter for a tool.
        let rate = Rate::new(1, std::time::Duration::from_secs(60)).unwrap();
        let alg = Algorithm::SlidingWindow;
        let a = Key::new(RuleKind::User, Subject::Named(b"a"), rate, alg);
        assert!(seen.insert(a.with_tier("pro").encode("rl")));
        assert!(seen.insert(a.with_tier("free").encode("rl")));
        let ut = Key::user_tool(Subject::Named(b"a"), "search", rate, alg);
        assert!(seen.insert(ut.encode("rl")));
        assert!(seen.insert(ut.with_tier("pro").encode("rl")));
        assert!(seen.insert(Key::user_tool(Subject::Named(b"a"), "s:{x}", rate, alg).encode("rl")));
        assert!(seen.insert(Key::user_tool(Subject::Anonymous, "search", rate, alg).encode("rl")));
        // The count is part of the name: two layers giving one rule different counts
        // never share a counter.
        let two = Rate::new(2, std::time::Duration::from_secs(60)).unwrap();
        assert!(seen.insert(Key::new(RuleKind::User, Subject::Named(b"a"), two, alg).encode("rl")));
        for k in &seen {
            // The subject is the cluster hash tag: exactly one `{…}`, holding no separator.
            let open = k.find('{').unwrap_or_else(|| panic!("no hash tag: {k}"));
            let close = k.find('}').unwrap_or_else(|| panic!("no hash tag: {k}"));
            assert_eq!(k.matches('{').count(), 1, "{k}");
            let subject = &k[open + 1..close];
            assert!(!subject.contains([':', '{', '}', '\n', ' ']), "{k}");
        }
        // A user's user×tool key is tagged by the user: one cluster slot for both.
        let tag = |k: &str| k[k.find('{').unwrap()..=k.find('}').unwrap()].to_owned();
        assert_eq!(tag(&ut.encode("rl")), tag(&a.encode("rl")));
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

    /// The memory identity (tag, period, bytes) of two keys is equal only for equal keys.
    fn memory_id(key: &Key<'_>) -> (u8, u32, Vec<u8>) {
        with_memory_ids(std::slice::from_ref(key), |ids| {
            (key.memory_tag(), key.rate.period_secs(), ids[0].to_vec())
        })
    }

    proptest! {
        #[test]
        fn extended_keys_are_injective_in_redis_and_in_memory(
            a in proptest::collection::vec(any::<u8>(), 0..12),
            b in proptest::collection::vec(any::<u8>(), 0..12),
            ta in proptest::option::of("[a-c:{]{0,3}"), tb in proptest::option::of("[a-c:{]{0,3}"),
            ra in proptest::option::of("[a-c]{1,2}"), rb in proptest::option::of("[a-c]{1,2}"),
            sa in 0usize..3, sb in 0usize..3,
        ) {
            let rate = Rate::per_minute(5);
            let subject = |s: usize, bytes: &'static [u8]| match s {
                0 => Subject::Named(bytes),
                1 => Subject::Anonymous,
                _ => Subject::Client(std::net::IpAddr::from([bytes.len() as u8, 0, 0, 1]), 32),
            };
            let make = |s: usize, bytes: &'static [u8], tool: &Option<String>, tier: &Option<String>| {
                let tool: Option<&'static str> = tool.clone().map(|t| &*Box::leak(t.into_boxed_str()));
                let tier: Option<&'static str> = tier.clone().map(|t| &*Box::leak(t.into_boxed_str()));
                let key = match tool {
                    Some(tool) => Key::user_tool(subject(s, bytes), tool, rate, Algorithm::FixedWindow),
                    None => Key::new(RuleKind::User, subject(s, bytes), rate, Algorithm::FixedWindow),
                };
                match tier { Some(t) => key.with_tier(t), None => key }
            };
            let ab: &'static [u8] = Box::leak(a.clone().into_boxed_slice());
            let bb: &'static [u8] = Box::leak(b.clone().into_boxed_slice());
            let ka = make(sa, ab, &ta, &ra);
            let kb = make(sb, bb, &tb, &rb);
            let same = ka == kb;
            prop_assert_eq!(ka.encode("rl") == kb.encode("rl"), same);
            prop_assert_eq!(memory_id(&ka) == memory_id(&kb), same);
        }

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
