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

/// ALUA asymmetric access state active/optimized (SPC-4 Table 186).
pub const AO: u8 = 0x0;
/// ALUA asymmetric access state standby.
pub const STANDBY: u8 = 0x2;

/// Log `name` with `isid` in to LUN 0 of `target` at `addr` and clear the new nexus's unit
/// attentions (TEST UNIT READY until it reports none: GOOD, or NOT READY 04/0B through a
/// standby gateway). Panics if they do not clear in 8 tries.
pub async fn login_cleared(
    addr: std::net::SocketAddr,
    target: &str,
    name: &str,
    isid: [u8; 6],
) -> ironlun_initiator::Session {
    let s = crate::Login::new(name)
        .target(target)
        .isid(isid)
        .ready(&[], 0)
        .connect(addr)
        .await;
    let tur = ironlun_initiator::scsi::test_unit_ready_cdb();
    for _ in 0..8 {
        let r = s
            .command(0, &tur, bytes::Bytes::new(), 0)
            .await
            .expect("TEST UNIT READY");
        if crate::unit_attention(&r).is_none() {
            return s;
        }
    }
    panic!("unit attentions did not clear on {addr}");
}

/// Target port groups of LUN 0 and their asymmetric access states, from REPORT TARGET PORT
/// GROUPS through `s` (past unit attentions).
pub async fn rtpg(s: &ironlun_initiator::Session) -> Vec<(u16, u8)> {
    let cdb = [0xA3, 0x0A, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0];
    let r = crate::past_ua(s, 0, &cdb, bytes::Bytes::new(), 4096)
        .await
        .0;
    assert_eq!(r.status, 0, "RTPG: {:?}", r.sense_key());
    let mut out = Vec::new();
    let mut at = 4;
    while at + 8 <= r.data.len() {
        let d = &r.data[at..];
        out.push((u16::from_be_bytes([d[2], d[3]]), d[0] & 0x0f));
        at += 8 + 4 * usize::from(d[7]);
    }
    out
}

/// Poll [`rtpg`] through `s` until it reports `want` (hang guard `within`); how long it took.
pub async fn wait_rtpg(
    s: &ironlun_initiator::Session,
    want: &[(u16, u8)],
    within: std::time::Duration,
) -> std::time::Duration {
    let t = std::time::Instant::now();
    loop {
        let got = rtpg(s).await;
        if got == want {
            return t.elapsed();
        }
        assert!(t.elapsed() < within, "RTPG still {got:?}, want {want:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
