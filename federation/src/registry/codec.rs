//! The registry's key layout and value encoding, version 1. See `docs/registry.md`.
//!
//! ```text
//! /strait/v1/clusters/{cluster}                       Cluster          (cluster's lease)
//! /strait/v1/endpoints/{cluster}/{namespace}/{service} ServiceEndpoints (cluster's lease)
//! /strait/v1/policies/default                         FailoverPolicy   (no lease)
//! /strait/v1/policies/services/{namespace}/{service}   FailoverPolicy   (no lease)
//! /strait/v1/links/{from}/{to}                         LinkState        (gateway's lease; one gateway)
//! /strait/v1/links/{from}/{to}/{replica}               LinkState        (that gateway replica's lease)
//! /strait/v1/peerings/{cluster}/{peer}                 Peering          (no lease)
//! /strait/v1/withdrawn/{cluster}                       Withdrawal       (no lease)
//! /strait/v1/leaders/{cluster}                         replica name     (the leader's lease)
//! ```
//!
//! Values are JSON objects with a `"v": 1` field. JSON because operators read the registry with
//! `etcdctl get` and `strait registry dump` in incidents, because it evolves by adding optional
//! fields, and because with defaults left out an endpoint costs about 60 bytes.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::RegistryError;
use crate::model::{
    Cluster, ClusterId, Endpoint, FailoverPolicy, Health, Labels, LinkState, Locality, Name,
    Peering, PolicyScope, Service, ServiceEndpoints, ServiceKey, ServicePort, Withdrawal,
};

/// The root of every key this version writes.
pub const ROOT: &str = "/strait/v1/";
/// The encoding version written in every value.
pub const VERSION: u32 = 1;

/// A parsed registry key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RegistryKey {
    Cluster(ClusterId),
    Endpoints(ClusterId, ServiceKey),
    Policy(PolicyScope),
    Link(ClusterId, ClusterId),
    /// The link as one of `from`'s gateway replicas measures it; readers merge the replicas
    /// (the link is up while any replica's is).
    ReplicaLink(ClusterId, ClusterId, Name),
    Peering(ClusterId, ClusterId),
    /// The tombstone of a cluster withdrawn on purpose.
    Withdrawn(ClusterId),
}

impl RegistryKey {
    pub fn encode(&self) -> String {
        match self {
            RegistryKey::Cluster(c) => format!("{ROOT}clusters/{c}"),
            RegistryKey::Endpoints(c, s) => {
                format!("{ROOT}endpoints/{c}/{}/{}", s.namespace, s.name)
            }
            RegistryKey::Policy(PolicyScope::Default) => format!("{ROOT}policies/default"),
            RegistryKey::Policy(PolicyScope::Service(s)) => {
                format!("{ROOT}policies/services/{}/{}", s.namespace, s.name)
            }
            RegistryKey::Link(a, b) => format!("{ROOT}links/{a}/{b}"),
            RegistryKey::ReplicaLink(a, b, r) => format!("{ROOT}links/{a}/{b}/{r}"),
            RegistryKey::Peering(a, b) => format!("{ROOT}peerings/{a}/{b}"),
            RegistryKey::Withdrawn(c) => format!("{ROOT}withdrawn/{c}"),
        }
    }

    /// Parse a key; `None` for keys this version does not know (left alone, for forward
    /// compatibility).
    pub fn parse(key: &str) -> Option<Self> {
        let rest = key.strip_prefix(ROOT)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let name = |s: &str| Name::parse("key", s).ok();
        match parts.as_slice() {
            ["clusters", c] => Some(RegistryKey::Cluster(name(c)?)),
            ["endpoints", c, ns, svc] => Some(RegistryKey::Endpoints(
                name(c)?,
                ServiceKey {
                    namespace: name(ns)?,
                    name: name(svc)?,
                },
            )),
            ["policies", "default"] => Some(RegistryKey::Policy(PolicyScope::Default)),
            ["policies", "services", ns, svc] => {
                Some(RegistryKey::Policy(PolicyScope::Service(ServiceKey {
                    namespace: name(ns)?,
                    name: name(svc)?,
                })))
            }
            ["links", a, b] => Some(RegistryKey::Link(name(a)?, name(b)?)),
            ["links", a, b, r] => Some(RegistryKey::ReplicaLink(name(a)?, name(b)?, name(r)?)),
            ["peerings", a, b] => Some(RegistryKey::Peering(name(a)?, name(b)?)),
            ["withdrawn", c] => Some(RegistryKey::Withdrawn(name(c)?)),
            _ => None,
        }
    }

    /// The cluster record key.
    pub fn cluster(c: &ClusterId) -> String {
        RegistryKey::Cluster(c.clone()).encode()
    }
    /// The prefix holding a cluster's endpoints (with the trailing `/`).
    pub fn endpoints_prefix(c: &ClusterId) -> String {
        format!("{ROOT}endpoints/{c}/")
    }
    /// The prefix holding the links measured by a cluster's gateway.
    pub fn links_prefix(c: &ClusterId) -> String {
        format!("{ROOT}links/{c}/")
    }
    /// The prefix holding a cluster's peerings (its `FederatedCluster` objects).
    pub fn peerings_prefix(c: &ClusterId) -> String {
        format!("{ROOT}peerings/{c}/")
    }
    /// The key a cluster's control-plane replicas compete for: its holder publishes.
    pub fn leader(c: &ClusterId) -> String {
        format!("{ROOT}leaders/{c}")
    }
    /// The tombstone of a withdrawn cluster.
    pub fn withdrawn(c: &ClusterId) -> String {
        RegistryKey::Withdrawn(c.clone()).encode()
    }
    /// The prefix holding every failover policy.
    pub fn policies_prefix() -> String {
        format!("{ROOT}policies/")
    }
}

#[derive(Serialize, Deserialize)]
struct Versioned<T> {
    v: u32,
    #[serde(flatten)]
    body: T,
}

fn check_version(key: &str, v: u32) -> Result<(), RegistryError> {
    if v != VERSION {
        return Err(RegistryError::Decode {
            key: key.to_string(),
            message: format!(
                "unsupported encoding version {v} (this strait reads version {VERSION})"
            ),
        });
    }
    Ok(())
}

/// Unknown fields are ignored (a newer writer may add optional ones).
#[derive(Serialize, Deserialize)]
struct ClusterWire {
    v: u32,
    id: Name,
    region: String,
    network: Name,
    #[serde(default)]
    gateways: Vec<crate::model::GatewayAddress>,
}

#[derive(Serialize, Deserialize)]
struct ServiceWire<'a> {
    v: u32,
    name: Name,
    namespace: Name,
    ports: Vec<ServicePort>,
    #[serde(borrow)]
    endpoints: Vec<EndpointWire<'a>>,
}

#[derive(Serialize, Deserialize)]
struct EndpointWire<'a> {
    address: IpAddr,
    port: u16,
    #[serde(borrow)]
    locality: std::borrow::Cow<'a, str>,
    #[serde(default, skip_serializing_if = "is_healthy")]
    health: Health,
    #[serde(default = "one", skip_serializing_if = "is_one")]
    weight: u32,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    labels: BTreeMap<String, String>,
}

fn is_healthy(h: &Health) -> bool {
    *h == Health::Healthy
}
fn one() -> u32 {
    1
}
fn is_one(w: &u32) -> bool {
    *w == 1
}

/// Encodes registry values.
pub fn encode_cluster(c: &Cluster) -> Vec<u8> {
    let wire = ClusterWire {
        v: VERSION,
        id: c.id.clone(),
        region: c.region.to_string(),
        network: c.network.clone(),
        gateways: c.gateways.clone(),
    };
    serde_json::to_vec(&wire).unwrap_or_default()
}

pub fn encode_service_endpoints(s: &ServiceEndpoints) -> Vec<u8> {
    let wire = ServiceWire {
        v: VERSION,
        name: s.service.key.name.clone(),
        namespace: s.service.key.namespace.clone(),
        ports: s.service.ports.to_vec(),
        endpoints: s
            .endpoints
            .iter()
            .map(|e| EndpointWire {
                address: e.address,
                port: e.port,
                locality: e.locality.to_string().into(),
                health: e.health,
                weight: e.weight,
                labels: e.labels.as_map().clone(),
            })
            .collect(),
    };
    serde_json::to_vec(&wire).unwrap_or_default()
}

pub fn encode_policy(p: &FailoverPolicy) -> Vec<u8> {
    serde_json::to_vec(&Versioned {
        v: VERSION,
        body: p,
    })
    .unwrap_or_default()
}

pub fn encode_peering(p: &Peering) -> Vec<u8> {
    serde_json::to_vec(&Versioned {
        v: VERSION,
        body: p,
    })
    .unwrap_or_default()
}

pub fn encode_withdrawal(w: &Withdrawal) -> Vec<u8> {
    serde_json::to_vec(&Versioned {
        v: VERSION,
        body: w,
    })
    .unwrap_or_default()
}

pub fn encode_link(l: &LinkState) -> Vec<u8> {
    serde_json::to_vec(&Versioned {
        v: VERSION,
        body: l,
    })
    .unwrap_or_default()
}

/// The key/value pairs a cluster publishes for its state.
pub fn cluster_state_kvs(state: &crate::model::ClusterState) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    out.insert(
        RegistryKey::cluster(&state.cluster.id),
        encode_cluster(&state.cluster),
    );
    for s in &state.services {
        out.insert(
            RegistryKey::Endpoints(s.cluster.clone(), s.service.key.clone()).encode(),
            encode_service_endpoints(s),
        );
    }
    out
}

/// A decoded registry value.
#[derive(Debug, Clone, PartialEq)]
pub enum RegistryValue {
    Cluster(Arc<Cluster>),
    Endpoints(Arc<ServiceEndpoints>),
    Policy(Arc<FailoverPolicy>),
    Link(Arc<LinkState>),
    Peering(Arc<Peering>),
    Withdrawn(Arc<Withdrawal>),
}

/// Decodes values, sharing repeated strings (localities, label sets) between endpoints so that
/// a snapshot of a million endpoints stays small.
#[derive(Default)]
pub struct Decoder {
    localities: HashMap<String, Arc<Locality>>,
    labels: HashMap<BTreeMap<String, String>, Labels>,
    ports: HashMap<Vec<ServicePort>, Arc<[ServicePort]>>,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forget interned values (after a full resync, so stale strings do not accumulate).
    pub fn clear(&mut self) {
        self.localities.clear();
        self.labels.clear();
        self.ports.clear();
    }

    pub fn decode(
        &mut self,
        key: &RegistryKey,
        raw_key: &str,
        value: &[u8],
    ) -> Result<RegistryValue, RegistryError> {
        let err = |e: serde_json::Error| RegistryError::Decode {
            key: raw_key.to_string(),
            message: e.to_string(),
        };
        let model_err = |e: crate::model::ModelError| RegistryError::Decode {
            key: raw_key.to_string(),
            message: e.to_string(),
        };
        match key {
            RegistryKey::Cluster(id) => {
                let w: ClusterWire = serde_json::from_slice(value).map_err(err)?;
                check_version(raw_key, w.v)?;
                if &w.id != id {
                    return Err(RegistryError::Decode {
                        key: raw_key.to_string(),
                        message: format!("value names cluster `{}`, key names `{id}`", w.id),
                    });
                }
                let c = Cluster::new(w.id, &w.region, Some(w.network), w.gateways)
                    .map_err(model_err)?;
                Ok(RegistryValue::Cluster(Arc::new(c)))
            }
            RegistryKey::Endpoints(cluster, skey) => {
                let w: ServiceWire = serde_json::from_slice(value).map_err(err)?;
                check_version(raw_key, w.v)?;
                if w.name != skey.name || w.namespace != skey.namespace {
                    return Err(RegistryError::Decode {
                        key: raw_key.to_string(),
                        message: format!(
                            "value names service {}.{}, key names {skey}",
                            w.name, w.namespace
                        ),
                    });
                }
                let ports = match self.ports.get(&w.ports) {
                    Some(p) => p.clone(),
                    None => {
                        let p: Arc<[ServicePort]> = w.ports.clone().into();
                        self.ports.insert(w.ports, p.clone());
                        p
                    }
                };
                let service = Service::new(skey.clone(), ports.to_vec()).map_err(model_err)?;
                let service = Service {
                    key: service.key,
                    ports,
                };
                let mut endpoints = Vec::with_capacity(w.endpoints.len());
                for (i, e) in w.endpoints.into_iter().enumerate() {
                    let locality = match self.localities.get(e.locality.as_ref()) {
                        Some(l) => l.clone(),
                        None => {
                            let l = Arc::new(
                                Locality::parse(&format!("endpoints[{i}].locality"), &e.locality)
                                    .map_err(model_err)?,
                            );
                            self.localities.insert(e.locality.to_string(), l.clone());
                            l
                        }
                    };
                    let labels = if e.labels.is_empty() {
                        Labels::default()
                    } else {
                        match self.labels.get(&e.labels) {
                            Some(l) => l.clone(),
                            None => {
                                let l = Labels::new(e.labels.clone())
                                    .map_err(|m| model_err(m.within(format!("endpoints[{i}]"))))?;
                                self.labels.insert(e.labels, l.clone());
                                l
                            }
                        }
                    };
                    let ep = Endpoint {
                        address: e.address,
                        port: crate::model::validate_port(&format!("endpoints[{i}].port"), e.port)
                            .map_err(model_err)?,
                        locality,
                        cluster: cluster.clone(),
                        health: e.health,
                        weight: crate::model::validate_weight(
                            &format!("endpoints[{i}].weight"),
                            e.weight,
                        )
                        .map_err(model_err)?,
                        labels,
                    };
                    endpoints.push(ep);
                }
                let set = ServiceEndpoints::new(cluster.clone(), service, endpoints)
                    .map_err(model_err)?;
                Ok(RegistryValue::Endpoints(Arc::new(set)))
            }
            RegistryKey::Policy(scope) => {
                let w: Versioned<FailoverPolicy> = serde_json::from_slice(value).map_err(err)?;
                check_version(raw_key, w.v)?;
                if &w.body.scope != scope {
                    return Err(RegistryError::Decode {
                        key: raw_key.to_string(),
                        message: format!("value is for {}, key for {scope}", w.body.scope),
                    });
                }
                w.body.validate().map_err(model_err)?;
                Ok(RegistryValue::Policy(Arc::new(w.body)))
            }
            RegistryKey::Link(from, to) | RegistryKey::ReplicaLink(from, to, _) => {
                let w: Versioned<LinkState> = serde_json::from_slice(value).map_err(err)?;
                check_version(raw_key, w.v)?;
                if &w.body.from != from || &w.body.to != to {
                    return Err(RegistryError::Decode {
                        key: raw_key.to_string(),
                        message: format!(
                            "value is for link {}→{}, key for {from}→{to}",
                            w.body.from, w.body.to
                        ),
                    });
                }
                w.body.validate().map_err(model_err)?;
                Ok(RegistryValue::Link(Arc::new(w.body)))
            }
            RegistryKey::Peering(cluster, peer) => {
                let w: Versioned<Peering> = serde_json::from_slice(value).map_err(err)?;
                check_version(raw_key, w.v)?;
                if &w.body.cluster != cluster || &w.body.peer != peer {
                    return Err(RegistryError::Decode {
                        key: raw_key.to_string(),
                        message: format!(
                            "value is {}'s peering with {}, key {cluster}'s with {peer}",
                            w.body.cluster, w.body.peer
                        ),
                    });
                }
                w.body.validate().map_err(model_err)?;
                Ok(RegistryValue::Peering(Arc::new(w.body)))
            }
            RegistryKey::Withdrawn(cluster) => {
                let w: Versioned<Withdrawal> = serde_json::from_slice(value).map_err(err)?;
                check_version(raw_key, w.v)?;
                if &w.body.cluster != cluster {
                    return Err(RegistryError::Decode {
                        key: raw_key.to_string(),
                        message: format!(
                            "value withdraws cluster `{}`, key names `{cluster}`",
                            w.body.cluster
                        ),
                    });
                }
                Ok(RegistryValue::Withdrawn(Arc::new(w.body)))
            }
        }
    }
}

/// Render a stored value as pretty JSON for `strait registry dump` (whatever its version).
pub fn pretty(value: &[u8]) -> String {
    match serde_json::from_slice::<serde_json::Value>(value) {
        Ok(v) => serde_json::to_string_pretty(&v)
            .unwrap_or_else(|_| String::from_utf8_lossy(value).into_owned()),
        Err(_) => String::from_utf8_lossy(value).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::DiscoveryFile;

    #[test]
    fn keys_round_trip() {
        let c = Name::parse("c", "east").unwrap();
        let s = ServiceKey::new("default", "echo").unwrap();
        for k in [
            RegistryKey::Cluster(c.clone()),
            RegistryKey::Endpoints(c.clone(), s.clone()),
            RegistryKey::Policy(PolicyScope::Default),
            RegistryKey::Policy(PolicyScope::Service(s)),
            RegistryKey::Link(c.clone(), Name::parse("c", "west").unwrap()),
            RegistryKey::ReplicaLink(
                c.clone(),
                Name::parse("c", "west").unwrap(),
                Name::parse("r", "gw-7d9f-x2").unwrap(),
            ),
            RegistryKey::Peering(c.clone(), Name::parse("c", "west").unwrap()),
        ] {
            assert_eq!(
                RegistryKey::parse(&k.encode()),
                Some(k.clone()),
                "{}",
                k.encode()
            );
        }
        assert_eq!(RegistryKey::parse("/strait/v1/unknown/x"), None);
        assert_eq!(RegistryKey::parse("/strait/v2/clusters/east"), None);
        assert_eq!(RegistryKey::parse("/strait/v1/clusters/East"), None);
    }

    #[test]
    fn values_round_trip_and_are_compact() {
        let f = DiscoveryFile::parse(
            "t.yaml",
            "cluster: east\nregion: us-east\ngateways: [\"gw.east:15443\"]\nservices:\n  - name: echo\n    ports: [{name: http, port: 80, protocol: http}]\n    endpoints:\n      - {address: 10.0.0.1, port: 8080, zone: a}\n      - {address: 10.0.0.2, port: 8080, zone: a, weight: 3, health: draining, labels: {version: v2}}\n",
        )
        .unwrap();
        let kvs = cluster_state_kvs(&f.state);
        assert_eq!(kvs.len(), 2);
        let mut d = Decoder::new();
        for (k, v) in &kvs {
            let key = RegistryKey::parse(k).unwrap();
            match d.decode(&key, k, v).unwrap() {
                RegistryValue::Cluster(c) => assert_eq!(*c, f.state.cluster),
                RegistryValue::Endpoints(s) => {
                    assert_eq!(*s, f.state.services[0]);
                    assert!(
                        v.len() < 300,
                        "{} bytes: {}",
                        v.len(),
                        String::from_utf8_lossy(v)
                    );
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn bad_values_are_decode_errors() {
        let mut d = Decoder::new();
        let k = "/strait/v1/clusters/east";
        let key = RegistryKey::parse(k).unwrap();
        let e = d.decode(&key, k, b"{not json").unwrap_err();
        assert!(e.to_string().contains(k), "{e}");
        let e = d
            .decode(
                &key,
                k,
                br#"{"v":2,"id":"east","region":"r","network":"east"}"#,
            )
            .unwrap_err();
        assert!(
            e.to_string().contains("unsupported encoding version 2"),
            "{e}"
        );
        let e = d
            .decode(
                &key,
                k,
                br#"{"v":1,"id":"west","region":"r","network":"west"}"#,
            )
            .unwrap_err();
        assert!(e.to_string().contains("names cluster `west`"), "{e}");
    }

    fn peering(ca_bundle: Option<String>) -> Peering {
        Peering {
            cluster: Name::parse("c", "east").unwrap(),
            peer: Name::parse("c", "west").unwrap(),
            region: Name::parse("r", "us-west").unwrap(),
            gateways: vec![
                crate::model::GatewayAddress::parse("g", "gw.west.example:15443").unwrap(),
            ],
            trust_domain: "west.example".into(),
            ca_bundle,
        }
    }

    #[test]
    fn peerings_round_trip_and_bad_ones_are_refused_by_field() {
        let ca = crate::identity::CertificateAuthority::init(
            "west.example",
            std::time::Duration::from_secs(3600),
        )
        .unwrap();
        let mut d = Decoder::new();
        let k = "/strait/v1/peerings/east/west";
        let key = RegistryKey::parse(k).unwrap();
        for p in [peering(None), peering(Some(ca.ca_cert_pem().to_string()))] {
            let v = encode_peering(&p);
            assert_eq!(
                d.decode(&key, k, &v).unwrap(),
                RegistryValue::Peering(Arc::new(p))
            );
        }
        // The key and the value must agree.
        let other = RegistryKey::parse("/strait/v1/peerings/east/north").unwrap();
        let e = d
            .decode(
                &other,
                "/strait/v1/peerings/east/north",
                &encode_peering(&peering(None)),
            )
            .unwrap_err();
        assert!(e.to_string().contains("key east's with north"), "{e}");
        // A bundle that is no certificate, a bad trust domain, no gateways, a self-peering.
        let cases: [(Peering, &str); 4] = [
            (
                peering(Some(
                    "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into(),
                )),
                "ca_bundle",
            ),
            (
                Peering {
                    trust_domain: "Not A Domain".into(),
                    ..peering(None)
                },
                "trust_domain",
            ),
            (
                Peering {
                    gateways: vec![],
                    ..peering(None)
                },
                "gateways",
            ),
            (
                Peering {
                    peer: Name::parse("c", "east").unwrap(),
                    ..peering(None)
                },
                "cannot peer with itself",
            ),
        ];
        for (p, expect) in cases {
            let k = RegistryKey::Peering(p.cluster.clone(), p.peer.clone()).encode();
            let key = RegistryKey::parse(&k).unwrap();
            let e = d.decode(&key, &k, &encode_peering(&p)).unwrap_err();
            assert!(e.to_string().contains(expect), "{expect}: {e}");
        }
    }
}
