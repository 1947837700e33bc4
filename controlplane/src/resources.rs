//! xDS resources built from resolved routes (`federation::route`): the EDS
//! `ClusterLoadAssignment` of a service port, as Envoy and proxyless gRPC read it.
//!
//! Each locality group becomes one `LocalityLbEndpoints` with its priority (levels are dense
//! from 0, as Envoy requires), its locality, and its locality weight; each endpoint one
//! `LbEndpoint` with its health and weight. Endpoints of clusters on another network carry filter
//! metadata `strait` `{cluster, via_gateway: true}`: the xDS server routes those through the
//! caller's east-west gateway.

use std::net::SocketAddr;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint;
use envoy_types::pb::google::protobuf::{Struct, UInt32Value, Value, value::Kind};
use federation::model::{Health, ServiceKey};
use federation::route::Route;

/// The name of the cluster (CDS) and load assignment (EDS) of a service port.
pub fn cluster_name(service: &ServiceKey, port: u16) -> String {
    format!("{}.{}:{port}", service.name, service.namespace)
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

fn health(h: Health) -> i32 {
    (match h {
        Health::Healthy => core::HealthStatus::Healthy,
        Health::Degraded => core::HealthStatus::Degraded,
        Health::Draining => core::HealthStatus::Draining,
        Health::Unhealthy => core::HealthStatus::Unhealthy,
    }) as i32
}

fn strait_metadata(cluster: &str) -> core::Metadata {
    let fields = [
        (
            "cluster".to_string(),
            Value {
                kind: Some(Kind::StringValue(cluster.to_string())),
            },
        ),
        (
            "via_gateway".to_string(),
            Value {
                kind: Some(Kind::BoolValue(true)),
            },
        ),
    ]
    .into_iter()
    .collect();
    core::Metadata {
        filter_metadata: [("strait".to_string(), Struct { fields })]
            .into_iter()
            .collect(),
        ..Default::default()
    }
}

/// The EDS resource of `name` for a resolved route.
pub fn load_assignment(name: &str, route: &Route) -> endpoint::ClusterLoadAssignment {
    let endpoints = route
        .groups
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
                .map(|e| endpoint::LbEndpoint {
                    health_status: health(e.health),
                    load_balancing_weight: Some(UInt32Value { value: e.weight }),
                    metadata: g.via_gateway.then(|| strait_metadata(g.cluster.as_str())),
                    host_identifier: Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(
                        endpoint::Endpoint {
                            address: Some(socket_address(SocketAddr::new(e.address, e.port))),
                            ..Default::default()
                        },
                    )),
                })
                .collect(),
            load_balancing_weight: Some(UInt32Value { value: g.weight }),
            priority: g.priority,
            ..Default::default()
        })
        .collect();
    endpoint::ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints,
        ..Default::default()
    }
}
