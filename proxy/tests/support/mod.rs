//! Helpers shared by the proxy's integration tests.

use std::net::SocketAddr;

use proxy::xds::{XdsClient, XdsOptions};

/// The xDS client of a strait proxy `proxy-1` of cluster east (us-east/us-east-1a, no gateway)
/// fed by the control plane at `xds` over plaintext, with its outbound HTTP listener on a free
/// loopback address (returned).
#[allow(dead_code)]
pub fn east_client(xds: SocketAddr) -> (XdsClient, SocketAddr) {
    let port = testkit::etcd::free_port().expect("a free port");
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
    proxy::tls::TlsFiles::new(&p.cert, &p.key, &p.ca)
}

/// West's strait proxy (library) in us-west/us-west-1a: its workload certificate `certs` for
/// mTLS ADS with the control plane at `xds` and for the gateway ingress `gateway`; with
/// `sidecars`, also for endpoints behind sidecars (and announced to the control plane).
#[allow(dead_code)]
pub struct WestProxy {
    pub xds: XdsClient,
    pub dataplane: proxy::dataplane::Dataplane,
    pub gateway: std::sync::Arc<proxy::tunnel::Gateway>,
    pub outbound: SocketAddr,
}

#[allow(dead_code)]
impl WestProxy {
    pub fn start(
        id: &str,
        xds: SocketAddr,
        gateway: SocketAddr,
        certs: &federation::identity::IssuedPaths,
        sidecars: bool,
    ) -> Self {
        Self::start_with_replicas(id, xds, gateway, &[], certs, sidecars)
    }

    /// [`WestProxy::start`] with the ingresses of west's other gateway replicas.
    pub fn start_with_replicas(
        id: &str,
        xds: SocketAddr,
        gateway: SocketAddr,
        replicas: &[SocketAddr],
        certs: &federation::identity::IssuedPaths,
        sidecars: bool,
    ) -> Self {
        use proxy::tls::{Peer, TlsSource};
        use std::sync::Arc;
        let port = testkit::etcd::free_port().expect("a free port");
        let outbound = SocketAddr::from(([127, 0, 0, 1], port));
        let node = proxy::xds::node(
            id,
            "west",
            ("us-west", "us-west-1a", ""),
            &[],
            outbound,
            true,
            sidecars,
        );
        let mut opts = XdsOptions::new(format!("http://{xds}"), node);
        opts.tls = Some(Arc::new(
            TlsSource::new(files(certs), Peer::Workload, &[b"h2"]).expect("xDS TLS"),
        ));
        let client = XdsClient::start(opts);
        let mut gateway_options = proxy::tunnel::GatewayOptions::new(gateway);
        gateway_options.replicas = replicas.to_vec();
        let gateway = Arc::new(proxy::tunnel::Gateway::new(
            gateway_options,
            TlsSource::new(files(certs), Peer::Gateway, &[b"h2"]).expect("gateway TLS"),
        ));
        let workload_tls = sidecars.then(|| {
            Arc::new(TlsSource::new(files(certs), Peer::Workload, &[]).expect("workload TLS"))
        });
        let dataplane = proxy::dataplane::Dataplane::start_with(
            client.config.clone(),
            proxy::dataplane::DataplaneOptions {
                gateway: Some(gateway.clone()),
                workload_tls,
                ..Default::default()
            },
        );
        Self {
            xds: client,
            dataplane,
            gateway,
            outbound,
        }
    }
}
