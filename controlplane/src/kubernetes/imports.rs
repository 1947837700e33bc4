//! Multi-Cluster Services `ServiceImport`s: for every service the federation's registry holds
//! (exported by this cluster or any other), the control plane keeps a `ServiceImport`
//! (`multicluster.x-k8s.io/v1alpha1`) of the same name in the same namespace, so that cluster
//! tooling sees the clusterset's services: `spec.type: ClusterSetIP`, the service's ports (with
//! `appProtocol`), and `status.clusters` naming the clusters that export it. Proxies reach them
//! as `NAME.NAMESPACE.svc.clusterset.local`.
//!
//! Imports are written with server-side apply (field manager `strait-controlplane`), labelled
//! `app.kubernetes.io/managed-by: strait`; an import with that label whose service left the
//! registry is deleted, and imports of anyone else are never touched. A namespace this cluster
//! does not have is reported and skipped (the import appears once the namespace does, at the
//! next change). Failures are retried with back-off; nothing is written before the registry
//! has been read once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use federation::registry::Snapshot;
use kube::Client;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::ObjectKey;

pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const FIELD_MANAGER: &str = "strait-controlplane";

/// The `ServiceImport` resource of the Multi-Cluster Services API.
pub fn service_import_resource() -> ApiResource {
    let gvk = GroupVersionKind::gvk("multicluster.x-k8s.io", "v1alpha1", "ServiceImport");
    ApiResource::from_gvk_with_plural(&gvk, "serviceimports")
}

/// The imports the registry calls for: (namespace, name) → the object (spec and status).
/// A service's ports are `own`'s definition when this cluster exports it, else the first
/// exporting cluster's (as the control plane's routes take them).
pub fn desired(snapshot: &Snapshot, own: &str) -> BTreeMap<ObjectKey, Value> {
    let mut by_service: BTreeMap<ObjectKey, (Vec<String>, Option<&federation::model::Service>)> =
        BTreeMap::new();
    for ((key, cluster), se) in &snapshot.endpoints {
        let k = (key.namespace.to_string(), key.name.to_string());
        let entry = by_service.entry(k).or_default();
        entry.0.push(cluster.to_string());
        if entry.1.is_none() || cluster.as_str() == own {
            entry.1 = Some(&se.service);
        }
    }
    by_service
        .into_iter()
        .filter_map(|(k, (clusters, service))| {
            let service = service?;
            let ports: Vec<Value> = service
                .ports
                .iter()
                .map(|p| {
                    let app = match p.protocol {
                        federation::model::Protocol::Http => Some("http"),
                        federation::model::Protocol::Http2 => Some("kubernetes.io/h2c"),
                        federation::model::Protocol::Grpc => Some("grpc"),
                        federation::model::Protocol::Tcp => None,
                    };
                    let mut v = json!({"name": p.name.as_str(), "protocol": "TCP", "port": p.port});
                    if let Some(a) = app {
                        v["appProtocol"] = json!(a);
                    }
                    v
                })
                .collect();
            let obj = json!({
                "apiVersion": "multicluster.x-k8s.io/v1alpha1",
                "kind": "ServiceImport",
                "metadata": {"name": k.1, "namespace": k.0, "labels": {MANAGED_BY: "strait"}},
                "spec": {"type": "ClusterSetIP", "ports": ports},
                "status": {"clusters": clusters.iter().map(|c| json!({"cluster": c})).collect::<Vec<_>>()},
            });
            Some((k, obj))
        })
        .collect()
}

/// What of an import this control plane owns (to compare with what is there).
fn owned(o: &Value) -> (Value, Value) {
    (o["spec"].clone(), o["status"].clone())
}

/// One pass: make the cluster's managed imports what `want` says. Returns what it did, or the
/// first error that stops the pass (the rest is retried).
async fn reconcile(
    client: &Client,
    want: &BTreeMap<ObjectKey, Value>,
    have: &mut BTreeMap<ObjectKey, Value>,
    skipped: &mut BTreeSet<String>,
) -> Result<usize, kube::Error> {
    let ar = service_import_resource();
    let all = Api::<DynamicObject>::all_with(client.clone(), &ar);
    let listed = all
        .list(&ListParams::default().labels(&format!("{MANAGED_BY}=strait")))
        .await?;
    have.clear();
    for o in listed.items {
        if let (Some(ns), Some(name)) = (o.metadata.namespace.clone(), o.metadata.name.clone()) {
            have.insert((ns, name), serde_json::to_value(&o).unwrap_or_default());
        }
    }
    let mut done = 0;
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for (k, obj) in want {
        if have.get(k).map(owned) == Some(owned(obj)) {
            continue;
        }
        let api = Api::<DynamicObject>::namespaced_with(client.clone(), &k.0, &ar);
        let mut main = obj.clone();
        if let Some(m) = main.as_object_mut() {
            m.remove("status");
        }
        match api.patch(&k.1, &params, &Patch::Apply(&main)).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {
                if skipped.insert(format!("{}/{}", k.0, k.1)) {
                    tracing::warn!(namespace = %k.0, service = %k.1,
                        "ServiceImport not written: {} (no such namespace in this cluster?)", e.message);
                }
                continue;
            }
            Err(e) => return Err(e),
        }
        let status = json!({"apiVersion": obj["apiVersion"], "kind": obj["kind"],
            "metadata": {"name": k.1, "namespace": k.0}, "status": obj["status"]});
        api.patch_status(&k.1, &params, &Patch::Apply(&status))
            .await?;
        skipped.remove(&format!("{}/{}", k.0, k.1));
        done += 1;
    }
    for k in have.keys() {
        if !want.contains_key(k) {
            let api = Api::<DynamicObject>::namespaced_with(client.clone(), &k.0, &ar);
            match api.delete(&k.1, &DeleteParams::default()).await {
                Ok(_) => done += 1,
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(done)
}

/// Keep the cluster's `ServiceImport`s in step with the registry until `stop`.
pub async fn follow_imports(
    client: Client,
    own: String,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    coalesce: Duration,
    stop: CancellationToken,
) {
    let mut have = BTreeMap::new();
    let mut skipped = BTreeSet::new();
    let mut retry = Duration::from_millis(500);
    let mut last: Option<BTreeMap<ObjectKey, Value>> = None;
    loop {
        let snapshot = snapshots.borrow_and_update().clone();
        if snapshot.revision > 0 {
            let want = desired(&snapshot, &own);
            if last.as_ref() != Some(&want) {
                match reconcile(&client, &want, &mut have, &mut skipped).await {
                    Ok(n) => {
                        if n > 0 {
                            tracing::info!(
                                changes = n,
                                imports = want.len(),
                                "ServiceImports in step with the registry"
                            );
                        }
                        last = Some(want);
                        retry = Duration::from_millis(500);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?retry, "cannot write ServiceImports; retrying");
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(retry) => {}
                        }
                        retry = (retry * 2).min(Duration::from_secs(30));
                        continue;
                    }
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            r = snapshots.changed() => if r.is_err() { return },
        }
        // Coalesce bursts of registry changes.
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(coalesce) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use federation::model::{
        ClusterId, Endpoint, Locality, Protocol, Service, ServiceEndpoints, ServiceKey, ServicePort,
    };

    fn add(
        snap: &mut Snapshot,
        cluster: &str,
        ns: &str,
        name: &str,
        ports: &[(&str, u16, Protocol)],
    ) {
        let c = ClusterId::parse("c", cluster).unwrap();
        let svc = Service::new(
            ServiceKey::new(ns, name).unwrap(),
            ports
                .iter()
                .map(|(n, p, proto)| ServicePort::new(n, *p, *proto).unwrap())
                .collect(),
        )
        .unwrap();
        let ep = Endpoint::new(
            std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1)),
            ports[0].1,
            Locality::parse("l", "us-east/a").unwrap(),
            c.clone(),
        )
        .unwrap();
        snap.endpoints.insert(
            (svc.key.clone(), c.clone()),
            Arc::new(ServiceEndpoints::new(c, svc, vec![ep]).unwrap()),
        );
    }

    #[test]
    fn every_service_of_the_registry_gets_an_import_naming_its_clusters() {
        let mut snap = Snapshot::default();
        add(
            &mut snap,
            "west",
            "shop",
            "payments",
            &[
                ("http", 8080, Protocol::Http),
                ("grpc", 9090, Protocol::Grpc),
            ],
        );
        add(
            &mut snap,
            "east",
            "shop",
            "payments",
            &[("http", 8080, Protocol::Http)],
        );
        add(
            &mut snap,
            "central",
            "db",
            "pg",
            &[("tcp", 5432, Protocol::Tcp)],
        );
        let d = desired(&snap, "east");
        assert_eq!(d.len(), 2);
        let p = &d[&("shop".to_string(), "payments".to_string())];
        assert_eq!(p["metadata"]["labels"][MANAGED_BY], "strait");
        assert_eq!(p["spec"]["type"], "ClusterSetIP");
        assert_eq!(
            p["spec"]["ports"],
            json!([{"name": "http", "protocol": "TCP", "port": 8080, "appProtocol": "http"}]),
            "east's own definition of the ports"
        );
        assert_eq!(
            p["status"]["clusters"],
            json!([{"cluster": "east"}, {"cluster": "west"}])
        );
        let pg = &d[&("db".to_string(), "pg".to_string())];
        assert_eq!(
            pg["spec"]["ports"],
            json!([{"name": "tcp", "protocol": "TCP", "port": 5432}])
        );
        assert_eq!(pg["status"]["clusters"], json!([{"cluster": "central"}]));
        // From west's side, west's own definition (two ports).
        let w = desired(&snap, "west");
        assert_eq!(
            w[&("shop".to_string(), "payments".to_string())]["spec"]["ports"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
    }
}
