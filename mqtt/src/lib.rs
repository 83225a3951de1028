//! MQTT client settings shared by the gateway and the cloud worker, so both connect the same
//! way:
//!
//! - [`Tls`]: TLS to the broker through rustls (ring provider), verifying the broker against a
//!   CA file, and mutual TLS with a client certificate and key (PEM) when both are given. The
//!   files are read when the connection options are built, and any problem is an error that
//!   names the file.
//! - [`client`]: an `AsyncClient` whose sockets have `TCP_NODELAY` set. MQTT messages here are
//!   small and latency matters. With Nagle's algorithm a publish waits for the acknowledgement
//!   of the previous segment, which measured as 20–36 ms extra latency (`BENCHMARKS.md`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rumqttc::{AsyncClient, EventLoop, MqttOptions, NetworkOptions, TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

/// What can go wrong building a TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{what} {path}: {detail}")]
    File {
        /// Which file (CA, certificate, key).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// Only one of the client certificate and key was given.
    #[error("mutual TLS needs both a client certificate and its key")]
    HalfIdentity,
    /// rustls refused the configuration (for example a key that does not match).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// TLS settings of one connection. TLS is on when `ca_file` is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tls {
    /// PEM file of the CA certificates the broker's certificate must chain to.
    pub ca_file: Option<PathBuf>,
    /// PEM file of this client's certificate chain, for mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// PEM file of this client's private key (PKCS#8, PKCS#1 or SEC1), for mutual TLS.
    pub key_file: Option<PathBuf>,
}

impl Tls {
    /// TLS with a CA and, when both are `Some`, a client identity.
    pub fn new(ca: PathBuf, cert: Option<PathBuf>, key: Option<PathBuf>) -> Self {
        Tls {
            ca_file: Some(ca),
            cert_file: cert,
            key_file: key,
        }
    }

    /// Whether TLS is configured.
    pub fn enabled(&self) -> bool {
        self.ca_file.is_some()
    }

    /// Problems that can be seen without reading the files.
    pub fn check(&self) -> Result<(), TlsError> {
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(TlsError::HalfIdentity);
        }
        Ok(())
    }

    /// The rustls client configuration: the CA's roots, and the client identity if any.
    pub fn client_config(&self) -> Result<Option<rustls::ClientConfig>, TlsError> {
        let Some(ca) = &self.ca_file else {
            return Ok(None);
        };
        self.check()?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in read_certs(ca, "CA file")? {
            roots.add(cert).map_err(|e| TlsError::File {
                what: "CA file",
                path: ca.clone(),
                detail: e.to_string(),
            })?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let config = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                let chain = read_certs(cert, "client certificate")?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::File {
                    what: "client key",
                    path: key.clone(),
                    detail: e.to_string(),
                })?;
                builder.with_client_auth_cert(chain, key)?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(Some(config))
    }

    /// Sets the TLS transport on `options` when TLS is configured (else leaves plain TCP).
    pub fn apply(&self, options: &mut MqttOptions) -> Result<(), TlsError> {
        if let Some(config) = self.client_config()? {
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(config),
            )));
        }
        Ok(())
    }

    /// The paths made absolute against `base` (relative paths in a config file).
    pub fn resolved(&self, base: &Path) -> Tls {
        let r = |p: &Option<PathBuf>| p.as_ref().map(|p| base.join(p));
        Tls {
            ca_file: r(&self.ca_file),
            cert_file: r(&self.cert_file),
            key_file: r(&self.key_file),
        }
    }
}

fn read_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |detail: String| TlsError::File {
        what,
        path: path.to_path_buf(),
        detail,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("holds no PEM certificate".into()));
    }
    Ok(certs)
}

/// Socket options of every DiReDi connection: `TCP_NODELAY`.
pub fn network_options() -> NetworkOptions {
    let mut n = NetworkOptions::new();
    n.set_tcp_nodelay(true);
    n
}

/// A rumqttc client and event loop with [`network_options`].
pub fn client(options: MqttOptions, capacity: usize) -> (AsyncClient, EventLoop) {
    let (client, mut eventloop) = AsyncClient::new(options, capacity);
    eventloop.set_network_options(network_options());
    (client, eventloop)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn no_ca_means_plain_tcp() {
        let tls = Tls::default();
        assert!(!tls.enabled());
        assert!(tls.client_config().unwrap().is_none());
    }

    #[test]
    fn half_an_identity_and_missing_or_empty_files_are_errors_that_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let half = Tls::new(ca.clone(), Some(dir.path().join("c.pem")), None);
        assert!(matches!(half.check(), Err(TlsError::HalfIdentity)));
        let missing = Tls::new(ca.clone(), None, None);
        let e = missing.client_config().unwrap_err().to_string();
        assert!(e.contains("CA file") && e.contains("ca.pem"), "{e}");
        std::fs::write(&ca, b"not a certificate\n").unwrap();
        let e = missing.client_config().unwrap_err().to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
    }

    #[test]
    fn relative_paths_resolve_against_the_base() {
        let t = Tls::new(
            "ca.pem".into(),
            Some("/abs/c.pem".into()),
            Some("k.pem".into()),
        );
        let r = t.resolved(Path::new("/etc/diredi"));
        assert_eq!(r.ca_file.unwrap(), Path::new("/etc/diredi/ca.pem"));
        assert_eq!(r.cert_file.unwrap(), Path::new("/abs/c.pem"));
        assert_eq!(r.key_file.unwrap(), Path::new("/etc/diredi/k.pem"));
    }
}
