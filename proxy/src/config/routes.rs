//! Routes (RDS, or inline in a listener): virtual hosts, path and header matches, weighted
//! targets, timeouts and retry policies.

use super::*;

/// How a route matches the path.
#[derive(Debug, Clone)]
pub enum PathMatch {
    Prefix(String),
    Exact(String),
    Regex(regex::Regex),
}

impl PartialEq for PathMatch {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Prefix(a), Self::Prefix(b)) | (Self::Exact(a), Self::Exact(b)) => a == b,
            (Self::Regex(a), Self::Regex(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
pub enum HeaderValueMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Present(bool),
    Regex(regex::Regex),
}

#[derive(Debug, Clone)]
pub struct HeaderMatch {
    pub name: http::HeaderName,
    pub value: HeaderValueMatch,
    pub invert: bool,
}

impl HeaderMatch {
    pub fn matches(&self, headers: &http::HeaderMap) -> bool {
        let v = headers.get(&self.name).and_then(|v| v.to_str().ok());
        let hit = match (&self.value, v) {
            (HeaderValueMatch::Present(p), v) => v.is_some() == *p,
            (_, None) => false,
            (HeaderValueMatch::Exact(e), Some(v)) => v == e,
            (HeaderValueMatch::Prefix(e), Some(v)) => v.starts_with(e.as_str()),
            (HeaderValueMatch::Suffix(e), Some(v)) => v.ends_with(e.as_str()),
            (HeaderValueMatch::Regex(r), Some(v)) => full_match(r, v),
        };
        hit != self.invert
    }
}

fn full_match(r: &regex::Regex, v: &str) -> bool {
    r.find(v)
        .is_some_and(|m| m.start() == 0 && m.end() == v.len())
}

/// What a route does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteTarget {
    Cluster(String),
    /// Clusters with weights (summing to `total`).
    Weighted {
        clusters: Vec<(String, u32)>,
        total: u32,
    },
}

/// Conditions under which a request is retried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryOn {
    pub connect_failure: bool,
    pub reset: bool,
    pub refused_stream: bool,
    pub server_error: bool,
    pub gateway_error: bool,
    pub retriable_status_codes: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub on: RetryOn,
    pub num_retries: u32,
    pub per_try_timeout: Option<Duration>,
    pub retriable_status_codes: Vec<u16>,
    /// Prefer a host not tried yet.
    pub other_host: bool,
    /// Prefer a priority not tried yet.
    pub other_priority: bool,
}

#[derive(Debug, Clone)]
pub struct RouteEntry {
    pub path: PathMatch,
    pub headers: Vec<HeaderMatch>,
    pub target: RouteTarget,
    /// The whole request's deadline (`None`: none).
    pub timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
    /// Responses of known length up to this many bytes to idempotent requests are held until
    /// complete while a retry is possible (0: never; route metadata `strait.response_buffer`,
    /// default [`crate::stack::retry::RESPONSE_BUFFER`]).
    pub response_buffer: u64,
    /// Every request on this route is idempotent, whatever its method (`strait.idempotent`).
    pub idempotent: bool,
}

impl RouteEntry {
    /// Whether a request with `path` (with any query) and `headers` takes this route.
    pub fn matches(&self, path: &str, headers: &http::HeaderMap) -> bool {
        let bare = path.split_once('?').map_or(path, |(p, _)| p);
        let path_ok = match &self.path {
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            PathMatch::Exact(p) => bare == p,
            PathMatch::Regex(r) => full_match(r, bare),
        };
        path_ok && self.headers.iter().all(|h| h.matches(headers))
    }
}

#[derive(Debug, Clone)]
pub struct VirtualHost {
    pub name: String,
    pub domains: Vec<String>,
    pub routes: Vec<Arc<RouteEntry>>,
}

/// A route configuration (RDS, or inline in a listener).
#[derive(Debug, Clone)]
pub struct RouteTable {
    pub name: String,
    pub virtual_hosts: Vec<VirtualHost>,
}

impl RouteTable {
    /// The virtual host for `host`, with Envoy's precedence: an exact domain, then the longest
    /// `*.suffix`, then the longest `prefix.*`, then `*`. Case-insensitive.
    pub fn virtual_host(&self, host: &str) -> Option<&VirtualHost> {
        let host = host.to_ascii_lowercase();
        let mut best: Option<(u8, usize, &VirtualHost)> = None;
        for vh in &self.virtual_hosts {
            for d in &vh.domains {
                let rank = if *d == host {
                    Some((4, d.len()))
                } else if d == "*" {
                    Some((1, 0))
                } else if let Some(suffix) = d.strip_prefix('*') {
                    (host.len() > suffix.len() && host.ends_with(suffix)).then_some((3, d.len()))
                } else if let Some(prefix) = d.strip_suffix('*') {
                    (host.len() > prefix.len() && host.starts_with(prefix)).then_some((2, d.len()))
                } else {
                    None
                };
                if let Some((r, len)) = rank
                    && best.is_none_or(|(br, bl, _)| (r, len) > (br, bl))
                {
                    best = Some((r, len, vh));
                }
            }
        }
        best.map(|(_, _, vh)| vh)
    }

    /// The route for a request, if any.
    pub fn route(
        &self,
        host: &str,
        path: &str,
        headers: &http::HeaderMap,
    ) -> Option<&Arc<RouteEntry>> {
        self.virtual_host(host)?
            .routes
            .iter()
            .find(|r| r.matches(path, headers))
    }

    /// Every cluster a route of this table may send to.
    pub fn clusters(&self) -> impl Iterator<Item = &str> {
        self.virtual_hosts
            .iter()
            .flat_map(|vh| &vh.routes)
            .flat_map(|r| match &r.target {
                RouteTarget::Cluster(c) => vec![c.as_str()],
                RouteTarget::Weighted { clusters, .. } => {
                    clusters.iter().map(|(c, _)| c.as_str()).collect()
                }
            })
    }
}

/// The largest `strait.response_buffer` accepted.
const MAX_RESPONSE_BUFFER: f64 = (16 << 20) as f64;

/// A route's `strait` metadata: its response buffer and whether it is idempotent.
fn route_metadata(
    ctx: &Ctx<'_>,
    rfield: &str,
    r: &route::Route,
) -> Result<(u64, bool), ConfigError> {
    use federation::xds_contract::{ROUTE_IDEMPOTENT, ROUTE_RESPONSE_BUFFER};
    let mut out = (crate::stack::retry::RESPONSE_BUFFER, false);
    let Some(meta) = r
        .metadata
        .as_ref()
        .and_then(|m| m.filter_metadata.get(TUNNEL_NAMESPACE))
    else {
        return Ok(out);
    };
    let field = |k: &str| format!("{rfield}.metadata.filter_metadata.{TUNNEL_NAMESPACE}.{k}");
    if let Some(v) = meta.fields.get(ROUTE_RESPONSE_BUFFER) {
        out.0 = match &v.kind {
            Some(Kind::NumberValue(n))
                if n.is_finite() && *n >= 0.0 && *n <= MAX_RESPONSE_BUFFER && n.fract() == 0.0 =>
            {
                *n as u64
            }
            _ => {
                return Err(ctx.err(
                    field(ROUTE_RESPONSE_BUFFER),
                    "must be a whole number of bytes from 0 to 16 MiB",
                ));
            }
        };
    }
    if let Some(v) = meta.fields.get(ROUTE_IDEMPOTENT) {
        out.1 = match &v.kind {
            Some(Kind::BoolValue(b)) => *b,
            _ => return Err(ctx.err(field(ROUTE_IDEMPOTENT), "must be true or false")),
        };
    }
    Ok(out)
}

fn regex(
    ctx: &Ctx<'_>,
    field: &str,
    m: &matcher::RegexMatcher,
) -> Result<regex::Regex, ConfigError> {
    regex::RegexBuilder::new(&m.regex)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| ctx.err(field, format!("invalid regex: {e}")))
}

fn retry_policy(
    ctx: &Ctx<'_>,
    field: &str,
    p: &route::RetryPolicy,
) -> Result<RetryPolicy, ConfigError> {
    let mut on = RetryOn::default();
    for cond in p
        .retry_on
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
    {
        match cond {
            "connect-failure" => on.connect_failure = true,
            "reset" | "reset-before-request" => on.reset = true,
            "refused-stream" => on.refused_stream = true,
            "5xx" => on.server_error = true,
            "gateway-error" => on.gateway_error = true,
            "retriable-status-codes" => on.retriable_status_codes = true,
            other => {
                return Err(ctx.err(
                    format!("{field}.retry_on"),
                    format!("{other:?} is not supported (connect-failure, reset, refused-stream, 5xx, gateway-error, retriable-status-codes)"),
                ));
            }
        }
    }
    let mut codes = Vec::new();
    for c in &p.retriable_status_codes {
        let c = u16::try_from(*c)
            .ok()
            .filter(|c| (100..=599).contains(c))
            .ok_or_else(|| {
                ctx.err(
                    format!("{field}.retriable_status_codes"),
                    format!("{c} is not an HTTP status"),
                )
            })?;
        codes.push(c);
    }
    let mut other_host = false;
    for (i, h) in p.retry_host_predicate.iter().enumerate() {
        if h.name == "envoy.retry_host_predicates.previous_hosts" {
            other_host = true;
        } else {
            return Err(ctx.err(
                format!("{field}.retry_host_predicate[{i}]"),
                format!("{} is not supported", h.name),
            ));
        }
    }
    let other_priority = match &p.retry_priority {
        None => false,
        Some(rp) if rp.name == "envoy.retry_priorities.previous_priorities" => true,
        Some(rp) => {
            return Err(ctx.err(
                format!("{field}.retry_priority"),
                format!("{} is not supported", rp.name),
            ));
        }
    };
    Ok(RetryPolicy {
        on,
        num_retries: p.num_retries.as_ref().map_or(1, |v| v.value),
        per_try_timeout: opt_duration(
            ctx,
            &format!("{field}.per_try_timeout"),
            p.per_try_timeout.as_ref(),
        )?,
        retriable_status_codes: codes,
        other_host,
        other_priority,
    })
}

pub(super) fn route_table_from(
    rc: &route::RouteConfiguration,
    kind: &'static str,
) -> Result<RouteTable, ConfigError> {
    let ctx = Ctx {
        kind,
        name: &rc.name,
    };
    let mut vhs = Vec::with_capacity(rc.virtual_hosts.len());
    let mut seen = std::collections::HashSet::new();
    for (i, vh) in rc.virtual_hosts.iter().enumerate() {
        let vfield = format!("virtual_hosts[{i}]");
        if vh.domains.is_empty() {
            return Err(ctx.err(format!("{vfield}.domains"), "empty"));
        }
        let mut domains = Vec::with_capacity(vh.domains.len());
        for d in &vh.domains {
            let d = d.to_ascii_lowercase();
            if !seen.insert(d.clone()) {
                return Err(ctx.err(
                    format!("{vfield}.domains"),
                    format!("{d:?} appears twice in the route configuration"),
                ));
            }
            domains.push(d);
        }
        let vh_retry = vh
            .retry_policy
            .as_ref()
            .map(|p| retry_policy(&ctx, &format!("{vfield}.retry_policy"), p))
            .transpose()?;
        let mut routes = Vec::with_capacity(vh.routes.len());
        for (j, r) in vh.routes.iter().enumerate() {
            let rfield = format!("{vfield}.routes[{j}]");
            let m = r
                .r#match
                .as_ref()
                .ok_or_else(|| ctx.err(format!("{rfield}.match"), "missing"))?;
            use route::route_match::PathSpecifier as PS;
            let path = match &m.path_specifier {
                Some(PS::Prefix(p)) => PathMatch::Prefix(p.clone()),
                Some(PS::Path(p)) => PathMatch::Exact(p.clone()),
                Some(PS::SafeRegex(re)) => {
                    PathMatch::Regex(regex(&ctx, &format!("{rfield}.match.safe_regex"), re)?)
                }
                None => return Err(ctx.err(format!("{rfield}.match"), "no path specifier")),
                Some(_) => {
                    return Err(ctx.err(
                        format!("{rfield}.match"),
                        "only prefix, path and safe_regex are supported",
                    ));
                }
            };
            if m.case_sensitive.as_ref().is_some_and(|v| !v.value) {
                return Err(ctx.err(
                    format!("{rfield}.match.case_sensitive"),
                    "case-insensitive matching is not supported",
                ));
            }
            if !m.query_parameters.is_empty() {
                return Err(ctx.err(format!("{rfield}.match.query_parameters"), "not supported"));
            }
            let mut headers = Vec::with_capacity(m.headers.len());
            for (k, h) in m.headers.iter().enumerate() {
                let hfield = format!("{rfield}.match.headers[{k}]");
                let name = http::HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| {
                    ctx.err(
                        format!("{hfield}.name"),
                        format!("{:?} is not a header name", h.name),
                    )
                })?;
                use route::header_matcher::HeaderMatchSpecifier as H;
                // The deprecated direct matchers are still what many control planes send.
                #[allow(deprecated)]
                let value = match &h.header_match_specifier {
                    None => HeaderValueMatch::Present(true),
                    Some(H::PresentMatch(p)) => HeaderValueMatch::Present(*p),
                    Some(H::ExactMatch(e)) => HeaderValueMatch::Exact(e.clone()),
                    Some(H::PrefixMatch(e)) => HeaderValueMatch::Prefix(e.clone()),
                    Some(H::SuffixMatch(e)) => HeaderValueMatch::Suffix(e.clone()),
                    Some(H::SafeRegexMatch(re)) => HeaderValueMatch::Regex(regex(
                        &ctx,
                        &format!("{hfield}.safe_regex_match"),
                        re,
                    )?),
                    Some(H::StringMatch(sm)) => {
                        if sm.ignore_case {
                            return Err(ctx.err(
                                format!("{hfield}.string_match.ignore_case"),
                                "not supported",
                            ));
                        }
                        use matcher::string_matcher::MatchPattern as MP;
                        match &sm.match_pattern {
                            Some(MP::Exact(e)) => HeaderValueMatch::Exact(e.clone()),
                            Some(MP::Prefix(e)) => HeaderValueMatch::Prefix(e.clone()),
                            Some(MP::Suffix(e)) => HeaderValueMatch::Suffix(e.clone()),
                            Some(MP::SafeRegex(re)) => HeaderValueMatch::Regex(regex(
                                &ctx,
                                &format!("{hfield}.string_match.safe_regex"),
                                re,
                            )?),
                            _ => {
                                return Err(ctx.err(
                                    format!("{hfield}.string_match"),
                                    "only exact, prefix, suffix and safe_regex are supported",
                                ));
                            }
                        }
                    }
                    Some(_) => return Err(ctx.err(hfield, "this header matcher is not supported")),
                };
                headers.push(HeaderMatch {
                    name,
                    value,
                    invert: h.invert_match,
                });
            }
            use route::route::Action;
            let Some(Action::Route(a)) = &r.action else {
                return Err(ctx.err(
                    format!("{rfield}.action"),
                    "only `route` actions are supported",
                ));
            };
            use route::route_action::ClusterSpecifier as CS;
            let target = match &a.cluster_specifier {
                Some(CS::Cluster(c)) if !c.is_empty() => RouteTarget::Cluster(c.clone()),
                Some(CS::WeightedClusters(w)) => {
                    let mut clusters = Vec::new();
                    for (k, c) in w.clusters.iter().enumerate() {
                        let weight = c.weight.as_ref().map_or(0, |v| v.value);
                        if c.name.is_empty() {
                            return Err(ctx.err(
                                format!("{rfield}.route.weighted_clusters.clusters[{k}].name"),
                                "empty",
                            ));
                        }
                        if weight > 0 {
                            clusters.push((c.name.clone(), weight));
                        }
                    }
                    let total: u32 = clusters.iter().map(|(_, w)| *w).sum();
                    if total == 0 {
                        return Err(ctx.err(
                            format!("{rfield}.route.weighted_clusters"),
                            "no cluster with a positive weight",
                        ));
                    }
                    RouteTarget::Weighted { clusters, total }
                }
                _ => {
                    return Err(ctx.err(
                        format!("{rfield}.route"),
                        "needs `cluster` or `weighted_clusters`",
                    ));
                }
            };
            // Envoy's default route timeout is 15 s; an explicit 0 disables it.
            let timeout =
                match opt_duration(&ctx, &format!("{rfield}.route.timeout"), a.timeout.as_ref())? {
                    None => Some(Duration::from_secs(15)),
                    Some(d) if d.is_zero() => None,
                    Some(d) => Some(d),
                };
            let retry = match &a.retry_policy {
                Some(p) => Some(retry_policy(
                    &ctx,
                    &format!("{rfield}.route.retry_policy"),
                    p,
                )?),
                None => vh_retry.clone(),
            };
            let (response_buffer, idempotent) = route_metadata(&ctx, &rfield, r)?;
            routes.push(Arc::new(RouteEntry {
                path,
                headers,
                target,
                timeout,
                retry,
                response_buffer,
                idempotent,
            }));
        }
        vhs.push(VirtualHost {
            name: vh.name.clone(),
            domains,
            routes,
        });
    }
    Ok(RouteTable {
        name: rc.name.clone(),
        virtual_hosts: vhs,
    })
}

/// Translate an RDS resource.
pub fn route_table(any: &Any) -> Result<RouteTable, ConfigError> {
    let rc: route::RouteConfiguration = decode(any, ROUTES_TYPE, "route configuration")?;
    if rc.name.is_empty() {
        return Err(Ctx {
            kind: "route configuration",
            name: "",
        }
        .err("name", "empty"));
    }
    route_table_from(&rc, "route configuration")
}
