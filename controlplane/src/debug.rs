//! Human-readable rendering of sent resources for `/debug/config`.

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::google::protobuf::Any;
use prost::Message;

use crate::view::TypeKind;

fn decode<M: Message + Default + std::fmt::Debug>(bytes: &[u8]) -> String {
    match M::decode(bytes) {
        Ok(m) => format!("{m:#?}"),
        Err(e) => format!("<cannot decode: {e}>"),
    }
}

/// The resource decoded and pretty-printed (protobuf field names, Rust debug syntax).
pub fn render(body: &Any) -> String {
    match TypeKind::from_url(&body.type_url) {
        Some(TypeKind::Cluster) => decode::<Cluster>(&body.value),
        Some(TypeKind::Endpoint) => decode::<ClusterLoadAssignment>(&body.value),
        Some(TypeKind::Listener) => decode::<Listener>(&body.value),
        Some(TypeKind::Route) => decode::<RouteConfiguration>(&body.value),
        None => format!("<{} bytes of {}>", body.value.len(), body.type_url),
    }
}
