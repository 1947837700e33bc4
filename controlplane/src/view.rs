//! What one proxy is given: the resources of every type for its *view* — its cluster, locality,
//! workload labels, client kind and listener settings, all read from the xDS `Node`. Proxies
//! with the same view share one computed resource set per registry generation.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::google::protobuf::{Any, Struct, value::Kind};
use envoy_types::util::pack_any;
use federation::model::{ClusterId, Labels, Locality, Protocol, Service, ServiceKey};
use federation::registry::Snapshot;
use federation::route::{Caller, Inputs, resolve};

use crate::resources::{
    ClientKind, HttpPort, PASSTHROUGH_CLUSTER, PortView, Remote, ResolvedRule, cluster_name,
    grpc_fold, grpc_listener, mutual_clusters, outbound_listener, outbound_routes,
    passthrough_cluster, port_assignment, service_cluster, tcp_listener, transparent_listener,
};

/// The four resource types, in the order they are pushed (make-before-break: clusters before
/// their endpoints, listeners before their routes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TypeKind {
    Cluster = 0,
    Endpoint = 1,
    Listener = 2,
    Route = 3,
}

pub const ORDER: [TypeKind; 4] = [
    TypeKind::Cluster,
    TypeKind::Endpoint,
    TypeKind::Listener,
    TypeKind::Route,
];

impl TypeKind {
    pub fn url(self) -> &'static str {
        match self {
            TypeKind::Cluster => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            TypeKind::Endpoint => {
                "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
            }
            TypeKind::Listener => "type.googleapis.com/envoy.config.listener.v3.Listener",
            TypeKind::Route => "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        }
    }

    pub fn from_url(url: &str) -> Option<Self> {
        ORDER.into_iter().find(|t| t.url() == url)
    }

    pub fn short(self) -> &'static str {
        match self {
            TypeKind::Cluster => "CDS",
            TypeKind::Endpoint => "EDS",
            TypeKind::Listener => "LDS",
            TypeKind::Route => "RDS",
        }
    }

    /// CDS and LDS are subscribed to as a whole (wildcard) by Envoy.
    pub fn wildcard_by_default(self) -> bool {
        matches!(self, TypeKind::Cluster | TypeKind::Listener)
    }
}

/// One resource as sent: its name, a content version (a hash of its encoding), the packed
/// message, and the clusters it refers to (for listeners and routes).
#[derive(Debug)]
pub struct Resource {
    pub name: String,
    pub version: String,
    pub body: Any,
    pub refs: Vec<String>,
}

impl Resource {
    /// Resources without multi-entry protobuf maps: their encoding is deterministic, and its
    /// hash is the version.
    fn new<M: prost::Name + prost::Message>(name: String, msg: M, refs: Vec<String>) -> Self {
        let body = pack_any(msg);
        let mut h = std::collections::hash_map::DefaultHasher::new();
        body.value.hash(&mut h);
        Self {
            name,
            version: format!("{:016x}", h.finish()),
            body,
            refs,
        }
    }

    /// A load assignment: its endpoint metadata are protobuf maps, encoded in hash-map order,
    /// so the version hashes the encoding without them plus the metadata sorted.
    fn assignment(name: String, cla: ClusterLoadAssignment) -> Self {
        let mut bare = cla.clone();
        let mut maps = Vec::new();
        for l in &mut bare.endpoints {
            for e in &mut l.lb_endpoints {
                if let Some(m) = e.metadata.take() {
                    maps.push(
                        m.filter_metadata
                            .iter()
                            .flat_map(|(ns, s)| {
                                s.fields.iter().map(move |(k, v)| format!("{ns}.{k}={v:?}"))
                            })
                            .collect(),
                    );
                }
            }
        }
        Self::with_maps(name, pack_any(cla), &bare, maps)
    }

    /// A cluster: its transport-socket matches are protobuf maps too.
    fn cluster(name: String, c: envoy_types::pb::envoy::config::cluster::v3::Cluster) -> Self {
        let mut bare = c.clone();
        let maps = bare
            .transport_socket_matches
            .iter_mut()
            .filter_map(|m| m.r#match.take())
            .map(|s| s.fields.iter().map(|(k, v)| format!("{k}={v:?}")).collect())
            .collect();
        Self::with_maps(name, pack_any(c), &bare, maps)
    }

    /// The version of `body`: the hash of `bare` (the message without its maps) and of each
    /// map's entries sorted.
    fn with_maps<M: prost::Message>(
        name: String,
        body: Any,
        bare: &M,
        maps: Vec<Vec<String>>,
    ) -> Self {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for mut entries in maps {
            entries.sort();
            entries.hash(&mut h);
        }
        bare.encode_to_vec().hash(&mut h);
        Self {
            name,
            version: format!("{:016x}", h.finish()),
            body,
            refs: Vec::new(),
        }
    }
}

pub type Resources = BTreeMap<String, Arc<Resource>>;

/// Every resource of a view, by type.
#[derive(Debug, Default)]
pub struct View {
    pub types: [Resources; 4],
    /// Unique among the views of this process (0: an empty fallback view).
    pub id: u64,
    /// What differs from the view it was built from, if any.
    pub diff: Option<ViewDiff>,
    /// A hash of the HTTP service ports the route configuration was built from.
    routes_from: u64,
}

/// The names of the resources that differ (added, changed or removed) between view `base` and
/// the view holding this diff, by type. Streams whose client holds `base` push only these.
#[derive(Debug, Default)]
pub struct ViewDiff {
    pub base: u64,
    pub changed: [BTreeSet<String>; 4],
}

static NEXT_VIEW: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl View {
    pub fn get(&self, t: TypeKind) -> &Resources {
        &self.types[t as usize]
    }

    /// A view of these resources with a new id; built from `prev` (its diff against it
    /// recorded, unchanged resources shared), or from nothing. For driving the ADS state
    /// machine directly.
    pub fn of(types: [Resources; 4], prev: Option<&View>) -> Self {
        let mut view = Self {
            types,
            id: NEXT_VIEW.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            diff: None,
            routes_from: 0,
        };
        if let Some(prev) = prev {
            view.settle(prev);
        }
        view
    }

    /// Compare with `prev` (the view this one was built from): resources with the same content
    /// become the very same `Arc` as in `prev`, and the names that differ are recorded.
    fn settle(&mut self, prev: &View) {
        let mut diff = ViewDiff {
            base: prev.id,
            changed: Default::default(),
        };
        for t in ORDER {
            let changed = &mut diff.changed[t as usize];
            let mut old = prev.types[t as usize].iter().peekable();
            for (name, r) in self.types[t as usize].iter_mut() {
                // Names only in the previous view, before this one: removed.
                while let Some((n, _)) = old.next_if(|(n, _)| *n < name) {
                    changed.insert(n.clone());
                }
                match old.next_if(|(n, _)| *n == name) {
                    Some((_, o)) if Arc::ptr_eq(o, r) => {}
                    Some((_, o)) if o.version == r.version => *r = o.clone(),
                    _ => {
                        changed.insert(name.clone());
                    }
                }
            }
            changed.extend(old.map(|(n, _)| n.clone()));
        }
        self.diff = Some(diff);
    }
}

/// What a proxy's resources depend on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ViewKey {
    pub kind: ClientKind,
    pub locality: Locality,
    pub labels: Labels,
    /// Envoy's outbound HTTP listener address (node metadata `STRAIT_OUTBOUND`).
    pub outbound: Option<SocketAddr>,
    /// The transparent listener's address (node metadata `STRAIT_TRANSPARENT`): where the
    /// pod's iptables redirection sends intercepted connections.
    pub transparent: Option<SocketAddr>,
    /// The bootstrap has the tunnel listener to the gateway (node metadata `STRAIT_TUNNEL`).
    pub tunnel: bool,
    /// The proxy can originate mutual TLS to sidecars with its workload certificate (node
    /// metadata `STRAIT_MTLS`; an Envoy bootstrap with the static secrets).
    pub mtls: bool,
}

/// A proxy as it introduced itself.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub id: String,
    pub user_agent: String,
    pub key: ViewKey,
}

/// Node metadata keys Strait reads (the xDS contract).
pub use federation::xds_contract::{
    KIND_ENVOY, KIND_GRPC, META_CLUSTER, META_KIND, META_LABELS, META_MTLS, META_OUTBOUND,
    META_TRANSPARENT, META_TUNNEL,
};

fn meta_string<'a>(meta: Option<&'a Struct>, key: &str) -> Result<Option<&'a str>, String> {
    match meta
        .and_then(|m| m.fields.get(key))
        .and_then(|v| v.kind.as_ref())
    {
        None | Some(Kind::NullValue(_)) => Ok(None),
        Some(Kind::StringValue(s)) => Ok(Some(s)),
        Some(_) => Err(format!("node metadata {key}: expected a string")),
    }
}

fn meta_bool(meta: Option<&Struct>, key: &str) -> Result<bool, String> {
    match meta
        .and_then(|m| m.fields.get(key))
        .and_then(|v| v.kind.as_ref())
    {
        None | Some(Kind::NullValue(_)) => Ok(false),
        Some(Kind::BoolValue(b)) => Ok(*b),
        Some(Kind::StringValue(s)) if s == "true" => Ok(true),
        Some(Kind::StringValue(s)) if s == "false" => Ok(false),
        Some(_) => Err(format!("node metadata {key}: expected a boolean")),
    }
}

impl NodeInfo {
    /// Read a node; `cluster` and `region` are this control plane's (the defaults, and what a
    /// node's `STRAIT_CLUSTER` must say).
    pub fn parse(node: &Node, cluster: &ClusterId, region: &str) -> Result<Self, String> {
        if node.id.is_empty() {
            return Err("node.id is empty".into());
        }
        let meta = node.metadata.as_ref();
        if let Some(c) = meta_string(meta, META_CLUSTER)?
            && c != cluster.as_str()
        {
            return Err(format!(
                "node {} says it is in cluster {c:?}, but this control plane serves cluster {cluster:?}",
                node.id
            ));
        }
        let kind = match meta_string(meta, META_KIND)? {
            Some(KIND_ENVOY) => ClientKind::Envoy,
            Some(KIND_GRPC) => ClientKind::Grpc,
            Some(other) => {
                return Err(format!(
                    "node metadata {META_KIND}: {other:?} is not {KIND_ENVOY} or {KIND_GRPC}"
                ));
            }
            None if node.user_agent_name.to_ascii_lowercase().contains("grpc") => ClientKind::Grpc,
            None => ClientKind::Envoy,
        };
        let loc = node.locality.clone().unwrap_or_default();
        let region = if loc.region.is_empty() {
            region
        } else {
            &loc.region
        };
        let locality = Locality::new(region, &loc.zone, &loc.sub_zone)
            .map_err(|e| format!("node.locality: {e}"))?;
        let labels = match meta
            .and_then(|m| m.fields.get(META_LABELS))
            .and_then(|v| v.kind.as_ref())
        {
            None | Some(Kind::NullValue(_)) => Labels::default(),
            Some(Kind::StructValue(s)) => {
                let mut map = BTreeMap::new();
                for (k, v) in &s.fields {
                    match &v.kind {
                        Some(Kind::StringValue(s)) => {
                            map.insert(k.clone(), s.clone());
                        }
                        _ => {
                            return Err(format!(
                                "node metadata {META_LABELS}.{k}: expected a string"
                            ));
                        }
                    }
                }
                Labels::new(map).map_err(|e| format!("node metadata {META_LABELS}: {e}"))?
            }
            Some(_) => return Err(format!("node metadata {META_LABELS}: expected a map")),
        };
        let address = |key: &str| {
            meta_string(meta, key)?
                .map(|s| {
                    s.parse::<SocketAddr>()
                        .map_err(|e| format!("node metadata {key}: {s:?}: {e}"))
                })
                .transpose()
        };
        let outbound = address(META_OUTBOUND)?;
        let transparent = address(META_TRANSPARENT)?;
        if transparent.is_some() && kind != ClientKind::Envoy {
            return Err(format!(
                "node metadata {META_TRANSPARENT}: a proxyless gRPC client has no listeners"
            ));
        }
        let tunnel = meta_bool(meta, META_TUNNEL)?;
        // Proxyless gRPC cannot originate Strait's mutual TLS to sidecars.
        let mtls = meta_bool(meta, META_MTLS)? && kind == ClientKind::Envoy;
        Ok(Self {
            id: node.id.clone(),
            user_agent: node.user_agent_name.clone(),
            key: ViewKey {
                kind,
                locality,
                labels,
                outbound,
                transparent,
                tunnel,
                mtls,
            },
        })
    }
}

/// The control plane's own settings that views depend on.
#[derive(Debug, Clone)]
pub struct ViewSettings {
    pub cluster: ClusterId,
    pub region: String,
    /// A local gateway ingress exists: Envoy proxies with a tunnel listener reach remote
    /// clusters through it.
    pub gateway: bool,
}

/// Every service in the snapshot, with its ports (this cluster's definition when it has one,
/// else the first cluster's).
fn services<'a>(snapshot: &'a Snapshot, own: &ClusterId) -> BTreeMap<&'a ServiceKey, &'a Service> {
    let mut out: BTreeMap<&ServiceKey, &Service> = BTreeMap::new();
    for ((key, cluster), se) in &snapshot.endpoints {
        if cluster == own || !out.contains_key(key) {
            out.insert(key, &se.service);
        }
    }
    out
}

/// The HTTP rules of `service`'s policy for one of its ports, each destination resolved to the
/// cluster of a port: the destination's `port` if given, else the same port number if the
/// destination has it, else its first port. A destination the registry does not know keeps the
/// requested port (its cluster is missing, so requests there get 503 until it appears).
fn resolve_rules<'a>(
    snapshot: &'a Snapshot,
    services: &BTreeMap<&'a ServiceKey, &'a Service>,
    service: &ServiceKey,
    port: u16,
) -> Vec<ResolvedRule<'a>> {
    let Some(policy) = snapshot.policy_for(service) else {
        return Vec::new();
    };
    policy
        .http
        .iter()
        .enumerate()
        .map(|(index, rule)| ResolvedRule {
            index,
            rule,
            clusters: rule
                .to
                .iter()
                .map(|d| {
                    let p = d.port.unwrap_or_else(|| match services.get(&d.service) {
                        Some(s) if !s.ports.iter().any(|x| x.port == port) => {
                            s.ports.first().map_or(port, |x| x.port)
                        }
                        _ => port,
                    });
                    (cluster_name(&d.service, p), d.weight)
                })
                .collect(),
        })
        .collect()
}

/// Whether `service`'s route inputs are the same (shared, unchanged) in both snapshots.
fn same_service(a: &Snapshot, b: &Snapshot, service: &ServiceKey) -> bool {
    let mut ia = a.service(service);
    let mut ib = b.service(service);
    loop {
        match (ia.next(), ib.next()) {
            (None, None) => break,
            (Some(x), Some(y)) if Arc::ptr_eq(x, y) => {}
            _ => return false,
        }
    }
    match (a.policy_for(service), b.policy_for(service)) {
        (None, None) => true,
        (Some(x), Some(y)) => Arc::ptr_eq(x, y) || x == y,
        _ => false,
    }
}

/// Compute the resources of `key` from a registry snapshot.
pub fn build(snapshot: &Snapshot, key: &ViewKey, settings: &ViewSettings) -> View {
    build_from(snapshot, key, settings, None)
}

/// Compute the resources of `key`, reusing those of services whose inputs did not change since
/// `prev` (the snapshot and view of the previous generation).
pub fn build_from(
    snapshot: &Snapshot,
    key: &ViewKey,
    settings: &ViewSettings,
    prev: Option<(&Snapshot, &View)>,
) -> View {
    let prev_any = prev;
    // Cluster records and link states feed every route: any change there rebuilds everything.
    let prev =
        prev.filter(|(ps, _)| ps.clusters == snapshot.clusters && ps.links == snapshot.links);
    let caller = Caller {
        cluster: settings.cluster.clone(),
        locality: key.locality.clone(),
        labels: key.labels.clone(),
    };
    let remote = match key.kind {
        ClientKind::Envoy if key.tunnel && settings.gateway => Remote::Tunnel,
        _ => Remote::Drop,
    };
    let mut view = View::default();
    let mut http_ports: Vec<HttpPort<'_>> = Vec::new();
    let mut tcp_ports: Vec<(&ServiceKey, u16)> = Vec::new();
    let services = services(snapshot, &settings.cluster);
    for (skey, service) in &services {
        let has_rules = snapshot
            .policy_for(skey)
            .is_some_and(|p| !p.http.is_empty());
        if let Some((ps, pv)) = prev
            && !has_rules
            && same_service(ps, snapshot, skey)
        {
            // Unchanged: take the previous resources as they are.
            for (i, port) in service.ports.iter().enumerate() {
                let name = cluster_name(skey, port.port);
                for t in [TypeKind::Cluster, TypeKind::Endpoint] {
                    if let Some(r) = pv.get(t).get(&name) {
                        view.types[t as usize].insert(name.clone(), r.clone());
                    }
                }
                match key.kind {
                    ClientKind::Envoy => {
                        if matches!(
                            port.protocol,
                            Protocol::Http | Protocol::Http2 | Protocol::Grpc
                        ) {
                            http_ports.push(HttpPort {
                                service: skey,
                                port: port.port,
                                first: i == 0,
                                rules: Vec::new(),
                            });
                        } else {
                            tcp_ports.push((skey, port.port));
                        }
                    }
                    ClientKind::Grpc => {
                        let base = format!("{}.{}", skey.name, skey.namespace);
                        for n in [format!("{base}:{}", port.port), base] {
                            if let Some(r) = pv.get(TypeKind::Listener).get(&n) {
                                view.types[TypeKind::Listener as usize].insert(n, r.clone());
                            }
                        }
                    }
                }
            }
            continue;
        }
        let mut route = resolve(&caller, &Inputs::from_snapshot(snapshot, skey));
        if key.kind == ClientKind::Grpc {
            route.groups.retain(|g| !g.via_gateway);
            route = grpc_fold(&route);
        }
        let mutual = if key.mtls {
            mutual_clusters(&route)
        } else {
            Vec::new()
        };
        for (i, port) in service.ports.iter().enumerate() {
            let name = cluster_name(skey, port.port);
            let pv = PortView {
                service: skey,
                port,
                first: i == 0,
                remote,
                mtls: key.mtls,
            };
            view.types[TypeKind::Cluster as usize].insert(
                name.clone(),
                Arc::new(Resource::cluster(
                    name.clone(),
                    service_cluster(skey, port, key.kind, &mutual),
                )),
            );
            view.types[TypeKind::Endpoint as usize].insert(
                name.clone(),
                Arc::new(Resource::assignment(
                    name.clone(),
                    port_assignment(&route, pv),
                )),
            );
            match key.kind {
                ClientKind::Envoy => {
                    if matches!(
                        port.protocol,
                        Protocol::Http | Protocol::Http2 | Protocol::Grpc
                    ) {
                        http_ports.push(HttpPort {
                            service: skey,
                            port: port.port,
                            first: i == 0,
                            rules: Vec::new(),
                        });
                    } else {
                        tcp_ports.push((skey, port.port));
                    }
                }
                ClientKind::Grpc => {
                    let mut names = vec![format!("{}.{}:{}", skey.name, skey.namespace, port.port)];
                    if i == 0 {
                        names.push(format!("{}.{}", skey.name, skey.namespace));
                    }
                    let rules = resolve_rules(snapshot, &services, skey, port.port);
                    let refs: Vec<String> = std::iter::once(name.clone())
                        .chain(
                            rules
                                .iter()
                                .flat_map(|r| r.clusters.iter().map(|(c, _)| c.clone())),
                        )
                        .collect();
                    for n in names {
                        view.types[TypeKind::Listener as usize].insert(
                            n.clone(),
                            Arc::new(Resource::new(
                                n.clone(),
                                grpc_listener(&n, name.clone(), &rules),
                                refs.clone(),
                            )),
                        );
                    }
                }
            }
        }
    }
    if key.kind == ClientKind::Envoy {
        for p in &mut http_ports {
            p.rules = resolve_rules(snapshot, &services, p.service, p.port);
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for p in &http_ports {
            (p.service, p.port, p.first, &p.rules).hash(&mut h);
        }
        view.routes_from = h.finish();
        let reuse = prev_any.filter(|(_, pv)| pv.routes_from == view.routes_from);
        match reuse {
            Some((_, pv)) if !pv.get(TypeKind::Route).is_empty() => {
                // The same HTTP ports: the same route configuration.
                view.types[TypeKind::Route as usize] = pv.get(TypeKind::Route).clone();
            }
            _ => {
                let routes = outbound_routes(&http_ports);
                let refs: BTreeSet<String> = http_ports
                    .iter()
                    .map(|p| cluster_name(p.service, p.port))
                    .chain(
                        http_ports
                            .iter()
                            .flat_map(|p| &p.rules)
                            .flat_map(|r| r.clusters.iter().map(|(c, _)| c.clone())),
                    )
                    .filter(|c| view.types[TypeKind::Cluster as usize].contains_key(c))
                    .collect();
                view.types[TypeKind::Route as usize].insert(
                    routes.name.clone(),
                    Arc::new(Resource::new(
                        routes.name.clone(),
                        routes,
                        refs.into_iter().collect(),
                    )),
                );
            }
        }
        if let Some(addr) = key.outbound {
            let l = outbound_listener(addr);
            view.types[TypeKind::Listener as usize].insert(
                l.name.clone(),
                Arc::new(Resource::new(l.name.clone(), l, Vec::new())),
            );
            // TCP service ports: a listener on the outbound address's IP at the service port.
            // A port is given to the first service (in name order) that claims it; the HTTP
            // listener's own port is never given away.
            let mut taken = BTreeSet::from([addr.port()]);
            for (service, port) in tcp_ports {
                if !taken.insert(port) {
                    continue;
                }
                let l = tcp_listener(service, port, SocketAddr::new(addr.ip(), port));
                view.types[TypeKind::Listener as usize].insert(
                    l.name.clone(),
                    Arc::new(Resource::new(
                        l.name.clone(),
                        l,
                        vec![cluster_name(service, port)],
                    )),
                );
            }
        }
        if let Some(addr) = key.transparent {
            let c = passthrough_cluster();
            view.types[TypeKind::Cluster as usize].insert(
                c.name.clone(),
                Arc::new(Resource::new(c.name.clone(), c, Vec::new())),
            );
            let l = transparent_listener(addr);
            view.types[TypeKind::Listener as usize].insert(
                l.name.clone(),
                Arc::new(Resource::new(
                    l.name.clone(),
                    l,
                    vec![PASSTHROUGH_CLUSTER.to_string()],
                )),
            );
        }
    }
    view.id = NEXT_VIEW.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if let Some((_, pv)) = prev_any {
        view.settle(pv);
    }
    view
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::listener::v3 as listener;
    use federation::model::{Endpoint, ServicePort};
    use prost::Message;

    fn snapshot() -> Snapshot {
        let mut snap = Snapshot::default();
        let service = Service::new(
            ServiceKey::new("default", "echo").unwrap(),
            vec![ServicePort::new("http", 8080, Protocol::Http).unwrap()],
        )
        .unwrap();
        for (c, region, ip) in [("east", "us-east", 1u8), ("west", "us-west", 2)] {
            let id = ClusterId::parse("c", c).unwrap();
            let ep = Endpoint::new(
                std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, ip, 0, 1)),
                8080,
                Locality::parse("l", &format!("{region}/a")).unwrap(),
                id.clone(),
            )
            .unwrap();
            let se =
                federation::model::ServiceEndpoints::new(id.clone(), service.clone(), vec![ep])
                    .unwrap();
            snap.endpoints
                .insert((service.key.clone(), id), Arc::new(se));
        }
        snap
    }

    fn key() -> ViewKey {
        ViewKey {
            kind: ClientKind::Envoy,
            locality: Locality::parse("l", "us-east/a").unwrap(),
            labels: Labels::default(),
            outbound: None,
            transparent: None,
            tunnel: true,
            mtls: false,
        }
    }

    fn settings() -> ViewSettings {
        ViewSettings {
            cluster: ClusterId::parse("c", "east").unwrap(),
            region: "us-east".into(),
            gateway: true,
        }
    }

    /// Versions must not depend on hash-map order (tunnelled endpoints carry metadata maps):
    /// rebuilding the same input gives the same versions, or every proxy would be sent every
    /// resource again at each generation.
    #[test]
    fn versions_are_stable_across_rebuilds() {
        let snap = snapshot();
        let a = build(&snap, &key(), &settings());
        let eds = a.get(TypeKind::Endpoint).get("echo.default:8080").unwrap();
        assert!(!eds.body.value.is_empty());
        for _ in 0..20 {
            let b = build(&snap, &key(), &settings());
            for t in ORDER {
                let va: Vec<&str> = a.get(t).values().map(|r| r.version.as_str()).collect();
                let vb: Vec<&str> = b.get(t).values().map(|r| r.version.as_str()).collect();
                assert_eq!(va, vb, "{t:?} versions changed on a rebuild");
            }
        }
    }

    /// An endpoint behind a sidecar: a client with a workload certificate gets the cluster's
    /// mutual-TLS transport-socket match and the endpoint's socket-match metadata (with stable
    /// versions, although both are protobuf maps); a client without one never sees it.
    #[test]
    fn sidecar_endpoints_reach_only_clients_that_speak_mutual_tls() {
        use envoy_types::pb::envoy::config::cluster::v3::Cluster;
        use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
        let mut snap = snapshot();
        let k = (
            ServiceKey::new("default", "echo").unwrap(),
            ClusterId::parse("c", "east").unwrap(),
        );
        let mut se = (**snap.endpoints.get(&k).unwrap()).clone();
        se.endpoints[0] = se.endpoints[0].clone().with_labels(
            Labels::new(BTreeMap::from([(
                federation::model::TLS_MODE_LABEL.to_string(),
                federation::model::TLS_MODE_MUTUAL.to_string(),
            )]))
            .unwrap(),
        );
        snap.endpoints.insert(k, Arc::new(se));
        let mtls = ViewKey {
            mtls: true,
            ..key()
        };
        let a = build(&snap, &mtls, &settings());
        let cds = a.get(TypeKind::Cluster).get("echo.default:8080").unwrap();
        let c = Cluster::decode(cds.body.value.as_slice()).unwrap();
        let names: Vec<&str> = c
            .transport_socket_matches
            .iter()
            .map(|m| m.name.as_str())
            .collect();
        assert_eq!(names, vec!["strait_mutual_tls/east"]);
        let eds = a.get(TypeKind::Endpoint).get("echo.default:8080").unwrap();
        let cla = ClusterLoadAssignment::decode(eds.body.value.as_slice()).unwrap();
        let text = format!("{cla:?}");
        assert!(text.contains("10.1.0.1") && text.contains("envoy.transport_socket_match"));
        for _ in 0..20 {
            let b = build(&snap, &mtls, &settings());
            for t in ORDER {
                let va: Vec<&str> = a.get(t).values().map(|r| r.version.as_str()).collect();
                let vb: Vec<&str> = b.get(t).values().map(|r| r.version.as_str()).collect();
                assert_eq!(va, vb, "{t:?} versions changed on a rebuild");
            }
        }
        let plain = build(&snap, &key(), &settings());
        let cds = plain
            .get(TypeKind::Cluster)
            .get("echo.default:8080")
            .unwrap();
        let c = Cluster::decode(cds.body.value.as_slice()).unwrap();
        assert!(c.transport_socket_matches.is_empty());
        let eds = plain
            .get(TypeKind::Endpoint)
            .get("echo.default:8080")
            .unwrap();
        let cla = ClusterLoadAssignment::decode(eds.body.value.as_slice()).unwrap();
        assert!(!format!("{cla:?}").contains("10.1.0.1"), "{cla:?}");
    }

    /// An incremental build reuses unchanged services and equals a full build.
    #[test]
    fn incremental_build_equals_full_build() {
        let snap = snapshot();
        let first = build(&snap, &key(), &settings());
        let mut next = snap.clone();
        next.revision += 1;
        let inc = build_from(&next, &key(), &settings(), Some((&snap, &first)));
        let full = build(&next, &key(), &settings());
        for t in ORDER {
            let vi: Vec<(&String, &str)> = inc
                .get(t)
                .iter()
                .map(|(n, r)| (n, r.version.as_str()))
                .collect();
            let vf: Vec<(&String, &str)> = full
                .get(t)
                .iter()
                .map(|(n, r)| (n, r.version.as_str()))
                .collect();
            assert_eq!(vi, vf, "{t:?}");
        }
        let e1 = first
            .get(TypeKind::Endpoint)
            .get("echo.default:8080")
            .unwrap();
        let e2 = inc
            .get(TypeKind::Endpoint)
            .get("echo.default:8080")
            .unwrap();
        assert!(
            Arc::ptr_eq(e1, e2),
            "the unchanged service's resource is reused"
        );
    }

    /// A view built from the previous one lists exactly what differs; the route configuration
    /// is reused while the HTTP service ports are the same.
    #[test]
    fn diff_names_only_what_changed() {
        let snap = snapshot();
        let first = build(&snap, &key(), &settings());
        assert!(first.diff.is_none() && first.id != 0);

        // Nothing changed: an empty diff, the same Arcs everywhere.
        let mut same = snap.clone();
        same.revision += 1;
        let v2 = build_from(&same, &key(), &settings(), Some((&snap, &first)));
        let d = v2.diff.as_ref().expect("a diff");
        assert_eq!(d.base, first.id);
        assert!(d.changed.iter().all(|c| c.is_empty()), "{d:?}");
        assert!(Arc::ptr_eq(
            first.get(TypeKind::Route).get("strait_outbound").unwrap(),
            v2.get(TypeKind::Route).get("strait_outbound").unwrap()
        ));

        // The west endpoint moves: only echo's endpoints differ.
        let mut moved = same.clone();
        moved.revision += 1;
        let west = ClusterId::parse("c", "west").unwrap();
        let k = (ServiceKey::new("default", "echo").unwrap(), west.clone());
        let old = moved.endpoints.get(&k).unwrap().clone();
        let mut eps = old.endpoints.clone();
        eps[0] = Endpoint::new(
            std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 2, 0, 9)),
            8080,
            (*eps[0].locality).clone(),
            west.clone(),
        )
        .unwrap();
        moved.endpoints.insert(
            k,
            Arc::new(
                federation::model::ServiceEndpoints::new(west, old.service.clone(), eps).unwrap(),
            ),
        );
        let v3 = build_from(&moved, &key(), &settings(), Some((&same, &v2)));
        let d = v3.diff.as_ref().expect("a diff");
        assert_eq!(d.base, v2.id);
        let names = |t: TypeKind| d.changed[t as usize].iter().cloned().collect::<Vec<_>>();
        assert_eq!(
            names(TypeKind::Endpoint),
            vec!["echo.default:8080".to_string()]
        );
        assert!(names(TypeKind::Cluster).is_empty(), "same cluster content");
        assert!(names(TypeKind::Route).is_empty(), "same ports, same routes");

        // A new service: its cluster and endpoints appear, and the routes change.
        let mut more = moved.clone();
        more.revision += 1;
        let east = ClusterId::parse("c", "east").unwrap();
        let svc = Service::new(
            ServiceKey::new("default", "other").unwrap(),
            vec![ServicePort::new("http", 9090, Protocol::Http).unwrap()],
        )
        .unwrap();
        let ep = Endpoint::new(
            std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 0, 7)),
            9090,
            Locality::parse("l", "us-east/a").unwrap(),
            east.clone(),
        )
        .unwrap();
        more.endpoints.insert(
            (svc.key.clone(), east.clone()),
            Arc::new(federation::model::ServiceEndpoints::new(east, svc, vec![ep]).unwrap()),
        );
        let v4 = build_from(&more, &key(), &settings(), Some((&moved, &v3)));
        let d = v4.diff.as_ref().expect("a diff");
        let names = |t: TypeKind| d.changed[t as usize].iter().cloned().collect::<Vec<_>>();
        assert_eq!(
            names(TypeKind::Cluster),
            vec!["other.default:9090".to_string()]
        );
        assert_eq!(
            names(TypeKind::Endpoint),
            vec!["other.default:9090".to_string()]
        );
        assert_eq!(names(TypeKind::Route), vec!["strait_outbound".to_string()]);

        // ... and removing it again lists the same names.
        let v5 = build_from(&moved, &key(), &settings(), Some((&more, &v4)));
        let d = v5.diff.as_ref().expect("a diff");
        assert!(d.changed[TypeKind::Cluster as usize].contains("other.default:9090"));
        assert!(!v5.get(TypeKind::Cluster).contains_key("other.default:9090"));
    }

    /// TCP service ports get a listener each on the outbound address's IP at the service port;
    /// the first service (in name order) keeps a contested port, and the HTTP listener's port
    /// is never given away.
    #[test]
    fn tcp_service_ports_get_their_own_listeners() {
        let mut snap = snapshot();
        let east = ClusterId::parse("c", "east").unwrap();
        for (name, port) in [
            ("db", 5432),
            ("cache", 6379),
            ("queue", 5432),
            ("web", 15001),
        ] {
            let svc = Service::new(
                ServiceKey::new("default", name).unwrap(),
                vec![ServicePort::new("tcp", port, Protocol::Tcp).unwrap()],
            )
            .unwrap();
            let ep = Endpoint::new(
                std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 0, 9)),
                port,
                Locality::parse("l", "us-east/a").unwrap(),
                east.clone(),
            )
            .unwrap();
            snap.endpoints.insert(
                (svc.key.clone(), east.clone()),
                Arc::new(
                    federation::model::ServiceEndpoints::new(east.clone(), svc, vec![ep]).unwrap(),
                ),
            );
        }
        let mut k = key();
        k.outbound = Some("127.0.0.2:15001".parse().unwrap());
        let v = build(&snap, &k, &settings());
        let listeners: Vec<&String> = v.get(TypeKind::Listener).keys().collect();
        assert_eq!(
            listeners,
            vec![
                "strait_outbound_http",
                "strait_outbound_tcp_cache.default:6379",
                "strait_outbound_tcp_db.default:5432",
            ],
            "queue loses 5432 to db; web cannot have the HTTP listener's port"
        );
        let db = v
            .get(TypeKind::Listener)
            .get("strait_outbound_tcp_db.default:5432")
            .unwrap();
        assert_eq!(db.refs, vec!["db.default:5432".to_string()]);
        let l = listener::Listener::decode(db.body.value.as_slice()).unwrap();
        let addr = match l.address.and_then(|a| a.address) {
            Some(envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(s)) => s,
            other => panic!("{other:?}"),
        };
        assert_eq!(addr.address, "127.0.0.2");
        assert_eq!(
            addr.port_specifier,
            Some(
                envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(
                    5432
                )
            )
        );
        // No listener for a client without an outbound address.
        let v = build(&snap, &key(), &settings());
        assert!(v.get(TypeKind::Listener).is_empty());
    }

    /// A proxy that asks for a transparent listener (node metadata `STRAIT_TRANSPARENT`) gets
    /// it — `use_original_dst`, the `original_dst` listener filter, a `TcpProxy` to the
    /// passthrough cluster — and the passthrough cluster (`ORIGINAL_DST`), which it keeps for as
    /// long as the listener names it.
    #[test]
    fn a_transparent_listener_is_described_with_its_passthrough_cluster() {
        use envoy_types::pb::envoy::config::cluster::v3 as cluster;
        use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
        let node = |transparent: &str, kind: &str| Node {
            id: "app-1".into(),
            metadata: Some(Struct {
                fields: [
                    (META_TRANSPARENT, transparent),
                    (META_OUTBOUND, "127.0.0.1:15001"),
                    (META_KIND, kind),
                ]
                .into_iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        Value {
                            kind: Some(Kind::StringValue(v.to_string())),
                        },
                    )
                })
                .collect(),
            }),
            ..Default::default()
        };
        let east = ClusterId::parse("c", "east").unwrap();
        let info = NodeInfo::parse(&node("127.0.0.1:15006", "envoy"), &east, "us-east").unwrap();
        assert_eq!(
            info.key.transparent,
            Some("127.0.0.1:15006".parse().unwrap())
        );
        let err = NodeInfo::parse(&node("15006", "envoy"), &east, "us-east").unwrap_err();
        assert!(
            err.contains("STRAIT_TRANSPARENT") && err.contains("\"15006\""),
            "{err}"
        );
        let err = NodeInfo::parse(&node("127.0.0.1:15006", "grpc"), &east, "us-east").unwrap_err();
        assert!(err.contains("proxyless gRPC"), "{err}");

        let v = build(&snapshot(), &info.key, &settings());
        let l = v.get(TypeKind::Listener).get("strait_transparent").unwrap();
        assert_eq!(l.refs, vec!["PassthroughCluster".to_string()]);
        let l = listener::Listener::decode(l.body.value.as_slice()).unwrap();
        assert_eq!(l.use_original_dst.map(|b| b.value), Some(true));
        assert_eq!(
            l.listener_filters
                .iter()
                .map(|f| f.name.as_str())
                .collect::<Vec<_>>(),
            vec!["envoy.filters.listener.original_dst"]
        );
        let c = v.get(TypeKind::Cluster).get("PassthroughCluster").unwrap();
        let c = cluster::Cluster::decode(c.body.value.as_slice()).unwrap();
        assert_eq!(
            c.cluster_discovery_type,
            Some(cluster::cluster::ClusterDiscoveryType::Type(
                cluster::cluster::DiscoveryType::OriginalDst as i32
            ))
        );
        assert!(
            !v.get(TypeKind::Endpoint).contains_key("PassthroughCluster"),
            "a passthrough cluster has no endpoints to send"
        );
        // Without the metadata: neither.
        let v = build(&snapshot(), &key(), &settings());
        assert!(!v.get(TypeKind::Cluster).contains_key("PassthroughCluster"));
    }
}
