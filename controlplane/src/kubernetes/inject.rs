//! Sidecar injection: the mutating admission webhook the control plane serves (TLS) for pod
//! creation in namespaces labelled `strait.io/inject=enabled` (the webhook configuration's
//! `namespaceSelector` does that selection; see `strait install kubernetes`).
//!
//! To each pod it adds, as one JSON patch (RFC 6902):
//! - the init container `strait-init` (`strait proxy iptables`): the pod's outgoing TCP,
//!   except loopback and the proxy's own (user 1337), redirected to the proxy's transparent
//!   listener;
//! - the proxy `strait-proxy` as a native sidecar (an init container with
//!   `restartPolicy: Always`, Kubernetes ≥ 1.29): it starts after the redirection and before the
//!   application, is ready when its admin `/ready` says so, and stops after the application;
//!   it asks the control plane for its transparent listener (`--transparent`), takes its
//!   locality from the cluster's region and the pod's `topology.kubernetes.io/zone` label, and
//!   reaches other clusters through the gateway's ingress with its workload certificate;
//! - the workload certificate: the Secret `strait-identity-SERVICEACCOUNT` mounted read-only;
//! - the annotation `strait.io/injected: "true"`.
//!
//! Left alone: pods that opt out (annotation `strait.io/inject: "false"`), pods already injected
//! (the annotation, or a container named `strait-proxy`), and `hostNetwork` pods (their
//! iptables are the node's). A request that cannot be read is denied with the reason, never a
//! crash.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector, Pod, Probe,
    ResourceRequirements, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use serde::Deserialize;
use serde_json::{Value, json};

/// The namespace label that turns injection on (value `enabled`).
pub const NAMESPACE_LABEL: &str = "strait.io/inject";
/// The pod annotation that turns it off (value `false`).
pub const OPT_OUT_ANNOTATION: &str = "strait.io/inject";
/// The annotation an injected pod carries.
pub const INJECTED_ANNOTATION: &str = "strait.io/injected";
pub const PROXY_CONTAINER: &str = "strait-proxy";
pub const INIT_CONTAINER: &str = "strait-init";
pub const IDENTITY_VOLUME: &str = "strait-identity";
/// Where the workload certificate is mounted in the proxy container.
pub const IDENTITY_DIR: &str = "/var/run/strait/identity";
/// The pod label Kubernetes (≥ 1.33, `PodTopologyLabelsAdmission`) copies from the node.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// What the injected sidecar looks like (`webhook.sidecar` in the control plane's config).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SidecarConfig {
    /// The image with the `strait` binary.
    pub image: String,
    /// The control plane's xDS address as pods reach it.
    #[serde(default = "default_xds")]
    pub xds: String,
    /// The gateway's ingress as pods reach it; `null`: no other clusters.
    #[serde(default = "default_gateway")]
    pub gateway: Option<String>,
    #[serde(default = "default_uid")]
    pub proxy_uid: i64,
    #[serde(default = "default_outbound")]
    pub outbound_port: u16,
    #[serde(default = "default_transparent")]
    pub transparent_port: u16,
    #[serde(default = "default_admin")]
    pub admin_port: u16,
    /// The proxy's CPU and memory requests, and its memory limit.
    #[serde(default = "default_cpu")]
    pub cpu_request: String,
    #[serde(default = "default_memory")]
    pub memory_request: String,
    #[serde(default = "default_memory_limit")]
    pub memory_limit: String,
}

fn default_xds() -> String {
    "strait-controlplane.strait-system.svc:15010".into()
}
fn default_gateway() -> Option<String> {
    Some("strait-gateway.strait-system.svc:15008".into())
}
fn default_uid() -> i64 {
    1337
}
fn default_outbound() -> u16 {
    15001
}
fn default_transparent() -> u16 {
    15006
}
fn default_admin() -> u16 {
    15000
}
fn default_cpu() -> String {
    "50m".into()
}
fn default_memory() -> String {
    "32Mi".into()
}
fn default_memory_limit() -> String {
    "256Mi".into()
}

impl SidecarConfig {
    /// The defaults with `image`.
    pub fn with_image(image: &str) -> Self {
        Self {
            image: image.into(),
            xds: default_xds(),
            gateway: default_gateway(),
            proxy_uid: default_uid(),
            outbound_port: default_outbound(),
            transparent_port: default_transparent(),
            admin_port: default_admin(),
            cpu_request: default_cpu(),
            memory_request: default_memory(),
            memory_limit: default_memory_limit(),
        }
    }
}

/// Who the sidecars are: the cluster and region (the control plane's own).
#[derive(Debug, Clone)]
pub struct Injector {
    pub cluster: String,
    pub region: String,
    pub sidecar: SidecarConfig,
}

/// What the webhook decided for one pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Allowed unchanged, and why.
    Skip(String),
    /// Allowed with this JSON patch.
    Patch(Vec<Value>),
}

fn env_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// CPU and memory requests and a memory limit (no CPU limit: throttling a proxy adds latency).
pub fn resources(cpu: &str, memory: &str, limit: &str) -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity(cpu.into())),
            ("memory".to_string(), Quantity(memory.into())),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_string(),
            Quantity(limit.into()),
        )])),
        ..Default::default()
    }
}

impl Injector {
    /// The init container that sets the redirection.
    pub fn init_container(&self) -> Container {
        let s = &self.sidecar;
        Container {
            name: INIT_CONTAINER.into(),
            image: Some(s.image.clone()),
            args: Some(
                [
                    "proxy",
                    "iptables",
                    "--uid",
                    &s.proxy_uid.to_string(),
                    "--to-port",
                    &s.transparent_port.to_string(),
                ]
                .map(String::from)
                .to_vec(),
            ),
            security_context: Some(SecurityContext {
                run_as_user: Some(0),
                run_as_non_root: Some(false),
                allow_privilege_escalation: Some(false),
                read_only_root_filesystem: Some(true),
                capabilities: Some(Capabilities {
                    add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                    drop: Some(vec!["ALL".into()]),
                }),
                ..Default::default()
            }),
            resources: Some(resources("10m", "16Mi", "64Mi")),
            ..Default::default()
        }
    }

    /// The proxy, as a native sidecar.
    pub fn proxy_container(&self) -> Container {
        let s = &self.sidecar;
        let mut args: Vec<String> = [
            "proxy",
            "run",
            "--node-id",
            "$(POD_NAME).$(POD_NAMESPACE)",
            "--cluster",
            &self.cluster,
            "--locality",
            &format!("{}/$(STRAIT_ZONE)", self.region),
            "--xds",
            &s.xds,
            "--outbound",
            &format!("127.0.0.1:{}", s.outbound_port),
            "--transparent",
            &format!("127.0.0.1:{}", s.transparent_port),
            "--admin",
            &format!("0.0.0.0:{}", s.admin_port),
            "--cert",
            &format!("{IDENTITY_DIR}/cert.pem"),
            "--key",
            &format!("{IDENTITY_DIR}/key.pem"),
            "--ca",
            &format!("{IDENTITY_DIR}/ca.pem"),
        ]
        .map(String::from)
        .to_vec();
        if let Some(g) = &s.gateway {
            args.extend(["--gateway".to_string(), g.clone()]);
        }
        let ready = Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/ready".into()),
                port: IntOrString::Int(i32::from(s.admin_port)),
                ..Default::default()
            }),
            period_seconds: Some(2),
            failure_threshold: Some(3),
            ..Default::default()
        };
        Container {
            name: PROXY_CONTAINER.into(),
            image: Some(s.image.clone()),
            args: Some(args),
            // A native sidecar: started before the application, stopped after it.
            restart_policy: Some("Always".into()),
            env: Some(vec![
                env_field("POD_NAME", "metadata.name"),
                env_field("POD_NAMESPACE", "metadata.namespace"),
                env_field("STRAIT_ZONE", &format!("metadata.labels['{ZONE_LABEL}']")),
            ]),
            security_context: Some(SecurityContext {
                run_as_user: Some(s.proxy_uid),
                run_as_group: Some(s.proxy_uid),
                run_as_non_root: Some(true),
                allow_privilege_escalation: Some(false),
                read_only_root_filesystem: Some(true),
                capabilities: Some(Capabilities {
                    drop: Some(vec!["ALL".into()]),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            resources: Some(resources(
                &s.cpu_request,
                &s.memory_request,
                &s.memory_limit,
            )),
            startup_probe: Some(Probe {
                failure_threshold: Some(60),
                period_seconds: Some(1),
                ..ready.clone()
            }),
            readiness_probe: Some(ready),
            volume_mounts: Some(vec![VolumeMount {
                name: IDENTITY_VOLUME.into(),
                mount_path: IDENTITY_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            }]),
            ..Default::default()
        }
    }

    /// What to do with `pod` (as the API server sent it).
    pub fn decide(&self, pod: &Pod) -> Result<Decision, String> {
        let annotations = pod.metadata.annotations.as_ref();
        let annotation = |k: &str| annotations.and_then(|a| a.get(k)).map(String::as_str);
        if annotation(OPT_OUT_ANNOTATION) == Some("false") {
            return Ok(Decision::Skip(format!(
                "the pod opts out ({OPT_OUT_ANNOTATION}: \"false\")"
            )));
        }
        if annotation(INJECTED_ANNOTATION).is_some() {
            return Ok(Decision::Skip("already injected".into()));
        }
        let Some(spec) = &pod.spec else {
            return Err("the pod has no spec".into());
        };
        let named = |c: &Vec<Container>| c.iter().any(|c| c.name == PROXY_CONTAINER);
        if named(&spec.containers) || spec.init_containers.as_ref().is_some_and(named) {
            return Ok(Decision::Skip(format!(
                "the pod already has a container named {PROXY_CONTAINER}"
            )));
        }
        if spec.host_network == Some(true) {
            return Ok(Decision::Skip(
                "hostNetwork pod: its iptables are the node's".into(),
            ));
        }
        if spec
            .volumes
            .as_ref()
            .is_some_and(|v| v.iter().any(|v| v.name == IDENTITY_VOLUME))
        {
            return Err(format!(
                "the pod already has a volume named {IDENTITY_VOLUME}"
            ));
        }
        let account = spec
            .service_account_name
            .as_deref()
            .filter(|s| !s.is_empty())
            .unwrap_or("default");
        let volume = Volume {
            name: IDENTITY_VOLUME.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(format!("strait-identity-{account}")),
                // Readable by the proxy's user without touching the pod's fsGroup (which
                // would change the application's volumes too); only the proxy mounts it.
                default_mode: Some(0o444),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut ops = Vec::new();
        let init = [
            to_json(&self.init_container())?,
            to_json(&self.proxy_container())?,
        ];
        if spec.init_containers.as_ref().is_none_or(Vec::is_empty) {
            ops.push(json!({"op": "add", "path": "/spec/initContainers", "value": init}));
        } else {
            for c in init {
                ops.push(json!({"op": "add", "path": "/spec/initContainers/-", "value": c}));
            }
        }
        let volume = to_json(&volume)?;
        if spec.volumes.as_ref().is_none_or(Vec::is_empty) {
            ops.push(json!({"op": "add", "path": "/spec/volumes", "value": [volume]}));
        } else {
            ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": volume}));
        }
        if annotations.is_none() {
            ops.push(json!({"op": "add", "path": "/metadata/annotations",
                "value": {INJECTED_ANNOTATION: "true"}}));
        } else {
            ops.push(json!({"op": "add",
                "path": format!("/metadata/annotations/{}", INJECTED_ANNOTATION.replace('~', "~0").replace('/', "~1")),
                "value": "true"}));
        }
        Ok(Decision::Patch(ops))
    }

    /// Answer one `AdmissionReview` (the request body) with the review to send back: allowed
    /// with a patch, allowed unchanged, or denied with the reason.
    pub fn review(&self, body: &[u8]) -> Value {
        let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => {
                return respond(AdmissionResponse::invalid(format!(
                    "not an AdmissionReview: {e}"
                )));
            }
        };
        let req: AdmissionRequest<DynamicObject> = match review.try_into() {
            Ok(r) => r,
            Err(_) => {
                return respond(AdmissionResponse::invalid(
                    "the AdmissionReview has no request",
                ));
            }
        };
        let response = AdmissionResponse::from(&req);
        let what = format!("{}/{}", req.namespace.as_deref().unwrap_or(""), req.name);
        if !req.kind.group.is_empty() || req.kind.kind != "Pod" {
            return respond(response.deny(format!(
                "strait injects pods only, not {}/{}",
                req.kind.group, req.kind.kind
            )));
        }
        if req.operation != Operation::Create {
            // Only creation is injected; anything else passes unchanged (a webhook
            // registered too broadly must not block pod updates).
            tracing::warn!(pod = %what, operation = ?req.operation,
                "not injected: the webhook injects on CREATE only");
            return respond(response);
        }
        let pod: Pod = match req
            .object
            .as_ref()
            .map(|o| serde_json::to_value(o).and_then(serde_json::from_value::<Pod>))
        {
            Some(Ok(p)) => p,
            Some(Err(e)) => return respond(response.deny(format!("the pod cannot be read: {e}"))),
            None => return respond(response.deny("the request has no object")),
        };
        match self.decide(&pod) {
            Ok(Decision::Skip(why)) => {
                tracing::debug!(pod = %what, %why, "not injected");
                respond(response)
            }
            Ok(Decision::Patch(ops)) => {
                let patch: Result<json_patch::Patch, _> = serde_json::from_value(Value::Array(ops));
                match patch
                    .map_err(|e| e.to_string())
                    .and_then(|p| response.clone().with_patch(p).map_err(|e| e.to_string()))
                {
                    Ok(r) => {
                        tracing::info!(pod = %what, "sidecar injected");
                        respond(r)
                    }
                    Err(e) => respond(response.deny(format!("cannot build the patch: {e}"))),
                }
            }
            Err(why) => {
                tracing::warn!(pod = %what, %why, "injection refused");
                respond(response.deny(why))
            }
        }
    }
}

/// The review JSON as Kubernetes reads it: the patch base64-encoded (a Go `[]byte`).
fn respond(r: AdmissionResponse) -> Value {
    use base64::Engine;
    let mut v = serde_json::to_value(r.into_review()).unwrap_or_else(|e| {
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "response": {"uid": "", "allowed": false,
                "status": {"message": format!("cannot encode the response: {e}")}}})
    });
    if let Some(patch) = v.pointer_mut("/response/patch")
        && let Some(bytes) = patch.as_array().map(|a| {
            a.iter()
                .filter_map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
                .collect::<Vec<u8>>()
        })
    {
        *patch = Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
    v
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Value, String> {
    serde_json::to_value(v).map_err(|e| format!("cannot encode the patch: {e}"))
}

/// The webhook's settings (`webhook:` in the control plane's config).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where the API server calls it (HTTPS, path `/inject`).
    pub listen: std::net::SocketAddr,
    /// The serving certificate (valid for the webhook Service's DNS name) and its key; re-read
    /// when the files change.
    pub tls: WebhookTls,
    pub sidecar: SidecarConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookTls {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

/// The largest `AdmissionReview` read (the API server's own request limit is 3 MiB).
pub const MAX_REVIEW: usize = 4 << 20;

/// The serving TLS config, re-read when the certificate or key file changes.
pub struct ServingTls {
    files: WebhookTls,
    current: std::sync::Mutex<(
        Option<std::time::SystemTime>,
        std::sync::Arc<rustls::ServerConfig>,
    )>,
}

fn modified(files: &WebhookTls) -> Option<std::time::SystemTime> {
    let m = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    m(&files.cert).max(m(&files.key))
}

fn load_tls(files: &WebhookTls) -> Result<rustls::ServerConfig, String> {
    let certs = federation::identity::load_certs(&files.cert)
        .map_err(|e| format!("webhook.tls.cert {}: {e}", files.cert.display()))?;
    let key = federation::identity::load_private_key(&files.key)
        .map_err(|e| format!("webhook.tls.key {}: {e}", files.key.display()))?;
    let mut c =
        rustls::ServerConfig::builder_with_provider(federation::identity::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| format!("webhook.tls: {e}"))?;
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(c)
}

impl ServingTls {
    pub fn load(files: WebhookTls) -> Result<Self, String> {
        let at = modified(&files);
        let c = load_tls(&files)?;
        Ok(Self {
            files,
            current: std::sync::Mutex::new((at, std::sync::Arc::new(c))),
        })
    }

    /// The config to serve with now: re-read if the files changed (a bad new pair is logged
    /// and the last good one kept).
    pub fn config(&self) -> std::sync::Arc<rustls::ServerConfig> {
        let at = modified(&self.files);
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if at != cur.0 {
            match load_tls(&self.files) {
                Ok(c) => {
                    tracing::info!("webhook certificate reloaded");
                    *cur = (at, std::sync::Arc::new(c));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "webhook certificate not reloaded; keeping the last good one");
                    cur.0 = at;
                }
            }
        }
        cur.1.clone()
    }
}

/// Serve the webhook on `listener` until `stop`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: std::sync::Arc<ServingTls>,
    injector: std::sync::Arc<Injector>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
        let injector = injector.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(
                std::time::Duration::from_secs(10),
                acceptor.accept(tcp),
            )
            .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "webhook TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "webhook TLS handshake timed out");
                    return;
                }
            };
            let svc = hyper::service::service_fn(move |req| {
                let injector = injector.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(&injector, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .header_read_timeout(std::time::Duration::from_secs(10))
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn handle(
    injector: &Injector,
    req: http::Request<hyper::body::Incoming>,
) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    use http::StatusCode;
    use http_body_util::BodyExt;
    let reply = |status: StatusCode, content_type: &str, body: Vec<u8>| {
        let mut r = http::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
        *r.status_mut() = status;
        if let Ok(v) = http::HeaderValue::from_str(content_type) {
            r.headers_mut().insert(http::header::CONTENT_TYPE, v);
        }
        r
    };
    let text = |status, msg: &str| reply(status, "text/plain", format!("{msg}\n").into_bytes());
    if req.uri().path() != "/inject" {
        return text(
            StatusCode::NOT_FOUND,
            "not found (the webhook is POST /inject)",
        );
    }
    if req.method() != http::Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "POST an AdmissionReview");
    }
    let body = match http_body_util::Limited::new(req.into_body(), MAX_REVIEW)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("the AdmissionReview could not be read (limit {MAX_REVIEW} bytes): {e}"),
            );
        }
    };
    let review = injector.review(&body);
    reply(
        StatusCode::OK,
        "application/json",
        serde_json::to_vec(&review).unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn injector() -> Injector {
        Injector {
            cluster: "east".into(),
            region: "us-east".into(),
            sidecar: SidecarConfig::with_image("ghcr.io/strait/strait:0.1.0"),
        }
    }

    /// An `AdmissionReview` as the API server sends it for a pod creation.
    fn review_of(pod: Value, operation: &str) -> Value {
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                "requestResource": {"group": "", "version": "v1", "resource": "pods"},
                "name": "payments-7c9d8-x2x4q",
                "namespace": "shop",
                "operation": operation,
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                    "uid": "3f4ff4b4", "groups": ["system:serviceaccounts"]},
                "object": pod,
                "oldObject": null,
                "dryRun": false,
                "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
            }
        })
    }

    fn pod() -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "generateName": "payments-7c9d8-",
                "namespace": "shop",
                "labels": {"app": "payments", "topology.kubernetes.io/zone": "us-east-1a"}
            },
            "spec": {
                "serviceAccountName": "payments",
                "containers": [{
                    "name": "app",
                    "image": "registry.example/payments:1.4",
                    "ports": [{"containerPort": 8080, "protocol": "TCP"}]
                }]
            }
        })
    }

    fn run(body: &Value) -> Value {
        injector().review(&serde_json::to_vec(body).unwrap())
    }

    /// The response's patch, applied to `pod`, as a real `Pod`.
    fn patched(response: &Value, pod: &Value) -> Pod {
        use base64::Engine;
        let r = &response["response"];
        assert_eq!(r["allowed"], true, "{response}");
        assert_eq!(r["patchType"], "JSONPatch", "{response}");
        let raw = base64::engine::general_purpose::STANDARD
            .decode(r["patch"].as_str().expect("a base64 string"))
            .unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&raw).unwrap();
        let mut doc = pod.clone();
        json_patch::patch(&mut doc, &patch).expect("the patch applies");
        serde_json::from_value(doc).expect("the result is a Pod")
    }

    #[test]
    fn a_pod_gets_the_init_container_the_sidecar_its_identity_and_the_annotation() {
        let out = run(&review_of(pod(), "CREATE"));
        assert_eq!(out["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(out["kind"], "AdmissionReview");
        assert_eq!(
            out["response"]["uid"],
            "705ab4f5-6393-11e8-b7cc-42010a800002"
        );
        let p = patched(&out, &pod());
        let spec = p.spec.unwrap();
        assert_eq!(spec.containers.len(), 1, "the application is untouched");
        let init = spec.init_containers.unwrap();
        let names: Vec<&str> = init.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["strait-init", "strait-proxy"]);
        let args = init[0].args.clone().unwrap().join(" ");
        assert_eq!(args, "proxy iptables --uid 1337 --to-port 15006");
        let caps = init[0]
            .security_context
            .as_ref()
            .unwrap()
            .capabilities
            .clone();
        assert_eq!(caps.unwrap().add.unwrap(), ["NET_ADMIN", "NET_RAW"]);
        let proxy = &init[1];
        assert_eq!(proxy.restart_policy.as_deref(), Some("Always"));
        let args = proxy.args.clone().unwrap().join(" ");
        for want in [
            "proxy run --node-id $(POD_NAME).$(POD_NAMESPACE) --cluster east",
            "--locality us-east/$(STRAIT_ZONE)",
            "--xds strait-controlplane.strait-system.svc:15010",
            "--transparent 127.0.0.1:15006",
            "--cert /var/run/strait/identity/cert.pem",
            "--gateway strait-gateway.strait-system.svc:15008",
        ] {
            assert!(args.contains(want), "{want:?} missing from {args}");
        }
        let sc = proxy.security_context.as_ref().unwrap();
        assert_eq!(
            (sc.run_as_user, sc.run_as_non_root),
            (Some(1337), Some(true))
        );
        let probe = proxy
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .clone()
            .unwrap();
        assert_eq!(
            (probe.path.as_deref(), probe.port),
            (Some("/ready"), IntOrString::Int(15000))
        );
        let zone = proxy
            .env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == "STRAIT_ZONE")
            .and_then(|e| e.value_from.clone())
            .and_then(|v| v.field_ref)
            .unwrap();
        assert_eq!(
            zone.field_path,
            "metadata.labels['topology.kubernetes.io/zone']"
        );
        let vols = spec.volumes.unwrap();
        assert_eq!(vols.len(), 1);
        let secret = vols[0].secret.as_ref().unwrap();
        assert_eq!(
            secret.secret_name.as_deref(),
            Some("strait-identity-payments")
        );
        assert_eq!(
            secret.default_mode,
            Some(0o444),
            "user 1337 must read it without an fsGroup"
        );
        assert_eq!(
            p.metadata.annotations.unwrap()["strait.io/injected"],
            "true"
        );
    }

    /// Existing init containers, volumes and annotations are kept (the patch appends), and a
    /// pod without a service account gets `default`'s identity.
    #[test]
    fn what_the_pod_has_is_kept() {
        let mut pod = pod();
        pod["spec"]["initContainers"] = json!([{"name": "migrate", "image": "m:1"}]);
        pod["spec"]["volumes"] = json!([{"name": "data", "emptyDir": {}}]);
        pod["metadata"]["annotations"] = json!({"team": "payments"});
        pod["spec"]
            .as_object_mut()
            .unwrap()
            .remove("serviceAccountName");
        let p = patched(&run(&review_of(pod.clone(), "CREATE")), &pod);
        let spec = p.spec.unwrap();
        let names: Vec<String> = spec
            .init_containers
            .unwrap()
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(names, ["migrate", "strait-init", "strait-proxy"]);
        let vols: Vec<(String, Option<String>)> = spec
            .volumes
            .unwrap()
            .into_iter()
            .map(|v| (v.name, v.secret.and_then(|s| s.secret_name)))
            .collect();
        assert_eq!(
            vols,
            [
                ("data".to_string(), None),
                (
                    "strait-identity".to_string(),
                    Some("strait-identity-default".to_string())
                )
            ]
        );
        let a = p.metadata.annotations.unwrap();
        assert_eq!(
            (a["team"].as_str(), a["strait.io/injected"].as_str()),
            ("payments", "true")
        );
    }

    #[test]
    fn opted_out_injected_and_host_network_pods_pass_unchanged() {
        let mut opted = pod();
        opted["metadata"]["annotations"] = json!({"strait.io/inject": "false"});
        let mut done = pod();
        done["metadata"]["annotations"] = json!({"strait.io/injected": "true"});
        let mut named = pod();
        named["spec"]["containers"][0]["name"] = json!("strait-proxy");
        let mut host = pod();
        host["spec"]["hostNetwork"] = json!(true);
        for (what, p) in [
            ("opt-out", opted),
            ("injected", done),
            ("named", named),
            ("host", host),
        ] {
            let out = run(&review_of(p, "CREATE"));
            let r = &out["response"];
            assert_eq!(r["allowed"], true, "{what}: {out}");
            assert!(r.get("patch").is_none(), "{what}: {out}");
            assert_eq!(r["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        }
        // Not a creation: passed unchanged too.
        let out = run(&review_of(pod(), "UPDATE"));
        assert_eq!(out["response"]["allowed"], true, "{out}");
        assert!(out["response"].get("patch").is_none(), "{out}");
    }

    /// Malformed requests: a clear denial naming what is wrong, never a crash.
    #[test]
    fn malformed_requests_are_denied_with_the_reason() {
        let deny = |body: &[u8], want: &str, uid: &str| {
            let out = injector().review(body);
            let r = &out["response"];
            assert_eq!(r["allowed"], false, "{out}");
            let msg = r["status"]["message"].as_str().unwrap_or_default();
            assert!(msg.contains(want), "{want:?} not in {msg:?}");
            assert_eq!(r["uid"], uid, "{out}");
        };
        deny(b"", "not an AdmissionReview", "");
        deny(
            b"{\"kind\": \"AdmissionReview\"",
            "not an AdmissionReview",
            "",
        );
        deny(b"[1, 2, 3]", "not an AdmissionReview", "");
        deny(
            br#"{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}"#,
            "no request",
            "",
        );
        let uid = "705ab4f5-6393-11e8-b7cc-42010a800002";
        let mut wrong = review_of(
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "x"}}),
            "CREATE",
        );
        wrong["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
        deny(&serde_json::to_vec(&wrong).unwrap(), "pods only", uid);
        let broken = review_of(
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                "spec": {"containers": "app"}}),
            "CREATE",
        );
        deny(
            &serde_json::to_vec(&broken).unwrap(),
            "the pod cannot be read",
            uid,
        );
        let mut none = review_of(pod(), "CREATE");
        none["request"]["object"] = Value::Null;
        deny(&serde_json::to_vec(&none).unwrap(), "no object", uid);
        let mut clash = pod();
        clash["spec"]["volumes"] = json!([{"name": "strait-identity", "emptyDir": {}}]);
        deny(
            &serde_json::to_vec(&review_of(clash, "CREATE")).unwrap(),
            "already has a volume named strait-identity",
            uid,
        );
    }
}
