//! The federation root CA: creating, storing, loading, and issuing gateway and workload
//! certificates.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::string::{Ia5String, PrintableString};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use x509_parser::asn1_rs::Tag;
use x509_parser::extensions::ParsedExtension;
use x509_parser::x509::X509Name;

use super::files::{
    CERT_MODE, KEY_MODE, certs_from_pem, ensure_dir, read_text, warn_if_key_exposed, write_atomic,
};
use super::inspect::{format_datetime, parse, single_uri_san, unix_seconds};
use super::names::{parse_trust_domain_id, trust_domain_id, validate_trust_domain};
use super::{IdentityError, SpiffeId};

/// The CA certificate file of a CA directory (also copied next to every issued certificate).
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA private key file of a CA directory (mode 0600).
pub const CA_KEY_FILE: &str = "ca.key";
/// The certificate chain file of an issued identity: the leaf, then the CA certificate.
pub const CERT_FILE: &str = "cert.pem";
/// The private key file of an issued identity (mode 0600).
pub const KEY_FILE: &str = "key.pem";

const HOUR: u64 = 3600;
/// Default validity of the root CA: 10 years (87600h).
pub const DEFAULT_CA_VALIDITY: Duration = Duration::from_secs(87_600 * HOUR);
/// Default validity of gateway and workload certificates: 24h.
pub const DEFAULT_LEAF_VALIDITY: Duration = Duration::from_secs(24 * HOUR);
/// The longest validity accepted for any certificate: 100 years.
pub const MAX_VALIDITY: Duration = Duration::from_secs(876_000 * HOUR);
/// How far before "now" a new certificate's validity starts, so that peers whose clocks are a
/// little behind accept it at once.
pub const NOT_BEFORE_BACKDATE: Duration = Duration::from_secs(5 * 60);

const CA_COMMON_NAME: &str = "Strait federation CA";
const ORGANIZATION: &str = "Strait";
/// Longest value allowed in a subject attribute (X.520 upper bound for common names).
const MAX_DN_VALUE_LEN: usize = 64;

fn generate_error(e: rcgen::Error) -> IdentityError {
    IdentityError::Generate(e.to_string())
}

/// The federation's root certificate authority: its certificate and signing key.
pub struct CertificateAuthority {
    trust_domain: String,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    subject_raw: Vec<u8>,
    not_after: OffsetDateTime,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &format_datetime(self.not_after))
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Creates a new self-signed root CA for `trust_domain`, valid from now (less
    /// [`NOT_BEFORE_BACKDATE`]) for `validity`. Its key is ECDSA P-256; it carries the URI SAN
    /// `spiffe://<trust_domain>` and may sign only end-entity certificates (path length 0).
    pub fn init(trust_domain: &str, validity: Duration) -> Result<Self, IdentityError> {
        validate_trust_domain(trust_domain)?;
        let now = SystemTime::now();
        let not_before = to_datetime(now.checked_sub(NOT_BEFORE_BACKDATE).unwrap_or(now))?;
        let not_after = to_datetime(end_of_validity(now, validity)?)?;

        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(generate_error)?;
        let mut params = CertificateParams::default();
        let mut subject = DistinguishedName::new();
        subject.push(DnType::OrganizationName, ORGANIZATION);
        if trust_domain.len() <= MAX_DN_VALUE_LEN {
            subject.push(DnType::OrganizationalUnitName, trust_domain);
        }
        subject.push(DnType::CommonName, CA_COMMON_NAME);
        params.distinguished_name = subject;
        params.subject_alt_names = vec![SanType::URI(
            Ia5String::try_from(trust_domain_id(trust_domain)).map_err(generate_error)?,
        )];
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.self_signed(&key).map_err(generate_error)?;
        Self::from_parts(cert.der().clone(), key).map_err(IdentityError::InvalidCa)
    }

    /// Loads the CA of `dir` (`ca.pem`, `ca.key`), checking that the certificate is a CA with a
    /// `spiffe://TD` URI SAN and that the key belongs to it.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self, IdentityError> {
        let dir = dir.as_ref();
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_pem = read_text(&cert_path)?;
        let certs = certs_from_pem(&cert_path, cert_pem.as_bytes())?;
        if certs.len() > 1 {
            return Err(IdentityError::BadFile {
                path: cert_path,
                reason: format!(
                    "holds {} certificates; a CA file holds exactly one",
                    certs.len()
                ),
            });
        }
        let key_pem = read_text(&key_path)?;
        warn_if_key_exposed(&key_path);
        let key = KeyPair::from_pem(&key_pem).map_err(|e| IdentityError::BadFile {
            path: key_path.clone(),
            reason: format!("not a usable private key: {e}"),
        })?;
        let cert = certs
            .into_iter()
            .next()
            .ok_or_else(|| IdentityError::BadFile {
                path: cert_path.clone(),
                reason: "contains no certificate".into(),
            })?;
        Self::from_parts(cert, key).map_err(|reason| {
            IdentityError::InvalidCa(format!(
                "{} and {}: {reason}",
                cert_path.display(),
                key_path.display()
            ))
        })
    }

    /// Checks a CA certificate and key and builds the CA from them.
    fn from_parts(cert_der: CertificateDer<'static>, key: KeyPair) -> Result<Self, String> {
        let x509 = parse(&cert_der).map_err(|e| e.to_string())?;
        let is_ca = x509
            .basic_constraints()
            .map_err(|e| format!("basicConstraints: {e}"))?
            .is_some_and(|bc| bc.value.ca);
        if !is_ca {
            return Err(
                "the certificate is not a CA certificate (basicConstraints CA:TRUE)".into(),
            );
        }
        let key_usage = x509.key_usage().map_err(|e| format!("keyUsage: {e}"))?;
        if let Some(ku) = &key_usage
            && !ku.value.key_cert_sign()
        {
            return Err("the certificate's key usage does not allow signing certificates".into());
        }
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err("the private key does not belong to the certificate".into());
        }
        let uri = single_uri_san(&x509).map_err(|e| {
            format!("{e}; a Strait CA carries its trust domain ID `spiffe://<trust-domain>`")
        })?;
        let trust_domain = parse_trust_domain_id(uri).map_err(|e| e.to_string())?;

        // The issuer of every certificate we sign must be byte-for-byte the CA's subject, and its
        // authority key identifier the CA's subject key identifier.
        let mut issuer_params = CertificateParams::default();
        issuer_params.distinguished_name = distinguished_name(x509.subject())?;
        issuer_params.key_identifier_method = match subject_key_id(&x509) {
            Some(ski) => KeyIdMethod::PreSpecified(ski),
            None => KeyIdMethod::Sha256,
        };
        issuer_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let subject_raw = x509.subject().as_raw().to_vec();
        let not_after = x509.validity().not_after.to_datetime();
        let cert_pem = pem_encode(&cert_der);
        drop(x509);
        Ok(CertificateAuthority {
            trust_domain,
            cert_der,
            cert_pem,
            subject_raw,
            not_after,
            issuer: Issuer::new(issuer_params, key),
        })
    }

    /// Writes `dir/ca.pem` (mode 0644) and `dir/ca.key` (mode 0600), creating `dir` if needed.
    /// Refuses to replace an existing CA unless `force`.
    pub fn write(&self, dir: impl AsRef<Path>, force: bool) -> Result<(), IdentityError> {
        let dir = dir.as_ref();
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        if !force {
            for path in [&cert_path, &key_path] {
                if path.symlink_metadata().is_ok() {
                    return Err(IdentityError::CaExists { path: path.clone() });
                }
            }
        }
        ensure_dir(dir)?;
        write_atomic(
            &key_path,
            self.issuer.key().serialize_pem().as_bytes(),
            KEY_MODE,
        )?;
        write_atomic(&cert_path, self.cert_pem.as_bytes(), CERT_MODE)
    }

    /// The trust domain, from the CA certificate's `spiffe://TD` URI SAN.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The CA certificate, PEM.
    pub fn ca_cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn ca_cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// When the CA certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after.into()
    }

    /// Issues a certificate for `id`, valid from now (less [`NOT_BEFORE_BACKDATE`]) for
    /// `validity`, which must end before the CA expires.
    pub fn issue(&self, id: &SpiffeId, validity: Duration) -> Result<IssuedCert, IdentityError> {
        self.issue_with_names(id, validity, &ExtraNames::default())
    }

    /// Like [`CertificateAuthority::issue`], with DNS names and IP addresses added as SANs (for
    /// clients that check the host name, such as `curl --proxy https://…` against a gateway's
    /// ingress). The SPIFFE URI SAN stays the certificate's one identity.
    pub fn issue_with_names(
        &self,
        id: &SpiffeId,
        validity: Duration,
        names: &ExtraNames,
    ) -> Result<IssuedCert, IdentityError> {
        let now = SystemTime::now();
        if to_datetime(now)? >= self.not_after {
            return Err(IdentityError::InvalidCa(format!(
                "the CA expired at {}; create a new one with `strait pki init --force` and \
                 reissue every certificate",
                format_datetime(self.not_after)
            )));
        }
        let not_after = end_of_validity(now, validity)?;
        let not_before = now.checked_sub(NOT_BEFORE_BACKDATE).unwrap_or(now);
        self.issue_inner(id, not_before, not_after, names)
    }

    /// Issues a certificate for `id` valid from `not_before` to `not_after` exactly (which may
    /// be in the past: tests use this to make expired certificates). `not_after` must not be
    /// later than the CA's own expiry.
    pub fn issue_with_validity(
        &self,
        id: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<IssuedCert, IdentityError> {
        self.issue_inner(id, not_before, not_after, &ExtraNames::default())
    }

    fn issue_inner(
        &self,
        id: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
        names: &ExtraNames,
    ) -> Result<IssuedCert, IdentityError> {
        id.validate()?;
        if id.trust_domain() != self.trust_domain {
            return Err(IdentityError::ForeignTrustDomain {
                id: Box::new(id.clone()),
                ca_trust_domain: self.trust_domain.clone(),
            });
        }
        let not_before_dt = to_datetime(not_before)?;
        let not_after_dt = to_datetime(not_after)?;
        if not_after_dt <= not_before_dt {
            return Err(IdentityError::InvalidValidity(format!(
                "the certificate would end ({}) before it starts ({})",
                format_datetime(not_after_dt),
                format_datetime(not_before_dt)
            )));
        }
        if not_after_dt > self.not_after {
            return Err(IdentityError::InvalidValidity(format!(
                "the certificate would expire at {}, after the CA itself ({}); ask for a shorter \
                 validity or create a new CA",
                format_datetime(not_after_dt),
                format_datetime(self.not_after)
            )));
        }

        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(generate_error)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = leaf_subject(id);
        params.subject_alt_names = vec![SanType::URI(
            Ia5String::try_from(id.to_string()).map_err(generate_error)?,
        )];
        for d in &names.dns {
            params.subject_alt_names.push(SanType::DnsName(
                Ia5String::try_from(d.clone()).map_err(|e| {
                    IdentityError::InvalidValidity(format!("DNS name `{d}` is not valid: {e}"))
                })?,
            ));
        }
        for ip in &names.ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = not_before_dt;
        params.not_after = not_after_dt;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(generate_error)?;

        // Guard against a CA whose subject we could not reproduce exactly: such certificates
        // would never verify, and it is better to say so now.
        let issued = parse(cert.der())?;
        if issued.issuer().as_raw() != self.subject_raw.as_slice() {
            return Err(IdentityError::InvalidCa(
                "the CA subject name cannot be reproduced exactly in issued certificates \
                 (unsupported attribute encoding)"
                    .into(),
            ));
        }
        drop(issued);

        Ok(IssuedCert {
            id: id.clone(),
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key_pem: key.serialize_pem(),
            key_der: key.serialize_der(),
            ca_pem: self.cert_pem.clone(),
            ca_der: self.cert_der.clone(),
            not_before: not_before_dt.into(),
            not_after: not_after_dt.into(),
        })
    }
}

/// Extra subject alternative names for an issued certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtraNames {
    pub dns: Vec<String>,
    pub ips: Vec<std::net::IpAddr>,
}

/// A certificate and key issued by the CA, with the CA certificate.
#[derive(Clone)]
pub struct IssuedCert {
    id: SpiffeId,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key_pem: String,
    key_der: Vec<u8>,
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("id", &self.id.to_string())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl IssuedCert {
    /// The identity in the certificate.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The leaf certificate alone, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The leaf certificate followed by the CA certificate, PEM: the content of `cert.pem`.
    pub fn chain_pem(&self) -> String {
        let mut chain = self.cert_pem.clone();
        if !chain.ends_with('\n') {
            chain.push('\n');
        }
        chain.push_str(&self.ca_pem);
        chain
    }

    /// The private key, PKCS#8 PEM: the content of `key.pem`.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The leaf certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The chain to present in TLS: leaf, then CA.
    pub fn cert_chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.cert_der.clone(), self.ca_der.clone()]
    }

    /// The private key, for TLS.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// Start of validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Writes `dir/cert.pem` (leaf then CA, mode 0644), `dir/key.pem` (mode 0600) and a copy of
    /// the CA certificate `dir/ca.pem` (mode 0644), creating `dir` if needed and replacing
    /// existing files atomically.
    pub fn write(&self, dir: impl AsRef<Path>) -> Result<IssuedPaths, IdentityError> {
        let dir = dir.as_ref();
        ensure_dir(dir)?;
        let paths = IssuedPaths {
            cert: dir.join(CERT_FILE),
            key: dir.join(KEY_FILE),
            ca: dir.join(CA_CERT_FILE),
        };
        // Key first: a new cert.pem never sits next to an old key.
        write_atomic(&paths.key, self.key_pem.as_bytes(), KEY_MODE)?;
        write_atomic(&paths.cert, self.chain_pem().as_bytes(), CERT_MODE)?;
        write_atomic(&paths.ca, self.ca_pem.as_bytes(), CERT_MODE)?;
        Ok(paths)
    }
}

/// Where [`IssuedCert::write`] put the files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedPaths {
    /// `cert.pem`: leaf then CA.
    pub cert: PathBuf,
    /// `key.pem`.
    pub key: PathBuf,
    /// `ca.pem`.
    pub ca: PathBuf,
}

fn leaf_subject(id: &SpiffeId) -> DistinguishedName {
    // Informational only: verification looks at the URI SAN. Every name is at most 63
    // characters, within the 64 allowed in a subject attribute.
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORGANIZATION);
    match id {
        SpiffeId::Gateway { cluster, .. } => {
            dn.push(DnType::OrganizationalUnitName, "gateway");
            dn.push(DnType::CommonName, cluster.as_str());
        }
        SpiffeId::Workload {
            namespace,
            service_account,
            ..
        } => {
            dn.push(DnType::OrganizationalUnitName, namespace.as_str());
            dn.push(DnType::CommonName, service_account.as_str());
        }
    }
    dn
}

/// Rebuilds an rcgen distinguished name from a parsed one, keeping order and string types so
/// that it encodes to the same bytes.
fn distinguished_name(name: &X509Name<'_>) -> Result<DistinguishedName, String> {
    let mut dn = DistinguishedName::new();
    for rdn in name.iter() {
        let mut attrs = rdn.iter();
        let (Some(attr), None) = (attrs.next(), attrs.next()) else {
            return Err("the CA subject has an empty or multi-valued name component".into());
        };
        let oid: Vec<u64> = attr
            .attr_type()
            .iter()
            .ok_or("the CA subject has an attribute type that is not a 64-bit OID")?
            .collect();
        let ty = DnType::from_oid(&oid);
        if dn.get(&ty).is_some() {
            return Err(format!(
                "the CA subject repeats the attribute {}",
                attr.attr_type()
            ));
        }
        let any = attr.attr_value();
        let text = std::str::from_utf8(any.data)
            .map_err(|_| format!("the CA subject attribute {} is not text", attr.attr_type()))?;
        let value = match any.header.tag() {
            Tag::Utf8String => DnValue::Utf8String(text.to_owned()),
            Tag::PrintableString => DnValue::PrintableString(
                PrintableString::try_from(text).map_err(|e| e.to_string())?,
            ),
            Tag::Ia5String => {
                DnValue::Ia5String(Ia5String::try_from(text).map_err(|e| e.to_string())?)
            }
            other => {
                return Err(format!(
                    "the CA subject attribute {} uses an unsupported string type ({other})",
                    attr.attr_type()
                ));
            }
        };
        dn.push(ty, value);
    }
    Ok(dn)
}

fn subject_key_id(x509: &x509_parser::certificate::X509Certificate<'_>) -> Option<Vec<u8>> {
    x509.extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
            _ => None,
        })
}

/// A random positive 128-bit serial number.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and exactly 16 bytes long once DER-encoded.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn end_of_validity(now: SystemTime, validity: Duration) -> Result<SystemTime, IdentityError> {
    if validity.is_zero() {
        return Err(IdentityError::InvalidValidity(
            "the validity must be longer than zero".into(),
        ));
    }
    if validity > MAX_VALIDITY {
        return Err(IdentityError::InvalidValidity(format!(
            "{}s is longer than the maximum of {}h (100 years)",
            validity.as_secs(),
            MAX_VALIDITY.as_secs() / HOUR
        )));
    }
    now.checked_add(validity).ok_or_else(|| {
        IdentityError::InvalidValidity("the validity ends beyond representable time".into())
    })
}

fn to_datetime(t: SystemTime) -> Result<OffsetDateTime, IdentityError> {
    OffsetDateTime::from_unix_timestamp(unix_seconds(t))
        .map_err(|e| IdentityError::InvalidValidity(format!("time out of range: {e}")))
}

fn pem_encode(der: &[u8]) -> String {
    // Encoded here: rcgen's PEM support covers only certificates it generated itself.
    let b64 = base64_encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 64);
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn base64_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 0x3f) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;

    #[test]
    fn base64_matches_known_vectors() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foo"), "Zm9v");
        assert_eq!(base64_encode(b"foob"), "Zm9vYg==");
        assert_eq!(base64_encode(b"fooba"), "Zm9vYmE=");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn pem_round_trips() {
        let der: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let pem = pem_encode(&der);
        let back = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].as_ref(), der.as_slice());
    }
}
