//! A light ADS client (state of the world, CDS + EDS) that ACKs everything and keeps the latest
//! load assignments: what the convergence benchmark runs by the hundred, and what the tests use
//! to watch a proxy's view. Not a data plane.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use controlplane::view::{META_CLUSTER, META_KIND, META_TUNNEL, TypeKind};

/// What a light client holds: load assignments by cluster name, and when they last changed.
#[derive(Debug, Default, Clone)]
pub struct ClientState {
    pub clusters: Vec<String>,
    pub assignments: BTreeMap<String, Arc<ClusterLoadAssignment>>,
    pub updated: Option<Instant>,
    pub eds_responses: u64,
}

/// A running light client; dropping it closes the stream.
pub struct LightClient {
    pub state: watch::Receiver<ClientState>,
    task: JoinHandle<Result<(), String>>,
}

impl Drop for LightClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A node as Strait's bootstrap describes one.
pub fn node(id: &str, cluster: &str, region: &str, zone: &str, tunnel: bool) -> Node {
    let s = |v: &str| Value {
        kind: Some(Kind::StringValue(v.to_string())),
    };
    let fields = [
        (META_CLUSTER.to_string(), s(cluster)),
        (
            META_KIND.to_string(),
            s(federation::xds_contract::KIND_ENVOY),
        ),
        (
            META_TUNNEL.to_string(),
            Value {
                kind: Some(Kind::BoolValue(tunnel)),
            },
        ),
    ]
    .into_iter()
    .collect();
    Node {
        id: id.to_string(),
        cluster: cluster.to_string(),
        locality: Some(Locality {
            region: region.to_string(),
            zone: zone.to_string(),
            sub_zone: String::new(),
        }),
        metadata: Some(Struct { fields }),
        user_agent_name: "strait-light-client".to_string(),
        ..Default::default()
    }
}

/// A plaintext ADS client of `xds` that takes responses of any size (a first response at a
/// million endpoints is ~100 MB).
async fn ads_client(
    xds: SocketAddr,
) -> Result<AggregatedDiscoveryServiceClient<tonic::transport::Channel>, String> {
    Ok(
        AggregatedDiscoveryServiceClient::connect(format!("http://{xds}"))
            .await
            .map_err(|e| format!("cannot connect to {xds}: {e}"))?
            .max_decoding_message_size(1 << 30),
    )
}

impl LightClient {
    /// Connect to `xds` (plaintext) as `node` and follow CDS and EDS over delta xDS: only
    /// changed resources travel.
    pub async fn connect_delta(xds: SocketAddr, node: Node) -> Result<Self, String> {
        let mut client = ads_client(xds).await?;
        let (tx, mut rx) = mpsc::channel::<DeltaDiscoveryRequest>(16);
        let requests = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        tx.send(DeltaDiscoveryRequest {
            node: Some(node),
            type_url: TypeKind::Cluster.url().to_string(),
            ..Default::default()
        })
        .await
        .map_err(|_| "request channel closed".to_string())?;
        let mut responses = client
            .delta_aggregated_resources(requests)
            .await
            .map_err(|e| format!("ADS stream refused: {e}"))?
            .into_inner();
        let (state_tx, state) = watch::channel(ClientState::default());
        let task = tokio::spawn(async move {
            loop {
                let r: DeltaDiscoveryResponse = match responses.message().await {
                    Ok(Some(r)) => r,
                    Ok(None) => return Ok(()),
                    Err(e) => return Err(format!("ADS stream failed: {e}")),
                };
                let ack = DeltaDiscoveryRequest {
                    type_url: r.type_url.clone(),
                    response_nonce: r.nonce.clone(),
                    ..Default::default()
                };
                match TypeKind::from_url(&r.type_url) {
                    Some(TypeKind::Cluster) => {
                        let added: Vec<String> =
                            r.resources.iter().map(|x| x.name.clone()).collect();
                        state_tx.send_modify(|s| {
                            s.clusters.retain(|c| !r.removed_resources.contains(c));
                            for a in &added {
                                if !s.clusters.contains(a) {
                                    s.clusters.push(a.clone());
                                }
                            }
                        });
                        if tx.send(ack).await.is_err() {
                            return Ok(());
                        }
                        if !added.is_empty() || !r.removed_resources.is_empty() {
                            let sub = DeltaDiscoveryRequest {
                                type_url: TypeKind::Endpoint.url().to_string(),
                                resource_names_subscribe: added,
                                resource_names_unsubscribe: r.removed_resources.clone(),
                                ..Default::default()
                            };
                            if tx.send(sub).await.is_err() {
                                return Ok(());
                            }
                        }
                    }
                    Some(TypeKind::Endpoint) => {
                        let mut changed = Vec::new();
                        for x in &r.resources {
                            let Some(a) = &x.resource else { continue };
                            let cla = ClusterLoadAssignment::decode(a.value.as_slice())
                                .map_err(|e| format!("bad EDS resource: {e}"))?;
                            changed.push(Arc::new(cla));
                        }
                        let now = Instant::now();
                        state_tx.send_modify(|s| {
                            for n in &r.removed_resources {
                                s.assignments.remove(n);
                            }
                            for c in changed {
                                s.assignments.insert(c.cluster_name.clone(), c);
                            }
                            s.updated = Some(now);
                            s.eds_responses += 1;
                        });
                        if tx.send(ack).await.is_err() {
                            return Ok(());
                        }
                    }
                    _ => {}
                }
            }
        });
        Ok(Self { state, task })
    }

    /// Connect to `xds` (plaintext) as `node` and follow CDS and EDS (state of the world).
    pub async fn connect(xds: SocketAddr, node: Node) -> Result<Self, String> {
        let mut client = ads_client(xds).await?;
        let (tx, mut rx) = mpsc::channel::<DiscoveryRequest>(16);
        let requests = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        tx.send(DiscoveryRequest {
            node: Some(node),
            type_url: TypeKind::Cluster.url().to_string(),
            ..Default::default()
        })
        .await
        .map_err(|_| "request channel closed".to_string())?;
        let mut responses = client
            .stream_aggregated_resources(requests)
            .await
            .map_err(|e| format!("ADS stream refused: {e}"))?
            .into_inner();
        let (state_tx, state) = watch::channel(ClientState::default());
        let task = tokio::spawn(async move {
            let mut eds_nonce = String::new();
            let mut eds_version = String::new();
            loop {
                let r: DiscoveryResponse = match responses.message().await {
                    Ok(Some(r)) => r,
                    Ok(None) => return Ok(()),
                    Err(e) => return Err(format!("ADS stream failed: {e}")),
                };
                match TypeKind::from_url(&r.type_url) {
                    Some(TypeKind::Cluster) => {
                        let names: Vec<String> = r
                            .resources
                            .iter()
                            .filter_map(|a| {
                                envoy_types::pb::envoy::config::cluster::v3::Cluster::decode(
                                    a.value.as_slice(),
                                )
                                .ok()
                                .map(|c| c.name)
                            })
                            .collect();
                        let ack = DiscoveryRequest {
                            version_info: r.version_info.clone(),
                            type_url: r.type_url.clone(),
                            response_nonce: r.nonce.clone(),
                            ..Default::default()
                        };
                        let sub = DiscoveryRequest {
                            version_info: eds_version.clone(),
                            type_url: TypeKind::Endpoint.url().to_string(),
                            resource_names: names.clone(),
                            response_nonce: eds_nonce.clone(),
                            ..Default::default()
                        };
                        state_tx.send_modify(|s| s.clusters = names);
                        if tx.send(ack).await.is_err() || tx.send(sub).await.is_err() {
                            return Ok(());
                        }
                    }
                    Some(TypeKind::Endpoint) => {
                        let mut map = BTreeMap::new();
                        for a in &r.resources {
                            let cla = ClusterLoadAssignment::decode(a.value.as_slice())
                                .map_err(|e| format!("bad EDS resource: {e}"))?;
                            map.insert(cla.cluster_name.clone(), Arc::new(cla));
                        }
                        let now = Instant::now();
                        state_tx.send_modify(|s| {
                            s.assignments = map;
                            s.updated = Some(now);
                            s.eds_responses += 1;
                        });
                        eds_nonce = r.nonce.clone();
                        eds_version = r.version_info.clone();
                        let names = state_tx.borrow().clusters.clone();
                        let ack = DiscoveryRequest {
                            version_info: r.version_info,
                            type_url: r.type_url,
                            resource_names: names,
                            response_nonce: r.nonce,
                            ..Default::default()
                        };
                        if tx.send(ack).await.is_err() {
                            return Ok(());
                        }
                    }
                    _ => {}
                }
            }
        });
        Ok(Self { state, task })
    }
}

/// The (region, zone) of every locality in `cla`, with its priority.
pub fn localities(cla: &ClusterLoadAssignment) -> Vec<(u32, String, String)> {
    cla.endpoints
        .iter()
        .map(|l| {
            let loc = l.locality.clone().unwrap_or_default();
            (l.priority, loc.region, loc.zone)
        })
        .collect()
}
