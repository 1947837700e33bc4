//! The control plane's admin endpoint, served by [`federation::admin`]: `/ready` (200 once the
//! registry cache has synced), `/metrics` (Prometheus: xDS pushes, the registry's state, active
//! health checks), `/debug/config` (JSON: the connected proxies, or with `?node=ID` every
//! resource sent to one) and `/debug/health` (JSON: every endpoint under an active health check,
//! its verdict and its last failure).

use std::fmt::Write;
use std::sync::Arc;

use federation::admin::{Endpoints, Limits, Reply};
use federation::metrics_text::label_value;
use federation::registry::{CacheStatus, RegistryCache};
use http::StatusCode;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::server::StaleView;
use crate::view::ORDER;
use crate::xds::Xds;

/// What the admin endpoint reads.
pub(crate) struct Admin {
    pub xds: Xds,
    pub cache: Arc<RegistryCache>,
    pub stale: StaleView,
    /// The active health checks of this cluster's endpoints.
    pub health: Arc<crate::health::HealthStatus>,
}

/// Serve the admin endpoint on `listener` until `stop`.
pub(crate) async fn serve(admin: Admin, listener: TcpListener, stop: CancellationToken) {
    federation::admin::serve(
        listener,
        Arc::new(admin),
        Limits::default(),
        stop.cancelled_owned(),
    )
    .await;
}

impl Endpoints for Admin {
    const DUMPS: &'static [&'static str] = &["/debug/config?node=ID", "/debug/health"];

    fn ready(&self) -> Result<(), String> {
        if self.xds.ready() {
            Ok(())
        } else {
            Err(format!(
                "waiting for the registry: {:?}",
                self.cache.status()
            ))
        }
    }

    fn metrics(&self) -> String {
        let mut text = self.xds.metrics().render();
        let synced = matches!(self.cache.status(), CacheStatus::Synced { .. });
        let stale = self.stale.read().map(|s| s.clone()).unwrap_or_default();
        let _ = write!(
            text,
            "# HELP strait_registry_synced 1 when the registry cache is up to date.\n\
             # TYPE strait_registry_synced gauge\n\
             strait_registry_synced {}\n\
             # HELP strait_registry_endpoints Endpoints in the registry.\n\
             # TYPE strait_registry_endpoints gauge\n\
             strait_registry_endpoints {}\n\
             # HELP strait_registry_stale_clusters Clusters served from their last entries: they left the registry without a withdrawal while their gateway link is up.\n\
             # TYPE strait_registry_stale_clusters gauge\n\
             strait_registry_stale_clusters {}\n\
             # HELP strait_registry_cluster_stale_seconds How long a stale cluster has been served from its last entries.\n\
             # TYPE strait_registry_cluster_stale_seconds gauge\n",
            u8::from(synced),
            self.cache.snapshot().endpoint_count(),
            stale.len()
        );
        for (c, since) in &stale {
            let _ = writeln!(
                text,
                "strait_registry_cluster_stale_seconds{{cluster=\"{}\"}} {:.3}",
                label_value(c.as_str()),
                since.elapsed().as_secs_f64()
            );
        }
        text.push_str(&self.health.render());
        text
    }

    fn dump(&self, path: &str, query: &str) -> Option<Reply> {
        match path {
            "/debug/config" => Some(debug_config(&self.xds, query)),
            "/debug/health" => Some(Reply::json(self.health.dump().to_string())),
            _ => None,
        }
    }
}

fn debug_config(xds: &Xds, query: &str) -> Reply {
    let node = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "node")
        .map(|(_, v)| v.to_string());
    let clients = xds.clients();
    let Some(node) = node else {
        let ids: Vec<serde_json::Value> = clients
            .iter()
            .map(|c| {
                serde_json::json!({
                    "node": c.node.id,
                    "kind": format!("{:?}", c.node.key.kind),
                    "locality": c.node.key.locality.to_string(),
                    "delta": c.delta,
                })
            })
            .collect();
        return Reply::json(serde_json::json!({"proxies": ids}).to_string());
    };
    let Some(c) = clients.iter().find(|c| c.node.id == node) else {
        return Reply::text(
            StatusCode::NOT_FOUND,
            format!("no proxy with node id {node:?} is connected\n"),
        );
    };
    let sent = c.sent.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let acked = c.acked.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut types = serde_json::Map::new();
    for t in ORDER {
        let resources: Vec<serde_json::Value> = sent[t as usize]
            .values()
            .map(|r| {
                serde_json::json!({
                    "name": r.name,
                    "version": r.version,
                    "resource": crate::debug::render(&r.body),
                })
            })
            .collect();
        types.insert(
            t.short().to_string(),
            serde_json::json!({"acked_nonce": acked[t as usize], "resources": resources}),
        );
    }
    let body = serde_json::json!({
        "node": c.node.id,
        "user_agent": c.node.user_agent,
        "kind": format!("{:?}", c.node.key.kind),
        "locality": c.node.key.locality.to_string(),
        "delta": c.delta,
        "last_nack": *c.last_nack.lock().unwrap_or_else(|p| p.into_inner()),
        "sent": types,
    });
    Reply::json(serde_json::to_string_pretty(&body).unwrap_or_default())
}
