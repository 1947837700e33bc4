//! The contract between the control plane and the proxies it configures over xDS — Strait's own
//! sidecar, Envoy, proxyless gRPC — written once: the names both sides must agree on. The
//! control plane (`controlplane::view`, `resources`, `bootstrap`, `client`), the proxy
//! (`proxy::xds`, `config`) and `strait proxy bootstrap` take them from here and spell none of
//! them out themselves, as [`crate::tunnel`] does for the tunnel protocol. Changing one is
//! changing the protocol between releases: `tests/compat/xds-nodes-v1.json` holds the node
//! metadata the previous release sends, and the control plane must go on reading it.

// ---- Node metadata (`Node.metadata`): what a proxy tells its control plane about itself ----

/// The proxy's cluster (a string).
pub const META_CLUSTER: &str = "STRAIT_CLUSTER";
/// What kind of client it is: [`KIND_ENVOY`] (Envoy, or Strait's sidecar, which takes the same
/// resources) or [`KIND_GRPC`] (proxyless gRPC). Absent: a user agent naming gRPC means gRPC.
pub const META_KIND: &str = "STRAIT_KIND";
/// The workload's labels (a Struct of strings): which routes and policies apply to it.
pub const META_LABELS: &str = "STRAIT_LABELS";
/// The outbound listener's address (`IP:PORT`, Envoy kind only).
pub const META_OUTBOUND: &str = "STRAIT_OUTBOUND";
/// The transparent listener's address (`IP:PORT`): where the pod's redirection sends
/// intercepted connections; the control plane then serves that listener over LDS.
pub const META_TRANSPARENT: &str = "STRAIT_TRANSPARENT";
/// Whether the proxy reaches other clusters through its gateway's ingress (a bool).
pub const META_TUNNEL: &str = "STRAIT_TUNNEL";
/// Whether the proxy has a workload certificate to reach sidecars with mutual TLS (a bool).
pub const META_MTLS: &str = "STRAIT_MTLS";

/// [`META_KIND`] of Envoy and of Strait's sidecar.
pub const KIND_ENVOY: &str = "envoy";
/// [`META_KIND`] of proxyless gRPC.
pub const KIND_GRPC: &str = "grpc";

// ---- Endpoint metadata (`LbEndpoint.metadata.filter_metadata`) ----

/// The namespace of an endpoint reached through the gateway (an internal address): its keys
/// [`TUNNEL_CLUSTER`], [`TUNNEL_AUTHORITY`] and [`TUNNEL_ENDPOINT`] name the tunnel's target,
/// and Envoy's internal upstream transport passes the namespace on to the [`TUNNEL_LISTENER`].
pub const TUNNEL_NAMESPACE: &str = "strait";
/// The cluster a tunnelled endpoint is in (the tunnel's `strait-cluster` header).
pub const TUNNEL_CLUSTER: &str = "cluster";
/// The `SERVICE.NAMESPACE:PORT` a tunnelled endpoint is reached at (the CONNECT authority).
pub const TUNNEL_AUTHORITY: &str = "authority";
/// Set (`true`) on a tunnelled endpoint, for readers of `/config_dump`.
pub const TUNNEL_VIA_GATEWAY: &str = "via_gateway";
/// The endpoint's own `ADDRESS:PORT` in its cluster (the tunnel's `strait-endpoint` header): the
/// remote gateway connects to that endpoint, so the sidecar's balancer chooses it. Absent from
/// earlier control planes (the remote gateway then chooses).
pub const TUNNEL_ENDPOINT: &str = "endpoint";

// ---- Route metadata (`Route.metadata.filter_metadata`, namespace [`TUNNEL_NAMESPACE`]) ----

/// The largest response (bytes) strait's proxy holds until complete for an idempotent request,
/// so a body cut on the way is retried (0: never). Absent: the proxy's default, 64 KiB. Envoy
/// ignores it.
pub const ROUTE_RESPONSE_BUFFER: &str = "response_buffer";
/// `true`: requests on this route are idempotent whatever their method (their responses are
/// held as a GET's).
pub const ROUTE_IDEMPOTENT: &str = "idempotent";

/// The namespace Envoy matches a cluster's `transport_socket_matches` against.
pub const SOCKET_MATCH_NAMESPACE: &str = "envoy.transport_socket_match";
/// Keys of an endpoint's socket-match metadata: its TLS mode
/// ([`crate::model::TLS_MODE_MUTUAL`] behind a sidecar) and its cluster, whose workload
/// identity the sidecar must present.
pub const MATCH_TLS_MODE: &str = crate::model::TLS_MODE_LABEL;
pub const MATCH_CLUSTER: &str = crate::route::LABEL_CLUSTER;

/// The name of a cluster's transport-socket match for sidecars of `cluster`.
pub fn mutual_match_name(cluster: &str) -> String {
    format!("strait_mutual_tls/{cluster}")
}

// ---- Secrets (SDS names; static secrets of the Envoy bootstrap) ----

/// The proxy's own workload certificate, which upstream TLS contexts present.
pub const WORKLOAD_SECRET: &str = "strait_workload";
/// The federation CA, which upstream TLS contexts trust.
pub const CA_SECRET: &str = "strait_federation_ca";

// ---- Listeners, routes and clusters the two sides name ----

/// The internal listener (in the Envoy bootstrap) that tunnels to the local gateway.
pub const TUNNEL_LISTENER: &str = "strait_tunnel";
/// Envoy's outbound HTTP listener and its route configuration.
pub const OUTBOUND_LISTENER: &str = "strait_outbound_http";
pub const OUTBOUND_ROUTES: &str = "strait_outbound";
/// The transparent listener (Envoy's `virtualOutbound`, Istio's port 15001) and the cluster it
/// passes unknown traffic to (Istio's `PassthroughCluster`: the original destination).
pub const TRANSPARENT_LISTENER: &str = "strait_transparent";
pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";
/// The bootstrap's static cluster of the control plane (ADS).
pub const XDS_CLUSTER: &str = "strait_xds";
/// The bootstrap's static cluster of the local gateway's ingress replicas.
pub const GATEWAY_CLUSTER: &str = "strait_gateway";

#[cfg(test)]
mod tests {
    use super::*;

    /// The wire names of this release. A failing line here is a protocol change: keep the old
    /// name readable (compat) before changing it.
    #[test]
    fn the_names_on_the_wire_are_this_releases() {
        let names = [
            META_CLUSTER,
            META_KIND,
            META_LABELS,
            META_OUTBOUND,
            META_TRANSPARENT,
            META_TUNNEL,
            META_MTLS,
            KIND_ENVOY,
            KIND_GRPC,
            TUNNEL_NAMESPACE,
            TUNNEL_CLUSTER,
            TUNNEL_AUTHORITY,
            TUNNEL_VIA_GATEWAY,
            TUNNEL_ENDPOINT,
            SOCKET_MATCH_NAMESPACE,
            MATCH_TLS_MODE,
            MATCH_CLUSTER,
            WORKLOAD_SECRET,
            CA_SECRET,
            TUNNEL_LISTENER,
            OUTBOUND_LISTENER,
            OUTBOUND_ROUTES,
            TRANSPARENT_LISTENER,
            PASSTHROUGH_CLUSTER,
            XDS_CLUSTER,
            GATEWAY_CLUSTER,
        ];
        assert_eq!(
            names.join(" "),
            "STRAIT_CLUSTER STRAIT_KIND STRAIT_LABELS STRAIT_OUTBOUND STRAIT_TRANSPARENT \
             STRAIT_TUNNEL STRAIT_MTLS envoy grpc strait cluster authority via_gateway endpoint \
             envoy.transport_socket_match strait.io/tls-mode strait.io/cluster \
             strait_workload strait_federation_ca strait_tunnel strait_outbound_http \
             strait_outbound strait_transparent PassthroughCluster strait_xds strait_gateway"
        );
        assert_eq!(mutual_match_name("east"), "strait_mutual_tls/east");
        // Every name is distinct where two could be confused (listeners, clusters, secrets).
        let mut distinct = names.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), names.len());
    }
}
