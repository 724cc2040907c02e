//! What a store keeps per key, and what one rule's check says.

/// What a store keeps per key. `t` is a time in µs (window start, or the bucket's
/// theoretical arrival time); `cur` and `prev` are counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct State {
    pub(crate) t: u64,
    pub(crate) cur: u32,
    pub(crate) prev: u32,
}

/// The result of one rule's check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Step {
    pub(crate) allowed: bool,
    /// Requests left after this one (0 when rejected).
    pub(crate) remaining: u64,
    /// µs from now until the limit resets (window end, or bucket full again).
    pub(crate) reset_after: u64,
    /// µs from now until this rule would allow a request (0 when allowed).
    pub(crate) retry_after: u64,
    /// The state to write when every rule allows.
    pub(crate) next: State,
}

/// `count` changed by `delta`, within 0 and `cap`.
pub(super) fn adjusted(count: u32, delta: i64, cap: u64) -> u32 {
    let count = i128::from(count) + i128::from(delta);
    count.clamp(0, i128::from(cap)) as u32
}
