//! The `"30/m"` grammar: parsing arbitrary text never panics; whatever parses is in
//! range and its `Display` parses back to the same `Rate`; errors echo a bounded input.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tollgate::Rate;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match text.parse::<Rate>() {
        Ok(rate) => {
            assert!((1..=1_000_000_000).contains(&rate.count()), "{text:?}");
            assert!(
                rate.period() >= Duration::from_secs(1)
                    && rate.period() <= Duration::from_secs(366 * 86_400),
                "{text:?}"
            );
            let shown = rate.to_string();
            let again: Rate = shown
                .parse()
                .unwrap_or_else(|e| panic!("{text:?} shows as {shown:?}, which fails: {e}"));
            assert_eq!(again, rate, "{text:?} → {shown:?}");
            assert_eq!(again.to_string(), shown);
            assert_eq!(Rate::new(rate.count(), rate.period()), Ok(rate));
        }
        Err(e) => {
            // `invalid rate "<at most 64 chars, debug-escaped>": <reason>`.
            let shown = e.to_string();
            assert!(shown.starts_with("invalid rate "), "{shown}");
            assert!(!e.reason().is_empty());
            assert!(shown.chars().count() <= 64 * 10 + 200, "{shown}");
        }
    }
});
