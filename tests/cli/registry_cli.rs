//! The `strait registry` and `strait pki` commands as an operator uses them: real processes, a real
//! etcd, real signals.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use federation::registry::{Backend, EtcdBackend, EtcdOptions, RegistryCache, Snapshot};
use testkit::etcd::EtcdServer;

const BIN: &str = env!("CARGO_BIN_EXE_strait");
const WAIT: Duration = Duration::from_secs(20);

fn discovery(cluster: &str, region: &str, endpoints: usize, port_base: u16) -> String {
    let mut s = format!(
        "cluster: {cluster}\nregion: {region}\ngateways: [\"127.0.0.1:15443\"]\nservices:\n  - name: echo\n    namespace: default\n    ports: [{{name: http, port: 8080, protocol: http}}]\n    endpoints:\n"
    );
    for i in 0..endpoints {
        s.push_str(&format!(
            "      - {{address: 127.0.0.1, port: {}, zone: {region}-1a, labels: {{version: v1}}}}\n",
            port_base + i as u16
        ));
    }
    s
}

struct Proc(Child);

impl Proc {
    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([format!("-{sig}"), self.0.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }
    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "process did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn publish(etcd: &str, file: &Path, ttl: &str) -> Proc {
    publish_with(etcd, file, ttl, &[])
}

fn publish_with(etcd: &str, file: &Path, ttl: &str, extra: &[&str]) -> Proc {
    Proc(
        Command::new(BIN)
            .args([
                "registry",
                "publish",
                "--etcd",
                etcd,
                "--lease-ttl",
                ttl,
                "--poll",
                "100ms",
                "--file",
            ])
            .arg(file)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn strait(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

/// The lease a key is under (0 when it has none or is absent).
async fn backend_lease(etcd: &str, key: &str) -> i64 {
    let b = EtcdBackend::connect(&[etcd.to_string()], EtcdOptions::default())
        .await
        .unwrap();
    b.get(key).await.unwrap().map(|kv| kv.lease).unwrap_or(0)
}

async fn cache(etcd: &str) -> RegistryCache {
    RegistryCache::spawn(Backend::Etcd(
        EtcdBackend::connect(&[etcd.to_string()], EtcdOptions::default())
            .await
            .unwrap(),
    ))
}

fn has(s: &Snapshot, cluster: &str, endpoints: usize) -> bool {
    s.clusters.keys().any(|c| c.as_str() == cluster)
        && s.endpoints
            .iter()
            .filter(|((_, c), _)| c.as_str() == cluster)
            .map(|(_, v)| v.endpoints.len())
            .sum::<usize>()
            == endpoints
}

fn gone(s: &Snapshot, cluster: &str) -> bool {
    !s.clusters.keys().any(|c| c.as_str() == cluster)
        && !s.endpoints.keys().any(|(_, c)| c.as_str() == cluster)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_publishers_converge_and_die_as_promised() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start(&dir.path().join("etcd")).unwrap();
    let url = etcd.endpoint();
    let watchers = [cache(&url).await, cache(&url).await, cache(&url).await];
    let mut procs = Vec::new();
    // Central's and east's leases are long, so that east vanishing within seconds of SIGTERM
    // (with --withdraw-on-exit) proves a withdrawal rather than an expiry, and central staying
    // after SIGTERM proves a restart is not one; west's is short, for SIGKILL.
    for (c, r, n, ttl) in [
        ("east", "us-east", 4, "60s"),
        ("central", "us-east", 3, "60s"),
        ("west", "us-west", 2, "2s"),
    ] {
        let f = dir.path().join(format!("{c}.yaml"));
        std::fs::write(&f, discovery(c, r, n, 18000)).unwrap();
        let extra: &[&str] = if c == "east" {
            &["--withdraw-on-exit"]
        } else {
            &[]
        };
        procs.push((c, f.clone(), publish_with(&url, &f, ttl, extra)));
    }
    let all = |s: &Snapshot| has(s, "east", 4) && has(s, "central", 3) && has(s, "west", 2);
    let mut snaps = Vec::new();
    for w in &watchers {
        snaps.push(
            w.wait_for(WAIT, all)
                .await
                .unwrap_or_else(|s| panic!("did not converge: {s:?}")),
        );
    }
    assert!(snaps.iter().all(|s| s.same_content(&snaps[0])));

    // The file changes: the publisher republishes.
    std::fs::write(&procs[0].1, discovery("east", "us-east", 6, 18000)).unwrap();
    for w in &watchers {
        w.wait_for(WAIT, |s| has(s, "east", 6))
            .await
            .unwrap_or_else(|s| panic!("no republish: {s:?}"));
    }
    // A broken edit keeps the last good state.
    std::fs::write(&procs[0].1, "cluster: east\nregion: [oops\n").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(has(&watchers[0].snapshot(), "east", 6));

    // SIGTERM is a restart, not a withdrawal: central's entries stay under their lease ...
    let mut deletes = watchers[0].subscribe();
    let lease_of = |s: &Snapshot| {
        s.clusters
            .keys()
            .any(|c| c.as_str() == "central")
            .then_some(())
    };
    procs[1].2.signal("TERM");
    let t = Instant::now();
    assert!(procs[1].2.wait_exit(WAIT).success());
    let stop = t.elapsed();
    assert!(
        stop < Duration::from_secs(2),
        "a graceful stop with nothing pending took {stop:?}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        has(&watchers[0].snapshot(), "central", 3) && lease_of(&watchers[0].snapshot()).is_some(),
        "central's entries were withdrawn by a plain SIGTERM"
    );
    // ... and a successor takes them over: the same entries, never absent in between.
    let lease_before = backend_lease(&url, "/strait/v1/clusters/central").await;
    let f = procs[1].1.clone();
    procs[1].2 = publish(&url, &f, "60s");
    let deadline = Instant::now() + WAIT;
    while backend_lease(&url, "/strait/v1/clusters/central").await == lease_before {
        assert!(
            Instant::now() < deadline,
            "the successor never took central over"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    while let Ok(c) = deletes.try_recv() {
        for u in &c.updates {
            assert!(
                u.value.is_some() || !u.key.encode().contains("/central"),
                "{} was deleted during the handover",
                u.key.encode()
            );
        }
    }
    // `strait registry withdraw` takes central out: gone everywhere within a second, with a
    // tombstone; central's publisher must stop first, or it publishes again.
    procs[1].2.signal("TERM");
    assert!(procs[1].2.wait_exit(WAIT).success());
    let t = Instant::now();
    let out = strait(&[
        "registry",
        "withdraw",
        "--cluster",
        "central",
        "--etcd",
        &url,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("cluster central withdrawn") && text.contains("2 keys removed"),
        "{text}"
    );
    for w in &watchers {
        w.wait_for(Duration::from_secs(1), |s| {
            gone(s, "central") && s.withdrawn.keys().any(|c| c.as_str() == "central")
        })
        .await
        .unwrap_or_else(|s| panic!("central still there 1 s after the withdrawal: {s:?}"));
    }
    let term = t.elapsed();
    // Publishing again rejoins: the tombstone goes.
    procs[1].2 = publish(&url, &f, "60s");
    watchers[0]
        .wait_for(WAIT, |s| has(s, "central", 3) && s.withdrawn.is_empty())
        .await
        .unwrap_or_else(|s| panic!("central did not rejoin: {s:?}"));
    // --withdraw-on-exit: east is withdrawn on SIGTERM.
    procs[0].2.signal("TERM");
    for w in &watchers {
        w.wait_for(WAIT, |s| {
            gone(s, "east") && s.withdrawn.keys().any(|c| c.as_str() == "east")
        })
        .await
        .unwrap_or_else(|s| panic!("east was not withdrawn on exit: {s:?}"));
    }
    assert!(procs[0].2.wait_exit(WAIT).success());

    // SIGKILL: west's entries expire with the lease: within TTL (2 s) + 3 s (etcd checks leases
    // every 500 ms, and a renewal may have landed just before the kill).
    let t = Instant::now();
    procs[2].2.signal("KILL");
    for w in &watchers {
        w.wait_for(
            Duration::from_secs(5) - t.elapsed().min(Duration::from_secs(5)),
            |s| gone(s, "west"),
        )
        .await
        .unwrap_or_else(|s| panic!("west outlived TTL + 3 s after SIGKILL: {s:?}"));
    }
    let kill = t.elapsed();
    assert!(
        has(&watchers[2].snapshot(), "central", 3),
        "central must be untouched"
    );
    println!("withdraw → gone in {term:?}; SIGKILL → gone in {kill:?} (TTL 2 s)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dump_shows_the_registry_readably() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start(&dir.path().join("etcd")).unwrap();
    let url = etcd.endpoint();
    let f = dir.path().join("east.yaml");
    std::fs::write(&f, discovery("east", "us-east", 2, 18000)).unwrap();
    let _p = publish(&url, &f, "10s");
    let w = cache(&url).await;
    w.wait_for(WAIT, |s| has(s, "east", 2)).await.unwrap();

    let out = strait(&["registry", "dump", "--etcd", &url]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("/strait/v1/clusters/east"), "{text}");
    assert!(
        text.contains("/strait/v1/endpoints/east/default/echo"),
        "{text}"
    );
    assert!(
        text.contains("\"locality\": \"us-east/us-east-1a\""),
        "{text}"
    );

    let out = strait(&["registry", "dump", "--etcd", &url, "--json"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let entries = doc["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    let eps = entries
        .iter()
        .find(|e| e["key"] == "/strait/v1/endpoints/east/default/echo")
        .unwrap();
    assert_eq!(eps["value"]["v"], 1);
    assert_eq!(eps["value"]["endpoints"].as_array().unwrap().len(), 2);
    assert!(eps["lease"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_changes() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start(&dir.path().join("etcd")).unwrap();
    let url = etcd.endpoint();
    let mut watcher = Proc(
        Command::new(BIN)
            .args(["registry", "watch", "--json", "--etcd", &url])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = watcher.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let f = dir.path().join("west.yaml");
    std::fs::write(&f, discovery("west", "us-west", 3, 18000)).unwrap();
    let mut p = publish(&url, &f, "10s");
    let mut lines = Vec::new();
    let deadline = Instant::now() + WAIT;
    while !lines
        .iter()
        .any(|l: &String| l.contains("endpoints/west/default/echo"))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        lines.push(
            rx.recv_timeout(left)
                .expect("no change printed for the published service"),
        );
    }
    let ev: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(ev["removed"], false);
    assert!(
        ev["summary"].as_str().unwrap().contains("3 endpoints"),
        "{ev}"
    );
    p.signal("TERM");
    p.wait_exit(WAIT);
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let l = rx
            .recv_timeout(left)
            .expect("no removal printed after SIGTERM");
        if l.contains("endpoints/west/default/echo") && l.contains("\"removed\":true") {
            break;
        }
    }
    watcher.signal("TERM");
    assert!(watcher.wait_exit(WAIT).success());
}

#[test]
fn bad_discovery_files_and_unreachable_etcd_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.yaml");
    std::fs::write(
        &f,
        discovery("east", "us-east", 2, 18000).replace("port: 18001", "port: 18000"),
    )
    .unwrap();
    let out = strait(&[
        "registry",
        "publish",
        "--etcd",
        "http://127.0.0.1:1",
        "--file",
        f.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml:10:"), "{err}");
    assert!(
        err.contains("services[0].endpoints[1]")
            && err.contains("duplicate endpoint 127.0.0.1:18000"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    let port = testkit::etcd::free_port().unwrap();
    let t = Instant::now();
    let out = strait(&[
        "registry",
        "dump",
        "--etcd",
        &format!("http://127.0.0.1:{port}"),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("127.0.0.1:{port}")) && err.contains("unreachable"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t.elapsed()
    );
}

#[test]
fn pki_commands_issue_and_inspect_identities() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let out = strait(&[
        "pki",
        "init",
        "--trust-domain",
        "example.org",
        "--out",
        ca.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A second init does not overwrite the CA.
    let again = strait(&[
        "pki",
        "init",
        "--trust-domain",
        "example.org",
        "--out",
        ca.to_str().unwrap(),
    ]);
    assert!(!again.status.success());
    let gw = dir.path().join("east-gw");
    let out = strait(&[
        "pki",
        "issue",
        "gateway",
        "--cluster",
        "east",
        "--ca",
        ca.to_str().unwrap(),
        "--out",
        gw.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let wl = dir.path().join("east-app");
    let out = strait(&[
        "pki",
        "issue",
        "workload",
        "--cluster",
        "east",
        "--namespace",
        "default",
        "--service-account",
        "app",
        "--ca",
        ca.to_str().unwrap(),
        "--out",
        wl.to_str().unwrap(),
        "--validity",
        "1h",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    use std::os::unix::fs::PermissionsExt;
    for key in [ca.join("ca.key"), gw.join("key.pem"), wl.join("key.pem")] {
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", key.display());
    }
    let out = strait(&["pki", "inspect", gw.join("cert.pem").to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("identity: spiffe://example.org/cluster/east/gateway"),
        "{text}"
    );
    assert!(text.contains("role: gateway"), "{text}");
    let out = strait(&["pki", "inspect", wl.join("cert.pem").to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("identity: spiffe://example.org/cluster/east/ns/default/sa/app"),
        "{text}"
    );
    let out = strait(&[
        "pki",
        "issue",
        "gateway",
        "--cluster",
        "East!",
        "--ca",
        ca.to_str().unwrap(),
        "--out",
        gw.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cluster"),
        "bad name error must name the field"
    );

    // `pki status`: every certificate in reach with its expiry; the 1 h workload certificate
    // fails a 2 h warning, everything passes a 30 min one.
    let d = dir.path().to_str().unwrap();
    let out = strait(&["pki", "status", d, "--warn", "30m", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<&str> = rows.iter().filter_map(|r| r["identity"].as_str()).collect();
    for want in [
        "spiffe://example.org",
        "spiffe://example.org/cluster/east/gateway",
        "spiffe://example.org/cluster/east/ns/default/sa/app",
    ] {
        assert!(ids.contains(&want), "{want} missing from {ids:?}");
    }
    assert!(rows.iter().all(|r| r["state"] == "ok"), "{rows:?}");
    let out = strait(&["pki", "status", d, "--warn", "2h"]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let soon: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("EXPIRES SOON"))
        .collect();
    assert!(soon.len() == 1 && soon[0].contains("sa/app"), "{text}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 certificate(s)"));
}

#[test]
fn shipped_discovery_examples_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let f =
                federation::discovery::DiscoveryFile::load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                f.state.cluster.id.as_str(),
                path.file_stem().unwrap().to_str().unwrap()
            );
            n += 1;
        }
    }
    assert_eq!(n, 3, "east, central and west examples");
}

/// A registry in a real etcd with east (us-east, `east_endpoints` endpoints of echo.default) and
/// west (us-west, one), each published by its own `strait registry publish`.
struct EastAndWest {
    _publishers: [Proc; 2],
    _etcd: EtcdServer,
    url: String,
    cache: RegistryCache,
    dir: tempfile::TempDir,
}

async fn east_and_west(east_endpoints: usize) -> EastAndWest {
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdServer::start(&dir.path().join("etcd")).unwrap();
    let url = etcd.endpoint();
    let east = dir.path().join("east.yaml");
    let west = dir.path().join("west.yaml");
    std::fs::write(&east, discovery("east", "us-east", east_endpoints, 18000)).unwrap();
    std::fs::write(&west, discovery("west", "us-west", 1, 19000)).unwrap();
    let publishers = [publish(&url, &east, "10s"), publish(&url, &west, "10s")];
    let cache = cache(&url).await;
    cache
        .wait_for(WAIT, |s| {
            has(s, "east", east_endpoints) && has(s, "west", 1)
        })
        .await
        .unwrap();
    EastAndWest {
        _publishers: publishers,
        _etcd: etcd,
        url,
        cache,
        dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_explain_shows_priorities_and_reasons_from_the_registry() {
    use federation::model::{LinkHealth, LinkState, Name};
    use federation::registry::Op;
    use federation::registry::codec::encode_link;

    let fed = east_and_west(2).await;
    let (url, w) = (fed.url.clone(), &fed.cache);

    let out = strait(&[
        "route",
        "explain",
        "echo.default",
        "--from",
        "east/us-east/us-east-1a",
        "--etcd",
        &url,
    ]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert!(rows[0].starts_with("PRIORITY"), "{text}");
    assert!(
        rows[1].starts_with("0 ") && rows[1].contains("east") && rows[1].contains("2/2"),
        "{text}"
    );
    assert!(rows[1].contains("own cluster, same zone"), "{text}");
    assert!(
        rows[2].starts_with("1 ") && rows[2].contains("west") && rows[2].contains("(via gateway)"),
        "{text}"
    );

    // East's gateway reports its link to west down: west is left out, and the table says why.
    let backend = EtcdBackend::connect(std::slice::from_ref(&url), EtcdOptions::default())
        .await
        .unwrap();
    let link = LinkState {
        from: Name::parse("from", "east").unwrap(),
        to: Name::parse("to", "west").unwrap(),
        state: LinkHealth::Down,
        rtt_ms: 0.0,
        loss: 1.0,
        since: std::time::SystemTime::now(),
    };
    Backend::Etcd(backend)
        .commit(vec![Op::Put {
            key: "/strait/v1/links/east/west".into(),
            value: encode_link(&link),
            lease: None,
        }])
        .await
        .unwrap();
    w.wait_for(WAIT, |s| !s.links.is_empty()).await.unwrap();
    let out = strait(&[
        "route",
        "explain",
        "echo.default",
        "--from",
        "east",
        "--etcd",
        &url,
    ]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("link east → west is down"), "{text}");
    assert!(!text.lines().any(|l| l.starts_with("1 ")), "{text}");

    // Errors name what is wrong.
    let out = strait(&[
        "route",
        "explain",
        "nope.default",
        "--from",
        "east",
        "--etcd",
        &url,
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("service `nope.default` has no endpoints")
    );
    let out = strait(&[
        "route",
        "explain",
        "echo.default",
        "--from",
        "mars",
        "--etcd",
        &url,
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.contains("cluster `mars` is not in the registry (known: east, west)"),
        "{err}"
    );
    let out = strait(&["route", "explain", "echo", "--from", "east", "--etcd", &url]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("SERVICE.NAMESPACE"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_are_applied_listed_used_by_explain_and_deleted() {
    let fed = east_and_west(1).await;
    let (dir, url, w) = (fed.dir.path(), fed.url.clone(), &fed.cache);

    // A bad file is refused with file, line and field, and nothing is written.
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "policies:\n  - service: echo.default\n    distribute: [{from: \"us-east/*\", to: {\"us-west/*\": 50}}]\n",
    )
    .unwrap();
    let out = strait(&[
        "policy",
        "apply",
        "-f",
        bad.to_str().unwrap(),
        "--etcd",
        &url,
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("bad.yaml:2:"), "{err}");
    assert!(
        err.contains("policies[0].distribute[0].to: weights add up to 50, not 100"),
        "{err}"
    );
    let out = strait(&["policy", "list", "--etcd", &url]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("no policies"));

    let good = dir.join("policy.yaml");
    std::fs::write(
        &good,
        "policies:\n  - service: echo.default\n    distribute:\n      - from: \"us-east/*\"\n        to: {\"us-east/*\": 70, \"us-west/*\": 30}\n    http:\n      - name: canary\n        match: {headers: [{name: x-canary, exact: \"1\"}]}\n        to: [{service: echo-v2.default, weight: 10}, {service: echo.default, weight: 90}]\n",
    )
    .unwrap();
    let out = strait(&[
        "policy",
        "apply",
        "-f",
        good.to_str().unwrap(),
        "--etcd",
        &url,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("policy echo.default applied"));
    let out = strait(&["policy", "list", "--etcd", &url]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("echo.default")
            && text.contains("distribute from us-east/*: us-east/* 70%, us-west/* 30%")
            && text.contains(
                "http canary: header x-canary = \"1\" → echo-v2.default 10%, echo.default 90%"
            ),
        "{text}"
    );
    w.wait_for(WAIT, |s| !s.policies.is_empty()).await.unwrap();

    // Explain uses it: both clusters at priority 0, weighted 70:30.
    let out = strait(&[
        "route",
        "explain",
        "echo.default",
        "--from",
        "east/us-east/us-east-1a",
        "--etcd",
        &url,
    ]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("policy: echo.default"), "{text}");
    assert!(
        text.contains("#   canary: header x-canary = \"1\" → echo-v2.default 10%, echo.default 90%  (not in the registry, answered 503: echo-v2.default)"),
        "{text}"
    );
    let zero: Vec<&str> = text.lines().filter(|l| l.starts_with("0 ")).collect();
    assert_eq!(zero.len(), 2, "{text}");
    assert!(
        zero.iter()
            .any(|l| l.contains("east") && l.contains("7000")),
        "{text}"
    );
    assert!(
        zero.iter()
            .any(|l| l.contains("west") && l.contains("3000")),
        "{text}"
    );

    // Deleted: back to the defaults.
    let out = strait(&["policy", "delete", "echo.default", "--etcd", &url]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = strait(&["policy", "delete", "echo.default", "--etcd", &url]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("there is no policy for `echo.default`"));
    w.wait_for(WAIT, |s| s.policies.is_empty()).await.unwrap();
    let out = strait(&[
        "route",
        "explain",
        "echo.default",
        "--from",
        "east/us-east/us-east-1a",
        "--etcd",
        &url,
    ]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("policy: none (defaults)"), "{text}");
    assert_eq!(
        text.lines().filter(|l| l.starts_with("0 ")).count(),
        1,
        "{text}"
    );
}

/// How the secure-etcd tests authenticate.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Auth {
    /// etcd with `--client-cert-auth`: each component presents a certificate whose CN is its user.
    Certificates,
    /// etcd with TLS (no client certificates) and users with passwords in files.
    Passwords,
}

/// A TLS etcd with authentication on and the roles of east and west, set up with `strait
/// registry roles apply` as an operator would.
struct SecureEtcd {
    mode: Auth,
    pki: testkit::etcd::EtcdPki,
    dir: std::path::PathBuf,
    ca: std::path::PathBuf,
    url: String,
    _etcd: EtcdServer,
}

impl SecureEtcd {
    fn start(dir: &Path, mode: Auth) -> Self {
        use testkit::etcd::EtcdPki;
        let pki = EtcdPki::new(&dir.join("pki"), "etcd-ca").unwrap();
        let mut tls = pki.server("server").unwrap();
        if mode == Auth::Certificates {
            tls.client_ca = Some(pki.ca_file());
            for (f, user) in [
                ("root", "root"),
                ("east", "strait-cluster-east"),
                ("west", "strait-cluster-west"),
                ("reader", "strait-reader"),
                ("admin", "strait-policy-admin"),
            ] {
                pki.client(f, user).unwrap();
            }
        }
        let etcd = EtcdServer::start_with(&dir.join("etcd"), Some(tls), Vec::new()).unwrap();
        std::fs::write(dir.join("root.pw"), "root-Secret-4821\n").unwrap();
        let ca = pki.ca_file();
        let s = Self {
            mode,
            pki,
            dir: dir.to_path_buf(),
            ca,
            url: etcd.endpoint(),
            _etcd: etcd,
        };
        // First run: no credentials yet in password mode (authentication is off); root's
        // certificate in certificate mode.
        let mut args = vec![
            "registry".to_string(),
            "roles".into(),
            "apply".into(),
            "--cluster".into(),
            "east,west".into(),
            "--password-dir".into(),
            dir.join("pw").display().to_string(),
            "--enable-auth".into(),
            "--root-password-file".into(),
            dir.join("root.pw").display().to_string(),
        ];
        args.extend(s.flags(if mode == Auth::Certificates {
            "root"
        } else {
            ""
        }));
        let out = strait(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for line in [
            "role strait-cluster-east: created",
            "role strait-cluster-east: granted readwrite /strait/v1/endpoints/east/* (prefix)",
            "user strait-cluster-west: created (with a password)",
            "authentication: enabled",
        ] {
            assert!(text.contains(line), "`{line}` missing from:\n{text}");
        }
        // Run again as root: nothing changes.
        let mut again = args[..10].to_vec();
        again.extend(s.flags("root"));
        let out = strait(&again.iter().map(String::as_str).collect::<Vec<_>>());
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success() && text.contains("nothing changed"),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        s
    }

    /// The etcd user behind a short name.
    fn user(who: &str) -> &str {
        match who {
            "root" => "root",
            "east" => "strait-cluster-east",
            "west" => "strait-cluster-west",
            "reader" => "strait-reader",
            "admin" => "strait-policy-admin",
            other => panic!("no user {other}"),
        }
    }

    fn password_file(&self, who: &str) -> std::path::PathBuf {
        if who == "root" {
            self.dir.join("root.pw")
        } else {
            self.dir.join("pw").join(Self::user(who))
        }
    }

    /// The `--etcd*` flags of `who` ("" for none but the CA).
    fn flags(&self, who: &str) -> Vec<String> {
        let mut f = vec![
            "--etcd".to_string(),
            self.url.clone(),
            "--etcd-ca".into(),
            self.ca.display().to_string(),
        ];
        if who.is_empty() {
            return f;
        }
        match self.mode {
            Auth::Certificates => f.extend([
                "--etcd-cert".into(),
                self.dir
                    .join(format!("pki/{who}.pem"))
                    .display()
                    .to_string(),
                "--etcd-key".into(),
                self.dir
                    .join(format!("pki/{who}-key.pem"))
                    .display()
                    .to_string(),
            ]),
            Auth::Passwords => f.extend([
                "--etcd-user".into(),
                Self::user(who).to_string(),
                "--etcd-password-file".into(),
                self.password_file(who).display().to_string(),
            ]),
        }
        f
    }

    /// The `registry:` section of a YAML configuration for `who`.
    fn yaml(&self, who: &str) -> String {
        let creds = match self.mode {
            Auth::Certificates => format!(
                "tls: {{ca: {}, cert: {}, key: {}}}",
                self.ca.display(),
                self.dir.join(format!("pki/{who}.pem")).display(),
                self.dir.join(format!("pki/{who}-key.pem")).display()
            ),
            Auth::Passwords => format!(
                "tls: {{ca: {}}}, auth: {{user: {}, password_file: {}}}",
                self.ca.display(),
                Self::user(who),
                self.password_file(who).display()
            ),
        };
        format!(
            "registry: {{etcd: [\"{}\"], {creds}, lease_ttl: 5s}}\n",
            self.url
        )
    }

    fn run(&self, who: &str, args: &[&str]) -> Output {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.extend(self.flags(who));
        strait(&all.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// Poll `strait registry dump --json` (as the reader) until it holds `key`.
    fn wait_key(&self, key: &str) -> serde_json::Value {
        self.wait_entry(key, |_| true)
    }

    /// Poll `strait registry dump --json` (as the reader) until `key`'s entry is `ok`.
    fn wait_entry(&self, key: &str, ok: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let out = self.run("reader", &["registry", "dump", "--json"]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if let Some(e) = doc["entries"]
                .as_array()
                .and_then(|a| a.iter().find(|e| e["key"] == key && ok(e)))
            {
                return e.clone();
            }
            assert!(Instant::now() < deadline, "{key} never appeared: {doc}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn spawn_logged(args: &[&str], log: &Path) -> Proc {
    let f = std::fs::File::create(log).unwrap();
    Proc(
        Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap(),
    )
}

#[test]
fn every_command_and_daemon_works_over_tls_with_certificates_and_with_passwords() {
    for mode in [Auth::Certificates, Auth::Passwords] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let etcd = SecureEtcd::start(dir, mode);

        // `strait registry publish` as east; `dump` as the reader.
        let east = dir.join("east.yaml");
        std::fs::write(&east, discovery("east", "us-east", 2, 18000)).unwrap();
        let mut args = vec![
            "registry",
            "publish",
            "--lease-ttl",
            "10s",
            "--poll",
            "100ms",
            "--file",
        ];
        let east_s = east.display().to_string();
        args.push(&east_s);
        let flags = etcd.flags("east");
        args.extend(flags.iter().map(String::as_str));
        let _publisher = spawn_logged(&args, &dir.join("publish.log"));
        let entry = etcd.wait_key("/strait/v1/clusters/east");
        assert_eq!(entry["value"]["region"], "us-east", "{mode:?}");

        // Every wrong setting: a non-zero exit and one line naming the endpoint and the cause.
        let port = etcd.url.rsplit(':').next().unwrap().to_string();
        let fails = |args: Vec<String>, want: &[&str]| {
            let mut all = vec!["registry".to_string(), "dump".into()];
            all.extend(args);
            let out = strait(&all.iter().map(String::as_str).collect::<Vec<_>>());
            let err = String::from_utf8_lossy(&out.stderr).to_string();
            assert!(!out.status.success(), "{mode:?} {all:?} succeeded");
            assert_eq!(err.trim().lines().count(), 1, "{mode:?}: {err}");
            assert!(err.contains(&port), "{mode:?}: {err}");
            for w in want {
                assert!(err.contains(w), "{mode:?}: `{w}` missing from {err}");
            }
            assert!(!err.contains("panicked"), "{err}");
        };
        let plain = etcd.url.replace("https://", "http://");
        fails(vec!["--etcd".into(), plain], &["use https://"]);
        let other = testkit::etcd::EtcdPki::new(&dir.join("other"), "other-ca").unwrap();
        let mut f = etcd.flags("reader");
        f[3] = other.ca_file().display().to_string();
        fails(f, &["not signed by the CA"]);
        match mode {
            Auth::Certificates => {
                let old = etcd.pki.expired_client("old", "strait-reader").unwrap();
                let mut f = etcd.flags("reader");
                f[5] = old.cert.display().to_string();
                f[7] = old.key.display().to_string();
                fails(f, &["old.pem", "expired"]);
            }
            Auth::Passwords => {
                std::fs::write(dir.join("wrong.pw"), "not-the-password\n").unwrap();
                let mut f = etcd.flags("reader");
                f[7] = dir.join("wrong.pw").display().to_string();
                fails(f.clone(), &["strait-reader", "authentication failed"]);
                f[7] = dir.join("missing.pw").display().to_string();
                fails(f, &["missing.pw"]);
            }
        }

        // Policies: the admin may apply them, east may not (etcd refuses, the CLI says so).
        let policy = dir.join("policy.yaml");
        std::fs::write(
            &policy,
            "policies:\n  - service: echo.default\n    targets: [{cluster: east}, {cluster: west}]\n",
        )
        .unwrap();
        let p = policy.display().to_string();
        let out = etcd.run("admin", &["policy", "apply", "-f", &p]);
        assert!(
            out.status.success(),
            "{mode:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = etcd.run("east", &["policy", "apply", "-f", &p]);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "{mode:?}: east applied a policy");
        assert!(
            err.contains("permission denied")
                && err.contains("/strait/v1/policies/services/default/echo")
                && err.contains("strait-cluster-east")
                && err.lines().count() == 1,
            "{mode:?}: {err}"
        );

        // West's control plane and both gateways, configured with the registry's TLS and
        // credentials; the control plane logs everything, and no password appears anywhere.
        let west = dir.join("west.yaml");
        std::fs::write(&west, discovery("west", "us-west", 1, 19000)).unwrap();
        let cp = dir.join("cp.yaml");
        std::fs::write(
            &cp,
            format!(
                "cluster: west\nregion: us-west\n{}discovery: {{file: {}, poll: 100ms}}\nxds: {{listen: \"127.0.0.1:0\"}}\nadmin: {{listen: \"127.0.0.1:0\"}}\n",
                etcd.yaml("west"),
                west.display()
            ),
        )
        .unwrap();
        let cp_s = cp.display().to_string();
        // With passwords, the control plane starts with a wrong one: it runs on, says why, and
        // publishes once the file holds the right one.
        let right = etcd.password_file("west");
        let kept = std::fs::read(&right).unwrap();
        if mode == Auth::Passwords {
            std::fs::write(&right, "wrong-password\n").unwrap();
        }
        let mut controlplane = spawn_logged(
            &["controlplane", "--config", &cp_s, "--log", "trace"],
            &dir.join("controlplane.log"),
        );
        if mode == Auth::Passwords {
            let deadline = Instant::now() + WAIT;
            loop {
                let log = std::fs::read_to_string(dir.join("controlplane.log")).unwrap_or_default();
                if log.contains("did not accept user `strait-cluster-west`") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "no authentication error logged:\n{log}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            assert!(
                controlplane.0.try_wait().unwrap().is_none(),
                "the control plane exited"
            );
            std::fs::write(&right, &kept).unwrap();
        }
        etcd.wait_key("/strait/v1/endpoints/west/default/echo");

        let ca_dir = dir.join("ca").display().to_string();
        let out = strait(&[
            "pki",
            "init",
            "--trust-domain",
            "secure.test",
            "--out",
            &ca_dir,
        ]);
        assert!(out.status.success());
        let ports: Vec<u16> = (0..4)
            .map(|_| testkit::etcd::free_port().unwrap())
            .collect();
        let mut gateways = Vec::new();
        for (i, (c, peer)) in [("east", "west"), ("west", "east")].into_iter().enumerate() {
            let certs = dir.join(format!("{c}-gw"));
            let out = strait(&[
                "pki",
                "issue",
                "gateway",
                "--cluster",
                c,
                "--ca",
                &ca_dir,
                "--out",
                &certs.display().to_string(),
            ]);
            assert!(out.status.success());
            let peer_port = ports[1 - i];
            let cfg = dir.join(format!("{c}-gw.yaml"));
            std::fs::write(
                &cfg,
                format!(
                    "cluster: {c}\nlisten: {{peers: \"127.0.0.1:{}\", ingress: \"127.0.0.1:{}\", admin: \"127.0.0.1:0\"}}\n\
                     tls: {{cert: {d}/cert.pem, key: {d}/key.pem, ca: {d}/ca.pem}}\n{}\
                     peers: [{{cluster: {peer}, address: \"127.0.0.1:{peer_port}\"}}]\n",
                    ports[i],
                    ports[2 + i],
                    etcd.yaml(c),
                    d = certs.display()
                ),
            )
            .unwrap();
            let cfg_s = cfg.display().to_string();
            gateways.push(spawn_logged(
                &["gateway", "--config", &cfg_s],
                &dir.join(format!("{c}-gw.log")),
            ));
        }
        // Each gateway writes its own link states (under its cluster's role).
        let up = |e: &serde_json::Value| e["value"]["state"] == "up";
        let link = etcd.wait_entry("/strait/v1/links/east/west", up);
        assert_eq!(link["value"]["from"], "east");
        etcd.wait_entry("/strait/v1/links/west/east", up);

        // `route explain` as the reader: both clusters, in order.
        let out = etcd.run(
            "reader",
            &[
                "route",
                "explain",
                "echo.default",
                "--from",
                "east/us-east/us-east-1a",
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{mode:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with("0 ") && l.contains("east"))
                && text
                    .lines()
                    .any(|l| l.starts_with("1 ") && l.contains("west")),
            "{mode:?}: {text}"
        );

        // A graceful stop, then no secret in any log line.
        controlplane.signal("TERM");
        controlplane.wait_exit(Duration::from_secs(15));
        drop(gateways);
        let mut logs = String::new();
        for f in [
            "publish.log",
            "controlplane.log",
            "east-gw.log",
            "west-gw.log",
        ] {
            logs.push_str(&std::fs::read_to_string(dir.join(f)).unwrap_or_default());
        }
        assert!(
            logs.lines().count() > 50,
            "{mode:?}: the trace log is too short to prove anything"
        );
        if mode == Auth::Passwords {
            for who in ["root", "east", "west", "reader", "admin"] {
                let pw = std::fs::read_to_string(etcd.password_file(who)).unwrap();
                let pw = pw.trim();
                assert!(!logs.contains(pw), "{mode:?}: {who}'s password was logged");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_member_etcd_loses_its_leader_without_losing_a_change() {
    use federation::model::{Cluster, ClusterId, GatewayAddress};
    use federation::registry::codec::encode_cluster;
    use federation::registry::publisher::Owned;
    use federation::registry::{LeasedPublisher, PublisherConfig, RegistryKey};
    use testkit::etcd::EtcdCluster;

    let _ = tracing_subscriber::fmt()
        .with_env_filter("federation=debug")
        .try_init(); // DEBUG
    let dir = tempfile::tempdir().unwrap();
    // Heartbeat and election timeout for members on one LAN (etcd's tuning guide: heartbeat
    // about the members' round trip, election about ten heartbeats).
    let extra = ["--heartbeat-interval", "50", "--election-timeout", "500"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut etcd =
        tokio::task::block_in_place(|| EtcdCluster::start(dir.path(), 3, None, extra)).unwrap();
    let endpoints = etcd.endpoints();
    let joined = endpoints.join(",");

    // `strait registry status`: three members, one leader.
    let status = |joined: &str| {
        let out = strait(&["registry", "status", "--etcd", joined, "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap()
    };
    let members = tokio::task::block_in_place(|| status(&joined));
    assert_eq!(members.len(), 3, "{members:?}");
    let leaders: Vec<&serde_json::Value> = members.iter().filter(|m| m["leader"] == true).collect();
    assert_eq!(leaders.len(), 1, "{members:?}");
    assert!(
        members
            .iter()
            .all(|m| m["error"].is_null() && m["revision"].as_i64() > Some(0))
    );
    let leader = leaders[0]["name"].as_str().unwrap().to_string();
    let text = tokio::task::block_in_place(|| strait(&["registry", "status", "--etcd", &joined]));
    let text = String::from_utf8_lossy(&text.stdout).to_string();
    assert!(
        text.starts_with(&format!("3 members, leader: {leader}")),
        "{text}"
    );

    // East publishes a change every 100 ms; a watcher in another cluster lists the members in
    // another order.
    let east_backend = Backend::Etcd(
        EtcdBackend::connect(&endpoints, EtcdOptions::default())
            .await
            .unwrap(),
    );
    let mut reversed = endpoints.clone();
    reversed.reverse();
    let watcher = RegistryCache::spawn(Backend::Etcd(
        EtcdBackend::connect(&reversed, EtcdOptions::default())
            .await
            .unwrap(),
    ));
    let mut changes = watcher.subscribe();
    let east = ClusterId::parse("cluster", "east").unwrap();
    let record = |n: u16| {
        let gw = GatewayAddress::parse("gateway", &format!("127.0.0.1:{}", 20000 + n)).unwrap();
        let c = Cluster::new(east.clone(), "us-east", None, vec![gw]).unwrap();
        std::collections::BTreeMap::from([(RegistryKey::cluster(&east), encode_cluster(&c))])
    };
    let (tx, rx) = tokio::sync::watch::channel(record(0));
    let (publisher, mut pstatus) = LeasedPublisher::new(
        east_backend,
        "cluster east",
        Owned::cluster(&east),
        PublisherConfig::default(),
        rx,
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(publisher.run(async move {
        let _ = stopped.await;
    }));
    // The publisher's writes: (revision, when).
    let writes = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(i64, Instant)>::new()));
    let w = writes.clone();
    let recorder = tokio::spawn(async move {
        while pstatus.changed().await.is_ok() {
            let r = pstatus.borrow_and_update().revision;
            let mut w = w.lock().unwrap();
            if r > 0 && w.last().is_none_or(|(last, _)| *last < r) {
                w.push((r, Instant::now()));
            }
        }
    });
    // The watcher's view of east's record: (revision, n).
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(i64, u16)>::new()));
    let s2 = seen.clone();
    let east2 = east.clone();
    let collector = tokio::spawn(async move {
        while let Ok(c) = changes.recv().await {
            for u in &c.updates {
                if u.key == RegistryKey::Cluster(east2.clone())
                    && let Some(federation::registry::RegistryValue::Cluster(rec)) = &u.value
                {
                    let port = rec.gateways[0].to_string();
                    let n: u16 = port.rsplit(':').next().unwrap().parse().unwrap();
                    s2.lock().unwrap().push((c.revision, n - 20000));
                }
            }
        }
    });

    let mut n = 0u16;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut killed_at = None;
    let mut restarted = false;
    while n < 80 {
        tick.tick().await;
        n += 1;
        tx.send_replace(record(n));
        if n == 20 {
            // SIGKILL the leader.
            let i = etcd.index_of(&leader).unwrap();
            etcd.members[i].kill();
            killed_at = Some(Instant::now());
        }
        if n == 55 && !restarted {
            let i = etcd.index_of(&leader).unwrap();
            etcd.members[i].respawn().unwrap();
            restarted = true;
        }
    }
    // Everything reaches the watcher.
    let deadline = Instant::now() + WAIT;
    while seen.lock().unwrap().last().map(|(_, v)| *v) != Some(n) {
        assert!(
            Instant::now() < deadline,
            "the watcher never saw the last change: {:?}",
            seen.lock().unwrap().last()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let writes = writes.lock().unwrap().clone();
    let seen = seen.lock().unwrap().clone();
    // Every write the publisher made is seen, in order, none lost or repeated.
    let seen_revisions: Vec<i64> = seen.iter().map(|(r, _)| *r).collect();
    for (r, _) in &writes {
        assert!(
            seen_revisions.contains(r),
            "revision {r} written by east was not seen by the watcher: {seen_revisions:?}"
        );
    }
    assert!(
        seen.windows(2).all(|p| p[0].0 < p[1].0 && p[0].1 < p[1].1),
        "changes out of order or repeated: {seen:?}"
    );
    // Publishing stalled at most 2 s around the leader's death.
    let killed_at = killed_at.unwrap();
    let stall = writes
        .windows(2)
        .filter(|p| p[1].1 > killed_at)
        .map(|p| p[1].1 - p[0].1)
        .max()
        .unwrap();
    println!(
        "longest stall after the leader was killed: {stall:?}; {} writes",
        writes.len()
    );
    assert!(
        stall <= Duration::from_secs(2),
        "publishing stalled {stall:?}"
    );

    // The old leader is back as a member.
    let i = etcd.index_of(&leader).unwrap();
    tokio::task::block_in_place(|| etcd.members[i].wait_ready(Duration::from_secs(20))).unwrap();
    let members = tokio::task::block_in_place(|| status(&joined));
    assert!(members.iter().all(|m| m["error"].is_null()), "{members:?}");
    assert_eq!(members.iter().filter(|m| m["leader"] == true).count(), 1);
    let _ = stop.send(());
    task.await.unwrap();
    recorder.abort();
    collector.abort();
}
