//! What an attempt's result means: a pure function of what the upstream did and the route's
//! retry policy, with Envoy's `retry_on` semantics. The retry layer and outlier detection (for
//! HTTP and TCP alike) both read it.

use http::StatusCode;

use crate::config::RetryPolicy;
use crate::lb::Outcome;

/// What the upstream did on one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// It answered with this status.
    Status(StatusCode),
    /// A TCP connection (or tunnel) was established.
    Connected,
    /// No answer in time: the per-try timeout (`per_try: true`) or the route's deadline.
    Timeout { per_try: bool },
    /// No connection could be made (refused, timed out, a tunnel refused).
    ConnectFailure,
    /// The request or its connection was reset after it went out.
    Reset,
}

/// Whether to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    Yes,
    No,
}

/// The attempt's outcome for outlier detection, and whether `policy` retries it.
///
/// - A status of 502, 503 or 504 is a gateway error, any other 5xx a server error.
/// - A connect failure, a reset and a timeout are gateway errors (and 5xx).
/// - `5xx` retries every 5xx, timeouts, connect failures and resets; `gateway-error` retries
///   502–504, timeouts, connect failures and resets; `connect-failure` and `reset` their own;
///   `retriable-status-codes` the policy's codes.
/// - A timeout is retried only when the per-try timeout fired (the route's deadline ends the
///   request).
/// - No policy: never retried.
pub fn classify(observed: Observed, policy: Option<&RetryPolicy>) -> (Outcome, Retry) {
    let on = policy.map(|p| p.on).unwrap_or_default();
    let (outcome, retry) = match observed {
        Observed::Connected => (Outcome::Success, false),
        Observed::Timeout { per_try } => (
            Outcome::GatewayError,
            per_try && (on.server_error || on.gateway_error),
        ),
        Observed::ConnectFailure => (
            Outcome::GatewayError,
            on.gateway_error || on.server_error || on.connect_failure,
        ),
        Observed::Reset => (
            Outcome::GatewayError,
            on.gateway_error || on.server_error || on.reset,
        ),
        Observed::Status(status) => {
            let code = status.as_u16();
            let gateway = matches!(code, 502..=504);
            let outcome = if gateway {
                Outcome::GatewayError
            } else if status.is_server_error() {
                Outcome::ServerError
            } else {
                Outcome::Success
            };
            let retry = (on.server_error && status.is_server_error())
                || (on.gateway_error && gateway)
                || (on.retriable_status_codes
                    && policy.is_some_and(|p| p.retriable_status_codes.contains(&code)));
            (outcome, retry)
        }
    };
    (outcome, if retry { Retry::Yes } else { Retry::No })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RetryOn;

    fn policy(on: &str, codes: &[u16]) -> RetryPolicy {
        let mut r = RetryOn::default();
        for c in on.split(',').filter(|c| !c.is_empty()) {
            match c {
                "5xx" => r.server_error = true,
                "gateway-error" => r.gateway_error = true,
                "connect-failure" => r.connect_failure = true,
                "reset" => r.reset = true,
                "retriable-status-codes" => r.retriable_status_codes = true,
                other => panic!("unknown retry_on {other}"),
            }
        }
        RetryPolicy {
            on: r,
            num_retries: 2,
            per_try_timeout: None,
            retriable_status_codes: codes.to_vec(),
            other_host: true,
            other_priority: false,
        }
    }

    fn status(code: u16) -> Observed {
        Observed::Status(StatusCode::from_u16(code).unwrap())
    }

    /// The classifier's whole table: every kind of result under every `retry_on` condition.
    #[test]
    fn the_classifier_table() {
        use Outcome::{GatewayError as G, ServerError as S, Success as K};
        use Retry::{No as N, Yes as Y};
        let timeout = Observed::Timeout { per_try: true };
        let deadline = Observed::Timeout { per_try: false };
        let connect = Observed::ConnectFailure;
        let reset = Observed::Reset;
        #[rustfmt::skip]
        let table: &[(&str, &[u16], Observed, Outcome, Retry)] = &[
            // no policy: outcomes only
            ("", &[], status(200), K, N),
            ("", &[], status(404), K, N),
            ("", &[], status(500), S, N),
            ("", &[], status(503), G, N),
            ("", &[], connect, G, N),
            ("", &[], Observed::Connected, K, N),
            // 5xx
            ("5xx", &[], status(200), K, N),
            ("5xx", &[], status(429), K, N),
            ("5xx", &[], status(500), S, Y),
            ("5xx", &[], status(501), S, Y),
            ("5xx", &[], status(502), G, Y),
            ("5xx", &[], status(504), G, Y),
            ("5xx", &[], timeout, G, Y),
            ("5xx", &[], deadline, G, N),
            ("5xx", &[], connect, G, Y),
            ("5xx", &[], reset, G, Y),
            // gateway-error
            ("gateway-error", &[], status(500), S, N),
            ("gateway-error", &[], status(502), G, Y),
            ("gateway-error", &[], status(503), G, Y),
            ("gateway-error", &[], status(504), G, Y),
            ("gateway-error", &[], status(505), S, N),
            ("gateway-error", &[], timeout, G, Y),
            ("gateway-error", &[], deadline, G, N),
            ("gateway-error", &[], connect, G, Y),
            ("gateway-error", &[], reset, G, Y),
            // connect-failure, reset: their own only
            ("connect-failure", &[], connect, G, Y),
            ("connect-failure", &[], reset, G, N),
            ("connect-failure", &[], status(503), G, N),
            ("connect-failure", &[], timeout, G, N),
            ("reset", &[], reset, G, Y),
            ("reset", &[], connect, G, N),
            ("reset", &[], status(502), G, N),
            // retriable-status-codes: the listed codes, with or without the condition
            ("retriable-status-codes", &[409, 503], status(409), K, Y),
            ("retriable-status-codes", &[409, 503], status(503), G, Y),
            ("retriable-status-codes", &[409, 503], status(500), S, N),
            ("retriable-status-codes", &[409, 503], connect, G, N),
            ("", &[409], status(409), K, N),
            ("connect-failure,reset", &[], reset, G, Y),
        ];
        for (on, codes, observed, outcome, retry) in table {
            let p = (!on.is_empty() || !codes.is_empty()).then(|| policy(on, codes));
            assert_eq!(
                classify(*observed, p.as_ref()),
                (*outcome, *retry),
                "retry_on {on:?} codes {codes:?}: {observed:?}"
            );
        }
        // No policy at all retries nothing.
        for o in [status(503), timeout, connect, reset] {
            assert_eq!(classify(o, None).1, Retry::No, "{o:?} without a policy");
        }
    }
}
