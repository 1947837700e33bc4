//! `strait lab`: a whole federation on one machine, with real processes. A real etcd in a
//! "global" place; for each cluster a control plane, a gateway, two zones each running two
//! replicas of the sample services (`echo` everywhere, `payments` everywhere but the first
//! cluster) behind the zone's sidecar (`strait proxy run --inbound`: mutual TLS only, the
//! endpoints labelled `strait.io/tls-mode: mutual`), and a client sidecar. In `netns` mode every
//! cluster and etcd live in their own Linux network namespace, linked by veth pairs (a full
//! mesh, and every cluster to etcd) shaped with `tc netem` (on a kernel without it: iptables for
//! loss and cuts, and `strait lab shaper` delaying packets through NFQUEUE), so `strait chaos`
//! can cut, degrade and flap them. In `loopback` mode (no root) every place has its own 127.1.K.* addresses and
//! every link is a user-space relay (`strait lab relay`): UDP between gateways, TCP to etcd.
//! See docs/lab.md.

pub mod echo;
pub mod http;
pub mod netns;
pub mod nfqueue;
pub mod relay;
pub mod shaper;
pub mod state;

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use federation::identity::{CertificateAuthority, ExtraNames, SpiffeId};
use state::{
    ClientInfo, ClusterInfo, ControlPlaneInfo, EtcdInfo, GatewayInfo, Lab, Link, LinkState, Proc,
    Role,
};

/// `strait lab` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum LabCommand {
    /// Build and start a lab (a lab left over in DIR or under the same name is removed first).
    Up(UpArgs),
    /// Every component of the running lab, with its addresses and state.
    Status {
        #[command(flatten)]
        at: LabDir,
        /// JSON (the lab's state file) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stop every process, remove the namespaces and the lab's files. Safe to run twice.
    Down {
        #[command(flatten)]
        at: LabDir,
        /// The lab's name (namespaces `strait-NAME-…`), when DIR has no state file left.
        #[arg(long, default_value = "lab")]
        name: String,
    },
    /// The lab's sample service (run by the lab itself).
    #[command(hide = true)]
    Echo(echo::EchoArgs),
    /// The loopback lab's link relays (run by the lab itself).
    #[command(hide = true)]
    Relay(relay::RelayArgs),
    /// The netns lab's packet delayer on a kernel without tc netem (run by the lab itself).
    #[command(hide = true)]
    Shaper(shaper::ShaperArgs),
}

/// Where the lab keeps its state, certificates, configuration and logs.
#[derive(Debug, Clone, clap::Args)]
pub struct LabDir {
    #[arg(long, env = "STRAIT_LAB_DIR", default_value_os_t = default_dir())]
    pub dir: PathBuf,
}

/// `netns` as root, `loopback` otherwise.
pub fn default_mode() -> String {
    if is_root() { "netns" } else { "loopback" }.to_string()
}

pub fn default_dir() -> PathBuf {
    std::env::temp_dir().join("strait-lab")
}

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub at: LabDir,
    /// How many clusters (2–6): east, central (us-east), west (us-west), north, south, pacific.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(2..=6))]
    pub clusters: u8,
    /// netns: namespaces, veth links and tc netem (needs root). loopback: 127.1.K.* addresses
    /// and user-space relays as links (no root). Default: netns as root, loopback otherwise.
    #[arg(long, default_value_t = default_mode())]
    pub mode: String,
    /// The lab's name: its namespaces are `strait-NAME-…`.
    #[arg(long, default_value = "lab")]
    pub name: String,
    /// Control-plane and gateway replicas per cluster (every control plane serves xDS and one
    /// publishes, every sidecar is given all of them; every gateway keeps a connection to each
    /// replica of every other cluster, and sidecars tunnel through any of their own); with 2 or
    /// more, etcd runs as a three-member cluster.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=3))]
    pub replicas: u8,
}

pub async fn run(cmd: LabCommand) -> anyhow::Result<()> {
    match cmd {
        LabCommand::Up(args) => {
            let lab = up(&args).await?;
            print_status(&lab, false).await;
            Ok(())
        }
        LabCommand::Status { at, json } => {
            let lab = Lab::load(&at.dir)?;
            print_status(&lab, json).await;
            Ok(())
        }
        LabCommand::Down { at, name } => down(&at.dir, &name),
        LabCommand::Echo(args) => echo::run(args).await,
        LabCommand::Relay(args) => relay::run(args).await,
        LabCommand::Shaper(args) => shaper::run(args).await,
    }
}

const CLUSTERS: [(&str, &str); 6] = [
    ("east", "us-east"),
    ("central", "us-east"),
    ("west", "us-west"),
    ("north", "eu-north"),
    ("south", "sa-south"),
    ("pacific", "ap-pacific"),
];
const ZONES: [&str; 2] = ["zone-a", "zone-b"];
/// The echo sidecars' outbound and admin ports (one sidecar per zone: these plus the zone's
/// index). Admin is on the cluster's local address; outbound on an address of its own
/// ([`sidecar_ip`]), because a sidecar binds its TCP service listeners on its outbound
/// address's IP, and the client sidecar of the same namespace binds the same ports.
const SIDECAR_OUTBOUND: u16 = 15101;
const SIDECAR_ADMIN: u16 = 15121;

/// The outbound IP of zone `z`'s echo sidecar: the cluster's local address + 10 + z in the
/// last octet (127.0.0.11 in netns mode, 127.1.K.11 in loopback mode).
fn sidecar_ip(local: Ipv4Addr, z: usize) -> Ipv4Addr {
    let [a, b, c, d] = local.octets();
    Ipv4Addr::new(a, b, c, d.wrapping_add(10 + z as u8))
}
/// (service, port, first replica port, protocol): replicas listen on consecutive ports from
/// there. `ledger` is payments' gRPC twin (same clusters, same failover policy).
/// `store` is its TCP twin (the sidecars see opaque TCP; the replicas answer HTTP, so the load
/// generator can tell who served a connection).
const SERVICES: [(&str, u16, u16, &str); 4] = [
    ("echo", 8080, 18081, "http"),
    ("payments", 9090, 19081, "http"),
    ("ledger", 7070, 17081, "grpc"),
    ("store", 6060, 16081, "tcp"),
];
const TRUST_DOMAIN: &str = "lab.strait";
/// The ports of the gateways' QUIC listeners and of etcd's clients.
const PEERS_PORT: u16 = 15443;
const ETCD_PORT: u16 = 2379;
/// With several etcd members, member `i` listens on `ETCD_PORT + i * ETCD_MEMBER_STRIDE` (and
/// its peer port one above).
const ETCD_MEMBER_STRIDE: u16 = 10;
/// Control-plane and gateway replica `i` listen on the first replica's ports plus
/// `i * REPLICA_STRIDE`.
const REPLICA_STRIDE: u16 = 100;
/// Loopback mode: the relay process's control port (on etcd's place, 127.1.0.1).
const RELAY_CONTROL_PORT: u16 = 15900;
/// One-way delay of a link within a region, and between regions.
const NEAR_MS: f64 = 1.0;
const FAR_MS: f64 = 10.0;

fn ns_name(lab: &str, place: &str) -> String {
    format!("strait-{lab}-{place}")
}

fn runs_service(cluster_index: usize, service: &str) -> bool {
    service == "echo" || cluster_index != 0
}

fn say(msg: &str) {
    println!("\x1b[2m[lab]\x1b[0m {msg}");
}

/// Loopback mode: place `k` (0 is etcd's, clusters from 1) has the addresses 127.1.K.*.
fn loopback_ip(place: usize, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 1, place as u8, host)
}

/// Build and start a lab; returns its state (also saved in DIR/lab.json).
/// Bring a lab up, step by step: check the arguments, plan the clusters and their addresses,
/// build the links between them, issue certificates, start etcd, the link relays or shaper,
/// apply the failover policy, start every cluster's processes, and wait until every client
/// sidecar serves every service.
pub async fn up(args: &UpArgs) -> anyhow::Result<Lab> {
    let loopback = check_up_args(args)?;
    let exe = std::env::current_exe().context("locating the strait binary")?;
    let exe = exe.to_string_lossy().into_owned();
    let started = Instant::now();
    let mut lab = plan(args, loopback)?;
    // Save early: whatever fails from here on, `lab down` knows what to remove.
    lab.save()?;
    build_links(&mut lab, loopback)?;
    lab.save()?;
    say("issuing the federation's certificates");
    issue_certificates(&lab)?;
    start_etcd(&mut lab, loopback).await?;
    start_link_processes(&mut lab, &exe).await?;
    apply_policies(&lab, &exe, loopback)?;
    for i in 0..lab.clusters.len() {
        start_cluster(&mut lab, &exe, i)?;
    }
    wait_until_serving(&lab).await?;
    lab.save()?;
    say(&format!(
        "lab up in {:.1} s (state: {})",
        started.elapsed().as_secs_f64(),
        Lab::path(&lab.dir).display()
    ));
    Ok(lab)
}

/// The mode (`true`: loopback) once the arguments are known to be usable here.
fn check_up_args(args: &UpArgs) -> anyhow::Result<bool> {
    let loopback = match args.mode.as_str() {
        "netns" => false,
        "loopback" => true,
        other => bail!("--mode {other}: expected `netns` (needs root) or `loopback`"),
    };
    if !loopback && !is_root() {
        bail!(
            "the netns lab needs root (network namespaces, veth pairs, tc netem); `--mode loopback` runs without"
        );
    }
    if args.name.is_empty()
        || args.name.len() > 8
        || !args
            .name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    {
        bail!(
            "--name `{}`: 1–8 lowercase letters or digits (it is part of namespace names)",
            args.name
        );
    }
    Ok(loopback)
}

/// The lab's clusters and addresses (nothing started yet); the previous lab in the directory
/// is taken down first.
fn plan(args: &UpArgs, loopback: bool) -> anyhow::Result<Lab> {
    let dir = args.at.dir.clone();
    down(&dir, &args.name).context("removing the previous lab")?;
    std::fs::create_dir_all(dir.join("logs"))
        .with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("{}", dir.display()))?;

    let n = usize::from(args.clusters);
    let (etcd_ns, etcd_ip) = if loopback {
        (String::new(), loopback_ip(0, 1))
    } else {
        (ns_name(&args.name, "etcd"), Ipv4Addr::new(10, 240, 0, 254))
    };
    let mut lab = Lab {
        name: args.name.clone(),
        mode: args.mode.clone(),
        dir: dir.clone(),
        trust_domain: TRUST_DOMAIN.into(),
        shaper: String::new(),
        relay: None,
        shaper_control: None,
        etcd: EtcdInfo {
            ns: etcd_ns.clone(),
            addr: SocketAddr::new(etcd_ip.into(), ETCD_PORT),
            members: if args.replicas > 1 {
                (0..3u16)
                    .map(|m| SocketAddr::new(etcd_ip.into(), ETCD_PORT + m * ETCD_MEMBER_STRIDE))
                    .collect()
            } else {
                Vec::new()
            },
        },
        clusters: Vec::new(),
        links: Vec::new(),
        processes: Vec::new(),
    };
    for (i, (name, region)) in CLUSTERS.iter().take(n).enumerate() {
        let (ns, addr, lo, etcd_via) = if loopback {
            (
                String::new(),
                loopback_ip(i + 1, 2),
                loopback_ip(i + 1, 1),
                Some(SocketAddr::new(loopback_ip(i + 1, 3).into(), ETCD_PORT)),
            )
        } else {
            (
                ns_name(&args.name, name),
                Ipv4Addr::new(10, 240, 0, (i + 1) as u8),
                Ipv4Addr::LOCALHOST,
                None,
            )
        };
        let services = SERVICES
            .iter()
            .filter(|s| runs_service(i, s.0))
            .map(|(s, port, _, _)| format!("{s}.default:{port}"))
            .collect();
        let etcd_via_more = match etcd_via {
            Some(v) if args.replicas > 1 => (1..3u16)
                .map(|m| SocketAddr::new(v.ip(), ETCD_PORT + m * ETCD_MEMBER_STRIDE))
                .collect(),
            _ => Vec::new(),
        };
        let controlplane_replicas = (1..u16::from(args.replicas))
            .map(|r| ControlPlaneInfo {
                xds: SocketAddr::new(lo.into(), 15010 + r * REPLICA_STRIDE),
                admin: SocketAddr::new(lo.into(), 15014 + r * REPLICA_STRIDE),
            })
            .collect();
        let gateway = |r: u16| GatewayInfo {
            peers: SocketAddr::new(addr.into(), PEERS_PORT + r * REPLICA_STRIDE),
            ingress: SocketAddr::new(lo.into(), 15008 + r * REPLICA_STRIDE),
            admin: SocketAddr::new(lo.into(), 15000 + r * REPLICA_STRIDE),
        };
        lab.clusters.push(ClusterInfo {
            name: name.to_string(),
            region: region.to_string(),
            ns,
            addr,
            local: lo,
            etcd_via,
            etcd_via_more,
            controlplane_replicas,
            zones: ZONES.iter().map(|z| z.to_string()).collect(),
            services,
            gateway: gateway(0),
            gateway_replicas: (1..u16::from(args.replicas)).map(gateway).collect(),
            controlplane: ControlPlaneInfo {
                xds: SocketAddr::new(lo.into(), 15010),
                admin: SocketAddr::new(lo.into(), 15014),
            },
            client: ClientInfo {
                zone: ZONES[0].to_string(),
                outbound: SocketAddr::new(lo.into(), 15001),
                admin: SocketAddr::new(lo.into(), 15020),
            },
        });
    }
    Ok(lab)
}

/// The links between clusters: user-space relays (loopback) or namespaces with veth pairs.
fn build_links(lab: &mut Lab, loopback: bool) -> anyhow::Result<()> {
    let n = lab.clusters.len();
    if loopback {
        // The addresses are fixed: a second loopback lab would collide with a running one.
        for addr in lab.etcd.member_addrs().into_iter().chain([SocketAddr::new(
            loopback_ip(0, 1).into(),
            RELAY_CONTROL_PORT,
        )]) {
            if let Err(e) = std::net::TcpListener::bind(addr) {
                bail!(
                    "loopback mode: {addr} is taken ({e}): another loopback lab runs on this machine; \
                     take it down first (`strait lab down --dir DIR`)"
                );
            }
        }
        say(&format!(
            "building {n} clusters on 127.1.K.* addresses, linked by user-space relays"
        ));
        build_relays(lab)?;
    } else {
        say(&format!(
            "building {n} clusters in network namespaces strait-{}-*",
            lab.name
        ));
        build_network(lab)?;
    }
    lab.save()?;

    Ok(())
}

/// etcd: one member, or three with `--replicas` above 1; waits until it serves.
async fn start_etcd(lab: &mut Lab, loopback: bool) -> anyhow::Result<()> {
    let members = lab.etcd.member_addrs();
    say(&if members.len() > 1 {
        format!("starting etcd: {} members", members.len())
    } else {
        "starting etcd".to_string()
    });
    // Member i: clients on its address (and, in netns mode, on 127.0.0.1 in etcd's namespace),
    // peers one port above.
    let peer_host = if loopback {
        lab.etcd.addr.ip().to_string()
    } else {
        "127.0.0.1".to_string()
    };
    let peer_url = |a: &SocketAddr| format!("http://{peer_host}:{}", a.port() + 1);
    let initial: Vec<String> = members
        .iter()
        .enumerate()
        .map(|(m, a)| format!("m{m}={}", peer_url(a)))
        .collect();
    let etcd_bin = std::env::var("STRAIT_ETCD_BIN").unwrap_or_else(|_| "etcd".into());
    for (m, a) in members.iter().enumerate() {
        let url = format!("http://{a}");
        let client_urls = if loopback {
            url.clone()
        } else {
            format!("{url},http://127.0.0.1:{}", a.port())
        };
        let (etcd_args, zone, log) = if members.len() == 1 {
            (
                testkit::etcd::single_member_args(
                    &lab.dir.join("etcd"),
                    &client_urls,
                    &url,
                    &peer_url(a),
                ),
                None,
                lab.dir.join("logs/etcd.log"),
            )
        } else {
            (
                testkit::etcd::member_args(
                    &format!("m{m}"),
                    &lab.dir.join(format!("etcd/m{m}")),
                    &client_urls,
                    &url,
                    &peer_url(a),
                    &initial.join(","),
                ),
                Some(m.to_string()),
                lab.dir.join(format!("logs/etcd-{m}.log")),
            )
        };
        let mut etcd = Proc {
            role: Role::Etcd,
            cluster: None,
            zone,
            ns: lab.etcd.ns.clone(),
            pid: 0,
            program: etcd_bin.clone(),
            args: etcd_args,
            log,
        };
        spawn(&mut etcd)?;
        lab.processes.push(etcd);
    }
    lab.save()?;
    wait_ready(lab, Role::Etcd, None, Duration::from_secs(30)).await?;

    Ok(())
}

/// The process that shapes the links: the relays (loopback) or the NFQUEUE shaper.
async fn start_link_processes(lab: &mut Lab, exe: &str) -> anyhow::Result<()> {
    if let Some(control) = lab.relay {
        say(&format!("starting the link relays (control {control})"));
        start_link_process(lab, exe, Role::Relay, RELAYS_FILE).await?;
    }
    if let Some(control) = lab.shaper_control {
        say(&format!(
            "starting the link shaper (NFQUEUE, control {control})"
        ));
        start_link_process(lab, exe, Role::Shaper, SHAPER_FILE).await?;
    }

    Ok(())
}

/// The lab's failover policy, applied to the registry with `strait policy apply`.
fn apply_policies(lab: &Lab, exe: &str, loopback: bool) -> anyhow::Result<()> {
    say("applying the failover policy of payments, ledger and store (west, then central)");
    let policies = lab.dir.join("policies.yaml");
    let etcd_url = format!("http://{}", lab.etcd.addr);
    std::fs::write(&policies, POLICIES)?;
    let mut apply = if loopback {
        let mut c = Command::new(exe);
        c.args(["policy", "apply", "--etcd", &etcd_url, "-f"]);
        c
    } else {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &lab.etcd.ns, exe, "policy", "apply"])
            .args(["--etcd", &format!("http://127.0.0.1:{ETCD_PORT}"), "-f"]);
        c
    };
    let out = apply
        .arg(&policies)
        .output()
        .context("running `strait policy apply`")?;
    if !out.status.success() {
        bail!(
            "strait policy apply failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }

    Ok(())
}

/// Cluster `i`'s files and processes: echo replicas with their sidecars, control planes,
/// gateways, the client sidecar.
fn start_cluster(lab: &mut Lab, exe: &str, i: usize) -> anyhow::Result<()> {
    let c = lab.clusters[i].clone();
    say(&format!(
        "starting cluster {} ({}): echo replicas and their sidecars, control plane, gateway, client sidecar",
        c.name, c.region
    ));
    let dir = lab.dir.clone();
    let cdir = dir.join(&c.name);
    std::fs::create_dir_all(&cdir)?;
    std::fs::write(cdir.join("discovery.yaml"), discovery_yaml(i, &c))?;
    let etcd = etcd_endpoints(lab, &c);
    std::fs::write(
        cdir.join("controlplane.yaml"),
        controlplane_yaml(&c, &etcd, &c.controlplane),
    )?;
    for (r, replica) in c.controlplane_replicas.iter().enumerate() {
        std::fs::write(
            cdir.join(format!("controlplane-{}.yaml", r + 1)),
            controlplane_yaml(&c, &etcd, replica),
        )?;
    }
    for r in 0..c.gateways().len() {
        std::fs::write(
            cdir.join(gateway_file(r)),
            gateway_yaml(&c, r, &etcd, &static_peers(lab, &c, r)),
        )?;
    }
    let mut procs = Vec::new();
    for (z, zone) in ZONES.iter().enumerate() {
        let mut args = vec![
            "lab".to_string(),
            "echo".into(),
            "--cluster".into(),
            c.name.clone(),
            "--zone".into(),
            zone.to_string(),
        ];
        // The zone's sidecar: one inbound listener (mutual TLS) on the cluster address per
        // replica, in front of the replica on the cluster's local address.
        let mut sidecar = proxy_args(
            &dir,
            &c,
            "echo",
            zone,
            SocketAddr::new(sidecar_ip(c.local, z).into(), SIDECAR_OUTBOUND + z as u16),
            SocketAddr::new(c.local.into(), SIDECAR_ADMIN + z as u16),
        );
        for (svc, _, first, protocol) in SERVICES.iter().filter(|s| runs_service(i, s.0)) {
            // The sidecar offers the app's protocol in ALPN (h2 for gRPC, none for TCP).
            let alpn = match *protocol {
                "grpc" => "@h2",
                "tcp" => "@none",
                _ => "",
            };
            for r in 0..2u16 {
                let port = first + (z as u16) * 2 + r;
                args.push("--serve".into());
                args.push(format!(
                    "{svc}-{}{}={}:{port}",
                    &zone[zone.len() - 1..],
                    r + 1,
                    c.local
                ));
                sidecar.push("--inbound".into());
                sidecar.push(format!("{}:{port}={}:{port}{alpn}", c.addr, c.local));
            }
        }
        procs.push(proc_of(
            lab,
            exe,
            Role::Echo,
            &c,
            Some(zone),
            args,
            &format!("echo-{}-{zone}", c.name),
        ));
        procs.push(proc_of(
            lab,
            exe,
            Role::Echo,
            &c,
            Some(zone),
            sidecar,
            &format!("echo-sidecar-{}-{zone}", c.name),
        ));
    }
    let cfg = |f: &str| cdir.join(f).to_string_lossy().into_owned();
    procs.push(proc_of(
        lab,
        exe,
        Role::Controlplane,
        &c,
        None,
        vec![
            "controlplane".into(),
            "--config".into(),
            cfg("controlplane.yaml"),
        ],
        &format!("controlplane-{}", c.name),
    ));
    for r in 1..=c.controlplane_replicas.len() {
        let replica = r.to_string();
        procs.push(proc_of(
            lab,
            exe,
            Role::Controlplane,
            &c,
            Some(&replica),
            vec![
                "controlplane".into(),
                "--config".into(),
                cfg(&format!("controlplane-{r}.yaml")),
            ],
            &format!("controlplane-{}-{r}", c.name),
        ));
    }
    for r in 0..c.gateways().len() {
        let replica = (r > 0).then(|| r.to_string());
        procs.push(proc_of(
            lab,
            exe,
            Role::Gateway,
            &c,
            replica.as_deref(),
            vec!["gateway".into(), "--config".into(), cfg(&gateway_file(r))],
            &match r {
                0 => format!("gateway-{}", c.name),
                _ => format!("gateway-{}-{r}", c.name),
            },
        ));
    }
    let mut client = proxy_args(
        &dir,
        &c,
        "client",
        &c.client.zone,
        c.client.outbound,
        c.client.admin,
    );
    client.extend([
        "--gateway".into(),
        c.gateways()
            .iter()
            .map(|g| g.ingress.to_string())
            .collect::<Vec<_>>()
            .join(","),
    ]);
    procs.push(proc_of(
        lab,
        exe,
        Role::Client,
        &c,
        None,
        client,
        &format!("client-{}", c.name),
    ));
    for mut p in procs {
        spawn(&mut p)?;
        lab.processes.push(p);
    }
    lab.save()?;
    Ok(())
}

/// Every component ready, every link up, every client sidecar serving every service.
async fn wait_until_serving(lab: &Lab) -> anyhow::Result<()> {
    say("waiting for every component to be ready and every link to be up");
    let deadline = Duration::from_secs(60);
    for c in &lab.clusters {
        for role in [Role::Echo, Role::Controlplane, Role::Gateway, Role::Client] {
            wait_ready(lab, role, Some(&c.name), deadline).await?;
        }
    }
    for c in &lab.clusters {
        wait_links_up(lab, c, deadline).await?;
    }
    say("checking that every client sidecar serves every service");
    for c in &lab.clusters {
        for svc in ["echo.default", "payments.default", "ledger.default"] {
            wait_served(c, svc, "/", deadline).await?;
        }
        wait_served_tcp(lab, c, "store.default", deadline).await?;
    }
    Ok(())
}

const POLICIES: &str = "policies:\n  - service: payments.default\n    targets: [{cluster: west}, {cluster: central}]\n  \
     - service: ledger.default\n    targets: [{cluster: west}, {cluster: central}]\n  \
     - service: store.default\n    targets: [{cluster: west}, {cluster: central}]\n";

fn is_root() -> bool {
    // The effective uid, read without unsafe code.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// `strait proxy run` for workload `who` of cluster `c` in `zone` (node `WHO-CLUSTER[-ZONE]`, its
/// certificate `certs/CLUSTER-WHO`, one worker).
fn proxy_args(
    dir: &Path,
    c: &ClusterInfo,
    who: &str,
    zone: &str,
    outbound: SocketAddr,
    admin: SocketAddr,
) -> Vec<String> {
    let certs = dir.join("certs").join(format!("{}-{who}", c.name));
    let cert = |f: &str| certs.join(f).to_string_lossy().into_owned();
    let node = if who == "client" {
        format!("client-{}", c.name)
    } else {
        format!("{who}-{}-{zone}", c.name)
    };
    vec![
        "proxy".to_string(),
        "run".into(),
        "--node-id".into(),
        node,
        "--cluster".into(),
        c.name.clone(),
        "--locality".into(),
        format!("{}/{zone}", c.region),
        "--xds".into(),
        c.xds_addrs()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
        "--outbound".into(),
        outbound.to_string(),
        "--admin".into(),
        admin.to_string(),
        "--cert".into(),
        cert("cert.pem"),
        "--key".into(),
        cert("key.pem"),
        "--ca".into(),
        cert("ca.pem"),
        "--workers".into(),
        "1".into(),
    ]
}

fn proc_of(
    lab: &Lab,
    exe: &str,
    role: Role,
    c: &ClusterInfo,
    zone: Option<&str>,
    args: Vec<String>,
    log: &str,
) -> Proc {
    Proc {
        role,
        cluster: Some(c.name.clone()),
        zone: zone.map(str::to_string),
        ns: c.ns.clone(),
        pid: 0,
        program: exe.to_string(),
        args,
        log: lab.dir.join("logs").join(format!("{log}.log")),
    }
}

/// Start `p` in its namespace (if it has one), detached from this process (it outlives `strait lab up`).
pub fn spawn(p: &mut Proc) -> anyhow::Result<()> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p.log)
        .with_context(|| format!("opening {}", p.log.display()))?;
    let log2 = log.try_clone()?;
    let mut cmd = if p.ns.is_empty() {
        Command::new(&p.program)
    } else {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &p.ns, &p.program]);
        c
    };
    let child = cmd
        .args(&p.args)
        .env("RUST_LOG_STYLE", "never")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", p.label()))?;
    p.pid = child.id();
    Ok(())
}

/// Start the process that holds the lab's links (`strait lab relay|shaper --config DIR/PLAN`)
/// and wait until its control port answers.
async fn start_link_process(
    lab: &mut Lab,
    exe: &str,
    role: Role,
    plan: &str,
) -> anyhow::Result<()> {
    let name = role.as_str();
    let mut p = Proc {
        role,
        cluster: None,
        zone: None,
        ns: String::new(),
        pid: 0,
        program: exe.to_string(),
        args: vec![
            "lab".into(),
            name.into(),
            "--config".into(),
            lab.dir.join(plan).to_string_lossy().into_owned(),
        ],
        log: lab.dir.join(format!("logs/{name}.log")),
    };
    spawn(&mut p)?;
    lab.processes.push(p);
    lab.save()?;
    wait_ready(lab, role, None, Duration::from_secs(30)).await
}

/// Whether `pid` is a live process (not gone, not a zombie).
pub fn alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

/// Send `signal` (e.g. `KILL`, `TERM`) to `pid`.
pub fn signal(pid: u32, signal: &str) -> Result<(), String> {
    netns::run("kill", &[&format!("-{signal}"), &pid.to_string()]).map(|_| ())
}

fn build_network(lab: &mut Lab) -> anyhow::Result<()> {
    let fail = |e: String| anyhow::anyhow!(e);
    let mut places: Vec<(String, String, Ipv4Addr)> = lab
        .clusters
        .iter()
        .map(|c| (c.name.clone(), c.ns.clone(), c.addr))
        .collect();
    let etcd_ip = match lab.etcd.addr.ip() {
        std::net::IpAddr::V4(ip) => ip,
        std::net::IpAddr::V6(_) => bail!("etcd's lab address must be IPv4"),
    };
    places.push(("etcd".into(), lab.etcd.ns.clone(), etcd_ip));
    for (_, ns, addr) in &places {
        netns::ip(&["netns", "add", ns]).map_err(fail)?;
        netns::ip_in(ns, &["link", "set", "lo", "up"]).map_err(fail)?;
        netns::ip_in(ns, &["addr", "add", &format!("{addr}/32"), "dev", "lo"]).map_err(fail)?;
    }
    lab.shaper = if netem_available(&lab.etcd.ns) {
        "netem".into()
    } else if std::path::Path::new(NFQUEUE_PROC).exists() {
        say(
            "this kernel has no tc netem (sch_netem): links are cut and made lossy with iptables, and delayed by `strait lab shaper` (NFQUEUE)",
        );
        "nfqueue".into()
    } else {
        say(
            "this kernel has neither tc netem (sch_netem) nor NFQUEUE: links are cut and made lossy with iptables, and cannot be delayed",
        );
        "iptables".into()
    };
    let mut queues = Vec::new();
    // A full mesh between clusters, and every cluster to etcd: one /30 per link.
    let mut subnet = 1u8;
    for i in 0..places.len() {
        for j in (i + 1)..places.len() {
            let (a, ns_a, addr_a) = &places[i];
            let (b, ns_b, addr_b) = &places[j];
            let dev_a = format!("to-{b}");
            let dev_b = format!("to-{a}");
            let (ip_a, ip_b) = (
                Ipv4Addr::new(10, 241, subnet, 1),
                Ipv4Addr::new(10, 241, subnet, 2),
            );
            subnet += 1;
            netns::ip(&[
                "link", "add", &dev_a, "netns", ns_a, "type", "veth", "peer", "name", &dev_b,
                "netns", ns_b,
            ])
            .map_err(fail)?;
            for (ns, dev, ip, peer_ip, peer_addr, own) in [
                (ns_a, &dev_a, ip_a, ip_b, addr_b, addr_a),
                (ns_b, &dev_b, ip_b, ip_a, addr_a, addr_b),
            ] {
                netns::ip_in(ns, &["addr", "add", &format!("{ip}/30"), "dev", dev])
                    .map_err(fail)?;
                netns::ip_in(ns, &["link", "set", dev, "up"]).map_err(fail)?;
                netns::ip_in(
                    ns,
                    &[
                        "route",
                        "add",
                        &format!("{peer_addr}/32"),
                        "via",
                        &peer_ip.to_string(),
                        "dev",
                        dev,
                        "src",
                        &own.to_string(),
                    ],
                )
                .map_err(fail)?;
            }
            let region = |p: &str| {
                lab.clusters
                    .iter()
                    .find(|c| c.name == p)
                    .map(|c| c.region.clone())
            };
            let base = match (region(a), region(b)) {
                _ if lab.shaper != "netem" => 0.0,
                (Some(ra), Some(rb)) if ra == rb => NEAR_MS,
                (Some(_), Some(_)) => FAR_MS,
                _ => NEAR_MS,
            };
            let mut link = Link {
                a: a.clone(),
                b: b.clone(),
                ns_a: ns_a.clone(),
                ns_b: ns_b.clone(),
                dev_a,
                dev_b,
                base_delay_ms: base,
                state: LinkState::Up,
                queues: None,
            };
            if lab.shaper == "nfqueue" {
                // Queue numbers from 1, two per link (one per end).
                let q = 1 + 2 * lab.links.len() as u16;
                link.queues = Some([q, q + 1]);
                for (from, to, ns, dev, queue) in [
                    (&link.a, &link.b, &link.ns_a, &link.dev_a, q),
                    (&link.b, &link.a, &link.ns_b, &link.dev_b, q + 1),
                ] {
                    queues.push(shaper::QueuePlan {
                        a: from.clone(),
                        b: to.clone(),
                        ns: ns.clone(),
                        dev: dev.clone(),
                        queue,
                    });
                }
            }
            if lab.shaper != "netem" {
                for (ns, dev) in [(&link.ns_a, &link.dev_a), (&link.ns_b, &link.dev_b)] {
                    let chain = chain_of(dev);
                    iptables(ns, &["-N", &chain]).map_err(fail)?;
                    iptables(ns, &["-A", "OUTPUT", "-o", dev, "-j", &chain]).map_err(fail)?;
                }
            }
            shape(lab, &link).map_err(fail)?;
            lab.links.push(link);
        }
    }
    if lab.shaper == "nfqueue" {
        // The shaper's control port: a free port on this namespace's loopback.
        let control = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .context("choosing the shaper's control port")?;
        let plan = shaper::Plan { control, queues };
        let file = lab.dir.join(SHAPER_FILE);
        std::fs::write(&file, serde_json::to_string_pretty(&plan)?)
            .with_context(|| format!("writing {}", file.display()))?;
        lab.shaper_control = Some(control);
    }
    Ok(())
}

/// The netns shaper's plan in the lab's directory.
const SHAPER_FILE: &str = "shaper.json";
/// Present when the kernel has NFQUEUE (`nfnetlink_queue`).
const NFQUEUE_PROC: &str = "/proc/net/netfilter/nfnetlink_queue";

/// The relay plan's file in the lab's directory.
const RELAYS_FILE: &str = "relays.json";

/// Loopback mode: where gateway replica `from_replica` of cluster `from` (index) reaches
/// gateway replica `to_replica` of cluster `to`: its end of the relay between the two, on
/// cluster `from`'s addresses. The same address is where the other replica sees it come from.
fn loopback_path(from: usize, from_replica: usize, to: usize, to_replica: usize) -> SocketAddr {
    SocketAddr::new(
        loopback_ip(from + 1, 101 + to as u8).into(),
        PEERS_PORT + REPLICA_STRIDE * to_replica as u16 + 10 * from_replica as u16,
    )
}

/// The file of gateway replica `r`'s configuration.
fn gateway_file(r: usize) -> String {
    match r {
        0 => "gateway.yaml".into(),
        _ => format!("gateway-{r}.yaml"),
    }
}

/// Gateway replica `r`'s static peers: each peer cluster with the address of every replica of
/// its gateway (loopback mode: through the relays); none in netns mode, where the registry's
/// addresses are routed over the veth links.
fn static_peers(lab: &Lab, c: &ClusterInfo, r: usize) -> Vec<(String, Vec<SocketAddr>)> {
    if lab.relay.is_none() {
        return Vec::new();
    }
    let Some(me) = lab.clusters.iter().position(|o| o.name == c.name) else {
        return Vec::new();
    };
    lab.clusters
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != me)
        .map(|(j, o)| {
            let addrs = (0..o.gateways().len())
                .map(|q| loopback_path(me, r, j, q))
                .collect();
            (o.name.clone(), addrs)
        })
        .collect()
}

/// Loopback mode: one link per pair of clusters (a UDP relay between each replica of one's
/// gateway and each of the other's, which both dial through) and one per cluster to etcd (a
/// TCP relay per member), planned in DIR/relays.json for `strait lab relay`.
fn build_relays(lab: &mut Lab) -> anyhow::Result<()> {
    let mut paths = Vec::new();
    let near_or_far = |a: &ClusterInfo, b: &ClusterInfo| {
        if a.region == b.region {
            NEAR_MS
        } else {
            FAR_MS
        }
    };
    let n = lab.clusters.len();
    for i in 0..n {
        for j in (i + 1)..n {
            let (a, b) = (&lab.clusters[i], &lab.clusters[j]);
            let link = Link {
                a: a.name.clone(),
                b: b.name.clone(),
                ns_a: String::new(),
                ns_b: String::new(),
                dev_a: format!("udp {}", loopback_path(i, 0, j, 0)),
                dev_b: format!("udp {}", loopback_path(j, 0, i, 0)),
                base_delay_ms: near_or_far(a, b),
                state: LinkState::Up,
                queues: None,
            };
            let shape = relay_shape(&link);
            for (s, from) in a.gateways().iter().enumerate() {
                for (r, to) in b.gateways().iter().enumerate() {
                    paths.push(relay::PathPlan {
                        a: a.name.clone(),
                        b: b.name.clone(),
                        kind: relay::PathKind::Udp,
                        listen: loopback_path(i, s, j, r),
                        target: to.peers,
                        client: Some(from.peers),
                        outbound: Some(loopback_path(j, r, i, s)),
                        shape,
                    });
                }
            }
            lab.links.push(link);
        }
    }
    for c in &lab.clusters {
        let Some(listen) = c.etcd_via else {
            bail!("cluster {}: no relay address to etcd", c.name);
        };
        let link = Link {
            a: c.name.clone(),
            b: "etcd".into(),
            ns_a: String::new(),
            ns_b: String::new(),
            dev_a: format!("tcp {listen}"),
            dev_b: "-".into(),
            base_delay_ms: NEAR_MS,
            state: LinkState::Up,
            queues: None,
        };
        // One relay per etcd member, all on the cluster's one link to etcd.
        for (listen, target) in std::iter::once(listen)
            .chain(c.etcd_via_more.iter().copied())
            .zip(lab.etcd.member_addrs())
        {
            paths.push(relay::PathPlan {
                a: c.name.clone(),
                b: "etcd".into(),
                kind: relay::PathKind::Tcp,
                listen,
                target,
                client: None,
                outbound: None,
                shape: relay_shape(&link),
            });
        }
        lab.links.push(link);
    }
    let control = SocketAddr::new(loopback_ip(0, 1).into(), RELAY_CONTROL_PORT);
    let plan = relay::Plan { control, paths };
    let file = lab.dir.join(RELAYS_FILE);
    std::fs::write(&file, serde_json::to_string_pretty(&plan)?)
        .with_context(|| format!("writing {}", file.display()))?;
    lab.relay = Some(control);
    lab.shaper = "relay".into();
    Ok(())
}

/// Whether the kernel has tc netem (tried on a dummy device in namespace `ns`).
fn netem_available(ns: &str) -> bool {
    let ok = netns::ip_in(ns, &["link", "add", "netem-probe", "type", "dummy"]).is_ok()
        && netns::tc_in(
            ns,
            &[
                "qdisc",
                "add",
                "dev",
                "netem-probe",
                "root",
                "netem",
                "delay",
                "1ms",
            ],
        )
        .is_ok();
    let _ = netns::ip_in(ns, &["link", "del", "netem-probe"]);
    ok
}

/// The iptables chain that impairs what leaves through `dev`.
fn chain_of(dev: &str) -> String {
    format!("strait-{dev}")
}

fn iptables(ns: &str, args: &[&str]) -> Result<String, String> {
    let mut all = vec!["netns", "exec", ns, "iptables", "-w", "5"];
    all.extend_from_slice(args);
    netns::run("ip", &all)
}

/// The round-trip figures of a link state, per direction: (loss, one-way delay, one-way
/// jitter). Round-trip loss L: each direction loses 1 - √(1 - L); delay and jitter are
/// round-trip figures, half each way.
fn per_direction(link: &Link) -> (f64, f64, f64) {
    let base = link.base_delay_ms;
    match &link.state {
        LinkState::Up => (0.0, base, 0.0),
        LinkState::Cut => (1.0, base, 0.0),
        LinkState::Degraded {
            loss,
            delay_ms,
            jitter_ms,
        } => (
            1.0 - (1.0 - loss.clamp(0.0, 1.0)).sqrt(),
            base + delay_ms / 2.0,
            jitter_ms / 2.0,
        ),
    }
}

/// A link's state as the relays take it (per direction, like netem's).
fn relay_shape(link: &Link) -> relay::Shape {
    let (loss, delay_ms, jitter_ms) = per_direction(link);
    relay::Shape {
        loss,
        delay_ms,
        jitter_ms,
    }
}

/// Apply a link's state on both ends: with `tc netem`, without it iptables, and in loopback
/// mode through the relay process.
pub fn shape(lab: &Lab, link: &Link) -> Result<(), String> {
    if lab.shaper == "relay" {
        let control = lab
            .relay
            .ok_or("this loopback lab has no relay process recorded in its state")?;
        return relay::set(control, &link.a, &link.b, relay_shape(link));
    }
    let (loss, delay, jitter) = per_direction(link);
    if lab.shaper != "netem" {
        let delayed = delay > 0.0 || jitter > 0.0;
        let queues = match (lab.shaper.as_str(), link.queues) {
            ("nfqueue", Some(q)) => Some(q),
            _ if delayed => {
                return Err(
                    "this kernel has no tc netem (sch_netem) and no NFQUEUE, so links cannot be delayed here; loss and cuts work (iptables)"
                        .into(),
                );
            }
            _ => None,
        };
        // The shaper holds packets for the new figures before any rule sends them there.
        match (lab.shaper_control, queues) {
            (Some(control), Some(_)) if delayed => {
                shaper::set(control, &link.a, &link.b, delay, jitter)?
            }
            // No rule will send this link's packets to the shaper: its figures are only what
            // `lab status` shows, so a shaper that cannot be told does not fail the change.
            (Some(control), Some(_)) => {
                let _ = shaper::set(control, &link.a, &link.b, 0.0, 0.0);
            }
            _ if delayed => return Err("this lab has no shaper process in its state".into()),
            _ => {}
        }
        let ends = [
            (&link.ns_a, &link.dev_a, queues.map(|q| q[0])),
            (&link.ns_b, &link.dev_b, queues.map(|q| q[1])),
        ];
        for (ns, dev, queue) in ends {
            let chain = chain_of(dev);
            iptables(ns, &["-F", &chain])?;
            if loss >= 1.0 {
                iptables(ns, &["-A", &chain, "-j", "DROP"])?;
                continue;
            }
            if loss > 0.0 {
                let p = format!("{loss:.6}");
                iptables(
                    ns,
                    &[
                        "-A",
                        &chain,
                        "-m",
                        "statistic",
                        "--mode",
                        "random",
                        "--probability",
                        &p,
                        "-j",
                        "DROP",
                    ],
                )?;
            }
            if let Some(q) = queue.filter(|_| delayed) {
                // After the loss rule: a lost packet is never held.
                let q = q.to_string();
                iptables(ns, &["-A", &chain, "-j", "NFQUEUE", "--queue-num", &q])?;
            }
        }
        return Ok(());
    }
    for (ns, dev) in [(&link.ns_a, &link.dev_a), (&link.ns_b, &link.dev_b)] {
        let delay = format!("{delay:.3}ms");
        let jitter = format!("{jitter:.3}ms");
        let loss = format!("{:.4}%", loss * 100.0);
        let mut args = vec![
            "qdisc", "replace", "dev", dev, "root", "netem", "limit", "100000", "delay", &delay,
        ];
        if jitter != "0.000ms" {
            args.push(&jitter);
        }
        args.extend(["loss", &loss]);
        netns::tc_in(ns, &args)?;
    }
    Ok(())
}

fn issue_certificates(lab: &Lab) -> anyhow::Result<()> {
    let certs = lab.dir.join("certs");
    // The CA outlives what it issues: a certificate may not expire after its CA, and a
    // second can tick between the two.
    let ca = CertificateAuthority::init(TRUST_DOMAIN, Duration::from_secs(31 * 86400))?;
    ca.write(certs.join("ca"), true)?;
    issue_cluster_certificates(lab, &ca, None)
}

/// Issue the certificates of one cluster anew (`strait chaos rotate-certs C`), in place: every
/// component picks them up from its files, no restart.
pub fn rotate_certificates(lab: &Lab, cluster: &str) -> anyhow::Result<()> {
    lab.cluster(cluster)?;
    let ca = CertificateAuthority::load(lab.dir.join("certs/ca"))
        .map_err(|e| anyhow::anyhow!("the lab's CA: {e}"))?;
    issue_cluster_certificates(lab, &ca, Some(cluster))
}

fn issue_cluster_certificates(
    lab: &Lab,
    ca: &CertificateAuthority,
    only: Option<&str>,
) -> anyhow::Result<()> {
    let certs = lab.dir.join("certs");
    // Within the CA's life (it lives 31 days from `lab up`).
    let left = ca
        .not_after()
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    let validity =
        Duration::from_secs(30 * 86400).min(left.saturating_sub(Duration::from_secs(60)));
    for c in lab
        .clusters
        .iter()
        .filter(|c| only.is_none_or(|o| o == c.name))
    {
        let names = ExtraNames {
            dns: vec!["localhost".into()],
            ips: vec!["127.0.0.1".parse()?, c.local.into(), c.addr.into()],
        };
        let td = TRUST_DOMAIN;
        for (what, id) in [
            (
                "gateway",
                format!("spiffe://{td}/cluster/{}/gateway", c.name),
            ),
            (
                "controlplane",
                format!(
                    "spiffe://{td}/cluster/{}/ns/strait-system/sa/controlplane",
                    c.name
                ),
            ),
            (
                "client",
                format!("spiffe://{td}/cluster/{}/ns/default/sa/client", c.name),
            ),
            (
                "echo",
                format!("spiffe://{td}/cluster/{}/ns/default/sa/echo", c.name),
            ),
        ] {
            let id: SpiffeId = id.parse()?;
            ca.issue_with_names(&id, validity, &names)?
                .write(certs.join(format!("{}-{what}", c.name)))?;
        }
    }
    Ok(())
}

fn discovery_yaml(index: usize, c: &ClusterInfo) -> String {
    let gateways: Vec<String> = c
        .gateways()
        .iter()
        .map(|g| format!("\"{}\"", g.peers))
        .collect();
    let mut s = format!(
        "cluster: {}\nregion: {}\ngateways: [{}]\nservices:\n",
        c.name,
        c.region,
        gateways.join(", ")
    );
    for (svc, port, first, protocol) in SERVICES.iter().filter(|s| runs_service(index, s.0)) {
        s.push_str(&format!(
            "  - name: {svc}\n    namespace: default\n    ports: [{{name: {protocol}, port: {port}, protocol: {protocol}}}]\n    endpoints:\n"
        ));
        for (z, zone) in ZONES.iter().enumerate() {
            for r in 0..2u16 {
                // Behind its sidecar: reached with mutual TLS.
                s.push_str(&format!(
                    "      - {{address: {}, port: {}, zone: {zone}, labels: {{strait.io/tls-mode: mutual}}}}\n",
                    c.addr,
                    first + (z as u16) * 2 + r
                ));
            }
        }
    }
    s
}

/// The etcd endpoints cluster `c` uses, YAML-quoted and comma-separated: every member, through
/// the cluster's relays in loopback mode.
fn etcd_endpoints(lab: &Lab, c: &ClusterInfo) -> String {
    let addrs: Vec<SocketAddr> = match c.etcd_via {
        Some(v) => std::iter::once(v)
            .chain(c.etcd_via_more.iter().copied())
            .collect(),
        None => lab.etcd.member_addrs(),
    };
    addrs
        .iter()
        .map(|a| format!("\"http://{a}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

fn controlplane_yaml(c: &ClusterInfo, etcd: &str, me: &ControlPlaneInfo) -> String {
    let certs = format!("../certs/{}-controlplane", c.name);
    format!(
        "cluster: {}\nregion: {}\nregistry: {{etcd: [{etcd}], lease_ttl: 5s}}\n\
         discovery: {{file: discovery.yaml, poll: 1s}}\n\
         xds: {{listen: \"{}\", tls: {{cert: {certs}/cert.pem, key: {certs}/key.pem, ca: {certs}/ca.pem}}}}\n\
         gateway: {{ingress: \"{}\"}}\nadmin: {{listen: \"{}\"}}\n",
        c.name, c.region, me.xds, c.gateway.ingress, me.admin
    )
}

/// Gateway replica `r`'s configuration (with several replicas each is named `gateway-R`, so
/// that each writes its own link states). Tunnels under way get 3 s to finish when it stops
/// (10 s by default): the lab restarts gateways one after another in its scenarios.
fn gateway_yaml(
    c: &ClusterInfo,
    r: usize,
    etcd: &str,
    peers: &[(String, Vec<SocketAddr>)],
) -> String {
    let certs = format!("../certs/{}-gateway", c.name);
    let me = c.gateway_replica(r).unwrap_or(&c.gateway);
    let mut s = format!(
        "cluster: {}\nlisten: {{peers: \"{}\", ingress: \"{}\", admin: \"{}\"}}\n\
         tls: {{cert: {certs}/cert.pem, key: {certs}/key.pem, ca: {certs}/ca.pem}}\n\
         registry: {{etcd: [{etcd}], lease_ttl: 5s}}\ndiscovery: {{file: discovery.yaml}}\n\
         tunnel: {{drain_timeout: 3s}}\n",
        c.name, me.peers, me.ingress, me.admin
    );
    if c.gateways().len() > 1 {
        s.push_str(&format!("replica: gateway-{r}\n"));
    }
    if !peers.is_empty() {
        s.push_str("peers:\n");
        for (cluster, addrs) in peers {
            let Some((first, more)) = addrs.split_first() else {
                continue;
            };
            let more: Vec<String> = more.iter().map(|a| format!("\"{a}\"")).collect();
            s.push_str(&format!(
                "  - {{cluster: {cluster}, address: \"{first}\", replicas: [{}]}}\n",
                more.join(", ")
            ));
        }
    }
    s
}

/// Wait until the processes of `role` (in `cluster`) answer; the error names the process and
/// its log.
pub async fn wait_ready(
    lab: &Lab,
    role: Role,
    cluster: Option<&str>,
    within: Duration,
) -> anyhow::Result<()> {
    let procs: Vec<&Proc> = lab
        .processes
        .iter()
        .filter(|p| p.role == role && p.cluster.as_deref() == cluster)
        .collect();
    for p in procs {
        let deadline = Instant::now() + within;
        loop {
            let probe = probe(lab, p).await;
            match probe {
                Ok(()) => break,
                Err(why) => {
                    if !alive(p.pid) {
                        bail!(
                            "{} exited while starting ({why}); its log: {}\n{}",
                            p.label(),
                            p.log.display(),
                            tail(&p.log, 15)
                        );
                    }
                    if Instant::now() > deadline {
                        bail!(
                            "{} not ready after {within:?}: {why}; its log: {}\n{}",
                            p.label(),
                            p.log.display(),
                            tail(&p.log, 15)
                        );
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

async fn probe(lab: &Lab, p: &Proc) -> Result<(), String> {
    let t = Duration::from_secs(2);
    let ok = |(status, body): (u16, String)| {
        if status == 200 {
            Ok(())
        } else {
            Err(format!("{status} {}", body.trim()))
        }
    };
    match p.role {
        Role::Relay => {
            let control = lab
                .relay
                .ok_or("no relay control port in the lab's state")?;
            tokio::task::spawn_blocking(move || relay::stats(control).map(|_| ()))
                .await
                .map_err(|e| format!("relay probe: {e}"))?
        }
        Role::Shaper => {
            let control = lab
                .shaper_control
                .ok_or("no shaper control port in the lab's state")?;
            tokio::task::spawn_blocking(move || shaper::queue_stats(control).map(|_| ()))
                .await
                .map_err(|e| format!("shaper probe: {e}"))?
        }
        Role::Etcd => {
            let addr = etcd_member_addr(lab, p);
            let (_, body) = http::get(&p.ns, addr, "etcd", "/health", t).await?;
            if body.contains("true") {
                Ok(())
            } else {
                Err(format!("health: {}", body.trim()))
            }
        }
        _ => {
            let name = p.cluster.as_deref().unwrap_or_default();
            let c = lab.cluster(name).map_err(|e| e.to_string())?;
            match p.role {
                Role::Controlplane => {
                    let replica = p.replica();
                    let admin = c
                        .controlplane_replica(replica)
                        .ok_or_else(|| format!("no control-plane replica {replica}"))?
                        .admin;
                    ok(http::get(&c.ns, admin, "cp", "/ready", t).await?)
                }
                Role::Gateway => {
                    let replica = p.replica();
                    let admin = c
                        .gateway_replica(replica)
                        .ok_or_else(|| format!("no gateway replica {replica}"))?
                        .admin;
                    ok(http::get(&c.ns, admin, "gw", "/ready", t).await?)
                }
                Role::Client => ok(http::get(&c.ns, c.client.admin, "proxy", "/ready", t).await?),
                // A sidecar of the echo replicas: its admin endpoint.
                Role::Echo if p.args.first().map(String::as_str) == Some("proxy") => {
                    let admin = p
                        .args
                        .iter()
                        .skip_while(|a| *a != "--admin")
                        .nth(1)
                        .and_then(|a| a.parse::<SocketAddr>().ok())
                        .ok_or("the sidecar has no --admin address")?;
                    ok(http::get(&c.ns, admin, "proxy", "/ready", t).await?)
                }
                Role::Echo => {
                    for a in p.args.iter().filter_map(|a| a.split_once('=')) {
                        let addr: SocketAddr = a.1.parse().map_err(|e| format!("{e}"))?;
                        ok(http::get(&c.ns, addr, "echo", "/", t).await?)?;
                    }
                    Ok(())
                }
                Role::Etcd | Role::Relay | Role::Shaper => Ok(()),
            }
        }
    }
}

/// The client address of the etcd member `p` (its `zone` is the member's index).
pub fn etcd_member_addr(lab: &Lab, p: &Proc) -> SocketAddr {
    p.zone
        .as_deref()
        .and_then(|m| m.parse::<usize>().ok())
        .and_then(|m| lab.etcd.member_addrs().get(m).copied())
        .unwrap_or(lab.etcd.addr)
}

/// One link as one gateway replica reports it.
#[derive(Debug, Clone)]
pub struct LinkView {
    pub peer: String,
    pub state: String,
    /// How many of the peer's gateway replicas the link to is up.
    pub replicas_up: usize,
}

/// The links gateway `g` of cluster `c` reports (its `/links`).
pub async fn replica_links(c: &ClusterInfo, g: &GatewayInfo) -> Result<Vec<LinkView>, String> {
    let (status, body) = http::get(&c.ns, g.admin, "gw", "/links", Duration::from_secs(2)).await?;
    if status != 200 {
        return Err(format!("/links of {}: {status}", g.admin));
    }
    let v: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("/links is not JSON: {e}"))?;
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .map(|l| LinkView {
                    peer: text(&l["cluster"]),
                    state: text(&l["state"]),
                    replicas_up: l["replicas"]
                        .as_array()
                        .map(|r| r.iter().filter(|r| r["state"] == "up").count())
                        .unwrap_or(0),
                })
                .collect()
        })
        .unwrap_or_default())
}

/// How good a reported link state is (lower is better).
fn state_rank(state: &str) -> u8 {
    match state {
        "up" => 0,
        "degraded" => 1,
        "down" => 2,
        _ => 3,
    }
}

/// Link states of cluster `c` as its gateways report them: (peer, state), the best state any
/// replica reports (the cluster's link to a peer is up while any of its gateways' is). An
/// error when no replica answers.
pub async fn gateway_links(c: &ClusterInfo) -> Result<Vec<(String, String)>, String> {
    let mut best: Vec<(String, String)> = Vec::new();
    let mut errors = Vec::new();
    let mut answered = false;
    for g in c.gateways() {
        match replica_links(c, g).await {
            Ok(links) => {
                answered = true;
                for l in links {
                    match best.iter_mut().find(|(p, _)| *p == l.peer) {
                        Some((_, s)) if state_rank(&l.state) < state_rank(s) => *s = l.state,
                        Some(_) => {}
                        None => best.push((l.peer, l.state)),
                    }
                }
            }
            Err(e) => errors.push(e),
        }
    }
    if answered {
        Ok(best)
    } else {
        Err(errors.join("; "))
    }
}

/// Wait until every gateway replica of `c` has the link to every replica of every other
/// cluster's gateway up.
async fn wait_links_up(lab: &Lab, c: &ClusterInfo, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    for (r, g) in c.gateways().into_iter().enumerate() {
        loop {
            let links = replica_links(c, g).await;
            let missing: Vec<String> = lab
                .clusters
                .iter()
                .filter(|o| o.name != c.name)
                .filter(|o| {
                    !links.as_ref().is_ok_and(|l| {
                        l.iter().any(|v| {
                            v.peer == o.name
                                && v.state == "up"
                                && v.replicas_up >= o.gateways().len()
                        })
                    })
                })
                .map(|o| o.name.clone())
                .collect();
            if missing.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "gateway {}/{r}: links to {} (every replica) not up after {within:?} ({links:?})",
                    c.name,
                    missing.join(", ")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Wait until the client sidecar of `c` answers `GET SERVICE/PATH` with a 200.
pub async fn wait_served(
    c: &ClusterInfo,
    service: &str,
    path: &str,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let r = http::get(
            &c.ns,
            c.client.outbound,
            service,
            path,
            Duration::from_secs(5),
        )
        .await;
        if let Ok((200, _)) = r {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "client sidecar of {} does not serve {service} after {within:?}: {r:?}",
                c.name
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Wait until a TCP connection to the client sidecar of `c`'s listener of `service` is served.
pub async fn wait_served_tcp(
    lab: &Lab,
    c: &ClusterInfo,
    service: &str,
    within: Duration,
) -> anyhow::Result<()> {
    let port = lab
        .service_port(service)
        .ok_or_else(|| anyhow::anyhow!("no service {service} in the lab"))?;
    let addr = SocketAddr::new(c.client.outbound.ip(), port);
    let deadline = Instant::now() + within;
    loop {
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            crate::chaos::load::tcp_request(&c.ns, addr, service),
        )
        .await;
        if let Ok(Ok(_)) = r {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "client sidecar of {} does not serve TCP {service} on {addr} after {within:?}: {r:?}",
                c.name
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Remove the lab in `dir` (and any namespace `strait-NAME-*`): processes, namespaces, files.
pub fn down(dir: &Path, name: &str) -> anyhow::Result<()> {
    let mut prefixes = vec![format!("strait-{name}-")];
    if let Ok(lab) = Lab::load(dir) {
        for p in &lab.processes {
            if alive(p.pid) {
                let _ = signal(p.pid, "KILL");
            }
        }
        prefixes.push(format!("strait-{}-", lab.name));
    }
    for ns in netns::list() {
        if prefixes.iter().any(|p| ns.starts_with(p.as_str())) {
            for pid in netns::pids(&ns) {
                let _ = signal(pid, "KILL");
            }
            netns::ip(&["netns", "del", &ns]).map_err(|e| anyhow::anyhow!(e))?;
        }
    }
    if dir.join(state::STATE_FILE).exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}

async fn print_status(lab: &Lab, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(lab).unwrap_or_else(|_| "{}".into())
        );
        return;
    }
    let place = |ns: &str| {
        if ns.is_empty() {
            String::new()
        } else {
            format!(" in netns {ns}")
        }
    };
    println!(
        "lab `{}` ({} mode, {}), etcd {}{}",
        lab.name,
        lab.mode,
        lab.dir.display(),
        lab.etcd
            .member_addrs()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        place(&lab.etcd.ns)
    );
    for c in &lab.clusters {
        println!(
            "\n  cluster {} ({}){}, address {}, local listeners on {}",
            c.name,
            c.region,
            place(&c.ns),
            c.addr,
            c.local
        );
        for (r, g) in c.gateways().into_iter().enumerate() {
            println!(
                "    gateway       QUIC {}  ingress {}  admin {}{}",
                g.peers,
                g.ingress,
                g.admin,
                if r > 0 {
                    format!("  (replica {r})")
                } else {
                    String::new()
                }
            );
        }
        println!(
            "    controlplane  xDS {}  admin {}",
            c.controlplane.xds, c.controlplane.admin
        );
        for (r, replica) in c.controlplane_replicas.iter().enumerate() {
            println!(
                "    controlplane  xDS {}  admin {}  (replica {})",
                replica.xds,
                replica.admin,
                r + 1
            );
        }
        println!(
            "    client        outbound {}  admin {}  ({})",
            c.client.outbound, c.client.admin, c.client.zone
        );
        println!("    services      {}", c.services.join(", "));
        let exec = if c.ns.is_empty() {
            String::new()
        } else {
            format!("ip netns exec {} ", c.ns)
        };
        println!(
            "    try: {exec}curl -s -H 'Host: payments.default' http://{}/",
            c.client.outbound
        );
    }
    println!("\n  processes:");
    for p in &lab.processes {
        let state = if alive(p.pid) { "running" } else { "stopped" };
        println!(
            "    {:<26} pid {:<8} {state:<8} log {}",
            p.label(),
            p.pid,
            p.log.display()
        );
    }
    println!("\n  links:");
    for l in &lab.links {
        let state = match &l.state {
            LinkState::Up => "up".to_string(),
            LinkState::Cut => "CUT".to_string(),
            LinkState::Degraded {
                loss,
                delay_ms,
                jitter_ms,
            } => format!(
                "degraded (loss {:.0}%, +{delay_ms} ms ± {jitter_ms} ms RTT)",
                loss * 100.0
            ),
        };
        println!(
            "    {:<8} ↔ {:<8} {:>4.1} ms one way   {state}",
            l.a, l.b, l.base_delay_ms
        );
    }
    if let Some(control) = lab.relay {
        match tokio::task::spawn_blocking(move || relay::stats(control)).await {
            Ok(Ok(paths)) => {
                println!("\n  relays (control {control}):");
                for p in paths {
                    println!(
                        "    {:<8} → {:<8} {:?} {} → {}   {} forwarded, {} dropped",
                        p.a, p.b, p.kind, p.listen, p.target, p.forwarded, p.dropped
                    );
                }
            }
            Ok(Err(e)) => println!("\n  relays: {e}"),
            Err(e) => println!("\n  relays: {e}"),
        }
    }
    if let Some(control) = lab.shaper_control {
        match tokio::task::spawn_blocking(move || shaper::queue_stats(control)).await {
            Ok(Ok(queues)) => {
                println!("\n  shaper (NFQUEUE, control {control}):");
                for q in queues.iter().filter(|q| q.queued > 0 || q.delay_ms > 0.0) {
                    println!(
                        "    {:<8} → {:<8} queue {:<3} +{:.1} ms ± {:.1} ms   {} held, {} let go",
                        q.a, q.b, q.queue, q.delay_ms, q.jitter_ms, q.held, q.released
                    );
                }
            }
            Ok(Err(e)) => println!("\n  shaper: {e}"),
            Err(e) => println!("\n  shaper: {e}"),
        }
    }
    let mut seen = Vec::new();
    for c in &lab.clusters {
        if let Ok(links) = gateway_links(c).await {
            for (peer, state) in links {
                seen.push(format!("{}→{peer} {state}", c.name));
            }
        }
    }
    if !seen.is_empty() {
        println!("\n  gateways report: {}", seen.join(", "));
    }
}
