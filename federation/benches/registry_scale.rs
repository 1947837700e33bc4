//! Registry at scale: 100 clusters × 1,000 services × 10 endpoints (1M endpoints) published into a
//! real etcd, then:
//! - the time for a fresh watcher (registry cache) to load the full snapshot, against the floor of
//!   reading the same keys raw from etcd (no decoding);
//! - the memory of that snapshot per endpoint (live heap bytes, counted by the allocator);
//! - the time from one endpoint change to every one of 10 watchers seeing it (p50/p99), against a
//!   raw etcd watch receiving the same event.
//!
//! With `--tls`, the same run twice in one process, side by side: plaintext, then over TLS with
//! authentication as a federation deploys it — etcd with TLS and `--client-cert-auth`, auth on,
//! each cluster publishing with its own user (`strait-cluster-C`, a password: a token on every
//! request) under the roles of `strait registry roles apply`, the watchers as `strait-reader` —
//! and the ratios printed (goal ≤ 1.2×).
//!
//! Run: `cargo xtask bench registry [--tls]` (or `cargo bench -p federation --bench
//! registry_scale`). Scale down with `-- --clusters 10 --services 100`.
// Tests and benchmarks: an unwrap is an assertion (a failure with the value's message).
#![allow(clippy::unwrap_used, clippy::expect_used)]
// The counting allocator (below) implements `GlobalAlloc`, which is unsafe to implement.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use federation::model::{
    Cluster, ClusterState, Endpoint, Labels, Locality, Name, Protocol, Service, ServiceEndpoints,
    ServiceKey, ServicePort,
};
use federation::registry::codec::{cluster_state_kvs, encode_service_endpoints};
use federation::registry::publisher::Owned;
use federation::registry::{
    Backend, EtcdAuth, EtcdBackend, EtcdConnection, EtcdOptions, EtcdTls, LeasedPublisher, Op,
    PublisherConfig, ROOT, RegistryCache, RegistryKey, roles,
};
use testkit::etcd::{EtcdPki, EtcdServer};
use tokio::sync::watch;

/// Counts live heap bytes so the snapshot's memory can be measured exactly.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every method forwards to the system allocator with the caller's arguments unchanged
// and only adds bookkeeping; the benchmark needs a global allocator hook, which cannot be written
// without `unsafe`.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn cluster_state(c: usize, services: usize, endpoints: usize) -> ClusterState {
    let id = Name::parse("cluster", &format!("c{c:03}")).unwrap_or_else(|e| panic!("{e}"));
    let region = format!("region-{}", c % 10);
    let cluster = Cluster::new(id.clone(), &region, None, vec![]).unwrap_or_else(|e| panic!("{e}"));
    let mut labels = BTreeMap::new();
    labels.insert("version".to_string(), "v1".to_string());
    let labels = Labels::new(labels).unwrap_or_else(|e| panic!("{e}"));
    let zones: Vec<Locality> = (0..3)
        .map(|z| {
            Locality::new(&region, &format!("{region}-{}", (b'a' + z) as char), "")
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    let port = ServicePort::new("http", 8080, Protocol::Http).unwrap_or_else(|e| panic!("{e}"));
    let mut out = Vec::with_capacity(services);
    for s in 0..services {
        let key =
            ServiceKey::new("default", &format!("svc-{s:04}")).unwrap_or_else(|e| panic!("{e}"));
        let svc = Service::new(key, vec![port.clone()]).unwrap_or_else(|e| panic!("{e}"));
        let eps = (0..endpoints)
            .map(|e| {
                let n = s * endpoints + e;
                let ip: IpAddr = format!("10.{}.{}.{}", c % 250, n / 250 % 250, n % 250 + 1)
                    .parse()
                    .unwrap_or_else(|e| panic!("{e}"));
                Endpoint::new(
                    ip,
                    8080 + (n / 62500) as u16,
                    zones[e % 3].clone(),
                    id.clone(),
                )
                .unwrap_or_else(|e| panic!("{e}"))
                .with_labels(labels.clone())
            })
            .collect();
        out.push(ServiceEndpoints::new(id.clone(), svc, eps).unwrap_or_else(|e| panic!("{e}")));
    }
    ClusterState {
        cluster,
        services: out,
    }
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// How the benchmark reaches etcd.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Plain,
    /// TLS with client certificates required, authentication on, a user per cluster.
    Secure,
}

/// What one run measures.
struct Figures {
    publish: Duration,
    raw_read: Duration,
    load: Duration,
    per_endpoint: f64,
    p50: Duration,
    p99: Duration,
    r50: Duration,
    r99: Duration,
}

struct Sizes {
    clusters: usize,
    services: usize,
    endpoints: usize,
    watchers: usize,
    changes: usize,
}

/// The etcd of one run and how each party connects to it.
struct Store {
    _etcd: EtcdServer,
    endpoint: String,
    /// The CA and a client certificate every party presents (etcd requires one).
    tls: Option<(std::path::PathBuf, testkit::etcd::PkiFiles)>,
    password_file: std::path::PathBuf,
}

impl Store {
    fn connection(&self, user: &str) -> EtcdConnection {
        let Some((ca, client)) = &self.tls else {
            return EtcdConnection::plain([self.endpoint.clone()]);
        };
        EtcdConnection {
            endpoints: vec![self.endpoint.clone()],
            tls: Some(EtcdTls {
                ca: Some(ca.clone()),
                cert: Some(client.cert.clone()),
                key: Some(client.key.clone()),
            }),
            auth: Some(EtcdAuth {
                user: user.to_string(),
                password_file: self.password_file.clone(),
            }),
        }
    }

    fn backend(&self, user: &str, opts: EtcdOptions) -> Backend {
        Backend::Etcd(
            EtcdBackend::open(self.connection(user), opts).unwrap_or_else(|e| panic!("{e}")),
        )
    }
}

fn cluster_id(c: usize) -> Name {
    Name::parse("cluster", &format!("c{c:03}")).unwrap_or_else(|e| panic!("{e}"))
}

async fn start_store(dir: &std::path::Path, mode: Mode, sz: &Sizes) -> Store {
    let quota = vec!["--quota-backend-bytes".into(), (8u64 << 30).to_string()];
    let password_file = dir.join("password");
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(&password_file, "bench-password\n").unwrap_or_else(|e| panic!("{e}"));
    match mode {
        Mode::Plain => {
            let etcd = EtcdServer::start_with(&dir.join("etcd"), None, quota)
                .unwrap_or_else(|e| panic!("{e}"));
            Store {
                endpoint: etcd.endpoint(),
                _etcd: etcd,
                tls: None,
                password_file,
            }
        }
        Mode::Secure => {
            let pki = EtcdPki::new(&dir.join("pki"), "etcd-ca").unwrap_or_else(|e| panic!("{e}"));
            let mut tls = pki.server("server").unwrap_or_else(|e| panic!("{e}"));
            tls.client_ca = Some(pki.ca_file());
            let etcd = EtcdServer::start_with(&dir.join("etcd"), Some(tls), quota)
                .unwrap_or_else(|e| panic!("{e}"));
            let root = pki.client("root", "root").unwrap_or_else(|e| panic!("{e}"));
            let root_conn = EtcdConnection {
                endpoints: vec![etcd.endpoint()],
                tls: Some(EtcdTls {
                    ca: Some(pki.ca_file()),
                    cert: Some(root.cert),
                    key: Some(root.key),
                }),
                auth: None,
            };
            let root_backend = EtcdBackend::open(root_conn, EtcdOptions::default())
                .unwrap_or_else(|e| panic!("{e}"));
            let ids: Vec<Name> = (0..sz.clusters).map(cluster_id).collect();
            let plan = roles::plan(&ids, &[]);
            let passwords = plan
                .users
                .iter()
                .map(|u| (u.name.clone(), "bench-password".to_string()))
                .collect();
            let t = Instant::now();
            roles::apply(
                &root_backend,
                &plan,
                &roles::ApplyOptions {
                    passwords,
                    enable_auth_root_password: Some("bench-root".into()),
                    dry_run: false,
                },
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
            println!(
                "  roles and users of {} clusters applied, authentication on ({:.1} s)",
                sz.clusters,
                t.elapsed().as_secs_f64()
            );
            Store {
                endpoint: etcd.endpoint(),
                _etcd: etcd,
                tls: Some((
                    pki.ca_file(),
                    pki.client("bench-client", "bench-client")
                        .unwrap_or_else(|e| panic!("{e}")),
                )),
                password_file,
            }
        }
    }
}

async fn run(mode: Mode, sz: &Sizes) -> Figures {
    let (clusters, services, endpoints, watchers, changes) = (
        sz.clusters,
        sz.services,
        sz.endpoints,
        sz.watchers,
        sz.changes,
    );
    let total = clusters * services * endpoints;
    println!("{mode:?}:");
    let dir = std::env::temp_dir().join(format!(
        "strait-bench-registry-{}-{mode:?}",
        std::process::id()
    ));
    let store = start_store(&dir, mode, sz).await;
    let opts = EtcdOptions {
        request_timeout: Duration::from_secs(60),
        write_timeout: Duration::from_secs(10),
        ..EtcdOptions::default()
    };
    let reader = store.backend(roles::READER, opts);

    // Publish every cluster under its own lease (and, secure, its own user), all at once.
    let t = Instant::now();
    let mut stops = Vec::new();
    let mut statuses = Vec::new();
    let mut senders = Vec::new();
    let mut value_bytes = 0usize;
    let mut publishers = Vec::new();
    for c in 0..clusters {
        let state = cluster_state(c, services, endpoints);
        let kvs = cluster_state_kvs(&state);
        value_bytes += kvs.values().map(Vec::len).sum::<usize>();
        let (tx, rx) = watch::channel(kvs);
        let backend = store.backend(&roles::cluster_role(&state.cluster.id), opts);
        publishers.push(backend.clone());
        let (p, status) = LeasedPublisher::new(
            backend,
            format!("cluster c{c:03}"),
            Owned::cluster(&state.cluster.id),
            PublisherConfig {
                lease_ttl: Duration::from_secs(60),
                ..PublisherConfig::default()
            },
            rx,
        );
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(p.run(async move {
            let _ = stop_rx.await;
        }));
        stops.push(stop);
        statuses.push(status);
        senders.push(tx);
    }
    for s in &mut statuses {
        s.wait_for(|s| s.in_sync)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let publish = t.elapsed();
    println!(
        "  published {} keys ({:.1} MiB of values) in {:.2} s",
        clusters * (services + 1),
        value_bytes as f64 / (1 << 20) as f64,
        publish.as_secs_f64()
    );

    // Floor: read every key raw, no decoding.
    let t = Instant::now();
    let (_, raw) = reader
        .get_prefix(ROOT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let raw_read = t.elapsed();
    let raw_keys = raw.len();
    drop(raw);

    // A fresh watcher loads the full snapshot (a new connection, authenticated).
    let before = LIVE.load(Ordering::Relaxed);
    let t = Instant::now();
    let first = RegistryCache::spawn(store.backend(roles::READER, opts));
    let snap = first
        .wait_synced(Duration::from_secs(600))
        .await
        .unwrap_or_else(|s| panic!("no sync: {s:?}"));
    let load = t.elapsed();
    assert_eq!(snap.endpoint_count(), total, "snapshot incomplete");
    drop(snap);
    // Let the loader's temporary buffers go.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = LIVE.load(Ordering::Relaxed);
    let per_endpoint = (after - before) as f64 / total as f64;
    println!(
        "  fresh watcher full load: {:.2} s (raw etcd read of the same {raw_keys} keys: {:.2} s; ratio {:.2}×)",
        load.as_secs_f64(),
        raw_read.as_secs_f64(),
        load.as_secs_f64() / raw_read.as_secs_f64()
    );
    println!(
        "  snapshot memory: {:.1} MiB live heap, {per_endpoint:.0} bytes per endpoint",
        (after - before) as f64 / (1 << 20) as f64
    );

    // Ten watchers; change one endpoint at a time and time until every watcher sees it.
    let mut caches = vec![first];
    for _ in 1..watchers {
        let c = RegistryCache::spawn(store.backend(roles::READER, opts));
        c.wait_synced(Duration::from_secs(600))
            .await
            .unwrap_or_else(|s| panic!("no sync: {s:?}"));
        caches.push(c);
    }
    let mut raw_watch = reader
        .watch(ROOT, 0)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let target_cluster = cluster_state(clusters / 2, services.min(1), endpoints);
    let writer = publishers[clusters / 2].clone();
    let mut set = target_cluster.services[0].clone();
    let key = RegistryKey::Endpoints(set.cluster.clone(), set.service.key.clone()).encode();
    let cluster_id = set.cluster.clone();
    let service_key = set.service.key.clone();
    let mut latencies = Vec::new();
    let mut raw_latencies = Vec::new();
    for i in 0..changes {
        set.endpoints[0].weight = (i % 100 + 2) as u32;
        let want = set.endpoints[0].weight;
        let value = encode_service_endpoints(&set);
        let mut rxs: Vec<_> = caches.iter().map(|c| c.snapshots()).collect();
        let t = Instant::now();
        writer
            .commit(vec![Op::Put {
                key: key.clone(),
                value,
                lease: None,
            }])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let raw_wait = async {
            loop {
                let b = raw_watch.next().await.unwrap_or_else(|e| panic!("{e}"));
                if b.events.iter().any(|e| e.key() == key) {
                    return t.elapsed();
                }
            }
        };
        let waits = rxs.iter_mut().map(|rx| {
            let (cluster_id, service_key) = (cluster_id.clone(), service_key.clone());
            async move {
                rx.wait_for(|s| {
                    s.endpoints
                        .get(&(service_key.clone(), cluster_id.clone()))
                        .is_some_and(|v| v.endpoints[0].weight == want)
                })
                .await
                .map(|_| t.elapsed())
                .unwrap_or_else(|e| panic!("{e}"))
            }
        });
        let (raw_d, ds) = tokio::join!(raw_wait, futures::future::join_all(waits));
        raw_latencies.push(raw_d);
        latencies.extend(ds);
    }
    let (p50, p99) = (pct(&mut latencies, 0.5), pct(&mut latencies, 0.99));
    let (r50, r99) = (pct(&mut raw_latencies, 0.5), pct(&mut raw_latencies, 0.99));
    println!(
        "  change → all {watchers} watchers: p50 {:.2} ms, p99 {:.2} ms over {} samples (raw etcd watch: p50 {:.2} ms, p99 {:.2} ms; p99 ratio {:.2}×)",
        ms(p50),
        ms(p99),
        latencies.len(),
        ms(r50),
        ms(r99),
        ms(p99) / ms(r99).max(0.001)
    );
    drop(caches);
    for s in stops {
        let _ = s.send(());
    }
    drop(senders);
    // Let the publishers revoke their leases before etcd goes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
    Figures {
        publish,
        raw_read,
        load,
        per_endpoint,
        p50,
        p99,
        r50,
        r99,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let sz = Sizes {
        clusters: arg("--clusters", 100),
        services: arg("--services", 1000),
        endpoints: arg("--endpoints", 10),
        watchers: arg("--watchers", 10),
        changes: arg("--changes", 100),
    };
    let tls = std::env::args().any(|a| a == "--tls");
    let total = sz.clusters * sz.services * sz.endpoints;
    println!(
        "registry scale: {} clusters × {} services × {} endpoints = {total} endpoints",
        sz.clusters, sz.services, sz.endpoints
    );
    let plain = run(Mode::Plain, &sz).await;
    println!(
        "goals: full load ≤ 10 s: {}; ≤ 300 B/endpoint: {}; change p99 ≤ 50 ms: {}",
        met(plain.load <= Duration::from_secs(10)),
        met(plain.per_endpoint <= 300.0),
        met(plain.p99 <= Duration::from_millis(50)),
    );
    if !tls {
        return;
    }
    let secure = run(Mode::Secure, &sz).await;
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
    println!("\nTLS + authentication against plaintext, one run:");
    println!("| measure | plaintext | TLS + auth | ratio |");
    println!("| --- | --- | --- | --- |");
    let row = |name: &str, a: Duration, b: Duration, scale: f64, unit: &str| {
        println!(
            "| {name} | {:.2} {unit} | {:.2} {unit} | {:.2}× |",
            a.as_secs_f64() * scale,
            b.as_secs_f64() * scale,
            ratio(b, a)
        );
    };
    row(
        "publish (100 publishers)",
        plain.publish,
        secure.publish,
        1.0,
        "s",
    );
    row(
        "raw etcd read, every key",
        plain.raw_read,
        secure.raw_read,
        1.0,
        "s",
    );
    row("fresh watcher full load", plain.load, secure.load, 1.0, "s");
    row(
        "change → all watchers, p50",
        plain.p50,
        secure.p50,
        1000.0,
        "ms",
    );
    row(
        "change → all watchers, p99",
        plain.p99,
        secure.p99,
        1000.0,
        "ms",
    );
    row("raw etcd watch, p50", plain.r50, secure.r50, 1000.0, "ms");
    row("raw etcd watch, p99", plain.r99, secure.r99, 1000.0, "ms");
    println!(
        "| snapshot memory | {:.0} B/endpoint | {:.0} B/endpoint | |",
        plain.per_endpoint, secure.per_endpoint
    );
    println!(
        "goal ≤ 1.2× plaintext: full load {} ({:.2}×), change p50 {} ({:.2}×), change p99 {} ({:.2}×)",
        met(ratio(secure.load, plain.load) <= 1.2),
        ratio(secure.load, plain.load),
        met(ratio(secure.p50, plain.p50) <= 1.2),
        ratio(secure.p50, plain.p50),
        met(ratio(secure.p99, plain.p99) <= 1.2),
        ratio(secure.p99, plain.p99),
    );
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}
