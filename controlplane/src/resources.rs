//! xDS resources built from resolved routes (`federation::route`): clusters (CDS), load
//! assignments (EDS), listeners (LDS) and route configurations (RDS), for the two kinds of
//! clients the control plane serves: Envoy (and Envoy-like proxies) and proxyless gRPC.
//!
//! **EDS.** Each locality group becomes one `LocalityLbEndpoints` with its priority (levels are
//! dense from 0, as Envoy requires), its locality, and its locality weight; each endpoint one
//! `LbEndpoint` with its health and weight. Endpoints of clusters on another network carry filter
//! metadata `strait` `{cluster, authority, endpoint, via_gateway: true}`: every endpoint of a
//! remote cluster is an endpoint of its own, so the client's balancer (weights, health, outlier
//! state) chooses among them exactly as among local ones, and the tunnel names the one chosen. For
//! Envoy they are addressed to the internal listener [`TUNNEL_LISTENER`] of the bootstrap
//! (`strait proxy bootstrap --envoy`), which tunnels the connection over HTTP/2 CONNECT to the
//! local east-west gateway's ingress with authority `SERVICE.NAMESPACE:PORT` and headers
//! `strait-cluster: C` and `strait-endpoint: ADDRESS:PORT`, all read from that metadata. Proxyless gRPC cannot tunnel: it gets the directly reachable groups only.
//!
//! **Graceful draining for gRPC.** gRPC ignores the overprovisioning factor and moves to the next
//! priority only when a whole priority fails. [`grpc_fold`] computes Envoy's priority load split
//! (overprovisioning 1.4 on the serving share of each level) and merges every level that would
//! receive traffic into priority 0, with locality weights that reproduce the split, so a
//! degrading level sheds load gradually for gRPC clients too.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use envoy_types::pb::envoy::config::cluster::v3 as cluster;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint;
use envoy_types::pb::envoy::config::listener::v3 as listener;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp_proxy;
use envoy_types::pb::envoy::extensions::transport_sockets::internal_upstream::v3::{
    InternalUpstreamTransport, internal_upstream_transport::MetadataValueSource,
};
use envoy_types::pb::envoy::extensions::transport_sockets::raw_buffer::v3::RawBuffer;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    RegexMatcher, StringMatcher, string_matcher::MatchPattern,
};
use envoy_types::pb::envoy::r#type::metadata::v3::{MetadataKind, metadata_kind};
use envoy_types::pb::google::protobuf::{Duration, Struct, UInt32Value, Value, value::Kind};
use envoy_types::util::pack_any;
use federation::model::{
    HeaderValueMatch, Health, HttpRoute, PathMatch, Protocol, ServiceKey, ServicePort,
};
use federation::route::{LocalityGroup, Route};

/// The names the control plane and its proxies agree on (the xDS contract): listeners, routes,
/// metadata namespaces and keys, secrets.
pub use federation::xds_contract::{
    CA_SECRET, MATCH_CLUSTER, MATCH_TLS_MODE, OUTBOUND_LISTENER, OUTBOUND_ROUTES,
    PASSTHROUGH_CLUSTER, ROUTE_IDEMPOTENT, ROUTE_RESPONSE_BUFFER, SOCKET_MATCH_NAMESPACE,
    TRANSPARENT_LISTENER, TUNNEL_AUTHORITY, TUNNEL_CLUSTER, TUNNEL_ENDPOINT, TUNNEL_LISTENER,
    TUNNEL_NAMESPACE as METADATA_NAMESPACE, TUNNEL_VIA_GATEWAY, WORKLOAD_SECRET, mutual_match_name,
};
/// The URI SAN a sidecar of `cluster` must present: a workload of that cluster (the trust
/// domain is pinned by the federation CA, which issues for one trust domain only).
pub fn workload_san_regex(cluster: &str) -> String {
    format!(
        "^spiffe://[^/]+/cluster/{}/ns/[^/]+/sa/[^/]+$",
        regex_escape(cluster)
    )
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if !c.is_ascii_alphanumeric() && c != '-' && c != '_' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The retry budget of every Envoy cluster: retries in flight ≤ this percent of the requests in
/// flight, but at least [`RETRY_MIN_CONCURRENCY`]. 100 %: when a whole priority fails under load
/// (a cut link: every request in flight to it fails at once), every one of them may be retried
/// on the next priority — the lab's cut scenario lost a third of them at 50 % — while retries
/// in flight never outnumber requests in flight.
pub const RETRY_BUDGET_PERCENT: f64 = 100.0;
pub const RETRY_MIN_CONCURRENCY: u32 = 32;

/// Envoy's default overprovisioning factor, in percent.
const OVERPROVISIONING: u64 = 140;

/// The name of the cluster (CDS) and load assignment (EDS) of a service port.
pub fn cluster_name(service: &ServiceKey, port: u16) -> String {
    format!("{}.{}:{port}", service.name, service.namespace)
}

/// What to do with endpoints of clusters on another network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Remote {
    /// Address them to the bootstrap's internal tunnel listener (Envoy).
    Tunnel,
    /// Leave them out (no gateway, or a client that cannot tunnel).
    Drop,
    /// Keep their own addresses (validation and tests).
    Direct,
}

/// How to build a load assignment for one service port.
#[derive(Debug, Clone, Copy)]
pub struct PortView<'a> {
    pub service: &'a ServiceKey,
    pub port: &'a ServicePort,
    /// The service's first port: endpoints' own ports serve it; other ports are reached on the
    /// endpoint's address at the service port number.
    pub first: bool,
    pub remote: Remote,
    /// The client can originate mutual TLS with a workload certificate (node metadata
    /// `STRAIT_MTLS`): endpoints behind sidecars get socket-match metadata. Without it they are
    /// left out, since they refuse plaintext.
    pub mtls: bool,
}

fn socket_address(a: SocketAddr) -> core::Address {
    core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: a.ip().to_string(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(u32::from(
                a.port(),
            ))),
            ..Default::default()
        })),
    }
}

fn internal_address(endpoint_id: String) -> core::Address {
    core::Address {
        address: Some(core::address::Address::EnvoyInternalAddress(
            core::EnvoyInternalAddress {
                endpoint_id,
                address_name_specifier: Some(
                    core::envoy_internal_address::AddressNameSpecifier::ServerListenerName(
                        TUNNEL_LISTENER.to_string(),
                    ),
                ),
            },
        )),
    }
}

fn health(h: Health) -> i32 {
    (match h {
        Health::Healthy => core::HealthStatus::Healthy,
        Health::Degraded => core::HealthStatus::Degraded,
        Health::Draining => core::HealthStatus::Draining,
        Health::Unhealthy => core::HealthStatus::Unhealthy,
    }) as i32
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

fn strait_fields(cluster: &str, authority: &str, endpoint: SocketAddr) -> Struct {
    let fields = [
        (TUNNEL_CLUSTER.to_string(), string_value(cluster)),
        (TUNNEL_AUTHORITY.to_string(), string_value(authority)),
        (
            TUNNEL_ENDPOINT.to_string(),
            string_value(&endpoint.to_string()),
        ),
        (
            TUNNEL_VIA_GATEWAY.to_string(),
            Value {
                kind: Some(Kind::BoolValue(true)),
            },
        ),
    ]
    .into_iter()
    .collect();
    Struct { fields }
}

/// An endpoint behind a sidecar of `cluster`: the socket-match metadata that selects the
/// cluster's mutual-TLS transport socket ([`mutual_matches`]).
fn socket_match_fields(cluster: &str) -> Struct {
    Struct {
        fields: [
            (
                MATCH_TLS_MODE.to_string(),
                string_value(federation::model::TLS_MODE_MUTUAL),
            ),
            (MATCH_CLUSTER.to_string(), string_value(cluster)),
        ]
        .into_iter()
        .collect(),
    }
}

fn ads() -> core::ConfigSource {
    core::ConfigSource {
        config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(
            core::AggregatedConfigSource {},
        )),
        resource_api_version: core::ApiVersion::V3 as i32,
        ..Default::default()
    }
}

fn duration_ms(ms: u64) -> Duration {
    Duration {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// The EDS resource of `name` for a resolved route (endpoints as the route has them).
pub fn load_assignment(name: &str, route: &Route) -> endpoint::ClusterLoadAssignment {
    let groups: Vec<&LocalityGroup> = route.groups.iter().collect();
    assignment(name, &groups, None, Remote::Direct, "", true)
}

/// The EDS resource of one service port as `view` asks.
pub fn port_assignment(route: &Route, view: PortView<'_>) -> endpoint::ClusterLoadAssignment {
    let name = cluster_name(view.service, view.port.port);
    let groups: Vec<&LocalityGroup> = route
        .groups
        .iter()
        .filter(|g| !(g.via_gateway && view.remote == Remote::Drop))
        .collect();
    let port = (!view.first).then_some(view.port.port);
    let authority = format!(
        "{}.{}:{}",
        view.service.name, view.service.namespace, view.port.port
    );
    assignment(&name, &groups, port, view.remote, &authority, view.mtls)
}

fn assignment(
    name: &str,
    groups: &[&LocalityGroup],
    port: Option<u16>,
    remote: Remote,
    authority: &str,
    mtls: bool,
) -> endpoint::ClusterLoadAssignment {
    // Priorities stay dense after dropping groups.
    let levels: BTreeSet<u32> = groups.iter().map(|g| g.priority).collect();
    let dense = |p: u32| levels.iter().position(|l| *l == p).unwrap_or(0) as u32;
    let endpoints = groups
        .iter()
        .map(|g| endpoint::LocalityLbEndpoints {
            locality: Some(core::Locality {
                region: g.locality.region().to_string(),
                zone: g.locality.zone().to_string(),
                sub_zone: g.locality.subzone().to_string(),
            }),
            lb_endpoints: g
                .endpoints
                .iter()
                // A tunnelled endpoint is the remote gateway's business (it originates the
                // mutual TLS); a direct one behind a sidecar needs a client that can.
                .filter(|e| mtls || !e.mutual_tls || (g.via_gateway && remote == Remote::Tunnel))
                .map(|e| {
                    let addr = SocketAddr::new(e.address, port.unwrap_or(e.port));
                    let tunnel = g.via_gateway && remote == Remote::Tunnel;
                    let mut filter_metadata = std::collections::HashMap::new();
                    if g.via_gateway {
                        filter_metadata.insert(
                            METADATA_NAMESPACE.to_string(),
                            strait_fields(g.cluster.as_str(), authority, addr),
                        );
                    }
                    if e.mutual_tls && !tunnel {
                        filter_metadata.insert(
                            SOCKET_MATCH_NAMESPACE.to_string(),
                            socket_match_fields(g.cluster.as_str()),
                        );
                    }
                    endpoint::LbEndpoint {
                        health_status: health(e.health),
                        load_balancing_weight: Some(UInt32Value { value: e.weight }),
                        metadata: (!filter_metadata.is_empty()).then(|| core::Metadata {
                            filter_metadata,
                            ..Default::default()
                        }),
                        host_identifier: Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(
                            endpoint::Endpoint {
                                address: Some(if tunnel {
                                    internal_address(format!("{}/{addr}", g.cluster))
                                } else {
                                    socket_address(addr)
                                }),
                                ..Default::default()
                            },
                        )),
                    }
                })
                .collect(),
            load_balancing_weight: Some(UInt32Value { value: g.weight }),
            priority: dense(g.priority),
            ..Default::default()
        })
        .collect();
    endpoint::ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints,
        ..Default::default()
    }
}

/// Envoy's share of traffic per priority level (in parts per million), from the serving share
/// of each level and the overprovisioning factor, normalised when the levels together are not
/// healthy enough to take everything.
pub fn priority_loads(levels: &[(usize, usize)]) -> Vec<u64> {
    const FULL: u64 = 1_000_000;
    let health: Vec<u64> = levels
        .iter()
        .map(|&(serving, total)| {
            if total == 0 {
                0
            } else {
                (FULL * OVERPROVISIONING / 100 * serving as u64 / total as u64).min(FULL)
            }
        })
        .collect();
    let sum: u64 = health.iter().sum::<u64>().min(FULL);
    if sum == 0 {
        return vec![0; levels.len()];
    }
    let mut left = FULL;
    health
        .iter()
        .map(|h| {
            // Normalised health: each level's share of the total when the sum is below 100 %.
            let h = h * FULL / sum;
            let take = h.min(left);
            left -= take;
            take
        })
        .collect()
}

/// Fold a route for a client that ignores overprovisioning (proxyless gRPC): the levels Envoy
/// would send traffic to become priority 0 together, their locality weights scaled to Envoy's
/// split; unserving endpoints are left out; the remaining levels follow, renumbered.
pub fn grpc_fold(route: &Route) -> Route {
    let levels = route.levels() as usize;
    let mut counts = vec![(0usize, 0usize); levels];
    for g in &route.groups {
        let c = &mut counts[g.priority as usize];
        c.0 += g.serving();
        c.1 += g.endpoints.len();
    }
    let loads = priority_loads(&counts);
    let mut level_weight = vec![0u64; levels];
    for g in &route.groups {
        level_weight[g.priority as usize] += u64::from(g.weight);
    }
    let spill = loads.iter().filter(|l| **l > 0).count();
    let mut out = Route {
        groups: Vec::new(),
        excluded: route.excluded.clone(),
    };
    for g in &route.groups {
        let p = g.priority as usize;
        let mut g2 = g.clone();
        g2.endpoints.retain(|e| e.health.is_serving());
        if g2.endpoints.is_empty() {
            continue;
        }
        if loads[p] > 0 {
            g2.priority = 0;
            if spill > 1 {
                // Parts of 10,000 of the total, at least 1.
                let w = loads[p] * u64::from(g.weight) / level_weight[p].max(1) / 100;
                g2.weight = w.clamp(1, u64::from(u32::MAX)) as u32;
                g2.why = format!("{}; receives Envoy's spill-over share", g.why);
            }
        } else {
            g2.priority = (p + 1 - spill) as u32;
        }
        out.groups.push(g2);
    }
    out.groups.sort_by_key(|g| g.priority);
    out
}

/// Which kind of client a resource set is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ClientKind {
    Envoy,
    Grpc,
}

fn http2_options() -> (String, envoy_types::pb::google::protobuf::Any) {
    let opts = HttpProtocolOptions {
        upstream_protocol_options: Some(
            http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                http_protocol_options::ExplicitHttpConfig {
                    protocol_config: Some(
                        http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                            Default::default(),
                        ),
                    ),
                },
            ),
        ),
        ..Default::default()
    };
    (
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_string(),
        pack_any(opts),
    )
}

/// The clusters whose endpoints in `route` sit behind sidecars and are reached directly (not
/// through the gateway): each needs a mutual-TLS transport-socket match.
pub fn mutual_clusters(route: &Route) -> Vec<&str> {
    let set: BTreeSet<&str> = route
        .groups
        .iter()
        .filter(|g| !g.via_gateway && g.endpoints.iter().any(|e| e.mutual_tls))
        .map(|g| g.cluster.as_str())
        .collect();
    set.into_iter().collect()
}

/// One transport-socket match per cluster in `mutual`: endpoints whose socket-match metadata
/// names the cluster get TLS 1.3 with the bootstrap's workload certificate, trust in the
/// federation CA, the cluster's workload identities only, and the port's ALPN.
pub fn mutual_matches(
    mutual: &[&str],
    port: &ServicePort,
) -> Vec<cluster::cluster::TransportSocketMatch> {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
    mutual
        .iter()
        .map(|c| {
            let validation = tls::CertificateValidationContext {
                match_typed_subject_alt_names: vec![tls::SubjectAltNameMatcher {
                    san_type: tls::subject_alt_name_matcher::SanType::Uri as i32,
                    matcher: Some(string_matcher(MatchPattern::SafeRegex(regex_matcher(
                        &workload_san_regex(c),
                    )))),
                    ..Default::default()
                }],
                ..Default::default()
            };
            let context = tls::UpstreamTlsContext {
                common_tls_context: Some(tls::CommonTlsContext {
                    tls_params: Some(tls::TlsParameters {
                        tls_minimum_protocol_version: tls::tls_parameters::TlsProtocol::TlSv13
                            as i32,
                        tls_maximum_protocol_version: tls::tls_parameters::TlsProtocol::TlSv13
                            as i32,
                        ..Default::default()
                    }),
                    tls_certificate_sds_secret_configs: vec![tls::SdsSecretConfig {
                        name: WORKLOAD_SECRET.to_string(),
                        sds_config: None,
                    }],
                    validation_context_type: Some(
                        tls::common_tls_context::ValidationContextType::CombinedValidationContext(
                            tls::common_tls_context::CombinedCertificateValidationContext {
                                default_validation_context: Some(validation),
                                validation_context_sds_secret_config: Some(tls::SdsSecretConfig {
                                    name: CA_SECRET.to_string(),
                                    sds_config: None,
                                }),
                                ..Default::default()
                            },
                        ),
                    ),
                    alpn_protocols: port
                        .protocol
                        .alpn()
                        .map(str::to_string)
                        .into_iter()
                        .collect(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            cluster::cluster::TransportSocketMatch {
                name: mutual_match_name(c),
                r#match: Some(socket_match_fields(c)),
                transport_socket: Some(core::TransportSocket {
                    name: "envoy.transport_sockets.tls".to_string(),
                    config_type: Some(core::transport_socket::ConfigType::TypedConfig(pack_any(
                        context,
                    ))),
                }),
            }
        })
        .collect()
}

/// The CDS resource of one service port; `mutual`: the clusters whose sidecars it reaches
/// directly ([`mutual_clusters`]; Envoy-like clients only).
pub fn service_cluster(
    service: &ServiceKey,
    port: &ServicePort,
    kind: ClientKind,
    mutual: &[&str],
) -> cluster::Cluster {
    let mut c = cluster::Cluster {
        name: cluster_name(service, port.port),
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::cluster::EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: String::new(),
        }),
        lb_policy: cluster::cluster::LbPolicy::RoundRobin as i32,
        ..Default::default()
    };
    if kind == ClientKind::Envoy {
        c.connect_timeout = Some(duration_ms(1000));
        c.common_lb_config = Some(cluster::cluster::CommonLbConfig {
            locality_config_specifier: Some(
                cluster::cluster::common_lb_config::LocalityConfigSpecifier::LocalityWeightedLbConfig(
                    Default::default(),
                ),
            ),
            ..Default::default()
        });
        // Retries are bounded by a budget, not Envoy's default of 3 in flight (which fails
        // requests when a whole priority dies under load): never more retries in flight than
        // requests in flight, and always at least 32.
        c.circuit_breakers = Some(cluster::CircuitBreakers {
            thresholds: vec![cluster::circuit_breakers::Thresholds {
                priority: core::RoutingPriority::Default as i32,
                retry_budget: Some(cluster::circuit_breakers::thresholds::RetryBudget {
                    budget_percent: Some(envoy_types::pb::envoy::r#type::v3::Percent {
                        value: RETRY_BUDGET_PERCENT,
                    }),
                    min_retry_concurrency: Some(UInt32Value {
                        value: RETRY_MIN_CONCURRENCY,
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        });
        // Passive health: eject endpoints that fail, so retries and spill-over move on.
        c.outlier_detection = Some(cluster::OutlierDetection {
            consecutive_5xx: Some(UInt32Value { value: 5 }),
            consecutive_gateway_failure: Some(UInt32Value { value: 3 }),
            interval: Some(duration_ms(1000)),
            base_ejection_time: Some(duration_ms(5000)),
            max_ejection_percent: Some(UInt32Value { value: 50 }),
            ..Default::default()
        });
        // Endpoints behind the gateway are internal addresses: pass their `strait` metadata on
        // to the tunnel listener's connection, where the CONNECT authority and header read it.
        c.transport_socket = Some(core::TransportSocket {
            name: "envoy.transport_sockets.internal_upstream".to_string(),
            config_type: Some(core::transport_socket::ConfigType::TypedConfig(pack_any(
                InternalUpstreamTransport {
                    passthrough_metadata: vec![MetadataValueSource {
                        kind: Some(MetadataKind {
                            kind: Some(metadata_kind::Kind::Host(Default::default())),
                        }),
                        name: METADATA_NAMESPACE.to_string(),
                    }],
                    transport_socket: Some(core::TransportSocket {
                        name: "envoy.transport_sockets.raw_buffer".to_string(),
                        config_type: Some(core::transport_socket::ConfigType::TypedConfig(
                            pack_any(RawBuffer {}),
                        )),
                    }),
                },
            ))),
        });
        c.transport_socket_matches = mutual_matches(mutual, port);
        if matches!(port.protocol, Protocol::Http2 | Protocol::Grpc) {
            c.typed_extension_protocol_options = [http2_options()].into_iter().collect();
        }
    }
    c
}

fn router_filter() -> hcm::HttpFilter {
    hcm::HttpFilter {
        name: "envoy.filters.http.router".to_string(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(pack_any(
            Router::default(),
        ))),
        ..Default::default()
    }
}

/// A retry policy whose retries prefer another host and another priority than the ones that
/// failed (Envoy's `previous_hosts` and `previous_priorities`).
fn retry_policy(
    on: &str,
    attempts: u32,
    per_try_timeout_ms: Option<u64>,
    status_codes: &[u16],
) -> route::RetryPolicy {
    route::RetryPolicy {
        retry_on: on.to_string(),
        num_retries: Some(UInt32Value { value: attempts }),
        per_try_timeout: per_try_timeout_ms.map(duration_ms),
        retriable_status_codes: status_codes.iter().map(|c| u32::from(*c)).collect(),
        retry_host_predicate: vec![route::retry_policy::RetryHostPredicate {
            name: "envoy.retry_host_predicates.previous_hosts".to_string(),
            config_type: Some(
                route::retry_policy::retry_host_predicate::ConfigType::TypedConfig(pack_any(
                    envoy_types::pb::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate::default(),
                )),
            ),
        }],
        retry_priority: Some(route::retry_policy::RetryPriority {
            name: "envoy.retry_priorities.previous_priorities".to_string(),
            config_type: Some(route::retry_policy::retry_priority::ConfigType::TypedConfig(
                pack_any(
                    envoy_types::pb::envoy::extensions::retry::priority::previous_priorities::v3::PreviousPrioritiesConfig {
                        update_frequency: 1,
                    },
                ),
            )),
        }),
        host_selection_retry_max_attempts: 3,
        ..Default::default()
    }
}

/// The default retry policy: two retries on connection failures, resets and gateway errors.
fn default_retries() -> route::RetryPolicy {
    retry_policy(
        "connect-failure,refused-stream,reset,gateway-error",
        2,
        None,
        &[],
    )
}

fn route_to(cluster: String, retries: bool) -> route::Route {
    route::Route {
        name: "default".to_string(),
        r#match: Some(route::RouteMatch {
            path_specifier: Some(route::route_match::PathSpecifier::Prefix("/".to_string())),
            ..Default::default()
        }),
        action: Some(route::route::Action::Route(route::RouteAction {
            cluster_specifier: Some(route::route_action::ClusterSpecifier::Cluster(cluster)),
            retry_policy: retries.then(default_retries),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn string_matcher(m: MatchPattern) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(m),
        ignore_case: false,
    }
}

fn regex_matcher(r: &str) -> RegexMatcher {
    RegexMatcher {
        regex: r.to_string(),
        ..Default::default()
    }
}

/// One HTTP routing rule of a service, its destinations resolved to cluster names.
#[derive(Debug, Clone, Hash)]
pub struct ResolvedRule<'a> {
    pub index: usize,
    pub rule: &'a HttpRoute,
    /// (cluster, weight) for each destination.
    pub clusters: Vec<(String, u32)>,
}

/// The Envoy route of a rule.
pub fn rule_route(r: &ResolvedRule<'_>) -> route::Route {
    use route::header_matcher::HeaderMatchSpecifier as H;
    use route::route_match::PathSpecifier as P;
    let path = match &r.rule.path {
        None => P::Prefix("/".to_string()),
        Some(PathMatch::Prefix(p)) => P::Prefix(p.clone()),
        Some(PathMatch::Exact(p)) => P::Path(p.clone()),
        Some(PathMatch::Regex(x)) => P::SafeRegex(regex_matcher(x)),
    };
    let headers = r
        .rule
        .headers
        .iter()
        .map(|h| route::HeaderMatcher {
            name: h.name.clone(),
            invert_match: h.invert,
            header_match_specifier: Some(match &h.value {
                HeaderValueMatch::Exact(v) => {
                    H::StringMatch(string_matcher(MatchPattern::Exact(v.clone())))
                }
                HeaderValueMatch::Prefix(v) => {
                    H::StringMatch(string_matcher(MatchPattern::Prefix(v.clone())))
                }
                HeaderValueMatch::Regex(v) => {
                    H::StringMatch(string_matcher(MatchPattern::SafeRegex(regex_matcher(v))))
                }
                HeaderValueMatch::Present(p) => H::PresentMatch(*p),
            }),
            ..Default::default()
        })
        .collect();
    use route::route_action::ClusterSpecifier as CS;
    let target = match r.clusters.as_slice() {
        [(c, _)] => CS::Cluster(c.clone()),
        many => CS::WeightedClusters(route::WeightedCluster {
            clusters: many
                .iter()
                .map(|(c, w)| route::weighted_cluster::ClusterWeight {
                    name: c.clone(),
                    weight: Some(UInt32Value { value: *w }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
    };
    let retry_policy = match &r.rule.retries {
        None => Some(default_retries()),
        Some(x) if x.attempts == 0 => None,
        Some(x) => Some(retry_policy(
            &x.on.join(","),
            x.attempts,
            x.per_try_timeout_ms,
            &x.status_codes,
        )),
    };
    // In-flight protection settings for strait's proxy (Envoy ignores them).
    let mut fields = std::collections::BTreeMap::new();
    if r.rule.idempotent {
        fields.insert(
            ROUTE_IDEMPOTENT.to_string(),
            Value {
                kind: Some(Kind::BoolValue(true)),
            },
        );
    }
    if let Some(b) = r.rule.response_buffer {
        fields.insert(
            ROUTE_RESPONSE_BUFFER.to_string(),
            Value {
                kind: Some(Kind::NumberValue(b as f64)),
            },
        );
    }
    let metadata = (!fields.is_empty()).then(|| core::Metadata {
        filter_metadata: [(
            METADATA_NAMESPACE.to_string(),
            Struct {
                fields: fields.into_iter().collect(),
            },
        )]
        .into_iter()
        .collect(),
        ..Default::default()
    });
    route::Route {
        name: r.rule.display_name(r.index),
        metadata,
        r#match: Some(route::RouteMatch {
            path_specifier: Some(path),
            headers,
            ..Default::default()
        }),
        action: Some(route::route::Action::Route(route::RouteAction {
            cluster_specifier: Some(target),
            timeout: r.rule.timeout_ms.map(duration_ms),
            retry_policy,
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// The host names a service port answers to: `NAME.NS`, `NAME.NS.svc.clusterset.local` and
/// `NAME.NS.svc.cluster.local`, each with `:PORT`, and without a port for the first port.
pub fn domains(service: &ServiceKey, port: u16, first: bool) -> Vec<String> {
    let base = format!("{}.{}", service.name, service.namespace);
    let names = [
        base.clone(),
        format!("{base}.svc.clusterset.local"),
        format!("{base}.svc.cluster.local"),
    ];
    let mut out = Vec::new();
    for n in names {
        out.push(format!("{n}:{port}"));
        if first {
            out.push(n);
        }
    }
    out
}

/// One HTTP service port for Envoy's outbound route configuration.
pub struct HttpPort<'a> {
    pub service: &'a ServiceKey,
    pub port: u16,
    pub first: bool,
    /// The service policy's HTTP rules, in order.
    pub rules: Vec<ResolvedRule<'a>>,
}

/// Envoy's outbound route configuration: one virtual host per HTTP service port, with the
/// service's HTTP rules in order, then the default route to the service itself.
pub fn outbound_routes(ports: &[HttpPort<'_>]) -> route::RouteConfiguration {
    route::RouteConfiguration {
        name: OUTBOUND_ROUTES.to_string(),
        virtual_hosts: ports
            .iter()
            .map(|p| route::VirtualHost {
                name: cluster_name(p.service, p.port),
                domains: domains(p.service, p.port, p.first),
                routes: p
                    .rules
                    .iter()
                    .map(rule_route)
                    .chain([route_to(cluster_name(p.service, p.port), true)])
                    .collect(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn hcm_filter(h: hcm::HttpConnectionManager) -> listener::Filter {
    listener::Filter {
        name: "envoy.filters.network.http_connection_manager".to_string(),
        config_type: Some(listener::filter::ConfigType::TypedConfig(pack_any(h))),
    }
}

/// Envoy's outbound HTTP listener on `addr`, routed by `Host`/`:authority` through RDS.
pub fn outbound_listener(addr: SocketAddr) -> listener::Listener {
    let h = hcm::HttpConnectionManager {
        stat_prefix: "strait_outbound".to_string(),
        codec_type: hcm::http_connection_manager::CodecType::Auto as i32,
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
            hcm::Rds {
                config_source: Some(ads()),
                route_config_name: OUTBOUND_ROUTES.to_string(),
            },
        )),
        http_filters: vec![router_filter()],
        // WebSockets (HTTP/1.1 upgrades) pass through, as they do in the strait proxy.
        upgrade_configs: vec![hcm::http_connection_manager::UpgradeConfig {
            upgrade_type: "websocket".to_string(),
            ..Default::default()
        }],
        ..Default::default()
    };
    listener::Listener {
        name: OUTBOUND_LISTENER.to_string(),
        address: Some(socket_address(addr)),
        filter_chains: vec![listener::FilterChain {
            filters: vec![hcm_filter(h)],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The name of the outbound TCP listener of a service port.
pub fn tcp_listener_name(service: &ServiceKey, port: u16) -> String {
    format!("strait_outbound_tcp_{}", cluster_name(service, port))
}

/// An outbound TCP listener on `addr` for one TCP service port: every connection goes to the
/// port's cluster (`TcpProxy`).
pub fn tcp_listener(service: &ServiceKey, port: u16, addr: SocketAddr) -> listener::Listener {
    listener::Listener {
        name: tcp_listener_name(service, port),
        address: Some(socket_address(addr)),
        filter_chains: vec![tcp_proxy_chain(cluster_name(service, port))],
        ..Default::default()
    }
}

/// A filter chain of one `TcpProxy` to `cluster`.
fn tcp_proxy_chain(cluster: String) -> listener::FilterChain {
    let t = tcp_proxy::TcpProxy {
        stat_prefix: cluster.clone(),
        cluster_specifier: Some(tcp_proxy::tcp_proxy::ClusterSpecifier::Cluster(cluster)),
        ..Default::default()
    };
    listener::FilterChain {
        filters: vec![listener::Filter {
            name: "envoy.filters.network.tcp_proxy".to_string(),
            config_type: Some(listener::filter::ConfigType::TypedConfig(pack_any(t))),
        }],
        ..Default::default()
    }
}

/// The transparent listener on `addr`, for connections an iptables `REDIRECT` sent there:
/// `use_original_dst` with the `original_dst` listener filter, so Envoy hands a connection to
/// the listener of its original destination when it has one, and otherwise to this listener's
/// own chain, a `TcpProxy` to [`PASSTHROUGH_CLUSTER`]. The strait proxy reads the same listener
/// as its transparent mode (TCP service ports, then HTTP by `Host`, then passthrough).
pub fn transparent_listener(addr: SocketAddr) -> listener::Listener {
    use envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
    listener::Listener {
        name: TRANSPARENT_LISTENER.to_string(),
        address: Some(socket_address(addr)),
        use_original_dst: Some(envoy_types::pb::google::protobuf::BoolValue { value: true }),
        listener_filters: vec![listener::ListenerFilter {
            name: "envoy.filters.listener.original_dst".to_string(),
            config_type: Some(listener::listener_filter::ConfigType::TypedConfig(
                pack_any(OriginalDst::default()),
            )),
            ..Default::default()
        }],
        filter_chains: vec![tcp_proxy_chain(PASSTHROUGH_CLUSTER.to_string())],
        ..Default::default()
    }
}

/// The passthrough cluster: each connection goes to its own original destination
/// (`ORIGINAL_DST`, `CLUSTER_PROVIDED`).
pub fn passthrough_cluster() -> cluster::Cluster {
    use cluster::cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy};
    cluster::Cluster {
        name: PASSTHROUGH_CLUSTER.to_string(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(
            DiscoveryType::OriginalDst as i32,
        )),
        lb_policy: LbPolicy::ClusterProvided as i32,
        connect_timeout: Some(duration_ms(10_000)),
        ..Default::default()
    }
}

/// A proxyless gRPC client's listener for target `xds:///NAME` (an `api_listener` with an inline
/// route configuration): the service policy's HTTP rules (path, headers — gRPC metadata — and
/// weighted destinations; gRPC takes deadlines and retries from its own call options, so the
/// rules' timeout and retries are left out), then the route to the service port's cluster.
pub fn grpc_listener(
    name: &str,
    cluster: String,
    rules: &[ResolvedRule<'_>],
) -> listener::Listener {
    let mut routes: Vec<route::Route> = rules
        .iter()
        .map(|r| {
            let mut route = rule_route(r);
            if let Some(route::route::Action::Route(a)) = &mut route.action {
                a.retry_policy = None;
                a.timeout = None;
            }
            route
        })
        .collect();
    routes.push(route_to(cluster, false));
    let h = hcm::HttpConnectionManager {
        stat_prefix: name.to_string(),
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(
            route::RouteConfiguration {
                name: name.to_string(),
                virtual_hosts: vec![route::VirtualHost {
                    name: name.to_string(),
                    domains: vec!["*".to_string()],
                    routes,
                    ..Default::default()
                }],
                ..Default::default()
            },
        )),
        http_filters: vec![router_filter()],
        ..Default::default()
    };
    listener::Listener {
        name: name.to_string(),
        api_listener: Some(listener::ApiListener {
            api_listener: Some(pack_any(h)),
        }),
        ..Default::default()
    }
}
