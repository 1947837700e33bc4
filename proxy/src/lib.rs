//! Strait's sidecar proxy: the xDS-fed data plane in every cluster. Built in the proxy issue.
#![forbid(unsafe_code)]
