//! Reading identity and validity out of certificates.

use std::fmt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use super::files::certs_from_pem;
use super::names::parse_trust_domain_id;
use super::{IdentityError, Role, SpiffeId};

/// What a certificate is, as far as Strait is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CertRole {
    /// A CA certificate.
    Ca,
    /// A gateway certificate.
    Gateway,
    /// A workload certificate.
    Workload,
    /// A certificate without a Strait identity.
    Unknown,
}

impl CertRole {
    /// `ca`, `gateway`, `workload` or `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            CertRole::Ca => "ca",
            CertRole::Gateway => "gateway",
            CertRole::Workload => "workload",
            CertRole::Unknown => "unknown",
        }
    }
}

impl From<Role> for CertRole {
    fn from(role: Role) -> Self {
        match role {
            Role::Gateway => CertRole::Gateway,
            Role::Workload => CertRole::Workload,
        }
    }
}

impl fmt::Display for CertRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The identity and validity of a certificate (the first one of a PEM file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertInfo {
    /// The SPIFFE ID (`spiffe://TD` for a CA); `None` if the certificate has no usable one.
    pub identity: Option<String>,
    /// What the certificate is.
    pub role: CertRole,
    /// The trust domain of the identity.
    pub trust_domain: Option<String>,
    /// The cluster of a gateway or workload.
    pub cluster: Option<String>,
    /// The namespace of a workload.
    pub namespace: Option<String>,
    /// The service account of a workload.
    pub service_account: Option<String>,
    /// Why the identity could not be read, when it could not.
    pub identity_error: Option<String>,
    /// The subject distinguished name.
    pub subject: String,
    /// The issuer distinguished name.
    pub issuer: String,
    /// The serial number, colon-separated hex.
    pub serial: String,
    /// Start of validity, RFC 3339 UTC.
    pub not_before: String,
    /// End of validity, RFC 3339 UTC.
    pub not_after: String,
    /// Start of validity, seconds since the Unix epoch.
    pub not_before_unix: i64,
    /// End of validity, seconds since the Unix epoch.
    pub not_after_unix: i64,
    /// Whether the certificate had expired at inspection time.
    pub expired: bool,
    /// Whether the certificate was not yet valid at inspection time.
    pub not_yet_valid: bool,
    /// Whether the certificate is a CA.
    pub is_ca: bool,
    /// How many certificates the PEM holds (2 for a Strait `cert.pem`: leaf and CA).
    pub chain_length: usize,
    /// DNS name SANs (what clients checking a host name match).
    pub dns_names: Vec<String>,
    /// IP address SANs.
    pub ip_addresses: Vec<std::net::IpAddr>,
}

impl fmt::Display for CertInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "identity: {}",
            self.identity.as_deref().unwrap_or("none")
        )?;
        writeln!(f, "role: {}", self.role)?;
        if let Some(reason) = &self.identity_error {
            writeln!(f, "identity_error: {reason}")?;
        }
        if let Some(td) = &self.trust_domain {
            writeln!(f, "trust_domain: {td}")?;
        }
        if let Some(cluster) = &self.cluster {
            writeln!(f, "cluster: {cluster}")?;
        }
        if let Some(ns) = &self.namespace {
            writeln!(f, "namespace: {ns}")?;
        }
        if let Some(sa) = &self.service_account {
            writeln!(f, "service_account: {sa}")?;
        }
        writeln!(f, "subject: {}", self.subject)?;
        writeln!(f, "issuer: {}", self.issuer)?;
        writeln!(f, "serial: {}", self.serial)?;
        writeln!(f, "not_before: {}", self.not_before)?;
        writeln!(f, "not_after: {}", self.not_after)?;
        writeln!(f, "expired: {}", self.expired)?;
        if self.not_yet_valid {
            writeln!(f, "not_yet_valid: true")?;
        }
        if !self.dns_names.is_empty() {
            writeln!(f, "dns_names: {}", self.dns_names.join(", "))?;
        }
        if !self.ip_addresses.is_empty() {
            let ips: Vec<String> = self.ip_addresses.iter().map(ToString::to_string).collect();
            writeln!(f, "ip_addresses: {}", ips.join(", "))?;
        }
        write!(f, "chain_length: {}", self.chain_length)
    }
}

/// Inspects the first certificate of a PEM text, as of now.
pub fn inspect_pem(pem: &str) -> Result<CertInfo, IdentityError> {
    inspect_pem_at(pem, SystemTime::now())
}

/// Inspects the first certificate of a PEM text; `expired` is judged at `now`.
pub fn inspect_pem_at(pem: &str, now: SystemTime) -> Result<CertInfo, IdentityError> {
    let certs = certs_from_pem(Path::new("<pem>"), pem.as_bytes()).map_err(|e| match e {
        IdentityError::BadFile { reason, .. } => IdentityError::BadCertificate(reason),
        other => other,
    })?;
    let first = certs
        .first()
        .ok_or_else(|| IdentityError::BadCertificate("no certificate in the PEM text".into()))?;
    let mut info = inspect_der(first, now)?;
    info.chain_length = certs.len();
    Ok(info)
}

/// Inspects one DER certificate; `expired` is judged at `now`.
pub fn inspect_der(der: &[u8], now: SystemTime) -> Result<CertInfo, IdentityError> {
    let x509 = parse(der)?;
    let is_ca = x509
        .basic_constraints()
        .map_err(|e| IdentityError::BadCertificate(format!("basicConstraints: {e}")))?
        .is_some_and(|bc| bc.value.ca);
    let not_before_unix = x509.validity().not_before.timestamp();
    let not_after_unix = x509.validity().not_after.timestamp();
    let now_unix = unix_seconds(now);

    let mut info = CertInfo {
        identity: None,
        role: CertRole::Unknown,
        trust_domain: None,
        cluster: None,
        namespace: None,
        service_account: None,
        identity_error: None,
        subject: x509.subject().to_string(),
        issuer: x509.issuer().to_string(),
        serial: x509.raw_serial_as_string(),
        not_before: format_unix(not_before_unix),
        not_after: format_unix(not_after_unix),
        not_before_unix,
        not_after_unix,
        expired: now_unix > not_after_unix,
        not_yet_valid: now_unix < not_before_unix,
        is_ca,
        chain_length: 1,
        dns_names: Vec::new(),
        ip_addresses: Vec::new(),
    };
    if let Ok(Some(san)) = x509.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(n) => info.dns_names.push((*n).to_owned()),
                GeneralName::IPAddress(b) => {
                    if let Ok(a) = <[u8; 4]>::try_from(*b) {
                        info.ip_addresses.push(std::net::IpAddr::from(a));
                    } else if let Ok(a) = <[u8; 16]>::try_from(*b) {
                        info.ip_addresses.push(std::net::IpAddr::from(a));
                    }
                }
                _ => {}
            }
        }
    }

    match single_uri_san(&x509) {
        Ok(uri) if is_ca => {
            info.role = CertRole::Ca;
            info.identity = Some(uri.to_owned());
            match parse_trust_domain_id(uri) {
                Ok(td) => info.trust_domain = Some(td),
                Err(e) => info.identity_error = Some(e.to_string()),
            }
        }
        Ok(uri) => {
            info.identity = Some(uri.to_owned());
            match uri.parse::<SpiffeId>() {
                Ok(id) => {
                    info.role = id.role().into();
                    info.trust_domain = Some(id.trust_domain().to_owned());
                    info.cluster = Some(id.cluster().to_owned());
                    info.namespace = id.namespace().map(str::to_owned);
                    info.service_account = id.service_account().map(str::to_owned);
                }
                Err(e) => info.identity_error = Some(e.to_string()),
            }
        }
        Err(e) => {
            if is_ca {
                info.role = CertRole::Ca;
            }
            info.identity_error = Some(e.to_string());
        }
    }
    Ok(info)
}

/// Parses a DER certificate, refusing trailing data.
pub(crate) fn parse(der: &[u8]) -> Result<X509Certificate<'_>, IdentityError> {
    let (rest, x509) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    if !rest.is_empty() {
        return Err(IdentityError::BadCertificate(format!(
            "{} bytes of trailing data after the certificate",
            rest.len()
        )));
    }
    Ok(x509)
}

/// The one URI SAN of a certificate.
pub(crate) fn single_uri_san<'a>(x509: &X509Certificate<'a>) -> Result<&'a str, IdentityError> {
    let san = x509
        .subject_alternative_name()
        .map_err(|e| IdentityError::BadCertificate(format!("subjectAltName: {e}")))?;
    let Some(san) = san else {
        return Err(IdentityError::NoSpiffeId);
    };
    let uris: Vec<&'a str> = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(IdentityError::NoSpiffeId),
        [uri] => Ok(uri),
        many => Err(IdentityError::AmbiguousSpiffeId { count: many.len() }),
    }
}

/// Seconds since the Unix epoch, negative before it.
pub(crate) fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

/// RFC 3339 UTC, to the second (`2025-01-31T12:00:00Z`), for any representable time.
pub(crate) fn format_unix(secs: i64) -> String {
    match OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format_datetime(t),
        Err(_) => format!("@{secs}"),
    }
}

/// RFC 3339 UTC, to the second.
pub(crate) fn format_datetime(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_times() {
        assert_eq!(format_unix(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_unix(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(format_unix(-86_400), "1969-12-31T00:00:00Z");
        assert_eq!(format_unix(i64::MAX), format!("@{}", i64::MAX));
        assert_eq!(unix_seconds(UNIX_EPOCH - Duration::from_secs(5)), -5);
        assert_eq!(unix_seconds(UNIX_EPOCH + Duration::from_secs(5)), 5);
    }
}
