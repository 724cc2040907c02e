//! `Check`: reads one raw value into a typed one, or records why it cannot, naming the
//! field. The section checkers in `validate/` are built from these.

use std::collections::BTreeMap;

use http::HeaderName;
use serde::de::IgnoredAny;

use super::error::ConfigError;
use super::model::{normalize_tool, Choice};
use super::schema::{Loose, Scalar};
use super::settings::Int;
use crate::rate::Rate;

/// Collects problems while turning raw values into typed ones.
#[derive(Default)]
pub(crate) struct Check {
    pub(crate) err: ConfigError,
}

impl Check {
    pub(crate) fn text<'a>(&mut self, field: &str, value: &'a Option<Scalar>) -> Option<&'a str> {
        match value {
            None => None,
            Some(Scalar::Text(t)) => Some(t),
            Some(Scalar::Int(_)) => {
                self.err.push(field, "expected a string, found an integer");
                None
            }
            Some(Scalar::Other(what)) => {
                self.err
                    .push(field, format!("expected a string, found {what}"));
                None
            }
        }
    }

    pub(crate) fn rate(&mut self, field: &str, value: &Option<Scalar>) -> Option<Rate> {
        if let Some(Scalar::Int(n)) = value {
            self.err.push(
                field,
                format!("expected a rate like \"{n}/m\", found the bare number {n}"),
            );
            return None;
        }
        let text = self.text(field, value)?;
        match text.parse::<Rate>() {
            Ok(rate) => Some(rate),
            Err(e) => {
                self.err.push(field, e.to_string());
                None
            }
        }
    }

    /// One of `T`'s names (case and surrounding space ignored); `T`'s default when absent
    /// or wrong (the problem is reported).
    pub(crate) fn choice<T: Choice>(&mut self, field: &str, value: &Option<Scalar>) -> T {
        let Some(text) = self.text(field, value) else {
            return T::default();
        };
        let wanted = text.trim().to_ascii_lowercase();
        if let Some(v) = T::ALL.iter().find(|v| v.name() == wanted) {
            return *v;
        }
        let names: Vec<&str> = T::ALL.iter().map(|v| v.name()).collect();
        let expected = match names.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
            _ => names.join(""),
        };
        self.err.push(
            field,
            format!("unknown {} {text:?}: expected {expected}", T::WHAT),
        );
        T::default()
    }

    /// `setting`'s value, within its range; its default when absent or wrong (the problem
    /// is reported, naming `setting.field`).
    pub(crate) fn int(&mut self, setting: &Int, value: &Option<Scalar>) -> u64 {
        let (field, min, max) = (setting.field, setting.min, setting.max);
        match value {
            None => setting.default,
            Some(Scalar::Int(n)) if (i128::from(min)..=i128::from(max)).contains(n) => *n as u64,
            Some(Scalar::Int(n)) => {
                self.err.push(
                    field,
                    format!("{n} is out of range: must be {min} to {max}"),
                );
                setting.default
            }
            Some(Scalar::Text(_)) => {
                self.err.push(field, "expected an integer, found a string");
                setting.default
            }
            Some(Scalar::Other(what)) => {
                self.err
                    .push(field, format!("expected an integer, found {what}"));
                setting.default
            }
        }
    }

    pub(crate) fn header(&mut self, field: &str, value: &Option<Scalar>) -> Option<HeaderName> {
        let text = self.text(field, value)?;
        match HeaderName::from_bytes(text.trim().as_bytes()) {
            Ok(name) => Some(name),
            Err(_) => {
                self.err
                    .push(field, format!("{text:?} is not a valid HTTP header name"));
                None
            }
        }
    }

    pub(crate) fn flag(&mut self, field: &str, value: &Option<Loose<bool>>) -> bool {
        match value {
            None => false,
            Some(Loose::Ok(on)) => *on,
            Some(Loose::Found(what)) => {
                self.err
                    .push(field, format!("expected true or false, found {what}"));
                false
            }
        }
    }

    pub(crate) fn strings(
        &mut self,
        field: &str,
        value: &Option<Loose<Vec<Scalar>>>,
    ) -> Vec<String> {
        match value {
            None => Vec::new(),
            Some(Loose::Ok(items)) => items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| {
                    let item = Some(item.clone());
                    self.text(&format!("{field}[{i}]"), &item)
                        .map(|t| t.trim().to_owned())
                })
                .collect(),
            Some(Loose::Found(what)) => {
                self.err
                    .push(field, format!("expected an array of strings, found {what}"));
                Vec::new()
            }
        }
    }

    /// A `[by_tool]`-like table: names trimmed and lower-cased, none empty, no two alike.
    pub(crate) fn names(
        &mut self,
        table: &str,
        what: &str,
        entries: &Option<Vec<(String, Scalar)>>,
    ) -> BTreeMap<String, Rate> {
        self.named(table, what, entries, |c, field, value| c.rate(field, value))
    }

    /// A `[cost.tools]`-like table: names as for [`Check::names`], each an integer
    /// number of units from 0 to `max`.
    pub(crate) fn prices(
        &mut self,
        table: &str,
        what: &str,
        entries: &Option<Vec<(String, Scalar)>>,
        max: u64,
    ) -> BTreeMap<String, u64> {
        self.named(table, what, entries, |c, field, value| match value {
            Some(Scalar::Int(n)) if (0..=i128::from(max)).contains(n) => Some(*n as u64),
            Some(Scalar::Int(n)) => {
                c.err.push(
                    field,
                    format!("{n} is out of range: a cost is 0 to {max} units"),
                );
                None
            }
            Some(Scalar::Text(_)) => {
                c.err
                    .push(field, "expected a number of units, found a string");
                None
            }
            Some(Scalar::Other(found)) => {
                c.err
                    .push(field, format!("expected a number of units, found {found}"));
                None
            }
            None => None,
        })
    }

    /// A table of names (trimmed and lower-cased, none empty, no two alike) to values
    /// `read` checks.
    fn named<T>(
        &mut self,
        table: &str,
        what: &str,
        entries: &Option<Vec<(String, Scalar)>>,
        mut read: impl FnMut(&mut Check, &str, &Option<Scalar>) -> Option<T>,
    ) -> BTreeMap<String, T> {
        let mut values = BTreeMap::new();
        let mut written: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in entries.iter().flatten() {
            let field = format!("{table}[{name:?}]");
            let value = read(self, &field, &Some(value.clone()));
            let normalized = normalize_tool(name);
            if normalized.is_empty() {
                self.err.push(field, format!("{what} name is empty"));
                continue;
            }
            if let Some(first) = written.get(&normalized) {
                self.err.push(
                    field,
                    format!("same {what} as {table}[{first:?}] after trimming and lower-casing"),
                );
                continue;
            }
            written.insert(normalized.clone(), name.clone());
            if let Some(value) = value {
                values.insert(normalized, value);
            }
        }
        values
    }

    /// A byte size for `setting`: an integer, or text such as `"1MiB"`, `"512 KiB"`,
    /// `"65536"` (units `B`, `KiB`/`KB`, `MiB`/`MB`; both binary, as a buffer size is).
    pub(crate) fn size(&mut self, setting: &Int, value: &Option<Scalar>) -> u64 {
        let field = setting.field;
        let bytes = match value {
            None => return setting.default,
            Some(Scalar::Int(n)) => Some(*n),
            Some(Scalar::Text(text)) => parse_size(text),
            Some(Scalar::Other(what)) => {
                self.err.push(
                    field,
                    format!("expected a size like \"1MiB\", found {what}"),
                );
                return setting.default;
            }
        };
        match bytes {
            Some(n) if (i128::from(setting.min)..=i128::from(setting.max)).contains(&n) => n as u64,
            Some(n) => {
                self.err.push(
                    field,
                    format!(
                        "{n} bytes is out of range: must be {} to {}",
                        bytes_text(setting.min),
                        bytes_text(setting.max)
                    ),
                );
                setting.default
            }
            None => {
                let shown = match value {
                    Some(Scalar::Text(t)) => t.as_str(),
                    _ => "",
                };
                self.err.push(
                    field,
                    format!("invalid size {shown:?}: expected bytes or a number with B, KiB or MiB, like \"1MiB\""),
                );
                setting.default
            }
        }
    }

    pub(crate) fn unknown(&mut self, section: &str, keys: &BTreeMap<String, IgnoredAny>) {
        for key in keys.keys() {
            let plain = !key.is_empty()
                && key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            // A key that is empty or holds spaces, quotes or newlines is quoted, so every
            // problem names its field on one line.
            let field = if plain {
                format!("{section}{key}")
            } else {
                format!("{section}{key:?}")
            };
            self.err.push(field, "unknown field");
        }
    }
}

/// `1 byte`, `64 MiB`, or a plain number of bytes.
fn bytes_text(n: u64) -> String {
    match n {
        1 => "1 byte".into(),
        n if n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n => format!("{n} bytes"),
    }
}

/// `"1MiB"` → 1048576; `None` when it is not a size.
fn parse_size(text: &str) -> Option<i128> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() || digits.len() > 12 {
        return None;
    }
    let n: i128 = digits.parse().ok()?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        _ => return None,
    };
    Some(n * scale)
}
