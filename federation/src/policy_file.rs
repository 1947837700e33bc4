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
//!     http:                          # routing rules, tried in order (service policies only)
//!       - name: canary
//!         match: {path: {prefix: /api}, headers: [{name: x-canary, exact: "1"}]}
//!         to: [{service: echo-v2.default, weight: 90}, {service: echo.default, weight: 10}]
//!         timeout: 2s
//!         retries: {attempts: 2, on: [connect-failure, 5xx], per_try_timeout: 500ms}
//! ```
//!
//! Errors name the file, line, column and field (`policies[0].targets[1]: …`).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::config::{DiscoveryError, invalid, parse_yaml, read_file};
use crate::discovery::at;
use crate::model::{
    Destination, Distribute, FailoverPolicy, FailoverTarget, HeaderMatch, HeaderValueMatch,
    HttpRoute, LocalityPattern, ModelError, Name, PathMatch, PolicyScope, RouteRetries, ServiceKey,
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
    #[serde(default)]
    http: Vec<HttpSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpSpec {
    #[serde(default)]
    name: Option<String>,
    #[serde(default, rename = "match")]
    matches: Option<MatchSpec>,
    to: Vec<DestinationSpec>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    retries: Option<RetriesSpec>,
    #[serde(default)]
    idempotent: bool,
    /// Bytes: a number, or `64KiB`, `1MiB`; 0 turns holding off.
    #[serde(default)]
    response_buffer: Option<ByteSize>,
}

/// A size written as a number of bytes or with a `KiB` or `MiB` unit.
#[derive(Deserialize)]
#[serde(untagged)]
enum ByteSize {
    Bytes(u64),
    Text(String),
}

fn bytes(field: &str, s: &ByteSize) -> Result<u64, ModelError> {
    match s {
        ByteSize::Bytes(n) => Ok(*n),
        ByteSize::Text(t) => {
            let t = t.trim();
            let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
                Some(i) => t.split_at(i),
                None => (t, ""),
            };
            let mult = match unit.trim() {
                "" | "B" => 1,
                "KiB" => 1024,
                "MiB" => 1024 * 1024,
                _ => 0,
            };
            num.parse::<u64>()
                .ok()
                .filter(|_| mult > 0)
                .and_then(|n| n.checked_mul(mult))
                .ok_or_else(|| {
                    ModelError::new(
                        field,
                        format!("`{t}` is not a size (bytes, or e.g. 64KiB, 1MiB)"),
                    )
                })
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MatchSpec {
    #[serde(default)]
    path: Option<ValueSpec>,
    #[serde(default)]
    headers: Vec<HeaderSpec>,
}

/// `{exact: …}`, `{prefix: …}` or `{regex: …}` (and for headers `{present: bool}`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ValueSpec {
    #[serde(default)]
    exact: Option<String>,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    regex: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderSpec {
    name: String,
    #[serde(default)]
    exact: Option<String>,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    regex: Option<String>,
    #[serde(default)]
    present: Option<bool>,
    #[serde(default)]
    invert: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DestinationSpec {
    service: String,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    weight: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RetriesSpec {
    attempts: u32,
    #[serde(default)]
    on: Vec<String>,
    #[serde(default)]
    per_try_timeout: Option<String>,
    #[serde(default)]
    status_codes: Vec<u16>,
}

fn millis(field: &str, text: &str) -> Result<u64, ModelError> {
    let d = humantime::parse_duration(text).map_err(|e| {
        ModelError::new(
            field,
            format!("`{text}` is not a duration (e.g. 2s, 500ms): {e}"),
        )
    })?;
    u64::try_from(d.as_millis())
        .map_err(|_| ModelError::new(field, format!("`{text}` is too long")))
}

fn http_route(spec: &HttpSpec) -> Result<HttpRoute, ModelError> {
    let (path, headers) = match &spec.matches {
        None => (None, Vec::new()),
        Some(m) => {
            let path = match &m.path {
                None => None,
                Some(v) => Some(match (&v.exact, &v.prefix, &v.regex) {
                    (Some(p), None, None) => PathMatch::Exact(p.clone()),
                    (None, Some(p), None) => PathMatch::Prefix(p.clone()),
                    (None, None, Some(r)) => PathMatch::Regex(r.clone()),
                    _ => {
                        return Err(ModelError::new(
                            "match.path",
                            "give exactly one of `exact`, `prefix` or `regex`",
                        ));
                    }
                }),
            };
            let mut headers = Vec::new();
            for (i, h) in m.headers.iter().enumerate() {
                let value = match (&h.exact, &h.prefix, &h.regex, h.present) {
                    (Some(v), None, None, None) => HeaderValueMatch::Exact(v.clone()),
                    (None, Some(v), None, None) => HeaderValueMatch::Prefix(v.clone()),
                    (None, None, Some(v), None) => HeaderValueMatch::Regex(v.clone()),
                    (None, None, None, Some(p)) => HeaderValueMatch::Present(p),
                    _ => {
                        return Err(ModelError::new(
                            format!("match.headers[{i}]"),
                            "give exactly one of `exact`, `prefix`, `regex` or `present`",
                        ));
                    }
                };
                headers.push(HeaderMatch {
                    name: h.name.clone(),
                    value,
                    invert: h.invert,
                });
            }
            (path, headers)
        }
    };
    let mut to = Vec::new();
    for (i, d) in spec.to.iter().enumerate() {
        let weight = match (d.weight, spec.to.len()) {
            (Some(w), _) => w,
            (None, 1) => 100,
            (None, _) => {
                return Err(ModelError::new(
                    format!("to[{i}].weight"),
                    "missing: with several destinations, each needs a weight (percent)",
                ));
            }
        };
        to.push(Destination {
            service: ServiceKey::parse(&format!("to[{i}].service"), &d.service)?,
            port: d.port,
            weight,
        });
    }
    let timeout_ms = spec
        .timeout
        .as_deref()
        .map(|t| millis("timeout", t))
        .transpose()?;
    let retries = match &spec.retries {
        None => None,
        Some(r) => Some(RouteRetries {
            attempts: r.attempts,
            on: r.on.clone(),
            per_try_timeout_ms: r
                .per_try_timeout
                .as_deref()
                .map(|t| millis("retries.per_try_timeout", t))
                .transpose()?,
            status_codes: r.status_codes.clone(),
        }),
    };
    let response_buffer = spec
        .response_buffer
        .as_ref()
        .map(|b| bytes("response_buffer", b))
        .transpose()?;
    Ok(HttpRoute {
        name: spec.name.clone(),
        path,
        headers,
        to,
        timeout_ms,
        retries,
        idempotent: spec.idempotent,
        response_buffer,
    })
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
    let mut http = Vec::new();
    for (i, h) in spec.http.iter().enumerate() {
        http.push(http_route(h).map_err(|e| e.within(format_args!("http[{i}]")))?);
    }
    let p = FailoverPolicy {
        scope,
        targets,
        exclude_others: spec.exclude_others,
        failover_priority: spec.failover_priority.clone(),
        distribute,
        http,
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

    const RULES: &str = "policies:\n  - service: echo.default\n    http:\n      - name: canary\n        match:\n          path: {prefix: /api}\n          headers: [{name: x-canary, exact: \"1\"}, {name: x-debug, present: false}]\n        to: [{service: echo-v2.default, weight: 90}, {service: echo.default, port: 8080, weight: 10}]\n        timeout: 2s\n        retries: {attempts: 3, on: [5xx, retriable-status-codes], per_try_timeout: 500ms, status_codes: [429]}\n      - match: {path: {regex: \"/items/[0-9]+\"}}\n        to: [{service: items.default}]\n";

    #[test]
    fn http_rules_parse() {
        let ps = parse("p.yaml", RULES).unwrap();
        let http = &ps[0].http;
        assert_eq!(http.len(), 2);
        assert_eq!(http[0].display_name(0), "canary");
        assert_eq!(http[0].path, Some(PathMatch::Prefix("/api".into())));
        assert_eq!(http[0].headers[1].value, HeaderValueMatch::Present(false));
        assert_eq!(http[0].to[0].weight, 90);
        assert_eq!(http[0].to[1].port, Some(8080));
        assert_eq!(http[0].timeout_ms, Some(2000));
        let r = http[0].retries.as_ref().unwrap();
        assert_eq!((r.attempts, r.per_try_timeout_ms), (3, Some(500)));
        assert_eq!(r.status_codes, vec![429]);
        // A single destination takes every request without a weight.
        assert_eq!(http[1].display_name(1), "rule-1");
        assert_eq!(http[1].to[0].weight, 100);
        assert_eq!(
            http[1].to_string(),
            "path ~ /items/[0-9]+ → items.default 100%"
        );
        // In-flight protection: off unless asked; sizes in bytes or KiB/MiB.
        assert!(!http[0].idempotent && http[0].response_buffer.is_none());
        for (text, want) in [
            ("65536", 65536),
            ("64KiB", 65536),
            ("1MiB", 1 << 20),
            ("0", 0),
        ] {
            let f = parse(
                "p.yaml",
                &format!(
                    "policies:\n  - service: echo.default\n    http:\n      - {{to: [{{service: a.default}}], idempotent: true, response_buffer: {text}}}\n"
                ),
            )
            .unwrap();
            let r = &f[0].http[0];
            assert!(r.idempotent, "{text}");
            assert_eq!(r.response_buffer, Some(want), "{text}");
        }
        // The registry's JSON round-trips.
        let json = serde_json::to_string(&ps[0]).unwrap();
        let back: FailoverPolicy = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ps[0]);
    }

    #[test]
    fn bad_http_rules_are_refused_naming_the_field() {
        let rule =
            |r: &str| format!("policies:\n  - service: echo.default\n    http:\n      - {r}\n");
        let cases = [
            (
                "{to: [{service: a.default, weight: 60}, {service: b.default, weight: 30}]}",
                "policies[0].http[0].to: weights add up to 90",
            ),
            (
                "{to: [{service: a.default}, {service: b.default, weight: 30}]}",
                "policies[0].http[0].to[0].weight: missing",
            ),
            ("{to: []}", "policies[0].http[0].to: needs at least one"),
            ("{to: [{service: a}]}", "policies[0].http[0].to[0].service"),
            (
                "{match: {path: {regex: \"(\"}}, to: [{service: a.default}]}",
                "policies[0].http[0].path.regex: invalid regular expression",
            ),
            (
                "{match: {path: {prefix: api}}, to: [{service: a.default}]}",
                "policies[0].http[0].path: `api` does not start with `/`",
            ),
            (
                "{match: {path: {prefix: /a, exact: /b}}, to: [{service: a.default}]}",
                "policies[0].http[0].match.path: give exactly one",
            ),
            (
                "{match: {headers: [{name: X-Canary, exact: \"1\"}]}, to: [{service: a.default}]}",
                "policies[0].http[0].headers[0].name: `X-Canary` has `X`",
            ),
            (
                "{match: {headers: [{name: \":authority\", exact: a}]}, to: [{service: a.default}]}",
                "no pseudo-headers",
            ),
            (
                "{match: {headers: [{name: x}]}, to: [{service: a.default}]}",
                "policies[0].http[0].match.headers[0]: give exactly one",
            ),
            (
                "{to: [{service: a.default}], timeout: soon}",
                "policies[0].http[0].timeout: `soon` is not a duration",
            ),
            (
                "{to: [{service: a.default}], retries: {attempts: 2, on: [sometimes]}}",
                "policies[0].http[0].retries.on[0]: `sometimes` is not one of",
            ),
            (
                "{to: [{service: a.default}], retries: {attempts: 2}}",
                "policies[0].http[0].retries.on: names no condition",
            ),
            (
                "{to: [{service: a.default}], retries: {attempts: 2, on: [retriable-status-codes]}}",
                "policies[0].http[0].retries.status_codes",
            ),
            ("{to: [{service: a.default}], colour: blue}", "colour"),
            (
                "{to: [{service: a.default}], response_buffer: 64kb}",
                "policies[0].http[0].response_buffer: `64kb` is not a size",
            ),
            (
                "{to: [{service: a.default}], response_buffer: 32MiB}",
                "policies[0].http[0].response_buffer: 33554432 bytes is over the limit",
            ),
        ];
        for (r, want) in cases {
            let e = err(&rule(r));
            assert!(e.contains(want), "{r}: {e}");
        }
        let e = err("policies:\n  - http: [{to: [{service: a.default}]}]\n");
        assert!(
            e.contains("policies[0].http: HTTP rules belong to a service"),
            "{e}"
        );
        let e = err(
            "policies:\n  - service: echo.default\n    http: [{name: a, to: [{service: a.default}]}, {name: a, to: [{service: b.default}]}]\n",
        );
        assert!(
            e.contains("policies[0].http[1].name: `a` is used twice"),
            "{e}"
        );
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
