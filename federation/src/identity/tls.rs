//! Mutual-TLS configurations built around a [`super::PeerVerifier`] (or a verifier made of
//! several).

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use rustls::client::danger::ServerCertVerifier;
use rustls::server::danger::ClientCertVerifier;

use super::IdentityError;

/// The crypto provider of every Strait TLS configuration: aws-lc-rs, named explicitly so that
/// no process-wide default is needed.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A TLS 1.3 server configuration presenting `cert_chain`/`key` and requiring a client
/// certificate that `verifier` accepts. ALPN is left to the caller.
pub fn server_config(
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    verifier: Arc<dyn ClientCertVerifier>,
) -> Result<ServerConfig, IdentityError> {
    Ok(ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert_chain, key)?)
}

/// A TLS 1.3 client configuration presenting `cert_chain`/`key` and accepting a server that
/// `verifier` accepts (whatever server name is dialled). ALPN is left to the caller.
pub fn client_config(
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    verifier: Arc<dyn ServerCertVerifier>,
) -> Result<ClientConfig, IdentityError> {
    Ok(ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(cert_chain, key)?)
}
