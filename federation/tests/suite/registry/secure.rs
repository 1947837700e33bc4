//! The registry over a real etcd with TLS, client certificates, password authentication and
//! roles: what each cluster's credentials may write, what etcd refuses and how it is reported,
//! credentials that expire or change, and the errors of every wrong setting.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use federation::model::ClusterId;
use federation::registry::publisher::Owned;
use federation::registry::roles;
use federation::registry::{
    Backend, CacheStatus, EtcdAuth, EtcdBackend, EtcdConnection, EtcdOptions, EtcdTls,
    LeasedPublisher, Op, PublisherConfig, RegistryCache, RegistryError, RegistryKey,
};
use testkit::etcd::{EtcdPki, EtcdServer, PkiFiles};
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(20);

fn options() -> EtcdOptions {
    EtcdOptions {
        connect_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_secs(2),
        write_timeout: Duration::from_secs(1),
        keep_alive_interval: Duration::from_millis(500),
        keep_alive_timeout: Duration::from_secs(1),
    }
}

fn id(s: &str) -> ClusterId {
    ClusterId::parse("cluster", s).unwrap()
}

/// A TLS etcd with client-certificate authentication, east's and west's roles applied and
/// authentication on; client certificates for root, east, west, the reader and the policy
/// administrator.
struct Secure {
    dir: tempfile::TempDir,
    pki: EtcdPki,
    etcd: EtcdServer,
    certs: std::collections::BTreeMap<&'static str, PkiFiles>,
}

impl Secure {
    async fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = EtcdPki::new(&dir.path().join("pki"), "etcd-ca").unwrap();
        let mut tls = pki.server("server").unwrap();
        tls.client_ca = Some(pki.ca_file());
        let extra = extra.iter().map(|s| s.to_string()).collect();
        let etcd = tokio::task::block_in_place(|| {
            EtcdServer::start_with(&dir.path().join("etcd"), Some(tls), extra)
        })
        .unwrap();
        let mut certs = std::collections::BTreeMap::new();
        for (name, user) in [
            ("root", "root"),
            ("east", "strait-cluster-east"),
            ("west", "strait-cluster-west"),
            ("reader", roles::READER),
            ("admin", roles::POLICY_ADMIN),
        ] {
            certs.insert(name, pki.client(name, user).unwrap());
        }
        let s = Self {
            dir,
            pki,
            etcd,
            certs,
        };
        let changes = s.apply_roles(Some("root-secret")).await.unwrap();
        assert!(
            changes.iter().any(|c| c == "authentication: enabled"),
            "{changes:?}"
        );
        s
    }

    fn conn(&self, who: &str) -> EtcdConnection {
        let c = &self.certs[who];
        EtcdConnection {
            endpoints: vec![self.etcd.endpoint()],
            tls: Some(EtcdTls {
                ca: Some(self.pki.ca_file()),
                cert: Some(c.cert.clone()),
                key: Some(c.key.clone()),
            }),
            auth: None,
        }
    }

    fn backend(&self, who: &str) -> EtcdBackend {
        EtcdBackend::open(self.conn(who), options()).unwrap()
    }

    async fn apply_roles(&self, root_password: Option<&str>) -> Result<Vec<String>, RegistryError> {
        roles::apply(
            &self.backend("root"),
            &roles::plan(&[id("east"), id("west")], &[]),
            &roles::ApplyOptions {
                enable_auth_root_password: root_password.map(str::to_string),
                ..Default::default()
            },
        )
        .await
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn put(key: &str) -> Op {
    Op::Put {
        key: key.to_string(),
        value: br#"{"v":1}"#.to_vec(),
        lease: None,
    }
}

fn denied(r: Result<i64, RegistryError>, identity: &str, key: &str) {
    match r {
        Err(e @ RegistryError::PermissionDenied { .. }) => {
            let m = e.to_string();
            assert!(m.contains(identity) && m.contains(key), "{m}");
            assert!(m.contains("permission denied"), "{m}");
        }
        other => panic!("writing {key} as {identity}: expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_cluster_writes_only_its_own_keys_enforced_by_etcd() {
    let s = Secure::start(&[]).await;
    let east = s.backend("east");
    // East's own keys.
    for k in [
        "/strait/v1/clusters/east",
        "/strait/v1/endpoints/east/default/echo",
        "/strait/v1/links/east/west",
        "/strait/v1/peerings/east/west",
    ] {
        east.commit(vec![put(k)])
            .await
            .unwrap_or_else(|e| panic!("east writing {k}: {e}"));
    }
    // Anyone else's: refused by etcd, reported with the key and who asked.
    let who = "CN `strait-cluster-east`";
    for k in [
        "/strait/v1/endpoints/west/default/echo",
        "/strait/v1/clusters/west",
        "/strait/v1/clusters/east2",
        "/strait/v1/links/west/east",
        "/strait/v1/peerings/west/east",
        "/strait/v1/policies/default",
        "/strait/v1/policies/services/default/echo",
        "/strait/v2/anything",
    ] {
        denied(east.commit(vec![put(k)]).await, who, k);
    }
    // A transaction mixing one refused key with allowed ones writes nothing.
    denied(
        east.commit(vec![
            put("/strait/v1/endpoints/east/default/other"),
            put("/strait/v1/endpoints/west/default/echo"),
        ])
        .await,
        who,
        "/strait/v1/endpoints/east/default/other",
    );
    assert!(
        east.get("/strait/v1/endpoints/east/default/other")
            .await
            .unwrap()
            .is_none()
    );
    // East reads everything under the registry's root.
    let (_, kvs) = east.get_prefix("/strait/v1/").await.unwrap();
    assert_eq!(kvs.len(), 4);

    // The reader writes nothing, reads everything; the policy admin writes only policies.
    let reader = s.backend("reader");
    for k in ["/strait/v1/clusters/east", "/strait/v1/policies/default"] {
        denied(reader.commit(vec![put(k)]).await, "strait-reader", k);
    }
    assert_eq!(reader.get_prefix("/strait/v1/").await.unwrap().1.len(), 4);
    let admin = s.backend("admin");
    admin
        .commit(vec![put("/strait/v1/policies/default")])
        .await
        .unwrap();
    denied(
        admin.commit(vec![put("/strait/v1/clusters/east")]).await,
        "strait-policy-admin",
        "/strait/v1/clusters/east",
    );

    // West's publisher works under west's identity; a publisher given east's credentials for
    // west's keys keeps running and reports each refused key with the identity.
    let (tx, rx) = watch::channel(std::collections::BTreeMap::new());
    let (wrong, mut status) = LeasedPublisher::new(
        Backend::Etcd(east.clone()),
        "cluster west (with east's credentials)",
        Owned::cluster(&id("west")),
        PublisherConfig::default(),
        rx,
    );
    tx.send_replace(
        [(
            RegistryKey::cluster(&id("west")),
            br#"{"v":1,"id":"west","region":"us-west"}"#.to_vec(),
        )]
        .into(),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(wrong.run(async move {
        let _ = stopped.await;
    }));
    let st = tokio::time::timeout(
        WAIT,
        status.wait_for(|s| {
            s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("permission denied"))
        }),
    )
    .await
    .expect("the refusal is reported in the publisher's status")
    .unwrap()
    .clone();
    let e = st.last_error.unwrap();
    assert!(
        e.contains("/strait/v1/clusters/west") && e.contains("strait-cluster-east"),
        "{e}"
    );
    assert!(!task.is_finished(), "the publisher keeps running");
    let _ = stop.send(());
    task.await.unwrap();
    assert!(
        s.backend("west")
            .get("/strait/v1/clusters/west")
            .await
            .unwrap()
            .is_none()
    );

    // Running the roles again changes nothing.
    let again = s.apply_roles(Some("root-secret")).await.unwrap();
    assert!(again.is_empty(), "{again:?}");
    // A role that drifted is put back, and only that.
    let root = s.backend("root").raw_client().await.unwrap();
    root.auth_client()
        .role_grant_permission(
            "strait-reader",
            etcd_client::Permission::read_write("/strait/v1/clusters/").with_prefix(),
        )
        .await
        .unwrap();
    let fixed = s.apply_roles(None).await.unwrap();
    assert_eq!(
        fixed,
        ["role strait-reader: revoked readwrite /strait/v1/clusters/* (prefix)"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_tokens_that_expire_and_a_restart_are_transparent() {
    // Simple tokens live 2 s unused; an etcd restart forgets every token.
    let mut s = Secure::start(&["--auth-token-ttl", "2"]).await;
    let pw_dir = s.path("passwords");
    let mut passwords = std::collections::BTreeMap::new();
    passwords.insert("strait-cluster-east".to_string(), "east-pw-1".to_string());
    passwords.insert("strait-cluster-west".to_string(), "west-pw".to_string());
    roles::apply(
        &s.backend("root"),
        &roles::plan(&[id("east"), id("west")], &[]),
        &roles::ApplyOptions {
            passwords: passwords.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    std::fs::create_dir_all(&pw_dir).unwrap();
    let east_pw = pw_dir.join("east");
    std::fs::write(&east_pw, "east-pw-1\n").unwrap();
    // Password authentication over TLS (with a client certificate the server requires: the
    // token, not the certificate, names the user).
    let mut conn = s.conn("reader");
    conn.auth = Some(EtcdAuth {
        user: "strait-cluster-east".into(),
        password_file: east_pw.clone(),
    });
    let east = Backend::Etcd(EtcdBackend::open(conn, options()).unwrap());
    let cache = RegistryCache::spawn(east.clone());
    let (tx, rx) = watch::channel(std::collections::BTreeMap::new());
    let (publisher, mut status) = LeasedPublisher::new(
        east.clone(),
        "cluster east",
        Owned::cluster(&id("east")),
        PublisherConfig {
            lease_ttl: Duration::from_secs(10),
            ..PublisherConfig::default()
        },
        rx,
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(publisher.run(async move {
        let _ = stopped.await;
    }));
    let record = |n: u32| {
        let gw =
            federation::model::GatewayAddress::parse("gateway", &format!("127.0.0.1:{n}")).unwrap();
        let c = federation::model::Cluster::new(id("east"), "us-east", None, vec![gw]).unwrap();
        [(
            RegistryKey::cluster(&id("east")),
            federation::registry::codec::encode_cluster(&c),
        )]
        .into()
    };
    let seen = |n: u32| {
        move |snap: &federation::registry::Snapshot| {
            snap.clusters.get(&id("east")).is_some_and(|c| {
                c.gateways
                    .iter()
                    .any(|g| g.to_string().ends_with(&format!(":{n}")))
            })
        }
    };
    tx.send_replace(record(1001));
    cache.wait_for(WAIT, seen(1001)).await.unwrap();
    // Idle longer than the token's TTL, then change: the expired token is renewed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    tx.send_replace(record(1002));
    cache.wait_for(WAIT, seen(1002)).await.unwrap();
    // etcd restarts: every token is gone; the watch is made again with a new one, the
    // publisher goes on.
    tokio::task::block_in_place(|| s.etcd.restart()).unwrap();
    tx.send_replace(record(1003));
    cache
        .wait_for(WAIT, seen(1003))
        .await
        .expect("the change made after etcd's restart is seen by the cache");
    tokio::time::sleep(Duration::from_secs(3)).await;
    tx.send_replace(record(1004));
    cache.wait_for(WAIT, seen(1004)).await.unwrap();
    assert!(
        status.borrow_and_update().in_sync || {
            tokio::time::timeout(WAIT, status.wait_for(|s| s.in_sync))
                .await
                .is_ok()
        }
    );

    // The password changes in etcd, then in the file: the component follows the file without a
    // restart (new connections use it).
    passwords.insert("strait-cluster-east".to_string(), "east-pw-2".to_string());
    let changed = roles::apply(
        &s.backend("root"),
        &roles::plan(&[id("east"), id("west")], &[]),
        &roles::ApplyOptions {
            passwords,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(changed, ["user strait-cluster-east: password changed"]);
    std::fs::write(&east_pw, "east-pw-2\n").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    tokio::task::block_in_place(|| s.etcd.restart()).unwrap();
    tx.send_replace(record(1005));
    cache
        .wait_for(WAIT, seen(1005))
        .await
        .expect("the change is published with the new password");
    assert!(matches!(cache.status(), CacheStatus::Synced { .. }));
    let _ = stop.send(());
    task.await.unwrap();
}

/// The error a connection with `conn` gets on its first request.
async fn first_error(conn: EtcdConnection) -> (String, Duration) {
    let t = Instant::now();
    let b = EtcdBackend::open(conn, options()).unwrap();
    let e = b.check().await.expect_err("this connection must not work");
    (e.to_string(), t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_wrong_setting_is_one_clear_line() {
    let s = Secure::start(&[]).await;
    let endpoint = s.etcd.endpoint();
    let port = endpoint.rsplit(':').next().unwrap().to_string();
    let check = |(m, took): (String, Duration), want: &[&str]| {
        assert!(!m.contains('\n'), "one line: {m}");
        assert!(m.contains(&port), "names the endpoint: {m}");
        for w in want {
            assert!(m.contains(w), "`{w}` missing from: {m}");
        }
        assert!(took < Duration::from_secs(10), "took {took:?}: {m}");
    };

    // Plaintext against a TLS etcd.
    let mut plain = EtcdConnection::plain([endpoint.replace("https://", "http://")]);
    plain.auth = None;
    check(first_error(plain).await, &["https://"]);

    // A server certificate from another CA.
    let other = EtcdPki::new(&s.path("other-pki"), "other-ca").unwrap();
    let mut c = s.conn("east");
    c.tls.as_mut().unwrap().ca = Some(other.ca_file());
    check(
        first_error(c).await,
        &["not signed by the CA", "other-ca.pem"],
    );

    // An expired client certificate: said before dialling, naming the file.
    let expired = s.pki.expired_client("old", "strait-cluster-east").unwrap();
    let mut c = s.conn("east");
    let t = c.tls.as_mut().unwrap();
    t.cert = Some(expired.cert.clone());
    t.key = Some(expired.key.clone());
    let (m, _) = first_error(c.clone()).await;
    assert!(m.contains("old.pem") && m.contains("expired"), "{m}");
    // ... and when the certificate is renewed in place, the next request uses it.
    let b = EtcdBackend::open(c, options()).unwrap();
    assert!(b.check().await.is_err());
    std::fs::copy(&s.certs["east"].cert, &expired.cert).unwrap();
    std::fs::copy(&s.certs["east"].key, &expired.key).unwrap();
    let deadline = Instant::now() + WAIT;
    while b.check().await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the renewed certificate is not used"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // No client certificate where etcd requires one.
    let mut c = s.conn("east");
    let t = c.tls.as_mut().unwrap();
    t.cert = None;
    t.key = None;
    check(first_error(c).await, &["client certificate"]);

    // A wrong password, and a missing password file.
    roles::apply(
        &s.backend("root"),
        &roles::plan(&[id("east")], &[]),
        &roles::ApplyOptions {
            passwords: [("strait-cluster-east".to_string(), "right".to_string())].into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let wrong = s.path("wrong");
    std::fs::write(&wrong, "wrong\n").unwrap();
    let mut c = s.conn("reader");
    c.auth = Some(EtcdAuth {
        user: "strait-cluster-east".into(),
        password_file: wrong,
    });
    check(
        first_error(c.clone()).await,
        &["strait-cluster-east", "authentication failed"],
    );
    c.auth.as_mut().unwrap().password_file = s.path("missing");
    let (m, _) = first_error(c).await;
    assert!(m.contains("missing") && m.contains("password file"), "{m}");
    assert!(!m.contains("right") && !m.contains("wrong\n"), "{m}");

    // Settings that cannot work are refused before anything is read.
    for (conn, field) in [
        (
            EtcdConnection {
                endpoints: vec![endpoint.clone()],
                tls: None,
                auth: None,
            },
            "--etcd-ca",
        ),
        (
            EtcdConnection {
                endpoints: vec![endpoint.replace("https://", "http://")],
                tls: Some(EtcdTls {
                    ca: Some(s.pki.ca_file()),
                    ..Default::default()
                }),
                auth: None,
            },
            "--etcd-ca",
        ),
    ] {
        let e = EtcdBackend::open(conn, options())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(field), "{e}");
    }
}
