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
pub(super) fn parse(cx: &Ctx<'_>, raw: &RawCluster) -> Result<Cluster, ConfigError> {
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
    Ok(c)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use crate::config::{Config, ConfigError};
    use std::path::Path;
    use std::time::Duration;

    const TARGET: &str = "[[target]]\nname = \"iqn.2026-11.io.ironlun:a\"\n[[target.lun]]\nid = 0\nbackstore = \"ram\"\nsize = 4096\n";

    fn parse(cluster: &str) -> Result<Config, ConfigError> {
        let text = format!("{TARGET}[cluster]\n{cluster}");
        Config::parse("t.toml", &text, Some(Path::new("/tmp")), None)
    }

    #[test]
    fn absent_means_one_node_and_defaults_follow_the_design() {
        let c = Config::parse("t.toml", TARGET, None, None).unwrap();
        assert_eq!(c.cluster, None);
        let c = parse("name = \"gw-a\"\nendpoints = [\"127.0.0.1:2379\"]\n")
            .unwrap()
            .cluster
            .unwrap();
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
            ("name = \"GW/A\"\nendpoints = [\"127.0.0.1:2379\"]\n", 8, "cluster.name"),
            ("name = \"a\"\nendpoints = []\n", 9, "cluster.endpoints"),
            ("name = \"a\"\nendpoints = [\"https://e:1\"]\n", 9, "cluster.endpoints"),
            (
                "name = \"a\"\nendpoints = [\"e:1\"]\nlease_ttl_ms = 2500\n",
                10,
                "cluster.lease_ttl_ms",
            ),
            (
                "name = \"a\"\nendpoints = [\"e:1\"]\nlease_ttl_ms = 2000\nkeepalive_interval_ms = 1600\n",
                11,
                "cluster.keepalive_interval_ms",
            ),
            (
                "name = \"a\"\nendpoints = [\"e:1\"]\netcd_timeout_ms = 1000\n",
                10,
                "cluster.etcd_timeout_ms",
            ),
            ("name = \"a\"\nendpoints = [\"e:1\"]\nlock_delay_ms = 0\n", 10, "cluster.lock_delay_ms"),
            ("name = \"a\"\nendpoints = [\"e:1\"]\nttl = 5\n", 10, "ttl"),
        ];
        for (text, line, key) in cases {
            let e = parse(text).unwrap_err();
            assert_eq!((e.line, e.key.as_str()), (Some(line), key), "{text:?}: {e}");
        }
    }
}
