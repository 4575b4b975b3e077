//! The one test harness of the workspace (dev-only; DESIGN.md §4 tiers 4 and 6).
//!
//! - [`Daemon`]: run `ironlun serve` on a data directory, read its `listening`/`url`/`admin`
//!   lines, talk to its admin API, stop it (SIGTERM on drop, asserting a clean exit).
//! - [`Binary`]: which `ironlun` executable: the one cargo built for the calling test
//!   (`Binary::new(env!("CARGO_BIN_EXE_ironlun"))`) or the release build ([`Binary::release`]).
//! - [`Login`]: log in with `ironlun_initiator` and clear the power-on unit attention
//!   ([`clear_ua`] on a session already there); [`past_ua`]: a command past unit attentions.
//! - [`pattern`], [`tagged`], [`BackgroundIo`]: data to write, and I/O that runs for a whole test;
//!   [`preempt::Victims`]: the victim writers of a PREEMPT AND ABORT test and their checks.
//! - [`Scratch`]: a directory for `ironlun migrate` runs: journal, hook log, killing hooks.
//! - [`AdminStream`], [`parse_http_response`]: hand-written admin API requests.
//! - [`Binary::ctl`], [`Binary::ctl_at`], [`Daemon::ctl`]: the CLI against a daemon's admin API.
//! - [`EtcdCluster`]: real etcd members on loopback, stopped by PID; [`Proxy`]: a TCP proxy
//!   a test black-holes to cut one client off; [`Gateways`]: several gateways of one
//!   cluster on loopback sharing one LUN; [`Ceph`]: a one-node Ceph (monitor and memstore
//!   OSD) on loopback for RBD LUNs.
//! - [`require_tool`], [`repo_root`], [`run`], [`conformance`]: real initiator tools (tier 6).
//!
//! Helpers panic on failure (the panic message is the test's failure report), except those
//! that return the outcome for the test to check: [`Login::try_connect`],
//! [`DaemonBuilder::spawn_in`], [`Binary::ctl`], [`Binary::ctl_at`].
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]

mod admin;
pub mod ceph;
mod daemon;
mod etcd;
mod gateways;
pub mod handover_load;
mod io;
mod login;
pub mod preempt;
mod proxy;
mod scratch;
mod tools;

pub use admin::{admin_connect, parse_http_response, AdminStream};
pub use ceph::Ceph;
pub use daemon::{Binary, Daemon, DaemonBuilder, Refused, LISTEN_ANY};
pub use etcd::EtcdCluster;
pub use gateways::{gateway_name, login_cleared, rtpg, wait_rtpg, Gateways, AO, STANDBY};
pub use io::{pattern, tagged, BackgroundIo};
pub use login::{clear_ua, opts, past_ua, session, unit_attention, Login};
pub use proxy::Proxy;
pub use scratch::Scratch;
pub use tools::{
    conformance, conformance_of, conformance_paths, image_with_hole, qemu_img_round_trip,
    repo_root, require_tool, run, strip_ansi, REQUIRED_SUITES,
};

use std::time::Duration;

/// The embedded default target.
pub const TARGET: &str = "iqn.2026-11.io.ironlun:lab";
/// The block size of the default target's LUN 0.
pub const BLOCK_SIZE: u32 = 512;
/// The default LUN 0's size in blocks: 1 GiB.
pub const BLOCKS: u64 = (1 << 30) / 512;
/// Upper bound for anything the daemon should do "promptly" (generous: 2 loaded cores).
pub const PROMPT: Duration = Duration::from_secs(10);
