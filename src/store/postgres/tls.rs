//! TLS to the database (rustls), with libpq's meanings, so a connection string that works
//! with `psql` works here:
//!
//! - `sslmode=disable`: plain TCP.
//! - `sslmode=prefer` (the default) and `require`: TLS when the server offers it (`require`:
//!   only then), encrypting without checking the server's certificate, as libpq does without
//!   a root certificate. A local server with Debian's self-signed certificate keeps working.
//! - `--database-ca-file FILE`: TLS is required and the server's certificate must chain to a
//!   certificate in FILE and name the host (libpq's `verify-full`). Managed databases publish
//!   the file to use; `/etc/ssl/certs/ca-certificates.crt` covers those with public
//!   certificates.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
pub use tokio_postgres_rustls::MakeRustlsConnect;

use crate::store::StoreError;

fn refused(what: String, source: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Open {
        what,
        source: Box::new(source),
    }
}

/// The connector for every connection to the database.
pub fn connector(ca_file: Option<&Path>) -> Result<MakeRustlsConnect, StoreError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| refused("could not set up TLS for the database".to_owned(), e))?;
    let config = match ca_file {
        Some(path) => {
            let what = || format!("could not read --database-ca-file {}", path.display());
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| refused(what(), e))? {
                let cert = cert.map_err(|e| refused(what(), e))?;
                roots.add(cert).map_err(|e| refused(what(), e))?;
            }
            if roots.is_empty() {
                return Err(StoreError::Open {
                    what: what(),
                    source: "the file holds no PEM certificate".into(),
                });
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
            .with_no_client_auth(),
    };
    Ok(MakeRustlsConnect::new(config))
}

/// libpq's `prefer` and `require` without a root certificate: the handshake's signatures are
/// checked (the session is really encrypted to whoever holds the key), the certificate is not.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
