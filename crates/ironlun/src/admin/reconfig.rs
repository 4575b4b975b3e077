//! The live reconfiguration routes of the admin API (the changes themselves are
//! [`crate::reconfig::Live`]'s): `GET /v1/targets|luns|portals|config`, `POST /v1/reload`,
//! the target, LUN, portal and ACL changes. Changes answer [`ChangeJson`].

use super::Response;
use crate::config::{self, Config};
use crate::reconfig::{
    acl_add, acl_remove, add_lun, add_portal, add_target, remove_lun, remove_portal, remove_target,
    set_offline_key, set_size, ChangeError, Live,
};
use crate::target::Registry;
use ironlun_api::{
    AclRequest, ChangeJson, ConfigJson, LunJson, LunRequest, LunsJson, PortalJson, PortalRequest,
    PortalsJson, ResizeRequest, TargetJson, TargetRequest, TargetsJson,
};
use std::net::SocketAddr;
use std::sync::Arc;

fn targets_json(cfg: &Config) -> TargetsJson {
    TargetsJson {
        targets: cfg
            .targets
            .iter()
            .map(|t| TargetJson {
                name: t.name.clone(),
                luns: t.luns.iter().map(|l| l.id).collect(),
                allowed_initiators: t
                    .acl
                    .patterns()
                    .map(|p| p.iter().map(|x| x.as_str().to_string()).collect()),
                chap: t.chap.is_some(),
            })
            .collect(),
    }
}

fn backstore_name(k: &config::BackstoreKind) -> &'static str {
    match k {
        config::BackstoreKind::Ram => "ram",
        config::BackstoreKind::File { .. } => "file",
        config::BackstoreKind::Uring { .. } => "uring",
        config::BackstoreKind::Vhd { .. } => "vhd",
        config::BackstoreKind::Block { .. } => "block",
        config::BackstoreKind::Rbd { .. } => "rbd",
    }
}

/// `GET /v1/luns`: every LUN of the running daemon.
pub fn luns_json(registry: &Registry, cfg: Option<&Config>) -> LunsJson {
    let mut luns = Vec::new();
    for t in registry.targets().iter() {
        for (id, h) in t.luns().iter() {
            let backstore = cfg
                .and_then(|c| c.targets.iter().find(|x| x.name == t.name))
                .and_then(|x| x.luns.iter().find(|l| l.id == *id))
                .map_or("?", |l| backstore_name(&l.backstore));
            let (blocks, block_size, offline) = {
                let lu = h.lu();
                (
                    lu.config().num_blocks,
                    lu.config().block_size,
                    lu.is_offline(),
                )
            };
            luns.push(LunJson {
                target: t.name.clone(),
                lun: *id,
                backstore: backstore.to_string(),
                size: blocks.saturating_mul(u64::from(block_size)),
                block_size,
                offline,
            });
        }
    }
    LunsJson { luns }
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Response> {
    serde_json::from_slice(body)
        .map_err(|e| Response::error_code(400, "bad_request", &format!("request body: {e}")))
}

fn answer(r: Result<ChangeJson, ChangeError>) -> Response {
    match r {
        Ok(c) => Response::json(200, &c),
        Err(e) => Response::error(e.status, &e.message),
    }
}

/// Run a change on the blocking pool (it opens backends and writes the file).
async fn blocking(
    live: Arc<Live>,
    f: impl FnOnce(&Live) -> Result<ChangeJson, ChangeError> + Send + 'static,
) -> Response {
    match tokio::task::spawn_blocking(move || f(&live)).await {
        Ok(r) => answer(r),
        Err(e) => Response::error(500, &format!("reconfiguration task failed: {e}")),
    }
}

/// The reconfiguration routes of the admin API; `None` for other paths. `GET /v1/luns`,
/// `GET /v1/config`, `POST /v1/reload`, `POST /v1/targets/<iqn>/luns` ([`LunRequest`]),
/// `DELETE /v1/targets/<iqn>/luns/<lun>`, `POST /v1/luns/<iqn>/<lun>/resize`
/// ([`ResizeRequest`]). Changes answer [`ChangeJson`].
pub async fn route(
    method: &str,
    path: &str,
    body: &[u8],
    registry: &Registry,
    live: Option<&Arc<Live>>,
) -> Option<Response> {
    let segs: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
    let live = live.cloned();
    let decode = |s: &str| ironlun_api::percent_decode(s).filter(|s| !s.is_empty());
    let wrong = |allowed: &'static str| {
        let mut r = Response::error(
            405,
            &format!("method {method} not allowed here ({allowed} only)"),
        );
        r.allow = allowed;
        r
    };
    let Some(live) = live else {
        return match segs.as_slice() {
            ["v1", "luns"] if method == "GET" => {
                Some(Response::json(200, &luns_json(registry, None)))
            }
            ["v1", "config" | "reload"]
            | ["v1", "targets", ..]
            | ["v1", "luns", _, _, "resize"] => {
                Some(Response::error(503, "live reconfiguration is not set up"))
            }
            _ => None,
        };
    };
    Some(match segs.as_slice() {
        ["v1", "luns"] => match method {
            "GET" => Response::json(200, &luns_json(registry, Some(&live.config()))),
            _ => wrong("GET"),
        },
        ["v1", "config"] => match method {
            "GET" => Response::json(
                200,
                &ConfigJson {
                    path: live.source.path.as_ref().map(|p| p.display().to_string()),
                    toml: live.text(),
                },
            ),
            _ => wrong("GET"),
        },
        ["v1", "reload"] => match method {
            "POST" => blocking(live, |l| l.reload()).await,
            _ => wrong("POST"),
        },
        ["v1", "targets", t, "luns"] => {
            if method != "POST" {
                return Some(wrong("POST"));
            }
            let Some(t) = decode(t) else {
                return Some(Response::error(400, "bad target name in path"));
            };
            let req: LunRequest = match parse(body) {
                Ok(r) => r,
                Err(r) => return Some(r),
            };
            blocking(live, move |l| l.change(|doc| add_lun(doc, &t, &req))).await
        }
        ["v1", "targets", t, "luns", n] => {
            if method != "DELETE" {
                return Some(wrong("DELETE"));
            }
            let (Some(t), Ok(n)) = (decode(t), n.parse::<u64>()) else {
                return Some(Response::error(404, &format!("no such resource: {path}")));
            };
            blocking(live, move |l| l.change(|doc| remove_lun(doc, &t, n))).await
        }
        ["v1", "luns", t, n, "resize"] => {
            if method != "POST" {
                return Some(wrong("POST"));
            }
            let (Some(t), Ok(n)) = (decode(t), n.parse::<u64>()) else {
                return Some(Response::error(404, &format!("no such resource: {path}")));
            };
            let req: ResizeRequest = match parse(body) {
                Ok(r) => r,
                Err(r) => return Some(r),
            };
            let Some(current) = registry
                .target(&t)
                .and_then(|x| x.luns().get(&n).cloned())
                .map(|h| {
                    let lu = h.lu();
                    let c = lu.config();
                    c.num_blocks.saturating_mul(u64::from(c.block_size))
                })
            else {
                return Some(Response::error(404, &format!("no LUN {n} in target {t}")));
            };
            blocking(live, move |l| {
                l.change(|doc| set_size(doc, &t, n, &req.size, current))
            })
            .await
        }
        ["v1", "targets"] => match method {
            "GET" => Response::json(200, &targets_json(&live.config())),
            "POST" => {
                let req: TargetRequest = match parse(body) {
                    Ok(r) => r,
                    Err(r) => return Some(r),
                };
                blocking(live, move |l| l.change(|doc| add_target(doc, &req.name))).await
            }
            _ => wrong("GET, POST"),
        },
        ["v1", "targets", t] => {
            if method != "DELETE" {
                return Some(wrong("DELETE"));
            }
            let Some(t) = decode(t) else {
                return Some(Response::error(400, "bad target name in path"));
            };
            blocking(live, move |l| l.change(|doc| remove_target(doc, &t))).await
        }
        ["v1", "portals"] => match method {
            "GET" => {
                let portals = live
                    .control
                    .as_ref()
                    .map(|c| c.portals())
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(l, t, b)| PortalJson {
                        listen: l.to_string(),
                        tpgt: t,
                        bound: b.to_string(),
                    })
                    .collect();
                Response::json(200, &PortalsJson { portals })
            }
            "POST" => {
                let req: PortalRequest = match parse(body) {
                    Ok(r) => r,
                    Err(r) => return Some(r),
                };
                blocking(live, move |l| {
                    l.change(|doc| add_portal(doc, req.listen, req.tpgt))
                })
                .await
            }
            _ => wrong("GET, POST"),
        },
        ["v1", "portals", a] => {
            if method != "DELETE" {
                return Some(wrong("DELETE"));
            }
            let Some(addr) = decode(a).and_then(|a| a.parse::<SocketAddr>().ok()) else {
                return Some(Response::error(404, &format!("no such portal: {a:?}")));
            };
            blocking(live, move |l| l.change(|doc| remove_portal(doc, addr))).await
        }
        ["v1", "targets", t, "acl"] => {
            let Some(t) = decode(t) else {
                return Some(Response::error(400, "bad target name in path"));
            };
            match method {
                "GET" => match targets_json(&live.config())
                    .targets
                    .into_iter()
                    .find(|x| x.name.eq_ignore_ascii_case(&t))
                {
                    Some(x) => Response::json(200, &x),
                    None => Response::error(404, &format!("no target {t}")),
                },
                "POST" => {
                    let req: AclRequest = match parse(body) {
                        Ok(r) => r,
                        Err(r) => return Some(r),
                    };
                    blocking(live, move |l| {
                        l.change(|doc| acl_add(doc, &t, &req.initiator))
                    })
                    .await
                }
                _ => wrong("GET, POST"),
            }
        }
        ["v1", "targets", t, "acl", i] => {
            if method != "DELETE" {
                return Some(wrong("DELETE"));
            }
            let (Some(t), Some(i)) = (decode(t), decode(i)) else {
                return Some(Response::error(400, "bad name in path"));
            };
            blocking(live, move |l| l.change(|doc| acl_remove(doc, &t, &i))).await
        }
        ["v1", "luns", t, n, op @ ("offline" | "online")] => {
            if method != "POST" {
                return Some(wrong("POST"));
            }
            let (Some(t), Ok(n)) = (decode(t), n.parse::<u64>()) else {
                return Some(Response::error(404, &format!("no such resource: {path}")));
            };
            let offline = *op == "offline";
            blocking(live, move |l| {
                l.change(|doc| set_offline_key(doc, &t, n, offline))
            })
            .await
        }
        _ => return None,
    })
}
