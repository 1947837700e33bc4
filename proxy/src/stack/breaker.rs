//! Circuit breaking: a request takes one of its cluster's `max_requests` permits, atomically
//! (never check-then-increment), and gives it back when the response's head is answered. With
//! none left the request is answered 503 at once, as Envoy's circuit breaker does; it never
//! waits.

use std::convert::Infallible;

use http::{Response, StatusCode};
use tower_service::Service;

use super::{Fut, Routed, local_reply};
use crate::runtime::Body;

layer!(CircuitBreakerLayer, CircuitBreaker);

impl<S> Service<Routed> for CircuitBreaker<S>
where
    S: Service<Routed, Response = Response<Body>, Error = Infallible, Future = Fut<Response<Body>>>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Fut<Response<Body>>;

    always_ready!();

    fn call(&mut self, mut r: Routed) -> Self::Future {
        let limit = u64::from(r.cluster.config.thresholds.max_requests);
        let Some(permit) = r.cluster.requests.try_acquire(limit) else {
            let reply = local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("cluster {} is at max_requests", r.cluster.config.name),
            );
            return Box::pin(async move { Ok(reply) });
        };
        // The request carries its permit down the stack; it is given back when the attempts
        // are over (the response's head).
        r.permit = Some(permit);
        self.inner.call(r)
    }
}
