//! HTTP routing rules of a service's policy: requests to the service that match a rule (path,
//! headers) go to the rule's destinations (services, with weights), with the rule's timeout and
//! retries. Requests that match no rule go to the service itself, as without rules.
//!
//! Every destination is a service with its own failover policy: a rule chooses *which* service
//! serves a request, the destination's policy *where* it is served.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::model::{ModelError, ServiceKey};

/// How a rule matches the request path (the query is ignored except by `prefix`, as in Envoy).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    /// A regular expression (RE2 syntax) the whole path must match.
    Regex(String),
}

/// How a rule matches one header's value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeaderValueMatch {
    Exact(String),
    Prefix(String),
    /// A regular expression (RE2 syntax) the whole value must match.
    Regex(String),
    /// `true`: the header is present (any value); `false`: it is absent.
    Present(bool),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HeaderMatch {
    /// The header name, lowercase.
    pub name: String,
    pub value: HeaderValueMatch,
    /// Match when the condition does *not* hold.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub invert: bool,
}

/// One destination of a rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Destination {
    pub service: ServiceKey,
    /// The destination's port; by default the same port number as the request's, or else the
    /// destination's first port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Percent of the rule's requests; the destinations' weights add up to 100.
    pub weight: u32,
}

/// When a rule retries.
pub const RETRY_CONDITIONS: &[&str] = &[
    "connect-failure",
    "refused-stream",
    "reset",
    "5xx",
    "gateway-error",
    "retriable-status-codes",
];

/// A rule's retry policy. Retries always prefer another host and another priority than the
/// ones that failed (so a retry moves across localities and clusters).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RouteRetries {
    /// Retries after the first attempt (0: none).
    pub attempts: u32,
    /// The conditions, from [`RETRY_CONDITIONS`].
    pub on: Vec<String>,
    /// Each attempt's deadline, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout_ms: Option<u64>,
    /// Status codes retried under `retriable-status-codes`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub status_codes: Vec<u16>,
}

/// One HTTP routing rule of a service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HttpRoute {
    /// A name for explanations and metrics (default `rule-N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The path condition (none: every path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// Header conditions, all of which must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    pub to: Vec<Destination>,
    /// The whole request's deadline, in milliseconds (none: no deadline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// None: the default retry policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RouteRetries>,
    /// Requests on this rule are idempotent whatever their method: their answers are held
    /// until complete like a GET's (in-flight protection, docs/proxy.md).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub idempotent: bool,
    /// The largest answer (bytes) held until complete for an idempotent request; 0: none
    /// (None: the proxy's default, 64 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_buffer: Option<u64>,
}

/// The largest `response_buffer` a rule may ask for.
pub const MAX_RESPONSE_BUFFER: u64 = 16 << 20;

/// Regular expressions are limited in compiled size, like Envoy's RE2 program size limit.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

fn check_regex(field: &str, r: &str) -> Result<(), ModelError> {
    regex::RegexBuilder::new(r)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map(|_| ())
        .map_err(|e| ModelError::new(field, format!("invalid regular expression: {e}")))
}

fn check_header_name(field: &str, name: &str) -> Result<(), ModelError> {
    if name.is_empty() {
        return Err(ModelError::new(field, "must not be empty"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.!#$%&'*+^`|~".contains(*c)))
    {
        return Err(ModelError::new(
            field,
            format!("`{name}` has `{c}`: header names are lowercase tokens (no pseudo-headers)"),
        ));
    }
    Ok(())
}

impl HttpRoute {
    /// The rule's name: its own, or `rule-INDEX`.
    pub fn display_name(&self, index: usize) -> String {
        self.name.clone().unwrap_or_else(|| format!("rule-{index}"))
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        if let Some(b) = self.response_buffer
            && b > MAX_RESPONSE_BUFFER
        {
            return Err(ModelError::new(
                "response_buffer",
                format!("{b} bytes is over the limit of 16 MiB"),
            ));
        }
        if let Some(n) = &self.name
            && (n.is_empty()
                || n.len() > 63
                || !n
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        {
            return Err(ModelError::new(
                "name",
                format!("`{n}`: 1–63 letters, digits, `-` or `_`"),
            ));
        }
        match &self.path {
            Some(PathMatch::Exact(p)) | Some(PathMatch::Prefix(p)) if !p.starts_with('/') => {
                return Err(ModelError::new(
                    "path",
                    format!("`{p}` does not start with `/`"),
                ));
            }
            Some(PathMatch::Regex(r)) => check_regex("path.regex", r)?,
            _ => {}
        }
        for (i, h) in self.headers.iter().enumerate() {
            let field = format!("headers[{i}]");
            check_header_name(&format!("{field}.name"), &h.name)?;
            if let HeaderValueMatch::Regex(r) = &h.value {
                check_regex(&format!("{field}.regex"), r)?;
            }
            if self.headers[..i].iter().any(|o| o.name == h.name) {
                return Err(ModelError::new(
                    format!("{field}.name"),
                    format!("`{}` is matched twice", h.name),
                ));
            }
        }
        if self.to.is_empty() {
            return Err(ModelError::new("to", "needs at least one destination"));
        }
        for (i, d) in self.to.iter().enumerate() {
            if d.port == Some(0) {
                return Err(ModelError::new(format!("to[{i}].port"), "must not be 0"));
            }
            if self.to[..i]
                .iter()
                .any(|o| o.service == d.service && o.port == d.port)
            {
                return Err(ModelError::new(
                    format!("to[{i}]"),
                    format!("{} is listed twice", d.service),
                ));
            }
        }
        let sum: u64 = self.to.iter().map(|d| u64::from(d.weight)).sum();
        if sum != 100 {
            return Err(ModelError::new(
                "to",
                format!("weights add up to {sum}, not 100"),
            ));
        }
        if self.timeout_ms == Some(0) {
            return Err(ModelError::new("timeout", "must be more than 0"));
        }
        if let Some(r) = &self.retries {
            if r.attempts > 10 {
                return Err(ModelError::new(
                    "retries.attempts",
                    format!("{} is more than 10", r.attempts),
                ));
            }
            for (i, c) in r.on.iter().enumerate() {
                if !RETRY_CONDITIONS.contains(&c.as_str()) {
                    return Err(ModelError::new(
                        format!("retries.on[{i}]"),
                        format!("`{c}` is not one of {}", RETRY_CONDITIONS.join(", ")),
                    ));
                }
            }
            if r.attempts > 0 && r.on.is_empty() {
                return Err(ModelError::new(
                    "retries.on",
                    "names no condition to retry on",
                ));
            }
            if r.per_try_timeout_ms == Some(0) {
                return Err(ModelError::new(
                    "retries.per_try_timeout",
                    "must be more than 0",
                ));
            }
            if let Some(c) = r.status_codes.iter().find(|c| !(100..=599).contains(*c)) {
                return Err(ModelError::new(
                    "retries.status_codes",
                    format!("{c} is not an HTTP status"),
                ));
            }
            let by_status = r.on.iter().any(|c| c == "retriable-status-codes");
            if by_status == r.status_codes.is_empty() {
                return Err(ModelError::new(
                    "retries.status_codes",
                    "`retriable-status-codes` in `on` and `status_codes` go together",
                ));
            }
        }
        Ok(())
    }
}

impl fmt::Display for HttpRoute {
    /// A one-line summary: `path prefix /v2, header x-canary = "1" → echo-v2.default 100%`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut conds = Vec::new();
        match &self.path {
            Some(PathMatch::Exact(p)) => conds.push(format!("path = {p}")),
            Some(PathMatch::Prefix(p)) => conds.push(format!("path prefix {p}")),
            Some(PathMatch::Regex(r)) => conds.push(format!("path ~ {r}")),
            None => {}
        }
        for h in &self.headers {
            let not = if h.invert { "not " } else { "" };
            conds.push(match &h.value {
                HeaderValueMatch::Exact(v) => format!("{not}header {} = {v:?}", h.name),
                HeaderValueMatch::Prefix(v) => format!("{not}header {} prefix {v:?}", h.name),
                HeaderValueMatch::Regex(v) => format!("{not}header {} ~ {v}", h.name),
                HeaderValueMatch::Present(true) => format!("{not}header {} present", h.name),
                HeaderValueMatch::Present(false) => format!("{not}header {} absent", h.name),
            });
        }
        if conds.is_empty() {
            conds.push("every request".to_string());
        }
        let to: Vec<String> = self
            .to
            .iter()
            .map(|d| match d.port {
                Some(p) => format!("{}:{p} {}%", d.service, d.weight),
                None => format!("{} {}%", d.service, d.weight),
            })
            .collect();
        write!(f, "{} → {}", conds.join(", "), to.join(", "))?;
        if let Some(t) = self.timeout_ms {
            write!(f, ", timeout {t} ms")?;
        }
        if let Some(r) = &self.retries {
            write!(f, ", {} retries on {}", r.attempts, r.on.join(","))?;
        }
        Ok(())
    }
}
