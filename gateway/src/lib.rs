//! Strait's east-west gateway: QUIC + mutual TLS peering between clusters, tunnels, link health.
//! Built in the gateway issue; its peer verifier already exists as
//! `federation::identity::PeerVerifier`.
#![forbid(unsafe_code)]
