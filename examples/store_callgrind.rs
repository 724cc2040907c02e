//! A fixed number of memory-store checks, as `benches/store.rs` makes them (its
//! `store/rules` and `store/100k` rows), for counting instructions per check with callgrind,
//! which a shared machine's noise does not move.
//!
//! ```text
//! cargo build --release --example store_callgrind
//! for n in 100000 600000; do
//!     valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.three.$n \
//!         target/release/examples/store_callgrind three_rules $n
//! done
//! # instructions per check: (Ir at 600000 - Ir at 100000) / 500000
//! ```
//!
//! Modes: `one_rule` (a user key, 1 000 users round-robin), `three_rules` (the same user
//! plus one of 10 tenants and one tool, all-or-nothing). The clock is fixed, so the counts
//! are the store's alone. Differencing two counts cancels start-up and the first insert of
//! each key.

#[path = "common/store_check.rs"]
mod store_check;

use std::process::ExitCode;

use store_check::check;
use tollgate::{Algorithm, Key, MemoryStore, Rate, RuleKind, Subject};

fn key(kind: RuleKind, id: &[u8]) -> Key<'_> {
    Key::new(
        kind,
        Subject::Named(id),
        Rate::per_second(1_000_000_000),
        Algorithm::FixedWindow,
    )
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(mode), Some(n)) = (
        args.next(),
        args.next().and_then(|n| n.parse::<usize>().ok()),
    ) else {
        eprintln!("usage: store_callgrind one_rule|three_rules CHECKS");
        return ExitCode::from(2);
    };
    let users: Vec<String> = (0..1_000).map(|i| format!("user-{i:08}")).collect();
    let tenants: Vec<String> = (0..10).map(|i| format!("tenant-{i:08}")).collect();
    let store = MemoryStore::new();
    let now = 1_700_000_000_000_000;
    for i in 0..n {
        let user = key(RuleKind::User, users[i % users.len()].as_bytes());
        match mode.as_str() {
            "one_rule" => check(&store, &[user], now),
            "three_rules" => {
                let tenant = key(RuleKind::Tenant, tenants[i % tenants.len()].as_bytes());
                check(&store, &[user, tenant, key(RuleKind::Tool, b"search")], now)
            }
            other => {
                eprintln!("unknown mode {other:?}");
                return ExitCode::from(2);
            }
        }
    }
    ExitCode::SUCCESS
}
