//! Active health checks by the cluster's control plane, with a real etcd: endpoints from a
//! discovery file are probed (TCP, HTTP with expected statuses, the gRPC health protocol) and
//! their verdicts published as endpoint health in the registry, where `strait route explain`
//! (the same resolution and table) sees them. A killed endpoint is unhealthy within
//! interval × unhealthy threshold (and some publication time), and healthy again when it
//! returns; an endpoint the file marks draining is left as the file says.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::*;
use federation::model::{ClusterId, Health, Labels, Locality, ServiceKey};
use federation::registry::RegistryCache;
use federation::route::{Caller, Inputs, resolve};

const INTERVAL_MS: u64 = 300;
const UNHEALTHY: u64 = 3;
const HEALTHY: u64 = 2;

fn file(http: (SocketAddr, SocketAddr), wrong_status: SocketAddr, grpc: SocketAddr) -> String {
    let check = format!(
        "interval: {INTERVAL_MS}ms, timeout: 250ms, unhealthy_threshold: {UNHEALTHY}, healthy_threshold: {HEALTHY}"
    );
    format!(
        "cluster: east\nregion: us-east\n\
         health_check: {{protocol: tcp, {check}}}\n\
         services:\n\
         \x20 - name: echo\n    ports: [{{name: http, port: 8080, protocol: http}}]\n\
         \x20   health_check: {{protocol: http, path: /healthz, {check}}}\n    endpoints:\n\
         \x20     - {{address: 127.0.0.1, port: {}, zone: us-east-1a}}\n\
         \x20     - {{address: 127.0.0.1, port: {}, zone: us-east-1b}}\n\
         \x20     - {{address: 127.0.0.9, port: 9, zone: us-east-1c, health: draining}}\n\
         \x20 - name: picky\n    ports: [{{name: http, port: 8080, protocol: http}}]\n\
         \x20   health_check: {{protocol: http, expected_statuses: [204], {check}}}\n    endpoints:\n\
         \x20     - {{address: 127.0.0.1, port: {}, zone: us-east-1a}}\n\
         \x20 - name: rpc\n    ports: [{{name: grpc, port: 9090, protocol: grpc}}]\n\
         \x20   health_check: {{protocol: grpc, {check}}}\n    endpoints:\n\
         \x20     - {{address: 127.0.0.1, port: {}, zone: us-east-1a}}\n\
         \x20 - name: sick\n    ports: [{{name: grpc, port: 9090, protocol: grpc}}]\n\
         \x20   health_check: {{protocol: grpc, grpc_service: sick, {check}}}\n    endpoints:\n\
         \x20     - {{address: 127.0.0.1, port: {}, zone: us-east-1a}}\n\
         \x20 - name: plain\n    ports: [{{name: tcp, port: 7000, protocol: tcp}}]\n    endpoints:\n\
         \x20     - {{address: 127.0.0.1, port: {}, zone: us-east-1a}}\n",
        http.0.port(),
        http.1.port(),
        wrong_status.port(),
        grpc.port(),
        grpc.port(),
        http.0.port(),
    )
}

/// The health the registry holds for `service`'s endpoint `addr` now.
fn health_in(cache: &RegistryCache, service: &str, addr: SocketAddr) -> Option<Health> {
    let snap = cache.snapshot();
    let key = ServiceKey::new("default", service).unwrap();
    let set = snap
        .endpoints
        .get(&(key, ClusterId::parse("c", "east").unwrap()))?;
    set.endpoints
        .iter()
        .find(|e| e.socket_addr() == addr)
        .map(|e| e.health)
}

/// `strait route explain echo.default --from east/us-east/us-east-1a`, as the command prints it.
fn explain(cache: &RegistryCache) -> String {
    let snap = cache.snapshot();
    let key = ServiceKey::new("default", "echo").unwrap();
    let inputs = Inputs::from_snapshot(&snap, &key);
    let caller = Caller {
        cluster: ClusterId::parse("c", "east").unwrap(),
        locality: Locality::parse("l", "us-east/us-east-1a").unwrap(),
        labels: Labels::default(),
    };
    resolve(&caller, &inputs).to_string()
}

async fn wait_health(
    cache: &RegistryCache,
    service: &str,
    addr: SocketAddr,
    want: Health,
    within: Duration,
    what: &str,
) -> Duration {
    let t = Instant::now();
    wait_for(within, what, || async {
        match health_in(cache, service, addr) {
            Some(h) if h == want => Ok(()),
            other => Err(format!("{service} {addr} is {other:?}\n{}", explain(cache))),
        }
    })
    .await;
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_checks_its_endpoints_and_publishes_their_health() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let reg = Registry::start(d).await;
    let (a, _a) = http_backend("a").await;
    let (b, b_task) = http_backend("b").await;
    let (picky, _p) = http_backend("picky").await;
    let (grpc, _g) = grpc_server("rpc").await;
    let path = d.join("east.yaml");
    std::fs::write(&path, file((a, b), picky, grpc)).unwrap();
    let cp = start_cp_discovery(&reg, &path, "50ms").await;
    let cache = RegistryCache::spawn(reg.backend.clone());
    let settle = Duration::from_secs(10);

    // Passing checks: HTTP, gRPC SERVING, the file's default TCP check.
    for (service, addr) in [("echo", a), ("echo", b), ("rpc", grpc), ("plain", a)] {
        wait_health(
            &cache,
            service,
            addr,
            Health::Healthy,
            settle,
            "a passing endpoint healthy",
        )
        .await;
    }
    // Failing checks whose process is up: a status not expected, gRPC NOT_SERVING.
    wait_health(
        &cache,
        "picky",
        picky,
        Health::Unhealthy,
        settle,
        "an HTTP check expecting 204 to fail on 200",
    )
    .await;
    wait_health(
        &cache,
        "sick",
        grpc,
        Health::Unhealthy,
        settle,
        "a gRPC check of a NOT_SERVING service to fail",
    )
    .await;
    // The file's own word stays: a draining endpoint is not probed into health.
    let draining: SocketAddr = "127.0.0.9:9".parse().unwrap();
    assert_eq!(health_in(&cache, "echo", draining), Some(Health::Draining));
    assert!(
        explain(&cache).contains("us-east/us-east-1b"),
        "{}",
        explain(&cache)
    );

    // Kill b: unhealthy in the registry and out of `route explain` within interval × threshold
    // (plus the time to notice a refused connection and publish).
    b_task.abort();
    let _ = b_task.await;
    let bound = Duration::from_millis(INTERVAL_MS * UNHEALTHY);
    let took = wait_health(
        &cache,
        "echo",
        b,
        Health::Unhealthy,
        bound + Duration::from_secs(3),
        "the killed endpoint to be unhealthy",
    )
    .await;
    let table = explain(&cache);
    let row = table
        .lines()
        .find(|l| l.contains("us-east/us-east-1b"))
        .unwrap_or_else(|| panic!("b's locality in the table:\n{table}"));
    assert!(
        row.starts_with('-') && row.contains("0/1") && row.contains("no healthy endpoint"),
        "route explain leaves b's locality out:\n{table}"
    );
    let metrics = admin_get(cp.admin_addr, "/metrics").await.unwrap();
    assert!(
        metric(
            &metrics,
            "strait_health_check_endpoints{state=\"unhealthy\"}"
        )
        .is_some_and(|v| v >= 3.0),
        "{metrics}"
    );
    let debug = admin_get(cp.admin_addr, "/debug/health").await.unwrap();
    assert!(
        debug.contains(&b.to_string()) && debug.contains("connect"),
        "/debug/health says why: {debug}"
    );

    // b comes back on its address: healthy again after `healthy_threshold` passes.
    let (_b, _b_task) = http_backend_at(b, "b").await;
    let back = wait_health(
        &cache,
        "echo",
        b,
        Health::Healthy,
        Duration::from_millis(INTERVAL_MS * HEALTHY) + Duration::from_secs(3),
        "the returned endpoint to be healthy",
    )
    .await;
    assert!(
        !explain(&cache)
            .lines()
            .any(|l| l.starts_with('-') && l.contains("us-east-1b")),
        "{}",
        explain(&cache)
    );
    eprintln!(
        "killed endpoint unhealthy in the registry after {took:?} (interval × threshold {bound:?}); healthy {back:?} after it returned"
    );
    cp.shutdown().await;
}
