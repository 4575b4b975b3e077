//! The `ironlun` command line's client side: `ironlun ctl` (the admin API's client), `ironlun
//! migrate` (the handover coordinator's driver), `ironlun vhd` (offline VHD tools) and the
//! generated completions and manual pages. It depends on the API crate (`ironlun-api`) for
//! every wire type and never on the daemon (`ironlun`'s library); `scripts/check-layers.py`
//! checks that.

pub mod cli_docs;
pub mod cluster;
pub mod ctl;
pub mod ctl_config;
pub mod migrate;
pub mod port_groups;
pub mod table;
pub mod vhd_cmd;
