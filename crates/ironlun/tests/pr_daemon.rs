//! Daemon tests of persistent reservations end to end (issue 5 acceptance 3): APTPL state across
//! `kill -9` and restart, refusal of corrupt and foreign state files, registrations made
//! without APTPL kept across restarts by `persist_reservations = "always"` (issue 16 finding 3,
//! also switched live) and dropped by the default, PREEMPT AND ABORT against a
//! nexus with writes in flight (no write of the preempted nexus lands after GOOD), and ALL_TG_PT
//! across two portal groups. CDBs and parameter lists are built by hand (SPC-4 §6.15, §6.16).
//!
//! Each daemon runs on a data directory the test owns (`DaemonBuilder::spawn_in`), so that a restart
//! sees what the last run left there, and serves the configured portals (no `--listen`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]

use bytes::Bytes;
use ironlun_initiator::pr;
use ironlun_initiator::{CommandResult, Session};
use ironlun_testkit::preempt::{Victims, PREEMPTOR};
use ironlun_testkit::{Daemon, Login, Refused, PROMPT};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const IRONLUN: &str = env!("CARGO_BIN_EXE_ironlun");

const TARGET: &str = "iqn.2026-11.io.ironlun:pr";
const LUN0: u64 = 0;
const BS: u32 = 512;

const INIT_A: &str = "iqn.2026-11.io.ironlun:pr-a";
const INIT_B: &str = "iqn.2026-11.io.ironlun:pr-b";
const ISID_A: [u8; 6] = [0x80, 0x49, 0x4c, 0x4e, 0x00, 0x0a];
const ISID_B: [u8; 6] = [0x80, 0x49, 0x4c, 0x4e, 0x00, 0x0b];

// Status bytes (SAM-5 §5.3.1).
const GOOD: u8 = 0x00;
const RESERVATION_CONFLICT: u8 = 0x18;

// PERSISTENT RESERVE OUT service actions (SPC-4 §6.16.2 Table 211).
const REGISTER: u8 = 0x00;
const RESERVE: u8 = 0x01;
const CLEAR: u8 = 0x03;
const PREEMPT_AND_ABORT: u8 = 0x05;
// PERSISTENT RESERVE IN service actions (SPC-4 §6.15.1 Table 203).
const READ_KEYS: u8 = 0x00;
const READ_RESERVATION: u8 = 0x01;
const READ_FULL_STATUS: u8 = 0x03;
// Parameter list byte 20 (SPC-4 §6.16.3 Table 214).
const ALL_TG_PT: u8 = 0x04;
const APTPL: u8 = 0x01;
/// Write Exclusive – Registrants Only (SPC-4 Table 213).
const WERO: u8 = 5;

// ---------------------------------------------------------------------------------------------
// Harness

/// Config: one target with LUN 0 (`lun`: the backstore lines), one portal per tpgt, each on
/// 127.0.0.1 with a free port.
fn config(tpgts: &[u16], lun: &str) -> String {
    let mut c = String::new();
    for t in tpgts {
        c.push_str(&format!(
            "[[portal]]\nlisten = \"127.0.0.1:0\"\ntpgt = {t}\n"
        ));
    }
    c.push_str(&format!(
        "[[target]]\nname = \"{TARGET}\"\n[[target.lun]]\nid = 0\n{lun}\n"
    ));
    c
}

fn ram_lun(serial: &str) -> String {
    format!("backstore = \"ram\"\nsize = \"16MiB\"\nserial = \"{serial}\"")
}

fn file_lun(serial: &str) -> String {
    format!("backstore = \"file\"\npath = \"lun0.img\"\nsize = \"64MiB\"\nserial = \"{serial}\"")
}

fn state_file(dir: &Path, serial: &str) -> PathBuf {
    dir.join("pr").join(format!("aptpl_{serial}"))
}

/// Start on `dir` with `config`, serving its portals; the exit status and stderr if the daemon
/// refuses to start.
fn try_start(dir: &Path, config: &str) -> Result<Daemon, Refused> {
    Daemon::builder(IRONLUN)
        .config(config)
        .portals()
        .spawn_in(dir)
}

fn start(dir: &Path, config: &str) -> Daemon {
    Daemon::builder(IRONLUN)
        .config(config)
        .portals()
        .start_in(dir)
}

/// Log in as `name` with `isid` through `addr` and clear the unit attentions of a new nexus.
async fn login(addr: SocketAddr, name: &str, isid: [u8; 6]) -> Session {
    Login::new(name)
        .target(TARGET)
        .isid(isid)
        .ready(&[LUN0], 8)
        .connect(addr)
        .await
}

/// Run a command on LUN 0 past unit attentions (those are queued by the PR events of the
/// other nexuses and are checked elsewhere).
async fn past_ua(s: &Session, cdb: &[u8], data: Bytes, alloc: u32) -> CommandResult {
    ironlun_testkit::past_ua(s, LUN0, cdb, data, alloc).await.0
}

/// PERSISTENT RESERVE OUT with a basic 24-byte parameter list (SPC-4 §6.16.1, §6.16.3);
/// `flags` is byte 20 (ALL_TG_PT, APTPL).
async fn prout(s: &Session, sa: u8, ty: u8, rk: u64, sark: u64, flags: u8) -> CommandResult {
    let mut p = pr::OutParams::keys(rk, sark).encode();
    p[20] = flags;
    let mut cdb = pr::out_cdb(pr::OutAction::Register, ty, 24);
    cdb[1] = sa;
    past_ua(s, &cdb, Bytes::from(p), 0).await
}

async fn prout_good(s: &Session, sa: u8, ty: u8, rk: u64, sark: u64, flags: u8) {
    let r = prout(s, sa, ty, rk, sark, flags).await;
    assert_eq!(
        (r.response, r.status),
        (0, GOOD),
        "PR OUT sa {sa:#x} type {ty} rk {rk:#x} sark {sark:#x} flags {flags:#x}: sense {:?}",
        r.sense_key()
    );
}

/// PERSISTENT RESERVE IN (SPC-4 §6.15.1).
async fn prin(s: &Session, sa: u8) -> Bytes {
    let alloc: u16 = 8192;
    let mut cdb = pr::in_cdb(pr::InAction::ReadKeys, alloc);
    cdb[1] = sa;
    let r = past_ua(s, &cdb, Bytes::new(), u32::from(alloc)).await;
    assert_eq!(
        r.status,
        GOOD,
        "PR IN sa {sa:#x}: sense {:?}",
        r.sense_key()
    );
    r.data
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// READ KEYS (SPC-4 §6.15.2): generation and keys, sorted.
async fn read_keys(s: &Session) -> (u32, Vec<u64>) {
    let d = prin(s, READ_KEYS).await;
    assert!(d.len() >= 8, "READ KEYS {} bytes", d.len());
    let k = pr::Keys::parse(&d).expect("READ KEYS data");
    assert_eq!(
        d.len(),
        8 + k.additional_length as usize,
        "READ KEYS ADDITIONAL LENGTH"
    );
    let mut keys = k.keys;
    keys.sort_unstable();
    (k.generation, keys)
}

/// READ RESERVATION (SPC-4 §6.15.3): generation and (key, scope|type) if reserved.
async fn read_reservation(s: &Session) -> (u32, Option<(u64, u8)>) {
    let d = prin(s, READ_RESERVATION).await;
    assert!(d.len() >= 8, "READ RESERVATION {} bytes", d.len());
    let res = match be32(&d[4..]) {
        0 => None,
        16 => {
            assert_eq!(d.len(), 24, "READ RESERVATION length");
            Some((be64(&d[8..]), d[21]))
        }
        n => panic!("READ RESERVATION ADDITIONAL LENGTH {n}"),
    };
    (be32(&d), res)
}

/// One READ FULL STATUS descriptor (SPC-4 §6.15.5 Table 210).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct FullStatus {
    key: u64,
    all_tg_pt: bool,
    holder: bool,
    scope_type: u8,
    rtpi: u16,
    transport_id: Vec<u8>,
}

/// READ FULL STATUS: generation and descriptors, sorted.
async fn read_full_status(s: &Session) -> (u32, Vec<FullStatus>) {
    let d = prin(s, READ_FULL_STATUS).await;
    assert!(d.len() >= 8, "READ FULL STATUS {} bytes", d.len());
    let st = pr::FullStatus::parse(&d).expect("READ FULL STATUS data");
    assert_eq!(
        d.len(),
        8 + st.additional_length as usize,
        "READ FULL STATUS ADDITIONAL LENGTH"
    );
    let described: usize = st
        .descriptors
        .iter()
        .map(|e| 24 + e.transport_id.len())
        .sum();
    assert_eq!(
        described, st.additional_length as usize,
        "descriptors fill ADDITIONAL LENGTH"
    );
    let mut out: Vec<FullStatus> = st
        .descriptors
        .into_iter()
        .map(|e| FullStatus {
            key: e.key,
            all_tg_pt: e.all_tg_pt,
            holder: e.holder,
            scope_type: if e.holder { e.scope << 4 | e.kind } else { 0 },
            // Undefined with ALL_TG_PT=1 (SPC-4 §6.15.5).
            rtpi: if e.all_tg_pt { 0 } else { e.rtpi },
            transport_id: e.transport_id,
        })
        .collect();
    out.sort();
    (st.generation, out)
}

/// `name,i,0x<isid>` as it appears in a format-01b iSCSI TransportID (SPC-4 §7.6.4.6).
fn port_name(name: &str, isid: [u8; 6]) -> String {
    let hex: String = isid.iter().map(|b| format!("{b:02x}")).collect();
    format!("{name},i,0x{hex}")
}

fn names_port(tid: &[u8], name: &str, isid: [u8; 6]) -> bool {
    let text = String::from_utf8_lossy(tid.get(4..).unwrap_or_default()).to_ascii_lowercase();
    text.trim_end_matches('\0') == port_name(name, isid).to_ascii_lowercase()
}

// ---------------------------------------------------------------------------------------------
// (a) APTPL across kill -9

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aptpl_state_survives_kill_9_and_goes_with_aptpl_off() {
    const KA: u64 = 0xaaaa_0000_0000_0001;
    const KB: u64 = 0xbbbb_0000_0000_0002;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&[1], &ram_lun("praptpl"));
    let file = state_file(dir.path(), "praptpl");

    let d = start(dir.path(), &cfg);
    let a = login(d.addrs[0], INIT_A, ISID_A).await;
    let b = login(d.addrs[0], INIT_B, ISID_B).await;
    prout_good(&a, REGISTER, 0, 0, KA, APTPL).await;
    prout_good(&b, REGISTER, 0, 0, KB, APTPL).await;
    prout_good(&a, RESERVE, WERO, KA, 0, 0).await;
    let keys = read_keys(&a).await;
    let res = read_reservation(&b).await;
    let full = read_full_status(&a).await;
    assert_eq!(keys.1, vec![KA, KB]);
    assert_eq!(res.1, Some((KA, WERO)));
    assert_eq!(keys.0, res.0, "one generation");
    assert!(
        keys.0 >= 2,
        "two registrations bump the generation: {}",
        keys.0
    );
    let holders: Vec<&FullStatus> = full.1.iter().filter(|f| f.holder).collect();
    assert_eq!(holders.len(), 1, "{:?}", full.1);
    assert!(
        names_port(&holders[0].transport_id, INIT_A, ISID_A),
        "{:?}",
        holders[0]
    );
    assert!(
        file.exists(),
        "APTPL state file {} written before GOOD",
        file.display()
    );
    d.kill9();

    let d = start(dir.path(), &cfg);
    let a = login(d.addrs[0], INIT_A, ISID_A).await;
    let b = login(d.addrs[0], INIT_B, ISID_B).await;
    assert_eq!(read_keys(&b).await, keys, "READ KEYS after restart");
    assert_eq!(
        read_reservation(&b).await,
        res,
        "READ RESERVATION after restart"
    );
    assert_eq!(
        read_full_status(&a).await,
        full,
        "READ FULL STATUS after restart"
    );
    // The restored holder is A's nexus: under WERO a stranger may not write, B (registered) may.
    let c = login(d.addrs[0], "iqn.2026-11.io.ironlun:pr-c", ISID_A).await;
    let w = ironlun_testkit::pattern(1, BS as usize);
    let cdb = ironlun_initiator::scsi::write16_cdb(0, 1, false);
    assert_eq!(
        past_ua(&c, &cdb, w.clone(), 0).await.status,
        RESERVATION_CONFLICT
    );
    assert_eq!(past_ua(&b, &cdb, w, 0).await.status, GOOD);

    // APTPL=0 in the last REGISTER: the state must not survive a power loss.
    prout_good(&a, REGISTER, 0, KA, KA, 0).await;
    assert!(!file.exists(), "state file removed before GOOD");
    d.kill9();

    let d = start(dir.path(), &cfg);
    let a = login(d.addrs[0], INIT_A, ISID_A).await;
    assert_eq!(
        read_keys(&a).await,
        (0, vec![]),
        "no registrations after restart"
    );
    assert_eq!(
        read_reservation(&a).await,
        (0, None),
        "no reservation after restart"
    );
    drop(d);
}

// ---------------------------------------------------------------------------------------------
// (b) corrupt and foreign state files

/// Start on a fresh data directory holding `state` as the state file of LU `serial`: the daemon
/// must refuse, with a failure exit status and a message naming the file. The directory (keep
/// it while the file is looked at) and the file.
fn assert_refused(serial: &str, state: &[u8], what: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let file = state_file(dir.path(), serial);
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, state).unwrap();
    let Refused {
        status,
        stderr: err,
    } = try_start(dir.path(), &config(&[1], &ram_lun(serial)))
        .err()
        .unwrap_or_else(|| panic!("daemon started with {what}"));
    assert!(!status.success(), "{status}");
    assert!(
        err.contains(&file.display().to_string()),
        "message names the file; stderr:\n{err}"
    );
    (dir, file)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_or_foreign_state_file_refuses_the_start() {
    // Corrupt.
    let (_dir, file) = assert_refused(
        "prbad",
        b"IRONLUN? this is not a state file\n",
        "a corrupt state file",
    );
    assert!(file.exists(), "refused, never dropped");

    // A real state file of LU "prowner".
    let owner = tempfile::tempdir().unwrap();
    let d = start(owner.path(), &config(&[1], &ram_lun("prowner")));
    let a = login(d.addrs[0], INIT_A, ISID_A).await;
    prout_good(&a, REGISTER, 0, 0, 0x1234, APTPL).await;
    d.kill9();
    let good = std::fs::read(state_file(owner.path(), "prowner")).unwrap();

    // ... under another LU's name.
    let (_other, file) = assert_refused("prother", &good, "another LU's state file");
    assert!(file.exists(), "refused, never dropped");

    // ... truncated by one byte.
    assert_refused("prowner", &good[..good.len() - 1], "a truncated state file");

    // The intact file restores.
    let d = start(owner.path(), &config(&[1], &ram_lun("prowner")));
    let a = login(d.addrs[0], INIT_A, ISID_A).await;
    assert_eq!(read_keys(&a).await.1, vec![0x1234]);
}

// ---------------------------------------------------------------------------------------------
// (b2) persist_reservations = "always": registrations made without APTPL survive a restart

const REPORT_CAPABILITIES: u8 = 0x02;

/// REPORT CAPABILITIES (SPC-4 §6.15.4) byte 3 bit 0: PTPL_A.
async fn ptpl_a(s: &Session) -> bool {
    prin(s, REPORT_CAPABILITIES).await[3] & 0x01 != 0
}

/// What READ KEYS, READ RESERVATION and READ FULL STATUS report.
type PrView = (
    (u32, Vec<u64>),
    (u32, Option<(u64, u8)>),
    (u32, Vec<FullStatus>),
);

async fn pr_view(s: &Session) -> PrView {
    (
        read_keys(s).await,
        read_reservation(s).await,
        read_full_status(s).await,
    )
}

/// A and B register WITHOUT APTPL, A reserves WERO; returns what PR IN then shows, and A's
/// session (a new login with its ISID would reinstate it).
async fn register_two_and_reserve(d: &Daemon) -> (PrView, Session) {
    const KA: u64 = 0xaaaa_0000_0000_00a1;
    const KB: u64 = 0xbbbb_0000_0000_00b2;
    let a = login(d.addrs[0], INIT_A, ISID_A).await;
    let b = login(d.addrs[0], INIT_B, ISID_B).await;
    prout_good(&a, REGISTER, 0, 0, KA, 0).await;
    prout_good(&b, REGISTER, 0, 0, KB, 0).await;
    prout_good(&a, RESERVE, WERO, KA, 0, 0).await;
    let view = pr_view(&a).await;
    assert_eq!(view.0 .1, vec![KA, KB]);
    assert_eq!(view.1 .1, Some((KA, WERO)));
    assert_eq!(view.2 .1.len(), 2);
    (view, a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persist_reservations_always_keeps_state_registered_without_aptpl() {
    // "always": kept across kill -9 and a graceful restart; PTPL_A reports it.
    let dir = tempfile::tempdir().unwrap();
    let lun = format!("{}\npersist_reservations = \"always\"", ram_lun("pralways"));
    let cfg = config(&[1], &lun);
    let d = start(dir.path(), &cfg);
    let (before, a) = register_two_and_reserve(&d).await;
    assert!(
        ptpl_a(&a).await,
        "PTPL_A=1 under persist_reservations = \"always\""
    );
    assert!(
        state_file(dir.path(), "pralways").exists(),
        "written before GOOD"
    );
    drop(a);
    d.kill9();
    let d = start(dir.path(), &cfg);
    let a = login(d.addrs[0], INIT_A, ISID_A).await;
    assert_eq!(pr_view(&a).await, before, "after kill -9");
    drop(a);
    drop(d);
    let d = start(dir.path(), &cfg);
    let a = login(d.addrs[0], INIT_A, ISID_A).await;
    assert_eq!(pr_view(&a).await, before, "after a graceful restart");
    drop(a);
    drop(d);

    // Default ("aptpl"): the same state is gone after a graceful restart (SPC-4 §5.13.5.1).
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&[1], &ram_lun("prdefault"));
    let d = start(dir.path(), &cfg);
    let (_, a) = register_two_and_reserve(&d).await;
    assert!(!ptpl_a(&a).await, "PTPL_A=0 without APTPL");
    drop(a);
    drop(d);
    let mut d = start(dir.path(), &cfg);
    let a = login(d.addrs[0], INIT_A, ISID_A).await;
    assert_eq!(
        pr_view(&a).await,
        ((0, vec![]), (0, None), (0, vec![])),
        "nothing kept"
    );

    // Switched to "always" while running (config edited, reload): the state registered
    // before is written at once and survives the next restart.
    drop(a);
    let (before, a) = register_two_and_reserve(&d).await;
    let lun = format!(
        "{}\npersist_reservations = \"always\"",
        ram_lun("prdefault")
    );
    let always = config(&[1], &lun);
    std::fs::write(dir.path().join("ironlun.toml"), &always).unwrap();
    let admin = d.admin.clone();
    let reply = tokio::task::spawn_blocking(move || {
        let c = ironlun_cli::ctl::Client::new(&admin, None).unwrap();
        c.request("POST", "/v1/reload", None, Duration::from_secs(30))
            .unwrap()
    })
    .await
    .unwrap();
    let body = String::from_utf8_lossy(&reply.body).into_owned();
    assert_eq!(reply.status, 200, "{body}");
    assert!(body.contains("persist_reservations"), "{body}");
    assert!(ptpl_a(&a).await, "PTPL_A=1 once always");
    assert!(state_file(dir.path(), "prdefault").exists());
    drop(a);
    d.assert_healthy();
    drop(d);
    let d = start(dir.path(), &always);
    let a = login(d.addrs[0], INIT_A, ISID_A).await;
    assert_eq!(pr_view(&a).await, before, "kept after the live switch");
}

// ---------------------------------------------------------------------------------------------
// (c) PREEMPT AND ABORT with writes in flight

/// Victim writers (commands in flight at once), each overwriting its own 128 KiB chunk: above
/// the inline limit, so on the blocking pool.
const VICTIMS: Victims = Victims {
    writers: 32,
    chunk_blocks: 256,
    magic: b"PRTAG\0\0\x01",
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preempt_and_abort_leaves_no_write_of_the_preempted_nexus_behind() {
    const KV: u64 = 0x7600_0000_0000_0001;
    const KP: u64 = 0x5000_0000_0000_0002;
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), &config(&[1], &file_lun("prpaa")));
    let victim = login(d.addrs[0], INIT_A, ISID_A).await;
    let preemptor = login(d.addrs[0], INIT_B, ISID_B).await;
    prout_good(&victim, REGISTER, 0, 0, KV, 0).await;
    prout_good(&preemptor, REGISTER, 0, 0, KP, 0).await;
    prout_good(&victim, RESERVE, WERO, KV, 0, 0).await;

    let preempted = Arc::new(AtomicBool::new(false));
    let writers = VICTIMS.spawn(&victim, &preempted);
    // Let every writer get going, so that writes are in flight (most on the blocking pool).
    tokio::time::sleep(Duration::from_millis(300)).await;

    let sent = Instant::now();
    let r = tokio::time::timeout(
        PROMPT,
        prout(&preemptor, PREEMPT_AND_ABORT, WERO, KP, KV, 0),
    )
    .await
    .expect("PREEMPT AND ABORT hung");
    let good_at = Instant::now();
    preempted.store(true, Ordering::SeqCst);
    assert_eq!(
        r.status,
        GOOD,
        "PREEMPT AND ABORT: sense {:?}",
        r.sense_key()
    );

    // Straight away: the preemptor (now holder) overwrites every block the victim writes.
    for w in 0..VICTIMS.writers {
        let cdb =
            ironlun_initiator::scsi::write16_cdb(VICTIMS.chunk_lba(w), VICTIMS.chunk_blocks, false);
        let r = past_ua(&preemptor, &cdb, VICTIMS.tagged(PREEMPTOR, u32::from(w)), 0).await;
        assert_eq!(r.status, GOOD, "preemptor write {w}: {:?}", r.sense_key());
    }

    let mut recs = Vec::new();
    for t in writers {
        recs.extend(
            tokio::time::timeout(PROMPT * 2, t)
                .await
                .expect("victim writer hung")
                .expect("victim writer panicked"),
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Completions: in-flight ones GOOD, TASK ABORTED or RESERVATION CONFLICT (or the preempt
    // unit attention); after GOOD never GOOD, and each writer ends in RESERVATION CONFLICT.
    let (outstanding, aborted) = VICTIMS.check(&recs, sent);
    eprintln!(
        "victim: {} commands, {outstanding} outstanding at the PREEMPT AND ABORT, {aborted} TASK ABORTED; PREEMPT took {:?}",
        recs.len(),
        good_at - sent
    );
    assert!(
        outstanding > 0,
        "no victim write was in flight: the test proves nothing"
    );

    // No victim write landed after the preemptor's overwrite.
    for w in 0..VICTIMS.writers {
        let r = past_ua(
            &preemptor,
            &ironlun_initiator::scsi::read16_cdb(VICTIMS.chunk_lba(w), VICTIMS.chunk_blocks),
            Bytes::new(),
            VICTIMS.chunk_blocks * BS,
        )
        .await;
        assert_eq!(r.status, GOOD);
        VICTIMS.check_read_back(w, &r.data, &recs);
    }
    drop(d);
}

// ---------------------------------------------------------------------------------------------
// (d) ALL_TG_PT across two portal groups

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_tg_pt_registers_the_initiator_port_on_every_portal_group() {
    const K: u64 = 0x0a11_0000_0000_0001;
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), &config(&[1, 2], &ram_lun("pratp")));
    assert_eq!(d.addrs.len(), 2);
    // The same initiator port (name and ISID) through each portal group: two I_T nexuses.
    let p1 = login(d.addrs[0], INIT_A, ISID_A).await;
    let p2 = login(d.addrs[1], INIT_A, ISID_A).await;
    let stranger = login(d.addrs[1], INIT_B, ISID_B).await;
    let write = ironlun_initiator::scsi::write16_cdb(8, 1, false);
    let data = ironlun_testkit::pattern(8, BS as usize);

    // ALL_TG_PT=1 through portal group 1: the nexus through portal group 2 is registered too.
    prout_good(&p1, REGISTER, 0, 0, K, ALL_TG_PT).await;
    prout_good(&p1, RESERVE, WERO, K, 0, 0).await;
    assert!(read_keys(&p2).await.1.contains(&K));
    let (_, full) = read_full_status(&p2).await;
    assert!(
        full.iter()
            .any(|f| f.key == K && f.all_tg_pt && names_port(&f.transport_id, INIT_A, ISID_A)),
        "READ FULL STATUS: {full:?}"
    );
    let r = past_ua(&p2, &write, data.clone(), 0).await;
    assert_eq!(
        r.status,
        GOOD,
        "write through portal group 2: {:?}",
        r.sense_key()
    );
    let r = past_ua(&stranger, &write, data.clone(), 0).await;
    assert_eq!(r.status, RESERVATION_CONFLICT, "unregistered stranger");
    prout_good(&p1, CLEAR, 0, K, 0, 0).await;

    // ALL_TG_PT=0: only the nexus through portal group 1 is registered.
    prout_good(&p1, REGISTER, 0, 0, K, 0).await;
    prout_good(&p1, RESERVE, WERO, K, 0, 0).await;
    let (_, full) = read_full_status(&p2).await;
    assert_eq!(full.len(), 1, "{full:?}");
    assert!(!full[0].all_tg_pt && full[0].rtpi == 1, "{full:?}");
    let r = past_ua(&p2, &write, data.clone(), 0).await;
    assert_eq!(
        r.status,
        RESERVATION_CONFLICT,
        "write through portal group 2 without ALL_TG_PT: {:?}",
        r.sense_key()
    );
    // Unregistered there: a REGISTER with a non-zero RK conflicts (SPC-4 §6.16.3 Table 67).
    let r = prout(&p2, REGISTER, 0, K, K, 0).await;
    assert_eq!(r.status, RESERVATION_CONFLICT);
    let r = past_ua(&p1, &write, data, 0).await;
    assert_eq!(r.status, GOOD, "the holder writes");
    drop(d);
}
