//! Clusters (CDS): load balancing, outlier detection, circuit-breaker thresholds, transport-socket
//! matches and upstream TLS.

use super::*;

/// How a cluster picks an endpoint within a locality.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbPolicy {
    RoundRobin,
    /// Power of `choices` random choices, the one with fewer active requests.
    LeastRequest {
        choices: u32,
    },
}

/// Outlier detection (Envoy's semantics; only the detectors Strait uses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierDetection {
    pub consecutive_5xx: u32,
    pub consecutive_gateway_failure: u32,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    /// Envoy's defaults.
    fn default() -> Self {
        Self {
            consecutive_5xx: 5,
            consecutive_gateway_failure: 5,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 10,
        }
    }
}

/// Circuit breaker thresholds (default priority; Envoy's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    /// Retries in flight at once (ignored when a retry budget is set, as in Envoy).
    pub max_retries: u32,
    pub retry_budget: Option<RetryBudget>,
}

/// Envoy's retry budget: retries in flight may be at most `percent` of the requests in flight,
/// but at least `min_concurrency`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryBudget {
    /// Hundredths of a percent (Envoy's default 20 % = 2000).
    pub percent_x100: u32,
    pub min_concurrency: u32,
}

impl Thresholds {
    /// Whether one more retry may start, with `requests` and `retries` in flight.
    pub fn retry_allowed(&self, requests: u64, retries: u64) -> bool {
        match self.retry_budget {
            None => retries < u64::from(self.max_retries),
            Some(b) => {
                let share = requests.saturating_mul(u64::from(b.percent_x100)) / 10_000;
                retries < share.max(u64::from(b.min_concurrency))
            }
        }
    }
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
            retry_budget: None,
        }
    }
}

/// A cluster (CDS): how to talk to its endpoints; the endpoints come from its assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    pub name: String,
    pub connect_timeout: Duration,
    pub lb: LbPolicy,
    /// Speak HTTP/2 (prior knowledge) to the endpoints.
    pub http2: bool,
    /// Its endpoints may be remote (reached through the local gateway).
    pub tunnel: bool,
    pub outlier: Option<OutlierDetection>,
    pub thresholds: Thresholds,
    /// Transport-socket matches (`transport_socket_matches`), in order: the first whose
    /// criteria an endpoint's socket-match metadata satisfies decides how it is reached.
    pub tls_matches: Vec<TlsMatch>,
}

/// One transport-socket match of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TlsMatch {
    pub name: String,
    /// Entries the endpoint's `envoy.transport_socket_match` metadata must all have.
    pub criteria: Vec<(String, String)>,
    /// Mutual TLS with the workload certificate, or `None`: plaintext (`raw_buffer`).
    pub tls: Option<UpstreamTls>,
}

impl TlsMatch {
    /// Whether an endpoint with these socket-match entries is this match's.
    pub fn matches(&self, endpoint: &[(String, String)]) -> bool {
        self.criteria.iter().all(|c| endpoint.contains(c))
    }
}

/// Mutual TLS to an endpoint's sidecar: the proxy's workload certificate, the federation CA,
/// and who the peer must be.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UpstreamTls {
    /// ALPN protocols offered (what the application behind the sidecar speaks).
    pub alpn: Vec<Vec<u8>>,
    /// The peer's URI SAN must match one of these (none: any workload of the federation).
    pub san: Vec<SanMatch>,
}

/// A URI SAN matcher (`match_typed_subject_alt_names`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SanMatch {
    Exact(String),
    Prefix(String),
    /// Validated at translation; RE2 syntax, matched against the whole SAN.
    Regex(String),
}

/// Translate `transport_socket_matches`.
fn tls_matches(ctx: &Ctx<'_>, c: &cluster::Cluster) -> Result<Vec<TlsMatch>, ConfigError> {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
    let mut out = Vec::with_capacity(c.transport_socket_matches.len());
    for (i, m) in c.transport_socket_matches.iter().enumerate() {
        let field = |f: &str| format!("transport_socket_matches[{i}].{f}");
        let mut criteria = Vec::new();
        for (k, v) in m.r#match.iter().flat_map(|s| s.fields.iter()) {
            match &v.kind {
                Some(Kind::StringValue(s)) => criteria.push((k.clone(), s.clone())),
                _ => {
                    return Err(ctx.err(field(&format!("match.{k}")), "only strings are supported"));
                }
            }
        }
        criteria.sort();
        let Some(ts) = &m.transport_socket else {
            return Err(ctx.err(field("transport_socket"), "missing"));
        };
        let typed = ts
            .config_type
            .as_ref()
            .map(|core::transport_socket::ConfigType::TypedConfig(a)| a);
        let upstream = match ts.name.as_str() {
            RAW_BUFFER => None,
            TLS_SOCKET => {
                let Some(any) = typed else {
                    return Err(ctx.err(field("transport_socket.typed_config"), "missing"));
                };
                if any.type_url != UPSTREAM_TLS_TYPE {
                    return Err(ctx.err(
                        field("transport_socket.typed_config"),
                        format!("{} is not {UPSTREAM_TLS_TYPE}", any.type_url),
                    ));
                }
                let u = tls::UpstreamTlsContext::decode(any.value.as_slice())
                    .map_err(|e| ctx.err(field("transport_socket.typed_config"), e.to_string()))?;
                let field = |f: &str| field(&format!("transport_socket.common_tls_context.{f}"));
                let common = u
                    .common_tls_context
                    .ok_or_else(|| ctx.err(field(""), "missing"))?;
                if let Some(p) = &common.tls_params
                    && p.tls_maximum_protocol_version != 0
                    && p.tls_maximum_protocol_version
                        < tls::tls_parameters::TlsProtocol::TlSv13 as i32
                {
                    return Err(ctx.err(
                        field("tls_params.tls_maximum_protocol_version"),
                        "Strait sidecars speak TLS 1.3 only",
                    ));
                }
                if !common.tls_certificates.is_empty() {
                    return Err(ctx.err(
                        field("tls_certificates"),
                        format!("inline certificates are not supported: the proxy presents its workload certificate (secret `{WORKLOAD_SECRET}`)"),
                    ));
                }
                let names: Vec<&str> = common
                    .tls_certificate_sds_secret_configs
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect();
                if names != [WORKLOAD_SECRET] {
                    return Err(ctx.err(
                        field("tls_certificate_sds_secret_configs"),
                        format!("must name the secret `{WORKLOAD_SECRET}` (the proxy's workload certificate), not {names:?}"),
                    ));
                }
                use tls::common_tls_context::ValidationContextType as V;
                let (ca, validation) = match common.validation_context_type {
                    Some(V::CombinedValidationContext(c)) => (
                        c.validation_context_sds_secret_config.map(|s| s.name),
                        c.default_validation_context,
                    ),
                    Some(V::ValidationContextSdsSecretConfig(s)) => (Some(s.name), None),
                    _ => (None, None),
                };
                if ca.as_deref() != Some(CA_SECRET) {
                    return Err(ctx.err(
                        field("validation_context_type"),
                        format!("must name the secret `{CA_SECRET}` (the federation CA)"),
                    ));
                }
                let mut san = Vec::new();
                for (j, m) in validation
                    .iter()
                    .flat_map(|v| &v.match_typed_subject_alt_names)
                    .enumerate()
                {
                    let field = |f: &str| {
                        field(&format!(
                            "combined_validation_context.default_validation_context.match_typed_subject_alt_names[{j}].{f}"
                        ))
                    };
                    if m.san_type != tls::subject_alt_name_matcher::SanType::Uri as i32 {
                        return Err(ctx.err(
                            field("san_type"),
                            "only URI SANs (SPIFFE ids) are supported",
                        ));
                    }
                    use matcher::string_matcher::MatchPattern as P;
                    let pattern = m.matcher.as_ref().and_then(|m| {
                        (!m.ignore_case)
                            .then_some(m.match_pattern.as_ref())
                            .flatten()
                    });
                    san.push(match pattern {
                        Some(P::Exact(e)) => SanMatch::Exact(e.clone()),
                        Some(P::Prefix(p)) => SanMatch::Prefix(p.clone()),
                        Some(P::SafeRegex(r)) => {
                            regex::Regex::new(&r.regex).map_err(|e| {
                                ctx.err(field("matcher.safe_regex"), format!("{:?}: {e}", r.regex))
                            })?;
                            SanMatch::Regex(r.regex.clone())
                        }
                        _ => {
                            return Err(ctx.err(
                                field("matcher"),
                                "only case-sensitive exact, prefix and safe_regex are supported",
                            ));
                        }
                    });
                }
                Some(UpstreamTls {
                    alpn: common
                        .alpn_protocols
                        .iter()
                        .map(|a| a.as_bytes().to_vec())
                        .collect(),
                    san,
                })
            }
            other => {
                return Err(ctx.err(
                    field("transport_socket"),
                    format!("{other} is not supported (tls, raw_buffer)"),
                ));
            }
        };
        out.push(TlsMatch {
            name: m.name.clone(),
            criteria,
            tls: upstream,
        });
    }
    Ok(out)
}

/// A CDS resource: a cluster of endpoints (EDS), or a passthrough cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterResource {
    Eds(ClusterConfig),
    /// `ORIGINAL_DST` with `CLUSTER_PROVIDED`: each connection goes to its own original
    /// destination (only a transparent listener can use it).
    OriginalDst(String),
}

/// Translate a CDS resource, passthrough clusters included.
pub fn cluster_resource(any: &Any) -> Result<ClusterResource, ConfigError> {
    use cluster::cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy as P};
    let c: cluster::Cluster = decode(any, CLUSTER_TYPE, "cluster")?;
    if !matches!(&c.cluster_discovery_type,
        Some(ClusterDiscoveryType::Type(t)) if *t == DiscoveryType::OriginalDst as i32)
    {
        return eds_cluster(c).map(ClusterResource::Eds);
    }
    let ctx = Ctx {
        kind: "cluster",
        name: &c.name,
    };
    if c.name.is_empty() {
        return Err(ctx.err("name", "empty"));
    }
    if c.lb_policy != P::ClusterProvided as i32 {
        return Err(ctx.err(
            "lb_policy",
            "an ORIGINAL_DST cluster needs CLUSTER_PROVIDED",
        ));
    }
    if c.load_assignment.is_some() || c.eds_cluster_config.is_some() {
        return Err(ctx.err(
            "load_assignment",
            "an ORIGINAL_DST cluster has no endpoints of its own",
        ));
    }
    Ok(ClusterResource::OriginalDst(c.name))
}

/// Translate a CDS resource of endpoints (EDS).
pub fn cluster(any: &Any) -> Result<ClusterConfig, ConfigError> {
    eds_cluster(decode(any, CLUSTER_TYPE, "cluster")?)
}

fn eds_cluster(c: cluster::Cluster) -> Result<ClusterConfig, ConfigError> {
    let ctx = Ctx {
        kind: "cluster",
        name: &c.name,
    };
    if c.name.is_empty() {
        return Err(ctx.err("name", "empty"));
    }
    use cluster::cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy as P};
    match &c.cluster_discovery_type {
        Some(ClusterDiscoveryType::Type(t)) if *t == DiscoveryType::Eds as i32 => {}
        None => return Err(ctx.err("type", "missing: only EDS clusters are supported")),
        Some(_) => {
            return Err(ctx.err(
                "type",
                "only EDS clusters (and ORIGINAL_DST passthrough clusters) are supported",
            ));
        }
    }
    if let Some(eds) = &c.eds_cluster_config
        && !eds.service_name.is_empty()
        && eds.service_name != c.name
    {
        return Err(ctx.err(
            "eds_cluster_config.service_name",
            "must be empty or the cluster's name",
        ));
    }
    let lb = match P::try_from(c.lb_policy) {
        Ok(P::RoundRobin) => LbPolicy::RoundRobin,
        Ok(P::LeastRequest) => {
            let choices = match &c.lb_config {
                Some(cluster::cluster::LbConfig::LeastRequestLbConfig(l)) => {
                    l.choice_count.as_ref().map_or(2, |v| v.value)
                }
                _ => 2,
            };
            if choices < 2 {
                return Err(ctx.err("least_request_lb_config.choice_count", "must be ≥ 2"));
            }
            LbPolicy::LeastRequest { choices }
        }
        Ok(other) => {
            return Err(ctx.err(
                "lb_policy",
                format!(
                    "{} is not supported (ROUND_ROBIN, LEAST_REQUEST)",
                    other.as_str_name()
                ),
            ));
        }
        Err(_) => return Err(ctx.err("lb_policy", format!("unknown value {}", c.lb_policy))),
    };
    let connect_timeout = opt_duration(&ctx, "connect_timeout", c.connect_timeout.as_ref())?
        .unwrap_or(Duration::from_secs(5));
    if connect_timeout.is_zero() {
        return Err(ctx.err("connect_timeout", "must be positive"));
    }
    let mut http2 = false;
    if let Some(opts) = c.typed_extension_protocol_options.get(HTTP_OPTIONS_KEY) {
        let o = HttpProtocolOptions::decode(opts.value.as_slice()).map_err(|e| {
            ctx.err(
                format!("typed_extension_protocol_options[{HTTP_OPTIONS_KEY}]"),
                e.to_string(),
            )
        })?;
        if let Some(http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(e)) =
            &o.upstream_protocol_options
        {
            http2 = matches!(
                e.protocol_config,
                Some(
                    http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                        _
                    )
                )
            );
        }
    }
    let tunnel = match &c.transport_socket {
        None => false,
        Some(ts) if ts.name == INTERNAL_UPSTREAM => true,
        Some(ts) if ts.name == "envoy.transport_sockets.raw_buffer" => false,
        Some(ts) => {
            return Err(ctx.err(
                "transport_socket",
                format!(
                    "{} is not supported (internal_upstream, raw_buffer)",
                    ts.name
                ),
            ));
        }
    };
    let outlier = match &c.outlier_detection {
        None => None,
        Some(o) => {
            let d = OutlierDetection::default();
            let pct = o
                .max_ejection_percent
                .as_ref()
                .map_or(d.max_ejection_percent, |v| v.value);
            if pct > 100 {
                return Err(ctx.err("outlier_detection.max_ejection_percent", "over 100"));
            }
            Some(OutlierDetection {
                consecutive_5xx: o
                    .consecutive_5xx
                    .as_ref()
                    .map_or(d.consecutive_5xx, |v| v.value),
                consecutive_gateway_failure: o
                    .consecutive_gateway_failure
                    .as_ref()
                    .map_or(d.consecutive_gateway_failure, |v| v.value),
                interval: opt_duration(&ctx, "outlier_detection.interval", o.interval.as_ref())?
                    .unwrap_or(d.interval),
                base_ejection_time: opt_duration(
                    &ctx,
                    "outlier_detection.base_ejection_time",
                    o.base_ejection_time.as_ref(),
                )?
                .unwrap_or(d.base_ejection_time),
                max_ejection_percent: pct,
            })
        }
    };
    let mut thresholds = Thresholds::default();
    if let Some(cb) = &c.circuit_breakers
        && let Some(t) = cb
            .thresholds
            .iter()
            .find(|t| t.priority == core::RoutingPriority::Default as i32)
    {
        let d = Thresholds::default();
        thresholds = Thresholds {
            max_connections: t
                .max_connections
                .as_ref()
                .map_or(d.max_connections, |v| v.value),
            max_pending_requests: t
                .max_pending_requests
                .as_ref()
                .map_or(d.max_pending_requests, |v| v.value),
            max_requests: t.max_requests.as_ref().map_or(d.max_requests, |v| v.value),
            max_retries: t.max_retries.as_ref().map_or(d.max_retries, |v| v.value),
            retry_budget: match &t.retry_budget {
                None => None,
                Some(b) => {
                    let pct = b.budget_percent.as_ref().map_or(20.0, |p| p.value);
                    if !(0.0..=100.0).contains(&pct) {
                        return Err(ctx.err(
                            "circuit_breakers.thresholds.retry_budget.budget_percent",
                            format!("{pct} is not within 0..=100"),
                        ));
                    }
                    Some(RetryBudget {
                        percent_x100: (pct * 100.0).round() as u32,
                        min_concurrency: b.min_retry_concurrency.as_ref().map_or(3, |v| v.value),
                    })
                }
            },
        };
    }
    let tls_matches = tls_matches(&ctx, &c)?;
    Ok(ClusterConfig {
        name: c.name.clone(),
        connect_timeout,
        lb,
        http2,
        tunnel,
        outlier,
        thresholds,
        tls_matches,
    })
}
