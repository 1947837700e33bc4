//! The static discovery file: how a user registers services that do not come from Kubernetes
//! (VMs, tests, the lab).
//!
//! ```yaml
//! cluster: east
//! region: us-east
//! gateways: ["127.0.0.1:15443"]
//! services:
//!   - name: echo
//!     namespace: default
//!     ports: [{name: http, port: 8080, protocol: http}]
//!     endpoints:
//!       - {address: 127.0.0.1, port: 18081, zone: us-east-1a, weight: 1, labels: {version: v1}}
//! ```
//!
//! Every error names the file, the line and column, and the field (`services[0].endpoints[1].port`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::health_check::{HealthCheck, HealthCheckSpec};

use crate::config::invalid;
pub use crate::config::{
    ConfigError, DiscoveryError, InvalidFile, duration_field, parse_yaml, read_file,
};
use crate::model::{
    Cluster, ClusterState, Endpoint, GatewayAddress, Health, Labels, Locality, ModelError, Name,
    Protocol, Service, ServiceEndpoints, ServiceKey, ServicePort, validate_weight,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    cluster: Name,
    region: String,
    #[serde(default)]
    network: Option<Name>,
    #[serde(default)]
    gateways: Vec<Spanned<GatewayAddress>>,
    #[serde(default)]
    services: Vec<Spanned<ServiceSpec>>,
    /// The active health check of every service that has none of its own.
    #[serde(default)]
    health_check: Option<Spanned<HealthCheckSpec>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceSpec {
    name: Name,
    #[serde(default = "default_namespace")]
    namespace: Name,
    ports: Vec<Spanned<PortSpec>>,
    #[serde(default)]
    endpoints: Vec<Spanned<EndpointSpec>>,
    #[serde(default)]
    health_check: Option<Spanned<HealthCheckSpec>>,
}

fn default_namespace() -> Name {
    Name::from_arc_unchecked("default".into())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PortSpec {
    name: Name,
    port: PortNumber,
    #[serde(default = "default_protocol")]
    protocol: Protocol,
}

fn default_protocol() -> Protocol {
    Protocol::Tcp
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointSpec {
    address: IpAddr,
    port: PortNumber,
    #[serde(default)]
    zone: String,
    #[serde(default)]
    subzone: String,
    #[serde(default = "default_weight")]
    weight: Weight,
    #[serde(default)]
    health: Health,
    #[serde(default)]
    labels: Labels,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(try_from = "u16")]
struct PortNumber(u16);

impl TryFrom<u16> for PortNumber {
    type Error = String;
    fn try_from(v: u16) -> Result<Self, String> {
        if v == 0 {
            Err("port 0 is not a valid port".into())
        } else {
            Ok(Self(v))
        }
    }
}

#[derive(Deserialize, Clone, Copy)]
#[serde(try_from = "u32")]
struct Weight(u32);

fn default_weight() -> Weight {
    Weight(1)
}

impl TryFrom<u32> for Weight {
    type Error = String;
    fn try_from(v: u32) -> Result<Self, String> {
        validate_weight("weight", v)
            .map(Weight)
            .map_err(|e| e.reason)
    }
}

/// A parsed, validated discovery file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryFile {
    pub path: PathBuf,
    pub state: ClusterState,
    /// The active health check of each service that has one (its own `health_check`, or the
    /// file's), for the control plane's checker (`crate::health_check`).
    pub health_checks: BTreeMap<ServiceKey, HealthCheck>,
}

impl DiscoveryFile {
    /// Read and validate a discovery file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, DiscoveryError> {
        let path = path.as_ref();
        Self::parse(path, &read_file(path)?)
    }

    /// Validate discovery-file text; `path` is used in errors.
    pub fn parse(path: impl AsRef<Path>, text: &str) -> Result<Self, DiscoveryError> {
        let path = path.as_ref().to_path_buf();
        let spec = parse_yaml::<FileSpec>(&path, text)?;
        let health_checks = health_checks(&path, &spec)?;
        let state = build(&path, spec)?;
        Ok(Self {
            path,
            state,
            health_checks,
        })
    }
}

pub(crate) fn at<T>(
    path: &Path,
    spanned: &Spanned<T>,
    parent: &str,
) -> impl Fn(ModelError) -> DiscoveryError {
    let (line, column) = (spanned.referenced.line(), spanned.referenced.column());
    let path = path.to_path_buf();
    let parent = parent.to_string();
    move |e: ModelError| {
        let field = if e.field.is_empty() {
            parent.clone()
        } else if parent.is_empty() {
            e.field.clone()
        } else {
            format!("{parent}.{}", e.field)
        };
        invalid(&path, line, column, field, e.reason)
    }
}

fn health_checks(
    path: &Path,
    spec: &FileSpec,
) -> Result<BTreeMap<ServiceKey, HealthCheck>, DiscoveryError> {
    let built = |s: &Spanned<HealthCheckSpec>, parent: &str| {
        s.value.build().map_err(|e| {
            invalid(
                path,
                s.referenced.line(),
                s.referenced.column(),
                format!("{parent}.{}", e.field),
                e.reason,
            )
        })
    };
    let default = match &spec.health_check {
        Some(s) => built(s, "health_check")?,
        None => None,
    };
    let mut out = BTreeMap::new();
    for (si, s) in spec.services.iter().enumerate() {
        let check = match &s.value.health_check {
            Some(h) => built(h, &format!("services[{si}].health_check"))?,
            None => default.clone(),
        };
        if let Some(c) = check {
            out.insert(
                ServiceKey {
                    namespace: s.value.namespace.clone(),
                    name: s.value.name.clone(),
                },
                c,
            );
        }
    }
    Ok(out)
}

fn build(path: &Path, spec: FileSpec) -> Result<ClusterState, DiscoveryError> {
    let region = spec.region.clone();
    let gateways: Vec<GatewayAddress> = spec.gateways.iter().map(|g| g.value.clone()).collect();
    let cluster = Cluster::new(
        spec.cluster.clone(),
        &region,
        spec.network.clone(),
        gateways,
    )
    .map_err(|e| {
        // Point at the duplicate gateway when that is the problem.
        if let Some(i) = e
            .field
            .strip_prefix("gateways[")
            .and_then(|r| r.strip_suffix(']'))
            .and_then(|n| n.parse::<usize>().ok())
            && let Some(g) = spec.gateways.get(i)
        {
            return invalid(
                path,
                g.referenced.line(),
                g.referenced.column(),
                e.field,
                e.reason,
            );
        }
        invalid(path, 1, 1, e.field, e.reason)
    })?;

    let mut services: Vec<ServiceEndpoints> = Vec::new();
    let mut seen: BTreeMap<ServiceKey, u64> = BTreeMap::new();
    for (si, s) in spec.services.iter().enumerate() {
        let sfield = format!("services[{si}]");
        let svc = &s.value;
        let key = ServiceKey {
            namespace: svc.namespace.clone(),
            name: svc.name.clone(),
        };
        if let Some(line) = seen.get(&key) {
            return Err(invalid(
                path,
                s.referenced.line(),
                s.referenced.column(),
                sfield,
                format!("service {key} is listed twice (first at line {line})"),
            ));
        }
        seen.insert(key.clone(), s.referenced.line());
        let mut ports = Vec::new();
        for (pi, p) in svc.ports.iter().enumerate() {
            let port = ServicePort::new(p.value.name.as_str(), p.value.port.0, p.value.protocol)
                .map_err(at(path, p, &format!("{sfield}.ports[{pi}]")))?;
            ports.push(port);
        }
        let service = Service::new(key, ports).map_err(at(path, s, &sfield))?;
        let mut endpoints = Vec::with_capacity(svc.endpoints.len());
        let mut seen_endpoints: std::collections::HashMap<(IpAddr, u16), u64> =
            std::collections::HashMap::new();
        for (ei, e) in svc.endpoints.iter().enumerate() {
            let efield = format!("{sfield}.endpoints[{ei}]");
            let ep = &e.value;
            let locality =
                Locality::new(&region, &ep.zone, &ep.subzone).map_err(at(path, e, &efield))?;
            let endpoint = Endpoint::new(ep.address, ep.port.0, locality, spec.cluster.clone())
                .map_err(at(path, e, &efield))?
                .with_weight(ep.weight.0)
                .map_err(at(path, e, &efield))?
                .with_health(ep.health)
                .with_labels(ep.labels.clone());
            if let Some(first) = seen_endpoints.insert((ep.address, ep.port.0), e.referenced.line())
            {
                return Err(invalid(
                    path,
                    e.referenced.line(),
                    e.referenced.column(),
                    efield,
                    format!(
                        "duplicate endpoint {} (first at line {first})",
                        endpoint.socket_addr(),
                    ),
                ));
            }
            endpoints.push(endpoint);
        }
        let set = ServiceEndpoints::new(spec.cluster.clone(), service, endpoints)
            .map_err(at(path, s, &sfield))?;
        services.push(set);
    }
    Ok(ClusterState { cluster, services })
}

fn file_stamp(path: &Path) -> Option<(std::time::SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Check `path` every `poll` and send its cluster state (registry keys and values) to `desired`
/// whenever it changes, until `shutdown`. An edit that does not parse, or that names another
/// cluster than `cluster`, is logged with its file:line:field and the last good state stays.
pub async fn follow_file(
    path: PathBuf,
    cluster: crate::model::ClusterId,
    poll: std::time::Duration,
    desired: tokio::sync::watch::Sender<std::collections::BTreeMap<String, Vec<u8>>>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    follow(path, cluster, poll, shutdown, |f| {
        desired.send_replace(crate::registry::codec::cluster_state_kvs(&f.state));
    })
    .await;
}

/// [`follow_file`] sending the whole parsed file (with its health checks) to `file`.
pub async fn follow_parsed(
    path: PathBuf,
    cluster: crate::model::ClusterId,
    poll: std::time::Duration,
    file: tokio::sync::watch::Sender<std::sync::Arc<DiscoveryFile>>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    follow(path, cluster, poll, shutdown, |f| {
        file.send_replace(std::sync::Arc::new(f));
    })
    .await;
}

async fn follow(
    path: PathBuf,
    cluster: crate::model::ClusterId,
    poll: std::time::Duration,
    shutdown: impl std::future::Future<Output = ()>,
    mut changed: impl FnMut(DiscoveryFile),
) {
    let mut stamp = file_stamp(&path);
    let mut ticker = tokio::time::interval(poll.max(std::time::Duration::from_millis(50)));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = ticker.tick() => {}
        }
        let now = file_stamp(&path);
        if now == stamp {
            continue;
        }
        stamp = now;
        match DiscoveryFile::load(&path) {
            Ok(f) if f.state.cluster.id != cluster => {
                tracing::error!(
                    file = %path.display(),
                    "the file now names cluster `{}`, not `{cluster}`; keeping the last good state",
                    f.state.cluster.id
                );
            }
            Ok(f) => {
                tracing::info!(file = %path.display(), services = f.state.services.len(),
                    "discovery file changed; republishing");
                changed(f);
            }
            Err(e) => tracing::error!("{e}; keeping the last good state"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"cluster: east
region: us-east
gateways: ["127.0.0.1:15443"]
services:
  - name: echo
    namespace: default
    ports: [{name: http, port: 8080, protocol: http}]
    endpoints:
      - {address: 127.0.0.1, port: 18081, zone: us-east-1a, weight: 1, labels: {version: v1}}
      - {address: 127.0.0.1, port: 18082, zone: us-east-1b}
"#;

    fn err(text: &str) -> InvalidFile {
        match DiscoveryFile::parse("east.yaml", text) {
            Err(DiscoveryError::Invalid(e)) => *e,
            Err(other) => panic!("unexpected error {other}"),
            Ok(_) => panic!("expected an error for:\n{text}"),
        }
    }

    #[test]
    fn parses_the_documented_example() {
        let f = DiscoveryFile::parse("east.yaml", GOOD).unwrap();
        assert_eq!(f.state.cluster.id.as_str(), "east");
        assert_eq!(&*f.state.cluster.region, "us-east");
        assert_eq!(f.state.cluster.network.as_str(), "east");
        assert_eq!(f.state.services.len(), 1);
        let s = &f.state.services[0];
        assert_eq!(s.service.key.to_string(), "echo.default");
        assert_eq!(s.endpoints.len(), 2);
        assert_eq!(s.endpoints[0].locality.to_string(), "us-east/us-east-1a");
        assert_eq!(s.endpoints[0].labels.get("version"), Some("v1"));
        assert_eq!(s.endpoints[1].weight, 1);
        assert_eq!(s.endpoints[1].health, Health::Healthy);
    }

    #[test]
    fn wrong_type_names_line_and_field() {
        let e = err(&GOOD.replace("port: 18082", "port: eighty"));
        assert_eq!(e.line, 10, "{e}");
        assert_eq!(e.field, "services[0].endpoints[1].port", "{e}");
        assert!(e.to_string().starts_with("east.yaml:10:"), "{e}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = err(&GOOD.replace("weight: 1,", "wieght: 1,"));
        assert_eq!(e.line, 9, "{e}");
        assert!(e.message.contains("wieght"), "{e}");
        assert!(e.field.starts_with("services[0].endpoints[0]"), "{e}");
        let e = err(&format!("{GOOD}extra: true\n"));
        assert!(e.message.contains("extra"), "{e}");
    }

    #[test]
    fn health_checks_per_service_or_for_the_file() {
        use crate::health_check::Probe;
        let echo = ServiceKey::new("default", "echo").expect("key");
        // None by default.
        let f = DiscoveryFile::parse("east.yaml", GOOD).expect("parses");
        assert!(f.health_checks.is_empty());
        // The file's default, and a service's own.
        let with_default =
            GOOD.replace("services:\n", "health_check: {protocol: tcp}\nservices:\n");
        let f = DiscoveryFile::parse("east.yaml", &with_default).expect("parses");
        assert_eq!(
            f.health_checks.get(&echo).map(|c| &c.probe),
            Some(&Probe::Tcp)
        );
        let own = with_default.replace(
            "    endpoints:\n",
            "    health_check: {protocol: http, path: /healthz}\n    endpoints:\n",
        );
        let f = DiscoveryFile::parse("east.yaml", &own).expect("parses");
        assert!(matches!(
            f.health_checks.get(&echo).map(|c| &c.probe),
            Some(Probe::Http { path, .. }) if path == "/healthz"
        ));
        // A service opts out of the file's default.
        let none = with_default.replace(
            "    endpoints:\n",
            "    health_check: {protocol: none}\n    endpoints:\n",
        );
        let f = DiscoveryFile::parse("east.yaml", &none).expect("parses");
        assert!(f.health_checks.is_empty());
        // A bad one names the file, the line and the field.
        let bad = GOOD.replace(
            "    endpoints:\n",
            "    health_check: {protocol: http, interval: 1s, timeout: 5s}\n    endpoints:\n",
        );
        let e = err(&bad);
        assert_eq!(e.field, "services[0].health_check.timeout", "{e}");
        assert_eq!(e.line, 8, "{e}");
        assert!(e.message.contains("at most the interval"), "{e}");
        let e = err(&GOOD.replace(
            "    endpoints:\n",
            "    health_check: {protocol: http, pth: /}\n    endpoints:\n",
        ));
        assert!(e.message.contains("pth"), "{e}");
    }

    #[test]
    fn duplicate_endpoints_are_rejected() {
        let e = err(&GOOD.replace("port: 18082", "port: 18081"));
        assert_eq!(e.line, 10, "{e}");
        assert_eq!(e.field, "services[0].endpoints[1]");
        assert!(
            e.message.contains("duplicate endpoint 127.0.0.1:18081"),
            "{e}"
        );
        assert!(e.message.contains("first at line 9"), "{e}");
    }

    #[test]
    fn bad_locality_is_rejected() {
        let e = err(&GOOD.replace("zone: us-east-1b", "zone: \"us east\""));
        assert_eq!(e.line, 10, "{e}");
        assert_eq!(e.field, "services[0].endpoints[1].zone", "{e}");
        let e = err(&GOOD.replace("zone: us-east-1b", "subzone: rack1"));
        assert_eq!(e.field, "services[0].endpoints[1].subzone", "{e}");
    }

    #[test]
    fn bad_values_are_rejected() {
        let e = err(&GOOD.replace("protocol: http", "protocol: quic"));
        assert_eq!(e.line, 7, "{e}");
        assert_eq!(e.field, "services[0].ports[0].protocol", "{e}");
        assert!(e.message.contains("quic"), "{e}");
        let e = err(&GOOD.replace("port: 18081", "port: 0"));
        assert_eq!(e.field, "services[0].endpoints[0].port", "{e}");
        assert!(e.message.contains("port 0"), "{e}");
        let e = err(&GOOD.replace("cluster: east", "cluster: East"));
        assert_eq!((e.line, e.field.as_str()), (1, "cluster"), "{e}");
        let e = err(&GOOD.replace(
            "address: 127.0.0.1, port: 18082",
            "address: nowhere, port: 18082",
        ));
        assert_eq!(e.field, "services[0].endpoints[1].address", "{e}");
        let e = err(&GOOD.replace("weight: 1", "weight: 1000"));
        assert_eq!(e.field, "services[0].endpoints[0].weight", "{e}");
        let e = err(&GOOD.replace("127.0.0.1:15443", "127.0.0.1"));
        assert_eq!(e.field, "gateways[0]", "{e}");
    }

    #[test]
    fn duplicate_services_are_rejected() {
        let dup = format!("{GOOD}  - name: echo\n    ports: [{{name: http, port: 80}}]\n");
        let e = err(&dup);
        assert_eq!(e.field, "services[1]");
        assert!(e.message.contains("listed twice"), "{e}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let e = DiscoveryFile::load("/nonexistent/east.yaml").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/nonexistent/east.yaml: cannot read"),
            "{e}"
        );
    }
}
