//! `[backend]`: where counters live and how Redis is reached, checked at start-up (a URL
//! this build cannot serve, a CA file that is missing or not PEM, settings out of range).

use std::time::Duration;

use super::super::check::Check;
use super::super::model::{BackendConfig, BackendKind, Fallback, TlsCa};
use super::super::schema::{Loose, RawBackend};
use super::super::settings;

/// The `[backend]` section.
pub(super) fn backend(c: &mut Check, b: &RawBackend) -> BackendConfig {
    let kind: BackendKind = c.choice("backend.kind", &b.kind);
    let url = c.text("backend.url", &b.url).map(|u| u.trim().to_owned());
    let urls = c.strings("backend.urls", &b.urls);
    let tls_ca_path = c.text("backend.tls_ca", &b.tls_ca).map(str::trim);
    let tls_insecure = c.flag("backend.tls_insecure", &b.tls_insecure);
    let tls_ca = tls_ca_path.and_then(|path| ca_file(c, "backend.tls_ca", path));
    let urls_written = b.urls.as_ref().map(|u| match u {
        Loose::Ok(items) => items.len(),
        Loose::Found(_) => 1,
    });
    redis_target(c, kind, url.as_deref(), &urls, urls_written);
    let tls = match kind {
        BackendKind::Redis => url.as_deref().is_some_and(is_tls_url),
        BackendKind::RedisCluster => urls.iter().any(|u| is_tls_url(u)),
        BackendKind::Memory => false,
    };
    if kind != BackendKind::Memory && !tls {
        if tls_ca_path.is_some() {
            c.err.push("backend.tls_ca", "only for rediss:// URLs");
        }
        if tls_insecure {
            c.err
                .push("backend.tls_insecure", "only for rediss:// URLs");
        }
    }
    if tls_ca_path.is_some() && tls_insecure {
        c.err.push(
            "backend.tls_insecure",
            "checks no certificate, so backend.tls_ca would be ignored: set one or the other",
        );
    }
    let key_prefix = c
        .text("backend.key_prefix", &b.key_prefix)
        .map_or(settings::KEY_PREFIX, |p| p)
        .to_owned();
    if key_prefix.is_empty()
        || key_prefix.len() > settings::KEY_PREFIX_MAX_LEN
        || !key_prefix
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'{' | b'}'))
    {
        c.err.push(
            "backend.key_prefix",
            format!(
                "must be 1 to {} printable ASCII characters without spaces, '{{' or '}}'",
                settings::KEY_PREFIX_MAX_LEN
            ),
        );
    }
    BackendConfig {
        kind,
        url,
        urls,
        tls_ca,
        tls_insecure,
        key_prefix,
        pool_size: c.int(&settings::POOL_SIZE, &b.pool_size) as u32,
        timeout: Duration::from_millis(c.int(&settings::TIMEOUT_MS, &b.timeout_ms)),
        fallback: c.choice::<Fallback>("backend.fallback", &b.fallback),
        max_keys: c.int(&settings::MAX_KEYS, &b.max_keys) as usize,
        deny_cache: c.int(&settings::DENY_CACHE, &b.deny_cache) as usize,
        max_batch: c.int(&settings::MAX_BATCH, &b.max_batch) as usize,
    }
}

fn is_tls_url(url: &str) -> bool {
    url.starts_with("rediss://")
}

/// Reads a CA file at start-up, so a missing or wrong file is reported here.
fn ca_file(c: &mut Check, field: &str, path: &str) -> Option<TlsCa> {
    match std::fs::read(path) {
        Ok(pem) if pem_has_certificates(&pem) => Some(TlsCa {
            path: path.to_owned(),
            pem,
        }),
        Ok(_) => {
            c.err
                .push(field, format!("{path:?} holds no PEM certificate"));
            None
        }
        Err(e) => {
            c.err
                .push(field, format!("cannot read {path:?}: {}", e.kind()));
            None
        }
    }
}

/// Where Redis is: `url` for one server, `urls` for a cluster; each URL one this
/// build can serve.
fn redis_target(
    c: &mut Check,
    kind: BackendKind,
    url: Option<&str>,
    urls: &[String],
    urls_written: Option<usize>,
) {
    let cluster = kind == BackendKind::RedisCluster;
    match kind {
        BackendKind::Memory => {}
        BackendKind::Redis => {
            match url {
                None => c
                    .err
                    .push("backend.url", "required when backend.kind = \"redis\""),
                Some(u) => redis_url(c, "backend.url", u, false),
            }
            if !urls.is_empty() {
                c.err.push(
                    "backend.urls",
                    "only for backend.kind = \"redis_cluster\"; one server takes backend.url",
                );
            }
        }
        BackendKind::RedisCluster => {
            if url.is_some() {
                c.err.push(
                    "backend.url",
                    "a cluster takes its seed nodes in backend.urls = [\"redis://host:port\", ...]",
                );
            }
            match urls_written {
                None => c.err.push(
                    "backend.urls",
                    "required when backend.kind = \"redis_cluster\": the URLs of one or more of its nodes",
                ),
                Some(0) => c
                    .err
                    .push("backend.urls", "must name at least one node of the cluster"),
                Some(_) => {}
            }
            for (i, u) in urls.iter().enumerate() {
                redis_url(c, &format!("backend.urls[{i}]"), u, true);
            }
            if urls.iter().any(|u| is_tls_url(u)) && !urls.iter().all(|u| is_tls_url(u)) {
                c.err.push(
                    "backend.urls",
                    "mixes rediss:// and redis://: a cluster speaks TLS on every node or on none",
                );
            }
        }
    }
    if kind != BackendKind::Memory && !cfg!(feature = "redis") {
        c.err.push(
            "backend.kind",
            format!(
                "{:?} needs tollgate built with its `redis` feature",
                if cluster { "redis_cluster" } else { "redis" }
            ),
        );
    }
}

fn redis_url(c: &mut Check, field: &str, url: &str, cluster: bool) {
    if !["redis://", "rediss://", "unix://", "redis+unix://"]
        .iter()
        .any(|s| url.starts_with(s))
    {
        c.err.push(
            field,
            "must start with redis://, rediss://, unix:// or redis+unix://",
        );
        return;
    }
    if let Err(problem) = check_url(url, cluster) {
        c.err.push(field, problem);
    }
}

/// Whether this build (and this kind of store) can serve `url`; if not, why, in words for
/// `backend.url` or an entry of `backend.urls`. The Redis store checks the URLs it is
/// built with here too.
pub(crate) fn check_url(url: &str, cluster: bool) -> Result<(), &'static str> {
    let url = url.trim();
    if url.starts_with("rediss://") && !cfg!(feature = "redis-tls") {
        return Err("rediss:// needs tollgate built with its `redis-tls` feature");
    }
    if cluster && !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err("a redis cluster is reached by redis:// or rediss:// URLs");
    }
    #[cfg(feature = "redis")]
    {
        use redis::IntoConnectionInfo;
        if url.into_connection_info().is_err() {
            return Err("the redis URL is invalid");
        }
    }
    Ok(())
}

/// Whether `pem` holds at least one certificate and nothing unreadable (checked at
/// start-up, so a wrong `tls_ca` file is a config error, not a store that never
/// connects).
#[cfg(feature = "redis-tls")]
pub(crate) fn pem_has_certificates(pem: &[u8]) -> bool {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut any = false;
    for cert in CertificateDer::pem_slice_iter(pem) {
        if cert.is_err() {
            return false;
        }
        any = true;
    }
    any
}

/// Without TLS a CA is never used (`rediss://` is refused), but a file that is not PEM is
/// still reported.
#[cfg(not(feature = "redis-tls"))]
pub(crate) fn pem_has_certificates(pem: &[u8]) -> bool {
    pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----")
}
