//! Command-line flags for the examples: `--name value` or `--name=value`.

/// The arguments after the program name, read one flag at a time.
pub struct Flags<I> {
    args: I,
    /// The value written after `=` in the current flag, if any.
    inline: Option<String>,
}

impl<I: Iterator<Item = String>> Flags<I> {
    pub fn new(args: I) -> Self {
        Flags { args, inline: None }
    }

    /// The next flag (`--name` of `--name=value` as well); `None` after the last.
    pub fn next_flag(&mut self) -> Option<String> {
        let arg = self.args.next()?;
        match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                self.inline = Some(value.to_owned());
                Some(flag.to_owned())
            }
            _ => {
                self.inline = None;
                Some(arg)
            }
        }
    }

    /// The current flag's value: written inline, else the next argument.
    pub fn value(&mut self, flag: &str) -> Result<String, String> {
        self.inline
            .take()
            .or_else(|| self.args.next())
            .ok_or_else(|| format!("{flag} needs a value"))
    }
}
