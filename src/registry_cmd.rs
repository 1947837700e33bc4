//! `strait registry …`: publish a static discovery file, dump and watch the registry.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;
use federation::discovery::DiscoveryFile;
use federation::registry::codec::{cluster_state_kvs, pretty};
use federation::registry::publisher::Owned;
use federation::registry::{
    CacheStatus, LeasedPublisher, PublisherConfig, ROOT, RegistryCache, RegistryValue,
};
use tokio::sync::watch;

#[derive(Subcommand, Debug)]
pub enum RegistryCommand {
    /// Publish a static discovery file under the cluster's lease; keep the lease alive, republish
    /// when the file changes, revoke the lease on SIGTERM/SIGINT (entries disappear at once).
    Publish {
        /// etcd endpoints, comma-separated (`http://HOST:PORT`).
        #[arg(long, value_delimiter = ',', required = true, env = "STRAIT_ETCD")]
        etcd: Vec<String>,
        /// The static discovery file (YAML).
        #[arg(long)]
        file: PathBuf,
        /// How long entries outlive a publisher that dies without revoking its lease.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        lease_ttl: Duration,
        /// How often to check the file for changes.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        poll: Duration,
    },
    /// Print everything in the registry, decoded.
    Dump {
        #[arg(long, value_delimiter = ',', required = true, env = "STRAIT_ETCD")]
        etcd: Vec<String>,
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Follow the registry: print every change as it happens (resumes after disconnects).
    Watch {
        #[arg(long, value_delimiter = ',', required = true, env = "STRAIT_ETCD")]
        etcd: Vec<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(cmd: RegistryCommand) -> anyhow::Result<()> {
    match cmd {
        RegistryCommand::Publish {
            etcd,
            file,
            lease_ttl,
            poll,
        } => publish(etcd, file, lease_ttl, poll).await,
        RegistryCommand::Dump { etcd, json } => dump(etcd, json).await,
        RegistryCommand::Watch { etcd, json } => watch_cmd(etcd, json).await,
    }
}

async fn publish(
    etcd: Vec<String>,
    file: PathBuf,
    lease_ttl: Duration,
    poll: Duration,
) -> anyhow::Result<()> {
    let parsed = DiscoveryFile::load(&file)?;
    let cluster = parsed.state.cluster.id.clone();
    let backend = crate::etcd_args::connect(&etcd).await?;
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
        backend,
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
    federation::discovery::follow_file(file, cluster, poll, desired_tx, crate::shutdown_signal())
        .await;
    let _ = stop_tx.send(());
    task.await.context("the publisher task failed")?;
    reporter.abort();
    Ok(())
}

async fn dump(etcd: Vec<String>, json: bool) -> anyhow::Result<()> {
    let backend = crate::etcd_args::connect(&etcd).await?;
    let (revision, kvs) = backend
        .get_prefix(ROOT)
        .await
        .with_context(|| format!("cannot read the registry from etcd at {}", etcd.join(",")))?;
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

async fn watch_cmd(etcd: Vec<String>, json: bool) -> anyhow::Result<()> {
    let backend = crate::etcd_args::connect(&etcd).await?;
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
