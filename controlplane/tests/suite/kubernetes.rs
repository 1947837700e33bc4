//! Kubernetes discovery against a test API server that speaks real Kubernetes JSON: lists
//! with resource versions, newline-delimited watch streams, a watch that expires (an `ERROR`
//! event with code 410, as a real API server sends it), and an API server that fails. The
//! `kube` watchers of `controlplane::kubernetes::source` must turn it into the cluster's state:
//! only exported services, endpoint health and localities right, changes followed, a relist
//! after 410 Gone picking up what the expired watch missed, nothing handed on before every kind
//! is listed, and the last good state kept while the API server is away.

use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use controlplane::kubernetes::source;
use federation::model::{Cluster, ClusterState, Health, Name};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const NODES: &str = "/api/v1/nodes";
const EXPORTS: &str = "/apis/multicluster.x-k8s.io/v1alpha1/serviceexports";
const POLICIES: &str = "/apis/strait.io/v1alpha1/failoverpolicies";
const CLUSTERS: &str = "/apis/strait.io/v1alpha1/federatedclusters";
const NAMESPACES: &str = "/api/v1/namespaces";
const ACCOUNTS: &str = "/api/v1/serviceaccounts";

/// (path, list kind, apiVersion)
const KINDS: [(&str, &str, &str); 8] = [
    (NAMESPACES, "NamespaceList", "v1"),
    (ACCOUNTS, "ServiceAccountList", "v1"),
    (POLICIES, "FailoverPolicyList", "strait.io/v1alpha1"),
    (CLUSTERS, "FederatedClusterList", "strait.io/v1alpha1"),
    (SERVICES, "ServiceList", "v1"),
    (SLICES, "EndpointSliceList", "discovery.k8s.io/v1"),
    (NODES, "NodeList", "v1"),
    (
        EXPORTS,
        "ServiceExportList",
        "multicluster.x-k8s.io/v1alpha1",
    ),
];

#[derive(Default)]
struct Store {
    /// path → (namespace/name → object)
    items: BTreeMap<&'static str, BTreeMap<String, Value>>,
    version: u64,
    /// Paths answering 500.
    broken: HashSet<&'static str>,
    /// ServiceImports written by the control plane: namespace/name → object.
    imports: BTreeMap<String, Value>,
    /// Secrets: namespace/name → object.
    secrets: BTreeMap<String, Value>,
    /// Namespaces that exist (imports elsewhere get 404).
    namespaces: HashSet<String>,
    /// Requests to the ServiceImport API (method and path), in order.
    import_requests: Vec<String>,
    /// Lists served, per path.
    lists: BTreeMap<&'static str, usize>,
    /// Every event sent, per path, with its resource version: a watch from version N first
    /// gets what came after N (no gap between a list and the watch that follows it).
    log: BTreeMap<&'static str, Vec<(u64, String)>>,
    live: BTreeMap<&'static str, broadcast::Sender<String>>,
}

impl Store {
    /// Record and broadcast an event (under the store's lock, so that a watch starting at the
    /// same time sees it exactly once).
    fn send(&mut self, path: &'static str, event: Value, logged: bool) {
        let line = format!("{event}\n");
        if logged {
            let v = self.version;
            self.log.entry(path).or_default().push((v, line.clone()));
        }
        if let Some(tx) = self.live.get(path) {
            let _ = tx.send(line);
        }
    }
}

struct ApiServer {
    url: String,
    store: Arc<Mutex<Store>>,
    stop: CancellationToken,
}

fn key(o: &Value) -> String {
    format!(
        "{}/{}",
        o["metadata"]["namespace"].as_str().unwrap_or(""),
        o["metadata"]["name"].as_str().unwrap_or("")
    )
}

impl ApiServer {
    async fn start() -> ApiServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let store = Arc::new(Mutex::new(Store {
            live: KINDS
                .iter()
                .map(|(p, _, _)| (*p, broadcast::channel(256).0))
                .collect(),
            ..Store::default()
        }));
        let stop = CancellationToken::new();
        let (s, st) = (store.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (conn, _) = tokio::select! {
                    () = st.cancelled() => return,
                    c = listener.accept() => match c { Ok(c) => c, Err(_) => continue },
                };
                let (s, st2) = (s.clone(), st.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let s = s.clone();
                        async move {
                            if req.uri().path().contains("/serviceimports")
                                || req.uri().path().contains("/secrets")
                            {
                                return Ok::<_, Infallible>(imports(&s, req).await);
                            }
                            Ok::<_, Infallible>(handle(&s, req))
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(conn), svc);
                    tokio::select! {
                        () = st2.cancelled() => {}
                        _ = conn => {}
                    }
                });
            }
        });
        ApiServer { url, store, stop }
    }

    /// Set an object; tell the watchers (ADDED or MODIFIED) unless `quietly` (then only a
    /// list shows it).
    fn set(&self, path: &'static str, mut o: Value, quietly: bool) {
        let mut st = self.store.lock().expect("store");
        st.version += 1;
        o["metadata"]["resourceVersion"] = json!(st.version.to_string());
        let existed = st
            .items
            .entry(path)
            .or_default()
            .insert(key(&o), o.clone())
            .is_some();
        if !quietly {
            let kind = if existed { "MODIFIED" } else { "ADDED" };
            st.send(path, json!({"type": kind, "object": o}), true);
        }
    }

    fn put(&self, path: &'static str, o: Value) {
        self.set(path, o, false);
    }

    fn put_quietly(&self, path: &'static str, o: Value) {
        self.set(path, o, true);
    }

    fn delete(&self, path: &'static str, o: &Value) {
        self.remove(path, o, false);
    }

    /// Remove an object; tell the watchers unless `quietly`.
    fn remove(&self, path: &'static str, o: &Value, quietly: bool) {
        let mut st = self.store.lock().expect("store");
        st.version += 1;
        let v = st.version;
        let mut removed = st
            .items
            .get_mut(path)
            .and_then(|m| m.remove(&key(o)))
            .expect("deleting an object that is there");
        removed["metadata"]["resourceVersion"] = json!(v.to_string());
        if !quietly {
            st.send(path, json!({"type": "DELETED", "object": removed}), true);
        }
    }

    /// The watch of `path` expires: an ERROR event with a 410 Status, as the API server sends.
    fn expire(&self, path: &'static str) {
        self.send(
            path,
            json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
                   "status": "Failure", "message": "too old resource version: 1 (2)",
                   "reason": "Expired", "code": 410}}),
        );
    }

    fn send(&self, path: &'static str, event: Value) {
        self.store.lock().expect("store").send(path, event, false);
    }

    fn set_broken(&self, path: &'static str, broken: bool) {
        let mut st = self.store.lock().expect("store");
        if broken {
            st.broken.insert(path);
        } else {
            st.broken.remove(path);
        }
    }

    fn lists(&self, path: &'static str) -> usize {
        self.store
            .lock()
            .expect("store")
            .lists
            .get(path)
            .copied()
            .unwrap_or(0)
    }
}

fn full(status: u16, body: Value) -> hyper::Response<BoxBody<Bytes, Infallible>> {
    let mut r = hyper::Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
    r.headers_mut()
        .insert("content-type", "application/json".parse().expect("header"));
    r
}

const IMPORTS_PREFIX: &str = "/apis/multicluster.x-k8s.io/v1alpha1/";

/// The ServiceImport and Secret APIs as a real API server serves them: a list by label
/// selector, server-side apply (`application/apply-patch+yaml`) of the object and of its status
/// subresource, delete; 404 for a namespace that does not exist.
async fn imports(
    store: &Mutex<Store>,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<BoxBody<Bytes, Infallible>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut st = store.lock().expect("store");
    st.import_requests.push(format!("{method} {path}"));
    let not_found = |what: String| {
        full(
            404,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "reason": "NotFound", "code": 404, "message": what}),
        )
    };
    let secrets = path.starts_with("/api/v1/");
    let (rest, plural, list_kind, api_version) = if secrets {
        (
            path.trim_start_matches("/api/v1/"),
            "secrets",
            "SecretList",
            "v1",
        )
    } else {
        (
            path.trim_start_matches(IMPORTS_PREFIX),
            "serviceimports",
            "ServiceImportList",
            "multicluster.x-k8s.io/v1alpha1",
        )
    };
    if rest == plural && method == hyper::Method::GET {
        let selector = query
            .split('&')
            .find_map(|q| q.strip_prefix("labelSelector="))
            .unwrap_or("")
            .replace("%3D", "=")
            .replace("%2F", "/");
        let items: Vec<Value> = if secrets { &st.secrets } else { &st.imports }
            .values()
            .filter(|o| {
                selector.is_empty()
                    || selector
                        .split_once('=')
                        .is_some_and(|(k, v)| o["metadata"]["labels"][k] == v)
            })
            .cloned()
            .collect();
        let v = st.version;
        return full(
            200,
            json!({"kind": list_kind, "apiVersion": api_version,
            "metadata": {"resourceVersion": v.to_string()}, "items": items}),
        );
    }
    let parts: Vec<&str> = rest.split('/').collect();
    let (ns, name, status) = match parts.as_slice() {
        ["namespaces", ns, p, name] if *p == plural => (*ns, *name, false),
        ["namespaces", ns, p, name, "status"] if *p == plural && !secrets => (*ns, *name, true),
        _ => return not_found(format!("no {path}")),
    };
    if !st.namespaces.contains(ns) {
        return not_found(format!("namespaces \"{ns}\" not found"));
    }
    let key = format!("{ns}/{name}");
    if method == hyper::Method::GET {
        let coll = if secrets { &st.secrets } else { &st.imports };
        return match coll.get(&key) {
            Some(o) => full(200, o.clone()),
            None => not_found(format!("{plural} \"{name}\" not found")),
        };
    }
    if method == hyper::Method::DELETE {
        let coll = if secrets {
            &mut st.secrets
        } else {
            &mut st.imports
        };
        return match coll.remove(&key) {
            Some(_) => full(
                200,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
            ),
            None => not_found(format!("{plural} \"{name}\" not found")),
        };
    }
    if method != hyper::Method::PATCH
        || content_type != "application/apply-patch+yaml"
        || !query.contains("fieldManager=strait-controlplane")
    {
        return full(
            415,
            json!({"kind": "Status", "code": 415,
            "message": format!("expected a server-side apply, got {method} {content_type} ?{query}")}),
        );
    }
    let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
        return full(
            400,
            json!({"kind": "Status", "code": 400, "message": "bad body"}),
        );
    };
    st.version += 1;
    let v = st.version;
    let coll = if secrets {
        &mut st.secrets
    } else {
        &mut st.imports
    };
    let entry = coll.entry(key).or_insert_with(|| json!({}));
    if status {
        if entry.get("spec").is_none() {
            return not_found(format!("{plural} \"{name}\" not found"));
        }
        entry["status"] = patch["status"].clone();
    } else {
        let keep = entry.get("status").cloned();
        *entry = patch;
        if let Some(k) = keep {
            entry["status"] = k;
        } else if let Some(m) = entry.as_object_mut() {
            // The status subresource: applying the object never sets it.
            m.remove("status");
        }
    }
    entry["metadata"]["resourceVersion"] = json!(v.to_string());
    let out = entry.clone();
    full(200, out)
}

fn handle(
    store: &Mutex<Store>,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<BoxBody<Bytes, Infallible>> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let Some((p, list_kind, api_version)) = KINDS.iter().find(|(p, _, _)| *p == path) else {
        return full(
            404,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                   "reason": "NotFound", "code": 404, "message": format!("no {path}")}),
        );
    };
    let mut st = store.lock().expect("store");
    if st.broken.contains(p) {
        return full(
            500,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                   "reason": "InternalError", "code": 500, "message": "etcd is away"}),
        );
    }
    if query
        .split('&')
        .any(|q| q == "watch=true" || q == "watch=1")
    {
        let from: u64 = query
            .split('&')
            .find_map(|q| q.strip_prefix("resourceVersion="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let Some(rx) = st.live.get(p).map(broadcast::Sender::subscribe) else {
            return full(500, json!({"kind": "Status", "code": 500}));
        };
        let backlog: Vec<String> = st
            .log
            .get(p)
            .into_iter()
            .flatten()
            .filter(|(v, _)| *v > from)
            .map(|(_, l)| l.clone())
            .collect();
        let backlog = futures::stream::iter(
            backlog
                .into_iter()
                .map(|l| Ok::<_, Infallible>(Frame::data(Bytes::from(l)))),
        );
        let live = futures::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(line) => {
                        return Some((Ok::<_, Infallible>(Frame::data(Bytes::from(line))), rx));
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        use futures::StreamExt as _;
        let mut r = hyper::Response::new(BodyExt::boxed(StreamBody::new(backlog.chain(live))));
        r.headers_mut()
            .insert("content-type", "application/json".parse().expect("header"));
        return r;
    }
    *st.lists.entry(p).or_default() += 1;
    let items: Vec<Value> = st
        .items
        .get(p)
        .map(|m| m.values().cloned().collect())
        .unwrap_or_default();
    full(
        200,
        json!({"kind": list_kind, "apiVersion": api_version,
               "metadata": {"resourceVersion": st.version.to_string()}, "items": items}),
    )
}

fn service(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
           "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}})
}

fn export(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
           "metadata": {"name": name, "namespace": ns}})
}

fn node(name: &str, zone: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {
        "topology.kubernetes.io/region": "us-east", "topology.kubernetes.io/zone": zone}}})
}

/// A slice of `service` with endpoints (address, node, ready, terminating).
fn slice(ns: &str, name: &str, service: &str, endpoints: &[(&str, &str, bool, bool)]) -> Value {
    let eps: Vec<Value> = endpoints
        .iter()
        .map(|(a, n, ready, term)| {
            json!({"addresses": [a], "nodeName": n,
                   "conditions": {"ready": ready, "serving": ready | term, "terminating": term}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": name, "namespace": ns,
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
           "endpoints": eps})
}

/// `name.ns` → [(address, health, zone)]
fn summary(s: &ClusterState) -> BTreeMap<String, Vec<(String, Health, String)>> {
    s.services
        .iter()
        .map(|se| {
            (
                format!("{}.{}", se.service.key.name, se.service.key.namespace),
                se.endpoints
                    .iter()
                    .map(|e| {
                        (
                            e.address.to_string(),
                            e.health,
                            e.locality.zone().to_string(),
                        )
                    })
                    .collect(),
            )
        })
        .collect()
}

/// Wait (10 s at most) until the state satisfies `ok`.
async fn wait_for(
    rx: &mut watch::Receiver<Option<ClusterState>>,
    what: &str,
    ok: impl Fn(&BTreeMap<String, Vec<(String, Health, String)>>) -> bool,
) -> BTreeMap<String, Vec<(String, Health, String)>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let seen = rx.borrow_and_update().as_ref().map(summary);
        if let Some(s) = &seen
            && ok(s)
        {
            return s.clone();
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            panic!("not within 10 s: {what}; last state: {seen:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_objects_become_the_clusters_state_and_follow_every_change() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let api = ApiServer::start().await;
    api.put(SERVICES, service("shop", "payments"));
    api.put(SERVICES, service("shop", "internal"));
    api.put(NODES, node("node-a", "us-east-1a"));
    api.put(NODES, node("node-b", "us-east-1b"));
    api.put(
        SLICES,
        slice(
            "shop",
            "payments-1",
            "payments",
            &[
                ("10.1.0.1", "node-a", true, false),
                ("10.1.0.2", "node-b", true, false),
            ],
        ),
    );
    api.put(
        SLICES,
        slice(
            "shop",
            "internal-1",
            "internal",
            &[("10.2.0.1", "node-a", true, false)],
        ),
    );
    api.put(EXPORTS, export("shop", "payments"));
    // ServiceExports cannot be listed at first: nothing may be handed on until they can.
    api.set_broken(EXPORTS, true);

    let client =
        kube::Client::try_from(kube::Config::new(api.url.parse().expect("url"))).expect("client");
    let cluster = Cluster::new(
        Name::parse("cluster", "east").expect("id"),
        "us-east",
        None,
        vec![],
    )
    .expect("cluster");
    let (tx, mut rx) = watch::channel(None);
    let stop = CancellationToken::new();
    let follower = tokio::spawn(source::follow(
        client,
        cluster,
        tx,
        Duration::from_millis(20),
        stop.clone(),
    ));

    // The other kinds are listed; the exports are not: no state yet.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while [SERVICES, SLICES, NODES].iter().any(|p| api.lists(p) == 0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the watchers did not list services, slices and nodes within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(500), rx.changed())
            .await
            .is_err(),
        "a state was handed on before the ServiceExports were listed: {:?}",
        rx.borrow().as_ref().map(summary)
    );
    api.set_broken(EXPORTS, false);

    let zone = |z: &str| z.to_string();
    let s = wait_for(&mut rx, "payments with its two endpoints", |s| {
        s.get("payments.shop").is_some_and(|e| e.len() == 2)
    })
    .await;
    assert_eq!(
        s,
        BTreeMap::from([(
            "payments.shop".to_string(),
            vec![
                ("10.1.0.1".into(), Health::Healthy, zone("us-east-1a")),
                ("10.1.0.2".into(), Health::Healthy, zone("us-east-1b")),
            ]
        )]),
        "only the exported service, localities from the nodes"
    );

    // A terminating endpoint stops getting new traffic.
    api.put(
        SLICES,
        slice(
            "shop",
            "payments-1",
            "payments",
            &[
                ("10.1.0.1", "node-a", true, false),
                ("10.1.0.2", "node-b", false, true),
            ],
        ),
    );
    wait_for(&mut rx, "10.1.0.2 draining", |s| {
        s.get("payments.shop").is_some_and(|e| {
            e.iter()
                .any(|(a, h, _)| a == "10.1.0.2" && *h == Health::Draining)
        })
    })
    .await;

    // Exporting a service publishes it.
    api.put(EXPORTS, export("shop", "internal"));
    wait_for(&mut rx, "internal exported", |s| {
        s.get("internal.shop").is_some_and(|e| e.len() == 1)
    })
    .await;

    // The slices' watch expires (410 Gone) while a slice was added and another deleted
    // unannounced: only the relist can show them, and it replaces what was there.
    let lists_before = api.lists(SLICES);
    api.remove(SLICES, &slice("shop", "internal-1", "internal", &[]), true);
    api.put_quietly(
        SLICES,
        slice(
            "shop",
            "payments-2",
            "payments",
            &[("10.1.0.3", "node-b", true, false)],
        ),
    );
    api.expire(SLICES);
    wait_for(&mut rx, "10.1.0.3 after the relist", |s| {
        s.get("payments.shop")
            .is_some_and(|e| e.iter().any(|(a, _, _)| a == "10.1.0.3"))
    })
    .await;
    let s = wait_for(
        &mut rx,
        "internal's deleted slice gone after the relist",
        |s| s.get("internal.shop").is_some_and(Vec::is_empty),
    )
    .await;
    assert_eq!(s["payments.shop"].len(), 3, "{s:?}");
    assert!(
        api.lists(SLICES) > lists_before,
        "410 Gone must lead to a relist"
    );

    // Withdrawing the export withdraws the service.
    api.delete(EXPORTS, &export("shop", "payments"));
    let s = wait_for(&mut rx, "payments withdrawn", |s| {
        !s.contains_key("payments.shop")
    })
    .await;
    assert_eq!(s.keys().collect::<Vec<_>>(), ["internal.shop"]);

    // The API server fails: the last good state stays.
    for (p, _, _) in KINDS {
        api.set_broken(p, true);
        api.expire(p);
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), rx.changed())
            .await
            .is_err(),
        "the state changed while the API server was away: {:?}",
        rx.borrow().as_ref().map(summary)
    );
    // And when it is back, changes flow again.
    for (p, _, _) in KINDS {
        api.set_broken(p, false);
    }
    api.put(EXPORTS, export("shop", "payments"));
    wait_for(&mut rx, "payments exported again after the outage", |s| {
        s.contains_key("payments.shop") && s.contains_key("internal.shop")
    })
    .await;

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), follower)
        .await
        .expect("the follower stops when told")
        .expect("the follower does not panic");
    api.stop.cancel();
}

/// The endpoint values of cluster east in the registry: `namespace/service` → JSON value.
async fn published(reg: &crate::common::Registry) -> BTreeMap<String, String> {
    let (_, kvs) = reg
        .backend
        .get_prefix("/strait/v1/endpoints/east/")
        .await
        .expect("registry read");
    kvs.into_iter()
        .map(|kv| {
            (
                kv.key
                    .trim_start_matches("/strait/v1/endpoints/east/")
                    .to_string(),
                String::from_utf8_lossy(&kv.value).into_owned(),
            )
        })
        .collect()
}

/// `DIR/kube.yaml` pointing at the test API server.
fn write_kubeconfig(dir: &std::path::Path, url: &str) {
    std::fs::write(
        dir.join("kube.yaml"),
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\n\
             clusters: [{{name: test, cluster: {{server: \"{url}\"}}}}]\n\
             users: [{{name: test, user: {{}}}}]\n\
             contexts: [{{name: test, context: {{cluster: test, user: test}}}}]\n"
        ),
    )
    .expect("kubeconfig");
}

fn namespace(name: &str, inject: bool) -> Value {
    let mut n = json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "uid": format!("uid-ns-{name}")}});
    if inject {
        n["metadata"]["labels"] = json!({"strait.io/inject": "enabled"});
    }
    n
}

fn account(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}")}})
}

/// A Secret's `data` field, decoded.
fn secret_file(secret: &Value, file: &str) -> String {
    use base64::Engine as _;
    let b = secret["data"][file].as_str().unwrap_or_default();
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(b)
            .unwrap_or_default(),
    )
    .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_issues_the_identities_of_injected_namespaces_and_keeps_them_in_step() {
    use federation::identity::{CertificateAuthority, PeerVerifier, Role, allow_any, load_certs};
    crate::common::install_crypto();
    let dir = tempfile::tempdir().expect("tempdir");
    let reg = crate::common::Registry::start(dir.path()).await;
    let api = ApiServer::start().await;
    let ca = CertificateAuthority::init("test.strait", Duration::from_secs(86400)).expect("CA");
    ca.write(dir.path().join("ca"), false).expect("CA files");
    api.put(NAMESPACES, namespace("shop", true));
    api.put(NAMESPACES, namespace("plain", false));
    api.put(ACCOUNTS, account("shop", "default"));
    api.put(ACCOUNTS, account("shop", "web"));
    api.put(ACCOUNTS, account("shop", "build.bot"));
    api.put(ACCOUNTS, account("plain", "default"));
    // An account whose Secret of that name is somebody else's, and a namespace the API server
    // refuses writes to (it answers 404): neither holds up the others.
    api.put(ACCOUNTS, account("shop", "theirs"));
    api.put(NAMESPACES, namespace("ghost", true));
    api.put(ACCOUNTS, account("ghost", "default"));
    {
        let mut st = api.store.lock().expect("store");
        st.namespaces.extend([
            "shop".to_string(),
            "plain".to_string(),
            "strait-system".to_string(),
        ]);
        // A managed identity whose account is gone, and somebody else's Secret.
        st.secrets.insert(
            "shop/strait-identity-gone".into(),
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "strait-identity-gone",
                "namespace": "shop", "labels": {"app.kubernetes.io/managed-by": "strait"}}}),
        );
        st.secrets.insert(
            "shop/strait-identity-theirs".into(),
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "strait-identity-theirs",
                "namespace": "shop"}, "data": {}}),
        );
    }
    write_kubeconfig(dir.path(), &api.url);
    let cfg = controlplane::config::ControlPlaneConfig::parse(
        dir.path().join("cp.yaml"),
        &format!(
            "cluster: east\nregion: us-east\nregistry: {{etcd: [\"{}\"], lease_ttl: 5s}}\n\
             discovery: {{kubernetes: {{kubeconfig: kube.yaml, identities: {{ca: ca, validity: 1h}}}}}}\n\
             certificates: {{ca: ca, validity: 1h, gateway: {{secret: strait-gateway-tls, dns_names: [gw.east.example]}}}}\n\
             xds: {{listen: \"127.0.0.1:0\"}}\nadmin: {{listen: \"127.0.0.1:0\"}}\n",
            reg.etcd.endpoint()
        ),
    )
    .expect("control plane config");
    let cp = crate::common::start_cp_with(&reg, cfg).await;
    let all_secrets = || api.store.lock().expect("store").secrets.clone();
    // The gateway's certificate, issued before the control plane was up: its identity, its
    // name, labelled as Strait's.
    let gw = all_secrets()
        .get("strait-system/strait-gateway-tls")
        .cloned()
        .expect("the gateway's Secret is written at start");
    assert_eq!(
        gw["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "strait"
    );
    let info = federation::identity::inspect_pem(&secret_file(&gw, "cert.pem")).expect("cert");
    assert_eq!(
        info.identity.as_deref(),
        Some("spiffe://test.strait/cluster/east/gateway")
    );
    assert_eq!(info.dns_names, ["gw.east.example"]);
    let secrets = || {
        let mut s = all_secrets();
        s.retain(|k, _| k.starts_with("shop/"));
        s
    };
    let got = crate::common::wait_for(Duration::from_secs(15), "the identity Secrets", || async {
        let s = secrets();
        if s.contains_key("shop/strait-identity-web")
            && s.contains_key("shop/strait-identity-default")
            && !s.contains_key("shop/strait-identity-gone")
        {
            Ok(s)
        } else {
            Err(format!("{:?}", s.keys().collect::<Vec<_>>()))
        }
    })
    .await;
    assert_eq!(
        got.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "shop/strait-identity-default",
            "shop/strait-identity-theirs",
            "shop/strait-identity-web"
        ],
        "none for a namespace without injection nor for an account that is no SPIFFE name; \
         somebody else's Secret untouched"
    );
    assert_eq!(
        got["shop/strait-identity-theirs"]["data"],
        json!({}),
        "somebody else's Secret was written"
    );
    let web = &got["shop/strait-identity-web"];
    assert_eq!(
        web["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "strait"
    );
    assert_eq!(
        web["metadata"]["ownerReferences"][0]["kind"],
        "ServiceAccount"
    );
    assert_eq!(web["metadata"]["ownerReferences"][0]["uid"], "uid-shop-web");
    assert_eq!(web["type"], "Opaque");
    // The files are what the injected proxy needs: a chain the CA vouches for, naming the
    // account, its key, and the CA.
    let files = dir.path().join("web");
    std::fs::create_dir_all(&files).expect("dir");
    for f in ["cert.pem", "key.pem", "ca.pem"] {
        std::fs::write(files.join(f), secret_file(web, f)).expect("file");
    }
    assert_eq!(secret_file(web, "ca.pem").trim(), ca.ca_cert_pem().trim());
    let chain = load_certs(files.join("cert.pem")).expect("cert.pem");
    let id = PeerVerifier::new(
        &load_certs(dir.path().join("ca/ca.pem")).expect("ca"),
        Role::Workload,
        allow_any(),
    )
    .expect("verifier")
    .verify(&chain[0], &chain[1..], rustls_pki_types::UnixTime::now())
    .expect("the CA vouches for the certificate");
    assert_eq!(
        id.to_string(),
        "spiffe://test.strait/cluster/east/ns/shop/sa/web"
    );
    federation::identity::client_config(
        chain,
        federation::identity::load_private_key(files.join("key.pem")).expect("key.pem"),
        std::sync::Arc::new(
            PeerVerifier::from_ca_file(dir.path().join("ca/ca.pem"), Role::Workload, allow_any())
                .expect("verifier"),
        ),
    )
    .expect("the key belongs to the certificate");

    // The CA is rotated: the next pass (here brought on by a new account) issues every
    // identity again under the new CA.
    let rotated =
        CertificateAuthority::init("test.strait", Duration::from_secs(86400)).expect("CA");
    rotated
        .write(dir.path().join("ca"), true)
        .expect("CA files");
    api.put(ACCOUNTS, account("shop", "db"));
    crate::common::wait_for(
        Duration::from_secs(15),
        "identities under the new CA",
        || async {
            let s = secrets();
            let fresh = |k: &str| {
                s.get(k).is_some_and(|o| {
                    secret_file(o, "ca.pem").trim() == rotated.ca_cert_pem().trim()
                })
            };
            let gw_fresh = all_secrets()
                .get("strait-system/strait-gateway-tls")
                .is_some_and(|o| secret_file(o, "ca.pem").trim() == rotated.ca_cert_pem().trim());
            if fresh("shop/strait-identity-web")
                && fresh("shop/strait-identity-default")
                && fresh("shop/strait-identity-db")
                && gw_fresh
            {
                Ok(())
            } else {
                Err(format!("{:?}", s.keys().collect::<Vec<_>>()))
            }
        },
    )
    .await;

    // Injection turned off for the namespace: its identities are withdrawn.
    api.put(NAMESPACES, namespace("shop", false));
    crate::common::wait_for(
        Duration::from_secs(15),
        "the identities withdrawn",
        || async {
            let s = secrets();
            let left: Vec<&String> = s.keys().collect();
            if left == ["shop/strait-identity-theirs"] {
                Ok(())
            } else {
                Err(format!("{left:?}"))
            }
        },
    )
    .await;
    cp.shutdown().await;
    api.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_with_kubernetes_discovery_publishes_exported_services_into_etcd() {
    crate::common::install_crypto();
    let dir = tempfile::tempdir().expect("tempdir");
    let reg = crate::common::Registry::start(dir.path()).await;
    let api = ApiServer::start().await;
    api.put(SERVICES, service("shop", "payments"));
    api.put(SERVICES, service("shop", "internal"));
    api.put(NODES, node("node-a", "us-east-1a"));
    api.put(
        SLICES,
        slice(
            "shop",
            "payments-1",
            "payments",
            &[("10.1.0.1", "node-a", true, false)],
        ),
    );
    api.put(
        SLICES,
        slice(
            "shop",
            "internal-1",
            "internal",
            &[("10.2.0.1", "node-a", true, false)],
        ),
    );
    api.put(EXPORTS, export("shop", "payments"));
    // Peerings: one of east's whose FederatedCluster was deleted while no control plane ran,
    // and one of west's (not east's to touch).
    let stale = federation::model::Peering {
        cluster: federation::model::Name::parse("n", "east").expect("name"),
        peer: federation::model::Name::parse("n", "gone").expect("name"),
        region: federation::model::Name::parse("n", "us-gone").expect("name"),
        gateways: vec![
            federation::model::GatewayAddress::parse("g", "gw.gone.example:15443")
                .expect("address"),
        ],
        trust_domain: "federation.example".into(),
        ca_bundle: None,
    };
    let wests = federation::model::Peering {
        cluster: federation::model::Name::parse("n", "west").expect("name"),
        peer: federation::model::Name::parse("n", "east").expect("name"),
        ..stale.clone()
    };
    reg.backend
        .commit(
            [&stale, &wests]
                .into_iter()
                .map(|p| federation::registry::backend::Op::Put {
                    key: federation::registry::codec::RegistryKey::Peering(
                        p.cluster.clone(),
                        p.peer.clone(),
                    )
                    .encode(),
                    value: federation::registry::codec::encode_peering(p),
                    lease: None,
                })
                .collect(),
        )
        .await
        .expect("registry write");

    write_kubeconfig(dir.path(), &api.url);
    let cfg = controlplane::config::ControlPlaneConfig::parse(
        dir.path().join("cp.yaml"),
        &format!(
            "cluster: east\nregion: us-east\nregistry: {{etcd: [\"{}\"], lease_ttl: 5s}}\n\
             discovery: {{kubernetes: {{kubeconfig: kube.yaml, gateways: [\"127.0.0.1:15443\"]}}}}\n\
             xds: {{listen: \"127.0.0.1:0\"}}\nadmin: {{listen: \"127.0.0.1:0\"}}\n",
            reg.etcd.endpoint()
        ),
    )
    .expect("control plane config");
    let cp = crate::common::start_cp_with(&reg, cfg).await;

    let got = crate::common::wait_for(Duration::from_secs(15), "payments published", || async {
        let p = published(&reg).await;
        match p.get("shop/payments") {
            Some(v) if v.contains("10.1.0.1") => Ok(p),
            _ => Err(format!("{p:?}")),
        }
    })
    .await;
    assert!(
        !got.contains_key("shop/internal"),
        "an unexported service was published: {got:?}"
    );
    assert!(got["shop/payments"].contains("us-east-1a"), "{got:?}");

    // A terminating endpoint is published as draining; withdrawing the export withdraws it.
    api.put(
        SLICES,
        slice(
            "shop",
            "payments-1",
            "payments",
            &[("10.1.0.1", "node-a", false, true)],
        ),
    );
    crate::common::wait_for(Duration::from_secs(15), "the endpoint draining", || async {
        let p = published(&reg).await;
        match p.get("shop/payments") {
            Some(v) if v.contains("draining") => Ok(()),
            _ => Err(format!("{p:?}")),
        }
    })
    .await;
    api.delete(EXPORTS, &export("shop", "payments"));
    crate::common::wait_for(Duration::from_secs(15), "payments withdrawn", || async {
        let p = published(&reg).await;
        if p.contains_key("shop/payments") {
            Err(format!("{p:?}"))
        } else {
            Ok(())
        }
    })
    .await;

    // ServiceImports: every service of the registry (here: west's `orders`, and `shop/legacy`
    // in a namespace this cluster does not have) as an import naming its clusters; an import
    // of someone else is never touched, one of Strait's whose service left is deleted.
    api.store
        .lock()
        .expect("store")
        .namespaces
        .insert("shop".into());
    {
        let mut st = api.store.lock().expect("store");
        st.imports.insert(
            "shop/theirs".into(),
            json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1",
            "kind": "ServiceImport", "metadata": {"name": "theirs", "namespace": "shop"},
            "spec": {"type": "Headless"}}),
        );
        st.imports.insert(
            "shop/gone".into(),
            json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1",
            "kind": "ServiceImport", "metadata": {"name": "gone", "namespace": "shop",
                "labels": {"app.kubernetes.io/managed-by": "strait"}},
            "spec": {"type": "ClusterSetIP"}}),
        );
    }
    reg.publish(
        "cluster: west\nregion: us-west\nservices:\n\
         \x20 - {name: orders, namespace: shop, ports: [{name: grpc, port: 9090, protocol: grpc}],\n\
         \x20    endpoints: [{address: 10.9.0.1, port: 9090, zone: us-west-1a}]}\n\
         \x20 - {name: legacy, namespace: attic, ports: [{name: tcp, port: 23, protocol: tcp}],\n\
         \x20    endpoints: [{address: 10.9.0.2, port: 23, zone: us-west-1a}]}\n",
    )
    .await;
    let imports =
        crate::common::wait_for(Duration::from_secs(15), "the ServiceImports", || async {
            let st = api.store.lock().expect("store");
            let orders = st.imports.get("shop/orders");
            match orders {
                Some(o)
                    if o["status"]["clusters"] == json!([{"cluster": "west"}])
                        && !st.imports.contains_key("shop/gone") =>
                {
                    Ok(st.imports.clone())
                }
                _ => Err(format!("{:?}", st.imports)),
            }
        })
        .await;
    let orders = &imports["shop/orders"];
    assert_eq!(orders["spec"]["type"], "ClusterSetIP");
    assert_eq!(
        orders["spec"]["ports"],
        json!([{"name": "grpc", "protocol": "TCP", "port": 9090, "appProtocol": "grpc"}])
    );
    assert!(
        imports.contains_key("shop/theirs"),
        "someone else's import was touched"
    );
    assert!(
        !imports.keys().any(|k| k.starts_with("attic/")),
        "{imports:?}"
    );

    // FailoverPolicy objects become the registry's policies, as `strait policy apply` would
    // write them; an invalid one is left out; a deleted one's policy is removed.
    let policy = |name: &str, spec: Value| {
        json!({"apiVersion": "strait.io/v1alpha1", "kind": "FailoverPolicy",
            "metadata": {"name": name, "uid": format!("uid-{name}")}, "spec": spec})
    };
    let good = policy(
        "payments",
        json!({"service": "payments.shop", "targets": [{"cluster": "west"}, {"region": "us-central"}]}),
    );
    api.put(POLICIES, good.clone());
    api.put(
        POLICIES,
        policy("orders", json!({"service": "orders.shop", "targets": [{"cluster": "west", "region": "us-west"}]})),
    );
    let policies = || async {
        let (_, kvs) = reg
            .backend
            .get_prefix("/strait/v1/policies/")
            .await
            .expect("registry read");
        kvs.into_iter()
            .map(|kv| (kv.key, String::from_utf8_lossy(&kv.value).into_owned()))
            .collect::<BTreeMap<String, String>>()
    };
    let got = crate::common::wait_for(
        Duration::from_secs(15),
        "the policy in the registry",
        || async {
            let p = policies().await;
            match p.get("/strait/v1/policies/services/shop/payments") {
                Some(v) if v.contains("west") && v.contains("us-central") => Ok(p),
                _ => Err(format!("{p:?}")),
            }
        },
    )
    .await;
    assert!(
        !got.contains_key("/strait/v1/policies/services/shop/orders"),
        "an invalid FailoverPolicy was written: {got:?}"
    );
    let explained = federation::policy_file::parse(
        "p.yaml",
        "policies:\n  - service: payments.shop\n    targets: [{cluster: west}, {region: us-central}]\n",
    )
    .expect("policy file");
    assert_eq!(
        got["/strait/v1/policies/services/shop/payments"].as_bytes(),
        federation::registry::codec::encode_policy(&explained[0]).as_slice(),
        "the same policy as `strait policy apply` writes"
    );
    api.delete(POLICIES, &good);
    crate::common::wait_for(Duration::from_secs(15), "the policy removed", || async {
        let p = policies().await;
        if p.contains_key("/strait/v1/policies/services/shop/payments") {
            Err(format!("{p:?}"))
        } else {
            Ok(())
        }
    })
    .await;

    // FederatedCluster objects become east's peerings: west's (with its own CA bundle) is
    // written, the one naming east itself skipped, a broken one left out; the stale one is
    // gone, west's own peering untouched; a deleted object's peering is removed.
    let west_ca =
        federation::identity::CertificateAuthority::init("west.example", Duration::from_secs(3600))
            .expect("CA");
    let member = |name: &str, spec: Value| {
        json!({"apiVersion": "strait.io/v1alpha1", "kind": "FederatedCluster",
            "metadata": {"name": name, "uid": format!("uid-{name}")}, "spec": spec})
    };
    let west = member(
        "west",
        json!({"region": "us-west", "gateways": ["gw.west.example:15443", "203.0.113.20:15443"],
            "trust": {"trust_domain": "west.example", "ca_bundle": west_ca.ca_cert_pem()}}),
    );
    api.put(CLUSTERS, west.clone());
    api.put(
        CLUSTERS,
        member(
            "east",
            json!({"region": "us-east", "gateways": ["127.0.0.1:15443"],
            "trust": {"trust_domain": "federation.example"}}),
        ),
    );
    api.put(
        CLUSTERS,
        member("north", json!({"region": "us-north", "gateways": ["gw.north:15443"],
            "trust": {"trust_domain": "federation.example",
                "ca_bundle": "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"}})),
    );
    let peerings = || async {
        let (_, kvs) = reg
            .backend
            .get_prefix("/strait/v1/peerings/")
            .await
            .expect("registry read");
        kvs.into_iter()
            .map(|kv| (kv.key, kv.value))
            .collect::<BTreeMap<String, Vec<u8>>>()
    };
    let got = crate::common::wait_for(Duration::from_secs(15), "east's peerings", || async {
        let p = peerings().await;
        if p.contains_key("/strait/v1/peerings/east/west")
            && !p.contains_key("/strait/v1/peerings/east/gone")
        {
            Ok(p)
        } else {
            Err(format!("{:?}", p.keys().collect::<Vec<_>>()))
        }
    })
    .await;
    assert_eq!(
        got.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "/strait/v1/peerings/east/west",
            "/strait/v1/peerings/west/east"
        ],
        "east itself and the broken north are not peerings; west's own is untouched"
    );
    let key = federation::registry::codec::RegistryKey::Peering(
        federation::model::Name::parse("n", "east").expect("name"),
        federation::model::Name::parse("n", "west").expect("name"),
    );
    let federation::registry::codec::RegistryValue::Peering(p) =
        federation::registry::codec::Decoder::new()
            .decode(&key, "east/west", &got["/strait/v1/peerings/east/west"])
            .expect("a valid peering")
    else {
        panic!("not a peering")
    };
    assert_eq!(p.region.as_str(), "us-west");
    assert_eq!(
        p.gateways.iter().map(|g| g.to_string()).collect::<Vec<_>>(),
        ["gw.west.example:15443", "203.0.113.20:15443"]
    );
    assert_eq!(p.trust_domain, "west.example");
    assert_eq!(p.ca_bundle.as_deref(), Some(west_ca.ca_cert_pem()));
    api.delete(CLUSTERS, &west);
    crate::common::wait_for(Duration::from_secs(15), "the peering removed", || async {
        let p = peerings().await;
        if p.contains_key("/strait/v1/peerings/east/west") {
            Err(format!("{:?}", p.keys().collect::<Vec<_>>()))
        } else {
            Ok(())
        }
    })
    .await;
    cp.shutdown().await;
    api.stop.cancel();
}

#[tokio::test]
async fn bad_kubernetes_configuration_is_refused_with_the_reason() {
    use controlplane::config::ControlPlaneConfig;
    let cfg = |discovery: &str| {
        ControlPlaneConfig::parse(
            "/etc/strait/cp.yaml",
            &format!(
                "cluster: east\nregion: us-east\nregistry: {{embedded: true}}\n\
                 discovery: {discovery}\nxds: {{listen: \"127.0.0.1:0\"}}\nadmin: {{listen: \"127.0.0.1:0\"}}\n"
            ),
        )
    };
    for (discovery, want) in [
        (
            "{file: east.yaml, kubernetes: {}}",
            "give exactly one of `file: PATH` and `kubernetes: {…}`",
        ),
        ("{}", "give exactly one of"),
        (
            "{kubernetes: {gateways: [\"nowhere\"]}}",
            "discovery.kubernetes.gateways[0]",
        ),
        ("{kubernetes: {kubeconfig: k.yaml, colour: blue}}", "colour"),
        (
            "{kubernetes: {identities: {ca: ca, validity: 1m}}}",
            "discovery.kubernetes.identities.validity",
        ),
        ("{kubernetes: {identities: {ca: ca, ttl: 1h}}}", "ttl"),
    ] {
        let e = cfg(discovery).expect_err(discovery).to_string();
        assert!(e.contains(want), "{discovery}: `{e}` does not say `{want}`");
    }
    // A kubeconfig that is not there: the control plane does not start, and says which file.
    let missing = cfg("{kubernetes: {kubeconfig: missing-kube.yaml}}").expect("parses");
    let e = controlplane::server::ControlPlane::start_with(
        missing,
        federation::registry::Backend::Embedded(
            federation::registry::embedded::EmbeddedRegistry::new(),
        ),
    )
    .await
    .err()
    .expect("no kubeconfig, no start")
    .to_string();
    assert!(
        e.contains("kubernetes discovery: kubeconfig /etc/strait/missing-kube.yaml"),
        "{e}"
    );
    // A CA directory that is not there: no start either, naming it.
    let dir = tempfile::tempdir().expect("tempdir");
    write_kubeconfig(dir.path(), "http://127.0.0.1:9");
    let no_ca = cfg(&format!(
        "{{kubernetes: {{kubeconfig: {}, identities: {{ca: /nonexistent/strait-ca}}}}}}",
        dir.path().join("kube.yaml").display()
    ))
    .expect("parses");
    let e = controlplane::server::ControlPlane::start_with(
        no_ca,
        federation::registry::Backend::Embedded(
            federation::registry::embedded::EmbeddedRegistry::new(),
        ),
    )
    .await
    .err()
    .expect("no CA, no start")
    .to_string();
    assert!(
        e.contains("discovery.kubernetes.identities.ca: /nonexistent/strait-ca"),
        "{e}"
    );
}

/// POST `body` to the webhook over TLS (the API server's side: the serving certificate checked
/// against the CA bundle for the Service's DNS name) and return the status and body.
async fn webhook_call(
    addr: std::net::SocketAddr,
    ca: &std::path::Path,
    method: &str,
    body: Vec<u8>,
) -> (u16, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let roots = federation::identity::load_roots(ca).expect("CA bundle");
    let config =
        rustls::ClientConfig::builder_with_provider(federation::identity::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name =
        rustls::pki_types::ServerName::try_from("strait-controlplane.strait-system.svc").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("the webhook's certificate verifies for the Service's name");
    let head = format!(
        "{method} /inject HTTP/1.1\r\nHost: strait-controlplane.strait-system.svc\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    // A body over the limit is cut short by the server: it may stop reading.
    let _ = tls.write_all(&body).await;
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| out[i + 4..].to_vec())
        .unwrap_or_default();
    (status, body)
}

/// The sidecar-injection webhook as the API server calls it: HTTPS with a serving certificate
/// for the Service's DNS name, a real `AdmissionReview` in and a JSON patch out; GET, a body
/// over the limit and a handshake of garbage get clear refusals, and it keeps serving. Its
/// certificate is made by no hand: it serves the control plane's own, issued from the CA (as
/// the Kubernetes install configures it), and after the CA is rotated it serves one of the new
/// CA without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_injection_webhook_answers_admission_reviews_over_https() {
    use controlplane::config::ControlPlaneConfig;
    use federation::identity::CertificateAuthority;
    crate::common::install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::init("test.strait", Duration::from_secs(86400)).unwrap();
    ca.write(dir.path().join("ca"), false).unwrap();
    let tls = dir.path().join("tls");
    // What the API server is given as the webhook's caBundle: the CA's certificate.
    let bundle = dir.path().join("ca/ca.pem");
    let cfg = ControlPlaneConfig::parse(
        dir.path().join("cp.yaml"),
        &format!(
            "cluster: east\nregion: us-east\nregistry: {{embedded: true}}\n\
             certificates: {{ca: ca, validity: 1h, controlplane: {{files: tls, dns_names: [strait-controlplane.strait-system.svc]}}}}\n\
             xds: {{listen: \"127.0.0.1:0\"}}\nadmin: {{listen: \"127.0.0.1:0\"}}\n\
             webhook:\n  listen: \"127.0.0.1:0\"\n  tls: {{cert: {}, key: {}}}\n\
             \x20 sidecar: {{image: \"ghcr.io/strait/strait:0.1.0\", gateway: null}}\n",
            tls.join("cert.pem").display(),
            tls.join("key.pem").display()
        ),
    )
    .expect("config");
    let cp = controlplane::server::ControlPlane::start(cfg)
        .await
        .expect("control plane");
    let addr = cp.webhook_addr.expect("the webhook listens");

    // Garbage where a TLS handshake belongs: that connection alone is dropped.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
        raw.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut buf))
            .await
            .expect("the server closes a connection that is not TLS");
    }

    let review = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "b1e4a7d2-0c1f-4f43-9d55-0d2a4c1f6e01",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"generateName": "web-", "namespace": "shop"},
                "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]}
            }
        }
    });
    let (status, body) =
        webhook_call(addr, &bundle, "POST", serde_json::to_vec(&review).unwrap()).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let out: Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(out["kind"], "AdmissionReview");
    let r = &out["response"];
    assert_eq!(r["uid"], "b1e4a7d2-0c1f-4f43-9d55-0d2a4c1f6e01");
    assert_eq!(
        (r["allowed"].as_bool(), r["patchType"].as_str()),
        (Some(true), Some("JSONPatch"))
    );
    let patch = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(r["patch"].as_str().expect("base64"))
            .unwrap()
    };
    let patch = String::from_utf8(patch).unwrap();
    assert!(
        patch.contains("strait-proxy") && patch.contains("--cluster\",\"east"),
        "{patch}"
    );
    assert!(
        !patch.contains("--gateway"),
        "gateway: null leaves the flag out: {patch}"
    );

    // Malformed: a denial, not a crash; GET and a body over the limit: HTTP errors.
    let (status, body) = webhook_call(addr, &bundle, "POST", b"{not json".to_vec()).await;
    assert_eq!(status, 200);
    let out: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(out["response"]["allowed"], false, "{out}");
    let (status, _) = webhook_call(addr, &bundle, "GET", Vec::new()).await;
    assert_eq!(status, 405);
    let (status, body) = webhook_call(addr, &bundle, "POST", vec![b' '; 5 << 20]).await;
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));
    // Still serving.
    let (status, _) =
        webhook_call(addr, &bundle, "POST", serde_json::to_vec(&review).unwrap()).await;
    assert_eq!(status, 200);

    // The CA is rotated (by hand, as a CA is): the control plane issues its certificate anew
    // from the new one and the webhook serves it, with no restart; an API server given the new
    // CA bundle is answered.
    let new_ca = CertificateAuthority::init("test.strait", Duration::from_secs(86400)).unwrap();
    new_ca.write(dir.path().join("new-ca"), false).unwrap();
    new_ca.write(dir.path().join("ca"), true).unwrap();
    let new_bundle = dir.path().join("new-ca/ca.pem");
    let roots = federation::identity::load_roots(&new_bundle).expect("new CA bundle");
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(federation::identity::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    crate::common::wait_for(
        Duration::from_secs(30),
        "the webhook to serve a certificate of the rotated CA",
        || {
            let config = config.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| e.to_string())?;
                let name = rustls::pki_types::ServerName::try_from(
                    "strait-controlplane.strait-system.svc",
                )
                .unwrap();
                tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        },
    )
    .await;
    let (status, _) = webhook_call(
        addr,
        &new_bundle,
        "POST",
        serde_json::to_vec(&review).unwrap(),
    )
    .await;
    assert_eq!(
        status, 200,
        "the webhook answers with the new CA's certificate"
    );
    cp.shutdown().await;
}
