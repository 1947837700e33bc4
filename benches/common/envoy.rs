//! Stock Envoy for the benchmarks' peers: where the binary is, how to start it (optionally
//! inside a network namespace), and builders for the pieces of a static bootstrap.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use super::Proc;

/// `$STRAIT_ENVOY`, or the project venv's Envoy 1.40 (`cargo xtask setup`).
pub fn binary() -> PathBuf {
    std::env::var_os("STRAIT_ENVOY")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/envoy"))
}

/// Envoy with the bootstrap `boot` and `workers` worker threads, inside network namespace `ns`
/// (`None`: this one); its stderr goes to `log` (`None`: discarded).
pub fn spawn(ns: Option<&str>, boot: &Path, workers: u32, log: Option<&Path>) -> Proc {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(binary());
            c
        }
        None => Command::new(binary()),
    };
    let stderr = match log {
        Some(p) => Stdio::from(std::fs::File::create(p).expect("the Envoy log file")),
        None => Stdio::null(),
    };
    Proc(
        cmd.arg("-c")
            .arg(boot)
            .args(["--concurrency", &workers.to_string()])
            .args(["--disable-hot-restart", "-l", "error"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("envoy starts (run `cargo xtask setup`)"),
    )
}

/// Write `boot` to `dir/NAME.json` and start Envoy with it inside namespace `ns`, its log in
/// `dir/NAME.log`.
pub fn start_in(dir: &Path, name: &str, ns: &str, workers: u32, boot: &Value) -> Proc {
    let file = dir.join(format!("{name}.json"));
    std::fs::write(&file, boot.to_string()).expect("write an Envoy bootstrap");
    spawn(
        Some(ns),
        &file,
        workers,
        Some(&dir.join(format!("{name}.log"))),
    )
}

pub fn sock(ip: impl Into<IpAddr>, port: u16) -> Value {
    json!({"socket_address": {"address": ip.into().to_string(), "port_value": port}})
}

pub fn sock_addr(a: SocketAddr) -> Value {
    sock(a.ip(), a.port())
}

/// `cert.pem` and `key.pem` of `dir` as a TLS certificate.
pub fn certs(dir: &Path) -> Value {
    let f = |n: &str| json!({"filename": dir.join(n).to_string_lossy()});
    json!({"certificate_chain": f("cert.pem"), "private_key": f("key.pem")})
}

/// A TLS transport socket: `kind` is `UpstreamTlsContext` or `DownstreamTlsContext`.
pub fn tls_socket(kind: &str, mut context: Value) -> Value {
    context["@type"] = json!(format!(
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.{kind}"
    ));
    json!({"name": "envoy.transport_sockets.tls", "typed_config": context})
}

/// A STATIC cluster of the endpoints `to` (each `(address, priority)`).
pub fn static_cluster(name: &str, to: &[(Value, u32)], tls: Option<Value>) -> Value {
    let endpoints: Vec<Value> = to
        .iter()
        .map(|(a, p)| json!({"priority": p, "lb_endpoints": [{"endpoint": {"address": a}}]}))
        .collect();
    let mut c = json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {"cluster_name": name, "endpoints": endpoints},
    });
    if let Some(t) = tls {
        c["transport_socket"] = t;
    }
    c
}

/// An HTTP connection manager routing every request to `cluster`, with `route` merged into
/// the route action (timeouts, retry policy).
pub fn http_manager(prefix: &str, cluster: &str, route: Value) -> Value {
    let mut action = json!({"cluster": cluster});
    if let (Some(a), Some(extra)) = (action.as_object_mut(), route.as_object()) {
        a.extend(extra.clone());
    }
    json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": prefix,
            "codec_type": "AUTO",
            "route_config": {"virtual_hosts": [{
                "name": prefix,
                "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "route": action}],
            }]},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
        },
    })
}

/// The retry policy both proxies get in the benchmarks (Envoy's names; the strait proxy's
/// default from its control plane is the same).
pub fn retries() -> Value {
    json!({"retry_policy": {
        "retry_on": "connect-failure,refused-stream,reset,gateway-error",
        "num_retries": 2,
    }})
}

pub fn tcp_proxy(prefix: &str, cluster: &str) -> Value {
    json!({
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": prefix,
            "cluster": cluster,
        },
    })
}

/// The TLS inspector listener filter (SNI for filter chain matching).
pub fn tls_inspector() -> Value {
    json!({"name": "envoy.filters.listener.tls_inspector", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}})
}

/// `outbound_.PORT_._.HOST`: the SNI an Istio sidecar sends to a remote network's gateway,
/// which routes the TLS stream by it without terminating it (`AUTO_PASSTHROUGH`).
pub fn istio_sni(port: u16, service: &str, namespace: &str) -> String {
    format!("outbound_.{port}_._.{service}.{namespace}.svc.cluster.local")
}
