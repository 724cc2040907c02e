//! Running an example binary as a new user would: located (and if needed built) next to
//! the test binaries, started on a free loopback port, its address read from the one
//! line it prints on stdout, killed on drop.
//!
//! `cargo test` builds examples next to the test binaries (`target/<profile>/examples`);
//! when an example binary is missing or older than its sources (e.g. after
//! `cargo test --test gateway_e2e`), it is built with `cargo build --example <name>`.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long a binary may take to start (it may be built first) or to exit.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// `target/<profile>/examples/<name>`, built first when missing or stale.
pub fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test>-<hash> → target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let bin = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !bin.exists() || is_stale(&bin, name) {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--example", name])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        // The binary the test expects: with /metrics when the test has the feature.
        if cfg!(feature = "metrics") {
            cmd.args(["--features", "metrics"]);
        }
        let status = cmd.status().expect("run cargo build --example");
        assert!(
            status.success(),
            "cargo build --example {name} failed: {status}"
        );
    }
    assert!(bin.exists(), "no {name} binary at {}", bin.display());
    bin
}

/// True when a source the example is built from (the crate, the example, the helpers
/// the examples share) is newer than the binary.
fn is_stale(bin: &Path, name: &str) -> bool {
    let Ok(built) = bin.metadata().and_then(|m| m.modified()) else {
        return true;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut pending = vec![
        root.join("src"),
        root.join(format!("examples/{name}.rs")),
        root.join("examples/common"),
        root.join("Cargo.toml"),
    ];
    let mut seen = 0;
    while let Some(path) = pending.pop() {
        seen += 1;
        if seen > 10_000 {
            return true;
        }
        let Ok(meta) = path.metadata() else { continue };
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&path) {
                pending.extend(entries.flatten().map(|e| e.path()));
            }
        } else if meta.modified().is_ok_and(|m| m > built) {
            return true;
        }
    }
    false
}

/// A running example server, killed on drop (also when an assertion fails); its stderr
/// is printed when the test fails.
pub struct Running {
    child: Child,
    /// The address it printed.
    pub addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
    /// The lines it printed after the first.
    lines: mpsc::Receiver<String>,
}

impl Running {
    /// Starts `bin` with `args` and waits (bounded) for its first stdout line,
    /// `{banner} listening on http://{addr}`.
    pub fn start(bin: &Path, banner: &str, args: &[&str]) -> Running {
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let stderr = drain(child.stderr.take().expect("piped stderr"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            // Every line is read (so the child never blocks on a full pipe) and handed on.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // The guard exists before any assertion, so a failed start still kills the child.
        let line = rx.recv_timeout(START_TIMEOUT);
        let mut running = Running {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            stderr,
            lines: rx,
        };
        let line =
            line.unwrap_or_else(|_| panic!("{banner} printed no address within {START_TIMEOUT:?}"));
        let addr = line
            .trim()
            .strip_prefix(&format!("{banner} listening on http://"))
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        running.addr = addr.parse().expect("a socket address");
        running
    }

    /// The address on the next stdout line, `{banner} listening on http://{addr}` (a
    /// second listener's), waited for (bounded).
    pub fn next_address(&self, banner: &str) -> SocketAddr {
        let line = self
            .lines
            .recv_timeout(START_TIMEOUT)
            .unwrap_or_else(|_| panic!("{banner} printed no address within {START_TIMEOUT:?}"));
        line.trim()
            .strip_prefix(&format!("{banner} listening on http://"))
            .unwrap_or_else(|| panic!("unexpected line {line:?}"))
            .parse()
            .expect("a socket address")
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    #[cfg(unix)]
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal("TERM");
        wait_bounded(&mut self.child, Duration::from_secs(10)).expect("exit after SIGTERM")
    }

    /// Sends the signal named `name` (`kill -<name>`).
    #[cfg(unix)]
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Waits (bounded) until stderr holds `times` occurrences of `text`; returns stderr.
    pub fn wait_for_log(&self, text: &str, times: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.stderr.lock().unwrap().clone();
            if log.matches(text).count() >= times {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "no {text:?} (×{times}) in the log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!(
                "--- server stderr ---\n{}",
                self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
            );
        }
    }
}

/// Reads `pipe` to its end on a thread of its own, into the returned text.
pub fn drain(mut pipe: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = text.clone();
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let Ok(mut s) = sink.lock() {
                s.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }
    });
    text
}

/// The child's exit status, or `None` if it is still running after `limit`.
pub fn wait_bounded(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        thread::sleep(Duration::from_millis(20));
    }
    None
}
