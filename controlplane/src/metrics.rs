//! Control-plane counters, rendered as Prometheus text on the admin port.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::view::ORDER;

/// Convergence buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.buckets[i].fetch_add(1, Relaxed);
            }
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add(d.as_micros() as u64, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// The sum of the observations.
    pub fn sum(&self) -> Duration {
        Duration::from_micros(self.sum_us.load(Relaxed))
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                self.buckets[i].load(Relaxed)
            );
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub connected: AtomicU64,
    pub streams: AtomicU64,
    pub rejected_streams: AtomicU64,
    pub pushes: [AtomicU64; 4],
    pub nacks: [AtomicU64; 4],
    pub acks: [AtomicU64; 4],
    pub stale_nonces: AtomicU64,
    pub unknown_types: AtomicU64,
    pub slow_clients: AtomicU64,
    pub generations: AtomicU64,
    pub view_builds: AtomicU64,
    pub views_cached: AtomicU64,
    pub convergence: Histogram,
    pub view_build: Histogram,
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let gauge = |out: &mut String, name: &str, help: &str, kind: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        gauge(
            &mut out,
            "strait_xds_connected_proxies",
            "ADS streams open now.",
            "gauge",
            self.connected.load(Relaxed),
        );
        gauge(
            &mut out,
            "strait_xds_streams_total",
            "ADS streams opened.",
            "counter",
            self.streams.load(Relaxed),
        );
        gauge(
            &mut out,
            "strait_xds_rejected_streams_total",
            "ADS streams refused (bad node).",
            "counter",
            self.rejected_streams.load(Relaxed),
        );
        for (name, help, arr) in [
            ("strait_xds_pushes_total", "Responses sent.", &self.pushes),
            (
                "strait_xds_acks_total",
                "Responses acknowledged.",
                &self.acks,
            ),
            (
                "strait_xds_nacks_total",
                "Responses rejected by the client.",
                &self.nacks,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for t in ORDER {
                let _ = writeln!(
                    out,
                    "{name}{{type=\"{}\"}} {}",
                    t.short(),
                    arr[t as usize].load(Relaxed)
                );
            }
        }
        gauge(
            &mut out,
            "strait_xds_stale_nonces_total",
            "Requests ignored for a stale or unknown nonce.",
            "counter",
            self.stale_nonces.load(Relaxed),
        );
        gauge(
            &mut out,
            "strait_xds_unknown_types_total",
            "Requests for a resource type this server does not serve.",
            "counter",
            self.unknown_types.load(Relaxed),
        );
        gauge(
            &mut out,
            "strait_xds_slow_clients_total",
            "Streams closed because the client stopped reading.",
            "counter",
            self.slow_clients.load(Relaxed),
        );
        gauge(
            &mut out,
            "strait_xds_generations_total",
            "Registry generations published to proxies.",
            "counter",
            self.generations.load(Relaxed),
        );
        gauge(
            &mut out,
            "strait_xds_view_builds_total",
            "Resource sets computed (one per view and generation).",
            "counter",
            self.view_builds.load(Relaxed),
        );
        gauge(
            &mut out,
            "strait_xds_views_cached",
            "Views kept as the base of the next generation's (one per distinct view connected).",
            "gauge",
            self.views_cached.load(Relaxed),
        );
        self.convergence.render(
            &mut out,
            "strait_xds_convergence_seconds",
            "From a registry change seen to the proxy's ACK of it.",
        );
        self.view_build.render(
            &mut out,
            "strait_xds_view_build_seconds",
            "Time to compute one view's resources for one generation.",
        );
        out
    }
}
