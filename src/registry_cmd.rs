//! `strait registry …`: publish a static discovery file, dump and watch the registry.

use std::path::PathBuf;
use std::time::Duration;

use crate::etcd_args::EtcdArgs;
use anyhow::{Context, bail};
use clap::Subcommand;
use federation::discovery::DiscoveryFile;
use federation::registry::codec::{cluster_state_kvs, pretty};
use federation::registry::publisher::Owned;
use federation::registry::{
    Backend, CacheStatus, LeasedPublisher, PublisherConfig, ROOT, RegistryCache, RegistryValue,
};
use tokio::sync::watch;

#[derive(Subcommand, Debug)]
pub enum RegistryCommand {
    /// Publish a static discovery file under the cluster's lease; keep the lease alive, republish
    /// when the file changes. On SIGTERM/SIGINT the entries stay until a successor takes them
    /// over or the lease expires (a restart is not a withdrawal); `--withdraw-on-exit` withdraws
    /// the cluster instead.
    Publish {
        #[command(flatten)]
        etcd: EtcdArgs,
        /// The static discovery file (YAML).
        #[arg(long)]
        file: PathBuf,
        /// How long entries outlive a publisher that dies without revoking its lease.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        lease_ttl: Duration,
        /// How often to check the file for changes.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        poll: Duration,
        /// On SIGTERM/SIGINT, withdraw the cluster (as `strait registry withdraw`) instead of
        /// leaving its entries to a successor: for decommissioning.
        #[arg(long)]
        withdraw_on_exit: bool,
    },
    /// Take a cluster out of the federation: write its tombstone (no reader keeps its last
    /// endpoints), then remove its record, endpoints and link states. Stop its control plane
    /// first, or it publishes again.
    Withdraw {
        #[command(flatten)]
        etcd: EtcdArgs,
        /// The cluster to withdraw.
        #[arg(long)]
        cluster: String,
    },
    /// Print everything in the registry, decoded.
    Dump {
        #[command(flatten)]
        etcd: EtcdArgs,
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The etcd members behind the registry: each member's state, the leader, the revision.
    Status {
        #[command(flatten)]
        etcd: EtcdArgs,
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// etcd's roles and users that keep each cluster to its own keys (see docs/registry.md,
    /// "Securing the registry").
    Roles {
        #[command(subcommand)]
        cmd: RolesCommand,
    },
    /// Follow the registry: print every change as it happens (resumes after disconnects).
    Watch {
        #[command(flatten)]
        etcd: EtcdArgs,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum RolesCommand {
    /// Create or update the roles and users of these clusters, idempotently, and print what
    /// changed: `strait-cluster-C` (read-write on C's own keys, read on the registry),
    /// `strait-policy-admin` (read-write on the policies), `strait-reader` (read only). Each
    /// user has the name of its role: a client certificate with that common name authenticates
    /// as it. Run it as etcd's root once authentication is on.
    Apply {
        #[command(flatten)]
        etcd: EtcdArgs,
        /// A cluster of the federation (repeatable, or comma-separated).
        #[arg(long = "cluster", value_delimiter = ',', required = true)]
        clusters: Vec<String>,
        /// A cluster whose control plane may also write the policies (it follows
        /// FailoverPolicy objects into the registry). None by default.
        #[arg(long = "policy-writer", value_delimiter = ',')]
        policy_writers: Vec<String>,
        /// Give every user a password, kept in DIR/USER (mode 0600): read when it exists,
        /// generated when it does not. Without it, new users have no password and authenticate
        /// with client certificates only.
        #[arg(long)]
        password_dir: Option<PathBuf>,
        /// Turn etcd's authentication on (after creating `root` with --root-password-file).
        #[arg(long, requires = "root_password_file")]
        enable_auth: bool,
        /// File holding the password for etcd's `root` user.
        #[arg(long)]
        root_password_file: Option<PathBuf>,
        /// Print what would change, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

pub async fn run(cmd: RegistryCommand) -> anyhow::Result<()> {
    match cmd {
        RegistryCommand::Publish {
            etcd,
            file,
            lease_ttl,
            poll,
            withdraw_on_exit,
        } => publish(etcd, file, lease_ttl, poll, withdraw_on_exit).await,
        RegistryCommand::Withdraw { etcd, cluster } => {
            let id = federation::model::ClusterId::parse("--cluster", &cluster)?;
            let backend = etcd.connect().await?;
            let removed = federation::registry::publisher::withdraw_cluster(&backend, &id)
                .await
                .with_context(|| format!("cannot withdraw cluster {id} at etcd {}", etcd.list()))?;
            println!("cluster {id} withdrawn: tombstone written, {removed} keys removed");
            Ok(())
        }
        RegistryCommand::Dump { etcd, json } => dump(etcd, json).await,
        RegistryCommand::Watch { etcd, json } => watch_cmd(etcd, json).await,
        RegistryCommand::Status { etcd, json } => status(etcd, json).await,
        RegistryCommand::Roles {
            cmd:
                RolesCommand::Apply {
                    etcd,
                    clusters,
                    policy_writers,
                    password_dir,
                    enable_auth,
                    root_password_file,
                    dry_run,
                },
        } => {
            let names = |list: Vec<String>, flag: &str| {
                list.iter()
                    .map(|c| federation::model::ClusterId::parse(flag, c))
                    .collect::<Result<Vec<_>, _>>()
            };
            let clusters = names(clusters, "--cluster")?;
            let writers = names(policy_writers, "--policy-writer")?;
            if let Some(w) = writers.iter().find(|w| !clusters.contains(w)) {
                bail!("--policy-writer {w}: not one of the --cluster names");
            }
            let root_password = match (enable_auth, root_password_file) {
                (true, Some(f)) => Some(read_secret(&f)?),
                _ => None,
            };
            roles_apply(
                etcd,
                clusters,
                writers,
                password_dir,
                root_password,
                dry_run,
            )
            .await
        }
    }
}

/// A secret from a file: its first line.
fn read_secret(path: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the password file {}", path.display()))?;
    let first = text.lines().next().unwrap_or("").to_string();
    if first.is_empty() {
        bail!("the password file {} is empty", path.display());
    }
    Ok(first)
}

/// The password of `user` in `dir`: read, or generated and written (mode 0600) when missing.
fn user_password(
    dir: &std::path::Path,
    user: &str,
    create: bool,
) -> anyhow::Result<Option<String>> {
    use rand::RngExt;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(user);
    if path.exists() {
        return read_secret(&path).map(Some);
    }
    if !create {
        return Ok(None);
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the password directory {}", dir.display()))?;
    let pw: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(32)
        .map(char::from)
        .collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writeln!(f, "{pw}").with_context(|| format!("cannot write {}", path.display()))?;
    println!("user {user}: password generated into {}", path.display());
    Ok(Some(pw))
}

async fn roles_apply(
    etcd: EtcdArgs,
    clusters: Vec<federation::model::ClusterId>,
    writers: Vec<federation::model::ClusterId>,
    password_dir: Option<PathBuf>,
    root_password: Option<String>,
    dry_run: bool,
) -> anyhow::Result<()> {
    use federation::registry::roles;
    let backend = etcd.backend()?;
    backend
        .check()
        .await
        .with_context(|| format!("cannot use etcd at {}", etcd.list()))?;
    let plan = roles::plan(&clusters, &writers);
    let mut passwords = std::collections::BTreeMap::new();
    if let Some(dir) = &password_dir {
        for u in &plan.users {
            if let Some(pw) = user_password(dir, &u.name, !dry_run)? {
                passwords.insert(u.name.clone(), pw);
            }
        }
    }
    let changes = roles::apply(
        &backend,
        &plan,
        &roles::ApplyOptions {
            passwords,
            enable_auth_root_password: root_password,
            dry_run,
        },
    )
    .await
    .with_context(|| format!("cannot apply the roles at etcd {}", etcd.list()))?;
    let prefix = if dry_run { "would change: " } else { "" };
    if changes.is_empty() {
        println!("roles and users already as planned: nothing changed");
    }
    for c in &changes {
        println!("{prefix}{c}");
    }
    Ok(())
}

async fn status(etcd: EtcdArgs, json: bool) -> anyhow::Result<()> {
    let backend = etcd.backend()?;
    let members = backend
        .members()
        .await
        .with_context(|| format!("cannot ask etcd at {} for its members", etcd.list()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&members)?);
        return Ok(());
    }
    let leader = members.iter().find(|m| m.leader);
    println!(
        "{} members, leader: {}, revision {}",
        members.len(),
        leader.map(|m| m.name.as_str()).unwrap_or("none"),
        members.iter().map(|m| m.revision).max().unwrap_or(0)
    );
    println!(
        "{:<12} {:<17} {:<7} {:>9} {:>6} {:>9} {:>9} {:<8} CLIENT URLS / ERROR",
        "NAME", "ID", "ROLE", "REVISION", "TERM", "INDEX", "DB", "VERSION"
    );
    for m in &members {
        let role = if m.leader {
            "leader"
        } else if m.reached_at.is_some() {
            "follower"
        } else {
            "?"
        };
        let tail = match &m.error {
            Some(e) => format!("{}  ({e})", m.client_urls.join(",")),
            None => m.client_urls.join(","),
        };
        println!(
            "{:<12} {:<17} {:<7} {:>9} {:>6} {:>9} {:>8}K {:<8} {}",
            m.name,
            m.id,
            role,
            m.revision,
            m.raft_term,
            m.raft_index,
            m.db_size / 1024,
            m.version,
            tail
        );
    }
    if leader.is_none() {
        bail!("no member reports a leader: etcd cannot take writes");
    }
    Ok(())
}

async fn publish(
    etcd: EtcdArgs,
    file: PathBuf,
    lease_ttl: Duration,
    poll: Duration,
    withdraw_on_exit: bool,
) -> anyhow::Result<()> {
    let parsed = DiscoveryFile::load(&file)?;
    let cluster = parsed.state.cluster.id.clone();
    // A publisher waits for etcd (and its credentials) with back-off, like the control plane.
    let backend = Backend::Etcd(etcd.backend()?);
    let (desired_tx, desired_rx) = watch::channel(cluster_state_kvs(&parsed.state));
    let endpoints: usize = parsed
        .state
        .services
        .iter()
        .map(|s| s.endpoints.len())
        .sum();
    tracing::info!(
        cluster = %cluster,
        services = parsed.state.services.len(),
        endpoints,
        file = %file.display(),
        "publishing the discovery file"
    );
    let (publisher, mut status) = LeasedPublisher::new(
        backend.clone(),
        format!("cluster {cluster}"),
        Owned::cluster(&cluster),
        PublisherConfig {
            lease_ttl,
            ..PublisherConfig::default()
        },
        desired_rx,
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(publisher.run(async move {
        let _ = stop_rx.await;
    }));

    // Report progress.
    let reporter = tokio::spawn(async move {
        let mut was_in_sync = false;
        while status.changed().await.is_ok() {
            let s = status.borrow().clone();
            if s.in_sync && !was_in_sync {
                tracing::info!(revision = s.revision, lease = ?s.lease.map(|l| format!("{l:x}")), "registry in sync");
            }
            was_in_sync = s.in_sync;
        }
    });

    // Republish when the file changes.
    federation::discovery::follow_file(
        file,
        cluster.clone(),
        poll,
        desired_tx,
        crate::shutdown_signal(),
    )
    .await;
    let _ = stop_tx.send(());
    task.await.context("the publisher task failed")?;
    reporter.abort();
    if withdraw_on_exit {
        let removed = federation::registry::publisher::withdraw_cluster(&backend, &cluster)
            .await
            .with_context(|| format!("cannot withdraw cluster {cluster}"))?;
        tracing::info!(cluster = %cluster, removed, "cluster withdrawn");
    }
    Ok(())
}

async fn dump(etcd: EtcdArgs, json: bool) -> anyhow::Result<()> {
    let backend = etcd.connect().await?;
    let (revision, kvs) = backend
        .get_prefix(ROOT)
        .await
        .with_context(|| format!("cannot read the registry from etcd at {}", etcd.list()))?;
    if json {
        let entries: Vec<serde_json::Value> = kvs
            .iter()
            .map(|kv| {
                let value = serde_json::from_slice::<serde_json::Value>(&kv.value)
                    .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&kv.value).into_owned()));
                serde_json::json!({
                    "key": kv.key,
                    "mod_revision": kv.mod_revision,
                    "lease": if kv.lease == 0 { serde_json::Value::Null } else { format!("{:x}", kv.lease).into() },
                    "value": value,
                })
            })
            .collect();
        let doc = serde_json::json!({ "revision": revision, "entries": entries });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!(
        "# registry at revision {revision}: {} keys under {ROOT}",
        kvs.len()
    );
    for kv in &kvs {
        let lease = if kv.lease == 0 {
            "no lease".to_string()
        } else {
            format!("lease {:x}", kv.lease)
        };
        println!("\n{}  (revision {}, {lease})", kv.key, kv.mod_revision);
        for line in pretty(&kv.value).lines() {
            println!("  {line}");
        }
    }
    Ok(())
}

fn describe(value: &Option<RegistryValue>) -> String {
    match value {
        None => "removed".to_string(),
        Some(RegistryValue::Cluster(c)) => format!(
            "cluster {} region {} gateways [{}]",
            c.id,
            c.region,
            c.gateways
                .iter()
                .map(|g| g.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Some(RegistryValue::Endpoints(s)) => {
            let healthy = s.endpoints.iter().filter(|e| e.health.is_serving()).count();
            format!(
                "{} in {}: {} endpoints ({} serving)",
                s.service.key,
                s.cluster,
                s.endpoints.len(),
                healthy
            )
        }
        Some(RegistryValue::Policy(p)) => format!(
            "policy for {}: {} targets, {} priority labels, {} distribute rules",
            p.scope,
            p.targets.len(),
            p.failover_priority.len(),
            p.distribute.len()
        ),
        Some(RegistryValue::Link(l)) => format!(
            "link {}→{} {} rtt {:.2} ms loss {:.1}%",
            l.from,
            l.to,
            l.state,
            l.rtt_ms,
            l.loss * 100.0
        ),
        Some(RegistryValue::Withdrawn(w)) => format!(
            "cluster {} withdrawn at {}",
            w.cluster,
            humantime::format_rfc3339_seconds(w.at)
        ),
        Some(RegistryValue::Peering(p)) => format!(
            "{} peers with {} (region {}) at [{}], trust domain {}{}",
            p.cluster,
            p.peer,
            p.region,
            p.gateways
                .iter()
                .map(|g| g.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            p.trust_domain,
            if p.ca_bundle.is_some() {
                ", own CA bundle"
            } else {
                ""
            }
        ),
    }
}

async fn watch_cmd(etcd: EtcdArgs, json: bool) -> anyhow::Result<()> {
    // Follows etcd through disconnects: no check first.
    let backend = Backend::Etcd(etcd.backend()?);
    let cache = RegistryCache::spawn(backend);
    let mut changes = cache.subscribe();
    let mut status = cache.status_receiver();
    let shutdown = crate::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = status.changed() => {
                if r.is_err() { bail!("the registry cache stopped"); }
                let s = status.borrow().clone();
                match s {
                    CacheStatus::Disconnected { error, revision } => {
                        tracing::warn!(revision, "registry unreachable: {error}; retrying");
                    }
                    CacheStatus::Synced { .. } | CacheStatus::Starting => {}
                }
            }
            c = changes.recv() => {
                let c = match c {
                    Ok(c) => c,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!("fell {n} changes behind; showing the current snapshot");
                        let s = cache.snapshot();
                        println!("revision {}: {} clusters, {} endpoints", s.revision, s.clusters.len(), s.endpoint_count());
                        continue;
                    }
                    Err(_) => bail!("the registry cache stopped"),
                };
                for u in &c.updates {
                    if json {
                        let line = serde_json::json!({
                            "revision": c.revision,
                            "resync": c.resync,
                            "key": u.key.encode(),
                            "removed": u.value.is_none(),
                            "summary": describe(&u.value),
                        });
                        println!("{line}");
                    } else {
                        let tag = if c.resync { "resync" } else if u.value.is_some() { "put" } else { "delete" };
                        println!("{:>8} {:<6} {}  {}", c.revision, tag, u.key.encode(), describe(&u.value));
                    }
                }
            }
        }
    }
}
