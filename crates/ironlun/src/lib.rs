//! ironlun daemon: configuration, targets and LUNs at run time, the tokio server that drives
//! the sans-IO iSCSI and SCSI cores, and the HTTP/JSON admin API's server (its wire types are
//! `ironlun-api`; its client is `ironlun-cli`).

pub mod admin;
pub mod backend;
pub mod budget;
pub mod cluster;
pub mod config;
pub mod etcd;
#[cfg(test)]
mod gated;
pub mod heap;
pub mod logging;
pub mod metrics;
pub mod reconfig;
pub mod sd_notify;
pub mod server;
pub mod target;
