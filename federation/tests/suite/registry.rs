//! The registry's behaviour, run against both backends: a real etcd server (Debian's
//! `etcd-server`, started by the test) and the embedded registry.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use federation::model::{
    Cluster, ClusterState, Endpoint, Health, LinkHealth, LinkState, Locality, Name, Protocol,
    Service, ServiceEndpoints, ServiceKey, ServicePort,
};
use federation::registry::codec::{cluster_state_kvs, encode_link};
use federation::registry::publisher::Owned;
use federation::registry::{
    Backend, CacheStatus, EmbeddedRegistry, EtcdBackend, EtcdOptions, LeasedPublisher, Op,
    PublisherConfig, PublisherStatus, RegistryCache, RegistryKey, RegistryValue, Snapshot,
};
use testkit::etcd::EtcdServer;
use testkit::relay::TcpRelay;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(20);

/// TLS, authentication and roles (a real etcd with TLS and auth on).
mod secure;

enum Env {
    Etcd {
        server: Box<EtcdServer>,
        _dir: tempfile::TempDir,
    },
    Embedded(EmbeddedRegistry),
}

/// A client that can be partitioned from the store.
enum Cut {
    Relay(TcpRelay),
    Connection(EmbeddedRegistry),
}

impl Cut {
    fn cut(&self) {
        match self {
            Cut::Relay(r) => r.cut(),
            Cut::Connection(c) => c.set_available(false),
        }
    }
    fn heal(&self) {
        match self {
            Cut::Relay(r) => r.heal(),
            Cut::Connection(c) => c.set_available(true),
        }
    }
}

fn etcd_options() -> EtcdOptions {
    EtcdOptions {
        connect_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_secs(2),
        write_timeout: Duration::from_secs(1),
        keep_alive_interval: Duration::from_millis(500),
        keep_alive_timeout: Duration::from_secs(1),
    }
}

impl Env {
    fn etcd() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let server = EtcdServer::start(&dir.path().join("etcd")).unwrap();
        Env::Etcd {
            server: Box::new(server),
            _dir: dir,
        }
    }

    fn embedded() -> Self {
        Env::Embedded(EmbeddedRegistry::new())
    }

    async fn backend(&self) -> Backend {
        match self {
            Env::Etcd { server, .. } => Backend::Etcd(
                EtcdBackend::connect(&[server.endpoint()], etcd_options())
                    .await
                    .unwrap(),
            ),
            Env::Embedded(e) => Backend::Embedded(e.clone()),
        }
    }

    async fn partitionable(&self) -> (Backend, Cut) {
        match self {
            Env::Etcd { server, .. } => {
                let relay = TcpRelay::start(server.client_addr()).await.unwrap();
                let b = EtcdBackend::connect(&[format!("http://{}", relay.addr())], etcd_options())
                    .await
                    .unwrap();
                (Backend::Etcd(b), Cut::Relay(relay))
            }
            Env::Embedded(e) => {
                let c = e.connection();
                (Backend::Embedded(c.clone()), Cut::Connection(c))
            }
        }
    }

    /// Break every watch stream: etcd is restarted on the same data directory; the embedded
    /// registry drops its streams.
    fn break_watches(&mut self) {
        match self {
            Env::Etcd { server, .. } => {
                tokio::task::block_in_place(|| server.restart()).unwrap();
            }
            Env::Embedded(e) => e.disconnect_watchers(),
        }
    }
}

/// Runs a test body against both backends.
macro_rules! both {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn etcd() {
                super::$name(super::Env::etcd()).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$name(super::Env::embedded()).await;
            }
        }
    };
}

fn name(s: &str) -> Name {
    Name::parse("test", s).unwrap()
}

/// A cluster with `services` services of `endpoints` endpoints each; `variant` shifts ports so
/// that two states of the same cluster differ.
fn cluster_state(
    cluster: &str,
    region: &str,
    services: usize,
    endpoints: usize,
    variant: u16,
) -> ClusterState {
    let id = name(cluster);
    let c = Cluster::new(id.clone(), region, None, vec![]).unwrap();
    let mut out = Vec::new();
    for s in 0..services {
        let key = ServiceKey::new("default", &format!("svc-{s}")).unwrap();
        let svc = Service::new(
            key,
            vec![ServicePort::new("http", 80, Protocol::Http).unwrap()],
        )
        .unwrap();
        let eps = (0..endpoints)
            .map(|e| {
                let ip: IpAddr = format!("10.{}.{}.{}", s % 250, e / 250, e % 250)
                    .parse()
                    .unwrap();
                let zone = if e % 2 == 0 { "a" } else { "b" };
                Endpoint::new(
                    ip,
                    8000 + variant,
                    Locality::new(region, zone, "").unwrap(),
                    id.clone(),
                )
                .unwrap()
            })
            .collect();
        out.push(ServiceEndpoints::new(id.clone(), svc, eps).unwrap());
    }
    ClusterState {
        cluster: c,
        services: out,
    }
}

struct Pub {
    desired: watch::Sender<BTreeMap<String, Vec<u8>>>,
    status: watch::Receiver<PublisherStatus>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Pub {
    fn spawn(backend: Backend, state: &ClusterState, ttl: Duration) -> Self {
        Self::spawn_with(backend, state, ttl, false)
    }

    fn spawn_with(
        backend: Backend,
        state: &ClusterState,
        ttl: Duration,
        withdraw_on_exit: bool,
    ) -> Self {
        Self::spawn_config(
            backend,
            state,
            PublisherConfig {
                lease_ttl: ttl,
                withdraw_on_exit,
                ..PublisherConfig::default()
            },
        )
    }

    fn spawn_config(backend: Backend, state: &ClusterState, config: PublisherConfig) -> Self {
        let (desired, rx) = watch::channel(cluster_state_kvs(state));
        let (p, status) = LeasedPublisher::new(
            backend,
            format!("cluster {}", state.cluster.id),
            Owned::cluster(&state.cluster.id),
            config,
            rx,
        );
        let (stop, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(p.run(async move {
            let _ = stop_rx.await;
        }));
        Pub {
            desired,
            status,
            stop: Some(stop),
            task,
        }
    }

    async fn wait_in_sync(&mut self) -> PublisherStatus {
        tokio::time::timeout(WAIT, self.status.wait_for(|s| s.in_sync))
            .await
            .expect("publisher did not get in sync")
            .unwrap()
            .clone()
    }

    /// Publish a new state and wait until the store holds exactly it.
    async fn set(&mut self, backend: &Backend, state: &ClusterState) {
        let want = cluster_state_kvs(state);
        self.desired.send_replace(want.clone());
        let id = &state.cluster.id;
        let deadline = Instant::now() + WAIT;
        loop {
            let mut have = BTreeMap::new();
            if let Ok((_, kvs)) = backend.get_prefix(&RegistryKey::endpoints_prefix(id)).await {
                have.extend(kvs.into_iter().map(|kv| (kv.key, kv.value)));
            }
            if let Ok((_, kvs)) = backend.get_prefix(&RegistryKey::cluster(id)).await {
                have.extend(
                    kvs.into_iter()
                        .filter(|kv| kv.key == RegistryKey::cluster(id))
                        .map(|kv| (kv.key, kv.value)),
                );
            }
            if have == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the store never held the published state of {id}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(WAIT, self.task)
            .await
            .unwrap()
            .unwrap();
    }

    /// Die without revoking the lease (as a SIGKILLed process would).
    fn kill(self) {
        self.task.abort();
    }
}

fn cluster_endpoints(s: &Snapshot, cluster: &str) -> usize {
    s.endpoints
        .iter()
        .filter(|((_, c), _)| c.as_str() == cluster)
        .map(|(_, v)| v.endpoints.len())
        .sum()
}

// ---------------------------------------------------------------------------------------------

async fn three_clusters_converge(env: Env) {
    let caches: Vec<RegistryCache> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(RegistryCache::spawn(env.backend().await));
        }
        v
    };
    let states = [
        cluster_state("east", "us-east", 20, 5, 0),
        cluster_state("central", "us-east", 15, 4, 0),
        cluster_state("west", "us-west", 10, 3, 0),
    ];
    let mut pubs = Vec::new();
    for s in &states {
        pubs.push(Pub::spawn(env.backend().await, s, Duration::from_secs(10)));
    }
    for p in &mut pubs {
        p.wait_in_sync().await;
    }
    let expect = |s: &Snapshot| {
        s.clusters.len() == 3
            && cluster_endpoints(s, "east") == 100
            && cluster_endpoints(s, "central") == 60
            && cluster_endpoints(s, "west") == 30
    };
    let mut snaps = Vec::new();
    for c in &caches {
        snaps.push(
            c.wait_for(WAIT, expect)
                .await
                .unwrap_or_else(|s| panic!("cache did not converge: {s:?}")),
        );
    }
    // Now change concurrently: east drops 5 services, west changes every endpoint.
    let east2 = cluster_state("east", "us-east", 15, 5, 0);
    let west2 = cluster_state("west", "us-west", 10, 3, 7);
    let b = env.backend().await;
    let (p0, rest) = pubs.split_at_mut(1);
    tokio::join!(p0[0].set(&b, &east2), rest[1].set(&b, &west2));
    let target = b.current_revision().await.unwrap();
    let mut finals = Vec::new();
    for c in &caches {
        finals.push(
            c.wait_for(WAIT, |s| {
                s.revision >= target && cluster_endpoints(s, "east") == 75
            })
            .await
            .unwrap_or_else(|s| panic!("cache did not follow: {s:?}")),
        );
    }
    for f in &finals[1..] {
        assert!(f.same_content(&finals[0]), "watchers disagree");
    }
    let west = finals[0]
        .endpoints
        .get(&(ServiceKey::new("default", "svc-3").unwrap(), name("west")))
        .unwrap();
    assert!(
        west.endpoints.iter().all(|e| e.port == 8007),
        "west's change not seen"
    );
    for p in pubs {
        p.shutdown().await;
    }
}
both!(three_clusters_converge);

async fn only_differences_are_written(env: Env) {
    let backend = env.backend().await;
    let state = cluster_state("east", "us-east", 5, 2, 0);
    let mut p = Pub::spawn(backend.clone(), &state, Duration::from_secs(10));
    let first = p.wait_in_sync().await.revision;
    assert!(first > 0);
    // The same state again: nothing is written.
    p.set(&backend, &state).await;
    assert_eq!(
        backend.current_revision().await.unwrap(),
        first,
        "an identical state caused a write"
    );
    // One service changes: exactly one key is rewritten, in one revision.
    let mut changed = state.clone();
    changed.services[3].endpoints[0] = changed.services[3].endpoints[0]
        .clone()
        .with_health(Health::Draining);
    p.set(&backend, &changed).await;
    let (rev, kvs) = backend.get_prefix("/strait/v1/").await.unwrap();
    assert_eq!(rev, first + 1, "more than one transaction for one change");
    let rewritten: Vec<&str> = kvs
        .iter()
        .filter(|kv| kv.mod_revision == rev)
        .map(|kv| kv.key.as_str())
        .collect();
    assert_eq!(rewritten, vec!["/strait/v1/endpoints/east/default/svc-3"]);
    p.shutdown().await;
}
both!(only_differences_are_written);

/// Two replicas of one cluster's publisher: one leads and publishes, the other stands by; a
/// graceful stop of the leader hands over at once and the entries are never absent; a leader
/// that dies is replaced when its lease expires.
async fn replicas_elect_one_publisher_and_hand_over_without_a_gap(env: Env) {
    use federation::registry::publisher::Leadership;
    let cache = RegistryCache::spawn(env.backend().await);
    let state = cluster_state("east", "us-east", 3, 2, 0);
    let config = |id: &str| PublisherConfig {
        lease_ttl: Duration::from_secs(2),
        leader: Some(Leadership {
            key: RegistryKey::leader(&name("east")),
            id: id.to_string(),
        }),
        ..PublisherConfig::default()
    };
    let mut a = Pub::spawn_config(env.backend().await, &state, config("a"));
    a.wait_in_sync().await;
    let mut b = Pub::spawn_config(env.backend().await, &state, config("b"));
    // b stands by: it never gets in sync while a leads.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(a.status.borrow().leader && !b.status.borrow().leader);
    let (_, kvs) = env
        .backend()
        .await
        .get_prefix("/strait/v1/leaders/")
        .await
        .unwrap();
    assert_eq!(kvs.len(), 1);
    assert_eq!(kvs[0].value, b"a");
    cache
        .wait_for(WAIT, |s| cluster_endpoints(s, "east") == 6)
        .await
        .unwrap();
    let mut changes = cache.subscribe();
    // Graceful stop: b takes over within a second, the entries move to b's lease, never absent.
    let t = Instant::now();
    a.shutdown().await;
    let st = b.wait_in_sync().await;
    assert!(st.leader);
    let handover = t.elapsed();
    assert!(
        handover < Duration::from_secs(2),
        "handover took {handover:?}"
    );
    let backend = env.backend().await;
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, kvs) = backend
            .get_prefix("/strait/v1/endpoints/east/")
            .await
            .unwrap();
        if kvs.len() == 3 && kvs.iter().all(|kv| Some(kv.lease) == st.lease) {
            break;
        }
        assert!(Instant::now() < deadline, "b never took the entries over");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while let Ok(c) = changes.try_recv() {
        assert!(
            c.updates.iter().all(|u| u.value.is_some()),
            "an entry was removed during the handover: {:?}",
            c.updates.iter().map(|u| u.key.encode()).collect::<Vec<_>>()
        );
    }
    // A replica that comes back stands by; the leader dying lets it lead after the TTL.
    let mut c = Pub::spawn_config(env.backend().await, &state, config("c"));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!c.status.borrow().leader);
    let t = Instant::now();
    b.kill();
    let st = c.wait_in_sync().await;
    assert!(st.leader);
    println!(
        "graceful handover after {handover:?}; after a leader died: {:?} (TTL 2 s)",
        t.elapsed()
    );
    c.shutdown().await;
}
both!(replicas_elect_one_publisher_and_hand_over_without_a_gap);

async fn dead_publishers_entries_expire_and_revoked_vanish_at_once(env: Env) {
    let cache = RegistryCache::spawn(env.backend().await);
    let ttl = Duration::from_secs(2);
    let mut killed = Pub::spawn(
        env.backend().await,
        &cluster_state("east", "us-east", 3, 2, 0),
        ttl,
    );
    // A long lease: vanishing within seconds proves it was revoked, not left to expire
    // (`withdraw_on_exit`; without it a stop leaves the entries to a successor).
    let mut stopped = Pub::spawn_with(
        env.backend().await,
        &cluster_state("west", "us-west", 3, 2, 0),
        Duration::from_secs(60),
        true,
    );
    killed.wait_in_sync().await;
    stopped.wait_in_sync().await;
    cache
        .wait_for(WAIT, |s| s.clusters.len() == 2)
        .await
        .unwrap();

    let t = Instant::now();
    stopped.shutdown().await;
    cache
        .wait_for(Duration::from_secs(5), |s| {
            !s.clusters.contains_key(&name("west")) && cluster_endpoints(s, "west") == 0
        })
        .await
        .unwrap_or_else(|s| panic!("revoked entries still there: {s:?}"));
    let revoked_after = t.elapsed();
    assert!(cache.snapshot().clusters.contains_key(&name("east")));

    let t = Instant::now();
    killed.kill();
    cache
        .wait_for(ttl + Duration::from_secs(3), |s| {
            s.clusters.is_empty() && s.endpoints.is_empty()
        })
        .await
        .unwrap_or_else(|s| panic!("a dead publisher's entries outlived TTL + 3 s: {s:?}"));
    println!(
        "revoked entries gone after {revoked_after:?}; expired entries gone after {:?} (TTL {ttl:?})",
        t.elapsed()
    );
}
both!(dead_publishers_entries_expire_and_revoked_vanish_at_once);

async fn a_restarted_publisher_removes_what_it_no_longer_has(env: Env) {
    let backend = env.backend().await;
    let p = Pub::spawn(
        backend.clone(),
        &cluster_state("east", "us-east", 6, 2, 0),
        Duration::from_secs(30),
    );
    let mut p = p;
    p.wait_in_sync().await;
    p.kill();
    // A new incarnation with fewer services: the leftovers of the old lease go at once, not
    // after its 30 s TTL.
    let mut p2 = Pub::spawn(
        backend.clone(),
        &cluster_state("east", "us-east", 4, 2, 0),
        Duration::from_secs(30),
    );
    p2.wait_in_sync().await;
    let (_, kvs) = backend
        .get_prefix("/strait/v1/endpoints/east/")
        .await
        .unwrap();
    assert_eq!(kvs.len(), 4);
    let lease = p2.status.borrow().lease.unwrap();
    assert!(
        kvs.iter().all(|kv| kv.lease == lease),
        "keys left on the dead publisher's lease"
    );
    p2.shutdown().await;
}
both!(a_restarted_publisher_removes_what_it_no_longer_has);

fn link(i: u64) -> Op {
    let l = LinkState {
        from: name("east"),
        to: name("west"),
        state: LinkHealth::Up,
        rtt_ms: i as f64,
        loss: 0.0,
        since: SystemTime::UNIX_EPOCH,
    };
    Op::Put {
        key: RegistryKey::Link(name("east"), name("west")).encode(),
        value: encode_link(&l),
        lease: None,
    }
}

async fn watches_resume_without_loss_or_duplicates(mut env: Env) {
    const N: u64 = 120;
    let cache = RegistryCache::spawn(env.backend().await);
    cache.wait_synced(WAIT).await.unwrap();
    let mut changes = cache.subscribe();
    let writer_backend = env.backend().await;
    let (progress_tx, mut progress) = watch::channel(0u64);
    let writer = tokio::spawn(async move {
        for i in 1..=N {
            let deadline = Instant::now() + WAIT;
            while let Err(e) = writer_backend.commit(vec![link(i)]).await {
                assert!(Instant::now() < deadline, "write {i} kept failing: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            progress_tx.send_replace(i);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    for at in [30, 80] {
        tokio::time::timeout(WAIT, progress.wait_for(|i| *i >= at))
            .await
            .unwrap()
            .unwrap();
        env.break_watches();
    }
    tokio::time::timeout(Duration::from_secs(60), writer)
        .await
        .unwrap()
        .unwrap();
    let rtt = |s: &Snapshot| {
        s.links
            .values()
            .next()
            .map(|l| l.rtt_ms as u64)
            .unwrap_or(0)
    };
    cache
        .wait_for(WAIT, |s| rtt(s) == N)
        .await
        .unwrap_or_else(|s| panic!("cache stuck at rtt {}", rtt(&s)));
    let mut seen = Vec::new();
    let mut last_rev = 0;
    while let Ok(c) = changes.try_recv() {
        assert!(!c.resync, "a watch resume turned into a full reload");
        assert!(
            c.revision > last_rev,
            "revision {} delivered after {last_rev}",
            c.revision
        );
        last_rev = c.revision;
        for u in &c.updates {
            if let Some(RegistryValue::Link(l)) = &u.value {
                seen.push(l.rtt_ms as u64);
            }
        }
    }
    let want: Vec<u64> = (1..=N).collect();
    assert_eq!(seen, want, "updates lost or duplicated across watch breaks");
    assert!(
        cache
            .metrics()
            .resumes
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
}
both!(watches_resume_without_loss_or_duplicates);

async fn compaction_past_a_watcher_triggers_a_resync(env: Env) {
    let (cut_backend, cut) = env.partitionable().await;
    let cache = RegistryCache::spawn(cut_backend);
    let main = env.backend().await;
    let mut p = Pub::spawn(
        main.clone(),
        &cluster_state("east", "us-east", 5, 2, 0),
        Duration::from_secs(30),
    );
    p.wait_in_sync().await;
    cache
        .wait_for(WAIT, |s| s.endpoints.len() == 5)
        .await
        .unwrap();
    let before = cache
        .metrics()
        .full_loads
        .load(std::sync::atomic::Ordering::Relaxed);
    let mut changes = cache.subscribe();

    cut.cut();
    tokio::time::timeout(WAIT, async {
        let mut st = cache.status_receiver();
        st.wait_for(|s| matches!(s, CacheStatus::Disconnected { .. }))
            .await
            .unwrap();
    })
    .await
    .expect("cache did not notice the partition");
    // While it is away: two services go, one changes, and history is compacted.
    p.set(&main, &{
        let mut s = cluster_state("east", "us-east", 3, 2, 0);
        s.services[0].endpoints.truncate(1);
        s
    })
    .await;
    main.commit(vec![link(1)]).await.unwrap();
    let rev = main.current_revision().await.unwrap();
    main.compact(rev).await.unwrap();
    // Readable all along.
    assert_eq!(cache.snapshot().endpoints.len(), 5);
    cut.heal();

    let snap = cache
        .wait_for(WAIT, |s| s.endpoints.len() == 3 && s.links.len() == 1)
        .await
        .unwrap_or_else(|s| panic!("no resync after compaction: {s:?}"));
    assert_eq!(cluster_endpoints(&snap, "east"), 5);
    assert!(
        cache
            .metrics()
            .full_loads
            .load(std::sync::atomic::Ordering::Relaxed)
            > before
    );
    // The change stream carries the difference as one resync change.
    let c = tokio::time::timeout(WAIT, changes.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(c.resync);
    let removed = c.updates.iter().filter(|u| u.value.is_none()).count();
    assert_eq!(removed, 2, "{c:?}");
    assert_eq!(
        c.updates.len(),
        4,
        "two removed, one changed, one link added: {c:?}"
    );
    p.shutdown().await;
}
both!(compaction_past_a_watcher_triggers_a_resync);

async fn an_unreachable_store_keeps_the_last_snapshot_and_recovers(env: Env) {
    let (cut_backend, cut) = env.partitionable().await;
    let cache = RegistryCache::spawn(cut_backend);
    let main = env.backend().await;
    let mut p = Pub::spawn(
        main.clone(),
        &cluster_state("east", "us-east", 4, 2, 0),
        Duration::from_secs(30),
    );
    p.wait_in_sync().await;
    let good = cache
        .wait_for(WAIT, |s| s.endpoints.len() == 4)
        .await
        .unwrap();
    cut.cut();
    tokio::time::timeout(WAIT, async {
        let mut st = cache.status_receiver();
        st.wait_for(|s| matches!(s, CacheStatus::Disconnected { .. }))
            .await
            .unwrap();
    })
    .await
    .expect("cache did not notice the store going away");
    match cache.status() {
        CacheStatus::Disconnected { error, .. } => assert!(!error.is_empty()),
        other => panic!("{other:?}"),
    }
    assert!(
        cache.snapshot().same_content(&good),
        "the last good snapshot was lost"
    );
    p.set(&main, &cluster_state("east", "us-east", 6, 2, 0))
        .await;
    cut.heal();
    cache
        .wait_for(WAIT, |s| s.endpoints.len() == 6)
        .await
        .unwrap_or_else(|s| panic!("cache did not recover: {s:?}"));
    p.shutdown().await;
}
both!(an_unreachable_store_keeps_the_last_snapshot_and_recovers);

async fn a_publisher_cut_off_past_its_ttl_publishes_again(env: Env) {
    let cache = RegistryCache::spawn(env.backend().await);
    let (cut_backend, cut) = env.partitionable().await;
    let ttl = Duration::from_secs(2);
    let mut p = Pub::spawn(cut_backend, &cluster_state("east", "us-east", 3, 2, 0), ttl);
    p.wait_in_sync().await;
    cache
        .wait_for(WAIT, |s| s.endpoints.len() == 3)
        .await
        .unwrap();
    cut.cut();
    cache
        .wait_for(ttl + Duration::from_secs(5), |s| s.endpoints.is_empty())
        .await
        .unwrap_or_else(|s| panic!("entries of a partitioned publisher did not expire: {s:?}"));
    cut.heal();
    cache
        .wait_for(WAIT, |s| s.endpoints.len() == 3 && s.clusters.len() == 1)
        .await
        .unwrap_or_else(|s| panic!("publisher did not re-register: {s:?}"));
    assert!(p.status.borrow().sessions >= 2);
    p.shutdown().await;
}
both!(a_publisher_cut_off_past_its_ttl_publishes_again);

async fn undecodable_values_are_skipped_without_disturbing_others(env: Env) {
    let backend = env.backend().await;
    let cache = RegistryCache::spawn(backend.clone());
    let mut p = Pub::spawn(
        backend.clone(),
        &cluster_state("east", "us-east", 2, 2, 0),
        Duration::from_secs(30),
    );
    p.wait_in_sync().await;
    backend
        .commit(vec![
            Op::Put {
                key: "/strait/v1/endpoints/west/default/broken".into(),
                value: b"{not json".to_vec(),
                lease: None,
            },
            Op::Put {
                key: "/strait/v1/something-newer/x".into(),
                value: b"whatever".to_vec(),
                lease: None,
            },
        ])
        .await
        .unwrap();
    main_link(&backend).await;
    let s = cache
        .wait_for(WAIT, |s| s.links.len() == 1)
        .await
        .unwrap_or_else(|s| panic!("{s:?}"));
    assert_eq!(s.endpoints.len(), 2);
    assert!(
        cache
            .metrics()
            .decode_errors
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    p.shutdown().await;
}
both!(undecodable_values_are_skipped_without_disturbing_others);

async fn main_link(b: &Backend) {
    b.commit(vec![link(7)]).await.unwrap();
}

#[tokio::test]
async fn an_unreachable_etcd_is_a_clear_error() {
    let port = testkit::etcd::free_port().unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    let t = Instant::now();
    let err =
        match EtcdBackend::connect_checked(std::slice::from_ref(&endpoint), etcd_options()).await {
            Ok(_) => panic!("connected to nothing"),
            Err(e) => e,
        };
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("127.0.0.1:{port}")) && msg.contains("unreachable"),
        "{msg}"
    );
    assert!(err.is_transient());
    // A cache on it retries, reports why, and serves an empty snapshot meanwhile.
    let cache = RegistryCache::spawn(Backend::Etcd(
        EtcdBackend::connect(&[endpoint], etcd_options())
            .await
            .unwrap(),
    ));
    let mut st = cache.status_receiver();
    tokio::time::timeout(
        WAIT,
        st.wait_for(|s| matches!(s, CacheStatus::Disconnected { .. })),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(cache.snapshot().revision, 0);
    let bad = EtcdBackend::connect(&["nonsense".to_string()], etcd_options()).await;
    assert!(matches!(
        bad,
        Err(federation::registry::RegistryError::InvalidEndpoint { .. })
    ));
}

#[tokio::test]
async fn embedded_compaction_and_lease_semantics_match_etcd() {
    let e = EmbeddedRegistry::new();
    let b = Backend::Embedded(e.clone());
    let r1 = b.commit(vec![link(1)]).await.unwrap();
    let r2 = b.commit(vec![link(2)]).await.unwrap();
    assert_eq!(r2, r1 + 1);
    // A delete of nothing does not bump the revision.
    let r = b
        .commit(vec![Op::Delete {
            key: "/strait/v1/links/x/y".into(),
        }])
        .await
        .unwrap();
    assert_eq!(r, r2);
    b.compact(r2).await.unwrap();
    assert!(b.compact(r1).await.is_err());
    assert!(matches!(
        b.watch("/strait/", r1).await,
        Err(federation::registry::RegistryError::Compacted { .. })
    ));
    let mut w = b.watch("/strait/", r2).await.unwrap();
    assert_eq!(w.next().await.unwrap().revision, r2);
    // Putting under a lease that does not exist is refused, and nothing is applied.
    let err = b
        .commit(vec![
            link(3),
            Op::Put {
                key: "/strait/v1/clusters/x".into(),
                value: vec![],
                lease: Some(42),
            },
        ])
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        federation::registry::RegistryError::LeaseNotFound(42)
    ));
    assert_eq!(b.current_revision().await.unwrap(), r2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_etcd_refuses_does_not_block_the_others() {
    let env = Env::etcd();
    let backend = env.backend().await;
    // svc-0 gets 30,000 endpoints: ~2.5 MB, over etcd's 1.5 MiB request limit.
    let mut state = cluster_state("east", "us-east", 3, 2, 0);
    let big = cluster_state("east", "us-east", 1, 30_000, 0);
    state.services[0] = big.services[0].clone();
    let mut p = Pub::spawn(backend.clone(), &state, Duration::from_secs(10));
    let status = p.wait_in_sync().await;
    let err = status.last_error.expect("the refused key must be reported");
    assert!(
        err.contains("/strait/v1/endpoints/east/default/svc-0"),
        "{err}"
    );
    let (_, kvs) = backend.get_prefix("/strait/v1/").await.unwrap();
    let keys: Vec<&str> = kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(
        keys,
        vec![
            "/strait/v1/clusters/east",
            "/strait/v1/endpoints/east/default/svc-1",
            "/strait/v1/endpoints/east/default/svc-2"
        ]
    );
    p.shutdown().await;
}
