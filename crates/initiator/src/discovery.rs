//! SendTargets discovery (RFC 7143 §11.10, Appendix C): a discovery session asks for
//! `SendTargets=All` and reads TargetName / TargetAddress pairs.

use crate::error::Result;
use crate::options::LoginOptions;
use crate::session::Session;
use tokio::net::ToSocketAddrs;

/// Targets reported by SendTargets: name and its `TargetAddress` values (`addr:port,tpgt`).
pub type Targets = Vec<(String, Vec<String>)>;

/// Log in a discovery session, ask `SendTargets=All`, log out.
pub async fn discover(addr: impl ToSocketAddrs, initiator_name: &str) -> Result<Targets> {
    discover_with(addr, LoginOptions::new(initiator_name, None)).await
}

/// [`discover`] with full login options (e.g. CHAP); `opts.target_name` is ignored.
pub async fn discover_with(addr: impl ToSocketAddrs, opts: LoginOptions) -> Result<Targets> {
    let opts = LoginOptions {
        target_name: None,
        ..opts
    };
    let session = Session::connect(addr, opts).await?;
    let pairs = session
        .text(&[("SendTargets".to_owned(), "All".to_owned())])
        .await?;
    session.logout().await?;
    Ok(group_targets(&pairs))
}

/// Group SendTargets answer pairs: each TargetName starts a target; TargetAddress values
/// belong to the last TargetName before them (addresses before any name are dropped).
pub fn group_targets(pairs: &[(String, String)]) -> Targets {
    let mut out: Targets = Vec::new();
    for (k, v) in pairs {
        match k.as_str() {
            "TargetName" => out.push((v.clone(), Vec::new())),
            "TargetAddress" => {
                if let Some((_, addrs)) = out.last_mut() {
                    addrs.push(v.clone());
                }
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_addresses_under_names() {
        let p = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        let pairs = vec![
            p("TargetAddress", "orphan:3260,1"),
            p("TargetName", "iqn.a"),
            p("TargetAddress", "10.0.0.1:3260,1"),
            p("TargetAddress", "[::1]:3260,1"),
            p("TargetName", "iqn.b"),
        ];
        assert_eq!(
            group_targets(&pairs),
            vec![
                (
                    "iqn.a".to_owned(),
                    vec!["10.0.0.1:3260,1".to_owned(), "[::1]:3260,1".to_owned()]
                ),
                ("iqn.b".to_owned(), Vec::new()),
            ]
        );
    }
}
