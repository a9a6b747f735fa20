//! TLS on the proxy listener: the certificate and key (re-read when cert-manager rotates them)
//! and, with `server.tls.client_ca_file`, client certificates (mTLS).
//!
//! Client certificates are requested but not required, so that clients without one can still
//! authenticate with a bearer credential; a certificate that *is* presented must chain to the
//! client CA and be within its validity period, or the handshake fails.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// The listener's TLS configuration, kept current.
#[derive(Debug)]
pub struct ServerTls {
    config: TlsConfig,
    current: ArcSwap<ServerConfig>,
    last: Mutex<Vec<u8>>,
    /// The serving certificate's notAfter, seconds since the epoch.
    not_after: AtomicI64,
}

impl ServerTls {
    /// Loads the files; at start a problem is an error naming the key.
    pub fn load(config: &TlsConfig) -> Result<Arc<Self>, TlsSetupError> {
        let (bytes, server, not_after) = build(config)?;
        Ok(Arc::new(Self {
            config: config.clone(),
            current: ArcSwap::from_pointee(server),
            last: Mutex::new(bytes),
            not_after: AtomicI64::new(not_after),
        }))
    }

    /// An acceptor with the configuration in force now.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load_full())
    }

    /// When the certificate in use expires, seconds since the epoch (for an expiry alert).
    pub fn not_after(&self) -> i64 {
        self.not_after.load(Ordering::Relaxed)
    }

    /// Whether client certificates identify clients.
    pub fn mtls(&self) -> bool {
        self.config.client_ca_file.is_some()
    }

    /// Starts watching the files.
    pub fn spawn_watcher(self: &Arc<Self>) {
        let mut paths = vec![self.config.cert_file.clone(), self.config.key_file.clone()];
        paths.extend(self.config.client_ca_file.clone());
        crate::secrets::watch::spawn(&paths, Arc::downgrade(self), None);
    }
}

impl crate::secrets::watch::Reload for ServerTls {
    fn reload(&self) {
        let Ok(bytes) = read_all(&self.config) else {
            return;
        };
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if *last == bytes {
            return;
        }
        match build(&self.config) {
            Ok((bytes, server, not_after)) => {
                self.current.store(Arc::new(server));
                self.not_after.store(not_after, Ordering::Relaxed);
                *last = bytes;
                tracing::info!(cert = %self.config.cert_file.display(), "TLS certificate reloaded");
            }
            // A half-written rotation: keep serving the old certificate, try again on the next
            // event or poll.
            Err(e) => tracing::warn!(error = %e, "TLS files changed but cannot be loaded yet"),
        }
    }
}

fn read_all(config: &TlsConfig) -> std::io::Result<Vec<u8>> {
    let mut bytes = std::fs::read(&config.cert_file)?;
    bytes.extend(std::fs::read(&config.key_file)?);
    if let Some(ca) = &config.client_ca_file {
        bytes.extend(std::fs::read(ca)?);
    }
    Ok(bytes)
}

/// The listener's TLS files cannot be used; the message names the key.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A file cannot be read.
    #[error("server.tls: {0}")]
    Read(#[source] std::io::Error),
    /// The certificate file holds no usable certificate.
    #[error("server.tls.cert_file: {}: {reason}", path.display())]
    Certificate {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        reason: String,
    },
    /// The key file holds no usable key.
    #[error("server.tls.key_file: {}: {source}", path.display())]
    Key {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// The client CA bundle is unusable.
    #[error("server.tls.client_ca_file: {0}")]
    ClientCa(#[source] crate::http::pem::PemError),
    /// rustls refused the client CA bundle.
    #[error("server.tls.client_ca_file: {0}")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    /// rustls refused the configuration.
    #[error("server.tls: {0}")]
    Rustls(#[source] rustls::Error),
    /// The key is not the certificate's.
    #[error("server.tls.key_file: does not match the certificate: {0}")]
    Mismatch(#[source] rustls::Error),
}

fn build(config: &TlsConfig) -> Result<(Vec<u8>, ServerConfig, i64), TlsSetupError> {
    let bytes = read_all(config).map_err(TlsSetupError::Read)?;
    let certificate = |reason: String| TlsSetupError::Certificate {
        path: config.cert_file.clone(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(&config.cert_file)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| certificate(e.to_string()))?;
    if certs.is_empty() {
        return Err(certificate("holds no PEM certificate".into()));
    }
    let not_after = {
        use x509_parser::prelude::{FromDer, X509Certificate};
        X509Certificate::from_der(&certs[0])
            .map(|(_, c)| c.validity().not_after.timestamp())
            .map_err(|e| certificate(e.to_string()))?
    };
    let key =
        PrivateKeyDer::from_pem_file(&config.key_file).map_err(|source| TlsSetupError::Key {
            path: config.key_file.clone(),
            source,
        })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsSetupError::Rustls)?;
    let builder = match &config.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            crate::http::pem::add_pem_roots(&mut roots, ca).map_err(TlsSetupError::ClientCa)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(TlsSetupError::Verifier)?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server = builder
        .with_single_cert(certs, key)
        .map_err(TlsSetupError::Mismatch)?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((bytes, server, not_after))
}
