//! Live reconfiguration: LUNs added, removed and grown while sessions run, through the admin
//! API (`ironlun ctl lun …`) and SIGHUP (`POST /v1/reload`), and the config file saved back.
//!
//! One path for every change: a new config text (the file re-read, or the running text edited
//! with `toml_edit`, so comments and layout survive) is parsed and validated by
//! [`Config::parse`], [`diff`] compares it with the running [`Config`], [`Live`] applies what
//! can change live, and only then is the file written ([`crate::target::write_durably`]: temp
//! file, fsync, rename, fsync of the directory). A text that does not parse changes nothing.
//!
//! What applies live: LUNs added to or removed from an existing target, a LUN's `size`
//! grown, `offline` and `persist_reservations` (the PR state file rewritten or removed before
//! the change is reported). Sessions of the target see the new LUN set at their next command; commands already
//! running on a removed LU finish. Everything else that differs (targets, portals, ACLs,
//! negotiation, limits, timeouts, data_dir, admin, runtime, a LUN's other settings) is
//! reported as needing a restart and left as it is. `--listen` and `--admin` given on the
//! command line keep overriding the file. Without a config file (`serve` with the embedded
//! default) changes apply in memory and are reported as not saved.

use crate::config::{self, Config};
use crate::target::{LunMap, Registry};
use ironlun_api::{ChangeJson, LunRequest, SizeArg};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// What differs between two configs, as [`Live`] sees it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Diff {
    /// `(target, lun)` in the new config only (its target in both).
    pub luns_added: Vec<(String, u64)>,
    /// `(target, lun)` in the running config only (its target in both).
    pub luns_removed: Vec<(String, u64)>,
    /// `(target, lun, old size, new size)`: `size` changed, nothing else.
    pub luns_resized: Vec<(String, u64, u64, u64)>,
    /// LUNs taken offline (`true`) or brought online (`false`): (target, LUN, offline).
    pub luns_offline: Vec<(String, u64, bool)>,
    /// LUNs whose `persist_reservations` changed: (target, LUN, new value).
    pub luns_persist_reservations: Vec<(String, u64, ironlun_scsi::pr::PrPersistence)>,
    /// Portals (configured address, tag) in the new config only, of a portal group already
    /// served (a new group would change every LU's relative ports: restart).
    pub portals_added: Vec<(SocketAddr, u16)>,
    /// Portals in the running config only.
    pub portals_removed: Vec<(SocketAddr, u16)>,
    /// Targets whose `allowed_initiators`, LUN masking, CHAP or `allow_target_reset` changed.
    pub access_changed: Vec<String>,
    /// Targets in the new config only.
    pub targets_added: Vec<String>,
    /// Targets in the running config only.
    pub targets_removed: Vec<String>,
    /// Differences that only a restart applies, one line each (`target X: added`).
    pub needs_restart: Vec<String>,
}

impl Diff {
    /// Nothing to apply and nothing to report.
    pub fn is_empty(&self) -> bool {
        *self == Diff::default()
    }
}

/// `format!("{:?}")` equality, for config types without `PartialEq`.
fn same<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
    format!("{a:?}") == format!("{b:?}")
}

/// Compare the running config `old` with `new` (pure).
pub fn diff(old: &Config, new: &Config) -> Diff {
    let mut d = Diff::default();
    let mut restart = |what: &str| d.needs_restart.push(what.to_string());
    let portals = |c: &Config| -> Vec<(SocketAddr, u16)> {
        c.portals.iter().map(|p| (p.listen, p.tpgt)).collect()
    };
    let (po, pn) = (portals(old), portals(new));
    let removed: Vec<(SocketAddr, u16)> = po.iter().filter(|p| !pn.contains(p)).copied().collect();
    let added: Vec<(SocketAddr, u16)> = pn.iter().filter(|p| !po.contains(p)).copied().collect();
    if removed.len() == po.len() && !po.is_empty() {
        restart("every portal replaced (one must stay)");
    } else {
        d.portals_removed = removed;
        for (a, t) in added {
            if po.iter().any(|(_, x)| *x == t) {
                d.portals_added.push((a, t));
            } else {
                restart(&format!("portal {a} tpgt {t}: added in a new portal group"));
            }
        }
    }
    if !same(&old.negotiation, &new.negotiation) {
        restart("[negotiation]");
    }
    if old.data_dir != new.data_dir {
        restart("data_dir");
    }
    if old.runtime != new.runtime {
        restart("[runtime]");
    }
    if old.limits != new.limits {
        restart("[limits]");
    }
    if !same(&old.timeouts, &new.timeouts) {
        restart("[timeouts]");
    }
    if !same(&old.discovery_chap, &new.discovery_chap) {
        restart("[discovery]");
    }
    if old.admin != new.admin {
        restart("[admin]");
    }
    if !same(&old.port_groups, &new.port_groups) {
        restart("[[port_group]]");
    }
    let find = |c: &'_ Config, name: &str| -> Option<usize> {
        c.targets
            .iter()
            .position(|t| t.name.eq_ignore_ascii_case(name))
    };
    for t in &old.targets {
        if find(new, &t.name).is_none() {
            d.targets_removed.push(t.name.clone());
        }
    }
    for nt in &new.targets {
        let Some(ot) = find(old, &nt.name).and_then(|i| old.targets.get(i)) else {
            d.targets_added.push(nt.name.clone());
            continue;
        };
        if ot.alias != nt.alias || ot.max_sessions != nt.max_sessions {
            restart(&format!("target {}: alias or max_sessions", nt.name));
        }
        if ot.acl != nt.acl
            || ot.masking != nt.masking
            || !same(&ot.chap, &nt.chap)
            || ot.allow_target_reset != nt.allow_target_reset
        {
            d.access_changed.push(nt.name.clone());
        }
        for ol in &ot.luns {
            if !nt.luns.iter().any(|l| l.id == ol.id) {
                d.luns_removed.push((nt.name.clone(), ol.id));
            }
        }
        for nl in &nt.luns {
            let Some(ol) = ot.luns.iter().find(|l| l.id == nl.id) else {
                d.luns_added.push((nt.name.clone(), nl.id));
                continue;
            };
            let mut resized = ol.clone();
            resized.size = nl.size;
            resized.offline = nl.offline;
            resized.persist_reservations = nl.persist_reservations;
            if ol.offline != nl.offline {
                d.luns_offline.push((nt.name.clone(), nl.id, nl.offline));
            }
            if ol.persist_reservations != nl.persist_reservations {
                d.luns_persist_reservations
                    .push((nt.name.clone(), nl.id, nl.persist_reservations));
            }
            if !same(&resized, nl) {
                restart(&format!(
                    "target {} LUN {}: settings other than size",
                    nt.name, nl.id
                ));
            } else if let (Some(a), Some(b)) = (ol.size, nl.size) {
                if a != b {
                    d.luns_resized.push((nt.name.clone(), nl.id, a, b));
                }
            } else if ol.size != nl.size {
                restart(&format!("target {} LUN {}: size", nt.name, nl.id));
            }
        }
    }
    d
}

/// How the daemon was started: where its config comes from and what the command line
/// overrides.
#[derive(Debug, Clone, Default)]
pub struct Source {
    /// `-c FILE`; `None`: the embedded default (changes are not saved).
    pub path: Option<PathBuf>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--listen`: replaces the configured portals.
    pub listen: Option<SocketAddr>,
    /// `--admin` given: the running `[admin]` stays.
    pub admin_override: bool,
}

/// The embedded default config as TOML text (what `serve` without `-c` runs), so that ctl
/// changes edit it like a file.
pub fn embedded_text() -> String {
    format!(
        "[[portal]]\nlisten = \"127.0.0.1:{}\"\n\n[[target]]\nname = \"{}\"\nalias = \"ironlun lab\"\n\n[[target.lun]]\nid = 0\nbackstore = \"file\"\npath = \"lun0.img\"\nsize = \"1GiB\"\n",
        config::DEFAULT_PORT,
        config::DEFAULT_TARGET
    )
}

/// Running config, its text, and the registry and server it drives.
pub struct Live {
    registry: Arc<Registry>,
    /// Portals and sessions (`None` in tests without a server).
    pub(crate) control: Option<crate::server::Control>,
    pub(crate) source: Source,
    /// Serialises changes; holds the running config and the text it was parsed from.
    state: Mutex<State>,
}

struct State {
    config: Config,
    text: String,
}

/// An error with the HTTP status the admin API answers it with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeError {
    pub status: u16,
    pub message: String,
}

fn bad(message: impl Into<String>) -> ChangeError {
    ChangeError {
        status: 400,
        message: message.into(),
    }
}

fn not_found(message: impl Into<String>) -> ChangeError {
    ChangeError {
        status: 404,
        message: message.into(),
    }
}

/// The running target `target` and its LUN `id`, or 404 naming which is missing.
fn live_lun(
    registry: &Registry,
    target: &str,
    id: u64,
) -> Result<
    (
        Arc<crate::target::TargetState>,
        Arc<crate::target::LunHandle>,
    ),
    ChangeError,
> {
    let t = registry
        .target(target)
        .ok_or_else(|| not_found(format!("no target {target}")))?;
    let h = t
        .luns()
        .get(&id)
        .cloned()
        .ok_or_else(|| not_found(format!("no LUN {id} in target {}", t.name)))?;
    Ok((t, h))
}

impl Live {
    /// Set up live reconfiguration for `registry`, built from `config` (overrides applied).
    /// `text` is the file's content (read again here when `None`).
    pub fn install(
        registry: Arc<Registry>,
        control: Option<crate::server::Control>,
        config: Config,
        source: Source,
    ) -> Arc<Live> {
        let text = match &source.path {
            Some(p) => std::fs::read_to_string(p).unwrap_or_default(),
            None => embedded_text(),
        };
        Arc::new(Live {
            registry: registry.clone(),
            control,
            source,
            state: Mutex::new(State { config, text }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The running config text.
    pub fn text(&self) -> String {
        self.state().text.clone()
    }

    /// The running config.
    pub fn config(&self) -> Config {
        self.state().config.clone()
    }

    /// Parse `text` as the daemon's config, with the command line's overrides.
    fn parse(&self, text: &str, running: &Config) -> Result<Config, ChangeError> {
        let (file, base) = match &self.source.path {
            Some(p) => (p.display().to_string(), p.parent()),
            None => ("<embedded default>".to_string(), None),
        };
        let dd = self
            .source
            .data_dir
            .clone()
            .or_else(|| self.source.path.is_none().then(|| running.data_dir.clone()));
        let mut cfg =
            Config::parse(&file, text, base, dd.as_deref()).map_err(|e| bad(e.to_string()))?;
        if cfg.cluster != running.cluster {
            return Err(bad(
                "[cluster] cannot change while the daemon runs: restart it".to_string(),
            ));
        }
        if running.cluster.is_some() && lu_set(&cfg) != lu_set(running) {
            // Each LU joins its replicated state when the gateway starts (target::cluster::attach).
            return Err(bad(
                "in cluster mode targets and LUNs cannot be added or removed while the daemon runs: restart the gateway".to_string(),
            ));
        }
        if self.source.listen.is_some() {
            // `--listen` replaces the file's portals for the daemon's lifetime.
            cfg.portals = running.portals.clone();
        }
        if self.source.admin_override {
            cfg.admin = running.admin.clone();
        }
        Ok(cfg)
    }

    /// SIGHUP / `POST /v1/reload`: re-read the config file and apply the difference. A file
    /// that does not parse changes nothing (the error names its line and key).
    pub fn reload(&self) -> Result<ChangeJson, ChangeError> {
        let Some(path) = &self.source.path else {
            return Err(bad(
                "no config file to reload (serving the embedded default)",
            ));
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad(format!("{}: cannot read: {e}", path.display())))?;
        let mut st = self.state();
        let new = self.parse(&text, &st.config)?;
        let mut out = self.apply(&mut st, &new)?;
        st.text = text;
        out.path = Some(path.display().to_string());
        Ok(out)
    }

    /// Edit the running text with `edit` (an admin API change), check that every LUN path it adds
    /// or changes is allowed ([`confine_lun_path`], else 403), apply it, and save it (when there
    /// is a file).
    pub fn change(
        &self,
        edit: impl FnOnce(&mut toml_edit::DocumentMut) -> Result<(), ChangeError>,
    ) -> Result<ChangeJson, ChangeError> {
        let mut st = self.state();
        let mut doc: toml_edit::DocumentMut = st.text.parse().map_err(|e| ChangeError {
            status: 409,
            message: format!("the running config text does not parse: {e}"),
        })?;
        edit(&mut doc)?;
        let text = doc.to_string();
        let new = self.parse(&text, &st.config)?;
        confine_new_paths(&st.config, &new)?;
        let mut out = self.apply(&mut st, &new)?;
        st.text = text;
        if let Some(path) = &self.source.path {
            crate::target::write_durably(path, st.text.as_bytes()).map_err(|e| ChangeError {
                status: 500,
                message: format!("applied, but {} not saved: {e}", path.display()),
            })?;
            tracing::info!(file = %path.display(), "config saved");
            out.saved = true;
            out.path = Some(path.display().to_string());
        }
        Ok(out)
    }

    /// Apply `new` to the running daemon; on success the running config follows it in what
    /// was applied (the rest stays as it runs).
    fn apply(&self, st: &mut State, new: &Config) -> Result<ChangeJson, ChangeError> {
        let running = &st.config;
        let d = diff(running, new);
        let lun_of = |c: &'_ Config, t: &str, id: u64| -> Option<config::Lun> {
            c.targets
                .iter()
                .find(|x| x.name.eq_ignore_ascii_case(t))
                .and_then(|x| x.luns.iter().find(|l| l.id == id))
                .cloned()
        };
        for (t, id, old, newsize) in &d.luns_resized {
            if newsize < old {
                return Err(bad(format!(
                    "target {t} LUN {id}: cannot shrink from {old} to {newsize} bytes (grow only)"
                )));
            }
        }
        // Open every added LUN first: a failure changes nothing.
        let mut opened: BTreeMap<String, Vec<(u64, Arc<crate::target::LunHandle>)>> =
            BTreeMap::new();
        for (t, id) in &d.luns_added {
            let l = lun_of(new, t, *id).ok_or_else(|| bad(format!("{t} LUN {id} vanished")))?;
            let h = self
                .registry
                .open_lun(new, t, &l)
                .map_err(|e| bad(format!("target {t} LUN {id}: {e}")))?;
            opened
                .entry(t.to_lowercase())
                .or_default()
                .push((*id, Arc::new(h)));
        }
        let mut new_targets = Vec::new();
        for name in &d.targets_added {
            let t = new
                .targets
                .iter()
                .find(|x| &x.name == name)
                .ok_or_else(|| bad(format!("target {name} vanished")))?;
            let ts = self
                .registry
                .open_target(new, t)
                .map_err(|e| bad(format!("target {name}: {e}")))?;
            new_targets.push(Arc::new(ts));
        }
        let mut applied = Vec::new();
        // Grow before the LUN set changes: a failed resize leaves everything as it was.
        for (t, id, old, size) in &d.luns_resized {
            let (_, h) = live_lun(&self.registry, t, *id)?;
            resize(&h, *size).map_err(|e| ChangeError {
                status: 409,
                message: format!("target {t} LUN {id}: {e}"),
            })?;
            applied.push(format!(
                "target {t} LUN {id}: resized from {old} to {size} bytes"
            ));
        }
        for (t, id, offline) in &d.luns_offline {
            applied.extend(set_offline(&self.registry, t, *id, *offline)?.applied);
        }
        for (t, id, p) in &d.luns_persist_reservations {
            applied.push(set_persist_reservations(&self.registry, t, *id, *p)?);
        }
        let mut touched: Vec<String> = d
            .luns_added
            .iter()
            .chain(d.luns_removed.iter())
            .map(|(t, _)| t.clone())
            .collect();
        touched.sort_by_key(|t| t.to_lowercase());
        touched.dedup_by(|a, b| a.eq_ignore_ascii_case(b));
        for t in &touched {
            let target = self
                .registry
                .target(t)
                .ok_or_else(|| not_found(format!("no target {t}")))?;
            let mut luns: LunMap = (*target.luns()).clone();
            for (tt, id) in d
                .luns_removed
                .iter()
                .filter(|(x, _)| x.eq_ignore_ascii_case(t))
            {
                if let Some(h) = luns.remove(id) {
                    if let Err(e) = h.backend.flush() {
                        tracing::warn!(target = %tt, lun = id, error = %e, "flush of a removed LUN failed");
                    }
                    applied.push(format!("target {tt} LUN {id}: removed"));
                }
            }
            for (id, h) in opened.remove(&t.to_lowercase()).unwrap_or_default() {
                luns.insert(id, h);
                applied.push(format!("target {t} LUN {id}: added"));
            }
            target.set_luns(luns);
            for h in target.luns().values() {
                luns_changed(h);
            }
        }
        if !d.targets_added.is_empty() || !d.targets_removed.is_empty() {
            let mut all: Vec<Arc<crate::target::TargetState>> = self
                .registry
                .targets()
                .iter()
                .filter(|t| {
                    !d.targets_removed
                        .iter()
                        .any(|r| r.eq_ignore_ascii_case(&t.name))
                })
                .cloned()
                .collect();
            for name in &d.targets_removed {
                if let Some(t) = self.registry.target(name) {
                    for (id, h) in t.luns().iter() {
                        if let Err(e) = h.backend.flush() {
                            tracing::warn!(target = %name, lun = id, error = %e, "flush of a removed target's LUN failed");
                        }
                    }
                }
                applied.push(format!("target {name}: removed"));
            }
            for t in new_targets {
                applied.push(format!("target {}: added", t.name));
                all.push(t);
            }
            self.registry.set_targets(all);
        }
        // The running config follows what was applied.
        let mut next = running.clone();
        next.targets.retain(|t| {
            !d.targets_removed
                .iter()
                .any(|r| r.eq_ignore_ascii_case(&t.name))
        });
        for name in &d.targets_added {
            if let Some(t) = new.targets.iter().find(|x| &x.name == name) {
                next.targets.push(t.clone());
            }
        }
        for name in &d.access_changed {
            let (Some(t), Some(nt)) = (
                next.targets
                    .iter_mut()
                    .find(|x| x.name.eq_ignore_ascii_case(name)),
                new.targets
                    .iter()
                    .find(|x| x.name.eq_ignore_ascii_case(name)),
            ) else {
                continue;
            };
            t.acl = nt.acl.clone();
            t.masking = nt.masking.clone();
            t.chap = nt.chap.clone();
            t.allow_target_reset = nt.allow_target_reset;
            if let Some(target) = self.registry.target(name) {
                target.set_masking(nt.masking.clone());
                target.set_reset_policy(nt.allow_target_reset);
            }
            applied.push(format!(
                "target {name}: access (allowed_initiators, LUN masking, CHAP, allow_target_reset) updated"
            ));
        }
        if let Some(c) = &self.control {
            for (a, t) in &d.portals_removed {
                if c.remove_portal(*a, *t) {
                    next.portals.retain(|p| !(p.listen == *a && p.tpgt == *t));
                    applied.push(format!(
                        "portal {a} tpgt {t}: removed (its connections keep running)"
                    ));
                }
            }
            for (a, t) in &d.portals_added {
                match c.add_portal(&next, *a, *t) {
                    Ok(bound) => {
                        next.portals.push(config::Portal {
                            listen: *a,
                            tpgt: *t,
                        });
                        applied.push(format!("portal {a} tpgt {t}: added, listening on {bound}"));
                    }
                    Err(e) => applied.push(format!("portal {a} tpgt {t}: NOT added: {e}")),
                }
            }
            if !d.targets_removed.is_empty() || !d.targets_added.is_empty() {
                c.refresh(&next);
                for name in &d.targets_removed {
                    let n = c.close_sessions(name, |_| false);
                    if n > 0 {
                        applied.push(format!("target {name}: {n} session(s) closed"));
                    }
                }
            }
            if !d.access_changed.is_empty() {
                c.refresh(&next);
                for name in &d.access_changed {
                    if let Some(t) = next
                        .targets
                        .iter()
                        .find(|x| x.name.eq_ignore_ascii_case(name))
                    {
                        let acl = t.acl.clone();
                        let n = c.close_sessions(name, |i| acl.allows(i));
                        if n > 0 {
                            applied.push(format!("target {name}: {n} session(s) of initiators no longer allowed closed"));
                        }
                    }
                }
            }
        }
        for t in &mut next.targets {
            let Some(nt) = new
                .targets
                .iter()
                .find(|x| x.name.eq_ignore_ascii_case(&t.name))
            else {
                continue;
            };
            t.luns.retain(|l| {
                !d.luns_removed
                    .iter()
                    .any(|(x, id)| x.eq_ignore_ascii_case(&t.name) && *id == l.id)
            });
            for l in &mut t.luns {
                if let Some((_, _, _, size)) = d
                    .luns_resized
                    .iter()
                    .find(|(x, id, _, _)| x.eq_ignore_ascii_case(&t.name) && *id == l.id)
                {
                    l.size = Some(*size);
                }
                if let Some((_, _, offline)) = d
                    .luns_offline
                    .iter()
                    .find(|(x, id, _)| x.eq_ignore_ascii_case(&t.name) && *id == l.id)
                {
                    l.offline = *offline;
                }
                if let Some((_, _, p)) = d
                    .luns_persist_reservations
                    .iter()
                    .find(|(x, id, _)| x.eq_ignore_ascii_case(&t.name) && *id == l.id)
                {
                    l.persist_reservations = *p;
                }
            }
            for l in &nt.luns {
                if d.luns_added
                    .iter()
                    .any(|(x, id)| x.eq_ignore_ascii_case(&t.name) && *id == l.id)
                {
                    t.luns.push(l.clone());
                }
            }
            t.luns.sort_by_key(|l| l.id);
        }
        st.config = next;
        for a in &applied {
            tracing::info!("reconfiguration: {a}");
        }
        for r in &d.needs_restart {
            tracing::warn!("reconfiguration: {r}: needs restart, left as it runs");
        }
        Ok(ChangeJson {
            applied,
            needs_restart: d.needs_restart,
            saved: false,
            path: None,
        })
    }
}

/// Grow `h` to `size` bytes: the backend first, then the LU's capacity (which raises
/// CAPACITY DATA HAS CHANGED, 2Ah/09h, on its nexuses; SBC-3 §4.10).
fn resize(h: &crate::target::LunHandle, size: u64) -> Result<(), String> {
    let block = u64::from(h.lu().config().block_size);
    if block == 0 || !size.is_multiple_of(block) {
        return Err(format!(
            "size {size} is not a multiple of the block size {block}"
        ));
    }
    if h.backend.size() < size {
        h.backend.resize(size).map_err(|e| e.to_string())?;
    }
    h.lu().set_num_blocks(size / block);
    Ok(())
}

/// Take LUN `id` of `target` offline (its backend flushed first, so what was acknowledged is
/// on stable storage) or back online; the config's `offline` key keeps it across restarts.
fn set_offline(
    registry: &Registry,
    target: &str,
    id: u64,
    offline: bool,
) -> Result<ChangeJson, ChangeError> {
    let (t, h) = live_lun(registry, target, id)?;
    if offline {
        h.backend.flush().map_err(|e| ChangeError {
            status: 409,
            message: format!(
                "target {} LUN {id}: flush before offline failed: {e}",
                t.name
            ),
        })?;
    }
    let changed = h.lu().set_offline(offline);
    let state = if offline { "offline" } else { "online" };
    let line = if changed {
        format!("target {} LUN {id}: {state}", t.name)
    } else {
        format!("target {} LUN {id}: already {state}", t.name)
    };
    tracing::info!("reconfiguration: {line}");
    Ok(ChangeJson {
        applied: vec![line],
        ..ChangeJson::default()
    })
}

/// Set `persist_reservations` of LUN `id` of `target` to `p`: from now on the PR state is
/// kept across a restart while APTPL is set (`aptpl`) or always; when that changes whether
/// the present state survives, its state file is rewritten or removed durably first
/// ([`crate::target::LunHandle::set_pr_persistence`]). The line to report.
fn set_persist_reservations(
    registry: &Registry,
    target: &str,
    id: u64,
    p: ironlun_scsi::pr::PrPersistence,
) -> Result<String, ChangeError> {
    let (t, h) = live_lun(registry, target, id)?;
    let changed = h.set_pr_persistence(p).map_err(|e| ChangeError {
        status: 409,
        message: format!(
            "target {} LUN {id}: persist_reservations not changed: {e}",
            t.name
        ),
    })?;
    let line = if changed {
        format!(
            "target {} LUN {id}: persist_reservations = \"{}\"",
            t.name,
            p.name()
        )
    } else {
        format!(
            "target {} LUN {id}: persist_reservations already \"{}\"",
            t.name,
            p.name()
        )
    };
    Ok(line)
}

/// Raise REPORTED LUNS DATA HAS CHANGED (3Fh/0Eh) on every nexus of `h` (SPC-4 §6.33).
fn luns_changed(h: &crate::target::LunHandle) {
    h.lu().luns_changed();
}

/// Reload on every SIGHUP (the handler is installed when this is called, before the returned
/// future first runs). A file that does not parse is logged with its line and key and
/// changes nothing.
pub fn on_sighup(live: Arc<Live>) -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let sig = signal(SignalKind::hangup());
    async move {
        let mut sig = match sig {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "no SIGHUP handler: reload through the admin API only");
                return;
            }
        };
        while sig.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the config file");
            // systemd (ExecReload): RELOADING=1 now, READY=1 once done, either way.
            crate::sd_notify::reloading();
            let l = live.clone();
            let result = tokio::task::spawn_blocking(move || l.reload()).await;
            crate::sd_notify::ready(match &result {
                Ok(Ok(_)) => "serving; configuration reloaded",
                _ => "serving; configuration reload failed, previous configuration kept",
            });
            match result {
                Ok(Ok(c)) => tracing::info!(
                    applied = c.applied.len(),
                    needs_restart = c.needs_restart.len(),
                    "config reloaded"
                ),
                Ok(Err(e)) => {
                    tracing::error!("config not reloaded, nothing changed: {}", e.message)
                }
                Err(e) => tracing::error!("config reload failed: {e}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Config edits (toml_edit), shared by the admin API.

/// The `[[target]]` table named `name` (case-insensitive).
fn target_table<'a>(
    doc: &'a mut toml_edit::DocumentMut,
    name: &str,
) -> Result<&'a mut toml_edit::Table, ChangeError> {
    let targets = doc
        .get_mut("target")
        .and_then(toml_edit::Item::as_array_of_tables_mut)
        .ok_or_else(|| not_found(format!("no target {name}")))?;
    targets
        .iter_mut()
        .find(|t| {
            t.get("name")
                .and_then(toml_edit::Item::as_str)
                .is_some_and(|n| n.eq_ignore_ascii_case(name))
        })
        .ok_or_else(|| not_found(format!("no target {name}")))
}

fn lun_id(t: &toml_edit::Table) -> Option<u64> {
    t.get("id")
        .and_then(toml_edit::Item::as_integer)
        .and_then(|i| u64::try_from(i).ok())
}

/// Append `[[target.lun]]` for `req` to target `name`.
pub fn add_lun(
    doc: &mut toml_edit::DocumentMut,
    name: &str,
    req: &LunRequest,
) -> Result<(), ChangeError> {
    let t = target_table(doc, name)?;
    let id = i64::try_from(req.id).map_err(|_| bad(format!("LUN id {} too large", req.id)))?;
    let mut lun = toml_edit::Table::new();
    lun.insert("id", toml_edit::value(id));
    lun.insert("backstore", toml_edit::value(req.backstore.as_str()));
    if let Some(p) = &req.path {
        lun.insert("path", toml_edit::value(p.as_str()));
    }
    if let Some(s) = &req.size {
        s.bytes().map_err(|e| bad(format!("size: {e}")))?;
        match s {
            SizeArg::Bytes(b) => {
                let b = i64::try_from(*b).map_err(|_| bad("size too large"))?;
                lun.insert("size", toml_edit::value(b));
            }
            SizeArg::Text(x) => {
                lun.insert("size", toml_edit::value(x.as_str()));
            }
        }
    }
    if let Some(b) = req.block_size {
        lun.insert("block_size", toml_edit::value(i64::from(b)));
    }
    match t.get_mut("lun") {
        Some(item) => item
            .as_array_of_tables_mut()
            .ok_or_else(|| bad(format!("target {name}: `lun` is not an array of tables")))?
            .push(lun),
        None => {
            let mut a = toml_edit::ArrayOfTables::new();
            a.push(lun);
            t.insert("lun", toml_edit::Item::ArrayOfTables(a));
        }
    }
    Ok(())
}

/// The `[[target.lun]]` table `id` of target `name`.
fn lun_table<'a>(
    doc: &'a mut toml_edit::DocumentMut,
    name: &str,
    id: u64,
) -> Result<&'a mut toml_edit::Table, ChangeError> {
    target_table(doc, name)?
        .get_mut("lun")
        .and_then(toml_edit::Item::as_array_of_tables_mut)
        .and_then(|a| a.iter_mut().find(|l| lun_id(l) == Some(id)))
        .ok_or_else(|| not_found(format!("no LUN {id} in target {name}")))
}

/// Remove LUN `id` of target `name`.
pub fn remove_lun(
    doc: &mut toml_edit::DocumentMut,
    name: &str,
    id: u64,
) -> Result<(), ChangeError> {
    let luns = target_table(doc, name)?
        .get_mut("lun")
        .and_then(toml_edit::Item::as_array_of_tables_mut)
        .ok_or_else(|| not_found(format!("no LUN {id} in target {name}")))?;
    let idx = luns
        .iter()
        .position(|l| lun_id(l) == Some(id))
        .ok_or_else(|| not_found(format!("no LUN {id} in target {name}")))?;
    luns.remove(idx);
    Ok(())
}

/// Set LUN `id`'s `size` (as given), refusing to shrink (`current`: its size in bytes now).
pub fn set_size(
    doc: &mut toml_edit::DocumentMut,
    name: &str,
    id: u64,
    size: &SizeArg,
    current: u64,
) -> Result<(), ChangeError> {
    let bytes = size.bytes().map_err(|e| bad(format!("size: {e}")))?;
    if bytes < current {
        return Err(bad(format!(
            "target {name} LUN {id}: cannot shrink from {current} to {bytes} bytes (grow only)"
        )));
    }
    let l = lun_table(doc, name, id)?;
    match size {
        SizeArg::Bytes(b) => {
            let b = i64::try_from(*b).map_err(|_| bad("size too large"))?;
            l.insert("size", toml_edit::value(b));
        }
        SizeArg::Text(t) => {
            l.insert("size", toml_edit::value(t.as_str()));
        }
    }
    Ok(())
}

/// Set (`offline = true`) or clear the `offline` key of LUN `id` of target `name`.
pub fn set_offline_key(
    doc: &mut toml_edit::DocumentMut,
    name: &str,
    id: u64,
    offline: bool,
) -> Result<(), ChangeError> {
    let l = lun_table(doc, name, id)?;
    if offline {
        l.insert("offline", toml_edit::value(true));
    } else {
        l.remove("offline");
    }
    Ok(())
}

/// Append a `[[target]]` table named `name` (no LUNs yet).
pub fn add_target(doc: &mut toml_edit::DocumentMut, name: &str) -> Result<(), ChangeError> {
    if target_table(doc, name).is_ok() {
        return Err(ChangeError {
            status: 409,
            message: format!("target {name} exists"),
        });
    }
    let mut t = toml_edit::Table::new();
    t.insert("name", toml_edit::value(name));
    match doc.get_mut("target") {
        Some(item) => item
            .as_array_of_tables_mut()
            .ok_or_else(|| bad("`target` is not an array of tables"))?
            .push(t),
        None => {
            let mut a = toml_edit::ArrayOfTables::new();
            a.push(t);
            doc.insert("target", toml_edit::Item::ArrayOfTables(a));
        }
    }
    Ok(())
}

/// Remove target `name` with its LUNs.
pub fn remove_target(doc: &mut toml_edit::DocumentMut, name: &str) -> Result<(), ChangeError> {
    let targets = doc
        .get_mut("target")
        .and_then(toml_edit::Item::as_array_of_tables_mut)
        .ok_or_else(|| not_found(format!("no target {name}")))?;
    let idx = targets
        .iter()
        .position(|t| {
            t.get("name")
                .and_then(toml_edit::Item::as_str)
                .is_some_and(|n| n.eq_ignore_ascii_case(name))
        })
        .ok_or_else(|| not_found(format!("no target {name}")))?;
    targets.remove(idx);
    Ok(())
}

/// Append a `[[portal]]` table.
pub fn add_portal(
    doc: &mut toml_edit::DocumentMut,
    listen: SocketAddr,
    tpgt: Option<u16>,
) -> Result<(), ChangeError> {
    let mut p = toml_edit::Table::new();
    p.insert("listen", toml_edit::value(listen.to_string()));
    if let Some(t) = tpgt {
        p.insert("tpgt", toml_edit::value(i64::from(t)));
    }
    match doc.get_mut("portal") {
        Some(item) => item
            .as_array_of_tables_mut()
            .ok_or_else(|| bad("`portal` is not an array of tables"))?
            .push(p),
        None => {
            // The embedded default's portal: a file without `[[portal]]` serves 127.0.0.1:3260.
            let mut a = toml_edit::ArrayOfTables::new();
            let mut d = toml_edit::Table::new();
            d.insert(
                "listen",
                toml_edit::value(format!("127.0.0.1:{}", config::DEFAULT_PORT)),
            );
            a.push(d);
            a.push(p);
            doc.insert("portal", toml_edit::Item::ArrayOfTables(a));
        }
    }
    Ok(())
}

/// Remove the `[[portal]]` whose `listen` is `listen`.
pub fn remove_portal(
    doc: &mut toml_edit::DocumentMut,
    listen: SocketAddr,
) -> Result<(), ChangeError> {
    let portals = doc
        .get_mut("portal")
        .and_then(toml_edit::Item::as_array_of_tables_mut)
        .ok_or_else(|| not_found(format!("no portal {listen}")))?;
    let idx = portals
        .iter()
        .position(|p| {
            p.get("listen")
                .and_then(toml_edit::Item::as_str)
                .and_then(|s| s.parse::<SocketAddr>().ok())
                == Some(listen)
        })
        .ok_or_else(|| not_found(format!("no portal {listen}")))?;
    portals.remove(idx);
    Ok(())
}

/// Add `initiator` (a name or `*`/`?` pattern) to target `name`'s `allowed_initiators`
/// (created with just it when absent: the target then admits only it).
pub fn acl_add(
    doc: &mut toml_edit::DocumentMut,
    name: &str,
    initiator: &str,
) -> Result<(), ChangeError> {
    let t = target_table(doc, name)?;
    match t.get_mut("allowed_initiators") {
        Some(item) => {
            let a = item
                .as_array_mut()
                .ok_or_else(|| bad(format!("target {name}: allowed_initiators is not an array")))?;
            if a.iter().any(|v| v.as_str() == Some(initiator)) {
                return Err(ChangeError {
                    status: 409,
                    message: format!("{initiator} is already in target {name}'s ACL"),
                });
            }
            a.push(initiator);
        }
        None => {
            let mut a = toml_edit::Array::new();
            a.push(initiator);
            t.insert("allowed_initiators", toml_edit::value(a));
        }
    }
    Ok(())
}

/// Remove `initiator` from target `name`'s `allowed_initiators`.
pub fn acl_remove(
    doc: &mut toml_edit::DocumentMut,
    name: &str,
    initiator: &str,
) -> Result<(), ChangeError> {
    let t = target_table(doc, name)?;
    let a = t
        .get_mut("allowed_initiators")
        .and_then(toml_edit::Item::as_array_mut)
        .ok_or_else(|| not_found(format!("target {name} has no ACL (everyone is allowed)")))?;
    let idx = a
        .iter()
        .position(|v| v.as_str() == Some(initiator))
        .ok_or_else(|| not_found(format!("{initiator} is not in target {name}'s ACL")))?;
    a.remove(idx);
    Ok(())
}

/// The file or device path of a LUN's backstore (`None` for RAM and RBD).
fn lun_path(l: &config::Lun) -> Option<&Path> {
    match &l.backstore {
        config::BackstoreKind::Ram | config::BackstoreKind::Rbd { .. } => None,
        config::BackstoreKind::File { path }
        | config::BackstoreKind::Uring { path, .. }
        | config::BackstoreKind::Vhd { path }
        | config::BackstoreKind::Block { path } => Some(path),
    }
}

/// Refuse (403) an API change whose config has a LUN path that is new or different from the
/// running config's and is not allowed for API changes ([`confine_lun_path`], with the
/// running `data_dir` and `[admin] allowed_paths`). Paths already running are the operator's.
fn confine_new_paths(running: &Config, new: &Config) -> Result<(), ChangeError> {
    for t in &new.targets {
        let old = running
            .targets
            .iter()
            .find(|x| x.name.eq_ignore_ascii_case(&t.name));
        for l in &t.luns {
            let Some(path) = lun_path(l) else { continue };
            let unchanged = old
                .and_then(|o| o.luns.iter().find(|x| x.id == l.id))
                .and_then(lun_path)
                .is_some_and(|p| p == path);
            if unchanged {
                continue;
            }
            confine_lun_path(path, &running.data_dir, &running.admin.allowed_paths).map_err(
                |message| ChangeError {
                    status: 403,
                    message: format!("target {} LUN {}: {message}", t.name, l.id),
                },
            )?;
        }
    }
    Ok(())
}

/// Where `path` leads once resolved: symlinks followed and `.`/`..` removed
/// (`canonicalize`). A file that does not exist yet (a LUN file or VHD the daemon will
/// create) resolves through its directory; a dangling symlink is refused (creating the file
/// would follow it).
fn resolve_lun_path(path: &Path) -> Result<PathBuf, String> {
    match std::fs::canonicalize(path) {
        Ok(p) => Ok(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if std::fs::symlink_metadata(path).is_ok() {
                return Err("is a symlink to a missing file".into());
            }
            let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
                return Err("does not name a file".into());
            };
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            let dir = std::fs::canonicalize(dir)
                .map_err(|e| format!("its directory cannot be resolved: {e}"))?;
            Ok(dir.join(name))
        }
        Err(e) => Err(format!("cannot be resolved: {e}")),
    }
}

/// Whether a LUN path given through the admin API may be used: once resolved
/// ([`resolve_lun_path`]: symlinks followed, `..` removed) it must lie inside `data_dir` or
/// inside one of `allowed` (`[admin] allowed_paths`, themselves resolved). `Ok` with the
/// resolved path; `Err` with a message naming the path and the allowed directories.
///
/// The check is made when the change is applied; a local user who can write inside an
/// allowed directory could still swap a file for a symlink afterwards, so allowed
/// directories should be writable only by the daemon's user.
pub fn confine_lun_path(
    path: &Path,
    data_dir: &Path,
    allowed: &[PathBuf],
) -> Result<PathBuf, String> {
    let roots: Vec<PathBuf> = std::iter::once(data_dir)
        .chain(allowed.iter().map(PathBuf::as_path))
        .map(|r| std::fs::canonicalize(r).unwrap_or_else(|_| r.to_path_buf()))
        .collect();
    let list = roots
        .iter()
        .map(|r| r.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let resolved = resolve_lun_path(path).map_err(|e| {
        format!(
            "LUN path {} {e}; LUN paths added through the admin API must be inside: {list}",
            path.display()
        )
    })?;
    if roots.iter().any(|r| resolved.starts_with(r)) {
        return Ok(resolved);
    }
    Err(format!(
        "LUN path {} (resolved: {}) is outside the directories the admin API may use: {list}; list its directory in [admin] allowed_paths of the config file to allow it",
        path.display(),
        resolved.display()
    ))
}

/// Every LU as (target, LUN, serial): what cluster mode keeps fixed while running.
fn lu_set(cfg: &Config) -> Vec<(String, u64, String)> {
    cfg.targets
        .iter()
        .flat_map(|t| {
            t.luns
                .iter()
                .map(|l| (t.name.clone(), l.id, l.serial.clone()))
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn confines_lun_paths_to_data_dir_and_allowed_paths() {
        let data = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let d = data.path();
        std::fs::create_dir(d.join("sub")).unwrap();
        std::fs::write(other.path().join("disk.img"), b"x").unwrap();
        std::os::unix::fs::symlink(other.path().join("disk.img"), d.join("link.img")).unwrap();
        std::os::unix::fs::symlink(other.path().join("gone.img"), d.join("dangling.img")).unwrap();
        // Inside: new files, subdirectories, `..` that stays inside.
        for ok in ["new.img", "sub/new.img", "sub/../new.img"] {
            confine_lun_path(&d.join(ok), d, &[]).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        // Outside: absolute paths, `..` escapes, symlinks out, dangling symlinks.
        for bad in [
            other.path().join("disk.img"),
            d.join("../x.img"),
            d.join("sub/../../x.img"),
            d.join("link.img"),
            d.join("dangling.img"),
            PathBuf::from("/etc/shadow"),
        ] {
            let e = confine_lun_path(&bad, d, &[]).unwrap_err();
            assert!(e.contains(&bad.display().to_string()), "{e}");
            assert!(
                e.contains("allowed_paths") || e.contains("must be inside"),
                "{e}"
            );
        }
        // An allowed directory admits its files, through symlinks too.
        let allowed = [other.path().to_path_buf()];
        confine_lun_path(&other.path().join("disk.img"), d, &allowed).unwrap();
        confine_lun_path(&d.join("link.img"), d, &allowed).unwrap();
        // A sibling directory whose name starts like an allowed one is not inside it.
        let sibling = PathBuf::from(format!("{}x/disk.img", other.path().display()));
        assert!(confine_lun_path(&sibling, d, &allowed).is_err());
    }

    fn parse(text: &str) -> Config {
        Config::parse("t.toml", text, None, Some(std::path::Path::new("/tmp")))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    const BASE: &str = "# my comment\n[[portal]]\nlisten = \"127.0.0.1:3260\"\n\n[[target]]\nname = \"iqn.2026-11.x:a\"\n\n[[target.lun]]\nid = 0\nbackstore = \"ram\"\nsize = \"1MiB\"\n\n[[target]]\nname = \"iqn.2026-11.x:b\"\nallowed_initiators = [\"iqn.2026-11.x:h1\"]\n\n[[target.lun]]\nid = 0\nbackstore = \"ram\"\nsize = \"1MiB\"\n";

    #[test]
    fn same_config_has_no_difference() {
        assert!(diff(&parse(BASE), &parse(BASE)).is_empty());
    }

    #[test]
    fn lun_added_removed_resized() {
        let old = parse(BASE);
        let mut doc: toml_edit::DocumentMut = BASE.parse().unwrap();
        let req = LunRequest {
            id: 3,
            backstore: "ram".into(),
            size: Some(SizeArg::Text("2M".into())),
            path: None,
            block_size: None,
        };
        add_lun(&mut doc, "IQN.2026-11.x:a", &req).unwrap();
        set_size(
            &mut doc,
            "iqn.2026-11.x:b",
            0,
            &SizeArg::Text("4MiB".into()),
            1 << 20,
        )
        .unwrap();
        let text = doc.to_string();
        assert!(text.starts_with("# my comment\n"), "{text}");
        let new = parse(&text);
        // The new LUN belongs to the first target, not the last one in the file.
        assert_eq!(new.targets[0].luns.len(), 2);
        assert_eq!(new.targets[1].luns.len(), 1);
        let d = diff(&old, &new);
        assert_eq!(d.luns_added, vec![("iqn.2026-11.x:a".to_string(), 3)]);
        assert_eq!(
            d.luns_resized,
            vec![("iqn.2026-11.x:b".to_string(), 0, 1 << 20, 4 << 20)]
        );
        assert!(d.needs_restart.is_empty(), "{:?}", d.needs_restart);
        let mut doc2: toml_edit::DocumentMut = text.parse().unwrap();
        remove_lun(&mut doc2, "iqn.2026-11.x:a", 0).unwrap();
        let d = diff(&new, &parse(&doc2.to_string()));
        assert_eq!(d.luns_removed, vec![("iqn.2026-11.x:a".to_string(), 0)]);
    }

    #[test]
    fn offline_is_a_key_of_the_lun_applied_live() {
        let old = parse(BASE);
        let mut doc: toml_edit::DocumentMut = BASE.parse().unwrap();
        set_offline_key(&mut doc, "iqn.2026-11.x:b", 0, true).unwrap();
        let text = doc.to_string();
        assert!(text.contains("offline = true"), "{text}");
        let new = parse(&text);
        let d = diff(&old, &new);
        assert_eq!(
            d.luns_offline,
            vec![("iqn.2026-11.x:b".to_string(), 0, true)]
        );
        assert!(d.needs_restart.is_empty(), "{:?}", d.needs_restart);
        set_offline_key(&mut doc, "iqn.2026-11.x:b", 0, false).unwrap();
        assert_eq!(doc.to_string(), BASE);
        assert!(set_offline_key(&mut doc, "iqn.2026-11.x:b", 9, true).is_err());
    }

    #[test]
    fn persist_reservations_applies_live() {
        use ironlun_scsi::pr::PrPersistence;
        let old = parse(BASE);
        let text = BASE.replacen(
            "size = \"1MiB\"\n",
            "size = \"1MiB\"\npersist_reservations = \"always\"\n",
            1,
        );
        let new = parse(&text);
        let d = diff(&old, &new);
        assert_eq!(
            d.luns_persist_reservations,
            vec![("iqn.2026-11.x:a".to_string(), 0, PrPersistence::Always)]
        );
        assert!(d.needs_restart.is_empty(), "{:?}", d.needs_restart);
        assert!(diff(&new, &new).is_empty());
    }

    #[test]
    fn edits_refuse_unknown_targets_luns_and_shrinking() {
        let mut doc: toml_edit::DocumentMut = BASE.parse().unwrap();
        assert_eq!(
            remove_lun(&mut doc, "iqn.2026-11.x:none", 0)
                .unwrap_err()
                .status,
            404
        );
        assert_eq!(
            remove_lun(&mut doc, "iqn.2026-11.x:a", 7)
                .unwrap_err()
                .status,
            404
        );
        let e = set_size(
            &mut doc,
            "iqn.2026-11.x:a",
            0,
            &SizeArg::Text("512K".into()),
            1 << 20,
        )
        .unwrap_err();
        assert!(e.message.contains("cannot shrink"), "{}", e.message);
        let e = set_size(
            &mut doc,
            "iqn.2026-11.x:a",
            0,
            &SizeArg::Text("12Q".into()),
            0,
        )
        .unwrap_err();
        assert!(e.message.contains("size"), "{}", e.message);
        assert_eq!(doc.to_string(), BASE, "a refused edit changes nothing");
    }

    #[test]
    fn restart_only_differences_are_reported() {
        let old = parse(BASE);
        let text = BASE
            .replace("3260", "3261")
            .replace("iqn.2026-11.x:h1", "iqn.2026-11.x:h2")
            + "\n[[target]]\nname = \"iqn.2026-11.x:c\"\n[limits]\nmax_sessions = 7\n";
        let d = diff(&old, &parse(&text));
        assert!(d.luns_added.is_empty() && d.luns_removed.is_empty());
        assert_eq!(d.access_changed, vec!["iqn.2026-11.x:b".to_string()]);
        assert!(d.portals_added.is_empty() && d.portals_removed.is_empty());
        let all = d.needs_restart.join("\n");
        assert_eq!(d.targets_added, vec!["iqn.2026-11.x:c".to_string()]);
        for want in ["every portal replaced", "[limits]"] {
            assert!(all.contains(want), "{want} in {all}");
        }
    }

    #[test]
    fn portals_of_served_groups_change_live() {
        let two = BASE.replace(
            "[[portal]]\nlisten = \"127.0.0.1:3260\"\n",
            "[[portal]]\nlisten = \"127.0.0.1:3260\"\n[[portal]]\nlisten = \"127.0.0.2:3260\"\n",
        );
        let d = diff(&parse(&two), &parse(BASE));
        assert_eq!(
            d.portals_removed,
            vec![("127.0.0.2:3260".parse().unwrap(), 1)]
        );
        assert!(d.needs_restart.is_empty(), "{:?}", d.needs_restart);
        let d = diff(&parse(BASE), &parse(&two));
        assert_eq!(
            d.portals_added,
            vec![("127.0.0.2:3260".parse().unwrap(), 1)]
        );
        let other_group = two.replace(
            "listen = \"127.0.0.2:3260\"\n",
            "listen = \"127.0.0.2:3260\"\ntpgt = 2\n",
        );
        let d = diff(&parse(BASE), &parse(&other_group));
        assert!(d.portals_added.is_empty());
        assert!(
            d.needs_restart[0].contains("new portal group"),
            "{:?}",
            d.needs_restart
        );
    }

    #[test]
    fn embedded_text_is_the_embedded_default() {
        let dir = std::path::Path::new("/tmp/x");
        let c = Config::parse("e", &embedded_text(), None, Some(dir)).unwrap();
        assert!(diff(&Config::embedded_default(dir.to_path_buf()), &c).is_empty());
    }
}
