//! The federation's vocabulary: clusters, localities, services, endpoints, failover policies and
//! link states.
//!
//! Every type is validated on construction (and on deserialization, through the same
//! constructors), so a value of one of these types is always well formed. Errors name the field
//! that is wrong.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

pub use crate::http_route::{
    Destination, HeaderMatch, HeaderValueMatch, HttpRoute, PathMatch, RETRY_CONDITIONS,
    RouteRetries,
};

/// A validation error: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ModelError {
    /// The field (or path of fields) that is wrong, e.g. `endpoints[2].zone`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl ModelError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Prefix the field path with a parent field, e.g. `zone` → `endpoints[2].zone`.
    pub fn within(mut self, parent: impl fmt::Display) -> Self {
        self.field = format!("{parent}.{}", self.field);
        self
    }
}

/// A DNS-1123 label: 1–63 characters of lowercase ASCII letters, digits and `-`, starting and
/// ending with a letter or digit. Used for cluster ids, service names and namespaces.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(Arc<str>);

impl Name {
    /// Validate `value` as a name; `field` is used in the error.
    pub fn parse(field: &str, value: &str) -> Result<Self, ModelError> {
        validate_dns_label(value).map_err(|reason| ModelError::new(field, reason))?;
        Ok(Self(Arc::from(value)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The empty name: sorts before every valid name (a range bound, never a real name).
    pub fn min_value() -> Self {
        Self(Arc::from(""))
    }

    /// A name sharing the given allocation (used by interning caches).
    pub(crate) fn from_arc_unchecked(value: Arc<str>) -> Self {
        Self(value)
    }
}

fn validate_dns_label(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    if value.len() > 63 {
        return Err(format!("`{value}` is longer than 63 characters"));
    }
    let bytes = value.as_bytes();
    if !bytes
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
    {
        return Err(format!(
            "`{value}` may contain only lowercase letters, digits and `-`"
        ));
    }
    if bytes[0] == b'-' || bytes[bytes.len() - 1] == b'-' {
        return Err(format!(
            "`{value}` must start and end with a letter or digit"
        ));
    }
    Ok(())
}

impl TryFrom<String> for Name {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        validate_dns_label(&value)?;
        Ok(Self(Arc::from(value)))
    }
}

impl From<Name> for String {
    fn from(value: Name) -> Self {
        value.0.to_string()
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A cluster's id, e.g. `east`.
pub type ClusterId = Name;

/// Where an endpoint runs: `region/zone/subzone`, as Kubernetes' `topology.kubernetes.io/region`
/// and `topology.kubernetes.io/zone` labels give it. The region is required; zone and subzone may
/// be empty (a subzone needs a zone).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Locality {
    region: Arc<str>,
    zone: Arc<str>,
    subzone: Arc<str>,
}

fn validate_locality_part(field: &str, value: &str) -> Result<(), ModelError> {
    if value.len() > 63 {
        return Err(ModelError::new(
            field,
            format!("`{value}` is longer than 63 characters"),
        ));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(ModelError::new(
            field,
            format!("`{value}` may contain only letters, digits, `-`, `_` and `.`"),
        ));
    }
    Ok(())
}

impl Locality {
    pub fn new(region: &str, zone: &str, subzone: &str) -> Result<Self, ModelError> {
        if region.is_empty() {
            return Err(ModelError::new("region", "must not be empty"));
        }
        validate_locality_part("region", region)?;
        validate_locality_part("zone", zone)?;
        validate_locality_part("subzone", subzone)?;
        if zone.is_empty() && !subzone.is_empty() {
            return Err(ModelError::new(
                "subzone",
                format!("`{subzone}` is set but the zone is empty"),
            ));
        }
        Ok(Self {
            region: Arc::from(region),
            zone: Arc::from(zone),
            subzone: Arc::from(subzone),
        })
    }

    /// Parse `region[/zone[/subzone]]`.
    pub fn parse(field: &str, value: &str) -> Result<Self, ModelError> {
        let parts: Vec<&str> = value.split('/').collect();
        if parts.len() > 3 {
            return Err(ModelError::new(
                field,
                format!("`{value}` has more than three parts; expected region/zone/subzone"),
            ));
        }
        let get = |i: usize| parts.get(i).copied().unwrap_or("");
        if parts.len() >= 2 && get(1).is_empty() {
            return Err(ModelError::new(
                field,
                format!("`{value}` has an empty zone; expected region/zone/subzone"),
            ));
        }
        if parts.len() == 3 && get(2).is_empty() {
            return Err(ModelError::new(
                field,
                format!("`{value}` has an empty subzone; expected region/zone/subzone"),
            ));
        }
        Locality::new(get(0), get(1), get(2))
            .map_err(|e| ModelError::new(field, format!("`{value}` does not parse: {}", e)))
    }

    pub fn region(&self) -> &str {
        &self.region
    }
    pub fn zone(&self) -> &str {
        &self.zone
    }
    pub fn subzone(&self) -> &str {
        &self.subzone
    }
}

impl fmt::Display for Locality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.region)?;
        if !self.zone.is_empty() {
            write!(f, "/{}", self.zone)?;
        }
        if !self.subzone.is_empty() {
            write!(f, "/{}", self.subzone)?;
        }
        Ok(())
    }
}

impl fmt::Debug for Locality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Locality({self})")
    }
}

impl FromStr for Locality {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Locality::parse("locality", s)
    }
}

impl Serialize for Locality {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Locality {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Locality::parse("locality", &s).map_err(|e| serde::de::Error::custom(e.reason))
    }
}

/// The application protocol of a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 (and HTTP/2 when both sides agree by ALPN or prior knowledge).
    Http,
    /// HTTP/2 only (h2c or h2 over TLS).
    Http2,
    /// gRPC over HTTP/2.
    Grpc,
    /// Opaque TCP.
    Tcp,
}

impl Protocol {
    pub const ALL: [Protocol; 4] = [
        Protocol::Http,
        Protocol::Http2,
        Protocol::Grpc,
        Protocol::Tcp,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
            Protocol::Tcp => "tcp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Protocol::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                ModelError::new(
                    "protocol",
                    format!("unknown protocol `{s}`; expected one of http, http2, grpc, tcp"),
                )
            })
    }
}

/// A TCP port, never 0.
pub fn validate_port(field: &str, port: u16) -> Result<u16, ModelError> {
    if port == 0 {
        return Err(ModelError::new(field, "port 0 is not a valid port"));
    }
    Ok(port)
}

/// One named port of a service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServicePort {
    pub name: Name,
    pub port: u16,
    pub protocol: Protocol,
}

impl Protocol {
    /// The ALPN protocol a client offers an endpoint's sidecar (which passes the bytes on to
    /// the application as they are): `http/1.1`, `h2`, or none for opaque TCP.
    pub fn alpn(self) -> Option<&'static str> {
        match self {
            Protocol::Http => Some("http/1.1"),
            Protocol::Http2 | Protocol::Grpc => Some("h2"),
            Protocol::Tcp => None,
        }
    }
}

impl ServicePort {
    pub fn new(name: &str, port: u16, protocol: Protocol) -> Result<Self, ModelError> {
        Ok(Self {
            name: Name::parse("name", name)?,
            port: validate_port("port", port)?,
            protocol,
        })
    }
}

/// A service's identity: `name.namespace`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceKey {
    pub namespace: Name,
    pub name: Name,
}

impl ServiceKey {
    pub fn new(namespace: &str, name: &str) -> Result<Self, ModelError> {
        Ok(Self {
            namespace: Name::parse("namespace", namespace)?,
            name: Name::parse("name", name)?,
        })
    }

    /// Parse `name.namespace` (the form operators type).
    pub fn parse(field: &str, value: &str) -> Result<Self, ModelError> {
        let Some((name, namespace)) = value.split_once('.') else {
            return Err(ModelError::new(
                field,
                format!("`{value}` is not of the form SERVICE.NAMESPACE"),
            ));
        };
        let namespace = namespace
            .strip_suffix(".svc.clusterset.local")
            .unwrap_or(namespace);
        ServiceKey::new(namespace, name).map_err(|e| e.within(field))
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.name, self.namespace)
    }
}

impl fmt::Debug for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServiceKey({self})")
    }
}

/// A service: its key and its ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub key: ServiceKey,
    pub ports: Arc<[ServicePort]>,
}

impl Service {
    pub fn new(key: ServiceKey, ports: Vec<ServicePort>) -> Result<Self, ModelError> {
        if ports.is_empty() {
            return Err(ModelError::new(
                "ports",
                "a service needs at least one port",
            ));
        }
        for (i, p) in ports.iter().enumerate() {
            if ports[..i].iter().any(|q| q.name == p.name) {
                return Err(ModelError::new(
                    format!("ports[{i}].name"),
                    format!("port name `{}` is used twice", p.name),
                ));
            }
            if ports[..i].iter().any(|q| q.port == p.port) {
                return Err(ModelError::new(
                    format!("ports[{i}].port"),
                    format!("port {} is used twice", p.port),
                ));
            }
        }
        Ok(Self {
            key,
            ports: ports.into(),
        })
    }
}

/// An endpoint's health, as the registry reports it (Envoy's `HealthStatus` subset).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    #[default]
    Healthy,
    /// Serving, but should be used only when healthy endpoints run short.
    Degraded,
    /// Terminating: finishes what it has, gets no new traffic.
    Draining,
    Unhealthy,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Degraded => "degraded",
            Health::Draining => "draining",
            Health::Unhealthy => "unhealthy",
        }
    }
    /// Whether new traffic may be sent here.
    pub fn is_serving(self) -> bool {
        matches!(self, Health::Healthy | Health::Degraded)
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Labels of an endpoint (Kubernetes label syntax). Shared: endpoints with the same labels share
/// one allocation.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(
    try_from = "BTreeMap<String, String>",
    into = "BTreeMap<String, String>"
)]
pub struct Labels(Arc<BTreeMap<String, String>>);

impl Labels {
    pub fn new(map: BTreeMap<String, String>) -> Result<Self, ModelError> {
        if map.is_empty() {
            return Ok(Self::default());
        }
        for (k, v) in &map {
            validate_label_key(k).map_err(|r| ModelError::new(format!("labels.{k}"), r))?;
            validate_label_value(v).map_err(|r| ModelError::new(format!("labels.{k}"), r))?;
        }
        Ok(Self(Arc::new(map)))
    }
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn as_map(&self) -> &BTreeMap<String, String> {
        &self.0
    }
}

impl fmt::Debug for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl TryFrom<BTreeMap<String, String>> for Labels {
    type Error = String;
    fn try_from(value: BTreeMap<String, String>) -> Result<Self, Self::Error> {
        Labels::new(value).map_err(|e| e.reason)
    }
}

impl From<Labels> for BTreeMap<String, String> {
    fn from(value: Labels) -> Self {
        Arc::unwrap_or_clone(value.0)
    }
}

fn label_name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

/// A Kubernetes label key: `[prefix/]name`, the prefix a DNS subdomain.
pub fn validate_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && (p.is_empty() || p.len() > 253 || !p.split('.').all(|l| validate_dns_label(l).is_ok()))
    {
        return Err(format!("label key `{key}` has an invalid prefix `{p}`"));
    }
    if !label_name_ok(name) {
        return Err(format!(
            "label key `{key}` must be 1-63 letters, digits, `-`, `_` or `.`, starting and ending alphanumeric"
        ));
    }
    Ok(())
}

/// A Kubernetes label value: empty, or a label name.
pub fn validate_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() || label_name_ok(value) {
        Ok(())
    } else {
        Err(format!(
            "label value `{value}` must be at most 63 letters, digits, `-`, `_` or `.`, starting and ending alphanumeric"
        ))
    }
}

/// Endpoint load-balancing weights are 1..=128 (Envoy's limit for locality weights is wider,
/// but keeping endpoint weights small keeps weighted round robin fair and cheap).
pub const MAX_WEIGHT: u32 = 128;

/// The endpoint label that says how the endpoint is reached: [`TLS_MODE_MUTUAL`] when a sidecar
/// inbound listener fronts it (mutual TLS with workload certificates, like Istio's
/// `security.istio.io/tlsMode: istio`); absent (or anything else), plaintext.
pub const TLS_MODE_LABEL: &str = "strait.io/tls-mode";
/// The value of [`TLS_MODE_LABEL`] for endpoints behind a sidecar.
pub const TLS_MODE_MUTUAL: &str = "mutual";

/// One instance of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub address: IpAddr,
    pub port: u16,
    pub locality: Arc<Locality>,
    pub cluster: ClusterId,
    pub health: Health,
    pub weight: u32,
    pub labels: Labels,
}

impl Endpoint {
    pub fn new(
        address: IpAddr,
        port: u16,
        locality: Locality,
        cluster: ClusterId,
    ) -> Result<Self, ModelError> {
        Ok(Self {
            address,
            port: validate_port("port", port)?,
            locality: Arc::new(locality),
            cluster,
            health: Health::Healthy,
            weight: 1,
            labels: Labels::default(),
        })
    }

    pub fn with_weight(mut self, weight: u32) -> Result<Self, ModelError> {
        self.weight = validate_weight("weight", weight)?;
        Ok(self)
    }

    pub fn with_health(mut self, health: Health) -> Self {
        self.health = health;
        self
    }

    pub fn with_labels(mut self, labels: Labels) -> Self {
        self.labels = labels;
        self
    }

    /// A sidecar fronts the endpoint: it is reached with mutual TLS ([`TLS_MODE_LABEL`]).
    pub fn mutual_tls(&self) -> bool {
        self.labels.get(TLS_MODE_LABEL) == Some(TLS_MODE_MUTUAL)
    }

    /// `address:port`.
    pub fn socket_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.address, self.port)
    }
}

pub fn validate_weight(field: &str, weight: u32) -> Result<u32, ModelError> {
    if weight == 0 || weight > MAX_WEIGHT {
        return Err(ModelError::new(
            field,
            format!("weight {weight} is out of range 1..={MAX_WEIGHT}"),
        ));
    }
    Ok(weight)
}

/// The endpoints of one service in one cluster: the unit the registry stores under one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceEndpoints {
    pub cluster: ClusterId,
    pub service: Service,
    pub endpoints: Vec<Endpoint>,
}

impl ServiceEndpoints {
    /// Checks that every endpoint belongs to `cluster` and that no address:port repeats.
    pub fn new(
        cluster: ClusterId,
        service: Service,
        endpoints: Vec<Endpoint>,
    ) -> Result<Self, ModelError> {
        for (i, e) in endpoints.iter().enumerate() {
            if e.cluster != cluster {
                return Err(ModelError::new(
                    format!("endpoints[{i}].cluster"),
                    format!(
                        "endpoint belongs to cluster `{}`, not `{cluster}`",
                        e.cluster
                    ),
                ));
            }
        }
        let mut seen = std::collections::HashSet::with_capacity(endpoints.len());
        for (i, e) in endpoints.iter().enumerate() {
            if !seen.insert(e.socket_addr()) {
                return Err(ModelError::new(
                    format!("endpoints[{i}]"),
                    format!("duplicate endpoint {}", e.socket_addr()),
                ));
            }
        }
        Ok(Self {
            cluster,
            service,
            endpoints,
        })
    }
}

/// A gateway address: `host:port`, where host is an IP address or a DNS name.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct GatewayAddress {
    host: String,
    port: u16,
}

impl GatewayAddress {
    pub fn parse(field: &str, value: &str) -> Result<Self, ModelError> {
        let err = |r: String| ModelError::new(field, r);
        let (host, port) = if let Some(rest) = value.strip_prefix('[') {
            let (h, p) = rest
                .split_once("]:")
                .ok_or_else(|| err(format!("`{value}` is not of the form [IPv6]:PORT")))?;
            (h, p)
        } else {
            value
                .rsplit_once(':')
                .ok_or_else(|| err(format!("`{value}` is not of the form HOST:PORT")))?
        };
        let port: u16 = port
            .parse()
            .map_err(|_| err(format!("`{value}` has an invalid port `{port}`")))?;
        validate_port(field, port)?;
        if host.parse::<IpAddr>().is_err() {
            let ok = !host.is_empty()
                && host.len() <= 253
                && host.trim_end_matches('.').split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                        && !l.starts_with('-')
                        && !l.ends_with('-')
                });
            if !ok {
                return Err(err(format!(
                    "`{host}` is neither an IP address nor a DNS name"
                )));
            }
        }
        Ok(Self {
            host: host.to_string(),
            port,
        })
    }
    pub fn host(&self) -> &str {
        &self.host
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    /// The socket address when the host is an IP literal.
    pub fn socket_addr(&self) -> Option<std::net::SocketAddr> {
        self.host
            .parse::<IpAddr>()
            .ok()
            .map(|ip| std::net::SocketAddr::new(ip, self.port))
    }
}

impl fmt::Display for GatewayAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Debug for GatewayAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl From<std::net::SocketAddr> for GatewayAddress {
    fn from(a: std::net::SocketAddr) -> Self {
        Self {
            host: a.ip().to_string(),
            port: a.port(),
        }
    }
}

impl std::str::FromStr for GatewayAddress {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, ModelError> {
        GatewayAddress::parse("address", s)
    }
}

impl TryFrom<String> for GatewayAddress {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        GatewayAddress::parse("gateway", &value).map_err(|e| e.reason)
    }
}

impl From<GatewayAddress> for String {
    fn from(value: GatewayAddress) -> Self {
        value.to_string()
    }
}

/// A member cluster of the federation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    pub id: ClusterId,
    pub region: Arc<str>,
    /// The network the cluster's endpoints are reachable on directly; clusters on other networks
    /// are reached through their gateways. Defaults to the cluster id (every cluster its own
    /// network).
    pub network: Name,
    pub gateways: Vec<GatewayAddress>,
}

impl Cluster {
    pub fn new(
        id: ClusterId,
        region: &str,
        network: Option<Name>,
        gateways: Vec<GatewayAddress>,
    ) -> Result<Self, ModelError> {
        if region.is_empty() {
            return Err(ModelError::new("region", "must not be empty"));
        }
        validate_locality_part("region", region)?;
        for (i, g) in gateways.iter().enumerate() {
            if gateways[..i].contains(g) {
                return Err(ModelError::new(
                    format!("gateways[{i}]"),
                    format!("gateway address {g} is listed twice"),
                ));
            }
        }
        Ok(Self {
            network: network.unwrap_or_else(|| id.clone()),
            id,
            region: Arc::from(region),
            gateways,
        })
    }
}

/// One preference in a failover policy's ordered list.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailoverTarget {
    Cluster(ClusterId),
    Region(String),
}

impl fmt::Display for FailoverTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailoverTarget::Cluster(c) => write!(f, "cluster {c}"),
            FailoverTarget::Region(r) => write!(f, "region {r}"),
        }
    }
}

/// A locality pattern for `distribute`: `region[/zone[/subzone]]`, each part possibly `*`, and a
/// trailing `*` matching the rest.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LocalityPattern(String);

impl LocalityPattern {
    pub fn parse(field: &str, value: &str) -> Result<Self, ModelError> {
        let parts: Vec<&str> = value.split('/').collect();
        if value.is_empty() || parts.len() > 3 {
            return Err(ModelError::new(
                field,
                format!("`{value}` is not a locality pattern region[/zone[/subzone]]"),
            ));
        }
        for (i, p) in parts.iter().enumerate() {
            if *p == "*" {
                if i != parts.len() - 1 && parts[i + 1..].iter().any(|q| *q != "*") {
                    // `*` in the middle is allowed only if everything after is `*` as well.
                    return Err(ModelError::new(
                        field,
                        format!("`{value}`: `*` may only be followed by `*`"),
                    ));
                }
                continue;
            }
            if p.is_empty() {
                return Err(ModelError::new(
                    field,
                    format!("`{value}` has an empty part"),
                ));
            }
            validate_locality_part(field, p)?;
        }
        Ok(Self(value.to_string()))
    }

    pub fn matches(&self, locality: &Locality) -> bool {
        let want = [locality.region(), locality.zone(), locality.subzone()];
        for (i, p) in self.0.split('/').enumerate() {
            if p == "*" {
                return true;
            }
            if want.get(i).copied() != Some(p) {
                return false;
            }
        }
        true
    }
}

impl fmt::Display for LocalityPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for LocalityPattern {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        LocalityPattern::parse("locality", &value).map_err(|e| e.reason)
    }
}

impl From<LocalityPattern> for String {
    fn from(value: LocalityPattern) -> Self {
        value.0
    }
}

/// Weighted distribution of traffic from one source locality to several destination localities.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Distribute {
    pub from: LocalityPattern,
    /// Destination pattern → weight (percent); the weights add up to 100.
    pub to: BTreeMap<LocalityPattern, u32>,
}

/// Which services a policy applies to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyScope {
    /// The default for every service without its own policy.
    Default,
    /// One service.
    Service(ServiceKey),
}

impl fmt::Display for PolicyScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyScope::Default => f.write_str("default"),
            PolicyScope::Service(k) => write!(f, "{k}"),
        }
    }
}

/// A failover policy: ordered targets, label-based priorities, and weighted distribution. The
/// three combine: targets order the clusters, `failover_priority` orders endpoints by how many
/// leading labels they share with the caller, and `distribute` splits traffic within a level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverPolicy {
    pub scope: PolicyScope,
    /// Ordered preferences (e.g. `[cluster west, cluster central]`); endpoints matching none come
    /// after all of them unless `exclude_others` is set.
    #[serde(default)]
    pub targets: Vec<FailoverTarget>,
    /// When set, endpoints matching no target are not used at all.
    #[serde(default)]
    pub exclude_others: bool,
    /// Label keys, most significant first (Istio `failoverPriority`); the pseudo-labels
    /// `topology.kubernetes.io/region`, `topology.kubernetes.io/zone` and `strait.io/cluster`
    /// refer to the endpoint's locality and cluster.
    #[serde(default)]
    pub failover_priority: Vec<String>,
    #[serde(default)]
    pub distribute: Vec<Distribute>,
    /// HTTP routing rules (service policies only), tried in order; requests that match none go
    /// to the service itself.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<HttpRoute>,
}

impl FailoverPolicy {
    pub fn validate(&self) -> Result<(), ModelError> {
        for (i, t) in self.targets.iter().enumerate() {
            if self.targets[..i].contains(t) {
                return Err(ModelError::new(
                    format!("targets[{i}]"),
                    format!("{t} is listed twice"),
                ));
            }
            if let FailoverTarget::Region(r) = t {
                if r.is_empty() {
                    return Err(ModelError::new(
                        format!("targets[{i}].region"),
                        "must not be empty",
                    ));
                }
                validate_locality_part(&format!("targets[{i}].region"), r)?;
            }
        }
        if self.exclude_others && self.targets.is_empty() {
            return Err(ModelError::new(
                "exclude_others",
                "set without any targets: it would exclude every endpoint",
            ));
        }
        for (i, k) in self.failover_priority.iter().enumerate() {
            validate_label_key(k)
                .map_err(|r| ModelError::new(format!("failover_priority[{i}]"), r))?;
            if self.failover_priority[..i].contains(k) {
                return Err(ModelError::new(
                    format!("failover_priority[{i}]"),
                    format!("label `{k}` is listed twice"),
                ));
            }
        }
        for (i, d) in self.distribute.iter().enumerate() {
            if d.to.is_empty() {
                return Err(ModelError::new(
                    format!("distribute[{i}].to"),
                    "needs at least one destination",
                ));
            }
            let sum: u64 = d.to.values().map(|w| u64::from(*w)).sum();
            if sum != 100 {
                return Err(ModelError::new(
                    format!("distribute[{i}].to"),
                    format!("weights add up to {sum}, not 100"),
                ));
            }
            if self.distribute[..i].iter().any(|o| o.from == d.from) {
                return Err(ModelError::new(
                    format!("distribute[{i}].from"),
                    format!("`{}` is listed twice", d.from),
                ));
            }
        }
        if !self.http.is_empty() && self.scope == PolicyScope::Default {
            return Err(ModelError::new(
                "http",
                "HTTP rules belong to a service's policy: give `service`",
            ));
        }
        for (i, r) in self.http.iter().enumerate() {
            r.validate()
                .map_err(|e| e.within(format_args!("http[{i}]")))?;
            if let Some(n) = &r.name
                && self.http[..i].iter().any(|o| o.name.as_ref() == Some(n))
            {
                return Err(ModelError::new(
                    format!("http[{i}].name"),
                    format!("`{n}` is used twice"),
                ));
            }
        }
        Ok(())
    }
}

/// The health of an inter-cluster link, as a gateway measures it. Declared best first: the
/// derived order (`Up < Degraded < Down`) is the order of preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkHealth {
    Up,
    Degraded,
    Down,
}

impl LinkHealth {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkHealth::Up => "up",
            LinkHealth::Degraded => "degraded",
            LinkHealth::Down => "down",
        }
    }
}

impl fmt::Display for LinkHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A cluster taken out of the federation on purpose (`strait registry withdraw`, or a control
/// plane's `--withdraw-on-exit`): its entries are removed, and readers must not keep serving its
/// last endpoints as they do for a cluster whose control plane only went silent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Withdrawal {
    pub cluster: ClusterId,
    #[serde(with = "rfc3339")]
    pub at: SystemTime,
}

/// One directed link between two clusters' gateways.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkState {
    pub from: ClusterId,
    pub to: ClusterId,
    pub state: LinkHealth,
    /// Smoothed round-trip time in milliseconds.
    pub rtt_ms: f64,
    /// Probe loss ratio in 0.0..=1.0.
    pub loss: f64,
    /// When the link entered its current state.
    #[serde(with = "rfc3339")]
    pub since: SystemTime,
}

impl LinkState {
    /// One link measured by several gateway replicas of its `from` cluster: the best of them
    /// (up before degraded before down, then the lowest RTT) — the link carries traffic while
    /// any replica's does. `None` when there is none.
    pub fn merge<'a>(replicas: impl IntoIterator<Item = &'a LinkState>) -> Option<LinkState> {
        replicas
            .into_iter()
            .min_by(|a, b| a.state.cmp(&b.state).then(a.rtt_ms.total_cmp(&b.rtt_ms)))
            .cloned()
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        if self.from == self.to {
            return Err(ModelError::new(
                "to",
                "a link must join two different clusters",
            ));
        }
        if !self.rtt_ms.is_finite() || self.rtt_ms < 0.0 {
            return Err(ModelError::new(
                "rtt_ms",
                format!("{} is not a valid RTT", self.rtt_ms),
            ));
        }
        if !(0.0..=1.0).contains(&self.loss) {
            return Err(ModelError::new(
                "loss",
                format!("{} is not in 0..=1", self.loss),
            ));
        }
        Ok(())
    }
}

/// How one cluster's gateway sees a peer cluster — a Kubernetes `FederatedCluster` object of
/// `cluster`, or the same written by hand: where the peer's gateways answer, and what the
/// peer's gateway certificate must name (`trust_domain`) and chain to (`ca_bundle`; without it,
/// the federation CA). A peering makes the peer a member for `cluster`'s gateway, its addresses
/// take precedence over those the peer publishes itself, and a `ca_bundle` pins the peer to that
/// CA (a certificate for the peer from any other CA is refused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peering {
    /// The cluster that declared the peering.
    pub cluster: ClusterId,
    /// The peer cluster.
    pub peer: ClusterId,
    pub region: Name,
    pub gateways: Vec<GatewayAddress>,
    pub trust_domain: String,
    /// PEM certificates the peer's gateway certificate must chain to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<String>,
}

impl Peering {
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.cluster == self.peer {
            return Err(ModelError::new(
                "peer",
                format!("cluster `{}` cannot peer with itself", self.peer),
            ));
        }
        if self.gateways.is_empty() {
            return Err(ModelError::new(
                "gateways",
                "at least one address is required",
            ));
        }
        crate::identity::validate_trust_domain(&self.trust_domain)
            .map_err(|e| ModelError::new("trust_domain", e.to_string()))?;
        self.ca_certs()
            .map_err(|e| ModelError::new("ca_bundle", e))?;
        Ok(())
    }

    /// The certificates of `ca_bundle` (`Ok(empty)` without one).
    pub fn ca_certs(&self) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, String> {
        use rustls_pki_types::pem::PemObject;
        let Some(pem) = &self.ca_bundle else {
            return Ok(Vec::new());
        };
        let certs = rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("invalid PEM: {e}"))?;
        if certs.is_empty() {
            return Err("contains no PEM CERTIFICATE block".into());
        }
        for (i, c) in certs.iter().enumerate() {
            let info = crate::identity::inspect_der(c, SystemTime::now())
                .map_err(|e| format!("certificate #{}: {e}", i + 1))?;
            if !info.is_ca {
                return Err(format!(
                    "certificate #{} ({}) is not a CA certificate",
                    i + 1,
                    info.subject
                ));
            }
        }
        Ok(certs)
    }
}

/// RFC 3339 timestamps for `SystemTime` fields.
pub mod rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::SystemTime;

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_millis(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_rfc3339_weak(&s)
            .map_err(|e| serde::de::Error::custom(format!("`{s}` is not an RFC 3339 time: {e}")))
    }
}

/// Everything one cluster publishes: its own record and its services' endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterState {
    pub cluster: Cluster,
    pub services: Vec<ServiceEndpoints>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(Name::parse("cluster", "east-1").is_ok());
        let e = Name::parse("cluster", "East").unwrap_err();
        assert_eq!(e.field, "cluster");
        assert!(e.reason.contains("lowercase"), "{e}");
        assert!(Name::parse("cluster", "").is_err());
        assert!(Name::parse("cluster", "-a").is_err());
        assert!(Name::parse("cluster", &"a".repeat(64)).is_err());
    }

    #[test]
    fn localities() {
        let l = Locality::parse("zone", "us-east/us-east-1a/rack1").unwrap();
        assert_eq!(
            (l.region(), l.zone(), l.subzone()),
            ("us-east", "us-east-1a", "rack1")
        );
        assert_eq!(l.to_string(), "us-east/us-east-1a/rack1");
        assert_eq!(
            Locality::parse("l", "us-east").unwrap().to_string(),
            "us-east"
        );
        for bad in ["", "a/b/c/d", "a//c", "a/b/", "a b", "/zone"] {
            let e = Locality::parse("locality", bad).unwrap_err();
            assert_eq!(e.field, "locality", "{bad}: {e}");
        }
    }

    #[test]
    fn protocols_and_ports() {
        assert_eq!("grpc".parse::<Protocol>().unwrap(), Protocol::Grpc);
        let e = "quic".parse::<Protocol>().unwrap_err();
        assert!(e.reason.contains("unknown protocol `quic`"));
        assert_eq!(
            ServicePort::new("http", 0, Protocol::Http)
                .unwrap_err()
                .field,
            "port"
        );
        let key = ServiceKey::new("default", "echo").unwrap();
        let p = ServicePort::new("http", 80, Protocol::Http).unwrap();
        let e = Service::new(key.clone(), vec![p.clone(), p]).unwrap_err();
        assert_eq!(e.field, "ports[1].name");
        assert!(Service::new(key, vec![]).is_err());
    }

    #[test]
    fn service_keys() {
        let k = ServiceKey::parse("service", "echo.default").unwrap();
        assert_eq!(k.to_string(), "echo.default");
        let k2 = ServiceKey::parse("service", "echo.default.svc.clusterset.local").unwrap();
        assert_eq!(k, k2);
        assert!(ServiceKey::parse("service", "echo").is_err());
    }

    #[test]
    fn endpoints_and_sets() {
        let c = Name::parse("cluster", "east").unwrap();
        let l = Locality::parse("l", "us-east/a").unwrap();
        let ep = Endpoint::new("10.0.0.1".parse().unwrap(), 80, l.clone(), c.clone()).unwrap();
        assert_eq!(ep.clone().with_weight(0).unwrap_err().field, "weight");
        assert!(Endpoint::new("10.0.0.1".parse().unwrap(), 0, l, c.clone()).is_err());
        let svc = Service::new(
            ServiceKey::new("default", "echo").unwrap(),
            vec![ServicePort::new("http", 80, Protocol::Http).unwrap()],
        )
        .unwrap();
        let e = ServiceEndpoints::new(c.clone(), svc.clone(), vec![ep.clone(), ep.clone()])
            .unwrap_err();
        assert_eq!(e.field, "endpoints[1]");
        let mut other = ep.clone();
        other.cluster = Name::parse("c", "west").unwrap();
        let e = ServiceEndpoints::new(c, svc, vec![other]).unwrap_err();
        assert_eq!(e.field, "endpoints[0].cluster");
    }

    #[test]
    fn labels() {
        let mut m = BTreeMap::new();
        m.insert("topology.kubernetes.io/zone".to_string(), "a".to_string());
        m.insert("version".to_string(), "v1".to_string());
        assert!(Labels::new(m.clone()).is_ok());
        m.insert("bad key!".to_string(), "x".to_string());
        assert_eq!(Labels::new(m).unwrap_err().field, "labels.bad key!");
    }

    #[test]
    fn gateway_addresses() {
        let g = GatewayAddress::parse("g", "gw.east.example.com:15443").unwrap();
        assert_eq!((g.host(), g.port()), ("gw.east.example.com", 15443));
        assert!(g.socket_addr().is_none());
        let g = GatewayAddress::parse("g", "[::1]:15443").unwrap();
        assert_eq!(g.to_string(), "[::1]:15443");
        assert!(g.socket_addr().is_some());
        for bad in ["nohost", "a:0", "a:99999", "bad_host:1", ":1"] {
            assert!(GatewayAddress::parse("g", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn policies() {
        let west = Name::parse("c", "west").unwrap();
        let mut p = FailoverPolicy {
            scope: PolicyScope::Default,
            targets: vec![
                FailoverTarget::Cluster(west.clone()),
                FailoverTarget::Region("us-east".into()),
            ],
            exclude_others: false,
            failover_priority: vec!["topology.kubernetes.io/region".into(), "version".into()],
            distribute: vec![],
            http: vec![],
        };
        p.validate().unwrap();
        p.targets.push(FailoverTarget::Cluster(west));
        assert_eq!(p.validate().unwrap_err().field, "targets[2]");
        p.targets.pop();
        let mut to = BTreeMap::new();
        to.insert(LocalityPattern::parse("t", "us-east/*").unwrap(), 80);
        to.insert(LocalityPattern::parse("t", "us-west/*").unwrap(), 10);
        p.distribute.push(Distribute {
            from: LocalityPattern::parse("f", "us-east/*").unwrap(),
            to,
        });
        let e = p.validate().unwrap_err();
        assert_eq!(e.field, "distribute[0].to");
        assert!(e.reason.contains("90"));
        let pat = LocalityPattern::parse("p", "us-east/*").unwrap();
        assert!(pat.matches(&Locality::parse("l", "us-east/z1").unwrap()));
        assert!(!pat.matches(&Locality::parse("l", "us-west/z1").unwrap()));
        assert!(LocalityPattern::parse("p", "*/z1").is_err());
    }

    #[test]
    fn link_states() {
        let s = LinkState {
            from: Name::parse("c", "east").unwrap(),
            to: Name::parse("c", "west").unwrap(),
            state: LinkHealth::Degraded,
            rtt_ms: 0.4,
            loss: 0.05,
            since: SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123),
        };
        s.validate().unwrap();
        let json = serde_json::to_string(&s).unwrap();
        assert!(
            json.contains("\"since\":\"2023-11-14T22:13:20.123Z\""),
            "{json}"
        );
        let back: LinkState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        let mut bad = s.clone();
        bad.loss = 2.0;
        assert_eq!(bad.validate().unwrap_err().field, "loss");
    }
}
