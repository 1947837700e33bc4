//! Kubernetes discovery, the pure part: what a cluster's API objects — Services,
//! EndpointSlices, Nodes and Multi-Cluster Services `ServiceExport`s — mean for the registry.
//! [`cluster_state`] turns one consistent view of them into the cluster's [`ClusterState`]
//! (the same thing the static discovery file gives), deterministically and without I/O, and says
//! what it left out and why. The watchers that keep such a view up to date wrap it.
//!
//! Rules (docs/kubernetes.md):
//! - only services with a `ServiceExport` of the same namespace and name are published;
//! - a service's ports are its TCP ports; the protocol comes from `appProtocol` (`http`,
//!   `http2`, `kubernetes.io/h2c`, `grpc`, `tcp`, `kubernetes.io/ws`…) or else from the port
//!   name's prefix (`http`, `http-…`, `http2-…`, `grpc-…`), and is TCP otherwise;
//! - endpoints come from the EndpointSlices labelled `kubernetes.io/service-name`; an
//!   endpoint's port is the slice's port named like the service's first port (the static file's
//!   rule: other ports are reached on their service port number);
//! - health: `terminating` → draining (no new traffic), `ready` false → unhealthy, else healthy
//!   (`ready` unset means ready, as Kubernetes defines it);
//! - locality: the endpoint's `zone`, else its node's `topology.kubernetes.io/zone`; the region
//!   from the node's `topology.kubernetes.io/region`, else the cluster's; the subzone from the
//!   node's `topology.strait.io/subzone`;
//! - an address that appears in two slices (while Kubernetes moves endpoints between slices)
//!   is kept once, with its better health.

pub mod crd;
pub mod identities;
pub mod imports;
pub mod inject;
pub mod source;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use federation::model::{
    Cluster, ClusterState, Endpoint, Health, Locality, Protocol, Service, ServiceEndpoints,
    ServiceKey, ServicePort,
};
use k8s_openapi::api::core::v1::{Node, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub const SUBZONE_LABEL: &str = "topology.strait.io/subzone";

/// `(namespace, name)` of a namespaced object.
pub type ObjectKey = (String, String);

/// One view of the cluster's objects (what the watchers hold).
#[derive(Debug, Clone, Default)]
pub struct Objects {
    pub services: BTreeMap<ObjectKey, KubeService>,
    /// By (namespace, slice name).
    pub slices: BTreeMap<ObjectKey, EndpointSlice>,
    pub nodes: BTreeMap<String, Node>,
    /// The `ServiceExport`s present: (namespace, name).
    pub exports: BTreeSet<ObjectKey>,
}

/// What [`cluster_state`] made of the objects.
#[derive(Debug, Clone)]
pub struct Conversion {
    pub state: ClusterState,
    /// What was left out, each naming the object and the reason.
    pub skipped: Vec<String>,
}

/// The cluster's services and endpoints as the registry takes them.
pub fn cluster_state(cluster: &Cluster, objects: &Objects) -> Conversion {
    let mut skipped = Vec::new();
    let mut services = Vec::new();
    for (ns, name) in &objects.exports {
        let what = format!("service {ns}/{name}");
        let Some(svc) = objects.services.get(&(ns.clone(), name.clone())) else {
            skipped.push(format!("{what}: exported, but there is no such Service"));
            continue;
        };
        match service_endpoints(cluster, objects, ns, name, svc, &mut skipped) {
            Ok(s) => services.push(s),
            Err(e) => skipped.push(format!("{what}: {e}")),
        }
    }
    Conversion {
        state: ClusterState {
            cluster: cluster.clone(),
            services,
        },
        skipped,
    }
}

fn service_endpoints(
    cluster: &Cluster,
    objects: &Objects,
    ns: &str,
    name: &str,
    svc: &KubeService,
    skipped: &mut Vec<String>,
) -> Result<ServiceEndpoints, String> {
    let key = ServiceKey::new(ns, name).map_err(|e| e.to_string())?;
    let spec = svc.spec.as_ref().ok_or("the Service has no spec")?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return Err("an ExternalName Service has no endpoints to publish".into());
    }
    let mut ports = Vec::new();
    // (the service port's name as the slices name it, the port)
    let mut first_port_name: Option<String> = None;
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let proto = p.protocol.as_deref().unwrap_or("TCP");
        let port_name = p.name.clone().unwrap_or_default();
        if proto != "TCP" {
            skipped.push(format!(
                "service {ns}/{name}: port {} ({proto}) left out: only TCP ports are carried",
                p.port
            ));
            continue;
        }
        let number = u16::try_from(p.port)
            .map_err(|_| format!("spec.ports[{i}].port {} is not a port number", p.port))?;
        let model_name = if port_name.is_empty() {
            format!("port-{number}")
        } else {
            port_name.clone()
        };
        let port = ServicePort::new(
            &model_name,
            number,
            protocol(p.app_protocol.as_deref(), &port_name),
        )
        .map_err(|e| format!("spec.ports[{i}]: {e}"))?;
        if first_port_name.is_none() {
            first_port_name = Some(port_name);
        }
        ports.push(port);
    }
    let Some(first_port_name) = first_port_name else {
        return Err("the Service has no TCP port".into());
    };
    let service = Service::new(key, ports).map_err(|e| e.to_string())?;

    // address → endpoint, the better health kept for an address in two slices.
    let mut endpoints: BTreeMap<(IpAddr, u16), Endpoint> = BTreeMap::new();
    let slices = objects.slices.iter().filter(|((slice_ns, _), s)| {
        slice_ns == ns
            && s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .is_some_and(|n| n == name)
    });
    for ((_, slice_name), slice) in slices {
        let what = format!("EndpointSlice {ns}/{slice_name}");
        if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
            skipped.push(format!(
                "{what}: address type {} left out (IP addresses only)",
                slice.address_type
            ));
            continue;
        }
        let target = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref().unwrap_or("") == first_port_name)
            .and_then(|p| p.port);
        let Some(target) = target else {
            if slice.endpoints.as_ref().is_some_and(|e| !e.is_empty()) {
                skipped.push(format!(
                    "{what}: no port named `{first_port_name}` (the service's first port)"
                ));
            }
            continue;
        };
        let Ok(target) = u16::try_from(target) else {
            skipped.push(format!("{what}: port {target} is not a port number"));
            continue;
        };
        for (i, e) in slice.endpoints.iter().flatten().enumerate() {
            let Some(addr) = e.addresses.first() else {
                continue;
            };
            let address: IpAddr = match addr.parse() {
                Ok(a) => a,
                Err(_) => {
                    skipped.push(format!(
                        "{what}: endpoints[{i}] address `{addr}` is not an IP address"
                    ));
                    continue;
                }
            };
            let locality =
                match locality(cluster, objects, e.zone.as_deref(), e.node_name.as_deref()) {
                    Ok(l) => l,
                    Err(err) => {
                        skipped.push(format!("{what}: endpoints[{i}]: {err}"));
                        continue;
                    }
                };
            let health = health(e.conditions.as_ref());
            let endpoint = match Endpoint::new(address, target, locality, cluster.id.clone()) {
                Ok(ep) => ep.with_health(health),
                Err(err) => {
                    skipped.push(format!("{what}: endpoints[{i}]: {err}"));
                    continue;
                }
            };
            match endpoints.get(&(address, target)) {
                Some(have) if rank(have.health) <= rank(health) => {}
                _ => {
                    endpoints.insert((address, target), endpoint);
                }
            }
        }
    }
    ServiceEndpoints::new(
        cluster.id.clone(),
        service,
        endpoints.into_values().collect(),
    )
    .map_err(|e| e.to_string())
}

/// Lower is better.
fn rank(h: Health) -> u8 {
    match h {
        Health::Healthy => 0,
        Health::Degraded => 1,
        Health::Draining => 2,
        Health::Unhealthy => 3,
    }
}

/// An endpoint's health from its EndpointSlice conditions.
pub fn health(c: Option<&k8s_openapi::api::discovery::v1::EndpointConditions>) -> Health {
    let Some(c) = c else {
        return Health::Healthy;
    };
    if c.terminating == Some(true) {
        Health::Draining
    } else if c.ready == Some(false) {
        Health::Unhealthy
    } else {
        Health::Healthy
    }
}

/// A service port's protocol: `appProtocol` first, then the port name's prefix, else TCP.
pub fn protocol(app_protocol: Option<&str>, port_name: &str) -> Protocol {
    let by_word = |w: &str| match w {
        "http" | "kubernetes.io/ws" | "kubernetes.io/wss" => Some(Protocol::Http),
        "http2" | "h2c" | "kubernetes.io/h2c" => Some(Protocol::Http2),
        "grpc" | "grpc-web" => Some(Protocol::Grpc),
        "tcp" | "tls" | "https" => Some(Protocol::Tcp),
        _ => None,
    };
    if let Some(p) = app_protocol
        .map(str::to_ascii_lowercase)
        .and_then(|a| by_word(&a))
    {
        return p;
    }
    let prefix = port_name.split('-').next().unwrap_or("");
    by_word(&prefix.to_ascii_lowercase()).unwrap_or(Protocol::Tcp)
}

fn locality(
    cluster: &Cluster,
    objects: &Objects,
    zone: Option<&str>,
    node: Option<&str>,
) -> Result<Locality, String> {
    let labels = node
        .and_then(|n| objects.nodes.get(n))
        .and_then(|n| n.metadata.labels.as_ref());
    let label = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
    let region = label(REGION_LABEL).unwrap_or(&cluster.region);
    let zone = zone.or(label(ZONE_LABEL)).unwrap_or("");
    let subzone = if zone.is_empty() {
        ""
    } else {
        label(SUBZONE_LABEL).unwrap_or("")
    };
    Locality::new(region, zone, subzone).map_err(|e| format!("locality: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use federation::model::Name;

    fn cluster() -> Cluster {
        Cluster::new(
            Name::parse("cluster", "east").expect("id"),
            "us-east",
            None,
            vec![],
        )
        .expect("cluster")
    }

    /// Objects from real Kubernetes JSON, as the API server sends them.
    fn objects(services: &str, slices: &str, nodes: &str, exports: &[(&str, &str)]) -> Objects {
        let services: Vec<KubeService> = serde_json::from_str(services).expect("services JSON");
        let slices: Vec<EndpointSlice> = serde_json::from_str(slices).expect("slices JSON");
        let nodes: Vec<Node> = serde_json::from_str(nodes).expect("nodes JSON");
        let key = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            (
                m.namespace.clone().unwrap_or_default(),
                m.name.clone().unwrap_or_default(),
            )
        };
        Objects {
            services: services
                .into_iter()
                .map(|s| (key(&s.metadata), s))
                .collect(),
            slices: slices.into_iter().map(|s| (key(&s.metadata), s)).collect(),
            nodes: nodes
                .into_iter()
                .map(|n| (n.metadata.name.clone().unwrap_or_default(), n))
                .collect(),
            exports: exports
                .iter()
                .map(|(ns, n)| (ns.to_string(), n.to_string()))
                .collect(),
        }
    }

    const SERVICES: &str = r#"[
      {"apiVersion": "v1", "kind": "Service",
       "metadata": {"name": "payments", "namespace": "shop", "resourceVersion": "10"},
       "spec": {"ports": [
          {"name": "http-api", "port": 80, "targetPort": 8080, "protocol": "TCP"},
          {"name": "grpc", "port": 9090, "protocol": "TCP", "appProtocol": "kubernetes.io/h2c"},
          {"name": "dns", "port": 53, "protocol": "UDP"}]}},
      {"metadata": {"name": "internal", "namespace": "shop"},
       "spec": {"ports": [{"port": 5432}]}},
      {"metadata": {"name": "db", "namespace": "shop"},
       "spec": {"ports": [{"port": 5432}]}},
      {"metadata": {"name": "alias", "namespace": "shop"},
       "spec": {"type": "ExternalName", "externalName": "example.org"}}
    ]"#;

    const NODES: &str = r#"[
      {"metadata": {"name": "node-a", "labels": {
          "topology.kubernetes.io/region": "us-east",
          "topology.kubernetes.io/zone": "us-east-1a",
          "topology.strait.io/subzone": "rack-1"}}},
      {"metadata": {"name": "node-b", "labels": {"topology.kubernetes.io/zone": "us-east-1b"}}}
    ]"#;

    const SLICES: &str = r#"[
      {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
       "metadata": {"name": "payments-abc", "namespace": "shop",
                    "labels": {"kubernetes.io/service-name": "payments"}},
       "addressType": "IPv4",
       "ports": [{"name": "grpc", "port": 9091, "protocol": "TCP"},
                 {"name": "http-api", "port": 8080, "protocol": "TCP"}],
       "endpoints": [
         {"addresses": ["10.0.0.1"], "conditions": {"ready": true, "serving": true, "terminating": false},
          "nodeName": "node-a"},
         {"addresses": ["10.0.0.2"], "conditions": {"ready": false, "serving": true, "terminating": true},
          "nodeName": "node-b"},
         {"addresses": ["10.0.0.3"], "conditions": {"ready": false}, "nodeName": "node-b",
          "zone": "us-east-1c"},
         {"addresses": ["10.0.0.4"], "nodeName": "node-gone"}]},
      {"metadata": {"name": "payments-def", "namespace": "shop",
                    "labels": {"kubernetes.io/service-name": "payments"}},
       "addressType": "IPv4",
       "ports": [{"name": "http-api", "port": 8080}],
       "endpoints": [
         {"addresses": ["10.0.0.1"], "conditions": {"ready": false, "terminating": true}, "nodeName": "node-a"},
         {"addresses": ["10.0.0.5"], "conditions": {"ready": true}, "nodeName": "node-a"}]},
      {"metadata": {"name": "payments-fqdn", "namespace": "shop",
                    "labels": {"kubernetes.io/service-name": "payments"}},
       "addressType": "FQDN", "endpoints": [{"addresses": ["a.example.org"]}]},
      {"metadata": {"name": "payments-other-ns", "namespace": "other",
                    "labels": {"kubernetes.io/service-name": "payments"}},
       "addressType": "IPv4", "ports": [{"name": "http-api", "port": 8080}],
       "endpoints": [{"addresses": ["10.9.9.9"]}]},
      {"metadata": {"name": "internal-1", "namespace": "shop",
                    "labels": {"kubernetes.io/service-name": "internal"}},
       "addressType": "IPv4", "ports": [{"port": 5432}],
       "endpoints": [{"addresses": ["10.0.1.1"]}]},
      {"metadata": {"name": "db-1", "namespace": "shop",
                    "labels": {"kubernetes.io/service-name": "db"}},
       "addressType": "IPv6", "ports": [{"port": 15432}],
       "endpoints": [{"addresses": ["fd00::1"], "zone": "us-east-1a"}]}
    ]"#;

    fn by_address(s: &ServiceEndpoints) -> Vec<(String, u16, Health, String)> {
        s.endpoints
            .iter()
            .map(|e| {
                (
                    e.address.to_string(),
                    e.port,
                    e.health,
                    format!(
                        "{}/{}/{}",
                        e.locality.region(),
                        e.locality.zone(),
                        e.locality.subzone()
                    ),
                )
            })
            .collect()
    }

    #[test]
    fn exported_services_become_the_clusters_state() {
        let o = objects(
            SERVICES,
            SLICES,
            NODES,
            &[("shop", "payments"), ("shop", "db")],
        );
        let c = cluster_state(&cluster(), &o);
        let names: Vec<String> = c
            .state
            .services
            .iter()
            .map(|s| format!("{}.{}", s.service.key.name, s.service.key.namespace))
            .collect();
        assert_eq!(
            names,
            ["db.shop", "payments.shop"],
            "only exported services, in order"
        );

        let payments = &c.state.services[1];
        let ports: Vec<(String, u16, Protocol)> = payments
            .service
            .ports
            .iter()
            .map(|p| (p.name.to_string(), p.port, p.protocol))
            .collect();
        assert_eq!(
            ports,
            [
                ("http-api".to_string(), 80, Protocol::Http),
                ("grpc".to_string(), 9090, Protocol::Http2),
            ],
            "TCP ports only, protocol from appProtocol or the name"
        );
        use Health::*;
        assert_eq!(
            by_address(payments),
            [
                // In two slices: ready in one, terminating in the other — the better kept.
                (
                    "10.0.0.1".into(),
                    8080,
                    Healthy,
                    "us-east/us-east-1a/rack-1".into()
                ),
                (
                    "10.0.0.2".into(),
                    8080,
                    Draining,
                    "us-east/us-east-1b/".into()
                ),
                // The endpoint's own zone wins over its node's.
                (
                    "10.0.0.3".into(),
                    8080,
                    Unhealthy,
                    "us-east/us-east-1c/".into()
                ),
                // A node we do not know: the cluster's region, no zone.
                ("10.0.0.4".into(), 8080, Healthy, "us-east//".into()),
                (
                    "10.0.0.5".into(),
                    8080,
                    Healthy,
                    "us-east/us-east-1a/rack-1".into()
                ),
            ],
            "the first port's target port, health from conditions, locality from nodes"
        );
        let db = &c.state.services[0];
        assert_eq!(db.service.ports[0].name.to_string(), "port-5432");
        assert_eq!(
            by_address(db),
            [(
                "fd00::1".into(),
                15432,
                Healthy,
                "us-east/us-east-1a/".into()
            )]
        );
        let skipped = c.skipped.join("\n");
        assert!(
            skipped.contains("service shop/payments: port 53 (UDP) left out"),
            "{skipped}"
        );
        assert!(
            skipped.contains("EndpointSlice shop/payments-fqdn: address type FQDN left out"),
            "{skipped}"
        );
        assert!(
            !skipped.contains("internal"),
            "unexported is not even looked at: {skipped}"
        );
    }

    #[test]
    fn what_cannot_be_published_is_named_with_its_reason() {
        let o = objects(
            SERVICES,
            r#"[{"metadata": {"name": "payments-x", "namespace": "shop",
                             "labels": {"kubernetes.io/service-name": "payments"}},
                 "addressType": "IPv4", "ports": [{"name": "other", "port": 1}],
                 "endpoints": [{"addresses": ["10.0.0.9"]}]},
                {"metadata": {"name": "db-x", "namespace": "shop",
                             "labels": {"kubernetes.io/service-name": "db"}},
                 "addressType": "IPv4", "ports": [{"port": 5432}],
                 "endpoints": [{"addresses": ["not-an-ip"]}, {"addresses": ["10.0.0.8"], "zone": "bad zone!"}]}]"#,
            "[]",
            &[
                ("shop", "alias"),
                ("shop", "missing"),
                ("shop", "payments"),
                ("shop", "db"),
            ],
        );
        let c = cluster_state(&cluster(), &o);
        let skipped = c.skipped.join("\n");
        for want in [
            "service shop/alias: an ExternalName Service has no endpoints to publish",
            "service shop/missing: exported, but there is no such Service",
            "EndpointSlice shop/payments-x: no port named `http-api`",
            "EndpointSlice shop/db-x: endpoints[0] address `not-an-ip` is not an IP address",
            "EndpointSlice shop/db-x: endpoints[1]: locality",
        ] {
            assert!(skipped.contains(want), "missing `{want}` in:\n{skipped}");
        }
        // What could be published still is: both services, without the bad endpoints.
        assert_eq!(c.state.services.len(), 2);
        assert!(c.state.services.iter().all(|s| s.endpoints.is_empty()));
    }

    #[test]
    fn protocols_from_app_protocol_then_the_port_name() {
        for (app, name, want) in [
            (Some("http"), "x", Protocol::Http),
            (Some("kubernetes.io/h2c"), "http", Protocol::Http2),
            (Some("GRPC"), "", Protocol::Grpc),
            (Some("kubernetes.io/ws"), "", Protocol::Http),
            (Some("tcp"), "http", Protocol::Tcp),
            (Some("example.com/custom"), "grpc-api", Protocol::Grpc),
            (None, "http", Protocol::Http),
            (None, "http2-web", Protocol::Http2),
            (None, "grpc", Protocol::Grpc),
            (None, "https", Protocol::Tcp),
            (None, "postgres", Protocol::Tcp),
            (None, "", Protocol::Tcp),
        ] {
            assert_eq!(protocol(app, name), want, "{app:?} {name}");
        }
    }

    #[test]
    fn health_from_conditions() {
        use k8s_openapi::api::discovery::v1::EndpointConditions as C;
        let c = |ready, serving, terminating| C {
            ready,
            serving,
            terminating,
        };
        assert_eq!(health(None), Health::Healthy);
        assert_eq!(health(Some(&c(None, None, None))), Health::Healthy);
        assert_eq!(
            health(Some(&c(Some(true), Some(true), Some(false)))),
            Health::Healthy
        );
        assert_eq!(health(Some(&c(Some(false), None, None))), Health::Unhealthy);
        assert_eq!(
            health(Some(&c(Some(false), Some(true), Some(true)))),
            Health::Draining,
            "a terminating endpoint gets no new traffic"
        );
    }
}
