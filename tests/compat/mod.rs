//! Compatibility with the previous release: the registry's values, the tunnel frames between
//! gateways and the xDS nodes proxies introduce themselves with, as this release encodes them,
//! are kept as golden files in `tests/compat/` — so that a rolling upgrade, with old and new
//! components side by side, is safe:
//!
//! - every golden file must still **decode** to what it meant (old writers, new readers);
//! - today's encoding of the same values must still **equal** the golden files (new writers, old
//!   readers): a change of encoding fails here, and must come with new golden files of a new
//!   version, kept beside these, and readers that understand both.
//!
//! The files are written once, by `STRAIT_COMPAT_BLESS=1 cargo test --test cli compat`
//! when they do not exist yet; that never overwrites one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use federation::registry::codec::{
    Decoder, encode_cluster, encode_link, encode_peering, encode_policy, encode_service_endpoints,
    encode_withdrawal,
};
use federation::registry::{RegistryKey, RegistryValue};
use federation::tunnel::{StatusCode, TunnelHeader, TunnelStatus, encode_frame, parse_frame};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/compat")
}

/// Read a golden file, or (bless mode, file absent) write `today` into it.
fn golden(name: &str, today: &str) -> String {
    let path = dir().join(name);
    match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(_) if std::env::var_os("STRAIT_COMPAT_BLESS").is_some() => {
            std::fs::write(&path, today).unwrap();
            today.to_string()
        }
        Err(e) => panic!(
            "{}: {e} (golden files are written once, with STRAIT_COMPAT_BLESS=1)",
            path.display()
        ),
    }
}

/// The registry entries of a small federation, as this release writes them.
fn registry_today() -> BTreeMap<String, serde_json::Value> {
    use federation::model::{
        Cluster, Endpoint, GatewayAddress, Health, Labels, LinkHealth, LinkState, Locality, Name,
        Peering, Protocol, Service, ServiceEndpoints, ServiceKey, ServicePort, Withdrawal,
    };
    let n = |s: &str| Name::parse("name", s).unwrap();
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_000_000);
    let east = Cluster::new(
        n("east"),
        "us-east",
        None,
        vec![GatewayAddress::parse("g", "gw.east.example.com:15443").unwrap()],
    )
    .unwrap();
    let key = ServiceKey::new("default", "echo").unwrap();
    let service = Service::new(
        key.clone(),
        vec![
            ServicePort::new("http", 8080, Protocol::Http).unwrap(),
            ServicePort::new("grpc", 9090, Protocol::Grpc).unwrap(),
        ],
    )
    .unwrap();
    let a = Locality::new("us-east", "us-east-1a", "").unwrap();
    let b = Locality::new("us-east", "us-east-1b", "rack-2").unwrap();
    let labels = Labels::new(BTreeMap::from([
        ("version".to_string(), "v2".to_string()),
        ("strait.io/tls-mode".to_string(), "mutual".to_string()),
    ]))
    .unwrap();
    let endpoints = vec![
        Endpoint::new("10.0.0.1".parse().unwrap(), 18081, a, n("east")).unwrap(),
        Endpoint::new("fd00::2".parse().unwrap(), 18082, b, n("east"))
            .unwrap()
            .with_weight(3)
            .unwrap()
            .with_health(Health::Draining)
            .with_labels(labels),
    ];
    let set = ServiceEndpoints::new(n("east"), service, endpoints).unwrap();
    let policies = federation::policy_file::parse(
        "compat.yaml",
        "policies:\n  - failover_priority: [topology.kubernetes.io/region, strait.io/cluster]\n\
         \x20 - service: echo.default\n    targets: [{cluster: west}, {region: us-east}]\n\
         \x20   distribute:\n      - from: \"us-east/*\"\n        to: {\"us-east/*\": 70, \"us-west/*\": 30}\n\
         \x20   http:\n      - name: canary\n        match: {path: {prefix: /api/}, headers: [{name: x-canary, exact: \"1\"}]}\n\
         \x20       to: [{service: echo-v2.default, weight: 10}, {service: echo.default, weight: 90}]\n\
         \x20       timeout: 2s\n        retries: {attempts: 3, per_try_timeout: 500ms, on: [5xx, reset]}\n",
    )
    .unwrap();
    let link = LinkState {
        from: n("east"),
        to: n("west"),
        state: LinkHealth::Degraded,
        rtt_ms: 48.25,
        loss: 0.02,
        since: at,
    };
    let peering = Peering {
        cluster: n("east"),
        peer: n("west"),
        region: n("us-west"),
        gateways: vec![GatewayAddress::parse("g", "203.0.113.7:15443").unwrap()],
        trust_domain: "west.example.com".into(),
        ca_bundle: Some(include_str!("peer-ca.pem").into()),
    };
    let withdrawn = Withdrawal {
        cluster: n("north"),
        at,
    };
    let json = |b: Vec<u8>| serde_json::from_slice::<serde_json::Value>(&b).unwrap();
    let mut out = BTreeMap::new();
    out.insert(
        RegistryKey::cluster(&n("east")),
        json(encode_cluster(&east)),
    );
    out.insert(
        RegistryKey::Endpoints(n("east"), key).encode(),
        json(encode_service_endpoints(&set)),
    );
    for p in &policies {
        out.insert(
            RegistryKey::Policy(p.scope.clone()).encode(),
            json(encode_policy(p)),
        );
    }
    out.insert(
        RegistryKey::Link(n("east"), n("west")).encode(),
        json(encode_link(&link)),
    );
    out.insert(
        RegistryKey::Peering(n("east"), n("west")).encode(),
        json(encode_peering(&peering)),
    );
    out.insert(
        RegistryKey::withdrawn(&n("north")),
        json(encode_withdrawal(&withdrawn)),
    );
    out
}

#[test]
fn registry_values_of_the_previous_release_still_decode_and_encode_the_same() {
    let today = registry_today();
    let text = golden(
        "registry-v1.json",
        &(serde_json::to_string_pretty(&today).unwrap() + "\n"),
    );
    let old: BTreeMap<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(old.len(), 7, "every kind of value");
    let mut decoder = Decoder::new();
    for (raw, value) in &old {
        let key = RegistryKey::parse(raw).unwrap_or_else(|| panic!("{raw}: key not understood"));
        let bytes = serde_json::to_vec(value).unwrap();
        let decoded = decoder
            .decode(&key, raw, &bytes)
            .unwrap_or_else(|e| panic!("{raw}: {e}"));
        match (&decoded, raw.as_str()) {
            (RegistryValue::Endpoints(s), _) => {
                assert_eq!(s.endpoints.len(), 2);
                assert_eq!(s.endpoints[1].weight, 3);
                assert!(!s.endpoints[1].health.is_serving());
                assert_eq!(s.service.ports.len(), 2);
            }
            (RegistryValue::Cluster(c), _) => assert_eq!(c.region.to_string(), "us-east"),
            (RegistryValue::Policy(p), k) if k.ends_with("/echo") => {
                assert_eq!(p.targets.len(), 2);
                assert_eq!(p.http.len(), 1);
                assert_eq!(p.distribute.len(), 1);
            }
            (RegistryValue::Policy(p), _) => assert_eq!(p.failover_priority.len(), 2),
            (RegistryValue::Link(l), _) => assert!((l.rtt_ms - 48.25).abs() < 1e-9),
            (RegistryValue::Peering(p), _) => assert!(p.ca_bundle.is_some()),
            (RegistryValue::Withdrawn(w), _) => assert_eq!(w.cluster.as_str(), "north"),
        }
    }
    for (k, v) in &today {
        assert_eq!(
            Some(v),
            old.get(k),
            "{k}: this release encodes it differently from the golden file: readers of the \
             previous release must still read it — keep tests/compat/registry-v1.json, add a \
             new version beside it"
        );
    }
}

#[test]
fn tunnel_frames_of_the_previous_release_still_parse_and_encode_the_same() {
    let header = TunnelHeader {
        version: 1,
        service: "payments".into(),
        namespace: "shop".into(),
        port: 8443,
        source_cluster: "east".into(),
        source_identity: "spiffe://federation.example.com/cluster/east/ns/shop/sa/frontend".into(),
        request_id: "req-42".into(),
        endpoint: String::new(),
    };
    let statuses = [
        TunnelStatus {
            code: StatusCode::Ok as i32,
            message: String::new(),
            endpoint: "10.1.0.7:8443".into(),
        },
        TunnelStatus {
            code: StatusCode::NoEndpoint as i32,
            message: "service payments.shop has no healthy endpoint here".into(),
            endpoint: String::new(),
        },
    ];
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let today = format!(
        "header {}\nstatus-ok {}\nstatus-no-endpoint {}\n",
        hex(&encode_frame(&header).unwrap()),
        hex(&encode_frame(&statuses[0]).unwrap()),
        hex(&encode_frame(&statuses[1]).unwrap()),
    );
    let text = golden("tunnel-v1.txt", &today);
    let frame = |label: &str| -> Vec<u8> {
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{label} ")))
            .unwrap_or_else(|| panic!("no {label} in tunnel-v1.txt"));
        (0..line.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&line[i..i + 2], 16).unwrap())
            .collect()
    };
    let (h, n) = parse_frame::<TunnelHeader>(&frame("header"))
        .unwrap()
        .unwrap();
    assert_eq!(n, frame("header").len());
    assert_eq!(h, header);
    h.validate().unwrap();
    let (s, _) = parse_frame::<TunnelStatus>(&frame("status-ok"))
        .unwrap()
        .unwrap();
    assert_eq!(s, statuses[0]);
    let (s, _) = parse_frame::<TunnelStatus>(&frame("status-no-endpoint"))
        .unwrap()
        .unwrap();
    assert_eq!(s.code(), StatusCode::NoEndpoint);
    assert_eq!(
        today, text,
        "this release encodes the tunnel frames differently from tests/compat/tunnel-v1.txt: \
         gateways of the previous release must still read them"
    );
}

/// A protobuf `Struct` from JSON (what a bootstrap's node metadata is).
fn to_struct(v: &serde_json::Value) -> envoy_types::pb::google::protobuf::Struct {
    use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value::Kind};
    fn value(v: &serde_json::Value) -> Value {
        let kind = match v {
            serde_json::Value::Null => Kind::NullValue(0),
            serde_json::Value::Bool(b) => Kind::BoolValue(*b),
            serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
            serde_json::Value::String(s) => Kind::StringValue(s.clone()),
            serde_json::Value::Array(a) => Kind::ListValue(ListValue {
                values: a.iter().map(value).collect(),
            }),
            serde_json::Value::Object(o) => Kind::StructValue(Struct {
                fields: o.iter().map(|(k, v)| (k.clone(), value(v))).collect(),
            }),
        };
        Value { kind: Some(kind) }
    }
    match value(v).kind {
        Some(Kind::StructValue(s)) => s,
        _ => Struct::default(),
    }
}

/// JSON of a protobuf `Struct`.
fn from_struct(s: &envoy_types::pb::google::protobuf::Struct) -> serde_json::Value {
    use envoy_types::pb::google::protobuf::{Value, value::Kind};
    fn json(v: &Value) -> serde_json::Value {
        match &v.kind {
            Some(Kind::BoolValue(b)) => (*b).into(),
            Some(Kind::NumberValue(n)) => (*n).into(),
            Some(Kind::StringValue(s)) => s.clone().into(),
            Some(Kind::ListValue(l)) => l.values.iter().map(json).collect(),
            Some(Kind::StructValue(s)) => s
                .fields
                .iter()
                .map(|(k, v)| (k.clone(), json(v)))
                .collect::<serde_json::Map<_, _>>()
                .into(),
            _ => serde_json::Value::Null,
        }
    }
    s.fields
        .iter()
        .map(|(k, v)| (k.clone(), json(v)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

#[test]
fn xds_nodes_of_the_previous_release_still_get_their_view() {
    use controlplane::bootstrap::{BootstrapSpec, envoy, grpc};
    use controlplane::resources::ClientKind;
    use controlplane::view::NodeInfo;
    use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
    let cluster = federation::model::Name::parse("c", "east").unwrap();
    // Strait's proxy, and the nodes of the bootstraps for Envoy and proxyless gRPC.
    let strait = proxy::xds::node(
        "app-1",
        "east",
        ("us-east", "us-east-1a", ""),
        &[("version".to_string(), "v1".to_string())],
        "127.0.0.1:15001".parse().unwrap(),
        true,
        true,
    );
    let spec = BootstrapSpec {
        node_id: "app-2".into(),
        cluster: cluster.clone(),
        locality: federation::model::Locality::new("us-east", "us-east-1b", "").unwrap(),
        labels: federation::model::Labels::new(BTreeMap::from([(
            "version".to_string(),
            "v2".to_string(),
        )]))
        .unwrap(),
        xds: "127.0.0.1:15010".parse().unwrap(),
        xds_replicas: Vec::new(),
        tls: None,
        delta: false,
        admin: "127.0.0.1:15000".parse().unwrap(),
        outbound: "127.0.0.1:15001".parse().unwrap(),
        transparent: Some("127.0.0.1:15006".parse().unwrap()),
        gateway: None,
    };
    let node_json = |n: &Node| {
        serde_json::json!({
            "id": n.id,
            "cluster": n.cluster,
            "user_agent_name": n.user_agent_name,
            "locality": n.locality.as_ref().map(|l| serde_json::json!({
                "region": l.region, "zone": l.zone, "sub_zone": l.sub_zone})),
            "metadata": n.metadata.as_ref().map(from_struct),
        })
    };
    let mut today = BTreeMap::new();
    today.insert("strait-proxy", node_json(&strait));
    today.insert("envoy-bootstrap", envoy(&spec)["node"].clone());
    let mut g = grpc(&spec)["node"].clone();
    g["user_agent_name"] = "grpc-python".into();
    today.insert("grpc-bootstrap", g);
    let text = golden(
        "xds-nodes-v1.json",
        &(serde_json::to_string_pretty(&today).unwrap() + "\n"),
    );
    let old: BTreeMap<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
    for (name, j) in &old {
        let loc = &j["locality"];
        let node = Node {
            id: j["id"].as_str().unwrap_or_default().into(),
            cluster: j["cluster"].as_str().unwrap_or_default().into(),
            user_agent_name: j["user_agent_name"].as_str().unwrap_or_default().into(),
            locality: loc.is_object().then(|| Locality {
                region: loc["region"].as_str().unwrap_or_default().into(),
                zone: loc["zone"].as_str().unwrap_or_default().into(),
                sub_zone: loc["sub_zone"].as_str().unwrap_or_default().into(),
            }),
            metadata: j["metadata"].is_object().then(|| to_struct(&j["metadata"])),
            ..Default::default()
        };
        let info =
            NodeInfo::parse(&node, &cluster, "us-east").unwrap_or_else(|e| panic!("{name}: {e}"));
        match name.as_str() {
            "strait-proxy" => {
                assert_eq!(info.key.kind, ClientKind::Envoy);
                assert!(info.key.tunnel && info.key.mtls);
                assert_eq!(info.key.locality.to_string(), "us-east/us-east-1a");
            }
            "envoy-bootstrap" => {
                assert_eq!(info.key.kind, ClientKind::Envoy);
                assert_eq!(
                    info.key.transparent,
                    Some("127.0.0.1:15006".parse().unwrap())
                );
            }
            "grpc-bootstrap" => assert_eq!(info.key.kind, ClientKind::Grpc),
            other => panic!("unexpected node {other}"),
        }
        assert_eq!(
            info.key.labels.as_map().get("version").map(String::as_str),
            Some(if name == "strait-proxy" { "v1" } else { "v2" }),
            "{name}"
        );
    }
    for (name, j) in &today {
        assert_eq!(
            Some(j),
            old.get(*name),
            "{name}: this release introduces its nodes differently from \
             tests/compat/xds-nodes-v1.json: control planes of the previous release must still \
             understand them"
        );
    }
}
