//! What a running lab is made of, kept in `DIR/lab.json`: namespaces, addresses, links and their
//! impairments, and every process with the command that (re)starts it. `strait lab status`,
//! `strait chaos` and `strait lab down` all work from this file.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

pub const STATE_FILE: &str = "lab.json";

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Lab {
    /// Namespaces are named `strait-NAME-…`.
    pub name: String,
    pub mode: String,
    pub dir: PathBuf,
    pub trust_domain: String,
    /// How links are impaired: `netem` (tc netem: loss, delay, jitter), `nfqueue` (when the
    /// kernel has no netem: loss and cuts with iptables, delay and jitter by `strait lab
    /// shaper` through NFQUEUE), `iptables` (no netem and no NFQUEUE: loss and cuts only) or
    /// `relay` (loopback mode: the user-space relays of `strait lab relay`).
    pub shaper: String,
    /// Loopback mode: the relay process's control port.
    #[serde(default)]
    pub relay: Option<SocketAddr>,
    /// `nfqueue` shaping: the shaper process's control port.
    #[serde(default)]
    pub shaper_control: Option<SocketAddr>,
    pub etcd: EtcdInfo,
    pub clusters: Vec<ClusterInfo>,
    pub links: Vec<Link>,
    pub processes: Vec<Proc>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct EtcdInfo {
    pub ns: String,
    /// The address clusters reach it on (the first member's).
    pub addr: SocketAddr,
    /// Every member's client address, when etcd has several (`lab up --replicas 2`: three).
    #[serde(default)]
    pub members: Vec<SocketAddr>,
}

impl EtcdInfo {
    /// Every member's client address (one for a single-member etcd).
    pub fn member_addrs(&self) -> Vec<SocketAddr> {
        if self.members.is_empty() {
            vec![self.addr]
        } else {
            self.members.clone()
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ClusterInfo {
    pub name: String,
    pub region: String,
    /// Its network namespace (empty in loopback mode: this machine's own).
    pub ns: String,
    /// The cluster's own address: what other places reach it on (netns: on its loopback
    /// interface, routed over the links; loopback mode: 127.1.K.2).
    pub addr: Ipv4Addr,
    /// Where the cluster's local listeners are (netns: 127.0.0.1 in its namespace; loopback
    /// mode: 127.1.K.1).
    #[serde(default = "localhost")]
    pub local: Ipv4Addr,
    /// The address the cluster reaches etcd on, when it is not etcd's own (loopback mode:
    /// its relay to etcd).
    #[serde(default)]
    pub etcd_via: Option<SocketAddr>,
    /// Loopback mode with several etcd members: its relay to each further member.
    #[serde(default)]
    pub etcd_via_more: Vec<SocketAddr>,
    pub zones: Vec<String>,
    /// `name.namespace:port` of every service running here.
    pub services: Vec<String>,
    pub gateway: GatewayInfo,
    /// Further gateway replicas (`lab up --replicas N`): replica 1, 2, …
    #[serde(default)]
    pub gateway_replicas: Vec<GatewayInfo>,
    pub controlplane: ControlPlaneInfo,
    /// Further control-plane replicas (`lab up --replicas N`): replica 1, 2, …
    #[serde(default)]
    pub controlplane_replicas: Vec<ControlPlaneInfo>,
    pub client: ClientInfo,
}

impl ClusterInfo {
    /// Control-plane replica `i` (0 is `controlplane`).
    pub fn controlplane_replica(&self, i: usize) -> Option<&ControlPlaneInfo> {
        match i {
            0 => Some(&self.controlplane),
            _ => self.controlplane_replicas.get(i - 1),
        }
    }

    /// Gateway replica `i` (0 is `gateway`).
    pub fn gateway_replica(&self, i: usize) -> Option<&GatewayInfo> {
        match i {
            0 => Some(&self.gateway),
            _ => self.gateway_replicas.get(i - 1),
        }
    }

    /// Every gateway replica, replica 0 first.
    pub fn gateways(&self) -> Vec<&GatewayInfo> {
        std::iter::once(&self.gateway)
            .chain(&self.gateway_replicas)
            .collect()
    }

    /// Every control plane's xDS address, replica 0 first.
    pub fn xds_addrs(&self) -> Vec<SocketAddr> {
        std::iter::once(&self.controlplane)
            .chain(&self.controlplane_replicas)
            .map(|c| c.xds)
            .collect()
    }
}

fn localhost() -> Ipv4Addr {
    Ipv4Addr::LOCALHOST
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct GatewayInfo {
    pub peers: SocketAddr,
    pub ingress: SocketAddr,
    pub admin: SocketAddr,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ControlPlaneInfo {
    pub xds: SocketAddr,
    pub admin: SocketAddr,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ClientInfo {
    pub zone: String,
    /// Send HTTP here (inside the cluster's namespace) with `Host: SERVICE.NAMESPACE`.
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
}

/// A link between two places: two clusters, or a cluster and etcd (`b == "etcd"`). In netns
/// mode `dev_*` are its veth ends; in loopback mode they name the relay each side goes
/// through (`udp 127.1.1.103:15443`).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Link {
    pub a: String,
    pub b: String,
    pub ns_a: String,
    pub ns_b: String,
    pub dev_a: String,
    pub dev_b: String,
    /// One-way delay of the healthy link (regions apart are farther).
    pub base_delay_ms: f64,
    pub state: LinkState,
    /// `nfqueue` shaping: the NFQUEUE numbers of the `a` and `b` ends.
    #[serde(default)]
    pub queues: Option<[u16; 2]>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    Up,
    Cut,
    /// Round-trip loss ratio and added round-trip delay and jitter.
    Degraded {
        loss: f64,
        delay_ms: f64,
        jitter_ms: f64,
    },
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Etcd,
    Controlplane,
    Gateway,
    Echo,
    Client,
    /// Loopback mode: the process holding every link's relay.
    Relay,
    /// netns mode without tc netem: the process that delays packets (NFQUEUE).
    Shaper,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Etcd => "etcd",
            Role::Controlplane => "controlplane",
            Role::Gateway => "gateway",
            Role::Echo => "echo",
            Role::Client => "client",
            Role::Relay => "relay",
            Role::Shaper => "shaper",
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Proc {
    pub role: Role,
    pub cluster: Option<String>,
    pub zone: Option<String>,
    pub ns: String,
    /// 0 while stopped (killed by `strait chaos kill`).
    pub pid: u32,
    pub program: String,
    pub args: Vec<String>,
    pub log: PathBuf,
}

impl Proc {
    /// The replica a control plane's or gateway's process is (0: the one without a number).
    pub fn replica(&self) -> usize {
        self.zone
            .as_deref()
            .and_then(|r| r.parse::<usize>().ok())
            .unwrap_or(0)
    }

    /// `gateway east`, `echo east/zone-a`, `controlplane east/1` or `gateway east/1` (a
    /// replica), `etcd`, `etcd 2` (a member).
    pub fn label(&self) -> String {
        match (&self.cluster, &self.zone) {
            (Some(c), Some(z)) => format!("{} {c}/{z}", self.role.as_str()),
            (Some(c), None) => format!("{} {c}", self.role.as_str()),
            (None, Some(m)) => format!("{} {m}", self.role.as_str()),
            _ => self.role.as_str().to_string(),
        }
    }
}

impl Lab {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE)
    }

    pub fn load(dir: &Path) -> anyhow::Result<Lab> {
        let path = Self::path(dir);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "no lab at {} (run `strait lab up --dir {}` first)",
                path.display(),
                dir.display()
            )
        })?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: not a lab state file", path.display()))
    }

    pub fn save(&self) -> anyhow::Result<()> {
        let path = Self::path(&self.dir);
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    pub fn cluster(&self, name: &str) -> anyhow::Result<&ClusterInfo> {
        self.clusters
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no cluster `{name}` in this lab (clusters: {})",
                    self.cluster_names().join(", ")
                )
            })
    }

    /// The port of service `name.namespace`, from any cluster that runs it.
    pub fn service_port(&self, service: &str) -> Option<u16> {
        self.clusters
            .iter()
            .flat_map(|c| &c.services)
            .filter_map(|s| s.rsplit_once(':'))
            .find(|(name, _)| *name == service)
            .and_then(|(_, port)| port.parse().ok())
    }

    pub fn cluster_names(&self) -> Vec<String> {
        self.clusters.iter().map(|c| c.name.clone()).collect()
    }

    /// The link between `a` and `b` (either order; `etcd` is a place too).
    pub fn link_index(&self, a: &str, b: &str) -> anyhow::Result<usize> {
        self.links
            .iter()
            .position(|l| (l.a == a && l.b == b) || (l.a == b && l.b == a))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no link between `{a}` and `{b}` (places: {}, etcd)",
                    self.cluster_names().join(", ")
                )
            })
    }
}
