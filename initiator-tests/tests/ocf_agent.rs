//! Tier 6: the Pacemaker OCF resource agent `conf/pacemaker/ironlun-lun` (issue 19) against
//! the release daemon.
//!
//! - `ocf_tester_passes`: resource-agents' `ocf-tester` (meta-data against ra-api-1.dtd,
//!   validate-all, probes, start/stop/monitor cycles, repeated start and stop) passes.
//! - `actions_move_ownership`: each action run the way Pacemaker runs it (OCF_RESKEY_*
//!   environment, the action as argument), with the daemon's ownership checked after each:
//!   start, monitor, probe, stop, a failover start on another node (also on the destination
//!   of a handover left prepared), stop with a handover prepared away from the node,
//!   migrate_to and migrate_from through `ironlun migrate` (also over a journal a killed run
//!   left unfinished), validation errors, an unreachable daemon, and the agent without
//!   ocf-shellfuncs.
//!
//! ocf-tester, ocf-shellfuncs and xmllint come from scripts/install-deps.sh (resource-agents,
//! libxml2-utils); a missing one fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use ironlun_testkit::{repo_root, require_tool, run, Daemon, Login};
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "iqn.2026-11.io.ironlun:cluster";
const LU: &str = "iqn.2026-11.io.ironlun:cluster/0";
/// Two cluster nodes: their Pacemaker node names and initiator names.
const NODE_A: &str = "node-a";
const NODE_B: &str = "node-b";
const A: &str = "iqn.2026-01.lab:node-a";
const B: &str = "iqn.2026-01.lab:node-b";
const OCF_ROOT: &str = "/usr/lib/ocf";
const OCF_TESTER: &str = "/usr/sbin/ocf-tester";

/// OCF exit codes (OCF resource agent API 1.1, "Exit status").
const OCF_SUCCESS: i32 = 0;
const OCF_ERR_GENERIC: i32 = 1;
const OCF_ERR_INSTALLED: i32 = 5;
const OCF_ERR_CONFIGURED: i32 = 6;
const OCF_NOT_RUNNING: i32 = 7;

fn config() -> String {
    format!("[[target]]\nname = \"{TARGET}\"\n\n[[target.lun]]\nid = 0\nbackstore = \"ram\"\nsize = \"4MiB\"\n")
}

fn agent_path() -> PathBuf {
    repo_root()
        .join("conf/pacemaker/ironlun-lun")
        .canonicalize()
        .expect("conf/pacemaker/ironlun-lun")
}

fn ocf_shellfuncs_present() {
    assert!(
        Path::new(OCF_ROOT)
            .join("lib/heartbeat/ocf-shellfuncs")
            .exists(),
        "{OCF_ROOT}/lib/heartbeat/ocf-shellfuncs missing: run scripts/install-deps.sh (resource-agents)"
    );
}

/// The agent as Pacemaker runs it for one resource: fixed parameters, and per call the node's
/// initiator name and any further OCF_* variables.
struct Agent {
    path: PathBuf,
    ironlun: PathBuf,
    admin: String,
    rsctmp: tempfile::TempDir,
}

impl Agent {
    fn new(d: &Daemon) -> Agent {
        Agent {
            path: agent_path(),
            ironlun: d.binary().path().canonicalize().expect("ironlun binary"),
            admin: d.admin_url().to_owned(),
            rsctmp: tempfile::tempdir().unwrap(),
        }
    }

    /// The command for `action` as node `initiator`: a recurring operation (interval 10 s)
    /// unless `env` sets OCF_RESKEY_CRM_meta_interval.
    fn command(&self, action: &str, initiator: &str, env: &[(&str, &str)]) -> Command {
        let mut c = Command::new(&self.path);
        c.arg(action);
        // Nothing from the test's environment reaches the agent but PATH and the like.
        for (k, _) in std::env::vars() {
            if k.starts_with("OCF_") || k.starts_with("IRONLUN_") || k.starts_with("HA_") {
                c.env_remove(k);
            }
        }
        c.env("OCF_ROOT", OCF_ROOT)
            .env("OCF_RA_VERSION_MAJOR", "1")
            .env("OCF_RA_VERSION_MINOR", "1")
            .env("OCF_RESOURCE_INSTANCE", "lun0")
            .env("OCF_RESOURCE_TYPE", "ironlun-lun")
            .env("OCF_RESKEY_CRM_meta_timeout", "20000")
            .env("OCF_RESKEY_CRM_meta_interval", "10000")
            .env("HA_RSCTMP", self.rsctmp.path())
            .env("OCF_RESKEY_lun", LU)
            .env("OCF_RESKEY_initiator", initiator)
            .env("OCF_RESKEY_admin", &self.admin)
            .env("OCF_RESKEY_ironlun", &self.ironlun)
            .env("OCF_RESKEY_deadline_ms", "5000")
            .env(
                "OCF_RESKEY_peer_initiators",
                format!("{NODE_A}={A} {NODE_B}={B}"),
            );
        for (k, v) in env {
            c.env(k, v);
        }
        c
    }

    /// Run `action` as node `initiator`: (exit code, stdout and stderr).
    fn run(&self, action: &str, initiator: &str, env: &[(&str, &str)]) -> (i32, String) {
        let o = self
            .command(action, initiator, env)
            .output()
            .expect("run the agent");
        let mut out = String::from_utf8_lossy(&o.stdout).into_owned();
        out.push_str(&String::from_utf8_lossy(&o.stderr));
        (o.status.code().expect("the agent exited by a signal"), out)
    }

    /// Run `action` and assert its exit code.
    fn expect(&self, action: &str, initiator: &str, env: &[(&str, &str)], rc: i32) -> String {
        let (got, out) = self.run(action, initiator, env);
        assert_eq!(
            got, rc,
            "{action} as {initiator} with {env:?}: exit {got}, expected {rc}; output:\n{out}"
        );
        out
    }
}

/// `"KEY": VALUE` of a JSON text printed one key per line: the value, without quotes.
fn json_value<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let at = json.find(&format!("\"{key}\": "))? + key.len() + 4;
    let rest = &json[at..];
    Some(if let Some(s) = rest.strip_prefix('"') {
        &s[..s.find('"')?]
    } else {
        rest[..rest.find([',', '\n', '}']).unwrap_or(rest.len())].trim()
    })
}

/// The LU's (owner, epoch) as the daemon reports them; asserts no handover is in progress.
fn ownership(d: &Daemon) -> (Option<String>, u64) {
    let out = d.ctl(&["ownership", LU, "--json"]);
    assert_eq!(
        json_value(&out, "handover"),
        Some("null"),
        "handover left in progress:\n{out}"
    );
    let owner = json_value(&out, "owner").unwrap_or_else(|| panic!("no owner key:\n{out}"));
    let epoch = json_value(&out, "epoch")
        .and_then(|e| e.parse().ok())
        .unwrap_or_else(|| panic!("no epoch:\n{out}"));
    let owner = (owner != "null").then(|| owner.to_owned());
    (owner, epoch)
}

/// The LU's `next_epoch` (the epoch a new handover must use).
fn next_epoch(d: &Daemon) -> u64 {
    let out = d.ctl(&["ownership", LU, "--json"]);
    json_value(&out, "next_epoch")
        .and_then(|e| e.parse().ok())
        .unwrap_or_else(|| panic!("no next_epoch:\n{out}"))
}

#[test]
fn ocf_tester_passes() {
    // ocf-tester lives in /usr/sbin, which a test's PATH may lack: found there or not at all.
    assert!(
        Path::new(OCF_TESTER).exists(),
        "{OCF_TESTER} missing: run scripts/install-deps.sh (resource-agents)"
    );
    require_tool("xmllint");
    ocf_shellfuncs_present();
    let d = Daemon::release().config(&config()).start();
    let agent = Agent::new(&d);
    let mut c = Command::new(OCF_TESTER);
    for (k, _) in std::env::vars() {
        if k.starts_with("OCF_") || k.starts_with("IRONLUN_") {
            c.env_remove(k);
        }
    }
    c.env("OCF_ROOT", OCF_ROOT)
        .env("HA_RSCTMP", agent.rsctmp.path())
        .args(["-n", "lun0", "-o"])
        .arg(format!("lun={LU}"))
        .arg("-o")
        .arg(format!("initiator={A}"))
        .arg("-o")
        .arg(format!("admin={}", agent.admin))
        .arg("-o")
        .arg(format!("ironlun={}", agent.ironlun.display()))
        .arg(&agent.path);
    let (ok, out) = run(&mut c);
    println!("{out}");
    assert!(ok, "ocf-tester failed:\n{out}");
    let passed = format!("{} passed all tests", agent.path.display());
    assert!(
        out.lines().any(|l| l.trim() == passed),
        "no '{passed}' line:\n{out}"
    );
    // ocf-tester ends with the resource stopped.
    assert_eq!(ownership(&d).0, None);
    d.stop();
}

#[test]
fn actions_move_ownership() {
    require_tool("xmllint");
    ocf_shellfuncs_present();
    let d = Daemon::release().config(&config()).start();
    let agent = Agent::new(&d);
    let probe = [("OCF_RESKEY_CRM_meta_interval", "0")];

    // meta-data: valid against the DTD ocf-tester and Pacemaker use, every action and
    // parameter listed.
    let meta = agent.expect("meta-data", A, &[], OCF_SUCCESS);
    let (ok, out) = run(Command::new("sh")
        .arg("-c")
        .arg("cd /usr/share/resource-agents && xmllint --noout --valid -")
        .stdin(std::fs::File::open(write_temp(&agent, "meta.xml", &meta)).unwrap()));
    assert!(
        ok,
        "meta-data is not valid XML for ra-api-1.dtd:\n{out}\n{meta}"
    );
    for action in [
        "start",
        "stop",
        "monitor",
        "migrate_to",
        "migrate_from",
        "validate-all",
        "meta-data",
    ] {
        assert!(
            meta.contains(&format!("<action name=\"{action}\"")),
            "meta-data lacks {action}:\n{meta}"
        );
    }
    for p in [
        "lun",
        "initiator",
        "peer_initiators",
        "admin",
        "token_file",
        "ironlun",
        "deadline_ms",
    ] {
        assert!(
            meta.contains(&format!("<parameter name=\"{p}\"")),
            "meta-data lacks parameter {p}:\n{meta}"
        );
    }
    assert!(
        meta.contains("ordered after this\nresource and colocated with it"),
        "{meta}"
    );
    // An action the agent does not have.
    agent.expect("promote", A, &[], 3);

    // validate-all: the configuration, then what this node lacks.
    agent.expect("validate-all", A, &[], OCF_SUCCESS);
    for bad in ["iqn.x", "iqn.x/", "iqn.x/zero", "a/b/0", "/0", ""] {
        let out = agent.expect(
            "validate-all",
            A,
            &[("OCF_RESKEY_lun", bad)],
            OCF_ERR_CONFIGURED,
        );
        assert!(out.contains("lun"), "{out}");
    }
    agent.expect(
        "validate-all",
        A,
        &[("OCF_RESKEY_deadline_ms", "5s")],
        OCF_ERR_CONFIGURED,
    );
    agent.expect(
        "validate-all",
        A,
        &[("OCF_RESKEY_peer_initiators", "node-a")],
        OCF_ERR_CONFIGURED,
    );
    let missing = [("OCF_RESKEY_ironlun", "/nonexistent/ironlun")];
    agent.expect("validate-all", A, &missing, OCF_ERR_INSTALLED);
    agent.expect("start", A, &missing, OCF_ERR_INSTALLED);
    // A probe on a node without the binary: not running there.
    agent.expect("monitor", A, &[missing[0], probe[0]], OCF_NOT_RUNNING);

    // Nobody owns the LU yet.
    assert_eq!(ownership(&d), (None, 0));
    agent.expect("monitor", A, &probe, OCF_NOT_RUNNING);
    agent.expect("monitor", A, &[], OCF_NOT_RUNNING);

    // start on A: A owns it.
    agent.expect("start", A, &[], OCF_SUCCESS);
    let (owner, e1) = ownership(&d);
    assert_eq!(owner.as_deref(), Some(A));
    assert!(e1 >= 1);
    agent.expect("monitor", A, &[], OCF_SUCCESS);
    agent.expect("monitor", A, &probe, OCF_SUCCESS);
    // Initiator names compare case-insensitively.
    agent.expect("monitor", &A.to_uppercase(), &[], OCF_SUCCESS);
    agent.expect("monitor", B, &[], OCF_NOT_RUNNING);
    agent.expect("monitor", B, &probe, OCF_NOT_RUNNING);
    // start again: nothing changes.
    agent.expect("start", A, &[], OCF_SUCCESS);
    assert_eq!(ownership(&d), (Some(A.to_owned()), e1));
    // stop on B, which does not own it: success, A keeps it.
    agent.expect("stop", B, &[], OCF_SUCCESS);
    assert_eq!(ownership(&d).0.as_deref(), Some(A));

    // stop on A: nobody owns it; stopping again succeeds.
    agent.expect("stop", A, &[], OCF_SUCCESS);
    assert_eq!(ownership(&d).0, None);
    agent.expect("monitor", A, &[], OCF_NOT_RUNNING);
    agent.expect("stop", A, &[], OCF_SUCCESS);
    assert_eq!(ownership(&d).0, None);

    // start on A again, then on B while A (failed, no session) still owns it: a failover.
    agent.expect("start", A, &[], OCF_SUCCESS);
    let (owner, e2) = ownership(&d);
    assert_eq!(owner.as_deref(), Some(A));
    assert!(e2 > e1, "epoch {e2} after {e1}");
    let events_before = d.ctl(&["events", "--json"]);
    assert!(!events_before.contains("\"failover\""), "{events_before}");
    agent.expect("start", B, &[], OCF_SUCCESS);
    let (owner, e3) = ownership(&d);
    assert_eq!(owner.as_deref(), Some(B));
    assert!(e3 > e2, "epoch {e3} after {e2}");
    agent.expect("monitor", B, &[], OCF_SUCCESS);
    agent.expect("monitor", A, &[], OCF_NOT_RUNNING);
    let events = d.ctl(&["events", "--json"]);
    let failover = events
        .split("\"seq\"")
        .find(|e| e.contains("\"kind\": \"failover\""))
        .unwrap_or_else(|| panic!("no failover event:\n{events}"));
    for (k, v) in [
        ("from", A),
        ("to", B),
        ("lun", LU),
        ("force", "true"),
        ("epoch", &e3.to_string()),
    ] {
        assert_eq!(json_value(failover, k), Some(v), "{k} in {failover}");
    }
    assert!(!failover.contains("\"refused\""), "{failover}");

    // Live migration B → A: A's host is logged in to the LU (prepare requires it).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let login = |name: &str| {
        rt.block_on(
            Login::new(name)
                .target(TARGET)
                .ready(&[], 0)
                .connect(d.addr),
        )
    };
    let session_a = login(A);
    // A node without an entry in peer_initiators cannot be the target.
    agent.expect(
        "migrate_to",
        B,
        &[("OCF_RESKEY_CRM_meta_migrate_target", "node-c")],
        OCF_ERR_CONFIGURED,
    );
    assert_eq!(ownership(&d), (Some(B.to_owned()), e3));
    let to_a = [
        ("OCF_RESKEY_CRM_meta_migrate_source", NODE_B),
        ("OCF_RESKEY_CRM_meta_migrate_target", NODE_A),
    ];
    agent.expect("migrate_to", B, &to_a, OCF_SUCCESS);
    let (owner, e4) = ownership(&d);
    assert_eq!(owner.as_deref(), Some(A));
    assert!(e4 > e3, "epoch {e4} after {e3}");
    // The journal of `ironlun migrate` is under HA_RSCTMP, ending with its closing record
    // (the next run rotates it).
    let journal = agent
        .rsctmp
        .path()
        .join("ironlun-lun-iqn.2026-11.io.ironlun_cluster_0.journal");
    let last_record = |j: &Path| {
        let text = std::fs::read_to_string(j).unwrap();
        text.lines().last().unwrap_or_default().to_owned()
    };
    assert!(
        last_record(&journal).starts_with(&format!("v1 {e4} handover done ")),
        "{}",
        std::fs::read_to_string(&journal).unwrap()
    );
    agent.expect("migrate_from", A, &to_a, OCF_SUCCESS);
    assert_eq!(ownership(&d), (Some(A.to_owned()), e4));
    agent.expect("monitor", A, &[], OCF_SUCCESS);
    agent.expect("monitor", B, &[], OCF_NOT_RUNNING);
    // migrate_to again (a retried operation): the target already owns it.
    agent.expect("migrate_to", B, &to_a, OCF_SUCCESS);
    assert_eq!(ownership(&d), (Some(A.to_owned()), e4));

    // migrate_from when migrate_to never committed: it runs the handover itself.
    let session_b = login(B);
    let to_b = [
        ("OCF_RESKEY_CRM_meta_migrate_source", NODE_A),
        ("OCF_RESKEY_CRM_meta_migrate_target", NODE_B),
    ];
    agent.expect("migrate_from", B, &to_b, OCF_SUCCESS);
    let (owner, e5) = ownership(&d);
    assert_eq!(owner.as_deref(), Some(B));
    assert!(e5 > e4, "epoch {e5} after {e4}");
    // migrate_from on a node that is neither owner nor target of the source's LU: an error.
    agent.expect(
        "migrate_from",
        A,
        &[("OCF_RESKEY_CRM_meta_migrate_source", NODE_A)],
        OCF_ERR_GENERIC,
    );
    assert_eq!(ownership(&d), (Some(B.to_owned()), e5));
    // That run rotated the first journal.
    assert_eq!(files_ending(&agent, ".closed"), 1);

    // A journal left unfinished by a killed run (here: the last one cut after its first
    // record, a handover A → B) while the target shows no handover: migrate_to B → A sets it
    // aside and migrates.
    let text = std::fs::read_to_string(&journal).unwrap();
    let first = text.lines().next().unwrap();
    assert!(
        first.starts_with(&format!("v1 {e5} prepare started ")),
        "{text}"
    );
    std::fs::write(&journal, format!("{first}\n")).unwrap();
    agent.expect("migrate_to", B, &to_a, OCF_SUCCESS);
    let (owner, e6) = ownership(&d);
    assert_eq!(owner.as_deref(), Some(A));
    assert!(e6 > e5, "epoch {e6} after {e5}");
    assert_eq!(files_ending(&agent, ".stale"), 1);
    assert!(last_record(&journal).starts_with(&format!("v1 {e6} handover done ")));

    // stop while a handover away from this node is prepared (a migrate_to that timed out):
    // the handover is aborted and the LU released.
    assert!(next_epoch(&d) > e6);
    let next = next_epoch(&d).to_string();
    d.ctl(&[
        "handover", "prepare", LU, "--from", A, "--to", B, "--epoch", &next,
    ]);
    agent.expect("stop", A, &[], OCF_SUCCESS);
    assert_eq!(ownership(&d).0, None);
    agent.expect("start", B, &[], OCF_SUCCESS);
    let (owner, e8) = ownership(&d);
    assert_eq!(owner.as_deref(), Some(B));

    // start on the destination of a handover left prepared (the source's node failed in the
    // middle of a migration): the failover takes the LU and ends the handover.
    let next = next_epoch(&d).to_string();
    d.ctl(&[
        "handover", "prepare", LU, "--from", B, "--to", A, "--epoch", &next,
    ]);
    agent.expect("start", A, &[], OCF_SUCCESS);
    let (owner, e9) = ownership(&d);
    assert_eq!(owner.as_deref(), Some(A));
    assert!(e9 > e8, "epoch {e9} after {e8}");

    // Without ocf-shellfuncs (no resource-agents on the node) the agent works the same.
    let bare = tempfile::tempdir().unwrap();
    let no_lib = [("OCF_ROOT", bare.path().to_str().unwrap())];
    agent.expect("monitor", A, &no_lib, OCF_SUCCESS);
    agent.expect("monitor", B, &no_lib, OCF_NOT_RUNNING);
    agent.expect(
        "validate-all",
        A,
        &[no_lib[0], ("OCF_RESKEY_lun", "x")],
        OCF_ERR_CONFIGURED,
    );
    let meta_bare = agent.expect("meta-data", A, &no_lib, OCF_SUCCESS);
    assert_eq!(meta_bare, meta);

    // The daemon unreachable: monitor, probe, start and stop fail.
    let gone = ("OCF_RESKEY_admin", "unix:/nonexistent/admin.sock");
    for action in ["monitor", "start", "stop"] {
        let out = agent.expect(action, A, &[gone], OCF_ERR_GENERIC);
        assert!(out.contains("cannot read the ownership"), "{out}");
    }
    agent.expect("monitor", A, &[gone, probe[0]], OCF_ERR_GENERIC);
    assert_eq!(ownership(&d), (Some(A.to_owned()), e9));

    // stop on A ends it.
    agent.expect("stop", A, &[], OCF_SUCCESS);
    assert_eq!(ownership(&d).0, None);
    for s in [session_a, session_b] {
        rt.block_on(s.logout()).expect("logout");
    }
    drop(rt);
    d.stop();
}

/// How many files in the agent's HA_RSCTMP end with `suffix`.
fn files_ending(agent: &Agent, suffix: &str) -> usize {
    std::fs::read_dir(agent.rsctmp.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(suffix)
        })
        .count()
}

/// Write `text` to `name` in the agent's scratch directory; its path.
fn write_temp(agent: &Agent, name: &str, text: &str) -> PathBuf {
    let p = agent.rsctmp.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}
