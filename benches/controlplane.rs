//! Control-plane convergence and memory, against a real etcd.
//!
//! 1. **Convergence**: 3 clusters (east and central in us-east, west in us-west), 1,000
//!    services, 10,000 endpoints, one `strait controlplane` per cluster (in this process) with
//!    100 light ADS clients each. An endpoint change is written to cluster east's registry
//!    entries; measured: the time until every client of cluster west holds the new EDS
//!    (p50/p99 over `--changes` changes), side by side with the floor under it: the time until a
//!    plain etcd watcher sees the same write.
//! 2. **Memory at scale**: one `strait controlplane` process with 1,000,000 endpoints in the
//!    registry (1,000 services × 1,000) and `--scale-clients` clients: its peak RSS and CPU
//!    seconds until every client holds the full EDS.
//!
//! Run: `cargo xtask bench controlplane` (= `cargo bench --bench controlplane`). Options:
//! `--changes N` (default 100), `--clients N` (per control plane, default 100), `--million 0`
//! to skip part 2, `--convergence 0` to skip part 1; for part 2 `--scale-clients N` (default 2)
//! and `--scale-per N` (endpoints per service and cluster, default 333).
// Tests and benchmarks: an unwrap is an assertion (a failure with the value's message).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use controlplane::config::ControlPlaneConfig;
use controlplane::server::ControlPlane;
use federation::model::{Cluster, ClusterState, Locality};
use federation::registry::codec::{cluster_state_kvs, encode_service_endpoints};
use federation::registry::etcd::{EtcdBackend, EtcdOptions};
use federation::registry::{Backend, Op, RegistryKey};
use testkit::ads::{LightClient, node};
use testkit::etcd::EtcdServer;

mod common;

use common::registry::{commit_all, endpoints, id, service};
use common::{arg, percentile};

const CLUSTERS: [(&str, &str); 3] = [
    ("east", "us-east"),
    ("central", "us-east"),
    ("west", "us-west"),
];

async fn start_etcd(dir: &std::path::Path) -> (EtcdServer, Backend) {
    let etcd = EtcdServer::start(dir).expect("etcd");
    let backend = Backend::Etcd(
        EtcdBackend::connect(&[etcd.endpoint()], EtcdOptions::default())
            .await
            .expect("etcd client"),
    );
    (etcd, backend)
}

/// Write the three clusters with 1,000 services each: `first` endpoints per service in east,
/// `rest` in central and west.
async fn populate(backend: &Backend, first: usize, rest: usize) {
    for (ci, (c, region)) in CLUSTERS.iter().enumerate() {
        let per = if ci == 0 { first } else { rest };
        let state = ClusterState {
            cluster: Cluster::new(id(c), region, None, vec![]).expect("valid"),
            services: (0..1000)
                .map(|i| endpoints(ci, c, region, i, per, 9000))
                .collect(),
        };
        commit_all(backend, cluster_state_kvs(&state)).await;
    }
}

fn config(cluster: &str, region: &str, etcd: &str) -> ControlPlaneConfig {
    ControlPlaneConfig::parse(
        "bench.yaml",
        &format!(
            "cluster: {cluster}\nregion: {region}\nregistry: {{etcd: [\"{etcd}\"]}}\n\
             xds: {{listen: \"127.0.0.1:0\"}}\nadmin: {{listen: \"127.0.0.1:0\"}}\n\
             gateway: {{ingress: \"127.0.0.1:15008\"}}\n"
        ),
    )
    .expect("bench config")
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// The first endpoint port of `svc-0`'s load assignment, as a client holds it.
fn port_of(c: &LightClient, name: &str) -> Option<u32> {
    use envoy_types::pb::envoy::config::core::v3::{address, socket_address};
    use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
    let s = c.state.borrow();
    let cla = s.assignments.get(name)?;
    cla.endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .find_map(|e| {
            let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                return None;
            };
            match ep.address.as_ref()?.address.as_ref()? {
                address::Address::SocketAddress(sa) if sa.address.starts_with("10.0.") => {
                    match sa.port_specifier {
                        Some(socket_address::PortSpecifier::PortValue(p)) if p != 8080 => Some(p),
                        _ => None,
                    }
                }
                // East is on another network: addressed to the tunnel as `east/IP:PORT`.
                address::Address::EnvoyInternalAddress(ia)
                    if ia.endpoint_id.starts_with("east/") =>
                {
                    let p: u32 = ia.endpoint_id.rsplit_once(':')?.1.parse().ok()?;
                    (p != 8080).then_some(p)
                }
                _ => None,
            }
        })
}

async fn convergence(dir: &std::path::Path) {
    let changes = arg("--changes", 100);
    let per_cp = arg("--clients", 100);
    let (etcd, backend) = start_etcd(&dir.join("etcd-conv")).await;
    // 1,000 services in every cluster; 4 + 3 + 3 endpoints each: 10,000 endpoints.
    populate(&backend, 4, 3).await;
    let mut cps = Vec::new();
    for (c, region) in CLUSTERS {
        cps.push(
            ControlPlane::start_with(config(c, region, &etcd.endpoint()), backend.clone())
                .await
                .expect("controlplane"),
        );
    }
    let mut clients: Vec<Vec<LightClient>> = Vec::new();
    for (k, (c, region)) in CLUSTERS.iter().enumerate() {
        let mut v = Vec::new();
        for i in 0..per_cp {
            let zone = ["a", "b"][i % 2];
            v.push(
                LightClient::connect_delta(
                    cps[k].xds_addr,
                    node(&format!("{c}-{i}"), c, region, zone, true),
                )
                .await
                .expect("client connects"),
            );
        }
        clients.push(v);
    }
    let west = &clients[2];
    let target = "svc-0.default:8080";
    let t = Instant::now();
    for c in west {
        let mut rx = c.state.clone();
        tokio::time::timeout(
            Duration::from_secs(120),
            rx.wait_for(|s| s.assignments.len() == 1000),
        )
        .await
        .expect("initial sync within 120 s")
        .expect("client alive");
    }
    if std::env::var_os("STRAIT_BENCH_TRACE").is_some() {
        let (rss, hwm, _) = proc_stat(std::process::id());
        eprintln!(
            "trace: after the initial sync RSS {} MiB, peak {} MiB",
            rss / 1024,
            hwm / 1024
        );
    }
    println!(
        "initial sync: {} clients per control plane hold 1,000 EDS resources ({} total endpoints) after {}",
        per_cp,
        10_000,
        ms(t.elapsed())
    );

    if std::env::var_os("STRAIT_BENCH_TRACE").is_some() {
        use controlplane::view::{ViewKey, ViewSettings, build, build_from};
        let snap = cps[2].cache().snapshot();
        let settings = ViewSettings {
            cluster: id("west"),
            region: "us-west".into(),
            gateway: true,
        };
        let key = ViewKey {
            kind: controlplane::resources::ClientKind::Envoy,
            locality: Locality::parse("l", "us-west/a").expect("valid"),
            labels: Default::default(),
            outbound: None,
            transparent: None,
            tunnel: true,
            mtls: true,
        };
        let t = Instant::now();
        let full = build(&snap, &key, &settings);
        let t_full = t.elapsed();
        let mut next = (*snap).clone();
        next.revision += 1;
        let t = Instant::now();
        let _inc = build_from(&next, &key, &settings, Some((&snap, &full)));
        eprintln!(
            "trace: a full view build {t_full:?}, an incremental one without changes {:?}",
            t.elapsed()
        );
    }

    // The floor: a plain etcd watcher of the same key.
    let key = RegistryKey::Endpoints(id("east"), service(0).key.clone()).encode();
    let mut watcher = backend.watch(&key, 0).await.expect("etcd watch");
    assert_eq!(
        port_of(&west[0], target),
        Some(9000),
        "west's view of svc-0: {:?}",
        west[0].state.borrow().assignments.get(target)
    );
    let mut cp_times = Vec::new();
    let mut etcd_times = Vec::new();
    for n in 0..changes {
        let port = 9001 + n as u16;
        let value = encode_service_endpoints(&endpoints(0, "east", "us-east", 0, 4, port));
        let pushes = |cp: &ControlPlane| {
            cp.xds.metrics().pushes[1].load(std::sync::atomic::Ordering::Relaxed)
        };
        let p0 = pushes(&cps[2]);
        let vb0 = {
            let vb = &cps[2].xds.metrics().view_build;
            (vb.count(), vb.sum())
        };
        let t0 = Instant::now();
        backend
            .commit(vec![Op::Put {
                key: key.clone(),
                value,
                lease: None,
            }])
            .await
            .expect("commit");
        loop {
            let b = watcher.next().await.expect("watch event");
            if !b.events.is_empty() {
                break;
            }
        }
        etcd_times.push(t0.elapsed());
        if std::env::var_os("STRAIT_BENCH_TRACE").is_some() {
            let east_port = |snap: &federation::registry::Snapshot| {
                snap.endpoints
                    .get(&(service(0).key.clone(), id("east")))
                    .map(|se| se.endpoints[0].port)
            };
            while east_port(&cps[2].cache().snapshot()) != Some(port) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let t_cache = t0.elapsed();
            while cps[2].xds.generation().and_then(|g| east_port(&g.snapshot)) != Some(port) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let t_gen = t0.elapsed();
            while pushes(&cps[2]) < p0 + west.len() as u64 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let vb = &cps[2].xds.metrics().view_build;
            let builds = vb.count() - vb0.0;
            eprintln!(
                "trace: etcd {:?} cache {t_cache:?} generation {t_gen:?} pushed {:?}; {builds} view builds, {:?} each",
                etcd_times.last(),
                t0.elapsed(),
                (vb.sum() - vb0.1) / builds.max(1) as u32,
            );
        }
        // Every west client holds the new EDS.
        for c in west {
            let mut rx = c.state.clone();
            let want = u32::from(port);
            tokio::time::timeout(Duration::from_secs(60), async {
                loop {
                    if port_of(c, target) == Some(want) {
                        return;
                    }
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
            })
            .await
            .unwrap_or_else(|_| {
                let east_port = |snap: &federation::registry::Snapshot| {
                    snap.endpoints
                        .get(&(service(0).key.clone(), id("east")))
                        .map(|se| se.endpoints[0].port)
                };
                let g = cps[2].xds.generation();
                let m = cps[2].xds.metrics().render();
                let m: Vec<&str> = m.lines().filter(|l| !l.starts_with('#') && (l.contains("EDS") || l.contains("stale") || l.contains("generations"))).collect();
                panic!(
                    "client did not converge within 60 s: {m:?} client port {:?}; cache {:?}; generation {:?} {:?}",
                    port_of(c, target),
                    east_port(&cps[2].cache().snapshot()),
                    g.as_ref().map(|g| g.id),
                    g.as_ref().and_then(|g| east_port(&g.snapshot)),
                )
            });
        }
        cp_times.push(t0.elapsed());
    }
    if std::env::var_os("STRAIT_BENCH_TRACE").is_some() {
        let (rss, hwm, _) = proc_stat(std::process::id());
        eprintln!(
            "trace: bench process (3 control planes, {} clients) RSS {} MiB, peak {} MiB",
            3 * per_cp,
            rss / 1024,
            hwm / 1024
        );
    }
    cp_times.sort();
    etcd_times.sort();
    let (p50, p99) = (percentile(&cp_times, 0.5), percentile(&cp_times, 0.99));
    let (e50, e99) = (percentile(&etcd_times, 0.5), percentile(&etcd_times, 0.99));
    println!(
        "\n## Convergence (3 clusters, 1,000 services, 10,000 endpoints, {per_cp} clients per control plane, {changes} changes)\n"
    );
    println!("| | p50 | p99 | max |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| change in east → all {} west clients hold the new EDS | {} | {} | {} |",
        west.len(),
        ms(p50),
        ms(p99),
        ms(*cp_times.last().unwrap_or(&Duration::ZERO))
    );
    println!(
        "| change in east → a plain etcd watcher sees it (floor) | {} | {} | {} |",
        ms(e50),
        ms(e99),
        ms(*etcd_times.last().unwrap_or(&Duration::ZERO))
    );
    println!(
        "\nratio to the floor: p50 {:.1}×, p99 {:.1}×; goal p99 ≤ 100 ms: {}",
        p50.as_secs_f64() / e50.as_secs_f64().max(1e-9),
        p99.as_secs_f64() / e99.as_secs_f64().max(1e-9),
        if p99 <= Duration::from_millis(100) {
            "met"
        } else {
            "NOT met"
        }
    );
    drop(clients);
    for cp in cps {
        cp.shutdown().await;
    }
}

fn proc_stat(pid: u32) -> (u64, u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 (11 and 12 after the command).
    let cpu = (ticks(11) + ticks(12)) as f64 / 100.0;
    (kib("VmRSS:"), kib("VmHWM:"), cpu)
}

async fn million(dir: &std::path::Path) {
    let clients_n = arg("--scale-clients", 2);
    let per = arg("--scale-per", 333);
    let total = 1000 * (3 * per + 1);
    let (etcd, backend) = start_etcd(&dir.join("etcd-1m")).await;
    let t = Instant::now();
    // 1,000 services × 334/333/333 endpoints per cluster ≈ 1,000,000 endpoints.
    populate(&backend, per + 1, per).await;
    println!("\nwrote {total} endpoints to etcd in {}", ms(t.elapsed()));
    let cfg = dir.join("cp-1m.yaml");
    std::fs::write(
        &cfg,
        format!(
            "cluster: west\nregion: us-west\nregistry: {{etcd: [\"{}\"]}}\nxds: {{listen: \"127.0.0.1:0\"}}\nadmin: {{listen: \"127.0.0.1:0\"}}\ngateway: {{ingress: \"127.0.0.1:15008\"}}\n",
            etcd.endpoint()
        ),
    )
    .expect("write config");
    let xds_port = testkit::etcd::free_port().expect("port");
    let text = std::fs::read_to_string(&cfg).expect("read").replace(
        "127.0.0.1:0\"}\nadmin",
        &format!("127.0.0.1:{xds_port}\"}}\nadmin"),
    );
    std::fs::write(&cfg, text).expect("write config");
    let t = Instant::now();
    // STRAIT_BENCH_WRAP="heaptrack -o FILE" runs the control plane under a profiler.
    let wrap: Vec<String> = std::env::var("STRAIT_BENCH_WRAP")
        .map(|w| w.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    let mut cmd = match wrap.split_first() {
        Some((first, rest)) => {
            let mut c = std::process::Command::new(first);
            c.args(rest).arg(env!("CARGO_BIN_EXE_strait"));
            c
        }
        None => std::process::Command::new(env!("CARGO_BIN_EXE_strait")),
    };
    let child = cmd
        .args(["--log", "warn", "controlplane", "--config"])
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("strait controlplane starts");
    let pid = child.id();
    // Stop the control plane whatever happens below.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = Kill(child);
    let xds: std::net::SocketAddr = format!("127.0.0.1:{xds_port}").parse().expect("addr");
    let mut clients = Vec::new();
    for i in 0..clients_n {
        let c = loop {
            match LightClient::connect_delta(
                xds,
                node(&format!("w{i}"), "west", "us-west", "a", true),
            )
            .await
            {
                Ok(c) => break c,
                Err(_) if t.elapsed() < Duration::from_secs(120) => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e) => panic!("{e}"),
            }
        };
        clients.push(c);
    }
    for c in &clients {
        let mut rx = c.state.clone();
        tokio::time::timeout(
            Duration::from_secs(600),
            rx.wait_for(|s| s.assignments.len() == 1000),
        )
        .await
        .expect("full EDS within 600 s")
        .expect("client alive");
    }
    let took = t.elapsed();
    let (rss, hwm, cpu) = proc_stat(pid);
    println!(
        "\n## Memory at scale ({total} endpoints, 1,000 services, 3 clusters; {clients_n} clients)\n"
    );
    println!("| | value |\n| --- | --- |");
    println!("| start → every client holds the full EDS | {} |", ms(took));
    println!("| controlplane RSS now | {:.0} MiB |", rss as f64 / 1024.0);
    println!("| controlplane peak RSS | {:.0} MiB |", hwm as f64 / 1024.0);
    println!("| controlplane CPU (user + system) | {cpu:.1} s |");
    println!(
        "\npeak RSS / 1 GB goal: {:.2}× ({})",
        hwm as f64 * 1024.0 / 1e9,
        if hwm as f64 * 1024.0 <= 1e9 {
            "met"
        } else {
            "NOT met"
        }
    );
    drop(clients);
    drop(child);
}

fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    rt.block_on(async {
        if arg("--convergence", 1) != 0 {
            convergence(dir.path()).await;
        }
        if arg("--million", 1) != 0 {
            million(dir.path()).await;
        }
    });
}
