//! `strait`: one binary for every role and every operator task of the Strait federation gateway.
#![forbid(unsafe_code)]

mod chaos;
mod demo;
mod etcd_args;
mod install;
mod lab;
mod pki_cmd;
mod policy_cmd;
mod proxy_cmd;
mod registry_cmd;
mod route_cmd;

use clap::{Parser, Subcommand, ValueEnum};

/// Strait: link clusters across clouds, fail over between them in under a second.
#[derive(Parser, Debug)]
#[command(name = "strait", version, about, long_about = None, propagate_version = true)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "STRAIT_LOG_FORMAT")]
    log_format: LogFormat,
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `federation=debug`
    /// [default: `info`; `warn` for the demo, which narrates itself].
    #[arg(long, global = true, env = "STRAIT_LOG")]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The global endpoint registry: publish a discovery file, dump, watch.
    Registry {
        #[command(subcommand)]
        cmd: registry_cmd::RegistryCommand,
    },
    /// The federation's certificates: CA, gateway and workload identities.
    Pki {
        #[command(subcommand)]
        cmd: pki_cmd::PkiCommand,
    },
    /// Failover policies in the registry: apply a file, list, delete.
    Policy {
        #[command(subcommand)]
        cmd: policy_cmd::PolicyCommand,
    },
    /// Routes as the control plane resolves them: `explain` one service from one place.
    Route {
        #[command(subcommand)]
        cmd: route_cmd::RouteCommand,
    },
    /// Run the east-west gateway of a cluster (QUIC + mTLS peering, tunnels, ingress).
    Gateway {
        /// The gateway's YAML configuration (see docs/gateway.md).
        #[arg(long)]
        config: std::path::PathBuf,
        /// This replica's name among the cluster's gateways (e.g. the pod name), when the
        /// cluster runs several: overrides `replica:` in the configuration.
        #[arg(long, env = "STRAIT_GATEWAY_REPLICA")]
        replica: Option<String>,
    },
    /// Run a cluster's control plane (registry publisher, route resolution, xDS server).
    Controlplane {
        /// The control plane's YAML configuration (see docs/controlplane.md).
        #[arg(long)]
        config: std::path::PathBuf,
        /// On SIGTERM/SIGINT, withdraw the cluster from the federation (decommissioning).
        /// Without it a stop leaves the cluster's entries for a successor: a restart is not a
        /// withdrawal.
        #[arg(long)]
        withdraw_on_exit: bool,
    },
    /// The sidecar: `run` starts Strait's proxy; `bootstrap --envoy|--grpc` prints a bootstrap
    /// for Envoy or proxyless gRPC.
    Proxy {
        #[command(subcommand)]
        cmd: proxy_cmd::ProxyCommand,
    },
    /// Install Strait: `kubernetes` prints a cluster's manifests (for `kubectl apply -f -`).
    Install {
        #[command(subcommand)]
        cmd: install::InstallCommand,
    },
    /// A local multi-cluster federation on this machine: `up`, `status`, `down`.
    Lab {
        #[command(subcommand)]
        cmd: lab::LabCommand,
    },
    /// Faults in a running lab: cut, heal, degrade, flap, isolate, kill, restart; `run` a
    /// scenario under load and write its report.
    Chaos(chaos::ChaosArgs),
    /// A guided tour of what Strait can do on this machine.
    Demo(demo::DemoArgs),
}

fn init_logging(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| anyhow::anyhow!("--log `{filter}` is not a valid filter: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let default_log = match cli.command {
        Command::Demo(_)
        | Command::Lab { .. }
        | Command::Chaos(_)
        | Command::Route { .. }
        | Command::Policy { .. }
        | Command::Install { .. }
        | Command::Proxy {
            cmd: proxy_cmd::ProxyCommand::Bootstrap(_),
        } => "warn",
        _ => "info",
    };
    let log = cli.log.clone().unwrap_or_else(|| default_log.to_string());
    if let Err(e) = init_logging(cli.log_format, &log) {
        eprintln!("error: {e:#}");
        return std::process::ExitCode::from(2);
    }
    // The one TLS provider of the whole process: aws-lc-rs.
    if rustls::crypto::aws_lc_rs::default_provider()
        .install_default()
        .is_err()
    {
        eprintln!("error: a rustls crypto provider was already installed");
        return std::process::ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Pki { cmd } => pki_cmd::run(cmd),
        Command::Registry { cmd } => run_async(registry_cmd::run(cmd)),
        Command::Route { cmd } => run_async(route_cmd::run(cmd)),
        Command::Policy { cmd } => run_async(policy_cmd::run(cmd)),
        Command::Demo(args) => run_async(demo::run(args)),
        Command::Lab { cmd } => run_async(lab::run(cmd)),
        Command::Chaos(args) => run_async(chaos::run(args)),
        Command::Gateway { config, replica } => run_async(run_gateway(config, replica)),
        Command::Controlplane {
            config,
            withdraw_on_exit,
        } => run_async(run_controlplane(config, withdraw_on_exit)),
        Command::Proxy { cmd } => proxy_cmd::run(cmd),
        Command::Install { cmd } => install::run(cmd),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_async(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    run_async_with(None, fut)
}

/// [`run_async`] with `workers` runtime threads (default: one per available core). One worker
/// is tokio's current-thread runtime: every task runs on the thread that drives the I/O, with no
/// hand-off between a worker and the main thread.
fn run_async_with(
    workers: Option<usize>,
    fut: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let mut b = match workers {
        Some(n) if n <= 1 => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let rt = b
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;
    rt.block_on(fut)
}

async fn run_gateway(path: std::path::PathBuf, replica: Option<String>) -> anyhow::Result<()> {
    let mut config = gateway::config::GatewayConfig::load(&path)?;
    if let Some(r) = replica {
        config.replica = Some(
            federation::model::Name::parse("--replica", &r)
                .map_err(|e| anyhow::anyhow!("--replica {r:?}: {e}"))?,
        );
    }
    let gw = gateway::Gateway::start(config).await?;
    println!(
        "gateway ready: peers {} (UDP), ingress {}, admin {}",
        gw.peer_addr, gw.ingress_addr, gw.admin_addr
    );
    shutdown_signal().await;
    gw.shutdown().await;
    Ok(())
}

async fn run_controlplane(path: std::path::PathBuf, withdraw_on_exit: bool) -> anyhow::Result<()> {
    let config = controlplane::config::ControlPlaneConfig::load(&path)?;
    let cp = controlplane::server::ControlPlane::start(config).await?;
    println!(
        "controlplane ready: xds {}, admin {}",
        cp.xds_addr, cp.admin_addr
    );
    shutdown_signal().await;
    cp.shutdown_with(withdraw_on_exit).await;
    Ok(())
}

/// Resolves when SIGTERM or SIGINT arrives.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => tracing::info!("SIGTERM received"),
                _ = i.recv() => tracing::info!("SIGINT received"),
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
