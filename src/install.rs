//! `strait install kubernetes --cluster C --region R [--values FILE]`: every manifest a
//! cluster needs, built with `k8s-openapi` types and printed as one YAML stream for
//! `kubectl apply -f -` — the namespace, Strait's CRDs, least-privilege RBAC, the control plane
//! and gateway (ConfigMaps, Deployments with probes on their admin ports and resource requests,
//! PodDisruptionBudgets), the gateway's LoadBalancer Service on UDP for QUIC, and the sidecar
//! injection webhook's configuration. See docs/kubernetes.md.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use controlplane::kubernetes::inject::resources;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ServiceReference,
    WebhookClientConfig,
};
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar,
    EnvVarSource, HTTPGetAction, Namespace, ObjectFieldSelector, PodAffinityTerm, PodAntiAffinity,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile, SecretVolumeSource,
    SecurityContext, Service, ServiceAccount, ServicePort, ServiceSpec, Volume, VolumeMount,
    WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;

pub const NAMESPACE: &str = "strait-system";
/// Control planes run as replicas: one publishes the cluster (a leadership key in the
/// registry), all serve xDS; proxies move between them.
const CONTROLPLANE_ROLLOUT: Rollout = Rollout::Replicated(2);
/// Gateways run as replicas too: each writes its links under its pod name
/// (`STRAIT_GATEWAY_REPLICA`), peers reaching several replicas keep a connection to each.
const GATEWAY_ROLLOUT: Rollout = Rollout::Replicated(2);
const CONTROLPLANE: &str = "strait-controlplane";
const GATEWAY: &str = "strait-gateway";

#[derive(clap::Subcommand, Debug)]
pub enum InstallCommand {
    /// Print the manifests of one cluster (pipe them to `kubectl apply -f -`).
    Kubernetes(KubernetesArgs),
}

#[derive(clap::Args, Debug)]
pub struct KubernetesArgs {
    /// The cluster's name in the federation.
    #[arg(long)]
    cluster: String,
    /// The cluster's region.
    #[arg(long)]
    region: String,
    /// A YAML file of values (image, etcd, etcd_auth, etcd_secret, gateway_address,
    /// webhook_ca_file, trust_domain).
    #[arg(long)]
    values: Option<PathBuf>,
}

/// What `--values` may set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Values {
    /// The image with the `strait` binary.
    #[serde(default = "default_image")]
    pub image: String,
    /// The registry's etcd client URLs (`https://`: the CA is the Secret's `ca.pem`).
    #[serde(default = "default_etcd")]
    pub etcd: Vec<String>,
    /// How the control plane and the gateway authenticate to etcd, as user
    /// `strait-cluster-CLUSTER` (`strait registry roles apply`): `certificate` (the Secret's
    /// `cert.pem`/`key.pem`, whose common name is the user), `password` (the Secret's
    /// `password`), or `none` (an etcd without authentication).
    #[serde(default)]
    pub etcd_auth: EtcdAuthMode,
    /// The Secret in strait-system holding the etcd client's files (mounted at /etc/strait/etcd).
    #[serde(default = "default_etcd_secret")]
    pub etcd_secret: String,
    /// This cluster's gateway as other clusters reach it (the LoadBalancer's DNS name or
    /// address, `host:port`); published in the registry.
    #[serde(default)]
    pub gateway_address: Option<String>,
    /// The webhook configuration's `caBundle`: the CA (PEM) of `strait-ca`, which issues the
    /// control plane's own certificate (the webhook serves it). Relative to the values file.
    #[serde(default)]
    pub webhook_ca_file: Option<PathBuf>,
    /// The federation's trust domain (documentation for the certificates to create).
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
}

fn default_image() -> String {
    format!("ghcr.io/strait/strait:{}", env!("CARGO_PKG_VERSION"))
}
fn default_etcd() -> Vec<String> {
    vec!["https://etcd.strait-system.svc:2379".into()]
}
fn default_etcd_secret() -> String {
    "strait-etcd-client".into()
}

/// How Strait's components authenticate to etcd.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EtcdAuthMode {
    #[default]
    Certificate,
    Password,
    None,
}

/// Where the etcd client's Secret is mounted.
const ETCD_DIR: &str = "/etc/strait/etcd";

impl Values {
    /// The `registry:` line of the control plane's and the gateway's configuration.
    fn registry_yaml(&self, cluster: &str) -> String {
        let etcd = yaml_list(&self.etcd);
        let tls = self.etcd_tls();
        let user = format!("strait-cluster-{cluster}");
        match (tls, self.etcd_auth) {
            (false, _) => format!("registry: {{etcd: {etcd}}}"),
            (true, EtcdAuthMode::Certificate) => format!(
                "registry:
  etcd: {etcd}
  # the Secret {s}: client certificate CN {user}
  tls: {{ca: {ETCD_DIR}/ca.pem, cert: {ETCD_DIR}/cert.pem, key: {ETCD_DIR}/key.pem}}",
                s = self.etcd_secret
            ),
            (true, EtcdAuthMode::Password) => format!(
                "registry:
  etcd: {etcd}
  tls: {{ca: {ETCD_DIR}/ca.pem}}
  # the Secret {s}: the password of {user}
  auth: {{user: {user}, password_file: {ETCD_DIR}/password}}",
                s = self.etcd_secret
            ),
            (true, EtcdAuthMode::None) => {
                format!(
                    "registry:
  etcd: {etcd}
  tls: {{ca: {ETCD_DIR}/ca.pem}}"
                )
            }
        }
    }

    fn etcd_tls(&self) -> bool {
        self.etcd.iter().any(|e| e.starts_with("https://"))
    }

    /// Values that cannot work together.
    fn check(&self) -> anyhow::Result<()> {
        if self.etcd.is_empty() {
            anyhow::bail!("etcd: give the registry's etcd client URLs");
        }
        if !self.etcd_tls() && self.etcd_auth != EtcdAuthMode::None {
            anyhow::bail!(
                "etcd_auth: {:?} needs https:// etcd URLs (credentials are never sent in the clear);                  use https:// or etcd_auth: none",
                self.etcd_auth
            );
        }
        Ok(())
    }
}
fn default_trust_domain() -> String {
    "strait.local".into()
}

impl Default for Values {
    fn default() -> Self {
        Self {
            image: default_image(),
            etcd: default_etcd(),
            etcd_auth: EtcdAuthMode::default(),
            etcd_secret: default_etcd_secret(),
            gateway_address: None,
            webhook_ca_file: None,
            trust_domain: default_trust_domain(),
        }
    }
}

/// One manifest, typed.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(untagged)]
pub enum Manifest {
    Namespace(Box<Namespace>),
    Crd(Box<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>),
    ServiceAccount(Box<ServiceAccount>),
    ClusterRole(Box<ClusterRole>),
    ClusterRoleBinding(Box<ClusterRoleBinding>),
    ConfigMap(Box<ConfigMap>),
    Service(Box<Service>),
    Deployment(Box<Deployment>),
    PodDisruptionBudget(Box<PodDisruptionBudget>),
    Webhook(Box<MutatingWebhookConfiguration>),
}

fn labels(component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), component.to_string()),
        (
            "app.kubernetes.io/part-of".to_string(),
            "strait".to_string(),
        ),
    ])
}

fn meta(name: &str, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(NAMESPACE.into()),
        labels: Some(labels(component)),
        ..Default::default()
    }
}

fn selector(component: &str) -> LabelSelector {
    LabelSelector {
        match_labels: Some(BTreeMap::from([(
            "app.kubernetes.io/name".to_string(),
            component.to_string(),
        )])),
        ..Default::default()
    }
}

fn probe(path: &str, port: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(port),
            ..Default::default()
        }),
        period_seconds: Some(5),
        failure_threshold: Some(3),
        ..Default::default()
    }
}

fn secret_volume(name: &str, secret: &str) -> Volume {
    Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.into()),
            default_mode: Some(0o440),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(true),
        ..Default::default()
    }
}

fn port(name: &str, port: i32, protocol: &str) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: port,
        protocol: Some(protocol.into()),
        ..Default::default()
    }
}

/// A Deployment of one `strait` process with its config from a ConfigMap.
/// How a component is rolled out.
#[derive(Clone, Copy)]
enum Rollout {
    /// Several replicas (one publishes, all serve), replaced one at a time, a new one ready
    /// before an old one goes; spread over nodes.
    Replicated(i32),
}

fn deployment(
    name: &str,
    values: &Values,
    args: Vec<String>,
    ports: Vec<ContainerPort>,
    admin: i32,
    extra_volumes: Vec<(Volume, VolumeMount)>,
    rollout: Rollout,
) -> Deployment {
    let mut volumes = vec![Volume {
        name: "config".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: name.into(),
            ..Default::default()
        }),
        ..Default::default()
    }];
    let mut mounts = vec![mount("config", "/etc/strait/config")];
    for (v, m) in extra_volumes {
        volumes.push(v);
        mounts.push(m);
    }
    Deployment {
        metadata: meta(name, name),
        spec: DeploymentSpec {
            replicas: Some(match rollout {
                Rollout::Replicated(n) => n,
            }),
            selector: selector(name),
            strategy: Some(match rollout {
                Rollout::Replicated(_) => DeploymentStrategy {
                    type_: Some("RollingUpdate".into()),
                    rolling_update: Some(RollingUpdateDeployment {
                        max_surge: Some(IntOrString::Int(1)),
                        max_unavailable: Some(IntOrString::Int(0)),
                    }),
                },
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(name)),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    affinity: matches!(rollout, Rollout::Replicated(_)).then(|| Affinity {
                        // Replicas on different nodes when the cluster has them.
                        pod_anti_affinity: Some(PodAntiAffinity {
                            preferred_during_scheduling_ignored_during_execution: Some(vec![
                                WeightedPodAffinityTerm {
                                    weight: 100,
                                    pod_affinity_term: PodAffinityTerm {
                                        label_selector: Some(selector(name)),
                                        topology_key: "kubernetes.io/hostname".into(),
                                        ..Default::default()
                                    },
                                },
                            ]),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    service_account_name: Some(name.into()),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(1337),
                        run_as_group: Some(1337),
                        // The Secrets' files (mode 0440) belong to this group: readable.
                        fs_group: Some(1337),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    containers: vec![Container {
                        name: name.into(),
                        image: Some(values.image.clone()),
                        args: Some(args),
                        ports: Some(ports),
                        readiness_probe: Some(probe("/ready", admin)),
                        liveness_probe: Some(Probe {
                            initial_delay_seconds: Some(10),
                            period_seconds: Some(10),
                            ..probe("/ready", admin)
                        }),
                        resources: Some(resources("100m", "64Mi", "512Mi")),
                        security_context: Some(SecurityContext {
                            allow_privilege_escalation: Some(false),
                            read_only_root_filesystem: Some(true),
                            capabilities: Some(Capabilities {
                                drop: Some(vec!["ALL".into()]),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }),
                        volume_mounts: Some(mounts),
                        // The replica's name (the gateway's link keys in the registry).
                        env: (name == GATEWAY).then(|| {
                            vec![EnvVar {
                                name: "STRAIT_GATEWAY_REPLICA".into(),
                                value_from: Some(EnvVarSource {
                                    field_ref: Some(ObjectFieldSelector {
                                        field_path: "metadata.name".into(),
                                        ..Default::default()
                                    }),
                                    ..Default::default()
                                }),
                                ..Default::default()
                            }]
                        }),
                        ..Default::default()
                    }],
                    volumes: Some(volumes),
                    ..Default::default()
                }),
            },
            ..Default::default()
        },
        ..Default::default()
    }
}

fn pdb(name: &str, rollout: Rollout) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(name, name),
        spec: Some(match rollout {
            // Replicas: a voluntary disruption never takes the last one.
            Rollout::Replicated(_) => PodDisruptionBudgetSpec {
                min_available: Some(IntOrString::Int(1)),
                selector: Some(selector(name)),
                ..Default::default()
            },
        }),
        ..Default::default()
    }
}

fn service(name: &str, component: &str, type_: &str, ports: Vec<ServicePort>) -> Service {
    Service {
        metadata: meta(name, component),
        spec: Some(ServiceSpec {
            type_: Some(type_.into()),
            selector: Some(BTreeMap::from([(
                "app.kubernetes.io/name".to_string(),
                component.to_string(),
            )])),
            ports: Some(ports),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn service_port(name: &str, port: i32, target: i32, protocol: &str) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::Int(target)),
        protocol: Some(protocol.into()),
        ..Default::default()
    }
}

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> PolicyRule {
    let v = |x: &[&str]| Some(x.iter().map(|s| s.to_string()).collect());
    PolicyRule {
        api_groups: v(groups),
        resources: v(resources),
        verbs: verbs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn yaml_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

/// The control plane's configuration file.
pub fn controlplane_config(cluster: &str, region: &str, values: &Values) -> String {
    // The gateway's certificate names its ingress Service and the address other clusters use.
    let mut gw_names = service_names(GATEWAY);
    let mut gw_ips = Vec::new();
    if let Some(host) = values
        .gateway_address
        .as_deref()
        .and_then(|g| federation::model::GatewayAddress::parse("gateway_address", g).ok())
        .map(|g| g.host().to_string())
    {
        if host.parse::<std::net::IpAddr>().is_ok() {
            gw_ips.push(host);
        } else {
            gw_names.push(host);
        }
    }
    let gateways = values
        .gateway_address
        .as_ref()
        .map(|g| format!("\n    gateways: [{g:?}]"))
        .unwrap_or_default();
    format!(
        "# strait controlplane --config (see docs/kubernetes.md)\n\
         cluster: {cluster}\n\
         region: {region}\n\
         {registry}\n\
         discovery:\n  kubernetes:   # in-cluster: the pod's service account{gateways}\n\
         \x20   # the identity Secrets of injected workloads, issued with the CA of the Secret strait-ca\n\
         \x20   identities: {{ca: /etc/strait/ca, validity: 24h}}\n\
         # issued and renewed from the same CA, nothing made by hand: its own xDS certificate\n\
         # (an emptyDir, served from as soon as written) and the gateway's (a Secret it mounts)\n\
         certificates:\n  ca: /etc/strait/ca\n  validity: 24h\n\
         \x20 controlplane: {{files: {CP_TLS_DIR}, dns_names: {cp_names}}}\n\
         \x20 gateway: {{secret: strait-gateway-tls, dns_names: {gw_names}{gw_ips}}}\n\
         xds:\n  listen: \"0.0.0.0:15010\"   # mTLS with the certificate above\n\
         # a local gateway exists: sidecars reach other clusters through its ingress\n\
         gateway: {{ingress: \"0.0.0.0:15008\"}}\n\
         admin: {{listen: \"0.0.0.0:15014\"}}\n\
         webhook:\n  listen: \"0.0.0.0:15017\"\n  tls: {{cert: {CP_TLS_DIR}/cert.pem, key: {CP_TLS_DIR}/key.pem}}   # its own certificate (above)\n  sidecar: {{image: {image:?}}}\n",
        registry = values.registry_yaml(cluster),
        image = values.image,
        cp_names = yaml_list(&service_names(CONTROLPLANE)),
        gw_names = yaml_list(&gw_names),
        gw_ips = if gw_ips.is_empty() {
            String::new()
        } else {
            format!(", ips: {}", yaml_list(&gw_ips))
        },
    )
}

/// Where the control plane writes its own certificate (an emptyDir).
const CP_TLS_DIR: &str = "/var/run/strait/tls";

/// The DNS names of a Service in the namespace, short to fully qualified.
fn service_names(service: &str) -> Vec<String> {
    vec![
        service.to_string(),
        format!("{service}.{NAMESPACE}"),
        format!("{service}.{NAMESPACE}.svc"),
        format!("{service}.{NAMESPACE}.svc.cluster.local"),
    ]
}

/// The gateway's configuration file.
pub fn gateway_config(cluster: &str, values: &Values) -> String {
    format!(
        "# strait gateway --config (see docs/gateway.md)\n\
         cluster: {cluster}\n\
         listen: {{peers: \"0.0.0.0:15443\", ingress: \"0.0.0.0:15008\", admin: \"0.0.0.0:15000\"}}\n\
         tls: {{cert: /etc/strait/tls/cert.pem, key: /etc/strait/tls/key.pem, ca: /etc/strait/tls/ca.pem}}\n\
         {registry}\n\
         # this cluster's endpoints as last learned from the registry, kept across container restarts\n\
         local_snapshot: /var/lib/strait/local.json\n",
        registry = values.registry_yaml(cluster),
    )
}

/// Every manifest of one cluster, in the order they apply.
pub fn manifests(
    cluster: &str,
    region: &str,
    values: &Values,
    ca_bundle: Option<Vec<u8>>,
) -> Vec<Manifest> {
    use Manifest as M;
    let mut out = vec![M::Namespace(Box::new(Namespace {
        metadata: ObjectMeta {
            name: Some(NAMESPACE.into()),
            labels: Some(BTreeMap::from([
                (
                    "app.kubernetes.io/part-of".to_string(),
                    "strait".to_string(),
                ),
                // The mesh's own pods are never injected.
                ("strait.io/inject".to_string(), "disabled".to_string()),
            ])),
            ..Default::default()
        },
        ..Default::default()
    }))];
    out.extend(
        controlplane::kubernetes::crd::all()
            .into_iter()
            .map(|c| M::Crd(Box::new(c))),
    );
    for name in [CONTROLPLANE, GATEWAY] {
        out.push(M::ServiceAccount(Box::new(ServiceAccount {
            metadata: meta(name, name),
            // The gateway talks to etcd and its peers only; the control plane's API access is
            // its ClusterRole's.
            automount_service_account_token: Some(name == CONTROLPLANE),
            ..Default::default()
        })));
    }
    out.push(M::ClusterRole(Box::new(ClusterRole {
        metadata: ObjectMeta {
            name: Some(CONTROLPLANE.into()),
            labels: Some(labels(CONTROLPLANE)),
            ..Default::default()
        },
        rules: Some(vec![
            rule(&[""], &["services", "nodes"], &["list", "watch"]),
            rule(
                &["discovery.k8s.io"],
                &["endpointslices"],
                &["list", "watch"],
            ),
            rule(
                &["multicluster.x-k8s.io"],
                &["serviceexports"],
                &["list", "watch"],
            ),
            rule(
                &["strait.io"],
                &["failoverpolicies", "federatedclusters"],
                &["get", "list", "watch"],
            ),
            // Whose identities to issue: accounts of namespaces with injection enabled.
            rule(
                &[""],
                &["namespaces", "serviceaccounts"],
                &["list", "watch"],
            ),
            // The identity Secrets it issues (`strait-identity-SA`, labelled managed-by strait;
            // RBAC cannot narrow a list to a label, so this reaches every Secret: see
            // docs/kubernetes.md).
            rule(
                &[""],
                &["secrets"],
                &["get", "list", "create", "patch", "delete"],
            ),
            // Its other writes: the clusterset's services as ServiceImports.
            rule(
                &["multicluster.x-k8s.io"],
                &["serviceimports"],
                &[
                    "get", "list", "watch", "create", "patch", "update", "delete",
                ],
            ),
            rule(
                &["multicluster.x-k8s.io"],
                &["serviceimports/status"],
                &["get", "patch", "update"],
            ),
        ]),
        ..Default::default()
    })));
    out.push(M::ClusterRoleBinding(Box::new(ClusterRoleBinding {
        metadata: ObjectMeta {
            name: Some(CONTROLPLANE.into()),
            labels: Some(labels(CONTROLPLANE)),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "ClusterRole".into(),
            name: CONTROLPLANE.into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: CONTROLPLANE.into(),
            namespace: Some(NAMESPACE.into()),
            ..Default::default()
        }]),
    })));
    for (name, config) in [
        (CONTROLPLANE, controlplane_config(cluster, region, values)),
        (GATEWAY, gateway_config(cluster, values)),
    ] {
        out.push(M::ConfigMap(Box::new(ConfigMap {
            metadata: meta(name, name),
            data: Some(BTreeMap::from([("config.yaml".to_string(), config)])),
            ..Default::default()
        })));
    }
    out.push(M::Service(Box::new(service(
        CONTROLPLANE,
        CONTROLPLANE,
        "ClusterIP",
        vec![
            service_port("grpc-xds", 15010, 15010, "TCP"),
            service_port("https-webhook", 443, 15017, "TCP"),
        ],
    ))));
    out.push(M::Service(Box::new(service(
        GATEWAY,
        GATEWAY,
        "ClusterIP",
        vec![service_port("https-ingress", 15008, 15008, "TCP")],
    ))));
    // QUIC between clusters: UDP, reachable from the other clusters.
    let mut peers = service(
        "strait-gateway-peers",
        GATEWAY,
        "LoadBalancer",
        vec![service_port("quic-peers", 15443, 15443, "UDP")],
    );
    if let Some(spec) = peers.spec.as_mut() {
        spec.external_traffic_policy = Some("Local".into());
    }
    out.push(M::Service(Box::new(peers)));
    // The etcd client's CA and credentials, for both components.
    let etcd_volume = values.etcd_tls().then(|| {
        (
            secret_volume("etcd-client", &values.etcd_secret),
            mount("etcd-client", ETCD_DIR),
        )
    });
    let args = |what: &str| -> Vec<String> {
        [what, "--config", "/etc/strait/config/config.yaml"]
            .map(String::from)
            .to_vec()
    };
    out.push(M::Deployment(Box::new(deployment(
        CONTROLPLANE,
        values,
        args("controlplane"),
        vec![
            port("grpc-xds", 15010, "TCP"),
            port("http-admin", 15014, "TCP"),
            port("https-webhook", 15017, "TCP"),
        ],
        15014,
        [
            (
                // Its own certificate, which it issues and renews itself.
                Volume {
                    name: "tls".into(),
                    empty_dir: Some(Default::default()),
                    ..Default::default()
                },
                VolumeMount {
                    name: "tls".into(),
                    mount_path: CP_TLS_DIR.into(),
                    ..Default::default()
                },
            ),
            (
                secret_volume("ca", "strait-ca"),
                mount("ca", "/etc/strait/ca"),
            ),
        ]
        .into_iter()
        .chain(etcd_volume.clone())
        .collect(),
        CONTROLPLANE_ROLLOUT,
    ))));
    out.push(M::Deployment(Box::new(deployment(
        GATEWAY,
        values,
        args("gateway"),
        vec![
            port("quic-peers", 15443, "UDP"),
            port("https-ingress", 15008, "TCP"),
            port("http-admin", 15000, "TCP"),
        ],
        15000,
        [
            (
                secret_volume("tls", "strait-gateway-tls"),
                mount("tls", "/etc/strait/tls"),
            ),
            (
                Volume {
                    name: "state".into(),
                    empty_dir: Some(Default::default()),
                    ..Default::default()
                },
                VolumeMount {
                    name: "state".into(),
                    mount_path: "/var/lib/strait".into(),
                    ..Default::default()
                },
            ),
        ]
        .into_iter()
        .chain(etcd_volume)
        .collect(),
        GATEWAY_ROLLOUT,
    ))));
    out.push(M::PodDisruptionBudget(Box::new(pdb(
        CONTROLPLANE,
        CONTROLPLANE_ROLLOUT,
    ))));
    out.push(M::PodDisruptionBudget(Box::new(pdb(
        GATEWAY,
        GATEWAY_ROLLOUT,
    ))));
    out.push(M::Webhook(Box::new(MutatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some("strait-sidecar-injector".into()),
            labels: Some(labels(CONTROLPLANE)),
            ..Default::default()
        },
        webhooks: Some(vec![MutatingWebhook {
            name: "inject.strait.io".into(),
            admission_review_versions: vec!["v1".into()],
            client_config: WebhookClientConfig {
                ca_bundle: ca_bundle.map(ByteString),
                service: Some(ServiceReference {
                    name: CONTROLPLANE.into(),
                    namespace: NAMESPACE.into(),
                    path: Some("/inject".into()),
                    port: Some(443),
                }),
                ..Default::default()
            },
            rules: Some(vec![RuleWithOperations {
                api_groups: Some(vec![String::new()]),
                api_versions: Some(vec!["v1".into()]),
                operations: Some(vec!["CREATE".into()]),
                resources: Some(vec!["pods".into()]),
                scope: Some("Namespaced".into()),
            }]),
            namespace_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    controlplane::kubernetes::inject::NAMESPACE_LABEL.to_string(),
                    "enabled".to_string(),
                )])),
                ..Default::default()
            }),
            // A pod must not start unmeshed in an injected namespace.
            failure_policy: Some("Fail".into()),
            side_effects: "None".into(),
            timeout_seconds: Some(10),
            reinvocation_policy: Some("Never".into()),
            ..Default::default()
        }]),
    })));
    out
}

/// The manifests as one YAML stream.
pub fn render(manifests: &[Manifest], header: &str) -> anyhow::Result<String> {
    let mut out = String::from(header);
    for m in manifests {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(m).context("cannot write a manifest as YAML")?);
    }
    Ok(out)
}

fn load_values(path: &Path) -> anyhow::Result<(Values, Option<Vec<u8>>)> {
    let text = federation::config::read_file(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let values: Values = serde_saphyr::from_str(&text)
        .map_err(|e| anyhow::anyhow!("--values {}: {e}", path.display()))?;
    values
        .check()
        .map_err(|e| anyhow::anyhow!("--values {}: {e}", path.display()))?;
    let ca = match &values.webhook_ca_file {
        None => None,
        Some(f) => {
            let f = path.parent().unwrap_or(Path::new(".")).join(f);
            let pem =
                std::fs::read(&f).with_context(|| format!("webhook_ca_file {}", f.display()))?;
            if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                anyhow::bail!("webhook_ca_file {}: not a PEM certificate", f.display());
            }
            Some(pem)
        }
    };
    Ok((values, ca))
}

/// The output for these arguments (also what the reference files in `deploy/kubernetes/` hold).
pub fn output(args: &KubernetesArgs) -> anyhow::Result<String> {
    federation::model::Name::parse("--cluster", &args.cluster)?;
    federation::model::Locality::parse("--region", &args.region)?;
    let (values, ca) = match &args.values {
        Some(p) => load_values(p)?,
        None => (Values::default(), None),
    };
    let mut shown = format!(
        "strait install kubernetes --cluster {} --region {}",
        args.cluster, args.region
    );
    if let Some(p) = &args.values {
        shown.push_str(&format!(" --values {}", p.display()));
    }
    let (td, c) = (&values.trust_domain, &args.cluster);
    let header = format!(
        "# Generated by `{shown}`.\n\
         # Before applying, create in {NAMESPACE} the Secrets (see docs/kubernetes.md):\n\
         #   strait-ca                ca.pem, ca.key             the CA of trust domain {td}: the control plane issues\n\
         #                                                       and renews from it its own certificate, the gateway's\n\
         #                                                       (Secret strait-gateway-tls, spiffe://{td}/cluster/{c}/gateway)\n\
         #                                                       and the identities of injected pods\n"
    );
    // The webhook serves the control plane's own certificate: nothing to make by hand but the
    // caBundle, strait-ca's ca.pem.
    let webhook = "# The sidecar-injection webhook serves the control plane's own certificate; its caBundle is\n\
                   # strait-ca's ca.pem, given in the values as webhook_ca_file.\n";
    let header = if values.etcd_tls() {
        let what = match values.etcd_auth {
            EtcdAuthMode::Certificate => format!(
                "ca.pem, cert.pem, key.pem  etcd's CA; a client certificate, CN strait-cluster-{c}"
            ),
            EtcdAuthMode::Password => format!(
                "ca.pem, password          etcd's CA; the password of etcd user strait-cluster-{c}"
            ),
            EtcdAuthMode::None => "ca.pem                    etcd's CA".to_string(),
        };
        format!("{header}#   {:<24} {what}\n", values.etcd_secret)
    } else {
        header
    };
    render(
        &manifests(&args.cluster, &args.region, &values, ca),
        &format!("{header}{webhook}"),
    )
}

pub fn run(cmd: InstallCommand) -> anyhow::Result<()> {
    match cmd {
        InstallCommand::Kubernetes(a) => {
            print!("{}", output(&a)?);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    /// Deserialize `doc` into the `k8s-openapi` type its kind names and serialize it back: a
    /// field the type does not know is lost on the way, so the two differ (strict reading).
    fn strict(doc: &Value) -> Result<(), String> {
        fn back<T: serde::de::DeserializeOwned + serde::Serialize>(
            doc: &Value,
        ) -> Result<Value, String> {
            let t: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
            serde_json::to_value(&t).map_err(|e| e.to_string())
        }
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
        let kind = doc["kind"].as_str().unwrap_or_default();
        let again = match kind {
            "Namespace" => back::<Namespace>(doc),
            "CustomResourceDefinition" => back::<CustomResourceDefinition>(doc),
            "ServiceAccount" => back::<ServiceAccount>(doc),
            "ClusterRole" => back::<ClusterRole>(doc),
            "ClusterRoleBinding" => back::<ClusterRoleBinding>(doc),
            "ConfigMap" => back::<ConfigMap>(doc),
            "Service" => back::<Service>(doc),
            "Deployment" => back::<Deployment>(doc),
            "PodDisruptionBudget" => back::<PodDisruptionBudget>(doc),
            "MutatingWebhookConfiguration" => back::<MutatingWebhookConfiguration>(doc),
            other => Err(format!("unexpected kind {other:?}")),
        }?;
        if &again == doc {
            Ok(())
        } else {
            Err(format!(
                "{kind}: fields the API type does not have:\n{}\nvs\n{}",
                doc, again
            ))
        }
    }

    fn docs(path: &Path) -> Vec<Value> {
        let text = std::fs::read_to_string(path).unwrap();
        serde_saphyr::from_str_multiple::<Value, Vec<Value>>(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .into_iter()
            .filter(|d| !d.is_null())
            .collect()
    }

    /// The reference output in `deploy/kubernetes/` is what `strait install kubernetes` prints
    /// today: CI fails when a change to the manifests was not regenerated.
    #[test]
    fn the_reference_manifests_are_current() {
        for (cluster, region) in [("east", "us-east"), ("west", "us-west")] {
            let args = KubernetesArgs {
                cluster: cluster.into(),
                region: region.into(),
                values: Some(PathBuf::from(format!(
                    "deploy/kubernetes/values/{cluster}.yaml"
                ))),
            };
            let want = output(&args).unwrap();
            let file = root().join(format!("deploy/kubernetes/{cluster}.yaml"));
            let have = std::fs::read_to_string(&file).unwrap_or_default();
            assert!(
                have == want,
                "{} is stale; regenerate it with\n  cargo run -- install kubernetes --cluster {cluster} \
                 --region {region} --values deploy/kubernetes/values/{cluster}.yaml > deploy/kubernetes/{cluster}.yaml",
                file.display()
            );
        }
    }

    /// Every manifest in `deploy/kubernetes/` reads strictly into its `k8s-openapi` type, the
    /// configurations it carries are what the control plane and the gateway accept, and the
    /// control plane's role only reads.
    #[test]
    fn every_reference_manifest_is_a_strict_kubernetes_object() {
        let mut kinds = std::collections::BTreeSet::new();
        for cluster in ["east", "west"] {
            let path = root().join(format!("deploy/kubernetes/{cluster}.yaml"));
            let docs = docs(&path);
            let whole = std::fs::read_to_string(&path).unwrap();
            assert!(
                !whole.contains("strait-webhook-tls"),
                "{}: the webhook's certificate is the control plane's own, no Secret",
                path.display()
            );
            assert!(
                docs.len() >= 15,
                "{}: {} documents",
                path.display(),
                docs.len()
            );
            for d in &docs {
                strict(d).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                kinds.insert(d["kind"].as_str().unwrap_or_default().to_string());
                let name = d["metadata"]["name"].as_str().unwrap_or_default();
                if d["kind"] == "ConfigMap" {
                    let text = d["data"]["config.yaml"].as_str().unwrap();
                    let ok = match name {
                        "strait-controlplane" => {
                            controlplane::config::ControlPlaneConfig::parse("config.yaml", text)
                                .map(|c| {
                                    assert_eq!(c.cluster.as_str(), cluster);
                                    // The webhook serves the certificate the control plane
                                    // issues and renews itself: none is made by hand.
                                    let own = c
                                        .certificates
                                        .as_ref()
                                        .and_then(|k| k.controlplane.as_ref())
                                        .and_then(|k| k.files.clone())
                                        .expect("the control plane keeps its own certificate");
                                    let w = c.webhook.as_ref().expect("the webhook");
                                    assert_eq!(w.tls.cert, own.join("cert.pem"));
                                    assert_eq!(w.tls.key, own.join("key.pem"));
                                })
                                .map_err(|e| e.to_string())
                        }
                        "strait-gateway" => {
                            gateway::config::GatewayConfig::parse("config.yaml", text)
                                .map(|_| ())
                                .map_err(|e| e.to_string())
                        }
                        other => Err(format!("unexpected ConfigMap {other}")),
                    };
                    ok.unwrap_or_else(|e| panic!("{cluster} {name}: {e}\n{text}"));
                }
                if d["kind"] == "ClusterRole" {
                    for r in d["rules"].as_array().unwrap() {
                        let resources = r["resources"].as_array().unwrap();
                        let writable = resources.iter().all(|x| {
                            let x = x.as_str().unwrap_or("");
                            x.starts_with("serviceimports") || x == "secrets"
                        });
                        for v in r["verbs"].as_array().unwrap() {
                            assert!(
                                writable || ["get", "list", "watch"].contains(&v.as_str().unwrap()),
                                "the control plane's role writes more than ServiceImports and identity Secrets: {r}"
                            );
                        }
                        if resources.iter().any(|x| x == "secrets") {
                            assert_eq!(resources.len(), 1, "{r}");
                            assert!(
                                !r["verbs"].to_string().contains("watch"),
                                "Secrets are listed, never watched: {r}"
                            );
                        }
                    }
                }
                if d["kind"] == "Deployment" {
                    // Secret files are mode 0440: the pod's fsGroup must be the user's group.
                    let pod = &d["spec"]["template"]["spec"];
                    assert_eq!(
                        pod["securityContext"]["fsGroup"], pod["securityContext"]["runAsGroup"],
                        "{name}"
                    );
                    assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
                    if name == "strait-controlplane" {
                        // Replicas, replaced one at a time with a new one ready first, spread.
                        assert_eq!(d["spec"]["replicas"], 2);
                        assert_eq!(d["spec"]["strategy"]["type"], "RollingUpdate");
                        assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
                        assert!(
                            pod["affinity"]["podAntiAffinity"].is_object(),
                            "{name}: no anti-affinity"
                        );
                    }
                }
                if d["kind"] == "PodDisruptionBudget" && name == "strait-controlplane" {
                    assert_eq!(d["spec"]["minAvailable"], 1, "the last replica stays");
                }
                if d["kind"] == "Service" && name == "strait-gateway-peers" {
                    assert_eq!(d["spec"]["type"], "LoadBalancer");
                    assert_eq!(d["spec"]["ports"][0]["protocol"], "UDP");
                }
            }
        }
        for k in [
            "Namespace",
            "CustomResourceDefinition",
            "ClusterRole",
            "Deployment",
            "PodDisruptionBudget",
            "MutatingWebhookConfiguration",
        ] {
            assert!(kinds.contains(k), "no {k} in {kinds:?}");
        }
    }

    /// Each way of authenticating to etcd gives configurations the components accept, with the
    /// Secret mounted where they read it.
    #[test]
    fn etcd_credentials_reach_both_components() {
        for (auth, want) in [
            (EtcdAuthMode::Certificate, "cert: /etc/strait/etcd/cert.pem"),
            (
                EtcdAuthMode::Password,
                "auth: {user: strait-cluster-east, password_file: /etc/strait/etcd/password}",
            ),
            (EtcdAuthMode::None, "tls: {ca: /etc/strait/etcd/ca.pem}"),
        ] {
            let values = Values {
                etcd_auth: auth,
                ..Values::default()
            };
            let cp = controlplane_config("east", "us-east", &values);
            let gw = gateway_config("east", &values);
            for text in [&cp, &gw] {
                assert!(text.contains(want), "{auth:?}: {text}");
            }
            let cfg = controlplane::config::ControlPlaneConfig::parse("c.yaml", &cp).unwrap();
            assert_eq!(cfg.registry.etcd, ["https://etcd.strait-system.svc:2379"]);
            gateway::config::GatewayConfig::parse("g.yaml", &gw).unwrap();
            let m = manifests("east", "us-east", &values, None);
            let mounted = m
                .iter()
                .filter_map(|m| match m {
                    Manifest::Deployment(d) => Some(d),
                    _ => None,
                })
                .filter(|d| {
                    let spec = d.spec.template.spec.as_ref().unwrap();
                    spec.volumes.iter().flatten().any(|v| {
                        v.secret.as_ref().and_then(|s| s.secret_name.as_deref())
                            == Some("strait-etcd-client")
                    }) && spec.containers[0]
                        .volume_mounts
                        .iter()
                        .flatten()
                        .any(|m| m.mount_path == ETCD_DIR)
                })
                .count();
            assert_eq!(
                mounted, 2,
                "{auth:?}: both Deployments mount the etcd Secret"
            );
        }
        // Plaintext etcd: no Secret, no TLS.
        let values = Values {
            etcd: vec!["http://127.0.0.1:2379".into()],
            etcd_auth: EtcdAuthMode::None,
            ..Values::default()
        };
        values.check().unwrap();
        assert!(
            gateway_config("east", &values)
                .contains("registry: {etcd: [\"http://127.0.0.1:2379\"]}")
        );
    }

    #[test]
    fn the_strict_check_catches_unknown_fields_and_bad_values_are_refused() {
        let path = root().join("deploy/kubernetes/east.yaml");
        let mut d = docs(&path)
            .into_iter()
            .find(|d| d["kind"] == "Deployment")
            .unwrap();
        d["spec"]["replica"] = Value::from(2);
        let e = strict(&d).unwrap_err();
        assert!(e.contains("Deployment"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let run = |values: &str, cluster: &str| {
            let p = dir.path().join("v.yaml");
            std::fs::write(&p, values).unwrap();
            output(&KubernetesArgs {
                cluster: cluster.into(),
                region: "us-east".into(),
                values: Some(p),
            })
            .map(|_| ())
            .unwrap_err()
            .to_string()
        };
        assert!(run("imagee: x\n", "east").contains("imagee"));
        let e = run(
            "etcd: [\"http://etcd:2379\"]\netcd_auth: password\n",
            "east",
        );
        assert!(e.contains("etcd_auth") && e.contains("https://"), "{e}");
        assert!(run("etcd_auth: token\n", "east").contains("token"));
        assert!(run("webhook_ca_file: nope.pem\n", "east").contains("nope.pem"));
        assert!(run("{}\n", "East!").contains("--cluster"));
    }
}
