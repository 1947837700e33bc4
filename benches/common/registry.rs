//! Registry contents at scale for the benchmarks: services `svc-N.default` with endpoints in
//! 10.x addresses, written to etcd as a cluster's publisher would.

use std::collections::BTreeMap;

use federation::model::{
    Endpoint, Locality, Name, Protocol, Service, ServiceEndpoints, ServiceKey, ServicePort,
};
use federation::registry::{Backend, Op};

pub fn id(s: &str) -> Name {
    Name::parse("c", s).expect("valid name")
}

pub fn service(i: usize) -> Service {
    Service::new(
        ServiceKey::new("default", &format!("svc-{i}")).expect("valid"),
        vec![ServicePort::new("http", 8080, Protocol::Http).expect("valid")],
    )
    .expect("valid")
}

/// `per` endpoints of service `i` in cluster `c` (index `ci`), the first on `port`.
pub fn endpoints(
    ci: usize,
    c: &str,
    region: &str,
    i: usize,
    per: usize,
    port: u16,
) -> ServiceEndpoints {
    let eps = (0..per)
        .map(|k| {
            let n = (i * per + k) as u32;
            let addr = std::net::Ipv4Addr::new(10, ci as u8, (n >> 8) as u8, n as u8);
            Endpoint::new(
                addr.into(),
                if k == 0 { port } else { 8080 },
                Locality::parse("l", &format!("{region}/{}", ["a", "b"][k % 2])).expect("valid"),
                id(c),
            )
            .expect("valid")
        })
        .collect();
    ServiceEndpoints::new(id(c), service(i), eps).expect("valid")
}

pub async fn commit_all(backend: &Backend, kvs: BTreeMap<String, Vec<u8>>) {
    let ops: Vec<Op> = kvs
        .into_iter()
        .map(|(key, value)| Op::Put {
            key,
            value,
            lease: None,
        })
        .collect();
    for batch in federation::registry::publisher::batches(ops, 128, 1 << 20) {
        backend.commit(batch).await.expect("etcd commit");
    }
}
