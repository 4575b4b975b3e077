//! SendTargets (RFC 7143 §13.3, Appendix C): the target list a Text Request asks for.
//!
//! A target is reported with every portal of every portal group that serves it, each as
//! `TargetAddress=<address>:<port>,<portal group tag>` (§13.9), so that an initiator that
//! discovers through one portal learns every path to the target (multipath), as LIO answers.
//! A portal listening on a wildcard address (`0.0.0.0`, `[::]`) has no address of its own
//! to report: it is reported with the local address of the connection that asks (the
//! address the initiator reached the daemon on), which is how LIO and tgt answer too.

use crate::connection::TargetInfo;
use std::net::{IpAddr, SocketAddr};

/// One portal of a target portal group, as SendTargets reports it (§13.9 TargetAddress).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TargetPortal {
    /// The address the portal listens on (its port resolved); an unspecified IP is a
    /// wildcard ([`TargetPortal::reported`]).
    pub addr: SocketAddr,
    /// Its target portal group tag (§13.9, 1..=65535).
    pub tpgt: u16,
}

impl TargetPortal {
    pub fn new(addr: SocketAddr, tpgt: u16) -> Self {
        TargetPortal { addr, tpgt }
    }

    /// The address to report to a connection whose local address is `local`: the portal's
    /// own address, or for a wildcard portal `local`'s IP with the portal's port. `None`
    /// when a wildcard portal cannot be named: no local address is known, or an IPv4
    /// wildcard asked about over IPv6 (an IPv6 wildcard serves IPv4 too, through mapped
    /// addresses, which are reported as plain IPv4).
    pub fn reported(&self, local: Option<SocketAddr>) -> Option<SocketAddr> {
        if !self.addr.ip().is_unspecified() {
            return Some(self.addr);
        }
        let ip = local?.ip().to_canonical();
        match (self.addr.ip(), ip) {
            (IpAddr::V4(_), IpAddr::V6(_)) => None,
            _ => Some(SocketAddr::new(ip, self.addr.port())),
        }
    }
}

/// The TargetAddress value for `addr` in portal group `tpgt` (§13.9:
/// `domainname[:port][,portal-group-tag]`, an IPv6 address in brackets as in RFC 3986):
/// `192.0.2.1:3260,1`, `[2001:db8::1]:3260,2`. An IPv6 zone (scope id) is left out: it
/// names an interface of the target, meaningless to the initiator.
pub fn target_address(addr: SocketAddr, tpgt: u16) -> String {
    match addr.ip() {
        IpAddr::V4(ip) => format!("{ip}:{},{tpgt}", addr.port()),
        IpAddr::V6(ip) => format!("[{ip}]:{},{tpgt}", addr.port()),
    }
}

/// As [`send_targets`], listing only the targets whose [`Acl`](crate::acl::Acl) lets
/// `initiator` log in: a target the initiator may not use is not revealed, even when asked
/// for by name.
pub fn send_targets_for(
    initiator: &str,
    value: &str,
    targets: &[TargetInfo],
    session_target: Option<&str>,
    local: Option<SocketAddr>,
) -> Vec<(String, String)> {
    if targets.iter().all(|t| t.acl.allows(initiator)) {
        return send_targets(value, targets, session_target, local);
    }
    let visible: Vec<TargetInfo> = targets
        .iter()
        .filter(|t| {
            let ok = t.acl.allows(initiator);
            if !ok {
                tracing::debug!(initiator, target = %t.name, "SendTargets: target hidden by its ACL");
            }
            ok
        })
        .cloned()
        .collect();
    send_targets(value, &visible, session_target, local)
}

/// Answer `SendTargets=<value>`. `All` lists every target in a discovery session; in a normal
/// session (`session_target` set) it lists only the session's target, as does an empty value;
/// an iSCSI name lists that target if it exists. Each target is `TargetName=` followed by one
/// `TargetAddress=addr:port,tpgt` per portal of [`TargetInfo::addresses`] (wildcard portals
/// named by `local`, the connection's local address: [`TargetPortal::reported`]; the same
/// address and tag once).
///
/// Lists every target regardless of its [`Acl`](crate::acl::Acl): see [`send_targets_for`].
pub fn send_targets(
    value: &str,
    targets: &[TargetInfo],
    session_target: Option<&str>,
    local: Option<SocketAddr>,
) -> Vec<(String, String)> {
    let selected: Vec<&TargetInfo> = match (value, session_target) {
        ("All", None) => targets.iter().collect(),
        ("All", Some(own)) | ("", Some(own)) => targets.iter().filter(|t| t.name == own).collect(),
        ("", None) => Vec::new(),
        (name, _) => targets.iter().filter(|t| t.name == name).collect(),
    };
    let mut out = Vec::new();
    for t in selected {
        out.push(("TargetName".to_string(), t.name.clone()));
        let mut listed: Vec<(SocketAddr, u16)> = Vec::with_capacity(t.addresses.len());
        for p in &t.addresses {
            let Some(addr) = p.reported(local) else {
                continue;
            };
            if listed.contains(&(addr, p.tpgt)) {
                continue;
            }
            listed.push((addr, p.tpgt));
            out.push(("TargetAddress".to_string(), target_address(addr, p.tpgt)));
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::acl::Acl;

    fn portal(addr: &str, tpgt: u16) -> TargetPortal {
        TargetPortal::new(addr.parse().unwrap(), tpgt)
    }

    fn targets() -> Vec<TargetInfo> {
        vec![
            TargetInfo {
                name: "iqn.2026-11.io.ironlun:a".into(),
                alias: None,
                addresses: vec![portal("127.0.0.1:3260", 1)],
                portal_group_tag: 1,
                acl: Acl::allow_all(),
                chap: None,
            },
            TargetInfo {
                name: "iqn.2026-11.io.ironlun:b".into(),
                alias: Some("bee".into()),
                addresses: vec![portal("[::1]:3260", 7)],
                portal_group_tag: 7,
                acl: Acl::allow_only(vec![crate::acl::NamePattern::parse(
                    "iqn.2026-11.io.example:*",
                )
                .unwrap()]),
                chap: None,
            },
        ]
    }

    /// One target served on two portal groups of two portals each (one a wildcard), as the
    /// daemon builds it: every target has every portal.
    fn multipath() -> Vec<TargetInfo> {
        let portals = vec![
            portal("192.0.2.1:3260", 1),
            portal("192.0.2.1:3261", 1),
            portal("198.51.100.7:3260", 2),
            portal("[2001:db8::7]:3260", 2),
            portal("0.0.0.0:3262", 3),
        ];
        ["iqn.2026-11.io.ironlun:mp", "iqn.2026-11.io.ironlun:other"]
            .iter()
            .map(|n| TargetInfo {
                name: (*n).into(),
                alias: None,
                addresses: portals.clone(),
                portal_group_tag: 1,
                acl: Acl::allow_all(),
                chap: None,
            })
            .collect()
    }

    fn kv(k: &str, v: &str) -> (String, String) {
        (k.to_string(), v.to_string())
    }

    fn addresses(v: &[(String, String)]) -> Vec<&str> {
        v.iter()
            .filter(|(k, _)| k == "TargetAddress")
            .map(|(_, v)| v.as_str())
            .collect()
    }

    #[test]
    fn all_in_discovery_lists_every_target() {
        assert_eq!(
            send_targets("All", &targets(), None, None),
            vec![
                kv("TargetName", "iqn.2026-11.io.ironlun:a"),
                kv("TargetAddress", "127.0.0.1:3260,1"),
                kv("TargetName", "iqn.2026-11.io.ironlun:b"),
                kv("TargetAddress", "[::1]:3260,7"),
            ]
        );
    }

    #[test]
    fn a_target_is_listed_with_every_portal_of_every_group_and_its_tag() {
        let local = Some("192.0.2.1:3261".parse().unwrap());
        let all = send_targets("All", &multipath(), None, local);
        let want = vec![
            "192.0.2.1:3260,1",
            "192.0.2.1:3261,1",
            "198.51.100.7:3260,2",
            "[2001:db8::7]:3260,2",
            // The wildcard portal, named by the address this connection arrived on.
            "192.0.2.1:3262,3",
        ];
        assert_eq!(
            all.first(),
            Some(&kv("TargetName", "iqn.2026-11.io.ironlun:mp"))
        );
        assert_eq!(all.len(), 2 * (1 + want.len()));
        assert_eq!(addresses(&all[..=want.len()]), want);
        // Asked for by name (in a discovery or a normal session): the same portals.
        let one = send_targets("iqn.2026-11.io.ironlun:mp", &multipath(), None, local);
        assert_eq!(one, all[..=want.len()].to_vec());
        let own = Some("iqn.2026-11.io.ironlun:other");
        let own_all = send_targets("All", &multipath(), own, local);
        assert_eq!(
            own_all.first(),
            Some(&kv("TargetName", "iqn.2026-11.io.ironlun:other"))
        );
        assert_eq!(addresses(&own_all), want);
    }

    #[test]
    fn wildcard_portals_take_the_connection_local_address() {
        let any4 = portal("0.0.0.0:3260", 1);
        let any6 = portal("[::]:3261", 2);
        let fixed = portal("192.0.2.9:3263", 4);
        let at = |s: &str| Some(s.parse::<SocketAddr>().unwrap());
        assert_eq!(any4.reported(at("10.0.0.5:3260")), at("10.0.0.5:3260"));
        // Arrived on another portal: that address, the wildcard portal's port.
        assert_eq!(any4.reported(at("10.0.0.5:3999")), at("10.0.0.5:3260"));
        assert_eq!(any6.reported(at("[fe80::1%2]:3261")), at("[fe80::1]:3261"));
        // An IPv6 wildcard reached over IPv4 sees a mapped address: reported as IPv4.
        assert_eq!(
            any6.reported(at("[::ffff:10.0.0.5]:3261")),
            at("10.0.0.5:3261")
        );
        assert_eq!(any6.reported(at("10.0.0.5:3260")), at("10.0.0.5:3261"));
        // An IPv4 wildcard cannot be reached on an IPv6 address; no local address: unnamed.
        assert_eq!(any4.reported(at("[2001:db8::5]:3261")), None);
        assert_eq!(any4.reported(None), None);
        assert_eq!(fixed.reported(None), at("192.0.2.9:3263"));
        assert_eq!(fixed.reported(at("10.0.0.5:3260")), at("192.0.2.9:3263"));
    }

    #[test]
    fn target_address_encoding() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(target_address(a("127.0.0.2:3261"), 2), "127.0.0.2:3261,2");
        assert_eq!(target_address(a("[::1]:3260"), 65535), "[::1]:3260,65535");
        assert_eq!(
            target_address(a("[fe80::1%3]:3260"), 1),
            "[fe80::1]:3260,1",
            "no zone"
        );
    }

    #[test]
    fn the_same_address_and_tag_once_and_unnamed_wildcards_left_out() {
        let mut t = targets();
        t[0].addresses = vec![
            portal("0.0.0.0:3260", 1),
            portal("127.0.0.1:3260", 1),
            portal("127.0.0.1:3260", 2),
        ];
        let local = Some("127.0.0.1:3260".parse().unwrap());
        let v = send_targets("iqn.2026-11.io.ironlun:a", &t, None, local);
        assert_eq!(addresses(&v), vec!["127.0.0.1:3260,1", "127.0.0.1:3260,2"]);
        let v = send_targets("iqn.2026-11.io.ironlun:a", &t, None, None);
        assert_eq!(addresses(&v), vec!["127.0.0.1:3260,1", "127.0.0.1:3260,2"]);
    }

    #[test]
    fn normal_session_sees_only_its_target() {
        let own = Some("iqn.2026-11.io.ironlun:b");
        assert_eq!(send_targets("All", &targets(), own, None).len(), 2);
        assert_eq!(
            send_targets("", &targets(), own, None).first(),
            Some(&kv("TargetName", "iqn.2026-11.io.ironlun:b"))
        );
    }

    #[test]
    fn named_target_and_unknown_name() {
        assert_eq!(
            send_targets("iqn.2026-11.io.ironlun:a", &targets(), None, None).len(),
            2
        );
        assert!(send_targets("iqn.nope", &targets(), None, None).is_empty());
    }

    const INSIDER: &str = "iqn.2026-11.io.example:host1";
    const OUTSIDER: &str = "iqn.2026-11.io.other:host1";

    #[test]
    fn acl_hides_targets_from_outsiders() {
        let names = |v: Vec<(String, String)>| -> Vec<String> {
            v.into_iter()
                .filter(|(k, _)| k == "TargetName")
                .map(|(_, v)| v)
                .collect()
        };
        assert_eq!(
            names(send_targets_for(INSIDER, "All", &targets(), None, None)),
            vec!["iqn.2026-11.io.ironlun:a", "iqn.2026-11.io.ironlun:b"]
        );
        assert_eq!(
            names(send_targets_for(OUTSIDER, "All", &targets(), None, None)),
            vec!["iqn.2026-11.io.ironlun:a"]
        );
    }

    #[test]
    fn acl_hides_a_target_asked_for_by_name() {
        let b = "iqn.2026-11.io.ironlun:b";
        assert!(send_targets_for(OUTSIDER, b, &targets(), None, None).is_empty());
        assert_eq!(
            send_targets_for(INSIDER, b, &targets(), None, None).len(),
            2
        );
    }
}
