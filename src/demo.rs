//! `strait demo`: a guided tour of what runs today. It starts a real etcd, publishes three
//! clusters (east and central in us-east, west in us-west) into the registry under their leases,
//! follows them with a registry cache, crashes one publisher and shows its entries expire with the
//! lease, shuts another down gracefully and shows its entries vanish at once, and issues the
//! federation's certificates. The multi-cluster lab with gateways, sidecars and the failover tour
//! comes with the lab issue; the demo says so at the end.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use federation::discovery::DiscoveryFile;
use federation::etcd_server::EtcdServer;
use federation::registry::codec::cluster_state_kvs;
use federation::registry::publisher::Owned;
use federation::registry::{
    Backend, EmbeddedRegistry, EtcdBackend, EtcdOptions, LeasedPublisher, PublisherConfig,
    RegistryCache, Snapshot,
};
use tokio::sync::{oneshot, watch};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Lease TTL of the demo clusters' publishers.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    lease_ttl: Duration,
    /// Use the embedded registry instead of starting etcd.
    #[arg(long)]
    embedded: bool,
}

const CLUSTERS: [(&str, &str, u16); 3] = [
    ("east", "us-east", 15443),
    ("central", "us-east", 16443),
    ("west", "us-west", 17443),
];

fn discovery_yaml(cluster: &str, region: &str, gw: u16, base: u16) -> String {
    format!(
        "cluster: {cluster}\nregion: {region}\ngateways: [\"127.0.0.1:{gw}\"]\nservices:\n  - name: echo\n    namespace: default\n    ports: [{{name: http, port: 8080, protocol: http}}]\n    endpoints:\n      - {{address: 127.0.0.1, port: {}, zone: {region}-1a, labels: {{version: v1}}}}\n      - {{address: 127.0.0.1, port: {}, zone: {region}-1a, labels: {{version: v1}}}}\n      - {{address: 127.0.0.1, port: {}, zone: {region}-1b, labels: {{version: v1}}}}\n      - {{address: 127.0.0.1, port: {}, zone: {region}-1b, labels: {{version: v1}}}}\n",
        base,
        base + 1,
        base + 2,
        base + 3
    )
}

fn step(n: u32, text: &str) {
    println!("\n\x1b[1m[{n}] {text}\x1b[0m");
}

fn table(s: &Snapshot) {
    println!("    revision {}", s.revision);
    println!(
        "    {:<9} {:<9} {:<16} {:>9}",
        "cluster", "region", "service", "endpoints"
    );
    for c in s.clusters.values() {
        let eps: Vec<_> = s
            .endpoints
            .iter()
            .filter(|((_, id), _)| *id == c.id)
            .collect();
        if eps.is_empty() {
            println!(
                "    {:<9} {:<9} {:<16} {:>9}",
                c.id.as_str(),
                c.region,
                "-",
                0
            );
        }
        for ((key, _), set) in eps {
            println!(
                "    {:<9} {:<9} {:<16} {:>9}",
                c.id.as_str(),
                c.region,
                key.to_string(),
                set.endpoints.len()
            );
        }
    }
}

struct Running {
    _desired: watch::Sender<std::collections::BTreeMap<String, Vec<u8>>>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("strait-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let result = tour(&args, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn tour(args: &DemoArgs, dir: &std::path::Path) -> anyhow::Result<()> {
    println!("Strait demo — the federation registry and identity, live on this machine.");
    step(1, "Start the global registry");
    let mut _etcd = None;
    let backend = if args.embedded {
        println!("    using the embedded registry (same semantics as etcd, in-process)");
        Backend::Embedded(EmbeddedRegistry::new())
    } else {
        let server = tokio::task::block_in_place(|| EtcdServer::start(&dir.join("etcd"))).context(
            "cannot start etcd (run `cargo xtask demo`, which installs it, or pass --embedded)",
        )?;
        println!(
            "    etcd {} (pid {})",
            server.endpoint(),
            server.pid().unwrap_or(0)
        );
        let b = EtcdBackend::connect_checked(&[server.endpoint()], EtcdOptions::default()).await?;
        _etcd = Some(server);
        Backend::Etcd(b)
    };
    let cache = RegistryCache::spawn(backend.clone());
    cache
        .wait_synced(Duration::from_secs(10))
        .await
        .map_err(|s| anyhow::anyhow!("the registry cache did not sync: {s:?}"))?;

    step(
        2,
        "Three clusters publish their discovery files under their own leases",
    );
    let mut running = Vec::new();
    for (i, (cluster, region, gw)) in CLUSTERS.iter().enumerate() {
        let path = dir.join(format!("{cluster}.yaml"));
        std::fs::write(
            &path,
            discovery_yaml(cluster, region, *gw, 18000 + 10 * i as u16),
        )?;
        let file = DiscoveryFile::load(&path)?;
        println!(
            "    {} → {} services, lease TTL {:?}",
            path.display(),
            file.state.services.len(),
            args.lease_ttl
        );
        let (desired, rx) = watch::channel(cluster_state_kvs(&file.state));
        let (p, _status) = LeasedPublisher::new(
            backend.clone(),
            format!("cluster {cluster}"),
            Owned::cluster(&file.state.cluster.id),
            PublisherConfig {
                lease_ttl: args.lease_ttl,
                ..PublisherConfig::default()
            },
            rx,
        );
        let (stop, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(p.run(async move {
            let _ = stop_rx.await;
        }));
        running.push(Running {
            _desired: desired,
            stop,
            task,
        });
    }
    let snap = cache
        .wait_for(Duration::from_secs(10), |s| {
            s.clusters.len() == 3 && s.endpoint_count() == 12
        })
        .await
        .map_err(|s| anyhow::anyhow!("clusters did not appear: {s:?}"))?;
    println!("    every watcher now sees:");
    table(&snap);

    step(
        3,
        "Crash west's publisher (no goodbye): its entries expire with its lease",
    );
    let t = Instant::now();
    let west = running.pop().context("west publisher missing")?;
    west.task.abort();
    let _ = west.stop;
    let snap = cache
        .wait_for(args.lease_ttl + Duration::from_secs(5), |s| {
            s.clusters.len() == 2
        })
        .await
        .map_err(|s| anyhow::anyhow!("west did not expire: {s:?}"))?;
    println!(
        "    west gone after {:.1} s (TTL {:?}) — no stale endpoint keeps receiving traffic",
        t.elapsed().as_secs_f64(),
        args.lease_ttl
    );
    table(&snap);

    step(
        4,
        "Shut central down gracefully: it revokes its lease, its entries vanish at once",
    );
    let t = Instant::now();
    let central = running.pop().context("central publisher missing")?;
    let _ = central.stop.send(());
    let _ = central.task.await;
    let snap = cache
        .wait_for(Duration::from_secs(5), |s| s.clusters.len() == 1)
        .await
        .map_err(|s| anyhow::anyhow!("central did not vanish: {s:?}"))?;
    println!("    central gone after {} ms", t.elapsed().as_millis());
    table(&snap);

    step(
        5,
        "Issue the federation's identities (SPIFFE IDs in X.509 URI SANs)",
    );
    let pki = dir.join("pki");
    let ca = federation::identity::CertificateAuthority::init(
        "demo.strait",
        Duration::from_secs(3600 * 24),
    )?;
    ca.write(&pki, false)?;
    for (cluster, _, _) in CLUSTERS {
        let id: federation::identity::SpiffeId =
            format!("spiffe://demo.strait/cluster/{cluster}/gateway").parse()?;
        let cert = ca.issue(&id, Duration::from_secs(3600))?;
        cert.write(pki.join(format!("{cluster}-gw")))?;
        println!("    {id}");
    }

    for r in running {
        let _ = r.stop.send(());
        let _ = r.task.await;
    }
    println!(
        "\nWhat comes next (open issues): the east-west QUIC gateways, the controlplane's merged xDS,\n\
         the sidecar proxy, and the multi-cluster lab whose guided tour cuts links and shows\n\
         sub-second failover. This demo grows with them."
    );
    Ok(())
}
