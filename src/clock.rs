//! Time sources. tollgate reads time as integer microseconds since the Unix epoch, the
//! unit the Redis scripts use too, so memory and Redis compute identical answers.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A source of wall-clock time for rate decisions.
///
/// Implement it to drive tollgate from your own time source; use [`ManualClock`] in tests.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Microseconds since the Unix epoch.
    fn now_micros(&self) -> u64;
}

/// The default clock: the system time read once at construction, advanced by a monotonic
/// clock, so a wall-clock step after start-up never moves it backwards.
///
/// On Linux it reads `CLOCK_MONOTONIC_COARSE` (about 9 ns here against 30–60 ns for
/// `Instant::now()`, which costs as much as a whole rate-limit check), with the kernel
/// tick as resolution (1–4 ms): ample for limits counted in requests per second or
/// slower. [`SystemClock::precise`] reads `Instant` instead.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    base_micros: u64,
    base: Instant,
    #[cfg(target_os = "linux")]
    coarse_base: Option<Duration>,
}

impl SystemClock {
    /// A coarse, cheap clock (on Linux; elsewhere the same as [`SystemClock::precise`]).
    pub fn new() -> Self {
        let mut clock = Self::precise();
        #[cfg(target_os = "linux")]
        {
            clock.coarse_base = Some(coarse_now());
        }
        clock
    }

    /// A clock with `Instant`'s resolution.
    pub fn precise() -> Self {
        let base_micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, duration_micros);
        SystemClock {
            base_micros,
            base: Instant::now(),
            #[cfg(target_os = "linux")]
            coarse_base: None,
        }
    }

    fn elapsed(&self) -> Duration {
        #[cfg(target_os = "linux")]
        if let Some(base) = self.coarse_base {
            return coarse_now().saturating_sub(base);
        }
        self.base.elapsed()
    }
}

#[cfg(target_os = "linux")]
fn coarse_now() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::MonotonicCoarse);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    #[inline]
    fn now_micros(&self) -> u64 {
        self.base_micros
            .saturating_add(duration_micros(self.elapsed()))
    }
}

/// A clock that moves only when told to, for deterministic tests (yours and ours).
///
/// It starts at [`ManualClock::START`], 2023-11-15T00:00:00Z: a whole number of days
/// since the epoch, so an aligned window of any period that divides a day starts exactly
/// there. Clones share one time.
///
/// ```
/// use std::time::{Duration, UNIX_EPOCH};
/// use tollgate::ManualClock;
///
/// let clock = ManualClock::new();
/// let other = clock.clone();
/// clock.advance(Duration::from_secs(90));
/// assert_eq!(other.now(), UNIX_EPOCH + ManualClock::START + Duration::from_secs(90));
/// ```
#[derive(Debug, Clone)]
pub struct ManualClock {
    micros: Arc<AtomicU64>,
}

impl ManualClock {
    /// Where every `ManualClock` starts, as time since the Unix epoch: 19 676 days.
    pub const START: Duration = Duration::from_secs(19_676 * 86_400);

    /// A clock at [`ManualClock::START`].
    pub fn new() -> Self {
        ManualClock {
            micros: Arc::new(AtomicU64::new(duration_micros(Self::START))),
        }
    }

    /// Moves time forward by `by` (saturating).
    pub fn advance(&self, by: Duration) {
        let by = duration_micros(by);
        let _ = self
            .micros
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                Some(t.saturating_add(by))
            });
    }

    /// Moves time backward by `by` (saturating at the epoch), as a wall clock stepped back
    /// by NTP would.
    pub fn rewind(&self, by: Duration) {
        let by = duration_micros(by);
        let _ = self
            .micros
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                Some(t.saturating_sub(by))
            });
    }

    /// Sets the time to `since_epoch` after the Unix epoch.
    pub fn set(&self, since_epoch: Duration) {
        self.micros
            .store(duration_micros(since_epoch), Ordering::SeqCst);
    }

    /// The current time.
    pub fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_micros(self.micros.load(Ordering::SeqCst))
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    #[inline]
    fn now_micros(&self) -> u64 {
        self.micros.load(Ordering::Relaxed)
    }
}

pub(crate) fn duration_micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_clocks_track_wall_time_and_never_go_back() {
        for clock in [SystemClock::new(), SystemClock::precise()] {
            let wall = duration_micros(SystemTime::now().duration_since(UNIX_EPOCH).unwrap());
            let mut last = clock.now_micros();
            // Within 50 ms of the wall clock (the coarse clock's tick is a few ms).
            assert!(last.abs_diff(wall) < 50_000, "{last} vs {wall}");
            for _ in 0..10_000 {
                let now = clock.now_micros();
                assert!(now >= last);
                last = now;
            }
        }
    }
}
