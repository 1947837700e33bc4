//! Sidecar to sidecar with real parts: endpoints labelled `strait.io/tls-mode: mutual` sit
//! behind sidecars' inbound listeners, which accept nothing but mutual TLS. West's `strait
//! proxy` (library), fed by west's control plane over mTLS ADS, reaches them with its workload
//! certificate — HTTP and raw TCP — and refuses a sidecar with the wrong identity; an endpoint
//! without the label is dialled in plaintext (and a sidecar refuses that). Across clusters,
//! east's gateway originates the mutual TLS to east's sidecars with its own certificate, and
//! refuses a sidecar that is not a workload of east.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use crate::support::{WestProxy, files};
use federation::identity::{CertificateAuthority, IssuedPaths};
use proxy::inbound::InboundSpec;
use proxy::tls::{Peer, TlsSource};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A sidecar's inbound listener (`SPEC` as `--inbound` takes it, listening on a free port)
/// presenting `certs`; its address.
async fn sidecar(app: SocketAddr, alpn: &str, certs: &IssuedPaths) -> SocketAddr {
    let spec = InboundSpec::parse(&format!("127.0.0.1:0={app}@{alpn}")).expect("spec");
    let protocols: Vec<&[u8]> = spec.alpn.iter().map(Vec::as_slice).collect();
    let tls = Arc::new(TlsSource::new(files(certs), Peer::Workload, &protocols).expect("tls"));
    let l = TcpListener::bind(spec.listen).await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(proxy::inbound::serve(l, spec.app, tls));
    addr
}

/// A service `name` of `protocol` on `port` with one endpoint at `ep`, behind a sidecar when
/// `mutual`.
fn service(
    name: &str,
    protocol: &str,
    port: u16,
    ep: SocketAddr,
    zone: &str,
    mutual: bool,
) -> String {
    let labels = if mutual {
        ", labels: {strait.io/tls-mode: mutual}"
    } else {
        ""
    };
    format!(
        "  - name: {name}\n    ports: [{{name: {protocol}, port: {port}, protocol: {protocol}}}]\n    endpoints:\n      - {{address: 127.0.0.1, port: {}, zone: {zone}{labels}}}\n",
        ep.port()
    )
}

fn cluster_yaml(cluster: &str, region: &str, services: &[String]) -> String {
    format!(
        "cluster: {cluster}\nregion: {region}\nservices:\n{}",
        services.concat()
    )
}

/// Send one HTTP/1.1 request over a raw TCP connection to `to` and read the answer's body.
async fn raw_http(to: SocketAddr) -> Result<String, String> {
    let fut = async {
        let mut s = TcpStream::connect(to).await.map_err(|e| e.to_string())?;
        s.write_all(b"GET / HTTP/1.1\r\nhost: app\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err(format!("closed after {:?}", String::from_utf8_lossy(&out)));
            }
            out.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&out).to_string();
            if let Some((_, body)) = text.split_once("\r\n\r\n")
                && !body.is_empty()
            {
                return Ok(body.to_string());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| "no answer within 10 s".to_string())?
}

/// The certificates of both tests: west's control plane, west's client, and the echo
/// sidecars of west and east.
struct Certs {
    ca: CertificateAuthority,
    cp: IssuedPaths,
    client: IssuedPaths,
    west_echo: IssuedPaths,
    east_echo: IssuedPaths,
}

impl Certs {
    fn issue(d: &std::path::Path) -> Self {
        let ca = CertificateAuthority::init(TD, Duration::from_secs(86400)).expect("CA");
        let cert =
            |path: &str, what: &str| issue(&ca, d, &format!("spiffe://{TD}/cluster/{path}"), what);
        Self {
            cp: cert("west/ns/strait-system/sa/controlplane", "west-cp"),
            client: cert("west/ns/default/sa/client", "west-client"),
            west_echo: cert("west/ns/default/sa/echo", "west-echo"),
            east_echo: cert("east/ns/default/sa/echo", "east-echo"),
            ca,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_reach_sidecars_with_mutual_tls_within_and_across_clusters() {
    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let Certs {
        ca,
        cp: cp_certs,
        client,
        west_echo,
        east_echo,
    } = Certs::issue(d);
    let west_gw_certs = issue(
        &ca,
        d,
        &format!("spiffe://{TD}/cluster/west/gateway"),
        "west-gw",
    );
    let east_gw_certs = issue(
        &ca,
        d,
        &format!("spiffe://{TD}/cluster/east/gateway"),
        "east-gw",
    );

    // Applications, and the sidecars in front of them.
    let (west_app, _w) = http_backend("west").await;
    let (east_app, _e) = http_backend("east").await;
    let (bare_app, _b) = http_backend("bare").await;
    let west_in = sidecar(west_app, "http/1.1", &west_echo).await;
    let west_tcp_in = sidecar(west_app, "none", &west_echo).await;
    let east_in = sidecar(east_app, "http/1.1", &east_echo).await;
    // Registered as west's but presenting east's identity.
    let impostor_in = sidecar(bare_app, "http/1.1", &east_echo).await;
    // Registered as east's but presenting west's identity.
    let east_impostor_in = sidecar(east_app, "http/1.1", &west_echo).await;
    let tcp_port = free_addr().port();

    let west_yaml = |with_echo: bool| {
        let mut s = vec![
            service("impostor", "http", 8080, impostor_in, "us-west-1a", true),
            service("unlabelled", "http", 8080, west_in, "us-west-1a", false),
            service("bare", "http", 8080, bare_app, "us-west-1a", true),
            service("raw", "tcp", tcp_port, west_tcp_in, "us-west-1a", true),
        ];
        if with_echo {
            s.push(service("echo", "http", 8080, west_in, "us-west-1a", true));
        }
        cluster_yaml("west", "us-west", &s)
    };
    let east_yaml = cluster_yaml(
        "east",
        "us-east",
        &[
            service("echo", "http", 8080, east_in, "us-east-1a", true),
            service(
                "eastonly",
                "http",
                8080,
                east_impostor_in,
                "us-east-1a",
                true,
            ),
        ],
    );

    let reg = Registry::start(d).await;
    reg.publish(&west_yaml(true)).await;
    reg.publish(&east_yaml).await;
    let west_disc = d.join("west-discovery.yaml");
    std::fs::write(&west_disc, west_yaml(true)).unwrap();
    let east_disc = d.join("east-discovery.yaml");
    std::fs::write(&east_disc, &east_yaml).unwrap();
    let (west_gw, east_gw) = linked_gateways(
        d,
        (&west_gw_certs, &west_disc),
        (&east_gw_certs, &east_disc),
    )
    .await;
    let cp = start_cp_with(
        &reg,
        west_cp_config(d, &reg, &cp_certs, Some(west_gw.ingress_addr)),
    )
    .await;

    // West's client proxy: workload certificate for the control plane, the gateway and
    // sidecars.
    let WestProxy {
        xds,
        dataplane: _dp,
        outbound,
        ..
    } = WestProxy::start(
        "west-client",
        cp.xds_addr,
        west_gw.ingress_addr,
        &client,
        true,
    );

    // West's own sidecar, directly, over mutual TLS (it accepts nothing else).
    wait_for(
        Duration::from_secs(20),
        "the proxy to reach west's sidecar",
        || async {
            match get(outbound, "echo.default").await {
                Ok((200, b)) if b == "west" => Ok(()),
                other => Err(format!("{other:?}; xDS {:?}", xds.status.borrow())),
            }
        },
    )
    .await;
    for i in 0..10 {
        assert_eq!(
            get(outbound, "echo.default").await,
            Ok((200, "west".to_string())),
            "request {i}"
        );
    }
    // Raw TCP to a sidecar (no ALPN): the bytes reach the application.
    let tcp_listener = SocketAddr::new(outbound.ip(), tcp_port);
    wait_for(
        Duration::from_secs(20),
        "the TCP service through west's sidecar",
        || async {
            match raw_http(tcp_listener).await {
                Ok(b) if b == "west" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;

    // Refused: a sidecar with another cluster's identity, plaintext to a sidecar, TLS to an
    // application without one. The reason comes back.
    let (status, body) = get(outbound, "impostor.default").await.expect("an answer");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("mutual TLS to its sidecar") && body.contains("cluster/east"),
        "the reason names the refused identity: {body}"
    );
    let (status, body) = get(outbound, "unlabelled.default")
        .await
        .expect("an answer");
    assert_ne!(status, 200, "plaintext reached a sidecar: {body}");
    let (status, body) = get(outbound, "bare.default").await.expect("an answer");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("mutual TLS to its sidecar"),
        "TLS to a plaintext application fails: {body}"
    );

    // West's endpoint leaves: east's, through both gateways; east's gateway originates the
    // mutual TLS to east's sidecar.
    reg.publish(&west_yaml(false)).await;
    wait_for(
        Duration::from_secs(20),
        "traffic to move to east's sidecar",
        || async {
            match get(outbound, "echo.default").await {
                Ok((200, b)) if b == "east" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    for i in 0..10 {
        assert_eq!(
            get(outbound, "echo.default").await,
            Ok((200, "east".to_string())),
            "request {i} through the gateways"
        );
    }
    let failures = |gw: &gateway::Gateway| {
        gw.shared()
            .metrics
            .get("strait_gateway_sidecar_tls_failures_total", "handshake")
    };
    assert_eq!(failures(&east_gw), 0);
    // East's gateway refuses a sidecar that is not one of east's workloads.
    let (status, body) = get(outbound, "eastonly.default").await.expect("an answer");
    assert_ne!(status, 200, "{body}");
    assert!(failures(&east_gw) >= 1, "the refusal is counted");

    cp.shutdown().await;
    west_gw.shutdown().await;
    east_gw.shutdown().await;
}

/// A stock Envoy 1.40 with `strait proxy bootstrap --envoy` (workload certificate: the static
/// secrets) reaches a Strait sidecar over mutual TLS — the cluster's transport-socket match and
/// the endpoint's metadata as the control plane sends them — and refuses a sidecar with
/// another cluster's identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_reaches_strait_sidecars_with_mutual_tls() {
    use controlplane::bootstrap::{BootstrapSpec, CertFiles, envoy};
    use federation::model::{Labels, Locality, Name};

    install_crypto();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let Certs {
        cp: cp_certs,
        client: app_certs,
        west_echo,
        east_echo,
        ..
    } = Certs::issue(d);
    let (app, _a) = http_backend("west-sidecar").await;
    let west_in = sidecar(app, "http/1.1", &west_echo).await;
    let impostor_in = sidecar(app, "http/1.1", &east_echo).await;
    let reg = Registry::start(d).await;
    reg.publish(&cluster_yaml(
        "west",
        "us-west",
        &[
            service("echo", "http", 8080, west_in, "us-west-1a", true),
            service("impostor", "http", 8080, impostor_in, "us-west-1a", true),
        ],
    ))
    .await;
    let cp = start_cp_with(&reg, west_cp_config(d, &reg, &cp_certs, None)).await;
    let admin = free_addr();
    let outbound = free_addr();
    let spec = BootstrapSpec {
        node_id: "west-envoy".into(),
        cluster: Name::parse("c", "west").unwrap(),
        locality: Locality::parse("l", "us-west/us-west-1a").unwrap(),
        labels: Labels::default(),
        xds: cp.xds_addr.into(),
        xds_replicas: Vec::new(),
        tls: Some(CertFiles {
            cert: app_certs.cert.clone(),
            key: app_certs.key.clone(),
            ca: app_certs.ca.clone(),
        }),
        delta: true,
        admin,
        outbound,
        transparent: None,
        gateway: None,
    };
    let envoy = Envoy::start(d, "west-envoy", &envoy(&spec), admin, outbound);
    wait_for(
        Duration::from_secs(30),
        "Envoy to reach west's sidecar",
        || async {
            match get(outbound, "echo.default").await {
                Ok((200, b)) if b == "west-sidecar" => Ok(()),
                other => Err(format!("{other:?}\n{}", envoy.log_tail())),
            }
        },
    )
    .await;
    for i in 0..10 {
        assert_eq!(
            get(outbound, "echo.default").await,
            Ok((200, "west-sidecar".to_string())),
            "request {i}"
        );
    }
    let (status, body) = get(outbound, "impostor.default").await.expect("an answer");
    assert_eq!(
        status, 503,
        "Envoy reached a sidecar with east's identity: {body}"
    );
    for (k, v) in envoy.stats("update_rejected").await {
        assert_eq!(v, 0, "{k} = {v}\n{}", envoy.log_tail());
    }
    let handshakes: u64 = envoy
        .stats("ssl.handshake")
        .await
        .iter()
        .filter(|(k, _)| k.contains("echo.default"))
        .map(|(_, v)| v)
        .sum();
    assert!(
        handshakes >= 1,
        "Envoy's TLS handshakes to the sidecar: {handshakes}"
    );
    drop(envoy);
    cp.shutdown().await;
}
