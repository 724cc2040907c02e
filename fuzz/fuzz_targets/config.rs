//! `RateLimitConfig::from_toml_str` on arbitrary UTF-8: never panics; an error lists at
//! least one problem, exactly one `field: message` line each, every one naming a field;
//! a config that parses has normalised tool names and builds a layer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::{RateLimitConfig, RateLimitLayer};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match RateLimitConfig::from_toml_str(text) {
        Ok(cfg) => {
            let _ = format!("{cfg:?}");
            for (name, rate) in cfg.by_tool() {
                assert_eq!(
                    name,
                    name.trim().to_lowercase(),
                    "tool names are normalised"
                );
                assert_eq!(cfg.tool_rate(name), Some(rate));
            }
            let layer = RateLimitLayer::new(cfg);
            let _ = format!("{layer:?}");
        }
        Err(e) => {
            assert!(e.problems().next().is_some(), "an error with no problem");
            // Found by the first run and fixed (fe4e2ee): the table `[""]` was reported
            // as ": unknown field", and a key holding a newline split its line.
            for (field, message) in e.problems() {
                assert!(!field.is_empty() && !message.is_empty(), "{e:?}");
            }
            assert_eq!(
                e.to_string().lines().count(),
                e.problems().count(),
                "one line per problem: {e:?}"
            );
        }
    }
});
