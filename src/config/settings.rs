//! Every numeric setting's default and accepted range, defined once. Validation, the
//! builders (`RateLimitConfigBuilder`, `RedisStoreBuilder`, `MemoryStore::new`), the
//! `Default` impls and the configuration reference (`docs/configuration.md`, checked by
//! the test below) all read them here.

/// An integer setting: how a config file names it, its default, and the values it accepts
/// (inclusive).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Int {
    pub(crate) field: &'static str,
    pub(crate) default: u64,
    pub(crate) min: u64,
    pub(crate) max: u64,
}

/// `[backend] pool_size`: the most sockets opened to one Redis server. At most
/// [`MAX_SOCKETS`] are opened whatever it says (values above act as that many): each
/// socket multiplexes every request, and more add nothing against one single-threaded
/// server. Up to 1024 is accepted, so configs written when the default was 16 still load.
pub(crate) const POOL_SIZE: Int = Int {
    field: "backend.pool_size",
    default: MAX_SOCKETS as u64,
    min: 1,
    max: 1024,
};

/// The most sockets a Redis store opens to one server.
pub(crate) const MAX_SOCKETS: u32 = 4;

/// `[backend] timeout_ms`: the longest a Redis call may take, connecting included.
pub(crate) const TIMEOUT_MS: Int = Int {
    field: "backend.timeout_ms",
    default: 50,
    min: 1,
    max: 60_000,
};

/// `[backend] max_keys`: the most keys a memory store (or a memory fallback) holds.
pub(crate) const MAX_KEYS: Int = Int {
    field: "backend.max_keys",
    default: 1_000_000,
    min: 1,
    max: 1_000_000_000,
};

/// `[backend] deny_cache`: refused keys the Redis store remembers locally (0: off).
pub(crate) const DENY_CACHE: Int = Int {
    field: "backend.deny_cache",
    default: 10_000,
    min: 0,
    max: 10_000_000,
};

/// `[backend] max_batch`: the most requests one Redis script call decides (1: no
/// coalescing). A batch of 128 keeps Redis busy for a fraction of a millisecond (each
/// request costs it about a microsecond of Lua), so other clients of the server do not
/// wait on it, while at 512 concurrent callers over the two lanes it already takes under
/// one call per hundred checks.
pub(crate) const MAX_BATCH: Int = Int {
    field: "backend.max_batch",
    default: 128,
    min: 1,
    max: 1024,
};

/// `[identity] ipv6_prefix`: the prefix length IPv6 clients are grouped by (`by_ip`).
pub(crate) const IPV6_PREFIX: Int = Int {
    field: "identity.ipv6_prefix",
    default: 64,
    min: 32,
    max: 128,
};

/// `[mcp] max_body`, in bytes: the most body bytes `McpLayer` reads to find the call.
pub(crate) const MAX_BODY: Int = Int {
    field: "mcp.max_body",
    default: 1 << 20,
    min: 1,
    max: 64 << 20,
};

/// `[backend] key_prefix` when not given.
pub(crate) const KEY_PREFIX: &str = "rl";
/// The longest `[backend] key_prefix`.
pub(crate) const KEY_PREFIX_MAX_LEN: usize = 64;

/// Longest user or tenant id accepted, in bytes. Longer ids are refused (400), never
/// truncated: truncation would merge distinct identities.
pub const MAX_IDENTITY_LEN: usize = 256;

/// The largest cost a `[cost.tools]` or `[cost.prompts]` entry may give a call, in units:
/// the largest count a rate may have (a call costing more could never fit any rule).
pub(crate) const MAX_COST: u64 = 1_000_000_000;

/// Longest tier name (it is part of every key of the tier's counters).
pub(crate) const MAX_TIER_NAME: usize = 32;

/// Every integer setting, for the reference's test.
#[cfg(test)]
const ALL: [Int; 7] = [
    POOL_SIZE,
    TIMEOUT_MS,
    MAX_KEYS,
    DENY_CACHE,
    MAX_BATCH,
    IPV6_PREFIX,
    MAX_BODY,
];

#[cfg(test)]
mod tests {
    use super::*;

    /// `docs/configuration.md`'s table row of `field`: its default and accepted cells.
    fn row(field: &str) -> (String, String) {
        let reference = include_str!("../../docs/configuration.md");
        let cell = format!("| `{field}` |");
        let line = reference
            .lines()
            .find(|l| l.starts_with(&cell))
            .unwrap_or_else(|| panic!("docs/configuration.md has no row for `{field}`"));
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        (cells[2].to_owned(), cells[3].to_owned())
    }

    /// How the reference writes a number: `1000000`, or a size for `mcp.max_body`.
    fn shown(setting: &Int, n: u64) -> String {
        if setting.field == "mcp.max_body" {
            match n {
                1 => "1 byte".into(),
                n if n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
                n => n.to_string(),
            }
        } else {
            n.to_string()
        }
    }

    /// The reference states each setting's default and range as defined here: the table
    /// can no longer drift from the code (`pool_size` once said "connections, default 16"
    /// where at most four sockets were opened).
    #[test]
    fn the_reference_table_states_every_default_and_range() {
        for setting in ALL {
            let (default, accepted) = row(setting.field);
            let want_default = match setting.field {
                "mcp.max_body" => "`1MiB`".to_owned(),
                _ => setting.default.to_string(),
            };
            assert_eq!(default, want_default, "{}", setting.field);
            let range = format!(
                "{}–{}",
                shown(&setting, setting.min),
                shown(&setting, setting.max)
            );
            let range = if setting.field == "mcp.max_body" {
                range.replace('–', " to ")
            } else {
                range
            };
            assert!(
                accepted.starts_with(&range),
                "{}: the reference says {accepted:?}, the code {range:?}",
                setting.field
            );
        }
        let (default, _) = row("backend.key_prefix");
        assert_eq!(default, format!("`{KEY_PREFIX}`"));
    }
}
