//! `[cluster]`: this daemon as one gateway of several that share each LU's reservation state
//! in etcd (issue 18; `../shared/reference/scale-out.md` §2.4 for the timing). Absent: one
//! node, exactly as without it.
//!
//! ```toml
//! [cluster]
//! name = "gw-a"                     # this gateway; unique in the cluster
//! cluster = "lab"                   # keys live under /ironlun/v1/<cluster>/
//! endpoints = ["127.0.0.1:2379", "127.0.0.1:22379", "127.0.0.1:32379"]
//! lease_ttl_ms = 5000               # T
//! margin_ms = 500                   # m: the local deadline's distance from expiry
//! lock_delay_ms = 2000              # Δ: wait after a gateway's lease is gone
//! clock_error_ppm = 10000           # ρ: how far a monotonic clock may run slow or fast
//! keepalive_interval_ms = 1000      # default T/5
//! etcd_timeout_ms = 800             # one etcd call's deadline
//! # The layout, identical on every gateway: each gateway and the TPGTs (relative target
//! # port identifiers) of its portals. Position = gateway id (lower ids record a dead
//! # gateway's departure); this gateway's entry must list exactly its portals' TPGTs.
//! gateways = [{ name = "gw-a", tpgts = [1] }, { name = "gw-b", tpgts = [2] }]
//! ```

use super::{ConfigError, Ctx};
use ironlun_cluster::lease::{LeaseSettings, Timing};
use serde::Deserialize;
use std::time::Duration;
use toml::Spanned;

/// The raw `[cluster]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    name: Spanned<String>,
    cluster: Option<Spanned<String>>,
    endpoints: Spanned<Vec<Spanned<String>>>,
    lease_ttl_ms: Option<Spanned<u64>>,
    margin_ms: Option<Spanned<u64>>,
    lock_delay_ms: Option<Spanned<u64>>,
    clock_error_ppm: Option<Spanned<u32>>,
    keepalive_interval_ms: Option<Spanned<u64>>,
    etcd_timeout_ms: Option<Spanned<u64>>,
    gateways: Option<Spanned<Vec<RawGateway>>>,
}

/// One entry of `gateways`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGateway {
    name: Spanned<String>,
    tpgts: Spanned<Vec<u16>>,
}

/// One gateway of the layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gateway {
    /// Its `[cluster] name`.
    pub name: String,
    /// The TPGTs of its portals: its relative target port identifiers.
    pub tpgts: Vec<u16>,
}

/// The validated `[cluster]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// This gateway's name: 1–63 of `a-z 0-9 - _ .`, starting with a letter or digit.
    pub name: String,
    /// The cluster's name (same charset), default `default`; keys live under
    /// [`Cluster::prefix`].
    pub cluster: String,
    /// etcd client endpoints, `host:port` (plain HTTP).
    pub endpoints: Vec<String>,
    /// Lease TTL `T` (whole seconds: etcd grants seconds).
    pub lease_ttl: Duration,
    /// Margin `m` between the local deadline and the lease's expiry.
    pub margin: Duration,
    /// Lock delay `Δ`.
    pub lock_delay: Duration,
    /// Clock rate error ρ, parts per million.
    pub clock_error_ppm: u32,
    /// How often the lease is renewed.
    pub keepalive_interval: Duration,
    /// One etcd call's deadline.
    pub etcd_timeout: Duration,
    /// The layout: every gateway in id order (id = position + 1).
    pub gateways: Vec<Gateway>,
}

impl Cluster {
    /// The timing parameters as the protocol crate takes them (scale-out.md §2.4).
    pub fn lease_settings(&self) -> LeaseSettings {
        LeaseSettings {
            ttl: self.lease_ttl,
            rho_ppm: self.clock_error_ppm,
            margin: self.margin,
            lock_delay: self.lock_delay,
            keepalive_interval: self.keepalive_interval,
        }
    }

    /// The key prefix of this cluster: `/ironlun/v1/<cluster>/`.
    pub fn prefix(&self) -> String {
        format!("/ironlun/v1/{}/", self.cluster)
    }

    /// This gateway's id: its position in `gateways`, from 1.
    pub fn id(&self) -> ironlun_cluster::GatewayId {
        let at = self.gateways.iter().position(|g| g.name == self.name);
        ironlun_cluster::GatewayId(at.map_or(0, |i| u32::try_from(i + 1).unwrap_or(u32::MAX)))
    }

    /// This gateway's TPGTs.
    pub fn own_ports(&self) -> Vec<u16> {
        let mine = self.gateways.iter().find(|g| g.name == self.name);
        mine.map(|g| g.tpgts.clone()).unwrap_or_default()
    }

    /// Every gateway's TPGTs, sorted: the cluster-wide relative target port identifiers
    /// (scale-out.md §2.2, `PrContext::relative_ports`).
    pub fn cluster_ports(&self) -> Vec<u16> {
        let mut all: Vec<u16> = self.gateways.iter().flat_map(|g| g.tpgts.clone()).collect();
        all.sort_unstable();
        all
    }

    /// One target port group per gateway: id = gateway id, its TPGTs; transitioning until
    /// the ALUA state is read from etcd.
    pub fn port_groups(&self) -> Vec<ironlun_scsi::alua::PortGroup> {
        self.gateways
            .iter()
            .enumerate()
            .map(|(i, g)| ironlun_scsi::alua::PortGroup {
                id: u16::try_from(i + 1).unwrap_or(u16::MAX),
                state: ironlun_scsi::alua::AccessState::Transitioning,
                ports: g.tpgts.clone(),
                changed: false,
            })
            .collect()
    }

    /// The layout as one canonical line, stored at `P/config` by the first gateway and
    /// compared by every later one (scale-out.md §2.1): `gw-a=1;gw-b=2,3`.
    pub fn layout(&self) -> String {
        let entries: Vec<String> = self
            .gateways
            .iter()
            .map(|g| {
                let t: Vec<String> = g.tpgts.iter().map(u16::to_string).collect();
                format!("{}={}", g.name, t.join(","))
            })
            .collect();
        entries.join(";")
    }
}

/// A gateway or cluster name: it is part of etcd keys, so no `/`.
fn valid_name(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

/// Validate `[cluster]`. The timing must give a safe self-fencing bound
/// (scale-out.md §2.4): `keepalive_interval + margin < T·(1−ρ)`, so that a gateway whose
/// keep-alives all succeed never reaches its deadline; the etcd call deadline below the
/// keep-alive interval, so a hung call cannot skip a renewal.
pub(super) fn parse(
    cx: &Ctx<'_>,
    raw: &RawCluster,
    portal_tpgts: &[u16],
) -> Result<Cluster, ConfigError> {
    if !valid_name(raw.name.get_ref()) {
        return cx.err(
            raw.name.span(),
            "cluster.name",
            "1 to 63 characters of a-z, 0-9, '-', '_', '.', starting with a letter or digit",
        );
    }
    let cluster =
        match &raw.cluster {
            Some(c) if !valid_name(c.get_ref()) => return cx.err(
                c.span(),
                "cluster.cluster",
                "1 to 63 characters of a-z, 0-9, '-', '_', '.', starting with a letter or digit",
            ),
            Some(c) => c.get_ref().clone(),
            None => "default".to_string(),
        };
    if raw.endpoints.get_ref().is_empty() {
        return cx.err(
            raw.endpoints.span(),
            "cluster.endpoints",
            "at least one etcd endpoint, e.g. [\"127.0.0.1:2379\"]",
        );
    }
    let mut endpoints = Vec::new();
    for e in raw.endpoints.get_ref() {
        let text = e.get_ref();
        if let Err(why) = crate::etcd::Etcd::new(std::slice::from_ref(text), Duration::from_secs(1))
        {
            return cx.err(e.span(), "cluster.endpoints", why);
        }
        endpoints.push(text.clone());
    }
    let ms = |v: &Option<Spanned<u64>>, default: u64| v.as_ref().map_or(default, |s| *s.get_ref());
    let ttl_ms = ms(&raw.lease_ttl_ms, 5000);
    if let Some(t) = &raw.lease_ttl_ms {
        if ttl_ms < 2000 || ttl_ms % 1000 != 0 || ttl_ms > 600_000 {
            return cx.err(
                t.span(),
                "cluster.lease_ttl_ms",
                "whole seconds from 2000 to 600000 (etcd grants leases in seconds)",
            );
        }
    }
    let c = Cluster {
        name: raw.name.get_ref().clone(),
        cluster,
        endpoints,
        lease_ttl: Duration::from_millis(ttl_ms),
        margin: Duration::from_millis(ms(&raw.margin_ms, 500)),
        lock_delay: Duration::from_millis(ms(&raw.lock_delay_ms, 2000)),
        clock_error_ppm: raw
            .clock_error_ppm
            .as_ref()
            .map_or(10_000, |s| *s.get_ref()),
        keepalive_interval: Duration::from_millis(ms(&raw.keepalive_interval_ms, ttl_ms / 5)),
        etcd_timeout: Duration::from_millis(ms(&raw.etcd_timeout_ms, 800)),
        gateways: Vec::new(),
    };
    let at = |v: &Option<Spanned<u64>>| v.as_ref().map(Spanned::span);
    let span_or_table = |s: Option<std::ops::Range<usize>>| s.unwrap_or_else(|| raw.name.span());
    for (key, value, span) in [
        ("cluster.margin_ms", c.margin, at(&raw.margin_ms)),
        (
            "cluster.lock_delay_ms",
            c.lock_delay,
            at(&raw.lock_delay_ms),
        ),
        (
            "cluster.keepalive_interval_ms",
            c.keepalive_interval,
            at(&raw.keepalive_interval_ms),
        ),
        (
            "cluster.etcd_timeout_ms",
            c.etcd_timeout,
            at(&raw.etcd_timeout_ms),
        ),
    ] {
        if value.is_zero() {
            return cx.err(span_or_table(span), key, "must be positive");
        }
    }
    if c.clock_error_ppm >= 500_000 {
        let span = raw.clock_error_ppm.as_ref().map(Spanned::span);
        return cx.err(
            span_or_table(span),
            "cluster.clock_error_ppm",
            "must be below 500000",
        );
    }
    // The bound itself is the protocol crate's rule (one place): keepalive interval + margin
    // below T(1−ρ).
    if let Err(e) = Timing::new(c.lease_settings()) {
        let span = at(&raw.keepalive_interval_ms).or(at(&raw.margin_ms));
        return cx.err(
            span_or_table(span),
            "cluster.keepalive_interval_ms",
            e.to_string(),
        );
    }
    if c.etcd_timeout >= c.keepalive_interval {
        let span = at(&raw.etcd_timeout_ms);
        return cx.err(
            span_or_table(span),
            "cluster.etcd_timeout_ms",
            format!(
                "must be below keepalive_interval_ms ({} ms), so that one hung call cannot skip a renewal",
                c.keepalive_interval.as_millis()
            ),
        );
    }
    let mut c = c;
    c.gateways = parse_gateways(cx, raw, portal_tpgts)?;
    Ok(c)
}

/// `gateways`: 1–32 distinct names, each with distinct TPGTs no other gateway has; this
/// gateway among them with exactly its portals' TPGTs.
fn parse_gateways(
    cx: &Ctx<'_>,
    raw: &RawCluster,
    portal_tpgts: &[u16],
) -> Result<Vec<Gateway>, ConfigError> {
    let Some(list) = &raw.gateways else {
        return cx.err(
            raw.name.span(),
            "cluster.gateways",
            "required: every gateway and its TPGTs, e.g. [{ name = \"gw-a\", tpgts = [1] }]",
        );
    };
    if !(1..=32).contains(&list.get_ref().len()) {
        return cx.err(list.span(), "cluster.gateways", "1 to 32 gateways");
    }
    let mut out: Vec<Gateway> = Vec::new();
    for g in list.get_ref() {
        let name = g.name.get_ref();
        if !valid_name(name) {
            return cx.err(
                g.name.span(),
                "cluster.gateways.name",
                "1 to 63 characters of a-z, 0-9, '-', '_', '.', starting with a letter or digit",
            );
        }
        if out.iter().any(|o| &o.name == name) {
            return cx.err(
                g.name.span(),
                "cluster.gateways.name",
                format!("{name:?} appears twice"),
            );
        }
        let mut tpgts = g.tpgts.get_ref().clone();
        tpgts.sort_unstable();
        tpgts.dedup();
        if tpgts.is_empty() || tpgts.len() != g.tpgts.get_ref().len() {
            return cx.err(
                g.tpgts.span(),
                "cluster.gateways.tpgts",
                "one or more distinct TPGTs",
            );
        }
        if let Some(o) = out
            .iter()
            .find(|o| o.tpgts.iter().any(|t| tpgts.contains(t)))
        {
            return cx.err(
                g.tpgts.span(),
                "cluster.gateways.tpgts",
                format!(
                    "a TPGT of {name:?} is also {:?}'s: relative port identifiers are cluster-wide",
                    o.name
                ),
            );
        }
        out.push(Gateway {
            name: name.clone(),
            tpgts,
        });
    }
    let Some(me) = out.iter().find(|g| g.name == *raw.name.get_ref()) else {
        return cx.err(
            list.span(),
            "cluster.gateways",
            format!("this gateway ({:?}) is not listed", raw.name.get_ref()),
        );
    };
    let mut ours = portal_tpgts.to_vec();
    ours.sort_unstable();
    ours.dedup();
    if me.tpgts != ours {
        return cx.err(
            list.span(),
            "cluster.gateways",
            format!(
                "{:?} lists TPGTs {:?} but this daemon's portals have {:?}",
                me.name, me.tpgts, ours
            ),
        );
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use crate::config::{Config, ConfigError};
    use std::path::Path;
    use std::time::Duration;

    const TARGET: &str = "[[target]]\nname = \"iqn.2026-11.io.ironlun:a\"\n[[target.lun]]\nid = 0\nbackstore = \"uring\"\npath = \"l.img\"\ndirect = true\nsize = 4096\n";

    fn parse(cluster: &str) -> Result<Config, ConfigError> {
        let text = format!("{TARGET}[cluster]\n{cluster}");
        Config::parse("t.toml", &text, Some(Path::new("/tmp")), None)
    }

    #[test]
    fn absent_means_one_node_and_defaults_follow_the_design() {
        let c = Config::parse("t.toml", TARGET, None, None).unwrap();
        assert_eq!(c.cluster, None);
        let c = parse(
            "name = \"gw-a\"\nendpoints = [\"127.0.0.1:2379\"]\ngateways = [{ name = \"gw-a\", tpgts = [1] }, { name = \"gw-b\", tpgts = [2, 3] }]\n",
        )
        .unwrap()
        .cluster
        .unwrap();
        assert_eq!(c.id(), ironlun_cluster::GatewayId(1));
        assert_eq!(c.cluster_ports(), vec![1, 2, 3]);
        assert_eq!(c.layout(), "gw-a=1;gw-b=2,3");
        assert_eq!(c.prefix(), "/ironlun/v1/default/");
        assert_eq!(
            (c.lease_ttl, c.margin, c.lock_delay, c.clock_error_ppm),
            (
                Duration::from_secs(5),
                Duration::from_millis(500),
                Duration::from_secs(2),
                10_000
            )
        );
        assert_eq!(c.keepalive_interval, Duration::from_secs(1));
    }

    #[test]
    fn errors_name_the_line_and_key() {
        let cases = [
            ("name = \"GW/A\"\nendpoints = [\"127.0.0.1:2379\"]\n", 10, "cluster.name"),
            ("name = \"a\"\nendpoints = []\n", 11, "cluster.endpoints"),
            ("name = \"a\"\nendpoints = [\"https://e:1\"]\n", 11, "cluster.endpoints"),
            (
                "name = \"a\"\nendpoints = [\"e:1\"]\nlease_ttl_ms = 2500\n",
                12,
                "cluster.lease_ttl_ms",
            ),
            (
                "name = \"a\"\nendpoints = [\"e:1\"]\nlease_ttl_ms = 2000\nkeepalive_interval_ms = 1600\n",
                13,
                "cluster.keepalive_interval_ms",
            ),
            (
                "name = \"a\"\nendpoints = [\"e:1\"]\netcd_timeout_ms = 1000\n",
                12,
                "cluster.etcd_timeout_ms",
            ),
            ("name = \"a\"\nendpoints = [\"e:1\"]\nlock_delay_ms = 0\n", 12, "cluster.lock_delay_ms"),
            ("name = \"a\"\nendpoints = [\"e:1\"]\nttl = 5\n", 12, "ttl"),
            ("name = \"a\"\nendpoints = [\"e:1\"]\n", 10, "cluster.gateways"),
            (
                "name = \"a\"\nendpoints = [\"e:1\"]\ngateways = [{ name = \"b\", tpgts = [1] }]\n",
                12,
                "cluster.gateways",
            ),
            (
                "name = \"a\"\nendpoints = [\"e:1\"]\ngateways = [{ name = \"a\", tpgts = [2] }]\n",
                12,
                "cluster.gateways",
            ),
            (
                "name = \"a\"\nendpoints = [\"e:1\"]\ngateways = [{ name = \"a\", tpgts = [1] }, { name = \"b\", tpgts = [1] }]\n",
                12,
                "cluster.gateways.tpgts",
            ),
        ];
        for (text, line, key) in cases {
            let e = parse(text).unwrap_err();
            assert_eq!((e.line, e.key.as_str()), (Some(line), key), "{text:?}: {e}");
        }
        // A LUN whose medium the other gateways cannot share through no page cache.
        let ram = "[[target]]\nname = \"iqn.2026-11.io.ironlun:a\"\n[[target.lun]]\nid = 0\nbackstore = \"ram\"\nsize = 4096\n\
                   [cluster]\nname = \"a\"\nendpoints = [\"e:1\"]\ngateways = [{ name = \"a\", tpgts = [1] }]\n";
        let e = Config::parse("t.toml", ram, Some(Path::new("/tmp")), None).unwrap_err();
        assert_eq!(
            (e.line, e.key.as_str()),
            (Some(5), "target[0].lun[0].backstore"),
            "{e}"
        );
    }
}
