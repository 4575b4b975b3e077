//! ironlun daemon: configuration, targets and LUNs at run time, and the tokio server that
//! drives the sans-IO iSCSI and SCSI cores, the HTTP/JSON admin API and its client.

pub mod admin;
pub mod backend;
pub mod budget;
pub mod cli_docs;
pub mod config;
pub mod ctl;
pub mod ctl_config;
pub mod heap;
pub mod logging;
pub mod metrics;
pub mod migrate;
pub mod port_groups;
pub mod reconfig;
pub mod sd_notify;
pub mod server;
pub mod table;
pub mod target;
pub mod xcopy;
