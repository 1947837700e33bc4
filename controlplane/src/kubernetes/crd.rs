//! Strait's custom resources, built as `k8s-openapi` `CustomResourceDefinition`s with OpenAPI v3
//! (structural) schemas and printer columns, and a validator that checks an object against such
//! a schema the way the API server does with strict field validation (types, required fields,
//! unknown fields, enums, bounds, patterns, lengths, property counts).
//!
//! - `FailoverPolicy` (`failoverpolicies.strait.io`, cluster-scoped): its `spec` is one policy
//!   in exactly the format of `strait policy apply` files (`federation::policy_file`), so a
//!   policy moves between a file and the cluster unchanged.
//! - `FederatedCluster` (`federatedclusters.strait.io`, cluster-scoped): a member of the
//!   federation as this cluster sees it — its region, the east-west gateway addresses its peers
//!   dial, and the trust it is accepted under (trust domain, optional CA bundle).

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceColumnDefinition, CustomResourceDefinition, CustomResourceDefinitionNames,
    CustomResourceDefinitionSpec, CustomResourceDefinitionVersion, CustomResourceValidation, JSON,
    JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::Value;

pub const GROUP: &str = "strait.io";
pub const VERSION: &str = "v1alpha1";

/// A DNS label (Kubernetes names, Strait cluster names).
const LABEL: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// `NAME.NAMESPACE`.
const SERVICE: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// A duration as the policy files take it (`2s`, `500ms`, `1m30s`).
const DURATION: &str = "^([0-9]+(\\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";
/// `host:port` (a DNS name, an IPv4 address, or `[IPv6]`).
const HOST_PORT: &str =
    "^(\\[[0-9a-fA-F:.]+\\]|[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?):[0-9]{1,5}$";

fn described(mut s: JSONSchemaProps, text: &str) -> JSONSchemaProps {
    s.description = Some(text.into());
    s
}

fn string() -> JSONSchemaProps {
    JSONSchemaProps {
        type_: Some("string".into()),
        ..Default::default()
    }
}

fn pattern(p: &str) -> JSONSchemaProps {
    JSONSchemaProps {
        pattern: Some(p.into()),
        min_length: Some(1),
        ..string()
    }
}

fn one_of_strings(values: &[&str]) -> JSONSchemaProps {
    JSONSchemaProps {
        enum_: Some(values.iter().map(|v| JSON(Value::from(*v))).collect()),
        ..string()
    }
}

fn integer(min: i64, max: i64) -> JSONSchemaProps {
    JSONSchemaProps {
        type_: Some("integer".into()),
        minimum: Some(min as f64),
        maximum: Some(max as f64),
        ..Default::default()
    }
}

fn boolean() -> JSONSchemaProps {
    JSONSchemaProps {
        type_: Some("boolean".into()),
        ..Default::default()
    }
}

fn array(items: JSONSchemaProps) -> JSONSchemaProps {
    JSONSchemaProps {
        type_: Some("array".into()),
        items: Some(JSONSchemaPropsOrArray::Schema(Box::new(items))),
        ..Default::default()
    }
}

fn map(values: JSONSchemaProps) -> JSONSchemaProps {
    JSONSchemaProps {
        type_: Some("object".into()),
        additional_properties: Some(JSONSchemaPropsOrBool::Schema(Box::new(values))),
        ..Default::default()
    }
}

fn object(props: Vec<(&str, JSONSchemaProps)>, required: &[&str]) -> JSONSchemaProps {
    JSONSchemaProps {
        type_: Some("object".into()),
        properties: Some(props.into_iter().map(|(k, v)| (k.to_string(), v)).collect()),
        required: (!required.is_empty()).then(|| required.iter().map(|s| s.to_string()).collect()),
        ..Default::default()
    }
}

/// An object with exactly one of its properties set.
fn exactly_one(props: Vec<(&str, JSONSchemaProps)>) -> JSONSchemaProps {
    JSONSchemaProps {
        min_properties: Some(1),
        max_properties: Some(1),
        ..object(props, &[])
    }
}

/// The schema of one policy (`spec` of a `FailoverPolicy`).
pub fn policy_schema() -> JSONSchemaProps {
    let value_match = || {
        exactly_one(vec![
            ("exact", string()),
            ("prefix", string()),
            ("regex", string()),
        ])
    };
    let header = JSONSchemaProps {
        min_properties: Some(2),
        max_properties: Some(3),
        ..object(
            vec![
                ("name", pattern("^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")),
                ("exact", string()),
                ("prefix", string()),
                ("regex", string()),
                ("present", boolean()),
                ("invert", boolean()),
            ],
            &["name"],
        )
    };
    let http = object(
        vec![
            ("name", string()),
            (
                "match",
                object(
                    vec![("path", value_match()), ("headers", array(header))],
                    &[],
                ),
            ),
            (
                "to",
                JSONSchemaProps {
                    min_items: Some(1),
                    ..array(object(
                        vec![
                            ("service", pattern(SERVICE)),
                            ("port", integer(1, 65535)),
                            ("weight", integer(0, 100)),
                        ],
                        &["service"],
                    ))
                },
            ),
            ("timeout", pattern(DURATION)),
            (
                "retries",
                object(
                    vec![
                        ("attempts", integer(0, 10)),
                        (
                            "on",
                            array(one_of_strings(federation::http_route::RETRY_CONDITIONS)),
                        ),
                        ("per_try_timeout", pattern(DURATION)),
                        ("status_codes", array(integer(100, 599))),
                    ],
                    &["attempts"],
                ),
            ),
            ("idempotent", boolean()),
            (
                "response_buffer",
                JSONSchemaProps {
                    x_kubernetes_int_or_string: Some(true),
                    ..Default::default()
                },
            ),
        ],
        &["to"],
    );
    object(
        vec![
            (
                "service",
                described(
                    pattern(SERVICE),
                    "NAME.NAMESPACE of the service this policy is for; omitted: the default policy of every other service",
                ),
            ),
            (
                "targets",
                described(
                    array(exactly_one(vec![
                        ("cluster", pattern(LABEL)),
                        ("region", pattern(LABEL)),
                    ])),
                    "Where traffic fails over to, in order: a cluster or a region each",
                ),
            ),
            ("exclude_others", boolean()),
            ("failover_priority", array(pattern("^[A-Za-z0-9./_-]+$"))),
            (
                "distribute",
                array(object(
                    vec![
                        (
                            "from",
                            pattern("^[a-z0-9*][-a-z0-9*]*(/[a-z0-9*][-a-z0-9*]*){0,2}$"),
                        ),
                        (
                            "to",
                            JSONSchemaProps {
                                min_properties: Some(1),
                                ..map(integer(0, 100))
                            },
                        ),
                    ],
                    &["from", "to"],
                )),
            ),
            ("http", array(http)),
        ],
        &[],
    )
}

/// The schema of a `FederatedCluster`'s `spec`.
pub fn federated_cluster_schema() -> JSONSchemaProps {
    object(
        vec![
            (
                "region",
                described(pattern(LABEL), "The cluster's region (locality)"),
            ),
            (
                "gateways",
                described(
                    JSONSchemaProps {
                        min_items: Some(1),
                        ..array(pattern(HOST_PORT))
                    },
                    "The cluster's east-west gateway addresses (QUIC, host:port) as its peers dial them",
                ),
            ),
            (
                "trust",
                described(
                    object(
                        vec![
                            ("trust_domain", pattern("^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")),
                            (
                                "ca_bundle",
                                described(
                                    pattern("-----BEGIN CERTIFICATE-----"),
                                    "PEM; omitted: the federation CA",
                                ),
                            ),
                        ],
                        &["trust_domain"],
                    ),
                    "What the cluster's gateway certificate must chain to and name",
                ),
            ),
        ],
        &["region", "gateways", "trust"],
    )
}

fn column(name: &str, type_: &str, path: &str) -> CustomResourceColumnDefinition {
    CustomResourceColumnDefinition {
        name: name.into(),
        type_: type_.into(),
        json_path: path.into(),
        ..Default::default()
    }
}

fn crd(
    kind: &str,
    plural: &str,
    short: &str,
    spec: JSONSchemaProps,
    columns: Vec<CustomResourceColumnDefinition>,
) -> CustomResourceDefinition {
    let schema = object(
        vec![
            ("apiVersion", string()),
            ("kind", string()),
            (
                "metadata",
                JSONSchemaProps {
                    type_: Some("object".into()),
                    ..Default::default()
                },
            ),
            ("spec", spec),
        ],
        &["spec"],
    );
    CustomResourceDefinition {
        metadata: ObjectMeta {
            name: Some(format!("{plural}.{GROUP}")),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/part-of".to_string(),
                "strait".to_string(),
            )])),
            ..Default::default()
        },
        spec: CustomResourceDefinitionSpec {
            group: GROUP.into(),
            names: CustomResourceDefinitionNames {
                kind: kind.into(),
                list_kind: Some(format!("{kind}List")),
                plural: plural.into(),
                singular: Some(kind.to_ascii_lowercase()),
                short_names: Some(vec![short.into()]),
                categories: Some(vec!["strait".into()]),
            },
            scope: "Cluster".into(),
            versions: vec![CustomResourceDefinitionVersion {
                name: VERSION.into(),
                served: true,
                storage: true,
                schema: Some(CustomResourceValidation {
                    open_api_v3_schema: Some(schema),
                }),
                additional_printer_columns: Some(
                    columns
                        .into_iter()
                        .chain([column("Age", "date", ".metadata.creationTimestamp")])
                        .collect(),
                ),
                ..Default::default()
            }],
            ..Default::default()
        },
        status: None,
    }
}

/// `failoverpolicies.strait.io`.
pub fn failover_policy_crd() -> CustomResourceDefinition {
    crd(
        "FailoverPolicy",
        "failoverpolicies",
        "sfp",
        policy_schema(),
        vec![
            column("Service", "string", ".spec.service"),
            column("Targets", "string", ".spec.targets"),
        ],
    )
}

/// `federatedclusters.strait.io`.
pub fn federated_cluster_crd() -> CustomResourceDefinition {
    crd(
        "FederatedCluster",
        "federatedclusters",
        "sfc",
        federated_cluster_schema(),
        vec![
            column("Region", "string", ".spec.region"),
            column("Gateways", "string", ".spec.gateways"),
            column("Trust-Domain", "string", ".spec.trust.trust_domain"),
        ],
    )
}

/// Both CRDs.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![failover_policy_crd(), federated_cluster_crd()]
}

/// A `FailoverPolicy`'s `spec` as the model's policy: read by the same parser as
/// `strait policy apply` files (JSON is YAML), so both say the same of the same policy.
pub fn policy_from_spec(
    name: &str,
    spec: &Value,
) -> Result<federation::model::FailoverPolicy, String> {
    let text = serde_json::json!({"policies": [spec]}).to_string();
    let mut policies = federation::policy_file::parse(format!("FailoverPolicy/{name}"), &text)
        .map_err(|e| e.to_string())?;
    match (policies.pop(), policies.is_empty()) {
        (Some(p), true) => Ok(p),
        _ => Err(format!(
            "FailoverPolicy/{name}: expected exactly one policy"
        )),
    }
}

/// Reads a `FederatedCluster` named `name` (its `spec` already checked against the schema) as
/// the peering of cluster `own` with it; `None` for the object naming `own` itself.
pub fn peering_from_spec(
    own: &federation::model::ClusterId,
    name: &str,
    spec: &Value,
) -> Result<Option<federation::model::Peering>, String> {
    use federation::model::{GatewayAddress, Name, Peering};
    let peer = Name::parse("metadata.name", name).map_err(|e| e.to_string())?;
    if &peer == own {
        return Ok(None);
    }
    let field = |path: &str| -> Result<&str, String> {
        spec.pointer(path)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("spec{}: a string is required", path.replace('/', ".")))
    };
    let region = Name::parse("spec.region", field("/region")?).map_err(|e| e.to_string())?;
    let gateways = spec["gateways"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, g)| {
            GatewayAddress::parse(
                &format!("spec.gateways[{i}]"),
                g.as_str().unwrap_or_default(),
            )
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let p = Peering {
        cluster: own.clone(),
        peer,
        region,
        gateways,
        trust_domain: field("/trust/trust_domain")?.to_string(),
        ca_bundle: spec
            .pointer("/trust/ca_bundle")
            .and_then(Value::as_str)
            .map(str::to_string),
    };
    p.validate().map_err(|e| {
        let field = match e.field.as_str() {
            "trust_domain" | "ca_bundle" => format!("trust.{}", e.field),
            other => other.to_string(),
        };
        format!("spec.{field}: {}", e.reason)
    })?;
    Ok(Some(p))
}

/// Check `object` against the schema of `crd`'s first version, as the API server does with
/// strict field validation. Every problem is returned, each naming its path.
pub fn validate(crd: &CustomResourceDefinition, object: &Value) -> Result<(), Vec<String>> {
    let schema = crd
        .spec
        .versions
        .first()
        .and_then(|v| v.schema.as_ref())
        .and_then(|s| s.open_api_v3_schema.as_ref());
    let Some(schema) = schema else {
        return Err(vec!["the CRD has no schema".into()]);
    };
    let mut errors = Vec::new();
    let want = format!("{}/{}", crd.spec.group, VERSION);
    if object.get("apiVersion").and_then(Value::as_str) != Some(&want) {
        errors.push(format!("apiVersion: must be {want}"));
    }
    if object.get("kind").and_then(Value::as_str) != Some(crd.spec.names.kind.as_str()) {
        errors.push(format!("kind: must be {}", crd.spec.names.kind));
    }
    match object.pointer("/metadata/name").and_then(Value::as_str) {
        Some(n) if regex_match(LABEL, n) => {}
        _ => errors.push("metadata.name: must be a DNS label".into()),
    }
    check(schema, object, "", &mut errors);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn regex_match(pattern: &str, text: &str) -> bool {
    regex::Regex::new(pattern).is_ok_and(|r| r.is_match(text))
}

fn check(s: &JSONSchemaProps, v: &Value, path: &str, errors: &mut Vec<String>) {
    let at = |p: &str| {
        if p.is_empty() {
            "the object".to_string()
        } else {
            p.to_string()
        }
    };
    let kind = match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    if let Some(t) = &s.type_ {
        let ok = t == kind || (t == "number" && kind == "integer");
        if !ok {
            errors.push(format!("{}: must be {t}, got {kind}", at(path)));
            return;
        }
    }
    if let Some(values) = &s.enum_
        && !values.iter().any(|e| &e.0 == v)
    {
        let allowed: Vec<String> = values.iter().map(|e| e.0.to_string()).collect();
        errors.push(format!(
            "{}: {v} is not one of {}",
            at(path),
            allowed.join(", ")
        ));
    }
    match v {
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            if s.minimum.is_some_and(|m| x < m) || s.maximum.is_some_and(|m| x > m) {
                errors.push(format!(
                    "{}: {n} is out of range {}..={}",
                    at(path),
                    s.minimum.unwrap_or(f64::MIN),
                    s.maximum.unwrap_or(f64::MAX)
                ));
            }
        }
        Value::String(text) => {
            let len = text.chars().count() as i64;
            if s.min_length.is_some_and(|m| len < m) {
                errors.push(format!("{}: must not be empty", at(path)));
            } else if s.max_length.is_some_and(|m| len > m) {
                errors.push(format!("{}: longer than {:?}", at(path), s.max_length));
            }
            if let Some(p) = &s.pattern
                && !text.is_empty()
                && !regex_match(p, text)
            {
                errors.push(format!("{}: {text:?} does not match {p}", at(path)));
            }
        }
        Value::Array(items) => {
            let n = items.len() as i64;
            if s.min_items.is_some_and(|m| n < m) {
                errors.push(format!(
                    "{}: needs at least {} item(s)",
                    at(path),
                    s.min_items.unwrap_or(0)
                ));
            }
            if s.max_items.is_some_and(|m| n > m) {
                errors.push(format!(
                    "{}: at most {} item(s)",
                    at(path),
                    s.max_items.unwrap_or(0)
                ));
            }
            if let Some(JSONSchemaPropsOrArray::Schema(item)) = &s.items {
                for (i, x) in items.iter().enumerate() {
                    check(item, x, &format!("{path}[{i}]"), errors);
                }
            }
        }
        Value::Object(fields) => {
            let n = fields.len() as i64;
            if s.min_properties.is_some_and(|m| n < m) || s.max_properties.is_some_and(|m| n > m) {
                let keys: Vec<&String> = s.properties.iter().flat_map(|p| p.keys()).collect();
                errors.push(match (s.min_properties, s.max_properties) {
                    (Some(1), Some(1)) => format!(
                        "{}: give exactly one of {}",
                        at(path),
                        keys.iter()
                            .map(|k| format!("`{k}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    (lo, hi) => format!(
                        "{}: has {n} field(s), allowed {}..={}",
                        at(path),
                        lo.unwrap_or(0),
                        hi.map_or("∞".to_string(), |h| h.to_string())
                    ),
                });
            }
            for r in s.required.iter().flatten() {
                if !fields.contains_key(r) {
                    errors.push(format!("{}: required field `{r}` is missing", at(path)));
                }
            }
            let child = |k: &str| {
                if path.is_empty() {
                    k.to_string()
                } else {
                    format!("{path}.{k}")
                }
            };
            for (k, x) in fields {
                let sub = s.properties.as_ref().and_then(|p| p.get(k));
                match (sub, &s.additional_properties) {
                    (Some(sub), _) => check(sub, x, &child(k), errors),
                    (None, Some(JSONSchemaPropsOrBool::Schema(values))) => {
                        check(values, x, &child(k), errors)
                    }
                    (None, Some(JSONSchemaPropsOrBool::Bool(true))) => {}
                    // An object without properties (`metadata`): the API server's own rules.
                    (None, _) if s.properties.is_none() && s.additional_properties.is_none() => {}
                    (None, _) => errors.push(format!("{}: unknown field", child(k))),
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_schemas_are_structural_and_their_patterns_compile() {
        fn walk(s: &JSONSchemaProps, path: &str) {
            // Kubernetes' structural-schema rule: every node has a type, except an
            // int-or-string node, which must have none.
            if s.x_kubernetes_int_or_string == Some(true) {
                assert!(
                    s.type_.is_none(),
                    "{path}: an int-or-string node has no type (structural schema)"
                );
            } else {
                assert!(
                    s.type_.is_some(),
                    "{path}: every node needs a type (structural schema)"
                );
            }
            if let Some(p) = &s.pattern {
                regex::Regex::new(p).unwrap_or_else(|e| panic!("{path}: {e}"));
            }
            for (k, sub) in s.properties.iter().flatten() {
                walk(sub, &format!("{path}.{k}"));
            }
            if let Some(JSONSchemaPropsOrArray::Schema(i)) = &s.items {
                walk(i, &format!("{path}[]"));
            }
            if let Some(JSONSchemaPropsOrBool::Schema(v)) = &s.additional_properties {
                walk(v, &format!("{path}{{}}"));
            }
        }
        for crd in all() {
            let v = &crd.spec.versions[0];
            walk(
                v.schema
                    .as_ref()
                    .unwrap()
                    .open_api_v3_schema
                    .as_ref()
                    .unwrap(),
                &crd.spec.names.kind,
            );
            assert_eq!(
                crd.metadata.name.as_deref(),
                Some(format!("{}.strait.io", crd.spec.names.plural).as_str())
            );
        }
    }

    /// Every example in `deploy/examples/kubernetes/` is accepted by its CRD's schema (and a
    /// policy by the policy parser); every one in `broken/` is refused with the error its
    /// `# expect:` line names.
    #[test]
    fn the_examples_are_accepted_and_the_broken_ones_refused() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/kubernetes");
        let crds = all();
        let check = |path: &std::path::Path| -> Result<(), String> {
            let text = std::fs::read_to_string(path).unwrap();
            let obj: Value =
                serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let kind = obj["kind"].as_str().unwrap_or_default();
            let crd = crds
                .iter()
                .find(|c| c.spec.names.kind == kind)
                .ok_or_else(|| format!("no CRD for kind {kind:?}"))?;
            validate(crd, &obj).map_err(|e| e.join("; "))?;
            if kind == "FailoverPolicy" {
                policy_from_spec(obj["metadata"]["name"].as_str().unwrap_or(""), &obj["spec"])?;
            }
            Ok(())
        };
        let yaml = |d: &std::path::Path| {
            let mut v: Vec<_> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
                .collect();
            v.sort();
            v
        };
        let good = yaml(&dir);
        assert!(good.len() >= 3, "{good:?}");
        for p in good {
            check(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        }
        let broken = yaml(&dir.join("broken"));
        assert!(broken.len() >= 5, "{broken:?}");
        for p in broken {
            let text = std::fs::read_to_string(&p).unwrap();
            let want = text
                .lines()
                .find_map(|l| l.strip_prefix("# expect: "))
                .unwrap_or_else(|| panic!("{}: no `# expect:` line", p.display()));
            match check(&p) {
                Ok(()) => panic!("{}: accepted", p.display()),
                Err(e) => assert!(
                    e.contains(want),
                    "{}: `{e}` does not say `{want}`",
                    p.display()
                ),
            }
        }
    }

    #[test]
    fn unknown_fields_wrong_types_and_bounds_are_named() {
        let crd = failover_policy_crd();
        let obj = |spec: Value| {
            json!({"apiVersion": "strait.io/v1alpha1", "kind": "FailoverPolicy",
                "metadata": {"name": "payments"}, "spec": spec})
        };
        let errs = |spec: Value| validate(&crd, &obj(spec)).unwrap_err().join("; ");
        assert!(errs(json!({"colour": "blue"})).contains("spec.colour: unknown field"));
        assert!(
            errs(json!({"targets": [{"cluster": "west", "region": "us"}]}))
                .contains("spec.targets[0]: give exactly one of `cluster`, `region`")
        );
        assert!(
            errs(json!({"exclude_others": "yes"})).contains("spec.exclude_others: must be boolean")
        );
        assert!(
            errs(json!({"service": "payments"}))
                .contains("spec.service: \"payments\" does not match")
        );
        assert!(
            errs(json!({"http": [{"to": [{"service": "a.b", "weight": 120}]}]}))
                .contains("spec.http[0].to[0].weight: 120 is out of range")
        );
        assert!(errs(json!({"http": [{"to": []}]})).contains("spec.http[0].to: needs at least 1"));
        assert!(errs(json!({"http": [{"to": [{"service": "a.b"}], "retries": {"attempts": 1, "on": ["sometimes"]}}]}))
            .contains("spec.http[0].retries.on[0]: \"sometimes\" is not one of"));
        assert!(
            errs(json!({"distribute": [{"from": "us-east/*", "to": {"us-west/*": "20"}}]}))
                .contains("spec.distribute[0].to.us-west/*: must be integer")
        );
        let e = validate(
            &crd,
            &json!({"apiVersion": "v1", "kind": "Pod", "metadata": {}, "spec": {}}),
        )
        .unwrap_err()
        .join("; ");
        assert!(
            e.contains("apiVersion") && e.contains("kind") && e.contains("metadata.name"),
            "{e}"
        );
        assert!(
            validate(&crd, &obj(json!({}))).is_ok(),
            "an empty spec is the default policy"
        );
    }
}
