//! `Rate`: how many requests per how long, and its `"30/m"` grammar.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// The largest count a rate may have.
pub(crate) const MAX_COUNT: u64 = 1_000_000_000;
/// The longest period a rate may have: 366 days.
pub(crate) const MAX_PERIOD: Duration = Duration::from_secs(366 * 86_400);

/// A number of requests per period: `Rate::per_minute(30)` and `"30/m"` both mean thirty
/// requests a minute.
///
/// A `Rate` that exists is valid: its count is 1..=1 000 000 000 and its period a whole
/// number of seconds between one second and 366 days.
///
/// ```
/// use std::time::Duration;
/// use tollgate::Rate;
///
/// let rate: Rate = "100 / 5m".parse().unwrap();
/// assert_eq!(rate.count(), 100);
/// assert_eq!(rate.period(), Duration::from_secs(300));
/// assert_eq!(rate.to_string(), "100/5m");
/// assert_eq!(Rate::per_minute(30), "30/min".parse().unwrap());
/// assert!("0/m".parse::<Rate>().is_err());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    count: u32,
    period_secs: u32,
}

/// Why a rate was refused. Its `Display` names the input: `invalid rate "abc/m": count
/// must be a positive integer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateError {
    input: String,
    reason: &'static str,
}

impl RateError {
    fn new(input: &str, reason: &'static str) -> Self {
        // Bound what an error echoes: config files are trusted, but not infinitely long.
        let mut input: String = input.chars().take(64).collect();
        if input.len() < 64 {
            input.shrink_to_fit();
        }
        RateError { input, reason }
    }

    /// What was wrong, without the input.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

impl fmt::Display for RateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid rate {:?}: {}", self.input, self.reason)
    }
}

impl std::error::Error for RateError {}

const COUNT_REASON: &str = "count must be a positive integer no larger than 1000000000";

impl Rate {
    /// `count` requests per `period`. The period must be a whole number of seconds,
    /// from one second to 366 days; the count from 1 to 1 000 000 000.
    pub fn new(count: u64, period: Duration) -> Result<Rate, RateError> {
        let shown = format!("{count}/{}s", period.as_secs_f64());
        let count = checked_count(count).ok_or_else(|| RateError::new(&shown, COUNT_REASON))?;
        if period.subsec_nanos() != 0 || period.is_zero() || period > MAX_PERIOD {
            return Err(RateError::new(
                &shown,
                "period must be a whole number of seconds from 1s to 366d",
            ));
        }
        Ok(Rate {
            count,
            period_secs: period.as_secs() as u32,
        })
    }

    /// `n` requests per second.
    ///
    /// # Panics
    /// If `n` is 0 or above 1 000 000 000; use [`Rate::new`] for values read at run time.
    pub const fn per_second(n: u32) -> Rate {
        Rate::const_new(n, 1)
    }

    /// `n` requests per minute. Panics as [`Rate::per_second`] does.
    pub const fn per_minute(n: u32) -> Rate {
        Rate::const_new(n, 60)
    }

    /// `n` requests per hour. Panics as [`Rate::per_second`] does.
    pub const fn per_hour(n: u32) -> Rate {
        Rate::const_new(n, 3_600)
    }

    /// `n` requests per day. Panics as [`Rate::per_second`] does.
    pub const fn per_day(n: u32) -> Rate {
        Rate::const_new(n, 86_400)
    }

    const fn const_new(count: u32, period_secs: u32) -> Rate {
        assert!(
            count >= 1 && count as u64 <= MAX_COUNT,
            "Rate count must be 1..=1_000_000_000"
        );
        Rate { count, period_secs }
    }

    /// Requests allowed per period.
    pub fn count(&self) -> u64 {
        u64::from(self.count)
    }

    /// The period.
    pub fn period(&self) -> Duration {
        Duration::from_secs(u64::from(self.period_secs))
    }

    pub(crate) fn period_secs(&self) -> u32 {
        self.period_secs
    }

    pub(crate) fn period_micros(&self) -> u64 {
        u64::from(self.period_secs) * 1_000_000
    }
}

fn checked_count(count: u64) -> Option<u32> {
    if (1..=MAX_COUNT).contains(&count) {
        Some(count as u32)
    } else {
        None
    }
}

impl fmt::Debug for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Rate({self})")
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.period_secs;
        let (n, unit) = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")]
            .into_iter()
            .find(|(size, _)| secs % size == 0)
            .map(|(size, unit)| (secs / size, unit))
            .unwrap_or((secs, "s"));
        if n == 1 {
            write!(f, "{}/{unit}", self.count)
        } else {
            write!(f, "{}/{n}{unit}", self.count)
        }
    }
}

impl FromStr for Rate {
    type Err = RateError;

    fn from_str(input: &str) -> Result<Rate, RateError> {
        let err = |reason| RateError::new(input, reason);
        if input.trim().is_empty() {
            return Err(err("expected <count>/<period>, e.g. \"30/m\", got nothing"));
        }
        let (count, period) = input
            .split_once('/')
            .ok_or_else(|| err("expected <count>/<period>, e.g. \"30/m\""))?;
        let count = count.trim();
        if !count.bytes().all(|b| b.is_ascii_digit()) || count.is_empty() {
            return Err(err(COUNT_REASON));
        }
        let count = count
            .parse::<u64>()
            .ok()
            .and_then(checked_count)
            .ok_or_else(|| err(COUNT_REASON))?;

        let period = period.trim();
        if period.is_empty() {
            return Err(err(
                "missing period after '/': use s, m, h or d, e.g. \"30/m\"",
            ));
        }
        let digits = period.bytes().take_while(u8::is_ascii_digit).count();
        let (multiplier, unit) = period.split_at(digits);
        let multiplier: u64 = if multiplier.is_empty() {
            1
        } else {
            match multiplier.parse::<u64>() {
                Ok(m) if m > 0 => m,
                _ => return Err(err("period multiplier must be a positive integer")),
            }
        };
        let unit_secs: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "s" | "sec" | "secs" | "second" | "seconds" => 1,
            "m" | "min" | "mins" | "minute" | "minutes" => 60,
            "h" | "hr" | "hrs" | "hour" | "hours" => 3_600,
            "d" | "day" | "days" => 86_400,
            _ => {
                return Err(err(
                    "unknown period unit: use s, m, h or d (e.g. \"10/30s\")",
                ))
            }
        };
        let secs = multiplier
            .checked_mul(unit_secs)
            .filter(|s| *s <= MAX_PERIOD.as_secs())
            .ok_or_else(|| err("period must not exceed 366 days"))?;
        Ok(Rate {
            count,
            period_secs: secs as u32,
        })
    }
}

impl serde::Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Rate, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_the_documented_forms() {
        for (text, count, secs) in [
            ("30/m", 30, 60),
            ("30/min", 30, 60),
            (" 30 / minute ", 30, 60),
            ("10/30s", 10, 30),
            ("100/5m", 100, 300),
            ("1/D", 1, 86_400),
            ("7/2hours", 7, 7_200),
            ("1000000000/s", 1_000_000_000, 1),
            ("5/ 2 sec", 5, 2),
        ] {
            let rate: Rate = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(
                (rate.count(), rate.period().as_secs()),
                (count, secs),
                "{text}"
            );
        }
    }

    #[test]
    fn rejects_the_documented_mistakes_with_a_reason() {
        for (text, reason) in [
            ("60", "expected <count>/<period>"),
            ("", "got nothing"),
            ("/", "count must be"),
            ("abc/m", "count must be a positive integer"),
            ("0/m", "count must be a positive integer"),
            ("-5/m", "count must be a positive integer"),
            ("10/w", "unknown period unit"),
            ("10/0s", "multiplier must be a positive integer"),
            ("10/", "missing period"),
            ("1000000001/s", "count must be"),
            ("1/367d", "366 days"),
            ("1/99999999999999999999d", "multiplier"),
        ] {
            let err = text.parse::<Rate>().expect_err(text).to_string();
            assert!(err.contains(reason), "{text:?} gave {err:?}");
            assert!(err.starts_with(&format!("invalid rate {text:?}")), "{err}");
        }
    }

    #[test]
    fn constructors_read_as_they_sound() {
        assert_eq!(Rate::per_second(5).period(), Duration::from_secs(1));
        assert_eq!(Rate::per_minute(30).count(), 30);
        assert_eq!(Rate::per_hour(2).to_string(), "2/h");
        assert_eq!(Rate::per_day(9).to_string(), "9/d");
        assert_eq!(
            Rate::new(10, Duration::from_secs(90)).unwrap().to_string(),
            "10/90s"
        );
        assert!(Rate::new(0, Duration::from_secs(1)).is_err());
        assert!(Rate::new(1, Duration::from_millis(1500)).is_err());
        assert!(Rate::new(1, Duration::ZERO).is_err());
    }

    proptest! {
        #[test]
        fn display_round_trips(count in 1u64..=MAX_COUNT, secs in 1u64..=MAX_PERIOD.as_secs()) {
            let rate = Rate::new(count, Duration::from_secs(secs)).unwrap();
            prop_assert_eq!(rate.to_string().parse::<Rate>().unwrap(), rate);
        }

        #[test]
        fn parsing_never_panics(text in ".{0,40}") {
            let _ = text.parse::<Rate>();
        }

        #[test]
        fn whatever_parses_is_in_range(text in "[ 0-9]{0,12}/[ 0-9a-zA-Z]{0,10}") {
            if let Ok(rate) = text.parse::<Rate>() {
                prop_assert!((1..=MAX_COUNT).contains(&rate.count()));
                prop_assert!(rate.period() >= Duration::from_secs(1) && rate.period() <= MAX_PERIOD);
            }
        }
    }
}
