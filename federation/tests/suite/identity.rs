//! Identity: the CA, issued certificates, the peer verifier and real mutual-TLS handshakes.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use federation::identity::{
    self, CertRole, CertificateAuthority, IdentityError, PeerVerifier, Role, SpiffeId, allow_any,
    allow_clusters, inspect_pem, load_certs, load_private_key, rejection_reason,
    spiffe_id_from_cert,
};
use rustls::CertificateError;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const TD: &str = "strait.test";
const DAY: Duration = Duration::from_secs(24 * 3600);

fn ca() -> CertificateAuthority {
    CertificateAuthority::init(TD, identity::DEFAULT_CA_VALIDITY).unwrap()
}

fn gateway(cluster: &str) -> SpiffeId {
    SpiffeId::gateway(TD, cluster).unwrap()
}

fn workload(cluster: &str, ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::workload(TD, cluster, ns, sa).unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn gateway_verifier(ca: &CertificateAuthority) -> PeerVerifier {
    PeerVerifier::new(&[ca.ca_cert_der().clone()], Role::Gateway, allow_any()).unwrap()
}

fn now() -> UnixTime {
    UnixTime::now()
}

// ---------------------------------------------------------------------------------------------
// CA and issuing

#[test]
fn ca_init_write_load_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let ca = ca();
    assert_eq!(ca.trust_domain(), TD);
    ca.write(&ca_dir, false).unwrap();

    assert_eq!(mode(&ca_dir.join("ca.key")), 0o600);
    let on_disk = std::fs::read_to_string(ca_dir.join("ca.pem")).unwrap();
    assert_eq!(on_disk, ca.ca_cert_pem());

    let info = inspect_pem(&on_disk).unwrap();
    assert_eq!(info.role, CertRole::Ca);
    assert_eq!(info.identity.as_deref(), Some("spiffe://strait.test"));
    assert_eq!(info.trust_domain.as_deref(), Some(TD));
    assert!(info.is_ca);
    assert!(!info.expired);
    // Default validity: 10 years.
    let years = (info.not_after_unix - info.not_before_unix) as f64 / (365.0 * 86400.0);
    assert!((9.9..10.1).contains(&years), "CA validity {years} years");

    let loaded = CertificateAuthority::load(&ca_dir).unwrap();
    assert_eq!(loaded.trust_domain(), TD);
    assert_eq!(loaded.ca_cert_pem(), ca.ca_cert_pem());

    // A certificate issued by the loaded CA verifies against the original CA certificate.
    let issued = loaded.issue(&gateway("east"), DAY).unwrap();
    let id = gateway_verifier(&ca)
        .verify(&issued.cert_chain()[0], &issued.cert_chain()[1..], now())
        .unwrap();
    assert_eq!(id, gateway("east"));
}

#[test]
fn ca_write_refuses_to_overwrite_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let first = ca();
    first.write(dir.path(), false).unwrap();
    let second = ca();
    let err = second.write(dir.path(), false).unwrap_err();
    assert!(matches!(err, IdentityError::CaExists { .. }), "{err}");
    assert!(err.to_string().contains("--force"), "{err}");
    // Unchanged.
    assert_eq!(
        std::fs::read_to_string(dir.path().join("ca.pem")).unwrap(),
        first.ca_cert_pem()
    );

    second.write(dir.path(), true).unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("ca.pem")).unwrap(),
        second.ca_cert_pem()
    );
    assert_eq!(mode(&dir.path().join("ca.key")), 0o600);
}

#[test]
fn ca_load_rejects_a_key_of_another_ca() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    ca().write(&a, false).unwrap();
    ca().write(&b, false).unwrap();
    std::fs::copy(b.join("ca.key"), a.join("ca.key")).unwrap();
    let err = CertificateAuthority::load(&a).unwrap_err();
    assert!(
        err.to_string()
            .contains("the private key does not belong to the certificate"),
        "{err}"
    );
}

#[test]
fn ca_load_names_the_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = CertificateAuthority::load(dir.path()).unwrap_err();
    assert!(matches!(err, IdentityError::Io { .. }), "{err}");
    assert!(err.to_string().contains("ca.pem"), "{err}");
}

#[test]
fn issued_gateway_cert_files_and_identity() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca();
    let issued = ca.issue(&gateway("east"), DAY).unwrap();
    let paths = issued.write(dir.path()).unwrap();
    assert_eq!(paths.cert, dir.path().join("cert.pem"));

    assert_eq!(mode(&paths.key), 0o600);
    let chain = load_certs(&paths.cert).unwrap();
    assert_eq!(chain.len(), 2, "cert.pem holds the leaf and the CA");
    assert_eq!(&chain[1], ca.ca_cert_der());
    assert_eq!(
        std::fs::read_to_string(&paths.ca).unwrap(),
        ca.ca_cert_pem()
    );
    load_private_key(&paths.key).unwrap();

    // The exact URI SAN.
    assert_eq!(
        spiffe_id_from_cert(&chain[0]).unwrap().to_string(),
        "spiffe://strait.test/cluster/east/gateway"
    );
    let verifier = PeerVerifier::from_ca_file(&paths.ca, Role::Gateway, allow_any()).unwrap();
    assert_eq!(verifier.trust_domain(), TD);
    assert_eq!(
        verifier.verify(&chain[0], &chain[1..], now()).unwrap(),
        gateway("east")
    );

    let info = inspect_pem(&std::fs::read_to_string(&paths.cert).unwrap()).unwrap();
    assert_eq!(info.role, CertRole::Gateway);
    assert_eq!(
        info.identity.as_deref(),
        Some("spiffe://strait.test/cluster/east/gateway")
    );
    assert_eq!(info.cluster.as_deref(), Some("east"));
    assert_eq!(info.chain_length, 2);
    assert!(!info.is_ca);
    assert!(!info.expired);
    // 24h plus the 5 minute backdate.
    assert_eq!(
        info.not_after_unix - info.not_before_unix,
        24 * 3600 + 5 * 60
    );
}

#[test]
fn issued_workload_cert_identity() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca();
    let id = workload("west", "shop", "checkout");
    ca.issue(&id, DAY).unwrap().write(dir.path()).unwrap();
    let chain = load_certs(dir.path().join("cert.pem")).unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(mode(&dir.path().join("key.pem")), 0o600);
    assert_eq!(
        spiffe_id_from_cert(&chain[0]).unwrap().to_string(),
        "spiffe://strait.test/cluster/west/ns/shop/sa/checkout"
    );
    let verifier =
        PeerVerifier::new(&[ca.ca_cert_der().clone()], Role::Workload, allow_any()).unwrap();
    assert_eq!(verifier.verify(&chain[0], &chain[1..], now()).unwrap(), id);

    let info = inspect_pem(&std::fs::read_to_string(dir.path().join("cert.pem")).unwrap()).unwrap();
    assert_eq!(info.role, CertRole::Workload);
    assert_eq!(info.namespace.as_deref(), Some("shop"));
    assert_eq!(info.service_account.as_deref(), Some("checkout"));
}

#[test]
fn reissuing_replaces_files_and_keeps_key_private() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca();
    let first = ca.issue(&gateway("east"), DAY).unwrap();
    first.write(dir.path()).unwrap();
    // Loosen the mode: the rewrite must restore it.
    std::fs::set_permissions(
        dir.path().join("key.pem"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let second = ca.issue(&gateway("east"), DAY).unwrap();
    second.write(dir.path()).unwrap();
    assert_eq!(mode(&dir.path().join("key.pem")), 0o600);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("key.pem")).unwrap(),
        second.key_pem()
    );
    assert_ne!(first.key_pem(), second.key_pem());
}

#[test]
fn issue_refuses_foreign_trust_domain_and_bad_validity() {
    let ca = ca();
    let foreign = SpiffeId::gateway("other.test", "east").unwrap();
    let err = ca.issue(&foreign, DAY).unwrap_err();
    assert!(
        matches!(err, IdentityError::ForeignTrustDomain { .. }),
        "{err}"
    );

    let err = ca.issue(&gateway("east"), Duration::ZERO).unwrap_err();
    assert!(matches!(err, IdentityError::InvalidValidity(_)), "{err}");

    // Longer than the CA itself.
    let err = ca
        .issue(&gateway("east"), identity::DEFAULT_CA_VALIDITY + DAY)
        .unwrap_err();
    assert!(err.to_string().contains("after the CA itself"), "{err}");

    // Built by hand with an invalid name.
    let bad = SpiffeId::Gateway {
        trust_domain: TD.into(),
        cluster: "East".into(),
    };
    let err = ca.issue(&bad, DAY).unwrap_err();
    assert!(
        err.to_string().starts_with("invalid cluster `East`"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Verification: accepted and rejected, each for the right reason

#[test]
fn rejects_a_cert_from_another_ca() {
    let ca = ca();
    // Same trust domain, same subject name, different key: the realistic impostor.
    let rogue = CertificateAuthority::init(TD, identity::DEFAULT_CA_VALIDITY).unwrap();
    let issued = rogue.issue(&gateway("east"), DAY).unwrap();
    let err = gateway_verifier(&ca)
        .verify(&issued.cert_chain()[0], &issued.cert_chain()[1..], now())
        .unwrap_err();
    assert!(matches!(err, IdentityError::NotSignedByCa), "{err:?}");
    assert_eq!(
        err.to_string(),
        "certificate is not signed by the federation CA"
    );

    // A CA of another trust domain too.
    let other = CertificateAuthority::init("other.test", DAY * 10).unwrap();
    let issued = other
        .issue(&SpiffeId::gateway("other.test", "east").unwrap(), DAY)
        .unwrap();
    let err = gateway_verifier(&ca)
        .verify(&issued.cert_chain()[0], &[], now())
        .unwrap_err();
    assert!(matches!(err, IdentityError::NotSignedByCa), "{err:?}");
}

#[test]
fn rejects_an_expired_cert() {
    let ca = ca();
    let now_sys = SystemTime::now();
    let issued = ca
        .issue_with_validity(&gateway("east"), now_sys - 3 * DAY, now_sys - DAY)
        .unwrap();
    let err = gateway_verifier(&ca)
        .verify(&issued.cert_chain()[0], &issued.cert_chain()[1..], now())
        .unwrap_err();
    match &err {
        IdentityError::Expired { not_after, .. } => {
            let info = inspect_pem(issued.cert_pem()).unwrap();
            assert_eq!(not_after, &info.not_after);
            assert!(info.expired);
        }
        other => panic!("expected Expired, got {other:?}"),
    }
    assert!(
        err.to_string().starts_with("certificate expired at "),
        "{err}"
    );

    // And one that is not valid yet.
    let future = ca
        .issue_with_validity(&gateway("east"), now_sys + DAY, now_sys + 2 * DAY)
        .unwrap();
    let err = gateway_verifier(&ca)
        .verify(&future.cert_chain()[0], &[], now())
        .unwrap_err();
    assert!(matches!(err, IdentityError::NotYetValid { .. }), "{err:?}");
}

#[test]
fn rejects_a_workload_where_a_gateway_is_required() {
    let ca = ca();
    let issued = ca.issue(&workload("east", "shop", "web"), DAY).unwrap();
    let err = gateway_verifier(&ca)
        .verify(&issued.cert_chain()[0], &issued.cert_chain()[1..], now())
        .unwrap_err();
    assert!(
        matches!(
            err,
            IdentityError::WrongRole {
                expected: Role::Gateway,
                found: Role::Workload,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "peer presented a workload identity spiffe://strait.test/cluster/east/ns/shop/sa/web; \
         a gateway identity is required"
    );

    // And the reverse.
    let gw = ca.issue(&gateway("east"), DAY).unwrap();
    let verifier =
        PeerVerifier::new(&[ca.ca_cert_der().clone()], Role::Workload, allow_any()).unwrap();
    let err = verifier
        .verify(&gw.cert_chain()[0], &[], now())
        .unwrap_err();
    assert!(matches!(err, IdentityError::WrongRole { .. }), "{err:?}");
}

#[test]
fn rejects_a_gateway_of_an_unknown_cluster() {
    let ca = ca();
    let verifier = PeerVerifier::new(
        &[ca.ca_cert_der().clone()],
        Role::Gateway,
        allow_clusters(["east", "west"]),
    )
    .unwrap();
    let known = ca.issue(&gateway("west"), DAY).unwrap();
    assert_eq!(
        verifier.verify(&known.cert_chain()[0], &[], now()).unwrap(),
        gateway("west")
    );

    let unknown = ca.issue(&gateway("north"), DAY).unwrap();
    let err = verifier
        .verify(&unknown.cert_chain()[0], &[], now())
        .unwrap_err();
    assert!(
        matches!(err, IdentityError::NotAuthorized { .. }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "peer spiffe://strait.test/cluster/north/gateway is not authorized: \
         cluster `north` is not a member of the federation"
    );

    // A custom authorizer sees the parsed identity.
    let same_cluster: identity::Authorizer = Arc::new(|id: &SpiffeId| {
        if id.cluster() == "east" {
            Ok(())
        } else {
            Err(format!("`{}` is not my cluster", id.cluster()))
        }
    });
    let verifier =
        PeerVerifier::new(&[ca.ca_cert_der().clone()], Role::Gateway, same_cluster).unwrap();
    let err = verifier
        .verify(&known.cert_chain()[0], &[], now())
        .unwrap_err();
    assert!(
        err.to_string().ends_with("`west` is not my cluster"),
        "{err}"
    );
}

/// What rustls hears from the verifier (both ways) maps to one bounded metric reason per kind of
/// refusal: the typed error decides, never its message.
#[test]
fn every_refusal_has_its_metric_reason() {
    use rustls::client::danger::ServerCertVerifier;
    use rustls::server::danger::ClientCertVerifier;

    let ca = ca();
    let verifier = PeerVerifier::new(
        &[ca.ca_cert_der().clone()],
        Role::Gateway,
        allow_clusters(["east"]),
    )
    .unwrap();
    let now_sys = SystemTime::now();
    let rogue = CertificateAuthority::init(TD, identity::DEFAULT_CA_VALIDITY).unwrap();
    let cases = [
        ("unknown_ca", rogue.issue(&gateway("east"), DAY).unwrap()),
        (
            "expired",
            ca.issue_with_validity(&gateway("east"), now_sys - 3 * DAY, now_sys - DAY)
                .unwrap(),
        ),
        (
            "not_yet_valid",
            ca.issue_with_validity(&gateway("east"), now_sys + DAY, now_sys + 2 * DAY)
                .unwrap(),
        ),
        (
            "wrong_role",
            ca.issue(&workload("east", "shop", "web"), DAY).unwrap(),
        ),
        ("not_authorized", ca.issue(&gateway("north"), DAY).unwrap()),
    ];
    let name = ServerName::try_from("east").unwrap();
    for (reason, issued) in &cases {
        let leaf = &issued.cert_chain()[0];
        let as_client = verifier.verify_client_cert(leaf, &[], now()).unwrap_err();
        assert_eq!(
            identity::tls_failure_reason(&as_client),
            *reason,
            "{as_client}"
        );
        let as_server = verifier
            .verify_server_cert(leaf, &[], &name, &[], now())
            .unwrap_err();
        assert_eq!(
            identity::tls_failure_reason(&as_server),
            *reason,
            "{as_server}"
        );
    }
    assert_eq!(
        identity::tls_failure_reason(&rustls::Error::NoCertificatesPresented),
        "no_certificate"
    );
    assert_eq!(
        identity::tls_failure_reason(&rustls::Error::AlertReceived(
            rustls::AlertDescription::UnknownCA
        )),
        "rejected_by_peer"
    );
    let io = std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        rustls::Error::NoCertificatesPresented,
    );
    assert_eq!(identity::handshake_failure_reason(&io), "no_certificate");
    let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
    assert_eq!(identity::handshake_failure_reason(&reset), "io");
}

#[test]
fn rejects_a_wrong_trust_domain() {
    let ca = ca();
    let issued = ca.issue(&gateway("east"), DAY).unwrap();

    // Chain fine, trust domain not ours.
    let verifier = PeerVerifier::with_trust_domain(
        "prod.example",
        &[ca.ca_cert_der().clone()],
        Role::Gateway,
        allow_any(),
    )
    .unwrap();
    let err = verifier
        .verify(&issued.cert_chain()[0], &[], now())
        .unwrap_err();
    match &err {
        IdentityError::WrongTrustDomain {
            expected, found, ..
        } => {
            assert_eq!(expected, "prod.example");
            assert_eq!(found, TD);
        }
        other => panic!("expected WrongTrustDomain, got {other:?}"),
    }

    // A bundle holding two trust domains' CAs: a peer of the other one is refused.
    let other = CertificateAuthority::init("other.test", DAY * 10).unwrap();
    let bundle = [ca.ca_cert_der().clone(), other.ca_cert_der().clone()];
    let err = PeerVerifier::new(&bundle, Role::Gateway, allow_any()).unwrap_err();
    assert!(
        err.to_string().contains("exactly one trust domain"),
        "{err}"
    );
    let verifier =
        PeerVerifier::with_trust_domain(TD, &bundle, Role::Gateway, allow_any()).unwrap();
    let foreign = other
        .issue(&SpiffeId::gateway("other.test", "east").unwrap(), DAY)
        .unwrap();
    let err = verifier
        .verify(&foreign.cert_chain()[0], &[], now())
        .unwrap_err();
    assert!(
        matches!(err, IdentityError::WrongTrustDomain { .. }),
        "{err:?}"
    );
    // While our own still passes.
    verifier
        .verify(&issued.cert_chain()[0], &[], now())
        .unwrap();
}

#[test]
fn rejects_a_ca_certificate_as_a_peer() {
    let ca = ca();
    let err = gateway_verifier(&ca)
        .verify(ca.ca_cert_der(), &[], now())
        .unwrap_err();
    assert!(matches!(err, IdentityError::Chain(_)), "{err:?}");
    assert!(err.to_string().contains("CaUsedAsEndEntity"), "{err}");
}

#[test]
fn rejects_garbage_certificates() {
    let ca = ca();
    let junk = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01]);
    let err = gateway_verifier(&ca).verify(&junk, &[], now()).unwrap_err();
    assert!(matches!(err, IdentityError::BadCertificate(_)), "{err:?}");
}

// ---------------------------------------------------------------------------------------------
// SPIFFE IDs and names

#[test]
fn spiffe_id_round_trip() {
    for text in [
        "spiffe://strait.test/cluster/east/gateway",
        "spiffe://a/cluster/x-1/gateway",
        "spiffe://strait.test/cluster/west/ns/shop/sa/checkout",
        "spiffe://prod.example.org/cluster/0/ns/default/sa/default",
    ] {
        let id: SpiffeId = text.parse().unwrap();
        assert_eq!(id.to_string(), text);
        assert_eq!(id.to_string().parse::<SpiffeId>().unwrap(), id);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{text}\""));
        assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
    }
    let id: SpiffeId = "spiffe://td/cluster/c/ns/n/sa/s".parse().unwrap();
    assert_eq!(id.trust_domain(), "td");
    assert_eq!(id.cluster(), "c");
    assert_eq!(id.role(), Role::Workload);
    assert_eq!(id.namespace(), Some("n"));
    assert_eq!(id.service_account(), Some("s"));
    let id: SpiffeId = "spiffe://td/cluster/c/gateway".parse().unwrap();
    assert_eq!(id.role(), Role::Gateway);
    assert_eq!(id.namespace(), None);
}

#[test]
fn malformed_spiffe_ids_are_rejected() {
    for (text, why) in [
        ("", "must start with `spiffe://`"),
        (
            "https://td/cluster/c/gateway",
            "must start with `spiffe://`",
        ),
        ("spiffe://td", "has no path"),
        ("spiffe://td/", "path must be"),
        ("spiffe://td/cluster/c", "path must be"),
        ("spiffe://td/cluster/c/gateway/", "path must be"),
        ("spiffe://td/cluster/c/gateway/x", "path must be"),
        ("spiffe://td/cluster//gateway", "invalid cluster ``"),
        ("spiffe://td/cluster/C/gateway", "invalid cluster `C`"),
        ("spiffe://td/clusters/c/gateway", "path must be"),
        ("spiffe://td/cluster/c/ns/n/sa", "path must be"),
        ("spiffe://td/cluster/c/ns/N/sa/s", "invalid namespace `N`"),
        (
            "spiffe://td/cluster/c/ns/n/sa/s_1",
            "invalid service account `s_1`",
        ),
        ("spiffe://TD/cluster/c/gateway", "invalid trust domain `TD`"),
        (
            "spiffe://td:443/cluster/c/gateway",
            "invalid trust domain `td:443`",
        ),
        (
            "spiffe://u@td/cluster/c/gateway",
            "invalid trust domain `u@td`",
        ),
        ("spiffe://td/cluster/c/gateway?x=1", "query or a fragment"),
        ("spiffe://td/cluster/c/gateway#f", "query or a fragment"),
        ("spiffe:///cluster/c/gateway", "invalid trust domain ``"),
    ] {
        let err = text.parse::<SpiffeId>().unwrap_err();
        assert!(
            matches!(err, IdentityError::MalformedId { .. }),
            "{text}: {err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains(why), "{text}: `{msg}` lacks `{why}`");
    }
}

#[test]
fn name_validation_names_the_field() {
    let cases: [(Result<SpiffeId, IdentityError>, &str); 7] = [
        (
            SpiffeId::gateway("Strait", "east"),
            "invalid trust domain `Strait`",
        ),
        (
            SpiffeId::gateway("a..b", "east"),
            "invalid trust domain `a..b`",
        ),
        (
            SpiffeId::gateway(TD, ""),
            "invalid cluster ``: must not be empty",
        ),
        (SpiffeId::gateway(TD, "-east"), "invalid cluster `-east`"),
        (
            SpiffeId::gateway(TD, &"x".repeat(64)),
            "is 64 characters long; at most 63",
        ),
        (
            SpiffeId::workload(TD, "east", "my.ns", "sa"),
            "invalid namespace `my.ns`",
        ),
        (
            SpiffeId::workload(TD, "east", "ns", "Web"),
            "invalid service account `Web`",
        ),
    ];
    for (result, want) in cases {
        let err = result.unwrap_err();
        assert!(matches!(err, IdentityError::InvalidName { .. }), "{err:?}");
        assert!(err.to_string().contains(want), "`{err}` lacks `{want}`");
    }
    let err = identity::validate_name("cluster", "East").unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid cluster `East`: contains 'E'; only lowercase letters, digits and `-` are allowed"
    );
    identity::validate_trust_domain("prod.example-1.org").unwrap();
    identity::validate_name("cluster", &"x".repeat(63)).unwrap();
    assert!(identity::validate_trust_domain(&format!("{}.x", "a".repeat(64))).is_err());
    let err = CertificateAuthority::init("Bad_TD", DAY).unwrap_err();
    assert!(
        err.to_string().starts_with("invalid trust domain `Bad_TD`"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Inspect and file loading

#[test]
fn inspect_output_is_stable() {
    let ca = ca();
    let issued = ca.issue(&gateway("east"), DAY).unwrap();
    let info = inspect_pem(&issued.chain_pem()).unwrap();
    let text = info.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "identity: spiffe://strait.test/cluster/east/gateway"
    );
    assert_eq!(lines[1], "role: gateway");
    for prefix in [
        "issuer: ",
        "subject: ",
        "serial: ",
        "not_before: ",
        "not_after: ",
        "expired: false",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(prefix)),
            "no `{prefix}` line in\n{text}"
        );
    }
    assert!(
        text.contains("issuer: O=Strait, OU=strait.test, CN=Strait federation CA"),
        "{text}"
    );
    assert!(text.contains(&format!("not_after: {}", info.not_after)));
    assert!(info.not_after.ends_with('Z') && info.not_after.len() == 20);

    let json: serde_json::Value = serde_json::to_value(&info).unwrap();
    assert_eq!(json["role"], "gateway");
    assert_eq!(
        json["identity"],
        "spiffe://strait.test/cluster/east/gateway"
    );
    assert_eq!(json["expired"], false);
    assert_eq!(json["chain_length"], 2);

    let ca_text = inspect_pem(ca.ca_cert_pem()).unwrap().to_string();
    assert!(
        ca_text.starts_with("identity: spiffe://strait.test\nrole: ca\n"),
        "{ca_text}"
    );
}

#[test]
fn inspect_rejects_non_certificates() {
    let err = inspect_pem("hello").unwrap_err();
    assert!(matches!(err, IdentityError::BadCertificate(_)), "{err:?}");
}

#[test]
fn loaders_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.pem");
    let err = load_certs(&missing).unwrap_err();
    assert!(err.to_string().contains("nope.pem"), "{err}");

    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a pem file\n").unwrap();
    let err = load_certs(&junk).unwrap_err();
    assert!(err.to_string().contains("junk.pem"), "{err}");
    assert!(err.to_string().contains("no PEM CERTIFICATE"), "{err}");
    let err = load_private_key(&junk).unwrap_err();
    assert!(err.to_string().contains("junk.pem"), "{err}");
    assert!(err.to_string().contains("no PEM private key"), "{err}");
    let err = identity::load_roots(&junk).unwrap_err();
    assert!(err.to_string().contains("junk.pem"), "{err}");

    let broken = dir.path().join("broken.pem");
    std::fs::write(
        &broken,
        "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let err = load_certs(&broken).unwrap_err();
    assert!(err.to_string().contains("broken.pem"), "{err}");

    let ca = ca();
    ca.write(dir.path(), false).unwrap();
    let roots = identity::load_roots(dir.path().join("ca.pem")).unwrap();
    assert_eq!(roots.len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Real mutual-TLS handshakes over loopback TCP

struct Peer {
    chain: Vec<CertificateDer<'static>>,
    key: rustls_pki_types::PrivateKeyDer<'static>,
}

fn peer(ca: &CertificateAuthority, id: &SpiffeId) -> Peer {
    let issued = ca.issue(id, DAY).unwrap();
    Peer {
        chain: issued.cert_chain(),
        key: issued.private_key(),
    }
}

/// Runs one handshake (and a ping/pong when it succeeds). Returns the server's and the client's
/// results; the server's carries the client identity it saw.
async fn handshake(
    server: Peer,
    server_verifier: PeerVerifier,
    client: Peer,
    client_verifier: PeerVerifier,
) -> (
    Result<SpiffeId, std::io::Error>,
    Result<SpiffeId, std::io::Error>,
) {
    let server_config =
        identity::server_config(server.chain, server.key, Arc::new(server_verifier)).unwrap();
    let client_config =
        identity::client_config(client.chain, client.key, Arc::new(client_verifier)).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(server_config));
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = acceptor.accept(tcp).await?;
        let peer_cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first().cloned())
            .ok_or_else(|| std::io::Error::other("no client certificate"))?;
        let id = spiffe_id_from_cert(&peer_cert).map_err(std::io::Error::other)?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"ping");
        tls.write_all(b"pong").await?;
        tls.shutdown().await?;
        Ok::<_, std::io::Error>(id)
    });

    let connector = TlsConnector::from(Arc::new(client_config));
    let client_result = async {
        let tcp = TcpStream::connect(addr).await?;
        // Any valid name: the verifier checks the SPIFFE ID, not the name.
        let name = ServerName::try_from("east").unwrap();
        let mut tls = connector.connect(name, tcp).await?;
        let peer_cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first().cloned())
            .ok_or_else(|| std::io::Error::other("no server certificate"))?;
        let id = spiffe_id_from_cert(&peer_cert).map_err(std::io::Error::other)?;
        tls.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"pong");
        Ok::<_, std::io::Error>(id)
    };
    let client_result = tokio::time::timeout(Duration::from_secs(10), client_result)
        .await
        .expect("client timed out");
    let server_result = tokio::time::timeout(Duration::from_secs(10), server_task)
        .await
        .expect("server timed out")
        .unwrap();
    (server_result, client_result)
}

fn rustls_error(err: &std::io::Error) -> &rustls::Error {
    err.get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .unwrap_or_else(|| panic!("not a rustls error: {err:?}"))
}

#[tokio::test]
async fn mutual_tls_between_gateways_succeeds() {
    let ca = ca();
    let (server, client) = handshake(
        peer(&ca, &gateway("east")),
        gateway_verifier(&ca),
        peer(&ca, &gateway("west")),
        PeerVerifier::new(
            &[ca.ca_cert_der().clone()],
            Role::Gateway,
            allow_clusters(["east"]),
        )
        .unwrap(),
    )
    .await;
    assert_eq!(
        server.unwrap(),
        gateway("west"),
        "server saw the client's identity"
    );
    assert_eq!(
        client.unwrap(),
        gateway("east"),
        "client saw the server's identity"
    );
}

#[tokio::test]
async fn mutual_tls_rejects_a_client_of_another_ca() {
    let ca = ca();
    let rogue = CertificateAuthority::init(TD, identity::DEFAULT_CA_VALIDITY).unwrap();
    let (server, _client) = handshake(
        peer(&ca, &gateway("east")),
        gateway_verifier(&ca),
        // The rogue client trusts the real CA, so only the server can stop it.
        peer(&rogue, &gateway("west")),
        gateway_verifier(&ca),
    )
    .await;
    let err = server.expect_err("server must refuse a client of another CA");
    match rustls_error(&err) {
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => {}
        other => panic!("unexpected server error {other:?}"),
    }
}

#[tokio::test]
async fn mutual_tls_rejects_a_workload_posing_as_a_gateway() {
    let ca = ca();
    let (server, _client) = handshake(
        peer(&ca, &gateway("east")),
        gateway_verifier(&ca),
        peer(&ca, &workload("west", "shop", "web")),
        gateway_verifier(&ca),
    )
    .await;
    let err = server.expect_err("server must refuse a workload");
    let reason = rejection_reason(rustls_error(&err)).expect("an identity rejection");
    assert!(
        matches!(reason, IdentityError::WrongRole { .. }),
        "{reason:?}"
    );
    assert!(
        err.to_string().contains("a gateway identity is required"),
        "{err}"
    );
}

#[tokio::test]
async fn mutual_tls_client_rejects_an_unexpected_server() {
    let ca = ca();
    // The client dialled "west" but reached east's gateway.
    let (_server, client) = handshake(
        peer(&ca, &gateway("east")),
        gateway_verifier(&ca),
        peer(&ca, &gateway("west")),
        PeerVerifier::new(
            &[ca.ca_cert_der().clone()],
            Role::Gateway,
            allow_clusters(["west"]),
        )
        .unwrap(),
    )
    .await;
    let err = client.expect_err("client must refuse the wrong server");
    let reason = rejection_reason(rustls_error(&err)).expect("an identity rejection");
    assert!(
        matches!(reason, IdentityError::NotAuthorized { .. }),
        "{reason:?}"
    );
}

#[tokio::test]
async fn mutual_tls_rejects_an_expired_client() {
    let ca = ca();
    let now_sys = SystemTime::now();
    let expired = ca
        .issue_with_validity(&gateway("west"), now_sys - 2 * DAY, now_sys - DAY)
        .unwrap();
    let (server, _client) = handshake(
        peer(&ca, &gateway("east")),
        gateway_verifier(&ca),
        Peer {
            chain: expired.cert_chain(),
            key: expired.private_key(),
        },
        gateway_verifier(&ca),
    )
    .await;
    let err = server.expect_err("server must refuse an expired client");
    assert!(
        matches!(
            rustls_error(&err),
            rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. })
        ),
        "{err:?}"
    );
}
