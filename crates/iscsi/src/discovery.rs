//! SendTargets (RFC 7143 §13.3, Appendix C): the target list a Text Request asks for.

use crate::connection::TargetInfo;

/// As [`send_targets`], listing only the targets whose [`Acl`](crate::acl::Acl) lets
/// `initiator` log in: a target the initiator may not use is not revealed, even when asked
/// for by name.
pub fn send_targets_for(
    initiator: &str,
    value: &str,
    targets: &[TargetInfo],
    session_target: Option<&str>,
) -> Vec<(String, String)> {
    if targets.iter().all(|t| t.acl.allows(initiator)) {
        return send_targets(value, targets, session_target);
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
    send_targets(value, &visible, session_target)
}

/// Answer `SendTargets=<value>`. `All` lists every target in a discovery session; in a normal
/// session (`session_target` set) it lists only the session's target, as does an empty value;
/// an iSCSI name lists that target if it exists. Each target is `TargetName=` followed by its
/// `TargetAddress=addr:port,tpgt` entries (the tag is appended when the configured address
/// lacks one).
///
/// Lists every target regardless of its [`Acl`](crate::acl::Acl): see [`send_targets_for`].
pub fn send_targets(
    value: &str,
    targets: &[TargetInfo],
    session_target: Option<&str>,
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
        for addr in &t.addresses {
            let value = if addr.contains(',') {
                addr.clone()
            } else {
                format!("{addr},{}", t.portal_group_tag)
            };
            out.push(("TargetAddress".to_string(), value));
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::acl::Acl;

    fn targets() -> Vec<TargetInfo> {
        vec![
            TargetInfo {
                name: "iqn.2026-11.io.ironlun:a".into(),
                alias: None,
                addresses: vec!["127.0.0.1:3260".into()],
                portal_group_tag: 1,
                acl: Acl::allow_all(),
                chap: None,
            },
            TargetInfo {
                name: "iqn.2026-11.io.ironlun:b".into(),
                alias: Some("bee".into()),
                addresses: vec!["[::1]:3260,7".into()],
                portal_group_tag: 7,
                acl: Acl::allow_only(vec![crate::acl::NamePattern::parse(
                    "iqn.2026-11.io.example:*",
                )
                .unwrap()]),
                chap: None,
            },
        ]
    }

    fn kv(k: &str, v: &str) -> (String, String) {
        (k.to_string(), v.to_string())
    }

    #[test]
    fn all_in_discovery_lists_every_target() {
        assert_eq!(
            send_targets("All", &targets(), None),
            vec![
                kv("TargetName", "iqn.2026-11.io.ironlun:a"),
                kv("TargetAddress", "127.0.0.1:3260,1"),
                kv("TargetName", "iqn.2026-11.io.ironlun:b"),
                kv("TargetAddress", "[::1]:3260,7"),
            ]
        );
    }

    #[test]
    fn normal_session_sees_only_its_target() {
        let own = Some("iqn.2026-11.io.ironlun:b");
        assert_eq!(send_targets("All", &targets(), own).len(), 2);
        assert_eq!(
            send_targets("", &targets(), own).first(),
            Some(&kv("TargetName", "iqn.2026-11.io.ironlun:b"))
        );
    }

    #[test]
    fn named_target_and_unknown_name() {
        assert_eq!(
            send_targets("iqn.2026-11.io.ironlun:a", &targets(), None).len(),
            2
        );
        assert!(send_targets("iqn.nope", &targets(), None).is_empty());
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
            names(send_targets_for(INSIDER, "All", &targets(), None)),
            vec!["iqn.2026-11.io.ironlun:a", "iqn.2026-11.io.ironlun:b"]
        );
        assert_eq!(
            names(send_targets_for(OUTSIDER, "All", &targets(), None)),
            vec!["iqn.2026-11.io.ironlun:a"]
        );
    }

    #[test]
    fn acl_hides_a_target_asked_for_by_name() {
        let b = "iqn.2026-11.io.ironlun:b";
        assert!(send_targets_for(OUTSIDER, b, &targets(), None).is_empty());
        assert_eq!(send_targets_for(INSIDER, b, &targets(), None).len(), 2);
    }
}
