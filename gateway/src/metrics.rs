//! Gateway counters, rendered in Prometheus text format on the admin port.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Default)]
pub struct Metrics {
    pub bytes_to_peers: AtomicU64,
    pub bytes_from_peers: AtomicU64,
    pub tunnels_active: AtomicU64,
    pub tunnels_total: AtomicU64,
    pub inbound_streams_total: AtomicU64,
    pub ingress_requests_total: AtomicU64,
    pub ingress_connections_total: AtomicU64,
    pub ingress_early_total: AtomicU64,
    labelled: Mutex<BTreeMap<(&'static str, String), u64>>,
}

impl Metrics {
    /// Count one event of a labelled counter, e.g. handshake failures by reason.
    pub fn count(&self, name: &'static str, label: impl Into<String>) {
        let mut m = self.labelled.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry((name, label.into())).or_insert(0) += 1;
    }

    pub fn get(&self, name: &'static str, label: &str) -> u64 {
        let m = self.labelled.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&(name, label.to_string())).copied().unwrap_or(0)
    }

    /// Prometheus text exposition; `links` adds per-peer gauges.
    pub fn render(&self, cluster: &str, links: &[crate::LinkReport]) -> String {
        let mut out = String::new();
        let c = |v: &AtomicU64| v.load(Relaxed);
        let mut gauge = |name: &str, help: &str, kind: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{cluster=\"{cluster}\"}} {v}"
            );
        };
        gauge(
            "strait_gateway_peer_bytes_sent_total",
            "Bytes sent to peer gateways through tunnels.",
            "counter",
            c(&self.bytes_to_peers),
        );
        gauge(
            "strait_gateway_peer_bytes_received_total",
            "Bytes received from peer gateways through tunnels.",
            "counter",
            c(&self.bytes_from_peers),
        );
        gauge(
            "strait_gateway_tunnels_active",
            "Tunnels open now.",
            "gauge",
            c(&self.tunnels_active),
        );
        gauge(
            "strait_gateway_tunnels_total",
            "Tunnels opened.",
            "counter",
            c(&self.tunnels_total),
        );
        gauge(
            "strait_gateway_inbound_streams_total",
            "Streams accepted from peer gateways.",
            "counter",
            c(&self.inbound_streams_total),
        );
        gauge(
            "strait_gateway_ingress_requests_total",
            "CONNECT requests from local sidecars.",
            "counter",
            c(&self.ingress_requests_total),
        );
        gauge(
            "strait_gateway_ingress_connections_total",
            "Mutual-TLS connections accepted from local sidecars.",
            "counter",
            c(&self.ingress_connections_total),
        );
        gauge(
            "strait_gateway_ingress_early_total",
            "CONNECTs answered with an early status (the peer's status in the tunnel's first bytes).",
            "counter",
            c(&self.ingress_early_total),
        );
        let m = self.labelled.lock().unwrap_or_else(|p| p.into_inner());
        let mut last = "";
        for ((name, label), v) in m.iter() {
            if *name != last {
                let _ = writeln!(out, "# TYPE {name} counter");
                last = name;
            }
            let _ = writeln!(
                out,
                "{name}{{cluster=\"{cluster}\",reason=\"{}\"}} {v}",
                escape(label)
            );
        }
        drop(m);
        let _ = writeln!(
            out,
            "# HELP strait_gateway_link_rtt_seconds Smoothed probe RTT per peer.\n# TYPE strait_gateway_link_rtt_seconds gauge"
        );
        for l in links {
            let _ = writeln!(
                out,
                "strait_gateway_link_rtt_seconds{{cluster=\"{cluster}\",peer=\"{}\"}} {}",
                l.cluster,
                l.rtt_ms / 1000.0
            );
        }
        let _ = writeln!(
            out,
            "# HELP strait_gateway_link_loss_ratio Probe loss per peer.\n# TYPE strait_gateway_link_loss_ratio gauge"
        );
        for l in links {
            let _ = writeln!(
                out,
                "strait_gateway_link_loss_ratio{{cluster=\"{cluster}\",peer=\"{}\"}} {}",
                l.cluster, l.loss
            );
        }
        let _ = writeln!(
            out,
            "# HELP strait_gateway_link_state Link state per peer (1 for the current state).\n# TYPE strait_gateway_link_state gauge"
        );
        for l in links {
            for s in ["up", "degraded", "down"] {
                let v = u8::from(l.state == s);
                let _ = writeln!(
                    out,
                    "strait_gateway_link_state{{cluster=\"{cluster}\",peer=\"{}\",state=\"{s}\"}} {v}",
                    l.cluster
                );
            }
        }
        out
    }
}

fn escape(s: &str) -> std::borrow::Cow<'_, str> {
    federation::metrics_text::label_value(s)
}
