//! Active health checks of a cluster's own endpoints: what to check (a discovery file's
//! `health_check`, per service or for the whole file) and the verdicts (a pure state machine).
//! The cluster's control plane runs the probes (`controlplane::health`) and publishes the
//! verdicts as endpoint health in the registry, so every cluster, `strait route explain` and
//! every sidecar (Envoy too) see them; one checker per cluster, not per sidecar.
//!
//! ```yaml
//! health_check: {protocol: tcp}                    # the file's default: every service
//! services:
//!   - name: echo
//!     ports: [{name: http, port: 8080, protocol: http}]
//!     health_check: {protocol: http, path: /healthz, expected_statuses: [200],
//!                    interval: 2s, timeout: 1s, healthy_threshold: 2, unhealthy_threshold: 3}
//! ```

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::model::{ClusterState, Health, ServiceKey};

/// Defaults (documented in docs/routing.md).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_HEALTHY_THRESHOLD: u32 = 2;
pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 3;
const MIN_INTERVAL: Duration = Duration::from_millis(100);
const MAX_INTERVAL: Duration = Duration::from_secs(3600);
const MAX_THRESHOLD: u32 = 100;

/// How an endpoint is probed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// A TCP connection is accepted.
    Tcp,
    /// `GET path` over HTTP/1.1 (`Host: SERVICE.NAMESPACE:PORT`) answers one of `statuses`
    /// (empty: 200–399, as Kubernetes' HTTP probes).
    Http { path: String, statuses: Vec<u16> },
    /// The gRPC health protocol (`grpc.health.v1.Health/Check` for `service`, empty for the
    /// server as a whole) answers `SERVING`.
    Grpc { service: String },
}

impl Probe {
    pub fn kind(&self) -> &'static str {
        match self {
            Probe::Tcp => "tcp",
            Probe::Http { .. } => "http",
            Probe::Grpc { .. } => "grpc",
        }
    }

    /// Whether an HTTP status passes.
    pub fn status_ok(&self, status: u16) -> bool {
        match self {
            Probe::Http { statuses, .. } if !statuses.is_empty() => statuses.contains(&status),
            _ => (200..400).contains(&status),
        }
    }
}

/// A service's active health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub probe: Probe,
    /// The port probed on each endpoint's address (default: the endpoint's own port).
    pub port: Option<u16>,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive passes that make an unhealthy endpoint healthy again.
    pub healthy_threshold: u32,
    /// Consecutive failures that make a healthy endpoint unhealthy.
    pub unhealthy_threshold: u32,
}

/// The `health_check` of a discovery file, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckSpec {
    /// `tcp`, `http`, `grpc`, or `none` (no checks: a service opting out of the file's default).
    protocol: String,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    expected_statuses: Vec<u16>,
    #[serde(default)]
    grpc_service: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    interval: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    healthy_threshold: Option<u32>,
    #[serde(default)]
    unhealthy_threshold: Option<u32>,
}

/// A `health_check` that breaks a rule: the field (relative to `health_check`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    pub field: &'static str,
    pub reason: String,
}

fn bad(field: &'static str, reason: impl Into<String>) -> SpecError {
    SpecError {
        field,
        reason: reason.into(),
    }
}

fn duration(
    field: &'static str,
    v: &Option<String>,
    default: Duration,
) -> Result<Duration, SpecError> {
    match v {
        None => Ok(default),
        Some(s) => humantime::parse_duration(s).map_err(|e| {
            bad(
                field,
                format!("`{s}` is not a duration (e.g. 500ms, 2s): {e}"),
            )
        }),
    }
}

impl HealthCheckSpec {
    /// Validate; `None` for `protocol: none`.
    pub fn build(&self) -> Result<Option<HealthCheck>, SpecError> {
        let probe = match self.protocol.as_str() {
            "none" => return Ok(None),
            "tcp" => Probe::Tcp,
            "http" => {
                let path = self.path.clone().unwrap_or_else(|| "/".to_string());
                if !path.starts_with('/') || path.chars().any(|c| c.is_ascii_control() || c == ' ')
                {
                    return Err(bad(
                        "path",
                        format!("`{path}` is not an absolute request path"),
                    ));
                }
                if let Some(s) = self
                    .expected_statuses
                    .iter()
                    .find(|s| !(100..=599).contains(*s))
                {
                    return Err(bad(
                        "expected_statuses",
                        format!("{s} is not an HTTP status (100–599)"),
                    ));
                }
                Probe::Http {
                    path,
                    statuses: self.expected_statuses.clone(),
                }
            }
            "grpc" => Probe::Grpc {
                service: self.grpc_service.clone().unwrap_or_default(),
            },
            other => {
                return Err(bad(
                    "protocol",
                    format!("`{other}` is not one of tcp, http, grpc, none"),
                ));
            }
        };
        if self.path.is_some() && !matches!(probe, Probe::Http { .. }) {
            return Err(bad("path", "only for protocol http"));
        }
        if !self.expected_statuses.is_empty() && !matches!(probe, Probe::Http { .. }) {
            return Err(bad("expected_statuses", "only for protocol http"));
        }
        if self.grpc_service.is_some() && !matches!(probe, Probe::Grpc { .. }) {
            return Err(bad("grpc_service", "only for protocol grpc"));
        }
        if self.port == Some(0) {
            return Err(bad("port", "port 0 is not a valid port"));
        }
        let interval = duration("interval", &self.interval, DEFAULT_INTERVAL)?;
        if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&interval) {
            return Err(bad(
                "interval",
                format!("{interval:?} is outside {MIN_INTERVAL:?}..={MAX_INTERVAL:?}"),
            ));
        }
        let timeout = duration("timeout", &self.timeout, DEFAULT_TIMEOUT.min(interval))?;
        if timeout.is_zero() || timeout > interval {
            return Err(bad(
                "timeout",
                format!("{timeout:?} must be above zero and at most the interval ({interval:?})"),
            ));
        }
        let threshold = |field, v: Option<u32>, default| {
            let v = v.unwrap_or(default);
            if (1..=MAX_THRESHOLD).contains(&v) {
                Ok(v)
            } else {
                Err(bad(field, format!("{v} is outside 1..={MAX_THRESHOLD}")))
            }
        };
        Ok(Some(HealthCheck {
            probe,
            port: self.port,
            interval,
            timeout,
            healthy_threshold: threshold(
                "healthy_threshold",
                self.healthy_threshold,
                DEFAULT_HEALTHY_THRESHOLD,
            )?,
            unhealthy_threshold: threshold(
                "unhealthy_threshold",
                self.unhealthy_threshold,
                DEFAULT_UNHEALTHY_THRESHOLD,
            )?,
        }))
    }
}

/// One endpoint's verdict from its probe results: the first result decides at once (a control
/// plane that restarts knows within one timeout, without flapping a dead endpoint back to
/// healthy for `unhealthy_threshold` intervals); afterwards `unhealthy_threshold` consecutive
/// failures make it unhealthy and `healthy_threshold` consecutive passes healthy again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tracker {
    passes: u32,
    failures: u32,
    verdict: Option<bool>,
}

impl Tracker {
    /// `Some(true)` healthy, `Some(false)` unhealthy, `None` before the first result.
    pub fn verdict(&self) -> Option<bool> {
        self.verdict
    }

    /// Record a result; `true` when the verdict changed.
    pub fn record(&mut self, pass: bool, check: &HealthCheck) -> bool {
        if pass {
            self.passes = self.passes.saturating_add(1);
            self.failures = 0;
        } else {
            self.failures = self.failures.saturating_add(1);
            self.passes = 0;
        }
        let next = match self.verdict {
            None => pass,
            Some(true) => self.failures < check.unhealthy_threshold,
            Some(false) => self.passes >= check.healthy_threshold,
        };
        let changed = self.verdict != Some(next);
        self.verdict = Some(next);
        changed
    }
}

/// `state` with the endpoints that failed their checks (by service and `ADDRESS:PORT`) marked
/// unhealthy. Endpoints the file marks draining or unhealthy keep that: an operator's word
/// comes before a probe's.
pub fn apply(state: &ClusterState, failed: &BTreeSet<(ServiceKey, SocketAddr)>) -> ClusterState {
    if failed.is_empty() {
        return state.clone();
    }
    let mut out = state.clone();
    for set in &mut out.services {
        let key = &set.service.key;
        for e in &mut set.endpoints {
            if e.health.is_serving() && failed.contains(&(key.clone(), e.socket_addr())) {
                e.health = Health::Unhealthy;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> Result<Option<HealthCheck>, SpecError> {
        let s: HealthCheckSpec = serde_saphyr::from_str(yaml).expect("yaml");
        s.build()
    }

    #[test]
    fn specs_build_with_documented_defaults_and_refuse_what_makes_no_sense() {
        let tcp = spec("{protocol: tcp}").expect("ok").expect("a check");
        assert_eq!(tcp.probe, Probe::Tcp);
        assert_eq!(tcp.interval, DEFAULT_INTERVAL);
        assert_eq!(tcp.timeout, DEFAULT_TIMEOUT);
        assert_eq!(
            (tcp.healthy_threshold, tcp.unhealthy_threshold),
            (DEFAULT_HEALTHY_THRESHOLD, DEFAULT_UNHEALTHY_THRESHOLD)
        );
        assert_eq!(spec("{protocol: none}").expect("ok"), None);
        let http = spec(
            "{protocol: http, path: /healthz, expected_statuses: [204], interval: 300ms, port: 9000}",
        )
        .expect("ok")
        .expect("a check");
        assert_eq!(http.port, Some(9000));
        // A timeout longer than a short interval is cut to the interval.
        assert_eq!(http.timeout, Duration::from_millis(300));
        assert!(http.probe.status_ok(204) && !http.probe.status_ok(200));
        let any = spec("{protocol: http}").expect("ok").expect("a check");
        assert!(any.probe.status_ok(200) && any.probe.status_ok(302) && !any.probe.status_ok(503));
        let grpc = spec("{protocol: grpc, grpc_service: echo}")
            .expect("ok")
            .expect("a check");
        assert_eq!(
            grpc.probe,
            Probe::Grpc {
                service: "echo".into()
            }
        );

        for (yaml, field, words) in [
            ("{protocol: udp}", "protocol", "not one of"),
            (
                "{protocol: tcp, path: /x}",
                "path",
                "only for protocol http",
            ),
            ("{protocol: http, path: healthz}", "path", "absolute"),
            (
                "{protocol: http, expected_statuses: [700]}",
                "expected_statuses",
                "700",
            ),
            (
                "{protocol: tcp, grpc_service: x}",
                "grpc_service",
                "only for protocol grpc",
            ),
            ("{protocol: tcp, interval: 10ms}", "interval", "outside"),
            (
                "{protocol: tcp, interval: soon}",
                "interval",
                "not a duration",
            ),
            (
                "{protocol: tcp, interval: 1s, timeout: 2s}",
                "timeout",
                "at most the interval",
            ),
            (
                "{protocol: tcp, unhealthy_threshold: 0}",
                "unhealthy_threshold",
                "outside",
            ),
            (
                "{protocol: tcp, healthy_threshold: 1000}",
                "healthy_threshold",
                "outside",
            ),
            ("{protocol: tcp, port: 0}", "port", "port 0"),
        ] {
            let e = spec(yaml).expect_err(yaml);
            assert_eq!(e.field, field, "{yaml}: {e:?}");
            assert!(e.reason.contains(words), "{yaml}: {e:?}");
        }
    }

    #[test]
    fn verdicts_follow_the_thresholds_and_the_first_result_decides() {
        let check = spec("{protocol: tcp, healthy_threshold: 2, unhealthy_threshold: 3}")
            .expect("ok")
            .expect("a check");
        let mut t = Tracker::default();
        assert_eq!(t.verdict(), None);
        // The first result decides at once.
        assert!(t.record(false, &check));
        assert_eq!(t.verdict(), Some(false));
        // One pass is not enough to come back; two are.
        assert!(!t.record(true, &check));
        assert!(!t.record(false, &check));
        assert!(!t.record(true, &check));
        assert!(t.record(true, &check));
        assert_eq!(t.verdict(), Some(true));
        // Two failures are tolerated; a pass resets the count; three in a row are not.
        assert!(!t.record(false, &check));
        assert!(!t.record(false, &check));
        assert!(!t.record(true, &check));
        assert!(!t.record(false, &check));
        assert!(!t.record(false, &check));
        assert!(t.record(false, &check));
        assert_eq!(t.verdict(), Some(false));
        let mut fresh = Tracker::default();
        assert!(fresh.record(true, &check));
        assert_eq!(fresh.verdict(), Some(true));
    }
}
