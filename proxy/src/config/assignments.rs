//! Load assignments (EDS): endpoints by priority and locality, reached directly or through the
//! gateway.

use super::*;

/// Where an endpoint is reached.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Upstream {
    Direct(SocketAddr),
    /// Through the local gateway: HTTP/2 CONNECT with this authority, `strait-cluster` and,
    /// when the control plane named it, `strait-endpoint` (the endpoint's own address in its
    /// cluster, where the remote gateway connects; without it the remote gateway chooses).
    Tunnel {
        cluster: String,
        authority: String,
        endpoint: Option<SocketAddr>,
    },
}

/// An endpoint's health as the control plane sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointHealth {
    Healthy,
    Degraded,
    Unhealthy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointConfig {
    pub upstream: Upstream,
    pub health: EndpointHealth,
    pub weight: u32,
    /// Its `envoy.transport_socket_match` metadata (sorted), which selects the cluster's
    /// transport-socket match.
    pub socket_match: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalityConfig {
    pub region: String,
    pub zone: String,
    pub subzone: String,
    pub weight: u32,
    pub endpoints: Vec<EndpointConfig>,
}

/// A cluster's endpoints (EDS), by priority level (dense from 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub cluster: String,
    pub priorities: Vec<Vec<LocalityConfig>>,
    /// Percent (Envoy's default 140).
    pub overprovisioning: u32,
}

/// Translate an EDS resource.
pub fn assignment(any: &Any) -> Result<Assignment, ConfigError> {
    let cla: endpoint::ClusterLoadAssignment = decode(any, ASSIGNMENT_TYPE, "load assignment")?;
    let ctx = Ctx {
        kind: "load assignment",
        name: &cla.cluster_name,
    };
    if cla.cluster_name.is_empty() {
        return Err(ctx.err("cluster_name", "empty"));
    }
    let mut priorities: Vec<Vec<LocalityConfig>> = Vec::new();
    for (i, l) in cla.endpoints.iter().enumerate() {
        let field = |f: &str| format!("endpoints[{i}].{f}");
        let p = l.priority as usize;
        if p > 128 {
            return Err(ctx.err(field("priority"), "over 128"));
        }
        let loc = l.locality.clone().unwrap_or_default();
        let mut endpoints = Vec::with_capacity(l.lb_endpoints.len());
        for (j, e) in l.lb_endpoints.iter().enumerate() {
            let field = |f: &str| format!("endpoints[{i}].lb_endpoints[{j}].{f}");
            let Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier
            else {
                return Err(ctx.err(
                    field("endpoint"),
                    "missing (named endpoints are not supported)",
                ));
            };
            let addr = ep
                .address
                .as_ref()
                .and_then(|a| a.address.as_ref())
                .ok_or_else(|| ctx.err(field("endpoint.address"), "missing"))?;
            let upstream = match addr {
                core::address::Address::SocketAddress(sa) => {
                    let ip: IpAddr = sa.address.parse().map_err(|_| {
                        ctx.err(
                            field("endpoint.address.socket_address.address"),
                            format!("{:?} is not an IP address", sa.address),
                        )
                    })?;
                    let port = match sa.port_specifier {
                        Some(core::socket_address::PortSpecifier::PortValue(p))
                            if (1..=65535).contains(&p) =>
                        {
                            p as u16
                        }
                        _ => {
                            return Err(ctx.err(
                                field("endpoint.address.socket_address.port_value"),
                                "missing or out of range",
                            ));
                        }
                    };
                    Upstream::Direct(SocketAddr::new(ip, port))
                }
                core::address::Address::EnvoyInternalAddress(_) => {
                    let meta = e
                        .metadata
                        .as_ref()
                        .and_then(|m| m.filter_metadata.get(TUNNEL_NAMESPACE));
                    let get = |k: &str| {
                        meta.and_then(|s| s.fields.get(k))
                            .and_then(|v| match &v.kind {
                                Some(Kind::StringValue(s)) if !s.is_empty() => Some(s.clone()),
                                _ => None,
                            })
                    };
                    let (Some(cluster), Some(authority)) =
                        (get(TUNNEL_CLUSTER), get(TUNNEL_AUTHORITY))
                    else {
                        return Err(ctx.err(
                            field(&format!("metadata.filter_metadata.{TUNNEL_NAMESPACE}")),
                            format!(
                                "an internal address needs `{TUNNEL_CLUSTER}` and `{TUNNEL_AUTHORITY}`"
                            ),
                        ));
                    };
                    let endpoint = match get(TUNNEL_ENDPOINT) {
                        None => None,
                        Some(e) => Some(e.parse::<SocketAddr>().map_err(|_| {
                            ctx.err(
                                field(&format!(
                                    "metadata.filter_metadata.{TUNNEL_NAMESPACE}.{TUNNEL_ENDPOINT}"
                                )),
                                format!("{e:?} is not ADDRESS:PORT"),
                            )
                        })?),
                    };
                    Upstream::Tunnel {
                        cluster,
                        authority,
                        endpoint,
                    }
                }
                core::address::Address::Pipe(_) => {
                    return Err(ctx.err(field("endpoint.address"), "pipes are not supported"));
                }
            };
            let health = match core::HealthStatus::try_from(e.health_status) {
                Ok(core::HealthStatus::Unknown | core::HealthStatus::Healthy) => {
                    EndpointHealth::Healthy
                }
                Ok(core::HealthStatus::Degraded) => EndpointHealth::Degraded,
                Ok(_) => EndpointHealth::Unhealthy,
                Err(_) => {
                    return Err(ctx.err(
                        field("health_status"),
                        format!("unknown value {}", e.health_status),
                    ));
                }
            };
            let weight = e.load_balancing_weight.as_ref().map_or(1, |w| w.value);
            if weight == 0 {
                return Err(ctx.err(field("load_balancing_weight"), "must be ≥ 1"));
            }
            let mut socket_match = Vec::new();
            if let Some(m) = e
                .metadata
                .as_ref()
                .and_then(|m| m.filter_metadata.get(SOCKET_MATCH_NAMESPACE))
            {
                for (k, v) in &m.fields {
                    match &v.kind {
                        Some(Kind::StringValue(s)) => socket_match.push((k.clone(), s.clone())),
                        _ => {
                            return Err(ctx.err(
                                field(&format!(
                                    "metadata.filter_metadata.{SOCKET_MATCH_NAMESPACE}.{k}"
                                )),
                                "only strings are supported",
                            ));
                        }
                    }
                }
                socket_match.sort();
            }
            endpoints.push(EndpointConfig {
                upstream,
                health,
                weight,
                socket_match,
            });
        }
        let weight = l.load_balancing_weight.as_ref().map_or(1, |w| w.value);
        if priorities.len() <= p {
            priorities.resize_with(p + 1, Vec::new);
        }
        priorities[p].push(LocalityConfig {
            region: loc.region,
            zone: loc.zone,
            subzone: loc.sub_zone,
            weight,
            endpoints,
        });
    }
    if let Some(i) = priorities.iter().position(Vec::is_empty) {
        return Err(ctx.err(
            "endpoints",
            format!("priority {i} is empty while a higher one is not (levels must be dense)"),
        ));
    }
    let overprovisioning = cla
        .policy
        .as_ref()
        .and_then(|p| p.overprovisioning_factor.as_ref())
        .map_or(140, |v| v.value);
    if overprovisioning < 100 {
        return Err(ctx.err("policy.overprovisioning_factor", "below 100"));
    }
    Ok(Assignment {
        cluster: cla.cluster_name.clone(),
        priorities,
        overprovisioning,
    })
}
