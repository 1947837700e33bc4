//! Route selection: the listener's route table (RDS or inline), the virtual host for `Host`
//! (Envoy's domain precedence), the first route whose path and headers match, then the
//! cluster (a weighted route picks one by weight) and the route's deadline.

use std::time::Instant;

use http::StatusCode;
use tower_service::Service;

use super::{Downstream, Fut, Routed, local_reply};
use crate::config::{RouteEntry, RouteTarget};
use crate::lb::{Random, ThreadRandom};
use crate::runtime::Body;

layer!(RouteLayer, Route);

impl<S> Service<Downstream> for Route<S>
where
    S: Service<
            Routed,
            Response = http::Response<Body>,
            Error = std::convert::Infallible,
            Future = Fut<http::Response<Body>>,
        >,
{
    type Response = http::Response<Body>;
    type Error = std::convert::Infallible;
    type Future = Fut<http::Response<Body>>;

    always_ready!();

    fn call(&mut self, d: Downstream) -> Self::Future {
        let routed = match routed(d, &mut ThreadRandom) {
            Ok(r) => r,
            Err((status, reason)) => {
                let reply = local_reply(status, &reason);
                return Box::pin(async move { Ok(reply) });
            }
        };
        self.inner.call(routed)
    }
}

/// The request with its route and cluster, or the status and reason of the local reply that
/// ends it.
fn routed(d: Downstream, rng: &mut dyn Random) -> Result<Routed, (StatusCode, String)> {
    let Downstream {
        req,
        compiled,
        listener,
    } = d;
    let host = super::requested_host(req.headers(), req.uri());
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let Some(table) = compiled.table(&listener) else {
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            "listener has no routes yet".into(),
        ));
    };
    let Some(route) = table.route(host, path, req.headers()) else {
        return Err((StatusCode::NOT_FOUND, format!("no route for {host}{path}")));
    };
    let cluster_name = pick_cluster(route, rng);
    let Some(cluster) = compiled.clusters.get(cluster_name) else {
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cluster {cluster_name} has no endpoints"),
        ));
    };
    Ok(Routed {
        deadline: route.timeout.map(|t| Instant::now() + t),
        route: route.clone(),
        cluster: cluster.clone(),
        req,
        permit: None,
    })
}

/// The route's cluster; for a weighted route, one by weight.
pub(crate) fn pick_cluster<'r>(route: &'r RouteEntry, rng: &mut dyn Random) -> &'r str {
    match &route.target {
        RouteTarget::Cluster(c) => c,
        RouteTarget::Weighted { clusters, total } => {
            let mut x = rng.below(u64::from(*total));
            for (c, w) in clusters {
                if x < u64::from(*w) {
                    return c;
                }
                x -= u64::from(*w);
            }
            clusters.last().map_or("", |(c, _)| c.as_str())
        }
    }
}
