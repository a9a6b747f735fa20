//! PEM files: CA bundles for the upstream, the Kubernetes API server and client certificates.

use std::path::Path;

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// Reads a PEM bundle of CA certificates.
pub fn read_pem_roots(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not a PEM certificate bundle: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} contains no PEM certificates", path.display()));
    }
    Ok(certs)
}

/// Adds the certificates of a PEM bundle to `roots`; errors name the file.
pub fn add_pem_roots(roots: &mut RootCertStore, path: &Path) -> Result<(), String> {
    for cert in read_pem_roots(path)? {
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}
