//! Strait's test support, kept out of the components' crates: the tests, the benchmarks and the
//! lab (`strait lab`, a test and demo harness) use it; the gateway, the control plane and the
//! proxy never do.
//!
//! - [`etcd`] — runs local etcd processes: one member or a cluster of several, plaintext or TLS
//!   with client certificates; [`etcd::EtcdPki`] makes an etcd CA, server and client
//!   certificates for them.
//! - [`relay`] — a TCP relay that can cut, heal and delay a path, and a UDP relay (one learned
//!   client, or two fixed ends) that can blackhole, drop a percentage, delay and jitter (the
//!   loopback lab's links).
//! - [`ads`] — a light ADS client (state of the world, CDS + EDS) that ACKs everything: what the
//!   convergence benchmark runs by the hundred, and what tests use to watch a proxy's view.
#![forbid(unsafe_code)]

pub mod ads;
pub mod etcd;
pub mod relay;
