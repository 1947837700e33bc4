//! `strait proxy bootstrap`: print a bootstrap for Envoy or a proxyless gRPC client.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::bail;
use clap::Subcommand;
use controlplane::bootstrap::{BootstrapSpec, CertFiles};
use federation::model::{GatewayAddress, Locality, Name};

fn host_port(s: &str) -> Result<GatewayAddress, String> {
    GatewayAddress::parse("address", s).map_err(|e| e.to_string())
}

#[derive(Subcommand, Debug)]
pub enum ProxyCommand {
    /// Print a bootstrap that takes everything else from the control plane over ADS.
    Bootstrap(BootstrapArgs),
    /// Run Strait's sidecar proxy, configured by the control plane over ADS.
    Run(RunArgs),
    /// Set the pod's iptables redirection to the transparent listener (the injected init
    /// container runs this): every outgoing TCP connection except loopback and the proxy's
    /// own (by user id) goes to 127.0.0.1:PORT.
    Iptables(IptablesArgs),
}

#[derive(clap::Args, Debug)]
pub struct IptablesArgs {
    /// The proxy's user id: its own connections are not redirected.
    #[arg(long, default_value_t = 1337)]
    uid: u32,
    /// The transparent listener's port.
    #[arg(long, default_value_t = 15006)]
    to_port: u16,
    /// Outgoing destination ports never redirected (repeatable).
    #[arg(long = "exclude-port")]
    exclude_ports: Vec<u16>,
    /// Print the iptables commands instead of running them.
    #[arg(long)]
    dry_run: bool,
}

/// The iptables commands of the redirection (nat table, a chain of Strait's own so that
/// running it twice, or undoing it, is clean).
pub fn iptables_commands(a: &IptablesArgs) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = Vec::new();
    let mut cmd = |args: &[&str]| out.push(args.iter().map(|s| s.to_string()).collect());
    cmd(&["iptables", "-t", "nat", "-N", "STRAIT_OUTPUT"]);
    cmd(&["iptables", "-t", "nat", "-F", "STRAIT_OUTPUT"]);
    let uid = a.uid.to_string();
    cmd(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "STRAIT_OUTPUT",
        "-m",
        "owner",
        "--uid-owner",
        &uid,
        "-j",
        "RETURN",
    ]);
    cmd(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "STRAIT_OUTPUT",
        "-d",
        "127.0.0.0/8",
        "-j",
        "RETURN",
    ]);
    for p in &a.exclude_ports {
        let p = p.to_string();
        cmd(&[
            "iptables",
            "-t",
            "nat",
            "-A",
            "STRAIT_OUTPUT",
            "-p",
            "tcp",
            "--dport",
            &p,
            "-j",
            "RETURN",
        ]);
    }
    let to = a.to_port.to_string();
    cmd(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "STRAIT_OUTPUT",
        "-p",
        "tcp",
        "-j",
        "REDIRECT",
        "--to-ports",
        &to,
    ]);
    cmd(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-j",
        "STRAIT_OUTPUT",
    ]);
    out
}

fn run_iptables(a: &IptablesArgs) -> anyhow::Result<()> {
    // Running twice must not add the jump twice: a pod's init container may be restarted.
    let check = std::process::Command::new("iptables")
        .args([
            "-t",
            "nat",
            "-C",
            "OUTPUT",
            "-p",
            "tcp",
            "-j",
            "STRAIT_OUTPUT",
        ])
        .stderr(std::process::Stdio::null())
        .status();
    let present = matches!(check, Ok(s) if s.success());
    for c in iptables_commands(a) {
        if a.dry_run {
            println!("{}", c.join(" "));
            continue;
        }
        let creating_chain = c.get(3).map(String::as_str) == Some("-N");
        let jump = c.get(4).map(String::as_str) == Some("OUTPUT");
        if jump && present {
            continue;
        }
        let out = std::process::Command::new(&c[0])
            .args(&c[1..])
            .output()
            .map_err(|e| anyhow::anyhow!("cannot run {}: {e}", c[0]))?;
        // The chain exists already when the init container runs a second time.
        if !out.status.success() && !creating_chain {
            bail!(
                "`{}` failed: {}",
                c.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    if !a.dry_run {
        tracing::info!(
            uid = a.uid,
            port = a.to_port,
            "outgoing TCP redirected to the proxy"
        );
    }
    Ok(())
}

/// Who the proxy is, for the control plane.
#[derive(clap::Args, Debug)]
pub struct NodeArgs {
    /// The node id (unique per proxy).
    #[arg(long)]
    node_id: String,
    /// The proxy's cluster.
    #[arg(long)]
    cluster: String,
    /// The proxy's locality: REGION[/ZONE[/SUBZONE]]; a trailing `/` (an empty zone, as an
    /// unset downward-API label gives) means no zone.
    #[arg(long)]
    locality: String,
    /// The workload's labels (for failover_priority policies), KEY=VALUE, repeatable.
    #[arg(long = "label")]
    labels: Vec<String>,
}

impl NodeArgs {
    fn parse(&self) -> anyhow::Result<(Name, Locality, federation::model::Labels)> {
        Ok((
            Name::parse("--cluster", &self.cluster)?,
            Locality::parse(
                "--locality",
                self.locality.strip_suffix('/').unwrap_or(&self.locality),
            )?,
            crate::route_cmd::parse_labels(&self.labels)?,
        ))
    }
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// The control plane's xDS address, HOST:PORT (mutual TLS with --cert, else plaintext);
    /// several, comma-separated, for replicas: tried in turn, the config kept in between (a DNS
    /// name with several addresses works too).
    #[arg(long, default_value = "127.0.0.1:15010", value_parser = host_port, value_delimiter = ',')]
    xds: Vec<GatewayAddress>,
    /// Use state-of-the-world xDS instead of delta.
    #[arg(long)]
    sotw: bool,
    /// The outbound HTTP listener's address (applications send their requests here).
    #[arg(long, default_value = "127.0.0.1:15001")]
    outbound: SocketAddr,
    /// The admin address (`/ready`, `/metrics`, `/config_dump`, `/clusters`).
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// The local east-west gateway's ingress, HOST:PORT (a DNS name is resolved at start, to
    /// every address it has): endpoints of other clusters are reached through it (needs the
    /// workload certificate). Several, comma-separated, for the cluster's gateway replicas:
    /// tunnels go through one, and through the next when it cannot be reached.
    #[arg(long, requires = "cert", value_parser = host_port, value_delimiter = ',')]
    gateway: Vec<GatewayAddress>,
    #[command(flatten)]
    tls: CertArgs,
    /// Worker threads (like Envoy's --concurrency); default: one per available core.
    #[arg(long)]
    workers: Option<usize>,
    /// Ask the control plane for a transparent listener here (e.g. 127.0.0.1:15006), for
    /// connections an iptables REDIRECT sends: routed by their original destination; exempt
    /// the proxy's own traffic from the redirection (by its user id).
    #[arg(long)]
    transparent: Option<SocketAddr>,
    /// An inbound listener, LISTEN=APP[@ALPN] (repeatable): mutual TLS from workloads of the
    /// federation terminated with the workload certificate, then plaintext to the local
    /// application APP. ALPN: http/1.1 (default), h2, or none.
    #[arg(long = "inbound", requires = "cert")]
    inbound: Vec<String>,
}

/// The workload certificate.
#[derive(clap::Args, Debug)]
pub struct CertArgs {
    /// The workload certificate (from `strait pki issue workload`): mTLS to the control plane,
    /// the gateway, and endpoints behind other sidecars (labelled `strait.io/tls-mode: mutual`).
    #[arg(long, requires_all = ["key", "ca"])]
    cert: Option<PathBuf>,
    /// Its private key.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// The federation CA certificate.
    #[arg(long, requires = "cert")]
    ca: Option<PathBuf>,
}

impl CertArgs {
    fn files(&self) -> Option<proxy::tls::TlsFiles> {
        match (&self.cert, &self.key, &self.ca) {
            (Some(cert), Some(key), Some(ca)) => Some(proxy::tls::TlsFiles::new(cert, key, ca)),
            _ => None,
        }
    }

    /// The files, checked to be a workload certificate of `cluster`.
    fn checked(&self, cluster: &Name) -> anyhow::Result<Option<proxy::tls::TlsFiles>> {
        let Some(files) = self.files() else {
            return Ok(None);
        };
        let id = proxy::tls::identity_of(&files.cert)?;
        if id.cluster() != cluster.as_str() {
            bail!(
                "{}: the certificate is a workload of cluster {}, not {cluster}",
                files.cert.display(),
                id.cluster()
            );
        }
        Ok(Some(files))
    }
}

async fn run_proxy(a: RunArgs) -> anyhow::Result<()> {
    let (cluster, locality, labels) = a.node.parse()?;
    let labels: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let node = proxy::xds::node(
        &a.node.node_id,
        cluster.as_str(),
        (locality.region(), locality.zone(), locality.subzone()),
        &labels,
        a.outbound,
        !a.gateway.is_empty(),
        a.tls.cert.is_some(),
    );
    let node = match a.transparent {
        Some(t) => proxy::xds::with_transparent(node, t),
        None => node,
    };
    let files = a.tls.checked(&cluster)?;
    let gateway = match files.as_ref().filter(|_| !a.gateway.is_empty()) {
        Some(files) => {
            let mut addrs: Vec<SocketAddr> = Vec::new();
            for at in &a.gateway {
                match at.socket_addr() {
                    Some(addr) => addrs.push(addr),
                    None => addrs.extend(
                        tokio::net::lookup_host((at.host(), at.port()))
                            .await
                            .map_err(|e| anyhow::anyhow!("--gateway {at}: {e}"))?,
                    ),
                }
            }
            // Each address once, in the order given.
            let mut seen = std::collections::HashSet::new();
            addrs.retain(|a| seen.insert(*a));
            let Some((&first, rest)) = addrs.split_first() else {
                anyhow::bail!("--gateway: the names have no address");
            };
            let tls =
                proxy::tls::TlsSource::new(files.clone(), proxy::tls::Peer::Gateway, &[b"h2"])?;
            let mut options = proxy::tunnel::GatewayOptions::new(first);
            options.replicas = rest.to_vec();
            Some(std::sync::Arc::new(proxy::tunnel::Gateway::new(
                options, tls,
            )))
        }
        None => None,
    };
    let admin = tokio::net::TcpListener::bind(a.admin)
        .await
        .map_err(|e| anyhow::anyhow!("admin address {}: {e}", a.admin))?;
    let first = a
        .xds
        .first()
        .ok_or_else(|| anyhow::anyhow!("--xds: give the control plane's address"))?;
    let mut opts = proxy::xds::XdsOptions::new(format!("http://{first}"), node);
    opts.fallbacks = a.xds[1..].iter().map(|x| format!("http://{x}")).collect();
    opts.delta = !a.sotw;
    if let Some(files) = &files {
        opts.tls = Some(std::sync::Arc::new(proxy::tls::TlsSource::new(
            files.clone(),
            proxy::tls::Peer::Workload,
            &[b"h2"],
        )?));
    }
    // Endpoints behind sidecars: mutual TLS with the workload certificate.
    let workload_tls = match &files {
        Some(files) => Some(std::sync::Arc::new(proxy::tls::TlsSource::new(
            files.clone(),
            proxy::tls::Peer::Workload,
            &[],
        )?)),
        None => None,
    };
    let mut inbound = Vec::new();
    for text in &a.inbound {
        let spec = proxy::inbound::InboundSpec::parse(text)
            .map_err(|e| anyhow::anyhow!("--inbound {e}"))?;
        let Some(files) = files.clone() else {
            bail!("--inbound needs the workload certificate (--cert, --key, --ca)");
        };
        let alpn: Vec<&[u8]> = spec.alpn.iter().map(Vec::as_slice).collect();
        let tls = proxy::tls::TlsSource::new(files, proxy::tls::Peer::Workload, &alpn)?;
        tls.server_config()?;
        let l = tokio::net::TcpListener::bind(spec.listen)
            .await
            .map_err(|e| anyhow::anyhow!("--inbound {}: {e}", spec.listen))?;
        inbound.push((l, spec.app, std::sync::Arc::new(tls)));
    }
    let client = proxy::xds::XdsClient::start(opts);
    let mut dataplane = proxy::dataplane::Dataplane::start_with(
        client.config.clone(),
        proxy::dataplane::DataplaneOptions {
            gateway,
            workload_tls,
            ..Default::default()
        },
    );
    for (l, app, tls) in inbound {
        dataplane.serve_inbound(l, app, tls);
    }
    tracing::info!(node = %a.node.node_id, xds = ?a.xds.iter().map(ToString::to_string).collect::<Vec<_>>(), outbound = %a.outbound, admin = %a.admin,
        "strait proxy started");
    let admin_task = tokio::spawn(proxy::admin::serve(
        admin,
        proxy::admin::AdminState {
            status: client.status.clone(),
            current: dataplane.watch(),
        },
    ));
    // SIGTERM (what Kubernetes sends) or SIGINT.
    crate::shutdown_signal().await;
    admin_task.abort();
    drop(dataplane);
    drop(client);
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct BootstrapArgs {
    /// An Envoy bootstrap (JSON, for `envoy -c FILE`).
    #[arg(long, conflicts_with = "grpc", required_unless_present = "grpc")]
    envoy: bool,
    /// A proxyless gRPC bootstrap (JSON, for `GRPC_XDS_BOOTSTRAP=FILE`).
    #[arg(long)]
    grpc: bool,
    #[command(flatten)]
    node: NodeArgs,
    /// The control plane's xDS address, `IP:PORT` or `NAME:PORT` (a DNS name is checked
    /// against the control plane's certificate); several, comma-separated, for its replicas.
    #[arg(long, default_value = "127.0.0.1:15010", value_delimiter = ',')]
    xds: Vec<GatewayAddress>,
    /// Use delta xDS (Envoy).
    #[arg(long)]
    delta: bool,
    /// Envoy's admin address.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// The outbound HTTP listener's address (Envoy).
    #[arg(long, default_value = "127.0.0.1:15001")]
    outbound: SocketAddr,
    /// Ask the control plane for a transparent listener here (Envoy), for connections an
    /// iptables REDIRECT sends.
    #[arg(long)]
    transparent: Option<SocketAddr>,
    /// The local east-west gateway's ingress: remote clusters are reached through it (needs
    /// --cert/--key/--ca); several, comma-separated, for the cluster's gateway replicas.
    #[arg(long, value_delimiter = ',')]
    gateway: Vec<SocketAddr>,
    #[command(flatten)]
    tls: CertArgs,
}

pub fn run(cmd: ProxyCommand) -> anyhow::Result<()> {
    match cmd {
        ProxyCommand::Run(a) => crate::run_async_with(a.workers, run_proxy(a)),
        ProxyCommand::Iptables(a) => run_iptables(&a),
        ProxyCommand::Bootstrap(a) => {
            let (cluster, locality, labels) = a.node.parse()?;
            let files = a.tls.checked(&cluster)?;
            let gateway = match (Some(a.gateway).filter(|g| !g.is_empty()), &files) {
                (None, _) => None,
                (Some(_), None) => bail!(
                    "--gateway needs the workload certificate (--cert, --key, --ca): the gateway's ingress takes mTLS only"
                ),
                (Some(addr), Some(files)) => {
                    let me = proxy::tls::identity_of(&files.cert)?;
                    let gw = federation::identity::SpiffeId::gateway(
                        me.trust_domain(),
                        cluster.as_str(),
                    )?;
                    Some((addr, gw.to_string()))
                }
            };
            let tls = files.map(|f| CertFiles {
                cert: f.cert,
                key: f.key,
                ca: f.ca,
            });
            let spec =
                BootstrapSpec {
                    node_id: a.node.node_id,
                    cluster,
                    locality,
                    labels,
                    xds: a.xds.first().cloned().ok_or_else(|| {
                        anyhow::anyhow!("--xds: give the control plane's address")
                    })?,
                    xds_replicas: a.xds.get(1..).unwrap_or_default().to_vec(),
                    tls,
                    delta: a.delta,
                    admin: a.admin,
                    outbound: a.outbound,
                    transparent: a.transparent,
                    gateway,
                };
            let json = if a.envoy {
                controlplane::bootstrap::envoy(&spec)
            } else {
                controlplane::bootstrap::grpc(&spec)
            };
            println!("{}", serde_json::to_string_pretty(&json)?);
            Ok(())
        }
    }
}
