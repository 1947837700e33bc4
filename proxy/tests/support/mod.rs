//! Helpers shared by the proxy's integration tests.

use std::net::SocketAddr;

use proxy::xds::{XdsClient, XdsOptions};

/// The xDS client of a strait proxy `proxy-1` of cluster east (us-east/us-east-1a, no gateway)
/// fed by the control plane at `xds` over plaintext, with its outbound HTTP listener on a free
/// loopback address (returned).
#[allow(dead_code)]
pub fn east_client(xds: SocketAddr) -> (XdsClient, SocketAddr) {
    let port = federation::etcd_server::free_port().expect("a free port");
    let outbound = SocketAddr::from(([127, 0, 0, 1], port));
    let node = proxy::xds::node(
        "proxy-1",
        "east",
        ("us-east", "us-east-1a", ""),
        &[],
        outbound,
        false,
        false,
    );
    (
        XdsClient::start(XdsOptions::new(format!("http://{xds}"), node)),
        outbound,
    )
}

/// Cluster east's discovery file with one service `name` (port `port`, of `protocol`, named
/// after it) and its one endpoint `ep` in zone us-east-1a.
#[allow(dead_code)]
pub fn one_service(name: &str, protocol: &str, port: u16, ep: SocketAddr) -> String {
    format!(
        "cluster: east\nregion: us-east\nservices:\n  - name: {name}\n    ports: [{{name: {protocol}, port: {port}, protocol: {protocol}}}]\n    endpoints:\n      - {{address: {}, port: {}, zone: us-east-1a}}\n",
        ep.ip(),
        ep.port()
    )
}

/// The workload certificate files of `p`, as the proxy takes them.
#[allow(dead_code)]
pub fn files(p: &federation::identity::IssuedPaths) -> proxy::tls::TlsFiles {
    proxy::tls::TlsFiles {
        cert: p.cert.clone(),
        key: p.key.clone(),
        ca: p.ca.clone(),
    }
}
