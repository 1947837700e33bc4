//! `strait gateway --config FILE`: the gateway's YAML configuration.
//!
//! ```yaml
//! cluster: east
//! listen: {peers: "0.0.0.0:15443", ingress: "127.0.0.1:15008", admin: "127.0.0.1:15000"}
//! tls: {cert: certs/east-gw/cert.pem, key: certs/east-gw/key.pem, ca: certs/ca.pem}
//! registry: {etcd: ["http://127.0.0.1:2379"]}     # optional; TLS and credentials as the
//! #   control plane's: {etcd: ["https://…"], tls: {ca, cert, key}, auth: {user, password_file}}
//! discovery: {file: east.yaml}                    # optional: local endpoints without a registry
//! peers: [{cluster: west, address: "127.0.0.1:25443"}]   # optional static peers
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use federation::config::parse_yaml;
use federation::model::{GatewayAddress, Name};
use serde::Deserialize;

use crate::health::HealthConfig;

/// The gateway's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    pub cluster: Name,
    /// This gateway's name among its cluster's replicas (a pod name): its link states are
    /// written under `/strait/v1/links/{cluster}/{peer}/{replica}`, so that replicas never
    /// write one key and readers merge them. Without it the gateway is its cluster's only one
    /// and writes `/strait/v1/links/{cluster}/{peer}`. `strait gateway --replica` sets it too.
    #[serde(default)]
    pub replica: Option<Name>,
    pub listen: Listen,
    pub tls: TlsFiles,
    #[serde(default)]
    pub registry: Option<RegistryConfig>,
    #[serde(default)]
    pub discovery: Option<DiscoveryConfig>,
    /// Without a discovery file: where the gateway keeps its cluster's endpoints as it last
    /// learned them from the registry, so that after a restart it serves them even while its
    /// control plane is away.
    #[serde(default)]
    pub local_snapshot: Option<PathBuf>,
    #[serde(default)]
    pub peers: Vec<StaticPeer>,
    #[serde(default)]
    pub link: LinkConfig,
    #[serde(default)]
    pub transport: TransportTuning,
    #[serde(default)]
    pub tunnel: TunnelConfig,
    #[serde(default)]
    pub dns: DnsConfig,
}

/// How peer gateway DNS names are resolved (see `docs/gateway.md`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Name servers (`IP:PORT`); empty: the system's (`/etc/resolv.conf`).
    pub nameservers: Vec<SocketAddr>,
    /// Per-query timeout.
    #[serde(with = "federation::config::duration_field")]
    pub timeout: Duration,
    /// Names are looked up again no sooner than this (also the retry delay after a failure).
    #[serde(with = "federation::config::duration_field")]
    pub min_refresh: Duration,
    /// ... and no later than this, whatever the records' TTL.
    #[serde(with = "federation::config::duration_field")]
    pub max_refresh: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            nameservers: Vec::new(),
            timeout: Duration::from_secs(2),
            min_refresh: Duration::from_secs(1),
            max_refresh: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// UDP address for QUIC from peer gateways.
    pub peers: SocketAddr,
    /// TCP address for HTTP CONNECT (mTLS) from local sidecars.
    pub ingress: SocketAddr,
    /// TCP address of the admin HTTP endpoint.
    pub admin: SocketAddr,
}

/// The gateway's certificate files (one shape for every component).
pub use federation::identity::TlsFiles;

pub use federation::registry::RegistryConfig;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    pub file: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticPeer {
    pub cluster: Name,
    pub address: GatewayAddress,
    /// The addresses of the peer's other gateway replicas: this gateway keeps a connection to
    /// each, and the link is up while any replica's is.
    #[serde(default)]
    pub replicas: Vec<GatewayAddress>,
    /// Per-link overrides (e.g. a longer `down_after` across a WAN).
    #[serde(default)]
    pub link: Option<LinkConfig>,
}

/// Link health tuning (see `docs/gateway.md`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LinkConfig {
    #[serde(with = "federation::config::duration_field")]
    pub probe_interval: Duration,
    #[serde(with = "federation::config::duration_field")]
    pub probe_timeout: Duration,
    /// No probe reply for this long: the link is down.
    #[serde(with = "federation::config::duration_field")]
    pub down_after: Duration,
    /// Consecutive replies needed after a reconnect before the link is up.
    pub up_after_replies: u32,
    /// Probes in the loss window.
    pub window: usize,
    /// Loss ratio (0..1) at which the link is degraded.
    pub degraded_loss: f64,
    #[serde(with = "federation::config::duration_field")]
    pub degraded_rtt: Duration,
    pub degrade_after: u32,
    pub recover_after: u32,
    /// QUIC keep-alive interval.
    #[serde(with = "federation::config::duration_field")]
    pub keep_alive: Duration,
    /// QUIC idle timeout: a connection with no packets for this long is dead.
    #[serde(with = "federation::config::duration_field")]
    pub idle_timeout: Duration,
}

impl Default for LinkConfig {
    fn default() -> Self {
        let h = HealthConfig::default();
        Self {
            probe_interval: h.probe_interval,
            probe_timeout: h.probe_timeout,
            down_after: h.down_after,
            up_after_replies: h.up_after_replies,
            window: h.window,
            degraded_loss: h.degraded_loss,
            degraded_rtt: h.degraded_rtt,
            degrade_after: h.degrade_after,
            recover_after: h.recover_after,
            keep_alive: Duration::from_millis(200),
            idle_timeout: Duration::from_millis(1000),
        }
    }
}

impl LinkConfig {
    pub fn health(&self) -> HealthConfig {
        HealthConfig {
            probe_interval: self.probe_interval,
            probe_timeout: self.probe_timeout,
            down_after: self.down_after,
            up_after_replies: self.up_after_replies,
            window: self.window,
            degraded_loss: self.degraded_loss,
            degraded_rtt: self.degraded_rtt,
            degrade_after: self.degrade_after,
            recover_after: self.recover_after,
        }
    }
}

/// QUIC transport tuning for long fat links (see `docs/gateway.md`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransportTuning {
    /// Per-stream receive window (bytes).
    pub stream_window: u64,
    /// Per-connection receive window (bytes).
    pub connection_window: u64,
    /// Per-connection send window (bytes).
    pub send_window: u64,
    /// Concurrent tunnels per peer connection.
    pub max_streams: u32,
    /// UDP socket send/receive buffer sizes (bytes).
    pub udp_buffer: usize,
    /// The congestion controller of the peer connections.
    pub congestion: Congestion,
}

/// QUIC congestion control (quinn's controllers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Congestion {
    /// CUBIC (RFC 8312, the default), as most TCP stacks: backs off on every loss.
    #[default]
    Cubic,
    /// NewReno: the simplest, halves on loss.
    NewReno,
    /// BBR (quinn's, marked experimental): paces at the measured bottleneck bandwidth and
    /// does not read random loss as congestion. Caution: quinn's BBR takes the lowest RTT the
    /// connection ever saw as its path RTT, so on a peer connection whose RTT rises after it
    /// was set up (a route change, a degraded link) its window collapses to a few packets
    /// per round trip; see docs/gateway.md.
    Bbr,
}

impl Default for TransportTuning {
    fn default() -> Self {
        Self {
            stream_window: 8 << 20,
            connection_window: 64 << 20,
            send_window: 64 << 20,
            max_streams: 16_384,
            udp_buffer: 8 << 20,
            congestion: Congestion::default(),
        }
    }
}

/// Tunnel behaviour.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TunnelConfig {
    /// A tunnel with no bytes either way for this long is closed.
    #[serde(with = "federation::config::duration_field")]
    pub idle_timeout: Duration,
    /// Connecting to a local endpoint may take this long.
    #[serde(with = "federation::config::duration_field")]
    pub connect_timeout: Duration,
    /// Opening a tunnel (header sent to status received) may take this long.
    #[serde(with = "federation::config::duration_field")]
    pub open_timeout: Duration,
    /// On shutdown (SIGTERM), tunnels under way may take this long to finish before the
    /// gateway closes its connections; meanwhile its sidecars and peers send new tunnels to
    /// other replicas.
    #[serde(with = "federation::config::duration_field")]
    pub drain_timeout: Duration,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(3600),
            connect_timeout: Duration::from_secs(2),
            open_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

pub use federation::config::ConfigError;

impl GatewayConfig {
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        Self::parse(path, &federation::config::read_file(path)?)
    }

    pub fn parse(path: impl AsRef<Path>, text: &str) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let mut cfg: GatewayConfig = parse_yaml(path, text)?;
        let invalid = |field: &str, reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            field: field.to_string(),
            reason,
        };
        cfg.link
            .health()
            .validate()
            .map_err(|r| invalid("link", r))?;
        for (i, p) in cfg.peers.iter().enumerate() {
            if p.cluster == cfg.cluster {
                return Err(invalid(
                    &format!("peers[{i}].cluster"),
                    format!("`{}` is this gateway's own cluster", p.cluster),
                ));
            }
            if cfg.peers[..i].iter().any(|q| q.cluster == p.cluster) {
                return Err(invalid(
                    &format!("peers[{i}].cluster"),
                    format!("`{}` is listed twice", p.cluster),
                ));
            }
            if let Some(l) = &p.link {
                l.health()
                    .validate()
                    .map_err(|r| invalid(&format!("peers[{i}].link"), r))?;
            }
        }
        if cfg.transport.max_streams == 0 {
            return Err(invalid(
                "transport.max_streams",
                "must be at least 1".into(),
            ));
        }
        // Relative paths are relative to the configuration file.
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut cfg.tls.cert, &mut cfg.tls.key, &mut cfg.tls.ca] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(d) = cfg.discovery.as_mut()
            && d.file.is_relative()
        {
            d.file = base.join(&d.file);
        }
        if let Some(p) = cfg.local_snapshot.as_mut()
            && p.is_relative()
        {
            *p = base.join(&*p);
        }
        if cfg.local_snapshot.is_some() && cfg.discovery.is_some() {
            return Err(invalid(
                "local_snapshot",
                "the discovery file is the gateway's own source of local endpoints already".into(),
            ));
        }
        if let Some(r) = cfg.registry.as_mut() {
            r.check(base, false)
                .map_err(|(field, reason)| invalid(field, reason))?;
        }
        Ok(cfg)
    }

    /// The link settings for `peer`.
    pub fn link_for(&self, peer: &Name) -> LinkConfig {
        self.peers
            .iter()
            .find(|p| &p.cluster == peer)
            .and_then(|p| p.link.clone())
            .unwrap_or_else(|| self.link.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"cluster: east
listen: {peers: "0.0.0.0:15443", ingress: "127.0.0.1:15008", admin: "127.0.0.1:15000"}
tls: {cert: certs/east-gw/cert.pem, key: certs/east-gw/key.pem, ca: certs/ca.pem}
registry: {etcd: ["http://127.0.0.1:2379"]}
discovery: {file: east.yaml}
peers: [{cluster: west, address: "127.0.0.1:25443"}]
"#;

    #[test]
    fn parses_the_documented_example() {
        let c = GatewayConfig::parse("/etc/strait/gw.yaml", GOOD).unwrap();
        assert_eq!(c.cluster.as_str(), "east");
        assert_eq!(c.listen.ingress.port(), 15008);
        assert_eq!(
            c.tls.cert,
            PathBuf::from("/etc/strait/certs/east-gw/cert.pem")
        );
        assert_eq!(c.peers[0].address.port(), 25443);
        assert_eq!(
            c.discovery.unwrap().file,
            PathBuf::from("/etc/strait/east.yaml")
        );
        assert_eq!(c.link.down_after, Duration::from_millis(600));
        assert_eq!(c.link.window, 50);
    }

    #[test]
    fn errors_name_the_field() {
        let e = GatewayConfig::parse("gw.yaml", &GOOD.replace("127.0.0.1:15008", "nowhere"))
            .unwrap_err();
        assert!(
            e.to_string().contains("gw.yaml:2:") && e.to_string().contains("listen.ingress"),
            "{e}"
        );
        let e = GatewayConfig::parse("gw.yaml", &GOOD.replace("cluster: west", "cluster: east"))
            .unwrap_err();
        assert!(e.to_string().contains("peers[0].cluster"), "{e}");
        let e = GatewayConfig::parse("gw.yaml", &format!("{GOOD}link: {{down_after: soon}}\n"))
            .unwrap_err();
        assert!(e.to_string().contains("link.down_after"), "{e}");
        let e = GatewayConfig::parse("gw.yaml", &format!("{GOOD}bogus: 1\n")).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = GatewayConfig::parse(
            "gw.yaml",
            &format!("{GOOD}transport: {{congestion: vegas}}\n"),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("transport.congestion") && e.to_string().contains("bbr"),
            "{e}"
        );
    }

    #[test]
    fn the_congestion_controller_is_chosen_by_name() {
        assert_eq!(
            GatewayConfig::parse("gw.yaml", GOOD)
                .unwrap()
                .transport
                .congestion,
            Congestion::Cubic
        );
        for (name, want) in [
            ("cubic", Congestion::Cubic),
            ("new_reno", Congestion::NewReno),
            ("bbr", Congestion::Bbr),
        ] {
            let c = GatewayConfig::parse(
                "gw.yaml",
                &format!("{GOOD}transport: {{congestion: {name}}}\n"),
            )
            .unwrap();
            assert_eq!(c.transport.congestion, want);
            // And quinn takes it.
            crate::tls::transport(&c.transport, c.link.keep_alive, c.link.idle_timeout).unwrap();
        }
    }
}
