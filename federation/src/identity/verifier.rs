//! The peer verifier: chain to the federation CA, then the SPIFFE identity, role and
//! authorization of the peer.

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::files::{load_certs, roots_from};
use super::inspect::{format_unix, parse, single_uri_san};
use super::names::{parse_trust_domain_id, validate_trust_domain};
use super::tls::crypto_provider;
use super::{IdentityError, Role, SpiffeId};

/// Decides whether an authenticated peer may talk to us, e.g. "its cluster is a member of the
/// federation" or "it is the gateway of the cluster we dialled". `Err` carries the reason, which
/// ends up in the rejection error and the logs.
pub type Authorizer = Arc<dyn Fn(&SpiffeId) -> Result<(), String> + Send + Sync>;

/// An authorizer that accepts every authenticated peer of the right role and trust domain.
pub fn allow_any() -> Authorizer {
    Arc::new(|_| Ok(()))
}

/// An authorizer that accepts peers of the given clusters only.
pub fn allow_clusters<I, S>(clusters: I) -> Authorizer
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let clusters: BTreeSet<String> = clusters.into_iter().map(Into::into).collect();
    Arc::new(move |id: &SpiffeId| {
        if clusters.contains(id.cluster()) {
            Ok(())
        } else {
            Err(format!(
                "cluster `{}` is not a member of the federation",
                id.cluster()
            ))
        }
    })
}

/// The error a [`PeerVerifier`] hands to rustls when a certificate verified against the CA but
/// its identity was refused. It travels inside
/// `rustls::Error::InvalidCertificate(CertificateError::Other(..))`; get it back with
/// [`rejection_reason`]. Its `Debug` is its message, so that rustls' error text reads well.
pub struct PeerRejected(pub IdentityError);

impl fmt::Debug for PeerRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Display for PeerRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

// No `source()`: the message already is the inner error's; `.0` or [`rejection_reason`] give it.
impl std::error::Error for PeerRejected {}

/// The identity error inside a rustls error produced by a [`PeerVerifier`], if that is what it
/// is.
pub fn rejection_reason(err: &rustls::Error) -> Option<&IdentityError> {
    match err {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => inner
            .downcast_ref::<PeerRejected>()
            .map(|rejected| &rejected.0),
        _ => None,
    }
}

/// The metric label (`reason`) of a failed TLS handshake, from the typed error: the
/// [`PeerVerifier`]'s reason when it refused the peer ([`IdentityError::reason`]), else rustls'
/// own (`no_certificate`, `rejected_by_peer` when the peer sent an alert, `tls` for the rest).
pub fn tls_failure_reason(err: &rustls::Error) -> &'static str {
    if let Some(rejected) = rejection_reason(err) {
        return rejected.reason();
    }
    match err {
        rustls::Error::NoCertificatesPresented => "no_certificate",
        rustls::Error::InvalidCertificate(e) => match e {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            // A certificate of another CA with the same issuer name fails its signature check.
            CertificateError::UnknownIssuer | CertificateError::BadSignature => "unknown_ca",
            _ => "bad_certificate",
        },
        rustls::Error::AlertReceived(_) => "rejected_by_peer",
        _ => "tls",
    }
}

/// The metric label (`reason`) of a failed tokio-rustls handshake: [`tls_failure_reason`] of the
/// rustls error inside, `io` when the connection failed below TLS.
pub fn handshake_failure_reason(err: &std::io::Error) -> &'static str {
    err.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .map_or("io", tls_failure_reason)
}

/// Why a TLS handshake (a tokio-rustls I/O error) failed: the [`PeerVerifier`]'s reason when it
/// refused the peer, else the error itself.
pub fn handshake_failure(err: &std::io::Error) -> String {
    err.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(rejection_reason)
        .map_or_else(|| err.to_string(), ToString::to_string)
}

fn reject(error: IdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(PeerRejected(
        error,
    )))))
}

/// Reads the SPIFFE ID of a certificate without verifying anything: for a peer certificate that a
/// [`PeerVerifier`] already accepted during the handshake (`peer_certificates()[0]`).
pub fn spiffe_id_from_cert(cert: &CertificateDer<'_>) -> Result<SpiffeId, IdentityError> {
    let x509 = parse(cert)?;
    single_uri_san(&x509)?.parse()
}

#[derive(Debug, Clone, Copy)]
enum Usage {
    /// The peer is a TLS client: the certificate must allow clientAuth.
    Client,
    /// The peer is a TLS server: the certificate must allow serverAuth.
    Server,
}

/// Verifies TLS peers of the federation, on either side of a connection.
///
/// A peer is accepted when, in this order:
///
/// 1. its chain leads to the federation CA and every certificate is within its validity
///    (webpki, with the signature algorithms of the aws-lc-rs provider); the leaf must allow
///    clientAuth when the peer is a client and serverAuth when it is a server;
/// 2. its leaf carries exactly one URI SAN, and that is a Strait SPIFFE ID;
/// 3. the ID is in the federation's trust domain;
/// 4. the ID has the required [`Role`];
/// 5. the [`Authorizer`] accepts it.
///
/// As a [`ServerCertVerifier`] it ignores the server name the client dialled: Strait
/// certificates carry no DNS names, and "which host is this" is the wrong question between
/// gateways that find each other through the registry by address. The question that matters is
/// "is this the gateway of a cluster we federate with", which steps 2 to 5 answer. Callers still
/// have to give rustls a syntactically valid `ServerName` (the peer cluster's name is a good
/// choice: it is a DNS label); to pin the dialled cluster, use an authorizer that accepts only
/// that cluster.
///
/// As a [`ClientCertVerifier`] it makes client authentication mandatory.
pub struct PeerVerifier {
    trust_domain: String,
    role: Role,
    /// A second role accepted as well (the authorizer then decides on each).
    also: Option<Role>,
    authorizer: Authorizer,
    roots: Arc<RootCertStore>,
    client_verifier: Arc<dyn ClientCertVerifier>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for PeerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerVerifier")
            .field("trust_domain", &self.trust_domain)
            .field("role", &self.role)
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

impl PeerVerifier {
    /// A verifier trusting the CA certificates `ca_certs` (normally the one federation CA), for
    /// peers of `role` that `authorizer` accepts. The trust domain is read from the CA
    /// certificates' `spiffe://TD` URI SANs, which must all agree.
    pub fn new(
        ca_certs: &[CertificateDer<'_>],
        role: Role,
        authorizer: Authorizer,
    ) -> Result<Self, IdentityError> {
        let mut trust_domains = BTreeSet::new();
        for (i, cert) in ca_certs.iter().enumerate() {
            let x509 = parse(cert)?;
            let uri = single_uri_san(&x509)
                .map_err(|e| IdentityError::InvalidCa(format!("CA certificate #{}: {e}", i + 1)))?;
            let td = parse_trust_domain_id(uri)
                .map_err(|e| IdentityError::InvalidCa(format!("CA certificate #{}: {e}", i + 1)))?;
            trust_domains.insert(td);
        }
        let mut iter = trust_domains.into_iter();
        let (Some(trust_domain), None) = (iter.next(), iter.next()) else {
            return Err(IdentityError::InvalidCa(
                "the CA certificates must name exactly one trust domain between them".into(),
            ));
        };
        Self::with_trust_domain(&trust_domain, ca_certs, role, authorizer)
    }

    /// Like [`PeerVerifier::new`] with the CA certificates of a PEM file (e.g. `ca.pem`).
    pub fn from_ca_file(
        path: impl AsRef<Path>,
        role: Role,
        authorizer: Authorizer,
    ) -> Result<Self, IdentityError> {
        let certs = load_certs(path.as_ref())?;
        Self::new(&certs, role, authorizer)
    }

    /// A verifier for trust domain `trust_domain`, trusting `ca_certs` whatever their SANs say.
    pub fn with_trust_domain(
        trust_domain: &str,
        ca_certs: &[CertificateDer<'_>],
        role: Role,
        authorizer: Authorizer,
    ) -> Result<Self, IdentityError> {
        validate_trust_domain(trust_domain)?;
        let roots = Arc::new(roots_from(
            Path::new("CA certificates"),
            ca_certs.iter().map(|c| c.clone().into_owned()),
        )?);
        let provider = crypto_provider();
        let algorithms = provider.signature_verification_algorithms;
        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider)
            .build()
            .map_err(|e| IdentityError::InvalidCa(e.to_string()))?;
        Ok(PeerVerifier {
            trust_domain: trust_domain.to_owned(),
            role,
            also: None,
            authorizer,
            roots,
            client_verifier,
            algorithms,
        })
    }

    /// Accept peers of `role` too (e.g. a sidecar's inbound listener accepting its own
    /// cluster's gateway besides workloads); the authorizer sees both kinds.
    pub fn also_accepting(mut self, role: Role) -> Self {
        self.also = Some(role);
        self
    }

    /// The trust domain peers must belong to.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The role peers must have.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Verifies a peer's chain (`end_entity` then `intermediates`, as sent in TLS) at `now` and
    /// returns its identity. The leaf must be valid for both TLS client and server
    /// authentication, as every Strait certificate is.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<SpiffeId, IdentityError> {
        for usage in [Usage::Client, Usage::Server] {
            self.verify_chain(end_entity, intermediates, now, usage)
                .map_err(|e| chain_error(e, now))?;
        }
        self.verify_identity(end_entity)
    }

    fn verify_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: Usage,
    ) -> Result<(), rustls::Error> {
        match usage {
            Usage::Client => self
                .client_verifier
                .verify_client_cert(end_entity, intermediates, now)
                .map(|_| ()),
            Usage::Server => {
                let cert = ParsedCertificate::try_from(end_entity)?;
                verify_server_cert_signed_by_trust_anchor(
                    &cert,
                    &self.roots,
                    intermediates,
                    now,
                    self.algorithms.all,
                )
            }
        }
    }

    fn verify_identity(&self, end_entity: &CertificateDer<'_>) -> Result<SpiffeId, IdentityError> {
        let id = spiffe_id_from_cert(end_entity)?;
        if id.trust_domain() != self.trust_domain {
            return Err(IdentityError::WrongTrustDomain {
                expected: self.trust_domain.clone(),
                found: id.trust_domain().to_owned(),
                id: Box::new(id),
            });
        }
        if id.role() != self.role && Some(id.role()) != self.also {
            return Err(IdentityError::WrongRole {
                expected: self.role,
                found: id.role(),
                id: Box::new(id),
            });
        }
        if let Err(reason) = (self.authorizer)(&id) {
            return Err(IdentityError::NotAuthorized {
                id: Box::new(id),
                reason,
            });
        }
        Ok(id)
    }

    fn verify_peer(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: Usage,
    ) -> Result<(), rustls::Error> {
        if let Err(e) = self.verify_chain(end_entity, intermediates, now, usage) {
            tracing::debug!(error = %e, ?usage, "peer certificate chain rejected");
            return Err(e);
        }
        match self.verify_identity(end_entity) {
            Ok(id) => {
                tracing::debug!(peer = %id, ?usage, "peer identity verified");
                Ok(())
            }
            Err(e) => {
                tracing::debug!(error = %e, ?usage, "peer identity rejected");
                Err(reject(e))
            }
        }
    }
}

/// Turns a chain verification error into the operator-facing error.
fn chain_error(err: rustls::Error, now: UnixTime) -> IdentityError {
    let now_text = || format_unix(secs(now));
    match err {
        rustls::Error::InvalidCertificate(cert_err) => match cert_err {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                IdentityError::NotSignedByCa
            }
            CertificateError::ExpiredContext { time, not_after } => IdentityError::Expired {
                not_after: format_unix(secs(not_after)),
                now: format_unix(secs(time)),
            },
            CertificateError::Expired => IdentityError::Expired {
                not_after: "(unknown)".into(),
                now: now_text(),
            },
            CertificateError::NotValidYetContext { time, not_before } => {
                IdentityError::NotYetValid {
                    not_before: format_unix(secs(not_before)),
                    now: format_unix(secs(time)),
                }
            }
            CertificateError::NotValidYet => IdentityError::NotYetValid {
                not_before: "(unknown)".into(),
                now: now_text(),
            },
            CertificateError::BadEncoding => {
                IdentityError::BadCertificate("the certificate is not valid DER".into())
            }
            other => IdentityError::Chain(rustls::Error::InvalidCertificate(other).to_string()),
        },
        other => IdentityError::Chain(other.to_string()),
    }
}

fn secs(t: UnixTime) -> i64 {
    i64::try_from(t.as_secs()).unwrap_or(i64::MAX)
}

impl ClientCertVerifier for PeerVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.client_verifier.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify_peer(end_entity, intermediates, now, Usage::Client)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The server name is deliberately not checked: the SPIFFE identity is (see the type's
        // documentation).
        self.verify_peer(end_entity, intermediates, now, Usage::Server)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
