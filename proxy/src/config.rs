//! The proxy's own configuration model, and its translation from xDS resources.
//!
//! Every xDS resource the proxy accepts becomes one of the types below, validated as it is
//! translated: anything the proxy cannot apply faithfully is an error naming the resource and
//! the field, which the xDS client sends back as a NACK (the proxy keeps its last good config).
//! Fields Strait does not use are ignored only where ignoring them cannot change where traffic
//! goes; a routing feature the proxy does not implement is refused rather than silently dropped.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as cluster;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint;
use envoy_types::pb::envoy::config::listener::v3 as listener;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp_proxy;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::google::protobuf::{Any, value::Kind};
use prost::Message;

/// Type URLs of what the proxy accepts.
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ASSIGNMENT_TYPE: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTES_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
const HCM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const TCP_PROXY_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const HTTP_OPTIONS_KEY: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
const INTERNAL_UPSTREAM: &str = "envoy.transport_sockets.internal_upstream";
const ROUTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";

// The metadata namespaces and keys of endpoints (the xDS contract): reached through the
// gateway, and matched by `transport_socket_matches`.
use federation::xds_contract::{
    SOCKET_MATCH_NAMESPACE, TUNNEL_AUTHORITY, TUNNEL_CLUSTER, TUNNEL_NAMESPACE,
};
const TLS_SOCKET: &str = "envoy.transport_sockets.tls";
const RAW_BUFFER: &str = "envoy.transport_sockets.raw_buffer";
/// Envoy's listener filter that restores a redirected connection's original destination.
pub const ORIGINAL_DST_FILTER: &str = "envoy.filters.listener.original_dst";
const UPSTREAM_TLS_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
/// The secrets an upstream TLS context may name: the proxy presents its own workload
/// certificate and trusts the federation CA (the names of the Envoy bootstrap's static
/// secrets, so that one CDS resource serves both).
pub use federation::xds_contract::{CA_SECRET, WORKLOAD_SECRET};

/// A resource the proxy cannot apply: which one, which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {name:?}: {field}: {message}")]
pub struct ConfigError {
    pub kind: &'static str,
    pub name: String,
    pub field: String,
    pub message: String,
}

struct Ctx<'a> {
    kind: &'static str,
    name: &'a str,
}

impl Ctx<'_> {
    fn err(&self, field: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            kind: self.kind,
            name: self.name.to_string(),
            field: field.into(),
            message: message.into(),
        }
    }
}

fn decode<M: Message + Default>(
    any: &Any,
    want: &str,
    kind: &'static str,
) -> Result<M, ConfigError> {
    let ctx = Ctx { kind, name: "?" };
    if any.type_url != want {
        return Err(ctx.err("type_url", format!("{} is not {want}", any.type_url)));
    }
    M::decode(any.value.as_slice()).map_err(|e| ctx.err("(encoding)", e.to_string()))
}

/// The name of a resource of one of the four types (state-of-the-world responses carry no
/// names of their own).
pub fn resource_name(any: &Any) -> Option<String> {
    let v = any.value.as_slice();
    match any.type_url.as_str() {
        CLUSTER_TYPE => cluster::Cluster::decode(v).ok().map(|c| c.name),
        ASSIGNMENT_TYPE => endpoint::ClusterLoadAssignment::decode(v)
            .ok()
            .map(|c| c.cluster_name),
        LISTENER_TYPE => listener::Listener::decode(v).ok().map(|l| l.name),
        ROUTES_TYPE => route::RouteConfiguration::decode(v).ok().map(|r| r.name),
        _ => None,
    }
}

fn duration(d: &envoy_types::pb::google::protobuf::Duration) -> Option<Duration> {
    let secs = u64::try_from(d.seconds).ok()?;
    let nanos = u32::try_from(d.nanos).ok().filter(|n| *n < 1_000_000_000)?;
    Some(Duration::new(secs, nanos))
}

fn opt_duration(
    ctx: &Ctx<'_>,
    field: &str,
    d: Option<&envoy_types::pb::google::protobuf::Duration>,
) -> Result<Option<Duration>, ConfigError> {
    d.map(|d| duration(d).ok_or_else(|| ctx.err(field, "negative or malformed duration")))
        .transpose()
}

// ---------------------------------------------------------------------------------------------
// Clusters

/// How a cluster picks an endpoint within a locality.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbPolicy {
    RoundRobin,
    /// Power of `choices` random choices, the one with fewer active requests.
    LeastRequest {
        choices: u32,
    },
}

/// Outlier detection (Envoy's semantics; only the detectors Strait uses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierDetection {
    pub consecutive_5xx: u32,
    pub consecutive_gateway_failure: u32,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    /// Envoy's defaults.
    fn default() -> Self {
        Self {
            consecutive_5xx: 5,
            consecutive_gateway_failure: 5,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 10,
        }
    }
}

/// Circuit breaker thresholds (default priority; Envoy's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    /// Retries in flight at once (ignored when a retry budget is set, as in Envoy).
    pub max_retries: u32,
    pub retry_budget: Option<RetryBudget>,
}

/// Envoy's retry budget: retries in flight may be at most `percent` of the requests in flight,
/// but at least `min_concurrency`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryBudget {
    /// Hundredths of a percent (Envoy's default 20 % = 2000).
    pub percent_x100: u32,
    pub min_concurrency: u32,
}

impl Thresholds {
    /// Whether one more retry may start, with `requests` and `retries` in flight.
    pub fn retry_allowed(&self, requests: u64, retries: u64) -> bool {
        match self.retry_budget {
            None => retries < u64::from(self.max_retries),
            Some(b) => {
                let share = requests.saturating_mul(u64::from(b.percent_x100)) / 10_000;
                retries < share.max(u64::from(b.min_concurrency))
            }
        }
    }
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
            retry_budget: None,
        }
    }
}

/// A cluster (CDS): how to talk to its endpoints; the endpoints come from its assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    pub name: String,
    pub connect_timeout: Duration,
    pub lb: LbPolicy,
    /// Speak HTTP/2 (prior knowledge) to the endpoints.
    pub http2: bool,
    /// Its endpoints may be remote (reached through the local gateway).
    pub tunnel: bool,
    pub outlier: Option<OutlierDetection>,
    pub thresholds: Thresholds,
    /// Transport-socket matches (`transport_socket_matches`), in order: the first whose
    /// criteria an endpoint's socket-match metadata satisfies decides how it is reached.
    pub tls_matches: Vec<TlsMatch>,
}

/// One transport-socket match of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TlsMatch {
    pub name: String,
    /// Entries the endpoint's `envoy.transport_socket_match` metadata must all have.
    pub criteria: Vec<(String, String)>,
    /// Mutual TLS with the workload certificate, or `None`: plaintext (`raw_buffer`).
    pub tls: Option<UpstreamTls>,
}

impl TlsMatch {
    /// Whether an endpoint with these socket-match entries is this match's.
    pub fn matches(&self, endpoint: &[(String, String)]) -> bool {
        self.criteria.iter().all(|c| endpoint.contains(c))
    }
}

/// Mutual TLS to an endpoint's sidecar: the proxy's workload certificate, the federation CA,
/// and who the peer must be.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UpstreamTls {
    /// ALPN protocols offered (what the application behind the sidecar speaks).
    pub alpn: Vec<Vec<u8>>,
    /// The peer's URI SAN must match one of these (none: any workload of the federation).
    pub san: Vec<SanMatch>,
}

/// A URI SAN matcher (`match_typed_subject_alt_names`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SanMatch {
    Exact(String),
    Prefix(String),
    /// Validated at translation; RE2 syntax, matched against the whole SAN.
    Regex(String),
}

/// Translate `transport_socket_matches`.
fn tls_matches(ctx: &Ctx<'_>, c: &cluster::Cluster) -> Result<Vec<TlsMatch>, ConfigError> {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
    let mut out = Vec::with_capacity(c.transport_socket_matches.len());
    for (i, m) in c.transport_socket_matches.iter().enumerate() {
        let field = |f: &str| format!("transport_socket_matches[{i}].{f}");
        let mut criteria = Vec::new();
        for (k, v) in m.r#match.iter().flat_map(|s| s.fields.iter()) {
            match &v.kind {
                Some(Kind::StringValue(s)) => criteria.push((k.clone(), s.clone())),
                _ => {
                    return Err(ctx.err(field(&format!("match.{k}")), "only strings are supported"));
                }
            }
        }
        criteria.sort();
        let Some(ts) = &m.transport_socket else {
            return Err(ctx.err(field("transport_socket"), "missing"));
        };
        let typed = ts
            .config_type
            .as_ref()
            .map(|core::transport_socket::ConfigType::TypedConfig(a)| a);
        let upstream = match ts.name.as_str() {
            RAW_BUFFER => None,
            TLS_SOCKET => {
                let Some(any) = typed else {
                    return Err(ctx.err(field("transport_socket.typed_config"), "missing"));
                };
                if any.type_url != UPSTREAM_TLS_TYPE {
                    return Err(ctx.err(
                        field("transport_socket.typed_config"),
                        format!("{} is not {UPSTREAM_TLS_TYPE}", any.type_url),
                    ));
                }
                let u = tls::UpstreamTlsContext::decode(any.value.as_slice())
                    .map_err(|e| ctx.err(field("transport_socket.typed_config"), e.to_string()))?;
                let field = |f: &str| field(&format!("transport_socket.common_tls_context.{f}"));
                let common = u
                    .common_tls_context
                    .ok_or_else(|| ctx.err(field(""), "missing"))?;
                if let Some(p) = &common.tls_params
                    && p.tls_maximum_protocol_version != 0
                    && p.tls_maximum_protocol_version
                        < tls::tls_parameters::TlsProtocol::TlSv13 as i32
                {
                    return Err(ctx.err(
                        field("tls_params.tls_maximum_protocol_version"),
                        "Strait sidecars speak TLS 1.3 only",
                    ));
                }
                if !common.tls_certificates.is_empty() {
                    return Err(ctx.err(
                        field("tls_certificates"),
                        format!("inline certificates are not supported: the proxy presents its workload certificate (secret `{WORKLOAD_SECRET}`)"),
                    ));
                }
                let names: Vec<&str> = common
                    .tls_certificate_sds_secret_configs
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect();
                if names != [WORKLOAD_SECRET] {
                    return Err(ctx.err(
                        field("tls_certificate_sds_secret_configs"),
                        format!("must name the secret `{WORKLOAD_SECRET}` (the proxy's workload certificate), not {names:?}"),
                    ));
                }
                use tls::common_tls_context::ValidationContextType as V;
                let (ca, validation) = match common.validation_context_type {
                    Some(V::CombinedValidationContext(c)) => (
                        c.validation_context_sds_secret_config.map(|s| s.name),
                        c.default_validation_context,
                    ),
                    Some(V::ValidationContextSdsSecretConfig(s)) => (Some(s.name), None),
                    _ => (None, None),
                };
                if ca.as_deref() != Some(CA_SECRET) {
                    return Err(ctx.err(
                        field("validation_context_type"),
                        format!("must name the secret `{CA_SECRET}` (the federation CA)"),
                    ));
                }
                let mut san = Vec::new();
                for (j, m) in validation
                    .iter()
                    .flat_map(|v| &v.match_typed_subject_alt_names)
                    .enumerate()
                {
                    let field = |f: &str| {
                        field(&format!(
                            "combined_validation_context.default_validation_context.match_typed_subject_alt_names[{j}].{f}"
                        ))
                    };
                    if m.san_type != tls::subject_alt_name_matcher::SanType::Uri as i32 {
                        return Err(ctx.err(
                            field("san_type"),
                            "only URI SANs (SPIFFE ids) are supported",
                        ));
                    }
                    use matcher::string_matcher::MatchPattern as P;
                    let pattern = m.matcher.as_ref().and_then(|m| {
                        (!m.ignore_case)
                            .then_some(m.match_pattern.as_ref())
                            .flatten()
                    });
                    san.push(match pattern {
                        Some(P::Exact(e)) => SanMatch::Exact(e.clone()),
                        Some(P::Prefix(p)) => SanMatch::Prefix(p.clone()),
                        Some(P::SafeRegex(r)) => {
                            regex::Regex::new(&r.regex).map_err(|e| {
                                ctx.err(field("matcher.safe_regex"), format!("{:?}: {e}", r.regex))
                            })?;
                            SanMatch::Regex(r.regex.clone())
                        }
                        _ => {
                            return Err(ctx.err(
                                field("matcher"),
                                "only case-sensitive exact, prefix and safe_regex are supported",
                            ));
                        }
                    });
                }
                Some(UpstreamTls {
                    alpn: common
                        .alpn_protocols
                        .iter()
                        .map(|a| a.as_bytes().to_vec())
                        .collect(),
                    san,
                })
            }
            other => {
                return Err(ctx.err(
                    field("transport_socket"),
                    format!("{other} is not supported (tls, raw_buffer)"),
                ));
            }
        };
        out.push(TlsMatch {
            name: m.name.clone(),
            criteria,
            tls: upstream,
        });
    }
    Ok(out)
}

/// A CDS resource: a cluster of endpoints (EDS), or a passthrough cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterResource {
    Eds(ClusterConfig),
    /// `ORIGINAL_DST` with `CLUSTER_PROVIDED`: each connection goes to its own original
    /// destination (only a transparent listener can use it).
    OriginalDst(String),
}

/// Translate a CDS resource, passthrough clusters included.
pub fn cluster_resource(any: &Any) -> Result<ClusterResource, ConfigError> {
    use cluster::cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy as P};
    let c: cluster::Cluster = decode(any, CLUSTER_TYPE, "cluster")?;
    if !matches!(&c.cluster_discovery_type,
        Some(ClusterDiscoveryType::Type(t)) if *t == DiscoveryType::OriginalDst as i32)
    {
        return eds_cluster(c).map(ClusterResource::Eds);
    }
    let ctx = Ctx {
        kind: "cluster",
        name: &c.name,
    };
    if c.name.is_empty() {
        return Err(ctx.err("name", "empty"));
    }
    if c.lb_policy != P::ClusterProvided as i32 {
        return Err(ctx.err(
            "lb_policy",
            "an ORIGINAL_DST cluster needs CLUSTER_PROVIDED",
        ));
    }
    if c.load_assignment.is_some() || c.eds_cluster_config.is_some() {
        return Err(ctx.err(
            "load_assignment",
            "an ORIGINAL_DST cluster has no endpoints of its own",
        ));
    }
    Ok(ClusterResource::OriginalDst(c.name))
}

/// Translate a CDS resource of endpoints (EDS).
pub fn cluster(any: &Any) -> Result<ClusterConfig, ConfigError> {
    eds_cluster(decode(any, CLUSTER_TYPE, "cluster")?)
}

fn eds_cluster(c: cluster::Cluster) -> Result<ClusterConfig, ConfigError> {
    let ctx = Ctx {
        kind: "cluster",
        name: &c.name,
    };
    if c.name.is_empty() {
        return Err(ctx.err("name", "empty"));
    }
    use cluster::cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy as P};
    match &c.cluster_discovery_type {
        Some(ClusterDiscoveryType::Type(t)) if *t == DiscoveryType::Eds as i32 => {}
        None => return Err(ctx.err("type", "missing: only EDS clusters are supported")),
        Some(_) => {
            return Err(ctx.err(
                "type",
                "only EDS clusters (and ORIGINAL_DST passthrough clusters) are supported",
            ));
        }
    }
    if let Some(eds) = &c.eds_cluster_config
        && !eds.service_name.is_empty()
        && eds.service_name != c.name
    {
        return Err(ctx.err(
            "eds_cluster_config.service_name",
            "must be empty or the cluster's name",
        ));
    }
    let lb = match P::try_from(c.lb_policy) {
        Ok(P::RoundRobin) => LbPolicy::RoundRobin,
        Ok(P::LeastRequest) => {
            let choices = match &c.lb_config {
                Some(cluster::cluster::LbConfig::LeastRequestLbConfig(l)) => {
                    l.choice_count.as_ref().map_or(2, |v| v.value)
                }
                _ => 2,
            };
            if choices < 2 {
                return Err(ctx.err("least_request_lb_config.choice_count", "must be ≥ 2"));
            }
            LbPolicy::LeastRequest { choices }
        }
        Ok(other) => {
            return Err(ctx.err(
                "lb_policy",
                format!(
                    "{} is not supported (ROUND_ROBIN, LEAST_REQUEST)",
                    other.as_str_name()
                ),
            ));
        }
        Err(_) => return Err(ctx.err("lb_policy", format!("unknown value {}", c.lb_policy))),
    };
    let connect_timeout = opt_duration(&ctx, "connect_timeout", c.connect_timeout.as_ref())?
        .unwrap_or(Duration::from_secs(5));
    if connect_timeout.is_zero() {
        return Err(ctx.err("connect_timeout", "must be positive"));
    }
    let mut http2 = false;
    if let Some(opts) = c.typed_extension_protocol_options.get(HTTP_OPTIONS_KEY) {
        let o = HttpProtocolOptions::decode(opts.value.as_slice()).map_err(|e| {
            ctx.err(
                format!("typed_extension_protocol_options[{HTTP_OPTIONS_KEY}]"),
                e.to_string(),
            )
        })?;
        if let Some(http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(e)) =
            &o.upstream_protocol_options
        {
            http2 = matches!(
                e.protocol_config,
                Some(
                    http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                        _
                    )
                )
            );
        }
    }
    let tunnel = match &c.transport_socket {
        None => false,
        Some(ts) if ts.name == INTERNAL_UPSTREAM => true,
        Some(ts) if ts.name == "envoy.transport_sockets.raw_buffer" => false,
        Some(ts) => {
            return Err(ctx.err(
                "transport_socket",
                format!(
                    "{} is not supported (internal_upstream, raw_buffer)",
                    ts.name
                ),
            ));
        }
    };
    let outlier = match &c.outlier_detection {
        None => None,
        Some(o) => {
            let d = OutlierDetection::default();
            let pct = o
                .max_ejection_percent
                .as_ref()
                .map_or(d.max_ejection_percent, |v| v.value);
            if pct > 100 {
                return Err(ctx.err("outlier_detection.max_ejection_percent", "over 100"));
            }
            Some(OutlierDetection {
                consecutive_5xx: o
                    .consecutive_5xx
                    .as_ref()
                    .map_or(d.consecutive_5xx, |v| v.value),
                consecutive_gateway_failure: o
                    .consecutive_gateway_failure
                    .as_ref()
                    .map_or(d.consecutive_gateway_failure, |v| v.value),
                interval: opt_duration(&ctx, "outlier_detection.interval", o.interval.as_ref())?
                    .unwrap_or(d.interval),
                base_ejection_time: opt_duration(
                    &ctx,
                    "outlier_detection.base_ejection_time",
                    o.base_ejection_time.as_ref(),
                )?
                .unwrap_or(d.base_ejection_time),
                max_ejection_percent: pct,
            })
        }
    };
    let mut thresholds = Thresholds::default();
    if let Some(cb) = &c.circuit_breakers
        && let Some(t) = cb
            .thresholds
            .iter()
            .find(|t| t.priority == core::RoutingPriority::Default as i32)
    {
        let d = Thresholds::default();
        thresholds = Thresholds {
            max_connections: t
                .max_connections
                .as_ref()
                .map_or(d.max_connections, |v| v.value),
            max_pending_requests: t
                .max_pending_requests
                .as_ref()
                .map_or(d.max_pending_requests, |v| v.value),
            max_requests: t.max_requests.as_ref().map_or(d.max_requests, |v| v.value),
            max_retries: t.max_retries.as_ref().map_or(d.max_retries, |v| v.value),
            retry_budget: match &t.retry_budget {
                None => None,
                Some(b) => {
                    let pct = b.budget_percent.as_ref().map_or(20.0, |p| p.value);
                    if !(0.0..=100.0).contains(&pct) {
                        return Err(ctx.err(
                            "circuit_breakers.thresholds.retry_budget.budget_percent",
                            format!("{pct} is not within 0..=100"),
                        ));
                    }
                    Some(RetryBudget {
                        percent_x100: (pct * 100.0).round() as u32,
                        min_concurrency: b.min_retry_concurrency.as_ref().map_or(3, |v| v.value),
                    })
                }
            },
        };
    }
    let tls_matches = tls_matches(&ctx, &c)?;
    Ok(ClusterConfig {
        name: c.name.clone(),
        connect_timeout,
        lb,
        http2,
        tunnel,
        outlier,
        thresholds,
        tls_matches,
    })
}

// ---------------------------------------------------------------------------------------------
// Load assignments

/// Where an endpoint is reached.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Upstream {
    Direct(SocketAddr),
    /// Through the local gateway: HTTP/2 CONNECT with this authority and `strait-cluster`.
    Tunnel {
        cluster: String,
        authority: String,
    },
}

/// An endpoint's health as the control plane sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointHealth {
    Healthy,
    Degraded,
    Unhealthy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointConfig {
    pub upstream: Upstream,
    pub health: EndpointHealth,
    pub weight: u32,
    /// Its `envoy.transport_socket_match` metadata (sorted), which selects the cluster's
    /// transport-socket match.
    pub socket_match: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalityConfig {
    pub region: String,
    pub zone: String,
    pub subzone: String,
    pub weight: u32,
    pub endpoints: Vec<EndpointConfig>,
}

/// A cluster's endpoints (EDS), by priority level (dense from 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub cluster: String,
    pub priorities: Vec<Vec<LocalityConfig>>,
    /// Percent (Envoy's default 140).
    pub overprovisioning: u32,
}

/// Translate an EDS resource.
pub fn assignment(any: &Any) -> Result<Assignment, ConfigError> {
    let cla: endpoint::ClusterLoadAssignment = decode(any, ASSIGNMENT_TYPE, "load assignment")?;
    let ctx = Ctx {
        kind: "load assignment",
        name: &cla.cluster_name,
    };
    if cla.cluster_name.is_empty() {
        return Err(ctx.err("cluster_name", "empty"));
    }
    let mut priorities: Vec<Vec<LocalityConfig>> = Vec::new();
    for (i, l) in cla.endpoints.iter().enumerate() {
        let field = |f: &str| format!("endpoints[{i}].{f}");
        let p = l.priority as usize;
        if p > 128 {
            return Err(ctx.err(field("priority"), "over 128"));
        }
        let loc = l.locality.clone().unwrap_or_default();
        let mut endpoints = Vec::with_capacity(l.lb_endpoints.len());
        for (j, e) in l.lb_endpoints.iter().enumerate() {
            let field = |f: &str| format!("endpoints[{i}].lb_endpoints[{j}].{f}");
            let Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier
            else {
                return Err(ctx.err(
                    field("endpoint"),
                    "missing (named endpoints are not supported)",
                ));
            };
            let addr = ep
                .address
                .as_ref()
                .and_then(|a| a.address.as_ref())
                .ok_or_else(|| ctx.err(field("endpoint.address"), "missing"))?;
            let upstream = match addr {
                core::address::Address::SocketAddress(sa) => {
                    let ip: IpAddr = sa.address.parse().map_err(|_| {
                        ctx.err(
                            field("endpoint.address.socket_address.address"),
                            format!("{:?} is not an IP address", sa.address),
                        )
                    })?;
                    let port = match sa.port_specifier {
                        Some(core::socket_address::PortSpecifier::PortValue(p))
                            if (1..=65535).contains(&p) =>
                        {
                            p as u16
                        }
                        _ => {
                            return Err(ctx.err(
                                field("endpoint.address.socket_address.port_value"),
                                "missing or out of range",
                            ));
                        }
                    };
                    Upstream::Direct(SocketAddr::new(ip, port))
                }
                core::address::Address::EnvoyInternalAddress(_) => {
                    let meta = e
                        .metadata
                        .as_ref()
                        .and_then(|m| m.filter_metadata.get(TUNNEL_NAMESPACE));
                    let get = |k: &str| {
                        meta.and_then(|s| s.fields.get(k))
                            .and_then(|v| match &v.kind {
                                Some(Kind::StringValue(s)) if !s.is_empty() => Some(s.clone()),
                                _ => None,
                            })
                    };
                    let (Some(cluster), Some(authority)) =
                        (get(TUNNEL_CLUSTER), get(TUNNEL_AUTHORITY))
                    else {
                        return Err(ctx.err(
                            field(&format!("metadata.filter_metadata.{TUNNEL_NAMESPACE}")),
                            format!(
                                "an internal address needs `{TUNNEL_CLUSTER}` and `{TUNNEL_AUTHORITY}`"
                            ),
                        ));
                    };
                    Upstream::Tunnel { cluster, authority }
                }
                core::address::Address::Pipe(_) => {
                    return Err(ctx.err(field("endpoint.address"), "pipes are not supported"));
                }
            };
            let health = match core::HealthStatus::try_from(e.health_status) {
                Ok(core::HealthStatus::Unknown | core::HealthStatus::Healthy) => {
                    EndpointHealth::Healthy
                }
                Ok(core::HealthStatus::Degraded) => EndpointHealth::Degraded,
                Ok(_) => EndpointHealth::Unhealthy,
                Err(_) => {
                    return Err(ctx.err(
                        field("health_status"),
                        format!("unknown value {}", e.health_status),
                    ));
                }
            };
            let weight = e.load_balancing_weight.as_ref().map_or(1, |w| w.value);
            if weight == 0 {
                return Err(ctx.err(field("load_balancing_weight"), "must be ≥ 1"));
            }
            let mut socket_match = Vec::new();
            if let Some(m) = e
                .metadata
                .as_ref()
                .and_then(|m| m.filter_metadata.get(SOCKET_MATCH_NAMESPACE))
            {
                for (k, v) in &m.fields {
                    match &v.kind {
                        Some(Kind::StringValue(s)) => socket_match.push((k.clone(), s.clone())),
                        _ => {
                            return Err(ctx.err(
                                field(&format!(
                                    "metadata.filter_metadata.{SOCKET_MATCH_NAMESPACE}.{k}"
                                )),
                                "only strings are supported",
                            ));
                        }
                    }
                }
                socket_match.sort();
            }
            endpoints.push(EndpointConfig {
                upstream,
                health,
                weight,
                socket_match,
            });
        }
        let weight = l.load_balancing_weight.as_ref().map_or(1, |w| w.value);
        if priorities.len() <= p {
            priorities.resize_with(p + 1, Vec::new);
        }
        priorities[p].push(LocalityConfig {
            region: loc.region,
            zone: loc.zone,
            subzone: loc.sub_zone,
            weight,
            endpoints,
        });
    }
    if let Some(i) = priorities.iter().position(Vec::is_empty) {
        return Err(ctx.err(
            "endpoints",
            format!("priority {i} is empty while a higher one is not (levels must be dense)"),
        ));
    }
    let overprovisioning = cla
        .policy
        .as_ref()
        .and_then(|p| p.overprovisioning_factor.as_ref())
        .map_or(140, |v| v.value);
    if overprovisioning < 100 {
        return Err(ctx.err("policy.overprovisioning_factor", "below 100"));
    }
    Ok(Assignment {
        cluster: cla.cluster_name.clone(),
        priorities,
        overprovisioning,
    })
}

// ---------------------------------------------------------------------------------------------
// Routes

/// How a route matches the path.
#[derive(Debug, Clone)]
pub enum PathMatch {
    Prefix(String),
    Exact(String),
    Regex(regex::Regex),
}

impl PartialEq for PathMatch {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Prefix(a), Self::Prefix(b)) | (Self::Exact(a), Self::Exact(b)) => a == b,
            (Self::Regex(a), Self::Regex(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
pub enum HeaderValueMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Present(bool),
    Regex(regex::Regex),
}

#[derive(Debug, Clone)]
pub struct HeaderMatch {
    pub name: http::HeaderName,
    pub value: HeaderValueMatch,
    pub invert: bool,
}

impl HeaderMatch {
    pub fn matches(&self, headers: &http::HeaderMap) -> bool {
        let v = headers.get(&self.name).and_then(|v| v.to_str().ok());
        let hit = match (&self.value, v) {
            (HeaderValueMatch::Present(p), v) => v.is_some() == *p,
            (_, None) => false,
            (HeaderValueMatch::Exact(e), Some(v)) => v == e,
            (HeaderValueMatch::Prefix(e), Some(v)) => v.starts_with(e.as_str()),
            (HeaderValueMatch::Suffix(e), Some(v)) => v.ends_with(e.as_str()),
            (HeaderValueMatch::Regex(r), Some(v)) => full_match(r, v),
        };
        hit != self.invert
    }
}

fn full_match(r: &regex::Regex, v: &str) -> bool {
    r.find(v)
        .is_some_and(|m| m.start() == 0 && m.end() == v.len())
}

/// What a route does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteTarget {
    Cluster(String),
    /// Clusters with weights (summing to `total`).
    Weighted {
        clusters: Vec<(String, u32)>,
        total: u32,
    },
}

/// Conditions under which a request is retried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryOn {
    pub connect_failure: bool,
    pub reset: bool,
    pub refused_stream: bool,
    pub server_error: bool,
    pub gateway_error: bool,
    pub retriable_status_codes: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub on: RetryOn,
    pub num_retries: u32,
    pub per_try_timeout: Option<Duration>,
    pub retriable_status_codes: Vec<u16>,
    /// Prefer a host not tried yet.
    pub other_host: bool,
    /// Prefer a priority not tried yet.
    pub other_priority: bool,
}

#[derive(Debug, Clone)]
pub struct RouteEntry {
    pub path: PathMatch,
    pub headers: Vec<HeaderMatch>,
    pub target: RouteTarget,
    /// The whole request's deadline (`None`: none).
    pub timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
}

impl RouteEntry {
    /// Whether a request with `path` (with any query) and `headers` takes this route.
    pub fn matches(&self, path: &str, headers: &http::HeaderMap) -> bool {
        let bare = path.split_once('?').map_or(path, |(p, _)| p);
        let path_ok = match &self.path {
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            PathMatch::Exact(p) => bare == p,
            PathMatch::Regex(r) => full_match(r, bare),
        };
        path_ok && self.headers.iter().all(|h| h.matches(headers))
    }
}

#[derive(Debug, Clone)]
pub struct VirtualHost {
    pub name: String,
    pub domains: Vec<String>,
    pub routes: Vec<Arc<RouteEntry>>,
}

/// A route configuration (RDS, or inline in a listener).
#[derive(Debug, Clone)]
pub struct RouteTable {
    pub name: String,
    pub virtual_hosts: Vec<VirtualHost>,
}

impl RouteTable {
    /// The virtual host for `host`, with Envoy's precedence: an exact domain, then the longest
    /// `*.suffix`, then the longest `prefix.*`, then `*`. Case-insensitive.
    pub fn virtual_host(&self, host: &str) -> Option<&VirtualHost> {
        let host = host.to_ascii_lowercase();
        let mut best: Option<(u8, usize, &VirtualHost)> = None;
        for vh in &self.virtual_hosts {
            for d in &vh.domains {
                let rank = if *d == host {
                    Some((4, d.len()))
                } else if d == "*" {
                    Some((1, 0))
                } else if let Some(suffix) = d.strip_prefix('*') {
                    (host.len() > suffix.len() && host.ends_with(suffix)).then_some((3, d.len()))
                } else if let Some(prefix) = d.strip_suffix('*') {
                    (host.len() > prefix.len() && host.starts_with(prefix)).then_some((2, d.len()))
                } else {
                    None
                };
                if let Some((r, len)) = rank
                    && best.is_none_or(|(br, bl, _)| (r, len) > (br, bl))
                {
                    best = Some((r, len, vh));
                }
            }
        }
        best.map(|(_, _, vh)| vh)
    }

    /// The route for a request, if any.
    pub fn route(
        &self,
        host: &str,
        path: &str,
        headers: &http::HeaderMap,
    ) -> Option<&Arc<RouteEntry>> {
        self.virtual_host(host)?
            .routes
            .iter()
            .find(|r| r.matches(path, headers))
    }

    /// Every cluster a route of this table may send to.
    pub fn clusters(&self) -> impl Iterator<Item = &str> {
        self.virtual_hosts
            .iter()
            .flat_map(|vh| &vh.routes)
            .flat_map(|r| match &r.target {
                RouteTarget::Cluster(c) => vec![c.as_str()],
                RouteTarget::Weighted { clusters, .. } => {
                    clusters.iter().map(|(c, _)| c.as_str()).collect()
                }
            })
    }
}

fn regex(
    ctx: &Ctx<'_>,
    field: &str,
    m: &matcher::RegexMatcher,
) -> Result<regex::Regex, ConfigError> {
    regex::RegexBuilder::new(&m.regex)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| ctx.err(field, format!("invalid regex: {e}")))
}

fn retry_policy(
    ctx: &Ctx<'_>,
    field: &str,
    p: &route::RetryPolicy,
) -> Result<RetryPolicy, ConfigError> {
    let mut on = RetryOn::default();
    for cond in p
        .retry_on
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
    {
        match cond {
            "connect-failure" => on.connect_failure = true,
            "reset" | "reset-before-request" => on.reset = true,
            "refused-stream" => on.refused_stream = true,
            "5xx" => on.server_error = true,
            "gateway-error" => on.gateway_error = true,
            "retriable-status-codes" => on.retriable_status_codes = true,
            other => {
                return Err(ctx.err(
                    format!("{field}.retry_on"),
                    format!("{other:?} is not supported (connect-failure, reset, refused-stream, 5xx, gateway-error, retriable-status-codes)"),
                ));
            }
        }
    }
    let mut codes = Vec::new();
    for c in &p.retriable_status_codes {
        let c = u16::try_from(*c)
            .ok()
            .filter(|c| (100..=599).contains(c))
            .ok_or_else(|| {
                ctx.err(
                    format!("{field}.retriable_status_codes"),
                    format!("{c} is not an HTTP status"),
                )
            })?;
        codes.push(c);
    }
    let mut other_host = false;
    for (i, h) in p.retry_host_predicate.iter().enumerate() {
        if h.name == "envoy.retry_host_predicates.previous_hosts" {
            other_host = true;
        } else {
            return Err(ctx.err(
                format!("{field}.retry_host_predicate[{i}]"),
                format!("{} is not supported", h.name),
            ));
        }
    }
    let other_priority = match &p.retry_priority {
        None => false,
        Some(rp) if rp.name == "envoy.retry_priorities.previous_priorities" => true,
        Some(rp) => {
            return Err(ctx.err(
                format!("{field}.retry_priority"),
                format!("{} is not supported", rp.name),
            ));
        }
    };
    Ok(RetryPolicy {
        on,
        num_retries: p.num_retries.as_ref().map_or(1, |v| v.value),
        per_try_timeout: opt_duration(
            ctx,
            &format!("{field}.per_try_timeout"),
            p.per_try_timeout.as_ref(),
        )?,
        retriable_status_codes: codes,
        other_host,
        other_priority,
    })
}

fn route_table_from(
    rc: &route::RouteConfiguration,
    kind: &'static str,
) -> Result<RouteTable, ConfigError> {
    let ctx = Ctx {
        kind,
        name: &rc.name,
    };
    let mut vhs = Vec::with_capacity(rc.virtual_hosts.len());
    let mut seen = std::collections::HashSet::new();
    for (i, vh) in rc.virtual_hosts.iter().enumerate() {
        let vfield = format!("virtual_hosts[{i}]");
        if vh.domains.is_empty() {
            return Err(ctx.err(format!("{vfield}.domains"), "empty"));
        }
        let mut domains = Vec::with_capacity(vh.domains.len());
        for d in &vh.domains {
            let d = d.to_ascii_lowercase();
            if !seen.insert(d.clone()) {
                return Err(ctx.err(
                    format!("{vfield}.domains"),
                    format!("{d:?} appears twice in the route configuration"),
                ));
            }
            domains.push(d);
        }
        let vh_retry = vh
            .retry_policy
            .as_ref()
            .map(|p| retry_policy(&ctx, &format!("{vfield}.retry_policy"), p))
            .transpose()?;
        let mut routes = Vec::with_capacity(vh.routes.len());
        for (j, r) in vh.routes.iter().enumerate() {
            let rfield = format!("{vfield}.routes[{j}]");
            let m = r
                .r#match
                .as_ref()
                .ok_or_else(|| ctx.err(format!("{rfield}.match"), "missing"))?;
            use route::route_match::PathSpecifier as PS;
            let path = match &m.path_specifier {
                Some(PS::Prefix(p)) => PathMatch::Prefix(p.clone()),
                Some(PS::Path(p)) => PathMatch::Exact(p.clone()),
                Some(PS::SafeRegex(re)) => {
                    PathMatch::Regex(regex(&ctx, &format!("{rfield}.match.safe_regex"), re)?)
                }
                None => return Err(ctx.err(format!("{rfield}.match"), "no path specifier")),
                Some(_) => {
                    return Err(ctx.err(
                        format!("{rfield}.match"),
                        "only prefix, path and safe_regex are supported",
                    ));
                }
            };
            if m.case_sensitive.as_ref().is_some_and(|v| !v.value) {
                return Err(ctx.err(
                    format!("{rfield}.match.case_sensitive"),
                    "case-insensitive matching is not supported",
                ));
            }
            if !m.query_parameters.is_empty() {
                return Err(ctx.err(format!("{rfield}.match.query_parameters"), "not supported"));
            }
            let mut headers = Vec::with_capacity(m.headers.len());
            for (k, h) in m.headers.iter().enumerate() {
                let hfield = format!("{rfield}.match.headers[{k}]");
                let name = http::HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| {
                    ctx.err(
                        format!("{hfield}.name"),
                        format!("{:?} is not a header name", h.name),
                    )
                })?;
                use route::header_matcher::HeaderMatchSpecifier as H;
                // The deprecated direct matchers are still what many control planes send.
                #[allow(deprecated)]
                let value = match &h.header_match_specifier {
                    None => HeaderValueMatch::Present(true),
                    Some(H::PresentMatch(p)) => HeaderValueMatch::Present(*p),
                    Some(H::ExactMatch(e)) => HeaderValueMatch::Exact(e.clone()),
                    Some(H::PrefixMatch(e)) => HeaderValueMatch::Prefix(e.clone()),
                    Some(H::SuffixMatch(e)) => HeaderValueMatch::Suffix(e.clone()),
                    Some(H::SafeRegexMatch(re)) => HeaderValueMatch::Regex(regex(
                        &ctx,
                        &format!("{hfield}.safe_regex_match"),
                        re,
                    )?),
                    Some(H::StringMatch(sm)) => {
                        if sm.ignore_case {
                            return Err(ctx.err(
                                format!("{hfield}.string_match.ignore_case"),
                                "not supported",
                            ));
                        }
                        use matcher::string_matcher::MatchPattern as MP;
                        match &sm.match_pattern {
                            Some(MP::Exact(e)) => HeaderValueMatch::Exact(e.clone()),
                            Some(MP::Prefix(e)) => HeaderValueMatch::Prefix(e.clone()),
                            Some(MP::Suffix(e)) => HeaderValueMatch::Suffix(e.clone()),
                            Some(MP::SafeRegex(re)) => HeaderValueMatch::Regex(regex(
                                &ctx,
                                &format!("{hfield}.string_match.safe_regex"),
                                re,
                            )?),
                            _ => {
                                return Err(ctx.err(
                                    format!("{hfield}.string_match"),
                                    "only exact, prefix, suffix and safe_regex are supported",
                                ));
                            }
                        }
                    }
                    Some(_) => return Err(ctx.err(hfield, "this header matcher is not supported")),
                };
                headers.push(HeaderMatch {
                    name,
                    value,
                    invert: h.invert_match,
                });
            }
            use route::route::Action;
            let Some(Action::Route(a)) = &r.action else {
                return Err(ctx.err(
                    format!("{rfield}.action"),
                    "only `route` actions are supported",
                ));
            };
            use route::route_action::ClusterSpecifier as CS;
            let target = match &a.cluster_specifier {
                Some(CS::Cluster(c)) if !c.is_empty() => RouteTarget::Cluster(c.clone()),
                Some(CS::WeightedClusters(w)) => {
                    let mut clusters = Vec::new();
                    for (k, c) in w.clusters.iter().enumerate() {
                        let weight = c.weight.as_ref().map_or(0, |v| v.value);
                        if c.name.is_empty() {
                            return Err(ctx.err(
                                format!("{rfield}.route.weighted_clusters.clusters[{k}].name"),
                                "empty",
                            ));
                        }
                        if weight > 0 {
                            clusters.push((c.name.clone(), weight));
                        }
                    }
                    let total: u32 = clusters.iter().map(|(_, w)| *w).sum();
                    if total == 0 {
                        return Err(ctx.err(
                            format!("{rfield}.route.weighted_clusters"),
                            "no cluster with a positive weight",
                        ));
                    }
                    RouteTarget::Weighted { clusters, total }
                }
                _ => {
                    return Err(ctx.err(
                        format!("{rfield}.route"),
                        "needs `cluster` or `weighted_clusters`",
                    ));
                }
            };
            // Envoy's default route timeout is 15 s; an explicit 0 disables it.
            let timeout =
                match opt_duration(&ctx, &format!("{rfield}.route.timeout"), a.timeout.as_ref())? {
                    None => Some(Duration::from_secs(15)),
                    Some(d) if d.is_zero() => None,
                    Some(d) => Some(d),
                };
            let retry = match &a.retry_policy {
                Some(p) => Some(retry_policy(
                    &ctx,
                    &format!("{rfield}.route.retry_policy"),
                    p,
                )?),
                None => vh_retry.clone(),
            };
            routes.push(Arc::new(RouteEntry {
                path,
                headers,
                target,
                timeout,
                retry,
            }));
        }
        vhs.push(VirtualHost {
            name: vh.name.clone(),
            domains,
            routes,
        });
    }
    Ok(RouteTable {
        name: rc.name.clone(),
        virtual_hosts: vhs,
    })
}

/// Translate an RDS resource.
pub fn route_table(any: &Any) -> Result<RouteTable, ConfigError> {
    let rc: route::RouteConfiguration = decode(any, ROUTES_TYPE, "route configuration")?;
    if rc.name.is_empty() {
        return Err(Ctx {
            kind: "route configuration",
            name: "",
        }
        .err("name", "empty"));
    }
    route_table_from(&rc, "route configuration")
}

// ---------------------------------------------------------------------------------------------
// Listeners

/// Where an HTTP listener's routes come from.
#[derive(Debug, Clone)]
pub enum RouteSource {
    /// A route configuration sent over RDS.
    Rds(String),
    Inline(RouteTable),
}

#[derive(Debug, Clone)]
pub enum ListenerKind {
    /// HTTP (1.1 and h2c), routed by host, path and headers.
    Http { routes: RouteSource },
    /// Raw TCP to one cluster; a connection with no bytes either way for `idle_timeout` is
    /// closed (Envoy's default 1 h; `None`: never).
    Tcp {
        cluster: String,
        idle_timeout: Option<Duration>,
    },
    /// Transparent mode (`use_original_dst`): connections an iptables `REDIRECT` sent here,
    /// handled by their original destination (see [`crate::transparent`]); what no other
    /// listener takes goes to `fallback` — an `ORIGINAL_DST` cluster passes it through
    /// unchanged (Istio's `PassthroughCluster`), an EDS cluster gets it like a TCP listener.
    Transparent { fallback: String },
}

/// Envoy's default TCP proxy idle timeout.
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub name: String,
    pub address: SocketAddr,
    pub kind: ListenerKind,
}

/// Translate an LDS resource. `Ok(None)`: a listener this proxy has nothing to do with (an
/// `api_listener` for proxyless gRPC clients), accepted and ignored.
pub fn listener(any: &Any) -> Result<Option<ListenerConfig>, ConfigError> {
    let l: listener::Listener = decode(any, LISTENER_TYPE, "listener")?;
    let ctx = Ctx {
        kind: "listener",
        name: &l.name,
    };
    if l.name.is_empty() {
        return Err(ctx.err("name", "empty"));
    }
    if l.api_listener.is_some() {
        return Ok(None);
    }
    let address = match l.address.as_ref().and_then(|a| a.address.as_ref()) {
        Some(core::address::Address::SocketAddress(sa)) => {
            let ip: IpAddr = sa.address.parse().map_err(|_| {
                ctx.err(
                    "address.socket_address.address",
                    format!("{:?} is not an IP address", sa.address),
                )
            })?;
            let port = match sa.port_specifier {
                Some(core::socket_address::PortSpecifier::PortValue(p)) if p <= 65535 => p as u16,
                _ => {
                    return Err(ctx.err(
                        "address.socket_address.port_value",
                        "missing or out of range",
                    ));
                }
            };
            SocketAddr::new(ip, port)
        }
        _ => return Err(ctx.err("address", "a socket address is required")),
    };
    let [chain] = l.filter_chains.as_slice() else {
        return Err(ctx.err(
            "filter_chains",
            format!(
                "exactly one filter chain is supported, got {}",
                l.filter_chains.len()
            ),
        ));
    };
    if chain.filter_chain_match.is_some() {
        return Err(ctx.err("filter_chains[0].filter_chain_match", "not supported"));
    }
    let transparent = l.use_original_dst.as_ref().is_some_and(|b| b.value);
    for (i, f) in l.listener_filters.iter().enumerate() {
        // The original destination is read from the socket (`SO_ORIGINAL_DST`) whenever the
        // listener is transparent: Envoy's `original_dst` listener filter is what asks for
        // it there, and nothing else is supported.
        if !(transparent && f.name == ORIGINAL_DST_FILTER) {
            return Err(ctx.err(
                format!("listener_filters[{i}]"),
                format!(
                    "{} is not supported (only {ORIGINAL_DST_FILTER} with use_original_dst)",
                    f.name
                ),
            ));
        }
    }
    let [filter] = chain.filters.as_slice() else {
        return Err(ctx.err(
            "filter_chains[0].filters",
            "exactly one network filter is supported",
        ));
    };
    use listener::filter::ConfigType;
    let Some(ConfigType::TypedConfig(cfg)) = &filter.config_type else {
        return Err(ctx.err("filter_chains[0].filters[0].typed_config", "missing"));
    };
    let kind = if cfg.type_url == HCM_TYPE {
        let h = hcm::HttpConnectionManager::decode(cfg.value.as_slice())
            .map_err(|e| ctx.err("filter_chains[0].filters[0].typed_config", e.to_string()))?;
        for (i, f) in h.http_filters.iter().enumerate() {
            let is_router = match &f.config_type {
                Some(hcm::http_filter::ConfigType::TypedConfig(t)) => t.type_url == ROUTER_TYPE,
                _ => f.name == "envoy.filters.http.router",
            };
            if !is_router {
                return Err(ctx.err(
                    format!("http_filters[{i}]"),
                    format!("{} is not supported (only the router)", f.name),
                ));
            }
        }
        use hcm::http_connection_manager::RouteSpecifier as RS;
        let routes = match &h.route_specifier {
            Some(RS::Rds(r)) if !r.route_config_name.is_empty() => {
                RouteSource::Rds(r.route_config_name.clone())
            }
            Some(RS::RouteConfig(rc)) => RouteSource::Inline(route_table_from(rc, "listener")?),
            _ => {
                return Err(ctx.err(
                    "route_specifier",
                    "needs `rds` with a name or an inline `route_config`",
                ));
            }
        };
        ListenerKind::Http { routes }
    } else if cfg.type_url == TCP_PROXY_TYPE {
        let t = tcp_proxy::TcpProxy::decode(cfg.value.as_slice())
            .map_err(|e| ctx.err("filter_chains[0].filters[0].typed_config", e.to_string()))?;
        match &t.cluster_specifier {
            Some(tcp_proxy::tcp_proxy::ClusterSpecifier::Cluster(c)) if !c.is_empty() => {
                let idle = opt_duration(&ctx, "tcp_proxy.idle_timeout", t.idle_timeout.as_ref())?;
                ListenerKind::Tcp {
                    cluster: c.clone(),
                    idle_timeout: match idle {
                        None => Some(TCP_IDLE_TIMEOUT),
                        Some(d) if d.is_zero() => None,
                        Some(d) => Some(d),
                    },
                }
            }
            _ => return Err(ctx.err("tcp_proxy.cluster", "a cluster is required")),
        }
    } else {
        return Err(ctx.err(
            "filter_chains[0].filters[0]",
            format!(
                "{} is not supported (HttpConnectionManager, TcpProxy)",
                cfg.type_url
            ),
        ));
    };
    let kind = match kind {
        ListenerKind::Tcp { cluster, .. } if transparent => {
            ListenerKind::Transparent { fallback: cluster }
        }
        ListenerKind::Http { .. } if transparent => {
            return Err(ctx.err(
                "use_original_dst",
                "a transparent listener's chain must be a TcpProxy (to the passthrough cluster)",
            ));
        }
        kind => kind,
    };
    Ok(Some(ListenerConfig {
        name: l.name.clone(),
        address,
        kind,
    }))
}
