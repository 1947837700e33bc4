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
    SOCKET_MATCH_NAMESPACE, TUNNEL_AUTHORITY, TUNNEL_CLUSTER, TUNNEL_ENDPOINT, TUNNEL_NAMESPACE,
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

mod assignments;
mod clusters;
mod listeners;
mod routes;

pub use assignments::*;
pub use clusters::*;
pub use listeners::*;
use routes::route_table_from;
pub use routes::*;
