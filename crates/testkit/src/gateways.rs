//! Several `ironlun` gateways of one cluster on loopback (issue 18; scale-out.md §5 topology
//! L): gateway `i` is named `gw-<a+i>`, serves TPGT `i + 1` on a free port of 127.0.0.1 and
//! one target with LUN 0 on a medium every gateway shares (uring with `O_DIRECT`), and keeps
//! the LU's reservation state in the given etcd. Each runs on a data directory of its own and
//! is stopped like any [`Daemon`].

use crate::daemon::{Daemon, DaemonBuilder};
use crate::etcd::EtcdCluster;
use std::path::Path;

/// The name of gateway `i`: `gw-a`, `gw-b`, ….
pub fn gateway_name(i: usize) -> String {
    let c = char::from(b'a' + u8::try_from(i).expect("at most 26 gateways"));
    format!("gw-{c}")
}

/// A cluster of gateways as the tests run it.
#[derive(Debug, Clone, Copy)]
pub struct Gateways<'a> {
    /// How many gateways the layout lists.
    pub n: usize,
    /// The target every gateway serves.
    pub target: &'a str,
    /// LUN 0's medium (absolute path), shared by every gateway.
    pub image: &'a Path,
    /// Its size as the config takes it (`"64MiB"`).
    pub size: &'a str,
    /// The cluster's name (and LUN 0's serial prefix).
    pub cluster: &'a str,
    /// Lines added to every `[cluster]` table (timing keys).
    pub extra: &'a str,
}

impl Gateways<'_> {
    /// The config of gateway `i`, reaching etcd at `endpoints`.
    pub fn config(&self, i: usize, endpoints: &[String]) -> String {
        let medium = format!(
            "backstore = \"uring\"\ndirect = true\npath = \"{}\"",
            self.image.display()
        );
        self.config_on(i, endpoints, &medium)
    }

    /// [`config`](Self::config) with LUN 0's medium given by `medium`: its `backstore` line
    /// and the keys that backstore needs (`image`, `path`, …) in place of the shared uring
    /// file [`image`](Self::image).
    pub fn config_on(&self, i: usize, endpoints: &[String], medium: &str) -> String {
        let endpoints: Vec<String> = endpoints.iter().map(|e| format!("{e:?}")).collect();
        let layout: Vec<String> = (0..self.n)
            .map(|g| format!("{{ name = \"{}\", tpgts = [{}] }}", gateway_name(g), g + 1))
            .collect();
        format!(
            "[[portal]]\nlisten = \"127.0.0.1:0\"\ntpgt = {tpgt}\n\n\
             [[target]]\nname = \"{target}\"\nallow_target_reset = \"all\"\n\n\
             [[target.lun]]\nid = 0\n{medium}\nsize = \"{size}\"\nserial = \"{cluster}-lun0\"\n\n\
             [cluster]\nname = \"{name}\"\ncluster = \"{cluster}\"\nendpoints = [{endpoints}]\ngateways = [{layout}]\n{extra}\n",
            tpgt = i + 1,
            target = self.target,
            size = self.size,
            cluster = self.cluster,
            name = gateway_name(i),
            endpoints = endpoints.join(", "),
            layout = layout.join(", "),
            extra = self.extra,
        )
    }

    /// Start every gateway with `builder` (e.g. [`Daemon::release`]) on a fresh temp dir, one
    /// after the other (each has joined before the next starts), all reaching etcd at
    /// `etcd`'s endpoints.
    pub fn start(&self, builder: impl Fn() -> DaemonBuilder, etcd: &EtcdCluster) -> Vec<Daemon> {
        (0..self.n)
            .map(|i| {
                builder()
                    .config(&self.config(i, &etcd.endpoints()))
                    .portals()
                    .start()
            })
            .collect()
    }

    /// [`start`](Self::start) with LUN 0's medium given by `medium` (see
    /// [`config_on`](Self::config_on)).
    pub fn start_on(
        &self,
        builder: impl Fn() -> DaemonBuilder,
        etcd: &EtcdCluster,
        medium: &str,
    ) -> Vec<Daemon> {
        (0..self.n)
            .map(|i| {
                builder()
                    .config(&self.config_on(i, &etcd.endpoints(), medium))
                    .portals()
                    .start()
            })
            .collect()
    }
}
