//! Registry at scale: 100 clusters × 1,000 services × 10 endpoints (1M endpoints) published into a
//! real etcd, then:
//! - the time for a fresh watcher (registry cache) to load the full snapshot, against the floor of
//!   reading the same keys raw from etcd (no decoding);
//! - the memory of that snapshot per endpoint (live heap bytes, counted by the allocator);
//! - the time from one endpoint change to every one of 10 watchers seeing it (p50/p99), against a
//!   raw etcd watch receiving the same event.
//!
//! Run: `cargo xtask bench registry` (or `cargo bench -p federation --bench registry_scale`).
//! Scale down with `-- --clusters 10 --services 100`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use federation::etcd_server::EtcdServer;
use federation::model::{
    Cluster, ClusterState, Endpoint, Labels, Locality, Name, Protocol, Service, ServiceEndpoints,
    ServiceKey, ServicePort,
};
use federation::registry::codec::{cluster_state_kvs, encode_service_endpoints};
use federation::registry::publisher::Owned;
use federation::registry::{
    Backend, EtcdBackend, EtcdOptions, LeasedPublisher, Op, PublisherConfig, ROOT, RegistryCache,
    RegistryKey,
};
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

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let clusters = arg("--clusters", 100);
    let services = arg("--services", 1000);
    let endpoints = arg("--endpoints", 10);
    let watchers = arg("--watchers", 10);
    let changes = arg("--changes", 100);
    let total = clusters * services * endpoints;
    println!(
        "registry scale: {clusters} clusters × {services} services × {endpoints} endpoints = {total} endpoints"
    );

    let dir = std::env::temp_dir().join(format!("strait-bench-registry-{}", std::process::id()));
    let etcd = EtcdServer::start_on(
        &dir.join("etcd"),
        std::net::SocketAddr::from((
            [127, 0, 0, 1],
            federation::etcd_server::free_port().unwrap_or(23790),
        )),
        std::net::SocketAddr::from((
            [127, 0, 0, 1],
            federation::etcd_server::free_port().unwrap_or(23800),
        )),
        vec!["--quota-backend-bytes".into(), (8u64 << 30).to_string()],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let opts = EtcdOptions {
        request_timeout: Duration::from_secs(60),
        write_timeout: Duration::from_secs(1),
        ..EtcdOptions::default()
    };
    let backend = Backend::Etcd(
        EtcdBackend::connect_checked(&[etcd.endpoint()], opts)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );

    // Publish every cluster under its own lease, all at once.
    let t = Instant::now();
    let mut stops = Vec::new();
    let mut statuses = Vec::new();
    let mut senders = Vec::new();
    let mut value_bytes = 0usize;
    for c in 0..clusters {
        let state = cluster_state(c, services, endpoints);
        let kvs = cluster_state_kvs(&state);
        value_bytes += kvs.values().map(Vec::len).sum::<usize>();
        let (tx, rx) = watch::channel(kvs);
        let (p, status) = LeasedPublisher::new(
            backend.clone(),
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
        "published {} keys ({:.1} MiB of values) in {:.2} s",
        clusters * (services + 1),
        value_bytes as f64 / (1 << 20) as f64,
        publish.as_secs_f64()
    );

    // Floor: read every key raw, no decoding.
    let t = Instant::now();
    let (_, raw) = backend
        .get_prefix(ROOT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let raw_read = t.elapsed();
    let raw_keys = raw.len();
    drop(raw);

    // A fresh watcher loads the full snapshot.
    let before = LIVE.load(Ordering::Relaxed);
    let t = Instant::now();
    let first = RegistryCache::spawn(backend.clone());
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
        "fresh watcher full load: {:.2} s (raw etcd read of the same {raw_keys} keys: {:.2} s; ratio {:.2}×)",
        load.as_secs_f64(),
        raw_read.as_secs_f64(),
        load.as_secs_f64() / raw_read.as_secs_f64()
    );
    println!(
        "snapshot memory: {:.1} MiB live heap, {per_endpoint:.0} bytes per endpoint",
        (after - before) as f64 / (1 << 20) as f64
    );

    // Ten watchers; change one endpoint at a time and time until every watcher sees it.
    let mut caches = vec![first];
    for _ in 1..watchers {
        let c = RegistryCache::spawn(backend.clone());
        c.wait_synced(Duration::from_secs(600))
            .await
            .unwrap_or_else(|s| panic!("no sync: {s:?}"));
        caches.push(c);
    }
    let mut raw_watch = backend
        .watch(ROOT, 0)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let target_cluster = cluster_state(clusters / 2, services.min(1), endpoints);
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
        backend
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
        "change → all {watchers} watchers: p50 {:.2} ms, p99 {:.2} ms over {} samples (raw etcd watch: p50 {:.2} ms, p99 {:.2} ms; p99 ratio {:.2}×)",
        ms(p50),
        ms(p99),
        latencies.len(),
        ms(r50),
        ms(r99),
        ms(p99) / ms(r99).max(0.001)
    );
    println!(
        "goals: full load ≤ 10 s: {}; ≤ 300 B/endpoint: {}; change p99 ≤ 50 ms: {}",
        if load <= Duration::from_secs(10) {
            "met"
        } else {
            "MISSED"
        },
        if per_endpoint <= 300.0 {
            "met"
        } else {
            "MISSED"
        },
        if p99 <= Duration::from_millis(50) {
            "met"
        } else {
            "MISSED"
        },
    );
    drop(caches);
    for s in stops {
        let _ = s.send(());
    }
    drop(senders);
    drop(etcd);
    let _ = std::fs::remove_dir_all(&dir);
}
