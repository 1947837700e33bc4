//! Failover policy files: what `strait policy apply -f FILE` reads.
//!
//! ```yaml
//! policies:
//!   - service: echo.default          # omit for the default policy of every other service
//!     targets: [{cluster: west}, {region: us-central}]
//!     exclude_others: false
//!     failover_priority: [topology.kubernetes.io/region, strait.io/cluster, version]
//!     distribute:
//!       - from: us-east/*
//!         to: {"us-east/*": 80, "us-west/*": 20}
//! ```
//!
//! Errors name the file, line, column and field (`policies[0].targets[1]: …`).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::discovery::{DiscoveryError, at, invalid, parse_yaml, read_file};
use crate::model::{
    Distribute, FailoverPolicy, FailoverTarget, LocalityPattern, ModelError, Name, PolicyScope,
    ServiceKey,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    policies: Vec<Spanned<PolicySpec>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicySpec {
    #[serde(default)]
    service: Option<String>,
    #[serde(default)]
    targets: Vec<TargetSpec>,
    #[serde(default)]
    exclude_others: bool,
    #[serde(default)]
    failover_priority: Vec<String>,
    #[serde(default)]
    distribute: Vec<DistributeSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetSpec {
    #[serde(default)]
    cluster: Option<String>,
    #[serde(default)]
    region: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DistributeSpec {
    from: String,
    to: BTreeMap<String, u32>,
}

fn policy(spec: &PolicySpec) -> Result<FailoverPolicy, ModelError> {
    let scope = match &spec.service {
        None => PolicyScope::Default,
        Some(s) => PolicyScope::Service(ServiceKey::parse("service", s)?),
    };
    let mut targets = Vec::new();
    for (i, t) in spec.targets.iter().enumerate() {
        let field = format!("targets[{i}]");
        targets.push(match (&t.cluster, &t.region) {
            (Some(c), None) => {
                FailoverTarget::Cluster(Name::parse(&format!("{field}.cluster"), c)?)
            }
            (None, Some(r)) => FailoverTarget::Region(r.clone()),
            _ => {
                return Err(ModelError::new(
                    field,
                    "give exactly one of `cluster` or `region`",
                ));
            }
        });
    }
    let mut distribute = Vec::new();
    for (i, d) in spec.distribute.iter().enumerate() {
        let from = LocalityPattern::parse(&format!("distribute[{i}].from"), &d.from)?;
        let mut to = BTreeMap::new();
        for (p, w) in &d.to {
            to.insert(
                LocalityPattern::parse(&format!("distribute[{i}].to"), p)?,
                *w,
            );
        }
        distribute.push(Distribute { from, to });
    }
    let p = FailoverPolicy {
        scope,
        targets,
        exclude_others: spec.exclude_others,
        failover_priority: spec.failover_priority.clone(),
        distribute,
    };
    p.validate()?;
    Ok(p)
}

/// Parse a policy file; every policy is validated, and no two may have the same scope.
pub fn parse(path: impl AsRef<Path>, text: &str) -> Result<Vec<FailoverPolicy>, DiscoveryError> {
    let path = path.as_ref();
    let spec: FileSpec = parse_yaml(path, text)?;
    if spec.policies.is_empty() {
        return Err(invalid(path, 1, 1, "policies", "lists no policy"));
    }
    let mut out: Vec<FailoverPolicy> = Vec::new();
    for (i, s) in spec.policies.iter().enumerate() {
        let p = policy(&s.value).map_err(at(path, s, &format!("policies[{i}]")))?;
        if let Some(j) = out.iter().position(|o| o.scope == p.scope) {
            return Err(at(path, s, &format!("policies[{i}]"))(ModelError::new(
                "service",
                format!("`{}` already has a policy (policies[{j}])", p.scope),
            )));
        }
        out.push(p);
    }
    Ok(out)
}

/// Read and parse a policy file.
pub fn load(path: impl AsRef<Path>) -> Result<Vec<FailoverPolicy>, DiscoveryError> {
    let path = path.as_ref();
    parse(path, &read_file(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "policies:\n  - targets: [{cluster: west}, {region: us-central}]\n  - service: echo.default\n    failover_priority: [topology.kubernetes.io/region, version]\n    distribute:\n      - from: us-east/*\n        to: {\"us-east/*\": 80, \"us-west/*\": 20}\n";

    #[test]
    fn a_good_file_parses() {
        let ps = parse("p.yaml", GOOD).unwrap();
        assert_eq!(ps.len(), 2);
        assert_eq!(ps[0].scope, PolicyScope::Default);
        assert_eq!(ps[0].targets.len(), 2);
        assert_eq!(ps[1].scope.to_string(), "echo.default");
        assert_eq!(ps[1].distribute[0].to.len(), 2);
    }

    fn err(text: &str) -> String {
        parse("p.yaml", text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let e = err("policies:\n  - targets: [{cluster: west, region: x}]\n");
        assert!(e.starts_with("p.yaml:2:"), "{e}");
        assert!(
            e.contains("policies[0].targets[0]: give exactly one"),
            "{e}"
        );
        let e = err("policies:\n  - targets: [{cluster: West}]\n");
        assert!(e.contains("policies[0].targets[0].cluster"), "{e}");
        let e = err("policies:\n  - service: echo\n");
        assert!(
            e.contains("policies[0].service") && e.contains("SERVICE.NAMESPACE"),
            "{e}"
        );
        let e =
            err("policies:\n  - distribute: [{from: \"us-east/*\", to: {\"us-west/*\": 90}}]\n");
        assert!(
            e.contains("policies[0].distribute[0].to") && e.contains("add up to 90"),
            "{e}"
        );
        let e = err("policies:\n  - {}\n  - targets: [{cluster: west}]\n");
        assert!(e.starts_with("p.yaml:3:"), "{e}");
        assert!(
            e.contains("`default` already has a policy (policies[0])"),
            "{e}"
        );
        let e = err("policies:\n  - exclude_others: true\n");
        assert!(e.contains("policies[0].exclude_others"), "{e}");
        let e = err("policies:\n  - colour: blue\n");
        assert!(e.contains("colour"), "{e}");
        let e = err("policies: []\n");
        assert!(e.contains("lists no policy"), "{e}");
        let e = err("policies:\n  - failover_priority: [version, version]\n");
        assert!(e.contains("policies[0].failover_priority[1]"), "{e}");
    }
}
