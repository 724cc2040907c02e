//! `ConfigError`: every problem found in a configuration, each naming its field.

use std::fmt;

/// Every problem found in a configuration. `Display` prints one per line, each starting
/// with the field it concerns, e.g. `by_tool["search"]: invalid rate "abc/m": ...`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigError {
    problems: Vec<(String, String)>,
}

impl ConfigError {
    pub(crate) fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.problems.push((field.into(), message.into()));
    }

    /// A document `toml` could not read into the schema: a value of the wrong shape (a
    /// number where a table belongs) is reported under its field, found from where in
    /// `text` the error points; any other error (a syntax error) under `toml`, with its
    /// line.
    pub(crate) fn from_toml(text: &str, error: &toml::de::Error) -> ConfigError {
        let message = error
            .message()
            .trim()
            .replace("expected a map", "expected a table");
        let message = match message.split_once("expected struct Raw") {
            Some((before, _)) => format!("{before}expected a table"),
            None => message,
        };
        let mut err = ConfigError::default();
        let Some(at) = error.span().map(|span| span.start.min(text.len())) else {
            err.push("toml", message);
            return err;
        };
        let line = text[..at].matches('\n').count() + 1;
        match field_at(text, at).filter(|_| message.starts_with("invalid type")) {
            Some(field) => err.push(field, format!("{message} (line {line})")),
            None => err.push("toml", format!("line {line}: {message}")),
        }
        err
    }

    /// Whether no problem was found.
    pub(crate) fn is_empty(&self) -> bool {
        self.problems.is_empty()
    }

    /// `(field, message)` for each problem, in the order found.
    pub fn problems(&self) -> impl Iterator<Item = (&str, &str)> {
        self.problems.iter().map(|(f, m)| (f.as_str(), m.as_str()))
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (field, message)) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{field}: {message}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// The dotted name of the key whose value starts at byte `at` of `text`: the last
/// `[table]` header before it, then the key before the `=` on its line. `None` when `at`
/// is not in a `key = value` line's value.
fn field_at(text: &str, at: usize) -> Option<String> {
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let (key, _) = text[start..at].split_once('=')?;
    let key = key.trim();
    if key.is_empty() || key.starts_with('#') {
        return None;
    }
    let table = text[..start]
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with('[') && !l.starts_with("[["))
        .filter_map(|l| Some(l[1..].split_once(']')?.0.trim()))
        .next_back();
    Some(match table {
        Some(table) => format!("{table}.{key}"),
        None => key.to_owned(),
    })
}
