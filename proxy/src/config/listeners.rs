//! Listeners (LDS): HTTP, TCP and transparent.

use super::*;

/// Where an HTTP listener's routes come from.
#[derive(Debug, Clone)]
pub enum RouteSource {
    /// A route configuration sent over RDS.
    Rds(String),
    Inline(RouteTable),
}

#[derive(Debug, Clone)]
pub enum ListenerKind {
    /// HTTP (1.1 and h2c), routed by host, path and headers.
    Http { routes: RouteSource },
    /// Raw TCP to one cluster; a connection with no bytes either way for `idle_timeout` is
    /// closed (Envoy's default 1 h; `None`: never).
    Tcp {
        cluster: String,
        idle_timeout: Option<Duration>,
    },
    /// Transparent mode (`use_original_dst`): connections an iptables `REDIRECT` sent here,
    /// handled by their original destination (see [`crate::transparent`]); what no other
    /// listener takes goes to `fallback` — an `ORIGINAL_DST` cluster passes it through
    /// unchanged (Istio's `PassthroughCluster`), an EDS cluster gets it like a TCP listener.
    Transparent { fallback: String },
}

/// Envoy's default TCP proxy idle timeout.
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub name: String,
    pub address: SocketAddr,
    pub kind: ListenerKind,
}

/// Translate an LDS resource. `Ok(None)`: a listener this proxy has nothing to do with (an
/// `api_listener` for proxyless gRPC clients), accepted and ignored.
pub fn listener(any: &Any) -> Result<Option<ListenerConfig>, ConfigError> {
    let l: listener::Listener = decode(any, LISTENER_TYPE, "listener")?;
    let ctx = Ctx {
        kind: "listener",
        name: &l.name,
    };
    if l.name.is_empty() {
        return Err(ctx.err("name", "empty"));
    }
    if l.api_listener.is_some() {
        return Ok(None);
    }
    let address = match l.address.as_ref().and_then(|a| a.address.as_ref()) {
        Some(core::address::Address::SocketAddress(sa)) => {
            let ip: IpAddr = sa.address.parse().map_err(|_| {
                ctx.err(
                    "address.socket_address.address",
                    format!("{:?} is not an IP address", sa.address),
                )
            })?;
            let port = match sa.port_specifier {
                Some(core::socket_address::PortSpecifier::PortValue(p)) if p <= 65535 => p as u16,
                _ => {
                    return Err(ctx.err(
                        "address.socket_address.port_value",
                        "missing or out of range",
                    ));
                }
            };
            SocketAddr::new(ip, port)
        }
        _ => return Err(ctx.err("address", "a socket address is required")),
    };
    let [chain] = l.filter_chains.as_slice() else {
        return Err(ctx.err(
            "filter_chains",
            format!(
                "exactly one filter chain is supported, got {}",
                l.filter_chains.len()
            ),
        ));
    };
    if chain.filter_chain_match.is_some() {
        return Err(ctx.err("filter_chains[0].filter_chain_match", "not supported"));
    }
    let transparent = l.use_original_dst.as_ref().is_some_and(|b| b.value);
    for (i, f) in l.listener_filters.iter().enumerate() {
        // The original destination is read from the socket (`SO_ORIGINAL_DST`) whenever the
        // listener is transparent: Envoy's `original_dst` listener filter is what asks for
        // it there, and nothing else is supported.
        if !(transparent && f.name == ORIGINAL_DST_FILTER) {
            return Err(ctx.err(
                format!("listener_filters[{i}]"),
                format!(
                    "{} is not supported (only {ORIGINAL_DST_FILTER} with use_original_dst)",
                    f.name
                ),
            ));
        }
    }
    let [filter] = chain.filters.as_slice() else {
        return Err(ctx.err(
            "filter_chains[0].filters",
            "exactly one network filter is supported",
        ));
    };
    use listener::filter::ConfigType;
    let Some(ConfigType::TypedConfig(cfg)) = &filter.config_type else {
        return Err(ctx.err("filter_chains[0].filters[0].typed_config", "missing"));
    };
    let kind = if cfg.type_url == HCM_TYPE {
        let h = hcm::HttpConnectionManager::decode(cfg.value.as_slice())
            .map_err(|e| ctx.err("filter_chains[0].filters[0].typed_config", e.to_string()))?;
        for (i, f) in h.http_filters.iter().enumerate() {
            let is_router = match &f.config_type {
                Some(hcm::http_filter::ConfigType::TypedConfig(t)) => t.type_url == ROUTER_TYPE,
                _ => f.name == "envoy.filters.http.router",
            };
            if !is_router {
                return Err(ctx.err(
                    format!("http_filters[{i}]"),
                    format!("{} is not supported (only the router)", f.name),
                ));
            }
        }
        use hcm::http_connection_manager::RouteSpecifier as RS;
        let routes = match &h.route_specifier {
            Some(RS::Rds(r)) if !r.route_config_name.is_empty() => {
                RouteSource::Rds(r.route_config_name.clone())
            }
            Some(RS::RouteConfig(rc)) => RouteSource::Inline(route_table_from(rc, "listener")?),
            _ => {
                return Err(ctx.err(
                    "route_specifier",
                    "needs `rds` with a name or an inline `route_config`",
                ));
            }
        };
        ListenerKind::Http { routes }
    } else if cfg.type_url == TCP_PROXY_TYPE {
        let t = tcp_proxy::TcpProxy::decode(cfg.value.as_slice())
            .map_err(|e| ctx.err("filter_chains[0].filters[0].typed_config", e.to_string()))?;
        match &t.cluster_specifier {
            Some(tcp_proxy::tcp_proxy::ClusterSpecifier::Cluster(c)) if !c.is_empty() => {
                let idle = opt_duration(&ctx, "tcp_proxy.idle_timeout", t.idle_timeout.as_ref())?;
                ListenerKind::Tcp {
                    cluster: c.clone(),
                    idle_timeout: match idle {
                        None => Some(TCP_IDLE_TIMEOUT),
                        Some(d) if d.is_zero() => None,
                        Some(d) => Some(d),
                    },
                }
            }
            _ => return Err(ctx.err("tcp_proxy.cluster", "a cluster is required")),
        }
    } else {
        return Err(ctx.err(
            "filter_chains[0].filters[0]",
            format!(
                "{} is not supported (HttpConnectionManager, TcpProxy)",
                cfg.type_url
            ),
        ));
    };
    let kind = match kind {
        ListenerKind::Tcp { cluster, .. } if transparent => {
            ListenerKind::Transparent { fallback: cluster }
        }
        ListenerKind::Http { .. } if transparent => {
            return Err(ctx.err(
                "use_original_dst",
                "a transparent listener's chain must be a TcpProxy (to the passthrough cluster)",
            ));
        }
        kind => kind,
    };
    Ok(Some(ListenerConfig {
        name: l.name.clone(),
        address,
        kind,
    }))
}
