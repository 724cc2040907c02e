//! Keeps failure logs to about one line a second, counting the lines it holds back.

use std::sync::atomic::{AtomicU64, Ordering};

/// Lets one line through per second of the caller's clock; counts the rest.
#[derive(Debug, Default)]
pub(crate) struct LogGate {
    next_at: AtomicU64,
    suppressed: AtomicU64,
}

impl LogGate {
    /// `Some(lines held back since the last one)` if a line may be logged at `now` (µs).
    pub(crate) fn may_log(&self, now: u64) -> Option<u64> {
        let next = self.next_at.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_at
                .compare_exchange(
                    next,
                    now.saturating_add(1_000_000),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::LogGate;

    #[test]
    fn one_line_a_second_with_the_count_of_the_rest() {
        let gate = LogGate::default();
        assert_eq!(gate.may_log(5_000_000), Some(0));
        assert_eq!(gate.may_log(5_000_001), None);
        assert_eq!(gate.may_log(5_999_999), None);
        assert_eq!(gate.may_log(6_000_000), Some(2));
        // The end of time saturates rather than overflowing.
        assert_eq!(gate.may_log(u64::MAX), Some(0));
    }
}
