//! Identity of the federation: trust domain, SPIFFE-style IDs, the root CA that issues gateway and
//! workload certificates, and the verifier that checks a TLS peer's certificate and identity.
//!
//! Every certificate Strait issues carries exactly one URI SAN, a SPIFFE ID:
//!
//! - gateway of cluster `C`: `spiffe://TD/cluster/C/gateway`
//! - workload (Kubernetes service account `SA` in namespace `NS` of cluster `C`):
//!   `spiffe://TD/cluster/C/ns/NS/sa/SA`
//!
//! and the root CA carries the trust domain ID `spiffe://TD`, which is where the trust domain of a
//! CA is read from.
//!
//! A peer is accepted by [`PeerVerifier`] when its chain leads to the federation CA, its one SPIFFE
//! ID is in the federation's trust domain, it has the role the caller requires (gateway or
//! workload), and the caller's [`Authorizer`] accepts it. Host names play no part: see
//! [`PeerVerifier`] for why.

mod ca;
mod files;
mod inspect;
mod names;
mod tls;
mod verifier;

use std::path::PathBuf;

pub use ca::{
    CA_CERT_FILE, CA_KEY_FILE, CERT_FILE, CertificateAuthority, DEFAULT_CA_VALIDITY,
    DEFAULT_LEAF_VALIDITY, ExtraNames, IssuedCert, IssuedPaths, KEY_FILE, MAX_VALIDITY,
    NOT_BEFORE_BACKDATE,
};
pub use files::{TlsFiles, load_certs, load_private_key, load_roots};
pub use inspect::{CertInfo, CertRole, inspect_der, inspect_pem, inspect_pem_at};
pub use names::{
    Role, SPIFFE_SCHEME, SpiffeId, trust_domain_id, validate_name, validate_trust_domain,
};
pub use tls::{client_config, crypto_provider, server_config};
pub use verifier::{
    Authorizer, PeerRejected, PeerVerifier, allow_any, allow_clusters, handshake_failure,
    handshake_failure_reason, rejection_reason, spiffe_id_from_cert, tls_failure_reason,
};

/// Everything that can go wrong while creating, loading, issuing, inspecting or verifying
/// certificates. The messages are meant for operators: each says what was wrong and with what.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// A trust domain, cluster, namespace or service account name is not acceptable.
    #[error("invalid {field} `{value}`: {reason}")]
    InvalidName {
        /// Which name: `trust domain`, `cluster`, `namespace` or `service account`.
        field: &'static str,
        /// The rejected value.
        value: String,
        /// Why it was rejected.
        reason: String,
    },

    /// A string is not a Strait SPIFFE ID.
    #[error("malformed SPIFFE ID `{id}`: {reason}")]
    MalformedId {
        /// The rejected string.
        id: String,
        /// Why it was rejected.
        reason: String,
    },

    /// Reading or writing a file failed.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error (in the message, so not also a `source()`).
        error: std::io::Error,
    },

    /// A file could be read but its content is not what it should be (PEM, key, certificate).
    #[error("{}: {reason}", path.display())]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// `init` would overwrite an existing CA.
    #[error(
        "refusing to overwrite the existing CA file {}; pass --force to replace the CA \
         (every certificate it issued will stop verifying)",
        path.display()
    )]
    CaExists {
        /// The existing file.
        path: PathBuf,
    },

    /// The CA certificate or key is unusable.
    #[error("invalid CA: {0}")]
    InvalidCa(String),

    /// The requested validity period is unusable.
    #[error("invalid validity: {0}")]
    InvalidValidity(String),

    /// An identity of another trust domain was asked of a CA.
    #[error("cannot issue {id}: the CA belongs to trust domain `{ca_trust_domain}`")]
    ForeignTrustDomain {
        /// The requested identity.
        id: Box<SpiffeId>,
        /// The trust domain of the CA.
        ca_trust_domain: String,
    },

    /// Key generation or certificate signing failed.
    #[error("certificate generation failed: {0}")]
    Generate(String),

    /// A certificate could not be parsed.
    #[error("malformed certificate: {0}")]
    BadCertificate(String),

    /// The chain does not lead to the federation CA.
    #[error("certificate is not signed by the federation CA")]
    NotSignedByCa,

    /// The certificate has expired.
    #[error("certificate expired at {not_after} (verification time {now})")]
    Expired {
        /// RFC 3339 end of validity.
        not_after: String,
        /// RFC 3339 verification time.
        now: String,
    },

    /// The certificate is not valid yet.
    #[error("certificate is not valid before {not_before} (verification time {now})")]
    NotYetValid {
        /// RFC 3339 start of validity.
        not_before: String,
        /// RFC 3339 verification time.
        now: String,
    },

    /// Any other reason the chain was rejected.
    #[error("certificate chain rejected: {0}")]
    Chain(String),

    /// The certificate has no URI SAN, so no identity.
    #[error("certificate carries no SPIFFE ID (it has no URI subject alternative name)")]
    NoSpiffeId,

    /// The certificate has several URI SANs; an identity must be unambiguous.
    #[error(
        "certificate carries {count} URI subject alternative names; exactly one SPIFFE ID is required"
    )]
    AmbiguousSpiffeId {
        /// How many URI SANs it has.
        count: usize,
    },

    /// The peer's identity is in another trust domain.
    #[error(
        "peer identity {id} is in trust domain `{found}`; trust domain `{expected}` is required"
    )]
    WrongTrustDomain {
        /// The peer's identity.
        id: Box<SpiffeId>,
        /// The federation's trust domain.
        expected: String,
        /// The peer's trust domain.
        found: String,
    },

    /// The peer has the wrong role.
    #[error("peer presented a {found} identity {id}; a {expected} identity is required")]
    WrongRole {
        /// The peer's identity.
        id: Box<SpiffeId>,
        /// The role the verifier requires.
        expected: Role,
        /// The peer's role.
        found: Role,
    },

    /// The authorizer refused the peer.
    #[error("peer {id} is not authorized: {reason}")]
    NotAuthorized {
        /// The peer's identity.
        id: Box<SpiffeId>,
        /// The authorizer's reason.
        reason: String,
    },

    /// Building a rustls configuration failed.
    #[error("TLS configuration: {0}")]
    Tls(rustls::Error),
}

impl IdentityError {
    /// The metric label (`reason`) of this error when it refused a peer: a short, stable,
    /// bounded set (`unknown_ca`, `expired`, `not_yet_valid`, `bad_certificate`, `bad_identity`,
    /// `wrong_trust_domain`, `wrong_role`, `not_authorized`, `other`).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotSignedByCa => "unknown_ca",
            Self::Expired { .. } => "expired",
            Self::NotYetValid { .. } => "not_yet_valid",
            Self::BadCertificate(_) | Self::Chain(_) => "bad_certificate",
            Self::NoSpiffeId | Self::AmbiguousSpiffeId { .. } | Self::MalformedId { .. } => {
                "bad_identity"
            }
            Self::WrongTrustDomain { .. } => "wrong_trust_domain",
            Self::WrongRole { .. } => "wrong_role",
            Self::NotAuthorized { .. } => "not_authorized",
            Self::InvalidName { .. }
            | Self::Io { .. }
            | Self::BadFile { .. }
            | Self::CaExists { .. }
            | Self::InvalidCa(_)
            | Self::InvalidValidity(_)
            | Self::ForeignTrustDomain { .. }
            | Self::Generate(_)
            | Self::Tls(_) => "other",
        }
    }
}

impl From<rustls::Error> for IdentityError {
    fn from(error: rustls::Error) -> Self {
        IdentityError::Tls(error)
    }
}
