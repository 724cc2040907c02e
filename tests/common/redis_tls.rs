//! A private `redis-server` that speaks only TLS, with certificates made at test time by
//! the `openssl` CLI: a CA, a server certificate it signed for `127.0.0.1` and
//! `localhost`, and a second, unrelated CA for "wrong CA" tests.
//!
//! Without `redis-server` or `openssl`, tests print why and skip, unless
//! `TOLLGATE_REQUIRE_REDIS=1`, which makes that a failure. Only the server this harness
//! started (its own child process) is ever killed.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::redis::{
    free_port, fresh_dir, run_bounded, server_command, unavailable_unless, wait_until,
};

/// What would let a skipped TLS test run (TOLLGATE_REDIS_URL is not a TLS server).
const FIX: &str = "install redis-server (built with TLS) and openssl";
/// How long one `openssl` run may take.
const OPENSSL_TIMEOUT: Duration = Duration::from_secs(30);

/// The CA's extensions: a real CA (rustls refuses a CA certificate as the end entity).
const CA_CONFIG: &str = "\
[req]
distinguished_name = dn
[dn]
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
";

/// The server certificate's extensions: a leaf for TLS servers at 127.0.0.1/localhost.
const LEAF_EXTENSIONS: &str = "\
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid,issuer
";

/// A TLS-only Redis server for one test. Drop kills it and removes its certificates.
#[derive(Debug)]
pub struct TlsRedis {
    url: String,
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// Runs `openssl` with `args` in `dir`: `Err` with its output when it fails.
fn openssl(dir: &Path, args: &[&str]) -> Result<(), String> {
    let out = run_bounded(
        Command::new("openssl").current_dir(dir).args(args),
        OPENSSL_TIMEOUT,
    )?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "openssl {} failed: {}",
            args.first().unwrap_or(&""),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Writes, into `dir`: `ca.pem` (+ key), `server.pem` and `server.key` signed by it, and
/// `wrong-ca.pem` (+ key), a CA that signed nothing here.
fn make_certificates(dir: &Path) -> Result<(), String> {
    let write = |name: &str, text: &str| {
        std::fs::write(dir.join(name), text).map_err(|e| format!("writing {name}: {e}"))
    };
    write("ca.cnf", CA_CONFIG)?;
    write("leaf.ext", LEAF_EXTENSIONS)?;
    for (name, subject) in [
        ("ca", "/CN=tollgate test CA"),
        ("wrong-ca", "/CN=tollgate unrelated CA"),
    ] {
        let (key, pem) = (format!("{name}.key"), format!("{name}.pem"));
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-new",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-config",
                "ca.cnf",
                "-extensions",
                "v3_ca",
                "-subj",
                subject,
                "-keyout",
                &key,
                "-out",
                &pem,
            ],
        )?;
    }
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-config",
            "ca.cnf",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-set_serial",
            "2",
            "-days",
            "2",
            "-extfile",
            "leaf.ext",
            "-out",
            "server.pem",
        ],
    )
}

/// Whether something accepts TCP connections on `port`.
fn accepts(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

/// Starts `redis-server` on TLS port `port` only (plain port 0: none), certificates in `dir`.
fn spawn(port: u16, dir: &Path) -> std::io::Result<Child> {
    server_command(dir)
        .args(["--port", "0", "--tls-port"])
        .arg(port.to_string())
        .arg("--tls-cert-file")
        .arg(dir.join("server.pem"))
        .arg("--tls-key-file")
        .arg(dir.join("server.key"))
        .arg("--tls-ca-cert-file")
        .arg(dir.join("ca.pem"))
        .args(["--tls-auth-clients", "no"])
        .spawn()
}

impl TlsRedis {
    /// A TLS-only `redis-server` with fresh certificates; `None` (after printing why)
    /// when `redis-server` or `openssl` is missing or fails, a panic instead when
    /// `TOLLGATE_REQUIRE_REDIS=1`.
    ///
    /// ```ignore
    /// let Some(redis) = common::redis_tls::TlsRedis::start("my_test") else { return };
    /// ```
    pub fn start(test: &str) -> Option<TlsRedis> {
        let dir = match fresh_dir("tollgate-tls") {
            Ok(dir) => dir,
            Err(e) => {
                return unavailable_unless(test, &format!("no temp dir for certificates: {e}"), FIX)
            }
        };
        // Built first, so that Drop removes the directory on every early return.
        let mut server = TlsRedis {
            url: String::new(),
            port: 0,
            dir,
            child: None,
        };
        if let Err(why) = make_certificates(&server.dir) {
            return unavailable_unless(test, &format!("no test certificates: {why}"), FIX);
        }
        let mut last = String::from("no free port");
        for _ in 0..5 {
            let Some(port) = free_port() else { continue };
            let mut child = match spawn(port, &server.dir) {
                Ok(child) => child,
                Err(e) => {
                    return unavailable_unless(
                        test,
                        &format!("redis-server could not be started: {e}"),
                        FIX,
                    )
                }
            };
            if wait_until(&mut child, || accepts(port)) {
                server.url = format!("rediss://127.0.0.1:{port}/0");
                server.port = port;
                server.child = Some(child);
                return Some(server);
            }
            let _ = child.kill();
            let _ = child.wait();
            last = format!("redis-server (TLS) did not listen on port {port}");
        }
        unavailable_unless(test, &last, FIX)
    }

    /// `rediss://127.0.0.1:P/0`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The TLS port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The CA (PEM) that signed the server's certificate.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A CA (PEM) that did not sign the server's certificate.
    pub fn wrong_ca_path(&self) -> PathBuf {
        self.dir.join("wrong-ca.pem")
    }

    /// Kills the server (SIGKILL) and waits for it to go.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same certificates (empty:
    /// nothing was saved).
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut child = spawn(self.port, &self.dir).expect("redis-server starts again");
            if wait_until(&mut child, || accepts(self.port)) {
                self.child = Some(child);
                return;
            }
            let _ = child.kill();
            let _ = child.wait();
            assert!(
                Instant::now() < deadline,
                "redis-server (TLS) did not come back on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TLS Redis as a [`Backend`](super::Backend), trusting the server's CA: each value has
/// a fresh key prefix, decides on the test's clock, and layers made from one value share
/// one store.
pub struct TlsBackend {
    url: String,
    ca: Vec<u8>,
    prefix: String,
    store: std::sync::Mutex<Option<tollgate::RedisStore>>,
}

impl TlsBackend {
    /// A backend on `server`, with a fresh prefix.
    pub fn on(server: &TlsRedis) -> TlsBackend {
        TlsBackend {
            url: server.url().to_owned(),
            ca: std::fs::read(server.ca_path()).expect("the test CA"),
            prefix: super::redis::fresh_prefix(),
            store: std::sync::Mutex::new(None),
        }
    }

    /// The store layers from this backend share.
    pub fn store(&self) -> tollgate::RedisStore {
        let mut slot = self.store.lock().unwrap();
        slot.get_or_insert_with(|| {
            tollgate::RedisStore::builder(&self.url)
                .tls_ca(self.ca.clone())
                .key_prefix(&self.prefix)
                .caller_time(true)
                .timeout(Duration::from_secs(5))
                .deny_cache(0)
                .build()
                .expect("valid rediss url")
        })
        .clone()
    }
}

impl super::Backend for TlsBackend {
    fn name(&self) -> &'static str {
        "redis_tls"
    }

    fn layer(
        &self,
        cfg: tollgate::RateLimitConfig,
        clock: &tollgate::ManualClock,
    ) -> tollgate::RateLimitLayer {
        tollgate::RateLimitLayer::with_store(cfg, self.store()).with_clock(clock.clone())
    }
}
