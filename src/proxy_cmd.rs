//! `strait proxy bootstrap`: print a bootstrap for Envoy or a proxyless gRPC client.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Subcommand;
use controlplane::bootstrap::{BootstrapSpec, CertFiles};
use federation::model::{Locality, Name};

#[derive(Subcommand, Debug)]
pub enum ProxyCommand {
    /// Print a bootstrap that takes everything else from the control plane over ADS.
    Bootstrap(BootstrapArgs),
    /// Run Strait's sidecar proxy, configured by the control plane over ADS.
    Run(RunArgs),
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
    /// The proxy's locality: REGION[/ZONE[/SUBZONE]].
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
            Locality::parse("--locality", &self.locality)?,
            crate::route_cmd::parse_labels(&self.labels)?,
        ))
    }
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// The control plane's xDS address (plaintext, loopback).
    #[arg(long, default_value = "127.0.0.1:15010")]
    xds: SocketAddr,
    /// Use state-of-the-world xDS instead of delta.
    #[arg(long)]
    sotw: bool,
    /// The outbound HTTP listener's address (applications send their requests here).
    #[arg(long, default_value = "127.0.0.1:15001")]
    outbound: SocketAddr,
    /// The admin address (`/ready`, `/metrics`, `/config_dump`, `/clusters`).
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
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
    );
    let admin = tokio::net::TcpListener::bind(a.admin)
        .await
        .map_err(|e| anyhow::anyhow!("admin address {}: {e}", a.admin))?;
    let mut opts = proxy::xds::XdsOptions::new(format!("http://{}", a.xds), node);
    opts.delta = !a.sotw;
    let client = proxy::xds::XdsClient::start(opts);
    let dataplane = proxy::dataplane::Dataplane::start(client.config.clone());
    tracing::info!(node = %a.node.node_id, xds = %a.xds, outbound = %a.outbound, admin = %a.admin,
        "strait proxy started");
    let admin_task = tokio::spawn(proxy::admin::serve(
        admin,
        proxy::admin::AdminState {
            status: client.status.clone(),
            current: dataplane.watch(),
        },
    ));
    tokio::signal::ctrl_c()
        .await
        .map_err(|e| anyhow::anyhow!("waiting for ctrl-c: {e}"))?;
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
    /// The control plane's xDS address.
    #[arg(long, default_value = "127.0.0.1:15010")]
    xds: SocketAddr,
    /// Use delta xDS (Envoy).
    #[arg(long)]
    delta: bool,
    /// Envoy's admin address.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// The outbound HTTP listener's address (Envoy).
    #[arg(long, default_value = "127.0.0.1:15001")]
    outbound: SocketAddr,
    /// The local east-west gateway's ingress: remote clusters are reached through it (needs
    /// --cert/--key/--ca).
    #[arg(long)]
    gateway: Option<SocketAddr>,
    /// The workload certificate (from `strait pki issue workload`): mTLS to the control plane
    /// and the gateway.
    #[arg(long, requires_all = ["key", "ca"])]
    cert: Option<PathBuf>,
    #[arg(long)]
    key: Option<PathBuf>,
    #[arg(long)]
    ca: Option<PathBuf>,
}

pub fn run(cmd: ProxyCommand) -> anyhow::Result<()> {
    match cmd {
        ProxyCommand::Run(a) => crate::run_async(run_proxy(a)),
        ProxyCommand::Bootstrap(a) => {
            let (cluster, locality, labels) = a.node.parse()?;
            let tls = match (a.cert, a.key, a.ca) {
                (Some(cert), Some(key), Some(ca)) => Some(CertFiles { cert, key, ca }),
                _ => None,
            };
            let gateway = match (a.gateway, &tls) {
                (None, _) => None,
                (Some(_), None) => bail!(
                    "--gateway needs the workload certificate (--cert, --key, --ca): the gateway's ingress takes mTLS only"
                ),
                (Some(addr), Some(files)) => {
                    let pem = std::fs::read_to_string(&files.cert)
                        .with_context(|| format!("cannot read {}", files.cert.display()))?;
                    let info = federation::identity::inspect_pem(&pem)
                        .with_context(|| format!("{}", files.cert.display()))?;
                    let (Some(td), Some(c), federation::identity::CertRole::Workload) =
                        (&info.trust_domain, &info.cluster, info.role)
                    else {
                        bail!(
                            "{}: not a workload certificate ({}; {})",
                            files.cert.display(),
                            info.identity.as_deref().unwrap_or("no SPIFFE id"),
                            info.identity_error.as_deref().unwrap_or("wrong role")
                        );
                    };
                    if c != cluster.as_str() {
                        bail!(
                            "{}: the certificate is a workload of cluster {c}, not {cluster}",
                            files.cert.display()
                        );
                    }
                    let gw = federation::identity::SpiffeId::gateway(td, cluster.as_str())?;
                    Some((addr, gw.to_string()))
                }
            };
            let spec = BootstrapSpec {
                node_id: a.node.node_id,
                cluster,
                locality,
                labels,
                xds: a.xds,
                tls,
                delta: a.delta,
                admin: a.admin,
                outbound: a.outbound,
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
