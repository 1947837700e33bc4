//! The `strait registry` and `strait pki` commands as an operator uses them: real processes, a real
//! etcd, real signals.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use federation::etcd_server::EtcdServer;
use federation::registry::{Backend, EtcdBackend, EtcdOptions, RegistryCache, Snapshot};

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
    // Central's lease is long, so that its vanishing within seconds of SIGTERM proves the lease
    // was revoked rather than left to expire; west's is short, for SIGKILL.
    for (c, r, n, ttl) in [
        ("east", "us-east", 4, "2s"),
        ("central", "us-east", 3, "60s"),
        ("west", "us-west", 2, "2s"),
    ] {
        let f = dir.path().join(format!("{c}.yaml"));
        std::fs::write(&f, discovery(c, r, n, 18000)).unwrap();
        procs.push((c, f.clone(), publish(&url, &f, ttl)));
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

    // SIGTERM: the lease is revoked; central vanishes at once.
    let t = Instant::now();
    procs[1].2.signal("TERM");
    for w in &watchers {
        w.wait_for(Duration::from_secs(5), |s| gone(s, "central"))
            .await
            .unwrap_or_else(|s| {
                panic!("central (lease 60 s) still there 5 s after SIGTERM: {s:?}")
            });
    }
    let term = t.elapsed();
    assert!(procs[1].2.wait_exit(WAIT).success());

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
        has(&watchers[2].snapshot(), "east", 6),
        "east must be untouched"
    );
    println!("SIGTERM → gone in {term:?}; SIGKILL → gone in {kill:?} (TTL 2 s)");
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

    let port = federation::etcd_server::free_port().unwrap();
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
