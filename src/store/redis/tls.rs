//! TLS for `rediss://` URLs (feature `redis-tls`): rustls with the ring provider, the
//! system's roots or a private CA (`[backend] tls_ca`), and an explicit, logged opt-out
//! of certificate checks (`tls_insecure`). Without the feature, `rediss://` is refused at
//! start-up (the config names `backend.url`), so these functions only pass URLs through.

use redis::cluster::ClusterClientBuilder;
use redis::{Client, ConnectionInfo, IntoConnectionInfo};

use super::conn::invalid;
use crate::store::StoreError;

/// Makes rustls usable (its process-wide provider, unless the application installed one)
/// and warns, once per store, when certificates are not checked.
pub(super) fn prepare(insecure: bool) {
    #[cfg(feature = "redis-tls")]
    {
        // An application's own provider (installed before the store is built) wins:
        // installing ours then fails, and the application's is used.
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            // rustls 0.23.48 deprecated ring's provider because ring has no post-quantum
            // key exchange. It is kept on purpose: it builds with nothing but a C
            // compiler. An application that wants post-quantum key exchange installs the
            // aws-lc-rs provider itself, and this line then never runs.
            #[allow(deprecated)]
            let provider = rustls::crypto::ring::default_provider();
            let _ = provider.install_default();
        }
    }
    if insecure {
        tracing::warn!(
            "tollgate: backend.tls_insecure = true: redis certificates are NOT checked; anyone on the network path can read and change rate-limit traffic"
        );
    }
}

/// `url` parsed, with certificate checks off when `insecure` and the URL is `rediss://`.
pub(super) fn connection_info(url: &str, insecure: bool) -> Result<ConnectionInfo, StoreError> {
    let info = url
        .trim()
        .into_connection_info()
        .map_err(|_| invalid("the redis URL is invalid"))?;
    #[cfg(feature = "redis-tls")]
    if insecure {
        if let redis::ConnectionAddr::TcpTls {
            host,
            port,
            tls_params,
            ..
        } = info.addr().clone()
        {
            return Ok(info.set_addr(redis::ConnectionAddr::TcpTls {
                host,
                port,
                insecure: true,
                tls_params,
            }));
        }
    }
    let _ = insecure;
    Ok(info)
}

/// A client that trusts the CAs in `pem` (and only those).
#[cfg(feature = "redis-tls")]
pub(super) fn client_with_ca(info: ConnectionInfo, pem: &[u8]) -> Result<Client, StoreError> {
    Client::build_with_tls(
        info,
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem.to_vec()),
        },
    )
    .map_err(|_| invalid("backend.tls_ca holds no usable certificate"))
}

/// Without TLS there is no CA to trust (the URL check refused `rediss://` already).
#[cfg(not(feature = "redis-tls"))]
pub(super) fn client_with_ca(info: ConnectionInfo, _pem: &[u8]) -> Result<Client, StoreError> {
    Client::open(info).map_err(|_| invalid("the redis URL is invalid"))
}

/// The cluster builder, with the CA and the insecure opt-out applied to TLS seeds.
pub(super) fn cluster(
    builder: ClusterClientBuilder,
    tls: bool,
    ca: Option<&[u8]>,
    insecure: bool,
) -> ClusterClientBuilder {
    #[cfg(feature = "redis-tls")]
    if tls {
        let mut builder = builder;
        if let Some(pem) = ca {
            builder = builder.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.to_vec()),
            });
        }
        if insecure {
            builder = builder.tls(redis::TlsMode::Insecure);
        }
        return builder;
    }
    let _ = (tls, ca, insecure);
    builder
}
