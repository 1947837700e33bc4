//! The gateway's own cluster's endpoints (from the registry or the static discovery file) and the
//! round-robin choice among the healthy ones.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use federation::model::{ServiceEndpoints, ServiceKey};
use tokio::sync::watch;

use crate::protocol::StatusCode;

/// The services of this cluster.
#[derive(Debug, Default, Clone)]
pub struct LocalTable {
    pub services: HashMap<ServiceKey, Arc<ServiceEndpoints>>,
}

/// The file a gateway keeps its cluster's entries in (`local_snapshot`): the registry's own
/// encoding, so that it is read like the registry.
#[derive(serde::Serialize, serde::Deserialize)]
struct KeptSnapshot {
    v: u32,
    cluster: String,
    /// Registry key → value (the value's JSON, as the registry holds it).
    entries: std::collections::BTreeMap<String, serde_json::Value>,
}

/// Write `cluster`'s entries of `snap` to `path` (atomically: a temporary file renamed).
pub fn save_snapshot(
    path: &std::path::Path,
    snap: &federation::registry::Snapshot,
    cluster: &federation::model::ClusterId,
) -> Result<(), String> {
    use federation::registry::RegistryKey;
    use federation::registry::codec::{encode_cluster, encode_service_endpoints};
    let mut entries = std::collections::BTreeMap::new();
    let value = |bytes: Vec<u8>| serde_json::from_slice(&bytes).map_err(|e| e.to_string());
    if let Some(c) = snap.clusters.get(cluster) {
        entries.insert(RegistryKey::cluster(cluster), value(encode_cluster(c))?);
    }
    for s in snap.cluster_services(cluster) {
        entries.insert(
            RegistryKey::Endpoints(cluster.clone(), s.service.key.clone()).encode(),
            value(encode_service_endpoints(s))?,
        );
    }
    let doc = KeptSnapshot {
        v: 1,
        cluster: cluster.to_string(),
        entries,
    };
    let text = serde_json::to_vec_pretty(&doc).map_err(|e| e.to_string())?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, path).map_err(|e| e.to_string())
}

/// Read what [`save_snapshot`] wrote; `Ok(None)` when there is no file yet. A file of another
/// cluster, or one that does not decode, is an error (and is not used).
pub fn load_snapshot(
    path: &std::path::Path,
    cluster: &federation::model::ClusterId,
) -> Result<Option<LocalTable>, String> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read the kept local endpoints: {e}")),
    };
    let doc: KeptSnapshot = serde_json::from_slice(&text)
        .map_err(|e| format!("the kept local endpoints do not parse: {e}"))?;
    if doc.v != 1 {
        return Err(format!(
            "the kept local endpoints have version {}, not 1",
            doc.v
        ));
    }
    if doc.cluster != cluster.as_str() {
        return Err(format!(
            "the kept local endpoints are cluster `{}`'s, not `{cluster}`'s",
            doc.cluster
        ));
    }
    let kvs = doc
        .entries
        .into_iter()
        .map(|(k, v)| serde_json::to_vec(&v).map(|b| (k, b)))
        .collect::<Result<std::collections::BTreeMap<_, _>, _>>()
        .map_err(|e| e.to_string())?;
    let state = federation::registry::cache::LocalState::decode(&kvs).map_err(|e| e.to_string())?;
    Ok(Some(LocalTable {
        services: state.endpoints.into_iter().collect(),
    }))
}

/// An endpoint to connect to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub addr: SocketAddr,
    /// Behind a sidecar (mutual TLS), offering this ALPN (the service port's protocol).
    pub sidecar: Option<Option<&'static str>>,
}

/// Endpoints of this cluster that the registry says are not serving (by service and
/// `ADDRESS:PORT`).
pub type NotServing = std::collections::BTreeSet<(ServiceKey, SocketAddr)>;

/// Picks endpoints round-robin among the serving ones.
pub struct LocalEndpoints {
    table: watch::Receiver<Arc<LocalTable>>,
    cursors: Mutex<HashMap<ServiceKey, usize>>,
    /// With a discovery file: the endpoints of the file that the registry holds as not serving
    /// (the control plane's active health checks failed them), left out too.
    not_serving: std::sync::RwLock<Arc<NotServing>>,
}

impl LocalEndpoints {
    pub fn new(table: watch::Receiver<Arc<LocalTable>>) -> Self {
        Self {
            table,
            cursors: Mutex::new(HashMap::new()),
            not_serving: std::sync::RwLock::new(Arc::default()),
        }
    }

    /// What the registry says of this cluster's endpoints' health (used with a discovery file,
    /// whose own health fields are the operator's word, not the checks').
    pub fn set_not_serving(&self, set: NotServing) {
        let mut cur = self.not_serving.write().unwrap_or_else(|p| p.into_inner());
        if **cur != set {
            if !set.is_empty() {
                tracing::info!(
                    endpoints = set.len(),
                    "endpoints the registry holds as not serving are left out"
                );
            }
            *cur = Arc::new(set);
        }
    }

    /// The serving endpoints of `service:port`, as candidates.
    fn serving(
        &self,
        service: &ServiceKey,
        port: u16,
    ) -> Result<Vec<Candidate>, (StatusCode, String)> {
        let table = self.table.borrow().clone();
        let Some(set) = table.services.get(service) else {
            return Err((
                StatusCode::UnknownService,
                format!("service {service} is not in this cluster"),
            ));
        };
        let Some(index) = set.service.ports.iter().position(|p| p.port == port) else {
            let ports: Vec<String> = set
                .service
                .ports
                .iter()
                .map(|p| p.port.to_string())
                .collect();
            return Err((
                StatusCode::UnknownService,
                format!(
                    "service {service} has no port {port} (ports: {})",
                    ports.join(", ")
                ),
            ));
        };
        let alpn = set.service.ports[index].protocol.alpn();
        let not_serving = self
            .not_serving
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let serving: Vec<Candidate> = set
            .endpoints
            .iter()
            .filter(|e| {
                e.health.is_serving()
                    && (not_serving.is_empty()
                        || !not_serving.contains(&(service.clone(), e.socket_addr())))
            })
            .map(|e| {
                // The first port is served on the endpoint's port; other ports on their own number.
                let p = if index == 0 { e.port } else { port };
                Candidate {
                    addr: SocketAddr::new(e.address, p),
                    sidecar: e.mutual_tls().then_some(alpn),
                }
            })
            .collect();
        if serving.is_empty() {
            return Err((
                StatusCode::NoEndpoint,
                format!("service {service} has no healthy endpoint in this cluster"),
            ));
        }
        Ok(serving)
    }

    /// The endpoint `addr` of `service:port`, if it is one of its serving endpoints now: a
    /// tunnel that names its endpoint reaches that one or none (a peer cannot steer this
    /// gateway to an address that is not a current endpoint of the service).
    pub fn named(
        &self,
        service: &ServiceKey,
        port: u16,
        addr: SocketAddr,
    ) -> Result<Candidate, (StatusCode, String)> {
        let serving = match self.serving(service, port) {
            Ok(s) => s,
            // No serving endpoint at all: this one is not one either.
            Err((StatusCode::NoEndpoint, why)) => return Err((StatusCode::NotAnEndpoint, why)),
            Err(e) => return Err(e),
        };
        serving.into_iter().find(|c| c.addr == addr).ok_or_else(|| {
            (
                StatusCode::NotAnEndpoint,
                format!("{addr} is not a serving endpoint of {service}:{port} in this cluster"),
            )
        })
    }

    /// Up to `n` candidate endpoints for `service:port`, starting at the round-robin cursor
    /// (the first is the choice; the rest are fall-backs if connecting fails).
    pub fn pick(
        &self,
        service: &ServiceKey,
        port: u16,
        n: usize,
    ) -> Result<Vec<Candidate>, (StatusCode, String)> {
        let serving = self.serving(service, port)?;
        let start = {
            let mut c = self.cursors.lock().unwrap_or_else(|p| p.into_inner());
            let cur = c.entry(service.clone()).or_insert(0);
            let s = *cur % serving.len();
            *cur = cur.wrapping_add(1);
            s
        };
        Ok((0..n.min(serving.len()))
            .map(|i| serving[(start + i) % serving.len()])
            .collect())
    }
}
