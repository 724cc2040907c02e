//! What the example servers share: `--config FILE --listen ADDR`, reading and validating
//! the config (every problem listed, each naming its field), logging, and the runtime.
//! Included by `examples/gateway.rs` and `examples/mcp_server.rs` with `#[path]`.

use std::future::Future;
use std::process::ExitCode;

use tollgate::RateLimitConfig;

use super::flags::Flags;

/// An example server: its name (for messages), usage text and defaults.
pub struct Cli {
    pub name: &'static str,
    pub usage: &'static str,
    /// The config used without `--config`, and how messages name it.
    pub default_config: (&'static str, &'static str),
    pub default_listen: &'static str,
    /// Whether the server takes `--admin ADDR` (an admin listener of its own).
    pub admin: bool,
}

/// The parsed command line.
pub struct Args {
    pub config: Option<String>,
    pub listen: String,
    /// `--admin ADDR`, where the server takes one.
    pub admin: Option<String>,
}

impl Cli {
    /// `Ok(None)`: `--help` was asked for.
    pub fn parse(&self, args: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
        let mut parsed = Args {
            config: None,
            listen: self.default_listen.to_owned(),
            admin: None,
        };
        let mut flags = Flags::new(args);
        while let Some(flag) = flags.next_flag() {
            match flag.as_str() {
                "-h" | "--help" => return Ok(None),
                "--config" => parsed.config = Some(flags.value(&flag)?),
                "--listen" => parsed.listen = flags.value(&flag)?,
                "--admin" if self.admin => parsed.admin = Some(flags.value(&flag)?),
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        Ok(Some(parsed))
    }

    /// Parses the command line and the config, starts logging and a runtime, and runs
    /// `serve(cfg, args)` on it; every failure is a message on stderr and an exit code.
    pub fn main<F, Fut>(&self, serve: F) -> ExitCode
    where
        F: FnOnce(RateLimitConfig, Args) -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        let name = self.name;
        let args = match self.parse(std::env::args().skip(1)) {
            Ok(Some(args)) => args,
            Ok(None) => {
                println!("{}", self.usage);
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("{name}: {e}\n\n{}", self.usage);
                return ExitCode::from(2);
            }
        };
        let cfg = match &args.config {
            None => RateLimitConfig::from_toml_str(self.default_config.0)
                .map_err(|e| format!("invalid config in {}:\n{e}", self.default_config.1)),
            Some(path) => read_config(path),
        };
        let cfg = match cfg {
            Ok(cfg) => cfg,
            Err(e) => {
                eprintln!("{name}: {e}");
                return ExitCode::FAILURE;
            }
        };
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_max_level(tracing::Level::INFO)
            .init();
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("{name}: cannot start the tokio runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        match runtime.block_on(serve(cfg, args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{name}: {e}");
                ExitCode::FAILURE
            }
        }
    }
}

/// Reads and checks the config file at `path`; the error lists every problem, one a line,
/// each naming its field.
pub fn read_config(path: &str) -> Result<RateLimitConfig, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("cannot read config {path}: {e}"))?;
    RateLimitConfig::from_toml_str(&text).map_err(|e| format!("invalid config in {path}:\n{e}"))
}
