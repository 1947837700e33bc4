//! The proxy's admin endpoint: `/ready` (200 once a complete config is served), `/metrics`
//! (Prometheus: xDS state, requests in flight and ejections per cluster), `/config_dump` (JSON:
//! every resource held, with its version) and `/clusters` (every endpoint with priority,
//! locality, health, ejection and active requests).

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use federation::admin::{Endpoints, Limits, Reply};
use federation::metrics_text::label_value;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{EndpointHealth, ListenerKind, RouteSource, Upstream};
use crate::runtime::Compiled;
use crate::xds::XdsStatus;

/// What the admin endpoint reads.
#[derive(Clone)]
pub struct AdminState {
    pub status: watch::Receiver<XdsStatus>,
    pub current: watch::Receiver<Arc<Compiled>>,
}

/// Serve the admin endpoint on `listener` (through [`federation::admin::serve`]).
pub async fn serve(listener: TcpListener, state: AdminState) {
    federation::admin::serve(
        listener,
        Arc::new(state),
        Limits::default(),
        std::future::pending(),
    )
    .await;
}

impl Endpoints for AdminState {
    const DUMPS: &'static [&'static str] = &["/config_dump", "/clusters"];

    fn ready(&self) -> Result<(), String> {
        let status = self.status.borrow().clone();
        if status.warm {
            return Ok(());
        }
        let missing = self.current.borrow().config.missing();
        Err(format!(
            "not ready: no complete config yet (connected: {}; missing: {missing:?}; last error: {:?})",
            status.connected, status.last_error
        ))
    }

    fn metrics(&self) -> String {
        let status = self.status.borrow().clone();
        let compiled = self.current.borrow().clone();
        metrics(&status, &compiled)
    }

    fn dump(&self, path: &str, _query: &str) -> Option<Reply> {
        let compiled = self.current.borrow().clone();
        match path {
            "/config_dump" => Some(Reply::json(config_dump(&compiled))),
            "/clusters" => Some(Reply::text(http::StatusCode::OK, clusters(&compiled))),
            _ => None,
        }
    }
}

fn upstream(u: &Upstream) -> String {
    match u {
        Upstream::Direct(a) => a.to_string(),
        Upstream::Tunnel {
            cluster,
            authority,
            endpoint: Some(e),
        } => format!("{authority} at {e} via gateway to {cluster}"),
        Upstream::Tunnel {
            cluster, authority, ..
        } => format!("{authority} via gateway to {cluster}"),
    }
}

fn metrics(status: &XdsStatus, c: &Compiled) -> String {
    let mut out = String::new();
    let g = |out: &mut String, name: &str, help: &str, kind: &str, v: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    };
    g(
        &mut out,
        "strait_proxy_xds_connected",
        "1 while the ADS stream is up.",
        "gauge",
        u64::from(status.connected),
    );
    g(
        &mut out,
        "strait_proxy_xds_warm",
        "1 once a complete config has been served.",
        "gauge",
        u64::from(status.warm),
    );
    g(
        &mut out,
        "strait_proxy_xds_acks_total",
        "xDS responses accepted.",
        "counter",
        status.acks,
    );
    g(
        &mut out,
        "strait_proxy_xds_nacks_total",
        "xDS responses rejected.",
        "counter",
        status.nacks,
    );
    g(
        &mut out,
        "strait_proxy_xds_connects_total",
        "ADS streams opened.",
        "counter",
        status.connects,
    );
    let now = Instant::now();
    let _ = writeln!(
        out,
        "# HELP strait_proxy_upstream_active Requests in flight per cluster.\n# TYPE strait_proxy_upstream_active gauge"
    );
    let mut names: Vec<&String> = c.clusters.keys().collect();
    names.sort();
    for n in &names {
        let active: u64 = c.clusters[*n]
            .balancer
            .hosts()
            .iter()
            .map(|h| h.state.active.load(Relaxed))
            .sum();
        let _ = writeln!(
            out,
            "strait_proxy_upstream_active{{cluster=\"{}\"}} {active}",
            label_value(n)
        );
    }
    let _ = writeln!(
        out,
        "# HELP strait_proxy_upstream_ejected Hosts ejected by outlier detection now.\n# TYPE strait_proxy_upstream_ejected gauge"
    );
    for n in &names {
        let ejected = c.clusters[*n]
            .balancer
            .hosts()
            .iter()
            .filter(|h| h.state.ejected(now))
            .count();
        let _ = writeln!(
            out,
            "strait_proxy_upstream_ejected{{cluster=\"{}\"}} {ejected}",
            label_value(n)
        );
    }
    out
}

fn clusters(c: &Compiled) -> String {
    let now = Instant::now();
    let mut out = String::new();
    let mut names: Vec<&String> = c.clusters.keys().collect();
    names.sort();
    for n in names {
        let rt = &c.clusters[n];
        let a = c.config.assignments.get(n);
        for h in rt.balancer.hosts() {
            let loc = a
                .and_then(|a| a.priorities.get(h.priority))
                .and_then(|p| p.get(h.locality))
                .map(|l| format!("{}/{}", l.region, l.zone))
                .unwrap_or_default();
            let health = match h.health {
                EndpointHealth::Healthy => "healthy",
                EndpointHealth::Degraded => "degraded",
                EndpointHealth::Unhealthy => "unhealthy",
            };
            let _ = writeln!(
                out,
                "{n}::{}::priority={}::locality={loc}::health={health}::ejected={}::active={}",
                upstream(&h.upstream),
                h.priority,
                h.state.ejected(now),
                h.state.active.load(Relaxed)
            );
        }
    }
    out
}

fn config_dump(c: &Compiled) -> String {
    use serde_json::{Value, json};
    let versions = |t: &str| -> Value {
        c.config
            .versions
            .get(t)
            .map(|m| json!(m))
            .unwrap_or_else(|| json!({}))
    };
    let listeners: Vec<Value> = c
        .config
        .listeners
        .values()
        .map(|l| {
            let kind = match &l.kind {
                ListenerKind::Http {
                    routes: RouteSource::Rds(n),
                } => json!({"http": {"rds": n}}),
                ListenerKind::Http {
                    routes: RouteSource::Inline(t),
                } => json!({"http": {"inline": t.name}}),
                ListenerKind::Tcp {
                    cluster,
                    idle_timeout,
                } => json!({"tcp": {
                    "cluster": cluster,
                    "idle_timeout_ms": idle_timeout.map(|d| d.as_millis() as u64),
                }}),
                ListenerKind::Transparent { fallback } => json!({"transparent": {
                    "fallback": fallback,
                    "passthrough": c.config.passthrough.contains(fallback),
                }}),
            };
            json!({"name": l.name, "address": l.address.to_string(), "kind": kind})
        })
        .collect();
    let clusters: Vec<Value> = c
        .config
        .clusters
        .values()
        .map(|cl| {
            let endpoints: Vec<Value> = c
                .config
                .assignments
                .get(&cl.name)
                .map(|a| {
                    a.priorities
                        .iter()
                        .enumerate()
                        .flat_map(|(p, level)| {
                            level.iter().flat_map(move |l| {
                                l.endpoints.iter().map(move |e| {
                                    json!({
                                        "priority": p,
                                        "locality": format!("{}/{}/{}", l.region, l.zone, l.subzone),
                                        "locality_weight": l.weight,
                                        "upstream": upstream(&e.upstream),
                                        "health": format!("{:?}", e.health),
                                        "weight": e.weight,
                                    })
                                })
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            json!({
                "name": cl.name,
                "lb": format!("{:?}", cl.lb),
                "http2": cl.http2,
                "connect_timeout_ms": cl.connect_timeout.as_millis() as u64,
                "outlier_detection": cl.outlier.as_ref().map(|o| format!("{o:?}")),
                "endpoints": endpoints,
            })
        })
        .collect();
    let routes: Vec<Value> = c
        .config
        .routes
        .values()
        .map(|t| {
            json!({
                "name": t.name,
                "virtual_hosts": t.virtual_hosts.iter().map(|v| json!({"name": v.name, "domains": v.domains, "routes": v.routes.len()})).collect::<Vec<_>>(),
            })
        })
        .collect();
    let dump = json!({
        "versions": {
            "clusters": versions(crate::config::CLUSTER_TYPE),
            "endpoints": versions(crate::config::ASSIGNMENT_TYPE),
            "listeners": versions(crate::config::LISTENER_TYPE),
            "routes": versions(crate::config::ROUTES_TYPE),
        },
        "listeners": listeners,
        "clusters": clusters,
        "routes": routes,
    });
    serde_json::to_string_pretty(&dump).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}
