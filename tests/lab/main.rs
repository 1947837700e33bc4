//! The lab end to end, netns and loopback mode, in one binary: the two never run at once
//! (each holds `common::LAB` while it runs).
// Tests and benchmarks: an unwrap is an assertion (a failure with the value's message).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod loopback;
mod netns;
