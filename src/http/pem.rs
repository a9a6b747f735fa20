//! PEM files: CA bundles for the upstream, the Kubernetes API server and client certificates.

use std::path::{Path, PathBuf};

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// A CA bundle that cannot be used; the message names the file.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    /// The file cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The bundle.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// The file is not PEM.
    #[error("{} is not a PEM certificate bundle: {source}", path.display())]
    NotPem {
        /// The bundle.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// The file holds no certificate.
    #[error("{} contains no PEM certificates", path.display())]
    Empty {
        /// The bundle.
        path: PathBuf,
    },
    /// A certificate in it is not a usable trust anchor.
    #[error("{}: {source}", path.display())]
    Certificate {
        /// The bundle.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::Error,
    },
}

/// Reads a PEM bundle of CA certificates.
pub fn read_pem_roots(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|source| PemError::Read {
            path: path.to_path_buf(),
            source,
        })?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| PemError::NotPem {
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(PemError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Adds the certificates of a PEM bundle to `roots`; errors name the file.
pub fn add_pem_roots(roots: &mut RootCertStore, path: &Path) -> Result<(), PemError> {
    for cert in read_pem_roots(path)? {
        roots.add(cert).map_err(|source| PemError::Certificate {
            path: path.to_path_buf(),
            source,
        })?;
    }
    Ok(())
}

/// A TLS client configuration (ring, safe default protocol versions) trusting `roots` only.
pub fn client_config(roots: RootCertStore) -> Result<rustls::ClientConfig, rustls::Error> {
    Ok(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}
