//! SPIFFE IDs, roles and name validation.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::IdentityError;

/// The URI scheme of every SPIFFE ID.
pub const SPIFFE_SCHEME: &str = "spiffe://";

const MAX_LABEL_LEN: usize = 63;
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// What a certificate holder is in the federation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// An east-west gateway of a cluster.
    Gateway,
    /// A workload (a service account of a namespace of a cluster).
    Workload,
}

impl Role {
    /// `gateway` or `workload`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Workload => "workload",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Strait SPIFFE ID.
///
/// The fields are public for matching; build values with [`SpiffeId::gateway`],
/// [`SpiffeId::workload`] or [`str::parse`], which validate every name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SpiffeId {
    /// `spiffe://TD/cluster/C/gateway`
    Gateway {
        /// The trust domain.
        trust_domain: String,
        /// The cluster.
        cluster: String,
    },
    /// `spiffe://TD/cluster/C/ns/NS/sa/SA`
    Workload {
        /// The trust domain.
        trust_domain: String,
        /// The cluster.
        cluster: String,
        /// The namespace.
        namespace: String,
        /// The service account.
        service_account: String,
    },
}

impl SpiffeId {
    /// The identity of the gateway of `cluster`.
    pub fn gateway(trust_domain: &str, cluster: &str) -> Result<Self, IdentityError> {
        validate_trust_domain(trust_domain)?;
        validate_name("cluster", cluster)?;
        Ok(SpiffeId::Gateway {
            trust_domain: trust_domain.to_owned(),
            cluster: cluster.to_owned(),
        })
    }

    /// The identity of service account `service_account` of `namespace` in `cluster`.
    pub fn workload(
        trust_domain: &str,
        cluster: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        validate_trust_domain(trust_domain)?;
        validate_name("cluster", cluster)?;
        validate_name("namespace", namespace)?;
        validate_name("service account", service_account)?;
        Ok(SpiffeId::Workload {
            trust_domain: trust_domain.to_owned(),
            cluster: cluster.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    /// Checks every name (useful for values built from the public fields).
    pub fn validate(&self) -> Result<(), IdentityError> {
        match self {
            SpiffeId::Gateway {
                trust_domain,
                cluster,
            } => {
                validate_trust_domain(trust_domain)?;
                validate_name("cluster", cluster)
            }
            SpiffeId::Workload {
                trust_domain,
                cluster,
                namespace,
                service_account,
            } => {
                validate_trust_domain(trust_domain)?;
                validate_name("cluster", cluster)?;
                validate_name("namespace", namespace)?;
                validate_name("service account", service_account)
            }
        }
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        match self {
            SpiffeId::Gateway { trust_domain, .. } | SpiffeId::Workload { trust_domain, .. } => {
                trust_domain
            }
        }
    }

    /// The cluster.
    pub fn cluster(&self) -> &str {
        match self {
            SpiffeId::Gateway { cluster, .. } | SpiffeId::Workload { cluster, .. } => cluster,
        }
    }

    /// The role.
    pub fn role(&self) -> Role {
        match self {
            SpiffeId::Gateway { .. } => Role::Gateway,
            SpiffeId::Workload { .. } => Role::Workload,
        }
    }

    /// The namespace of a workload.
    pub fn namespace(&self) -> Option<&str> {
        match self {
            SpiffeId::Gateway { .. } => None,
            SpiffeId::Workload { namespace, .. } => Some(namespace),
        }
    }

    /// The service account of a workload.
    pub fn service_account(&self) -> Option<&str> {
        match self {
            SpiffeId::Gateway { .. } => None,
            SpiffeId::Workload {
                service_account, ..
            } => Some(service_account),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpiffeId::Gateway {
                trust_domain,
                cluster,
            } => write!(f, "{SPIFFE_SCHEME}{trust_domain}/cluster/{cluster}/gateway"),
            SpiffeId::Workload {
                trust_domain,
                cluster,
                namespace,
                service_account,
            } => write!(
                f,
                "{SPIFFE_SCHEME}{trust_domain}/cluster/{cluster}/ns/{namespace}/sa/{service_account}"
            ),
        }
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let malformed = |reason: String| IdentityError::MalformedId {
            id: s.to_owned(),
            reason,
        };
        let rest = s
            .strip_prefix(SPIFFE_SCHEME)
            .ok_or_else(|| malformed(format!("must start with `{SPIFFE_SCHEME}`")))?;
        if rest.contains(['?', '#']) {
            return Err(malformed("must not have a query or a fragment".into()));
        }
        let Some((trust_domain, path)) = rest.split_once('/') else {
            return Err(malformed(
                "has no path: it names a trust domain, not a gateway or a workload".into(),
            ));
        };
        validate_trust_domain(trust_domain).map_err(|e| malformed(e.to_string()))?;
        let segments: Vec<&str> = path.split('/').collect();
        match segments.as_slice() {
            ["cluster", cluster, "gateway"] => {
                validate_name("cluster", cluster).map_err(|e| malformed(e.to_string()))?;
                Ok(SpiffeId::Gateway {
                    trust_domain: trust_domain.to_owned(),
                    cluster: (*cluster).to_owned(),
                })
            }
            ["cluster", cluster, "ns", namespace, "sa", service_account] => {
                validate_name("cluster", cluster).map_err(|e| malformed(e.to_string()))?;
                validate_name("namespace", namespace).map_err(|e| malformed(e.to_string()))?;
                validate_name("service account", service_account)
                    .map_err(|e| malformed(e.to_string()))?;
                Ok(SpiffeId::Workload {
                    trust_domain: trust_domain.to_owned(),
                    cluster: (*cluster).to_owned(),
                    namespace: (*namespace).to_owned(),
                    service_account: (*service_account).to_owned(),
                })
            }
            _ => Err(malformed(
                "path must be /cluster/<cluster>/gateway or \
                 /cluster/<cluster>/ns/<namespace>/sa/<service-account>"
                    .into(),
            )),
        }
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The trust domain ID `spiffe://TD` (carried by the CA certificate).
pub fn trust_domain_id(trust_domain: &str) -> String {
    format!("{SPIFFE_SCHEME}{trust_domain}")
}

/// Parses a trust domain ID `spiffe://TD` and returns `TD`.
pub(crate) fn parse_trust_domain_id(uri: &str) -> Result<String, IdentityError> {
    let malformed = |reason: String| IdentityError::MalformedId {
        id: uri.to_owned(),
        reason,
    };
    let trust_domain = uri
        .strip_prefix(SPIFFE_SCHEME)
        .ok_or_else(|| malformed(format!("must start with `{SPIFFE_SCHEME}`")))?;
    if trust_domain.contains(['/', '?', '#']) {
        return Err(malformed(
            "a trust domain ID has no path, query or fragment".into(),
        ));
    }
    validate_trust_domain(trust_domain).map_err(|e| malformed(e.to_string()))?;
    Ok(trust_domain.to_owned())
}

/// Checks a trust domain: 1 to 255 characters, dot-separated labels of 1 to 63 lowercase
/// letters, digits and `-`, each starting and ending with a letter or digit
/// (e.g. `prod.example.org`).
pub fn validate_trust_domain(value: &str) -> Result<(), IdentityError> {
    let invalid = |reason: String| IdentityError::InvalidName {
        field: "trust domain",
        value: value.to_owned(),
        reason,
    };
    if value.is_empty() {
        return Err(invalid("must not be empty".into()));
    }
    if value.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(invalid(format!(
            "is {} characters long; at most {MAX_TRUST_DOMAIN_LEN} are allowed",
            value.len()
        )));
    }
    for label in value.split('.') {
        if label.is_empty() {
            return Err(invalid(
                "has an empty label (a leading, trailing or doubled `.`)".into(),
            ));
        }
        check_label(label).map_err(|reason| invalid(format!("label `{label}` {reason}")))?;
    }
    Ok(())
}

/// Checks a cluster, namespace or service account name: a DNS label of 1 to 63 lowercase
/// letters, digits and `-`, starting and ending with a letter or digit. `field` names the
/// name in the error (`cluster`, `namespace`, `service account`).
pub fn validate_name(field: &'static str, value: &str) -> Result<(), IdentityError> {
    if value.is_empty() {
        return Err(IdentityError::InvalidName {
            field,
            value: String::new(),
            reason: format!("must not be empty (1 to {MAX_LABEL_LEN} characters)"),
        });
    }
    check_label(value).map_err(|reason| IdentityError::InvalidName {
        field,
        value: value.to_owned(),
        reason,
    })
}

/// Why `label` (non-empty) is not a DNS label, if it is not.
fn check_label(label: &str) -> Result<(), String> {
    if label.len() > MAX_LABEL_LEN {
        return Err(format!(
            "is {} characters long; at most {MAX_LABEL_LEN} are allowed",
            label.len()
        ));
    }
    if let Some(c) = label
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "contains {c:?}; only lowercase letters, digits and `-` are allowed"
        ));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err("must start and end with a lowercase letter or digit".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_domain_id_round_trip() {
        assert_eq!(trust_domain_id("a.b"), "spiffe://a.b");
        assert_eq!(parse_trust_domain_id("spiffe://a.b").unwrap(), "a.b");
        assert!(parse_trust_domain_id("spiffe://a.b/").is_err());
        assert!(parse_trust_domain_id("spiffe://A").is_err());
        assert!(parse_trust_domain_id("https://a").is_err());
    }

    #[test]
    fn labels() {
        assert!(check_label("a").is_ok());
        assert!(check_label("a-1").is_ok());
        assert!(check_label(&"a".repeat(63)).is_ok());
        assert!(check_label(&"a".repeat(64)).is_err());
        assert!(check_label("-a").is_err());
        assert!(check_label("a-").is_err());
        assert!(check_label("a_b").is_err());
        assert!(check_label("aé").is_err());
    }
}
