//! The federation crate's integration tests, in one binary (one link instead of five).

mod identity;
mod registry;
mod route;
mod tcp_relay;
mod udp_relay;
