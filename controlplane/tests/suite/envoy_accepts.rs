//! The EDS resources the control plane builds, checked by a real Envoy 1.40
//! (`envoy --mode validate` on a binary bootstrap that carries them), including the priorities,
//! localities, weights and health of a multi-cluster route with a distribute policy.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use controlplane::resources::{cluster_name, load_assignment};
use envoy_types::pb::envoy::config::bootstrap::v3::{Bootstrap, bootstrap::StaticResources};
use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::google::protobuf::{Duration, UInt32Value};
use federation::model::{
    Cluster as Member, ClusterId, Distribute, Endpoint, FailoverPolicy, Health, Labels, LinkHealth,
    LinkState, Locality, LocalityPattern, Name, PolicyScope, Protocol, Service, ServiceEndpoints,
    ServiceKey, ServicePort,
};
use federation::registry::Snapshot;
use federation::route::{Caller, Inputs, Route, resolve};
use prost::Message;

fn envoy() -> PathBuf {
    let p = std::env::var_os("STRAIT_ENVOY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/envoy"));
    assert!(
        p.exists(),
        "Envoy 1.40 not found at {} (set STRAIT_ENVOY, or run `cargo xtask setup`)",
        p.display()
    );
    p
}

fn id(c: &str) -> ClusterId {
    Name::parse("cluster", c).unwrap()
}

fn route() -> Route {
    let service = Service::new(
        ServiceKey::new("default", "echo").unwrap(),
        vec![ServicePort::new("http", 8080, Protocol::Http).unwrap()],
    )
    .unwrap();
    let ep = |c: &str, l: &str, n: u8, h: Health, w: u32| {
        Endpoint::new(
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, n)),
            8080,
            Locality::parse("l", l).unwrap(),
            id(c),
        )
        .unwrap()
        .with_health(h)
        .with_weight(w)
        .unwrap()
    };
    let reg = [
        ServiceEndpoints::new(
            id("east"),
            service.clone(),
            vec![
                ep("east", "us-east/a", 1, Health::Healthy, 2),
                ep("east", "us-east/a", 2, Health::Draining, 1),
                ep("east", "us-east/b", 3, Health::Degraded, 1),
            ],
        )
        .unwrap(),
        ServiceEndpoints::new(
            id("west"),
            service.clone(),
            vec![ep("west", "us-west/a", 4, Health::Healthy, 1)],
        )
        .unwrap(),
        ServiceEndpoints::new(
            id("central"),
            service,
            vec![
                ep("central", "us-central/a/x", 5, Health::Healthy, 1),
                ep("central", "us-central/a/x", 6, Health::Unhealthy, 1),
            ],
        )
        .unwrap(),
    ];
    let mut snap = Snapshot::default();
    for (c, r) in [
        ("east", "us-east"),
        ("west", "us-west"),
        ("central", "us-central"),
    ] {
        snap.clusters.insert(
            id(c),
            Arc::new(Member::new(id(c), r, None, vec![]).unwrap()),
        );
    }
    for se in reg {
        snap.endpoints
            .insert((se.service.key.clone(), se.cluster.clone()), Arc::new(se));
    }
    let policy = FailoverPolicy {
        scope: PolicyScope::Default,
        targets: vec![],
        exclude_others: false,
        failover_priority: vec![],
        distribute: vec![Distribute {
            from: LocalityPattern::parse("f", "us-east/*").unwrap(),
            to: BTreeMap::from([
                (LocalityPattern::parse("t", "us-east/a").unwrap(), 90),
                (LocalityPattern::parse("t", "us-west/*").unwrap(), 10),
            ]),
        }],
        http: vec![],
    };
    snap.policies.insert(PolicyScope::Default, Arc::new(policy));
    let up = LinkState {
        from: id("east"),
        to: id("west"),
        state: LinkHealth::Up,
        rtt_ms: 1.0,
        loss: 0.0,
        since: std::time::SystemTime::UNIX_EPOCH,
    };
    snap.links.insert((id("east"), id("west")), Arc::new(up));
    resolve(
        &Caller {
            cluster: id("east"),
            locality: Locality::parse("l", "us-east/a").unwrap(),
            labels: Labels::default(),
        },
        &Inputs::from_snapshot(&snap, &ServiceKey::new("default", "echo").unwrap()),
    )
}

/// Run `envoy --mode validate` on a bootstrap holding `cla` in a static cluster.
fn validate(cla: ClusterLoadAssignment) -> (bool, String) {
    let bootstrap = Bootstrap {
        static_resources: Some(StaticResources {
            clusters: vec![Cluster {
                name: cla.cluster_name.clone(),
                connect_timeout: Some(Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
                    cluster::DiscoveryType::Static as i32,
                )),
                load_assignment: Some(cla),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bootstrap.pb");
    std::fs::write(&path, bootstrap.encode_to_vec()).unwrap();
    let out = Command::new(envoy())
        .args(["--mode", "validate", "--log-level", "warn", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn envoy_accepts_a_multi_cluster_load_assignment() {
    let route = route();
    // The route itself: distribute puts east's zone a and west at priority 0 (90:10), east's
    // zone b fails over below, central below that.
    let shape: Vec<(u32, &str)> = route
        .groups
        .iter()
        .map(|g| (g.priority, g.cluster.as_str()))
        .collect();
    assert_eq!(
        shape,
        vec![(0, "east"), (0, "west"), (1, "east"), (2, "central")]
    );

    let name = cluster_name(&ServiceKey::new("default", "echo").unwrap(), 8080);
    assert_eq!(name, "echo.default:8080");
    let cla = load_assignment(&name, &route);
    assert_eq!(cla.endpoints.len(), 4);
    let weights: Vec<u32> = cla
        .endpoints
        .iter()
        .map(|l| l.load_balancing_weight.as_ref().map_or(0, |w| w.value))
        .collect();
    assert_eq!(weights, vec![9000, 1000, 1, 1]);
    let west = &cla.endpoints[1];
    assert!(
        west.lb_endpoints[0].metadata.is_some(),
        "remote endpoints are marked"
    );
    assert!(cla.endpoints[0].lb_endpoints[0].metadata.is_none());
    assert_eq!(cla.endpoints[3].locality.as_ref().unwrap().sub_zone, "x");

    let (ok, out) = validate(cla);
    assert!(ok, "Envoy rejected the load assignment:\n{out}");
    assert!(out.contains("OK"), "{out}");
}

#[test]
fn envoy_rejects_what_it_should_so_the_check_above_means_something() {
    let name = "echo.default:8080";
    let mut cla = load_assignment(name, &route());
    // A zero locality weight violates Envoy's own validation rules.
    cla.endpoints[0].load_balancing_weight = Some(UInt32Value { value: 0 });
    let (ok, out) = validate(cla);
    assert!(!ok, "Envoy accepted a zero locality weight:\n{out}");
    assert!(out.contains("load_balancing_weight"), "{out}");
}

/// The Envoy bootstrap of `strait proxy bootstrap --envoy` with a gateway (mTLS to the control
/// plane and the gateway, the internal tunnel listener) together with a service cluster as the
/// control plane sends it — remote endpoints addressed to the tunnel listener through the
/// internal_upstream transport socket — are accepted by Envoy. One of east's own endpoints sits
/// behind a sidecar: the cluster's mutual-TLS transport-socket match (naming the bootstrap's
/// static secrets) and the endpoint's socket-match metadata are accepted too.
#[test]
fn envoy_accepts_the_tunnel_bootstrap_and_tunnelled_clusters() {
    use controlplane::bootstrap::{BootstrapSpec, CertFiles};
    use controlplane::resources::{ClientKind, PortView, Remote, port_assignment, service_cluster};
    use federation::identity::{CertificateAuthority, SpiffeId};

    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ca =
        CertificateAuthority::init("strait.test", std::time::Duration::from_secs(86400)).unwrap();
    let id = SpiffeId::workload("strait.test", "east", "default", "client").unwrap();
    let paths = ca
        .issue(&id, std::time::Duration::from_secs(3600))
        .unwrap()
        .write(dir.path().join("client"))
        .unwrap();
    let spec = BootstrapSpec {
        node_id: "client-1".into(),
        cluster: id_of("east"),
        locality: Locality::parse("l", "us-east/a").unwrap(),
        labels: Labels::default(),
        xds: "127.0.0.1:15010".parse().unwrap(),
        // A second control-plane replica: the xDS cluster balances over both.
        xds_replicas: vec!["127.0.0.2:15010".parse().unwrap()],
        tls: Some(CertFiles {
            cert: paths.cert.clone(),
            key: paths.key.clone(),
            ca: paths.ca.clone(),
        }),
        delta: true,
        admin: "127.0.0.1:15000".parse().unwrap(),
        outbound: "127.0.0.1:15001".parse().unwrap(),
        transparent: None,
        // Two gateway replicas.
        gateway: Some((
            vec![
                "127.0.0.1:15008".parse().unwrap(),
                "127.0.0.1:15108".parse().unwrap(),
            ],
            "spiffe://strait.test/cluster/east/gateway".into(),
        )),
    };
    let json = controlplane::bootstrap::envoy(&spec);
    let text = json.to_string();
    assert!(
        text.contains("%DYNAMIC_METADATA(strait:authority)%"),
        "{text}"
    );
    assert!(text.contains("strait_tunnel"), "{text}");
    assert_eq!(
        json["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"]
            .as_array()
            .map(Vec::len),
        Some(2),
        "both control-plane replicas"
    );
    let gateway = json["static_resources"]["clusters"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "strait_gateway"))
        .expect("the gateway cluster");
    assert_eq!(
        gateway["load_assignment"]["endpoints"][0]["lb_endpoints"]
            .as_array()
            .map(Vec::len),
        Some(2),
        "both gateway replicas"
    );
    assert!(
        gateway["outlier_detection"].is_object(),
        "a failing replica is left out: {gateway}"
    );
    assert!(text.contains("\"max_connect_attempts\":2"), "{text}");

    assert!(text.contains("strait_workload"), "{text}");

    // The service cluster, made static with its load assignment.
    let mut route = route();
    for g in route
        .groups
        .iter_mut()
        .filter(|g| g.cluster.as_str() == "east")
    {
        for e in &mut g.endpoints {
            e.mutual_tls = true;
        }
    }
    let key = ServiceKey::new("default", "echo").unwrap();
    let port = ServicePort::new("http", 8080, Protocol::Http).unwrap();
    let mutual = controlplane::resources::mutual_clusters(&route);
    assert_eq!(
        mutual,
        vec!["east"],
        "only east's own endpoints are reached directly"
    );
    let mut c = service_cluster(&key, &port, ClientKind::Envoy, &mutual);
    assert_eq!(c.transport_socket_matches.len(), 1);
    let cla = port_assignment(
        &route,
        PortView {
            service: &key,
            port: &port,
            first: true,
            remote: Remote::Tunnel,
            mtls: true,
        },
    );
    let matched = cla
        .endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .filter(|e| format!("{e:?}").contains("envoy.transport_socket_match"))
        .count();
    assert!(
        matched >= 1,
        "east's sidecar endpoints carry socket-match metadata"
    );
    // A client without the secrets does not get them at all.
    let plain = port_assignment(
        &route,
        PortView {
            service: &key,
            port: &port,
            first: true,
            remote: Remote::Tunnel,
            mtls: false,
        },
    );
    assert!(
        !format!("{plain:?}").contains("10.0.0.1"),
        "a sidecar endpoint reached a client that cannot speak mutual TLS"
    );
    let internal = cla
        .endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .filter(|e| format!("{e:?}").contains("EnvoyInternalAddress"))
        .count();
    assert_eq!(
        internal, 3,
        "west and central (other networks) go through the tunnel"
    );
    c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(
        cluster::DiscoveryType::Static as i32,
    ));
    c.eds_cluster_config = None;
    c.load_assignment = Some(cla);
    let pb = Bootstrap {
        static_resources: Some(StaticResources {
            clusters: vec![c],
            ..Default::default()
        }),
        ..Default::default()
    };
    let (ok, log) = validate_bootstrap(&dir.path().join("clusters.pb"), &pb, Some(&text));
    assert!(ok, "Envoy refused the bootstrap:\n{log}");

    // The control plane by DNS name: resolved (every address), its name checked and sent as SNI.
    let mut named = spec;
    named.xds = "strait-controlplane.strait-system.svc:15010"
        .parse()
        .unwrap();
    named.xds_replicas = Vec::new();
    let json = controlplane::bootstrap::envoy(&named);
    let xds = &json["static_resources"]["clusters"][0];
    assert_eq!(xds["type"], "STRICT_DNS", "{xds}");
    let tls = &xds["transport_socket"]["typed_config"];
    assert_eq!(tls["sni"], "strait-controlplane.strait-system.svc", "{tls}");
    assert_eq!(
        tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"][0],
        serde_json::json!({"san_type": "DNS", "matcher": {"exact": "strait-controlplane.strait-system.svc"}}),
        "{tls}"
    );
    let (ok, log) = validate_bootstrap(
        &dir.path().join("empty.pb"),
        &Bootstrap::default(),
        Some(&json.to_string()),
    );
    assert!(ok, "Envoy refused the bootstrap by name:\n{log}");
}

fn id_of(c: &str) -> ClusterId {
    id(c)
}

/// `envoy --mode validate` on `pb` (binary) with `yaml` (a JSON bootstrap) merged over it
/// (`--config-yaml`): whether Envoy accepts it, and what it said.
fn validate_bootstrap(
    path: &std::path::Path,
    pb: &Bootstrap,
    yaml: Option<&str>,
) -> (bool, String) {
    std::fs::write(path, pb.encode_to_vec()).unwrap();
    let mut c = Command::new(envoy());
    c.args(["--mode", "validate", "--log-level", "warn", "-c"])
        .arg(path);
    if let Some(y) = yaml {
        c.arg("--config-yaml").arg(y);
    }
    let out = c.output().unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), log)
}

/// The transparent listener (`use_original_dst`, the `original_dst` listener filter, a
/// `TcpProxy` to the passthrough cluster) and the `ORIGINAL_DST` passthrough cluster are what
/// Envoy itself accepts, next to a bootstrap that asks for them (`STRAIT_TRANSPARENT`).
#[test]
fn envoy_accepts_the_transparent_listener_and_the_passthrough_cluster() {
    use controlplane::bootstrap::BootstrapSpec;
    use controlplane::resources::{passthrough_cluster, transparent_listener};

    let dir = tempfile::tempdir().unwrap();
    let spec = BootstrapSpec {
        node_id: "app-1".into(),
        cluster: id_of("east"),
        locality: Locality::parse("l", "us-east/a").unwrap(),
        labels: Labels::default(),
        xds: "127.0.0.1:15010".parse().unwrap(),
        xds_replicas: Vec::new(),
        tls: None,
        delta: true,
        admin: "127.0.0.1:15000".parse().unwrap(),
        outbound: "127.0.0.1:15001".parse().unwrap(),
        transparent: Some("127.0.0.1:15006".parse().unwrap()),
        gateway: None,
    };
    let text = controlplane::bootstrap::envoy(&spec).to_string();
    assert!(
        text.contains(r#""STRAIT_TRANSPARENT":"127.0.0.1:15006""#),
        "{text}"
    );
    let pb = Bootstrap {
        static_resources: Some(StaticResources {
            clusters: vec![passthrough_cluster()],
            listeners: vec![transparent_listener("127.0.0.1:15006".parse().unwrap())],
            ..Default::default()
        }),
        ..Default::default()
    };
    let pb_path = dir.path().join("transparent.pb");
    let (ok, log) = validate_bootstrap(&pb_path, &pb, Some(&text));
    assert!(ok, "Envoy refused:\n{log}");
    // The check means something: an ORIGINAL_DST cluster balanced round robin is refused.
    let mut broken = passthrough_cluster();
    broken.lb_policy = cluster::LbPolicy::RoundRobin as i32;
    let pb = Bootstrap {
        static_resources: Some(StaticResources {
            clusters: vec![broken],
            ..Default::default()
        }),
        ..Default::default()
    };
    let (ok, _) = validate_bootstrap(&pb_path, &pb, None);
    assert!(
        !ok,
        "Envoy accepted an ORIGINAL_DST cluster with round robin"
    );
}
