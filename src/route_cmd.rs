//! `strait route explain`: how a proxy in a given cluster and locality would route to a service,
//! and why, from the registry as it is now.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::bail;
use clap::Subcommand;
use federation::model::{ClusterId, Labels, Locality, Name, ServiceKey};
use federation::registry::RegistryCache;
use federation::route::{Caller, Inputs, resolve};

use crate::etcd_args::EtcdArgs;

#[derive(Subcommand, Debug)]
pub enum RouteCommand {
    /// Print the priority levels, localities, endpoints, weights and the reason for each (or
    /// why it is left out) for a service as seen from a cluster and locality.
    Explain {
        /// The service, `SERVICE.NAMESPACE`.
        service: String,
        /// The asking proxy's place: `CLUSTER`, `CLUSTER/REGION`, `CLUSTER/REGION/ZONE` or
        /// `CLUSTER/REGION/ZONE/SUBZONE` (the region defaults to the cluster's).
        #[arg(long)]
        from: String,
        /// The asking workload's labels (`KEY=VALUE`, repeatable), for `failover_priority`.
        #[arg(long = "label")]
        labels: Vec<String>,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
}

pub async fn run(cmd: RouteCommand) -> anyhow::Result<()> {
    match cmd {
        RouteCommand::Explain {
            service,
            from,
            labels,
            etcd,
        } => explain(&service, &from, &labels, &etcd).await,
    }
}

/// `CLUSTER[/REGION[/ZONE[/SUBZONE]]]` → the cluster and, if given, the locality.
fn parse_from(from: &str) -> anyhow::Result<(ClusterId, Option<String>)> {
    let (cluster, rest) = match from.split_once('/') {
        Some((c, r)) => (c, Some(r.to_string())),
        None => (from, None),
    };
    let cluster = Name::parse("--from", cluster).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((cluster, rest))
}

pub fn parse_labels(labels: &[String]) -> anyhow::Result<Labels> {
    let mut map = BTreeMap::new();
    for l in labels {
        let Some((k, v)) = l.split_once('=') else {
            bail!("--label `{l}` is not KEY=VALUE");
        };
        map.insert(k.to_string(), v.to_string());
    }
    Labels::new(map).map_err(|e| anyhow::anyhow!("--label: {e}"))
}

async fn explain(
    service: &str,
    from: &str,
    labels: &[String],
    etcd: &EtcdArgs,
) -> anyhow::Result<()> {
    let key = ServiceKey::parse("SERVICE", service).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (cluster, locality) = parse_from(from)?;
    let labels = parse_labels(labels)?;
    let cache = RegistryCache::spawn(etcd.connect().await?);
    let snap = cache
        .wait_synced(Duration::from_secs(10))
        .await
        .map_err(|s| {
            anyhow::anyhow!(
                "cannot read the registry from etcd at {}: {s:?}",
                etcd.list()
            )
        })?;
    let Some(record) = snap.clusters.get(&cluster) else {
        let known: Vec<String> = snap.clusters.keys().map(ToString::to_string).collect();
        bail!(
            "cluster `{cluster}` is not in the registry (known: {})",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        );
    };
    let locality = match locality {
        Some(l) => Locality::parse("--from", &l).map_err(|e| anyhow::anyhow!("{e}"))?,
        None => Locality::new(&record.region, "", "").map_err(|e| anyhow::anyhow!("{e}"))?,
    };
    let inputs = Inputs::from_snapshot(&snap, &key);
    if inputs.endpoints.is_empty() {
        bail!("service `{key}` has no endpoints in any cluster of the registry");
    }
    let policy = inputs.policy;
    let caller = Caller {
        cluster: cluster.clone(),
        locality: locality.clone(),
        labels,
    };
    let route = resolve(&caller, &inputs);
    println!(
        "# {key} from {cluster} ({locality}), registry revision {}, policy: {}",
        snap.revision,
        policy.map_or("none (defaults)".to_string(), |p| p.scope.to_string())
    );
    print!("{route}");
    // Clusters whose entries left the registry without a withdrawal while this cluster's
    // gateway still reaches them: its control plane keeps serving their last endpoints.
    for ((from, to), link) in snap.links.iter() {
        if *from == cluster
            && !snap.clusters.contains_key(to)
            && !snap.withdrawn.contains_key(to)
            && matches!(
                link.state,
                federation::model::LinkHealth::Up | federation::model::LinkHealth::Degraded
            )
        {
            println!(
                "# stale   {to}: not in the registry (its control plane is away?), but the link {cluster} → {to} is {}: {cluster}'s control plane serves {to}'s last endpoints, marked stale, for up to registry.stale_bound",
                link.state
            );
        }
    }
    if let Some(p) = policy.filter(|p| !p.http.is_empty()) {
        println!("# HTTP rules, tried in order; a request matching none goes to {key} as above:");
        for (i, r) in p.http.iter().enumerate() {
            let unknown: Vec<String> =
                r.to.iter()
                    .filter(|d| !snap.endpoints.keys().any(|(s, _)| s == &d.service))
                    .map(|d| d.service.to_string())
                    .collect();
            let note = if unknown.is_empty() {
                String::new()
            } else {
                format!(
                    "  (not in the registry, answered 503: {})",
                    unknown.join(", ")
                )
            };
            println!("#   {}: {r}{note}", r.display_name(i));
        }
        println!(
            "# each destination fails over by its own policy: `strait route explain DESTINATION`"
        );
    }
    Ok(())
}
