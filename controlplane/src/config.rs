//! `strait controlplane --config FILE`: the control plane's YAML configuration.
//!
//! ```yaml
//! cluster: east
//! region: us-east
//! registry: {etcd: ["http://127.0.0.1:2379"]}   # or {embedded: true}; TLS and credentials:
//! #   {etcd: ["https://…:2379"], tls: {ca, cert, key}, auth: {user, password_file}}
//! discovery: {file: east.yaml}                   # optional: this cluster's endpoints, or
//! # discovery: {kubernetes: {kubeconfig: kube.yaml, gateways: ["203.0.113.7:15443"]}}
//! xds:
//!   listen: "127.0.0.1:15010"
//!   tls: {cert: certs/east-cp/cert.pem, key: certs/east-cp/key.pem, ca: certs/ca.pem}  # optional
//! gateway: {ingress: "127.0.0.1:15008"}          # optional: the local east-west gateway
//! admin: {listen: "127.0.0.1:15014"}
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use federation::config::parse_yaml;
use federation::model::Name;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlPlaneConfig {
    pub cluster: Name,
    pub region: String,
    pub registry: RegistryConfig,
    #[serde(default)]
    pub discovery: Option<DiscoveryConfig>,
    pub xds: XdsConfig,
    #[serde(default)]
    pub gateway: Option<GatewayConfig>,
    pub admin: AdminConfig,
    /// The sidecar-injection webhook (Kubernetes; see docs/kubernetes.md).
    #[serde(default)]
    pub webhook: Option<crate::kubernetes::inject::WebhookConfig>,
    /// Certificates it issues and renews: its own xDS serving certificate, the gateway's
    /// (see `crate::certificates`).
    #[serde(default)]
    pub certificates: Option<crate::certificates::CertificatesConfig>,
}

pub use federation::registry::RegistryConfig;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// A static discovery file (see docs/configuration.md); re-read when it changes.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Kubernetes: exported Services and their EndpointSlices (see docs/kubernetes.md).
    #[serde(default)]
    pub kubernetes: Option<crate::kubernetes::source::KubernetesConfig>,
    #[serde(default = "default_poll", with = "federation::config::duration_field")]
    pub poll: Duration,
}

fn default_poll() -> Duration {
    Duration::from_secs(1)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XdsConfig {
    pub listen: SocketAddr,
    /// mTLS with workload certificates; without it the listener must be on loopback.
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    #[serde(
        default = "default_debounce",
        with = "federation::config::duration_field"
    )]
    pub debounce: Duration,
    #[serde(
        default = "default_max_delay",
        with = "federation::config::duration_field"
    )]
    pub max_delay: Duration,
    #[serde(
        default = "default_send_timeout",
        with = "federation::config::duration_field"
    )]
    pub send_timeout: Duration,
    /// A delta response carries at most about this many bytes of resources; larger updates
    /// (a proxy's first config) go out in several responses, each waiting for the previous
    /// one's ACK. Bounds what each stream buffers.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: usize,
}

fn default_max_response_bytes() -> usize {
    256 * 1024
}

fn default_debounce() -> Duration {
    Duration::from_millis(5)
}
fn default_max_delay() -> Duration {
    Duration::from_millis(50)
}
fn default_send_timeout() -> Duration {
    Duration::from_secs(30)
}

/// The control plane's serving certificate files (one shape for every component).
pub use federation::identity::TlsFiles;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// The local gateway's ingress (HTTP CONNECT over mTLS).
    pub ingress: SocketAddr,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

pub use federation::config::ConfigError;

impl ControlPlaneConfig {
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        Self::parse(path, &federation::config::read_file(path)?)
    }

    pub fn parse(path: impl AsRef<Path>, text: &str) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let mut cfg: ControlPlaneConfig = parse_yaml(path, text)?;
        let invalid = |field: &str, reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            field: field.to_string(),
            reason,
        };
        federation::model::Locality::new(&cfg.region, "", "")
            .map_err(|e| invalid("region", e.reason))?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.registry
            .check(base, true)
            .map_err(|(field, reason)| invalid(field, reason))?;
        if let Some(c) = &mut cfg.certificates {
            let kubernetes = cfg
                .discovery
                .as_ref()
                .is_some_and(|d| d.kubernetes.is_some());
            c.check(base, kubernetes)
                .map_err(|(field, reason)| invalid(&field, reason))?;
            // Serving with the certificate it keeps, unless told otherwise.
            if cfg.xds.tls.is_none()
                && let Some(dir) = c.controlplane.as_ref().and_then(|k| k.files.as_ref())
            {
                cfg.xds.tls = Some(TlsFiles::in_dir(dir));
            }
        }
        if cfg.xds.tls.is_none() && !cfg.xds.listen.ip().is_loopback() {
            return Err(invalid(
                "xds.listen",
                format!(
                    "{} is not a loopback address: serving xDS beyond this host needs `xds.tls` (mTLS)",
                    cfg.xds.listen
                ),
            ));
        }
        // Relative paths are relative to the file.
        if let Some(d) = &mut cfg.discovery {
            match (&mut d.file, &mut d.kubernetes) {
                (Some(file), None) => *file = base.join(&*file),
                (None, Some(k)) => {
                    if let Some(kc) = &mut k.kubeconfig {
                        *kc = base.join(&*kc);
                    }
                    if let Some(ids) = &mut k.identities {
                        ids.ca = base.join(&ids.ca);
                        if ids.validity < std::time::Duration::from_secs(600) {
                            return Err(invalid(
                                "discovery.kubernetes.identities.validity",
                                format!(
                                    "{:?} is too short: certificates are renewed with a third left, give at least 10m",
                                    ids.validity
                                ),
                            ));
                        }
                    }
                    for (i, g) in k.gateways.iter().enumerate() {
                        federation::model::GatewayAddress::parse("gateways", g).map_err(|e| {
                            invalid(&format!("discovery.kubernetes.gateways[{i}]"), e.reason)
                        })?;
                    }
                }
                _ => {
                    return Err(invalid(
                        "discovery",
                        "give exactly one of `file: PATH` and `kubernetes: {…}`".into(),
                    ));
                }
            }
        }
        if let Some(t) = &mut cfg.xds.tls {
            t.cert = base.join(&t.cert);
            t.key = base.join(&t.key);
            t.ca = base.join(&t.ca);
        }
        Ok(cfg)
    }
}
