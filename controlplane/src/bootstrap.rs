//! `strait proxy bootstrap --envoy`: an Envoy bootstrap that takes everything else from the
//! cluster's control plane over ADS, and a proxyless gRPC bootstrap (`GRPC_XDS_BOOTSTRAP`).
//!
//! The Envoy bootstrap holds only what must be local: the node (id, cluster, locality, Strait
//! metadata), the `strait_xds` cluster, and — when a gateway is given — the `strait_gateway`
//! cluster (the local east-west gateway's ingress, HTTP/2 over mTLS with the workload
//! certificate, the gateway's SPIFFE identity pinned) with the internal listener
//! `strait_tunnel`: a TCP proxy that tunnels each connection in an HTTP/2 CONNECT whose
//! authority and `strait-cluster` and `strait-endpoint` headers come from the endpoint's `strait`
//! metadata. With the
//! workload certificate it also holds the static secrets `strait_workload` and
//! `strait_federation_ca` that the service clusters' mutual-TLS transport sockets (to endpoints
//! behind sidecars) name, and says so in the node metadata (`STRAIT_MTLS`).

use std::net::SocketAddr;
use std::path::PathBuf;

use federation::model::{ClusterId, GatewayAddress, Labels, Locality};
use serde_json::{Value, json};

use crate::view::{
    META_CLUSTER, META_KIND, META_LABELS, META_MTLS, META_OUTBOUND, META_TRANSPARENT, META_TUNNEL,
};
use federation::tunnel::{CLUSTER_HEADER, ENDPOINT_HEADER};
use federation::xds_contract::{
    CA_SECRET, GATEWAY_CLUSTER, KIND_ENVOY, KIND_GRPC, TUNNEL_AUTHORITY, TUNNEL_CLUSTER,
    TUNNEL_ENDPOINT, TUNNEL_LISTENER, TUNNEL_NAMESPACE, WORKLOAD_SECRET, XDS_CLUSTER,
};

/// Workload certificate files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// What a bootstrap needs.
#[derive(Debug, Clone)]
pub struct BootstrapSpec {
    pub node_id: String,
    pub cluster: ClusterId,
    pub locality: Locality,
    pub labels: Labels,
    /// The control plane's xDS address: `IP:PORT`, or `NAME:PORT` (a DNS name, checked
    /// against the control plane's certificate; every address it resolves to is used).
    pub xds: GatewayAddress,
    /// Other replicas of the control plane (Envoy balances its ADS stream over all of them and
    /// moves to another when one goes; gRPC lists them as further `xds_servers`).
    pub xds_replicas: Vec<GatewayAddress>,
    /// mTLS to the control plane (and to the gateway) with these workload certificate files.
    pub tls: Option<CertFiles>,
    /// Delta xDS instead of state of the world.
    pub delta: bool,
    /// Envoy's admin address.
    pub admin: SocketAddr,
    /// The outbound HTTP listener's address.
    pub outbound: SocketAddr,
    /// The transparent listener's address (where the pod's iptables redirection sends
    /// intercepted connections), if the pod has one.
    pub transparent: Option<SocketAddr>,
    /// The local gateway's ingresses (one per gateway replica) and the SPIFFE id they must
    /// present.
    pub gateway: Option<(Vec<SocketAddr>, String)>,
}

fn socket(a: SocketAddr) -> Value {
    json!({"socket_address": {"address": a.ip().to_string(), "port_value": a.port()}})
}

fn host_socket(a: &GatewayAddress) -> Value {
    json!({"socket_address": {"address": a.host(), "port_value": a.port()}})
}

/// Upstream TLS with the workload certificate; the server must present the SPIFFE ID `san`
/// (a URI SAN) or the DNS name `dns` (also sent as SNI), when given.
fn tls_context(files: &CertFiles, alpn: &[&str], san: Option<&str>, dns: Option<&str>) -> Value {
    let mut validation = json!({"trusted_ca": {"filename": files.ca}});
    if let Some(san) = san {
        validation["match_typed_subject_alt_names"] =
            json!([{"san_type": "URI", "matcher": {"exact": san}}]);
    } else if let Some(dns) = dns {
        validation["match_typed_subject_alt_names"] =
            json!([{"san_type": "DNS", "matcher": {"exact": dns}}]);
    }
    let mut context = json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": {
                // Envoy's clients stop at TLS 1.2 unless told; Strait's gateways and control
                // planes speak TLS 1.3 only.
                "tls_params": {
                    "tls_minimum_protocol_version": "TLSv1_3",
                    "tls_maximum_protocol_version": "TLSv1_3",
                },
                "tls_certificates": [{
                    "certificate_chain": {"filename": files.cert},
                    "private_key": {"filename": files.key},
                }],
                "validation_context": validation,
                "alpn_protocols": alpn,
            }
        }
    });
    if let Some(dns) = dns {
        context["typed_config"]["sni"] = json!(dns);
    }
    context
}

fn h2_options() -> Value {
    json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    })
}

fn node(spec: &BootstrapSpec, kind: &str) -> Value {
    let labels: serde_json::Map<String, Value> = spec
        .labels
        .iter()
        .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
        .collect();
    let mut metadata = json!({
        META_CLUSTER: spec.cluster.as_str(),
        META_KIND: kind,
        META_LABELS: labels,
    });
    if kind == KIND_ENVOY {
        metadata[META_OUTBOUND] = json!(spec.outbound.to_string());
        if let Some(t) = spec.transparent {
            metadata[META_TRANSPARENT] = json!(t.to_string());
        }
        metadata[META_TUNNEL] = json!(spec.gateway.is_some());
        // With the workload certificate, the bootstrap holds the static secrets that the
        // clusters' mutual-TLS transport sockets name: sidecars can be reached.
        metadata[META_MTLS] = json!(spec.tls.is_some());
    }
    json!({
        "id": spec.node_id,
        "cluster": spec.cluster.as_str(),
        "locality": {
            "region": spec.locality.region(),
            "zone": spec.locality.zone(),
            "sub_zone": spec.locality.subzone(),
        },
        "metadata": metadata,
    })
}

/// The Envoy bootstrap (JSON; Envoy reads it with `-c FILE`).
pub fn envoy(spec: &BootstrapSpec) -> Value {
    let servers: Vec<&GatewayAddress> = std::iter::once(&spec.xds)
        .chain(&spec.xds_replicas)
        .collect();
    // A DNS name: every address it resolves to, re-resolved (a Service with several replicas).
    let named = servers.iter().find(|a| a.socket_addr().is_none());
    let mut xds_cluster = json!({
        "name": XDS_CLUSTER,
        "type": if named.is_some() { "STRICT_DNS" } else { "STATIC" },
        "connect_timeout": "1s",
        "typed_extension_protocol_options": h2_options(),
        "load_assignment": {
            "cluster_name": XDS_CLUSTER,
            "endpoints": [{"lb_endpoints": servers
                .iter()
                .map(|a| json!({"endpoint": {"address": host_socket(a)}}))
                .collect::<Vec<_>>()}],
        },
    });
    if let Some(files) = &spec.tls {
        xds_cluster["transport_socket"] =
            tls_context(files, &["h2"], None, named.map(|a| a.host()));
    }
    let mut clusters = vec![xds_cluster];
    let mut listeners = Vec::new();
    let mut extensions = Vec::new();
    if let Some((ingresses, san)) = &spec.gateway {
        let endpoints: Vec<Value> = ingresses
            .iter()
            .map(|a| json!({"endpoint": {"address": socket(*a)}}))
            .collect();
        let mut gw = json!({
            "name": GATEWAY_CLUSTER,
            "type": "STATIC",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": h2_options(),
            "load_assignment": {
                "cluster_name": GATEWAY_CLUSTER,
                "endpoints": [{"lb_endpoints": endpoints}],
            },
        });
        if ingresses.len() > 1 {
            // A replica that refuses connections or resets is left out for a while.
            gw["outlier_detection"] = json!({
                "consecutive_local_origin_failure": 2,
                "split_external_local_origin_errors": true,
                "base_ejection_time": "5s",
                "max_ejection_percent": 50,
            });
        }
        if let Some(files) = &spec.tls {
            gw["transport_socket"] = tls_context(files, &["h2"], Some(san), None);
        }
        clusters.push(gw);
        listeners.push(json!({
            "name": TUNNEL_LISTENER,
            "internal_listener": {},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.tcp_proxy",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                    "stat_prefix": TUNNEL_LISTENER,
                    "cluster": GATEWAY_CLUSTER,
                    // Another gateway replica when one cannot be connected to.
                    "max_connect_attempts": ingresses.len().clamp(1, 3),
                    "tunneling_config": {
                        "hostname": format!("%DYNAMIC_METADATA({TUNNEL_NAMESPACE}:{TUNNEL_AUTHORITY})%"),
                        "headers_to_add": [
                            {"header": {
                                "key": CLUSTER_HEADER,
                                "value": format!("%DYNAMIC_METADATA({TUNNEL_NAMESPACE}:{TUNNEL_CLUSTER})%"),
                            }},
                            // The endpoint Envoy's balancer chose: the remote gateway connects
                            // to it (if it is an endpoint of the service there).
                            {"header": {
                                "key": ENDPOINT_HEADER,
                                "value": format!("%DYNAMIC_METADATA({TUNNEL_NAMESPACE}:{TUNNEL_ENDPOINT})%"),
                            }},
                        ],
                    },
                },
            }]}],
        }));
        extensions.push(json!({
            "name": "envoy.bootstrap.internal_listener",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener",
            },
        }));
    }
    // The secrets of the mutual-TLS transport sockets to sidecars (`transport_socket_matches`
    // of the service clusters name them).
    let secrets = match &spec.tls {
        Some(f) => json!([
            {"name": WORKLOAD_SECRET, "tls_certificate": {
                "certificate_chain": {"filename": f.cert},
                "private_key": {"filename": f.key},
            }},
            {"name": CA_SECRET, "validation_context": {"trusted_ca": {"filename": f.ca}}},
        ]),
        None => json!([]),
    };
    let config_source = json!({"ads": {}, "resource_api_version": "V3"});
    json!({
        "node": node(spec, KIND_ENVOY),
        "dynamic_resources": {
            "ads_config": {
                "api_type": if spec.delta { "DELTA_GRPC" } else { "GRPC" },
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}],
                "set_node_on_first_message_only": true,
            },
            "cds_config": config_source,
            "lds_config": config_source,
        },
        "static_resources": {"clusters": clusters, "listeners": listeners, "secrets": secrets},
        "bootstrap_extensions": extensions,
        "admin": {"address": socket(spec.admin)},
    })
}

/// A proxyless gRPC bootstrap (the file `GRPC_XDS_BOOTSTRAP` names).
pub fn grpc(spec: &BootstrapSpec) -> Value {
    // mTLS to the control plane with the workload certificate (gRFC A65 `tls` credentials).
    let creds = match &spec.tls {
        Some(f) => json!([{"type": "tls", "config": {
            "ca_certificate_file": f.ca,
            "certificate_file": f.cert,
            "private_key_file": f.key,
        }}]),
        None => json!([{"type": "insecure"}]),
    };
    // gRPC checks the host of `server_uri` (a DNS name or an IP) against the certificate.
    let servers: Vec<Value> = std::iter::once(&spec.xds)
        .chain(&spec.xds_replicas)
        .map(|a| {
            json!({
                "server_uri": a.to_string(),
                "channel_creds": creds,
                "server_features": ["xds_v3"],
            })
        })
        .collect();
    json!({
        "xds_servers": servers,
        "node": node(spec, KIND_GRPC),
    })
}
