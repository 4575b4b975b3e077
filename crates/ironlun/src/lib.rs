//! ironlun daemon: configuration, targets and LUNs at run time, and the tokio server that
//! drives the sans-IO iSCSI and SCSI cores.

pub mod backend;
pub mod config;
pub mod server;
pub mod target;
