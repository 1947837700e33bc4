//! The lab end to end, netns and loopback mode, in one binary: the two never run at once
//! (each holds `common::LAB` while it runs).

mod common;
mod loopback;
mod netns;
