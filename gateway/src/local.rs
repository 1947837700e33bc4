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

/// An endpoint to connect to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub addr: SocketAddr,
    /// Behind a sidecar (mutual TLS), offering this ALPN (the service port's protocol).
    pub sidecar: Option<Option<&'static str>>,
}

/// Picks endpoints round-robin among the serving ones.
pub struct LocalEndpoints {
    table: watch::Receiver<Arc<LocalTable>>,
    cursors: Mutex<HashMap<ServiceKey, usize>>,
}

impl LocalEndpoints {
    pub fn new(table: watch::Receiver<Arc<LocalTable>>) -> Self {
        Self {
            table,
            cursors: Mutex::new(HashMap::new()),
        }
    }

    /// Up to `n` candidate endpoints for `service:port`, starting at the round-robin cursor
    /// (the first is the choice; the rest are fall-backs if connecting fails).
    pub fn pick(
        &self,
        service: &ServiceKey,
        port: u16,
        n: usize,
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
        let serving: Vec<Candidate> = set
            .endpoints
            .iter()
            .filter(|e| e.health.is_serving())
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
