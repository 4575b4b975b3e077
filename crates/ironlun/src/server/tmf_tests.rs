//! Task management across two sessions through the real connection code (SAM-5 §5.6, §7;
//! SPC-4 §7.5.8), deterministically: the LU's backstore holds every write at a gate until the
//! test opens it, so "B's write is in flight in the backstore" is a state, not a race.
//!
//! Two sessions A and B log in over TCP (our initiator) to [`serve_connection`] on a
//! 127.0.0.1 listener of the test. B has writes held at the gate when A sends LUN RESET,
//! CLEAR TASK SET or TARGET WARM RESET: A's response does not come while they are held (a
//! NOP-Out round trip on A after the request shows the target took it); once the gate opens
//! A gets FUNCTION COMPLETE, and every write that was held has landed by then and none later
//! (read back at the response and after B's session has gone on). With TAS=1 B's writes end
//! TASK ABORTED; with TAS=0 (set by B through MODE SELECT) B gets nothing for them (checked
//! against two NOP-Out round trips on B: a response sent for them would be ahead of the
//! NOP-Ins on B's connection), its next command reports the unit attention, and the CmdSN
//! window the writes held reopens (the target forgot their ITTs). PREEMPT AND ABORT of
//! B's reservation from A behaves alike (GOOD after the held writes ended). ABORT TASK of
//! B's own held write is answered only after its I/O ended. No wall-clock bound anywhere.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use super::*;
use crate::config::TargetResetPolicy;
use crate::gated::Gated;
use crate::target::{LunHandle, TargetState};
use ironlun_initiator::scsi::write16_cdb;
use ironlun_initiator::{CommandResult, LoginOptions, PendingCommand, Session};
use ironlun_iscsi::acl::LunMasking;
use ironlun_scsi::lu::{LogicalUnit, LuConfig};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

const TARGET: &str = "iqn.2026-11.io.ironlun:tmf";
const HOST_A: &str = "iqn.2026-11.io.test:tmf-a";
const HOST_B: &str = "iqn.2026-11.io.test:tmf-b";
/// B's writes held at the gate; also the CmdSN window, so that ITTs the target leaked for
/// them would close B's window for good.
const WRITES: usize = 3;
/// Blocks of one write (8 KiB of 512-byte blocks: immediate data, no R2T needed, so a
/// write's response is all B waits for).
const BLOCKS: u32 = 16;
const BLOCK: usize = 512;

/// The daemon's connection code on a listener of the test, serving one target whose LUN 0
/// is a [`Gated`] backstore run like a file LUN (FUA writes on the blocking pool).
struct Harness {
    addr: SocketAddr,
    gate: Arc<Gated>,
    accept: tokio::task::JoinHandle<()>,
    _shutdown: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[[portal]]\nlisten = \"127.0.0.1:0\"\n[negotiation]\ncmd_window = {WRITES}\n\
             [[target]]\nname = \"{TARGET}\"\n[[target.lun]]\nid = 0\nbackstore = \"ram\"\nsize = \"1MiB\"\n"
        );
        let cfg = Config::parse("t.toml", &text, None, Some(dir.path())).unwrap();
        let registry = Arc::new(Registry::build(&cfg).unwrap());
        let gate = Arc::new(Gated::new(1 << 20));
        let lu = LogicalUnit::new(LuConfig::new(0, 512, 2048, TARGET));
        let handle = LunHandle::for_tests(lu, gate.clone(), dir.path().join("aptpl_t"));
        let target = TargetState::new(
            TARGET.to_string(),
            None,
            BTreeMap::from([(0, Arc::new(handle))]),
            LunMasking::default(),
        )
        .with_reset_policy(TargetResetPolicy::All);
        registry.set_targets(vec![Arc::new(target)]);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sessions = Arc::new(SessionLimits::new(cfg.limits.max_sessions));
        let auth = Arc::new(Mutex::new(ironlun_iscsi::chap::AuthLimiter::default()));
        let portals = [TargetPortal::new(addr, 1)];
        let pc = Arc::new(portal_config(&cfg, &portals, 1, &sessions, &auth));
        let live: Arc<SessionTable> = Arc::default();
        let budget = MemoryBudget::new(cfg.limits.max_buffered);
        let (shutdown, sd) = watch::channel(false);
        let cfg_busy_poll = cfg.runtime.busy_poll;
        let accept = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let conn = serve_connection(
                    s,
                    pc.clone(),
                    registry.clone(),
                    live.clone(),
                    budget.account(),
                    cfg_busy_poll,
                    sd.clone(),
                );
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        Harness {
            addr,
            gate,
            accept,
            _shutdown: shutdown,
            _dir: dir,
        }
    }

    /// Log in as `initiator` and clear the power-on unit attention.
    async fn login(&self, initiator: &str) -> Session {
        let s = Session::connect(
            self.addr,
            LoginOptions::new(initiator, Some(TARGET.to_string())),
        )
        .await
        .unwrap();
        assert_eq!(uas(&s).await, vec![(0x29, 0x00)]);
        s
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // A failing test must not leave a blocking-pool thread at the gate: the runtime's
        // shutdown would wait for it forever.
        self.gate.set(true);
        self.accept.abort();
    }
}

/// The unit attentions (ASC, ASCQ) `s` has pending, in order, reported by TEST UNIT READY
/// until it is GOOD.
async fn uas(s: &Session) -> Vec<(u8, u8)> {
    let mut seen = Vec::new();
    loop {
        let r = s.test_unit_ready(0).await.unwrap();
        if r.status == 0 {
            return seen;
        }
        let k = r.sense_key().expect("sense");
        assert_eq!((r.status, k.key), (2, 6), "not a unit attention: {k:?}");
        seen.push((k.asc, k.ascq));
        assert!(seen.len() < 8, "unit attentions without end: {seen:?}");
    }
}

/// MODE SELECT(6) of the control page with TAS `on`, from the page MODE SENSE(6) reports
/// (SPC-4 §6.11, §7.5.8).
async fn set_tas(s: &Session, on: bool) {
    let ms = s
        .command(0, &[0x1A, 0x08, 0x0A, 0, 0xFF, 0], Bytes::new(), 0xFF)
        .await
        .unwrap()
        .good()
        .unwrap();
    let mut list = ms.data.to_vec();
    list[0] = 0; // MODE DATA LENGTH is reserved in MODE SELECT
    if on {
        list[4 + 5] |= 0x40;
    } else {
        list[4 + 5] &= !0x40;
    }
    let cdb = [0x15, 0x10, 0, 0, u8::try_from(list.len()).unwrap(), 0];
    s.command(0, &cdb, Bytes::from(list), 0)
        .await
        .unwrap()
        .good()
        .unwrap();
}

/// TAS as MODE SENSE(6) reports it now.
async fn tas(s: &Session) -> bool {
    let ms = s
        .command(0, &[0x1A, 0x08, 0x0A, 0, 0xFF, 0], Bytes::new(), 0xFF)
        .await
        .unwrap()
        .good()
        .unwrap();
    ms.data[4 + 5] & 0x40 != 0
}

/// A NOP-Out round trip: everything the target sent `s` before it has been received.
async fn barrier(s: &Session) {
    s.nop(Bytes::from_static(b"barrier")).await.unwrap();
}

/// Wait, by NOP-Out round trips on `s`, until its CmdSN window admits `WRITES` commands
/// again; fails after a hundred (the target kept tasks it had ended).
async fn window_reopens(s: &Session, what: &str) {
    let full = u32::try_from(WRITES).unwrap();
    for _ in 0..100 {
        if s.window() == full {
            return;
        }
        barrier(s).await;
    }
    panic!("{what}: the CmdSN window stays at {}", s.window());
}

fn pattern(seed: usize) -> Bytes {
    (0..BLOCKS as usize * BLOCK)
        .map(|i| u8::try_from((i * 7 + seed * 31) % 251).unwrap())
        .collect::<Vec<u8>>()
        .into()
}

/// The first `WRITES` write slots of LUN 0.
async fn read_back(s: &Session) -> Bytes {
    let blocks = BLOCKS * u32::try_from(WRITES).unwrap();
    let r = s.read16(0, 0, blocks, 512).await.unwrap().good().unwrap();
    r.data
}

type Wait = Pin<Box<dyn Future<Output = ironlun_initiator::Result<CommandResult>> + Send>>;

/// B's FUA writes to slots `0..WRITES`, started (every header sent) but not awaited.
async fn start_writes(b: &Session, seed: usize) -> (Vec<Bytes>, Vec<u32>, Vec<Wait>) {
    let mut data = Vec::new();
    let mut itts = Vec::new();
    let mut waits: Vec<Wait> = Vec::new();
    for i in 0..WRITES {
        let buf = pattern(seed + i);
        let lba = u64::from(BLOCKS) * u64::try_from(i).unwrap();
        let p: PendingCommand = b
            .start_command(0, &write16_cdb(lba, BLOCKS, true), buf.clone(), 0)
            .await
            .unwrap();
        itts.push(p.itt());
        waits.push(Box::pin(p.wait()));
        data.push(buf);
    }
    (data, itts, waits)
}

/// Polls `waits` once each alongside two NOP-Out round trips on `s`, and fails if any of
/// them finished: the target sent something for a task that must stay unanswered. (A
/// response sent before the NOP-Ins is delivered to its task before they are.)
async fn assert_unanswered<T: std::fmt::Debug>(
    s: &Session,
    waits: &mut [Pin<Box<dyn Future<Output = T> + Send + '_>>],
    what: &str,
) {
    let barriers = async {
        barrier(s).await;
        barrier(s).await;
    };
    tokio::pin!(barriers);
    std::future::poll_fn(|cx| {
        for (i, w) in waits.iter_mut().enumerate() {
            if let Poll::Ready(r) = w.as_mut().poll(cx) {
                panic!("{what}: #{i} answered: {r:?}");
            }
        }
        barriers.as_mut().poll(cx)
    })
    .await;
}

/// LUN RESET, CLEAR TASK SET and TARGET WARM RESET from A while B's writes are held in the
/// backstore, with TAS=1 and TAS=0 (see the module doc).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_from_a_waits_for_bs_held_writes_and_tas_decides_their_status() {
    for tas_on in [true, false] {
        for function in [
            TmfFunction::LogicalUnitReset,
            TmfFunction::ClearTaskSet,
            TmfFunction::TargetWarmReset,
        ] {
            let what = format!("{function:?} with TAS={}", u8::from(tas_on));
            let h = Harness::start().await;
            let a = h.login(HOST_A).await;
            let b = h.login(HOST_B).await;
            if !tas_on {
                set_tas(&b, false).await;
                assert_eq!(
                    uas(&a).await,
                    vec![(0x2A, 0x01)],
                    "{what}: MODE PARAMETERS CHANGED"
                );
                assert!(!tas(&a).await, "{what}: the mode page is the LU's");
            }
            h.gate.set(false);
            let (data, _, mut writes) = start_writes(&b, 1).await;
            h.gate.entered(WRITES).await;

            // A's request is taken (the NOP-Ins come after it), and stays unanswered while
            // B's writes are held.
            let tmf: Pin<Box<dyn Future<Output = _> + Send + '_>> =
                Box::pin(a.task_mgmt(function, 0, 0));
            let mut tmf = [tmf];
            assert_unanswered(&a, &mut tmf, &format!("{what}: A's response")).await;
            assert_eq!(h.gate.landed(), 0);
            h.gate.set(true);
            let [tmf] = tmf;
            assert_eq!(tmf.await.unwrap(), TmfResponse::FunctionComplete, "{what}");
            // Every held write landed before the response, none after it.
            assert_eq!(h.gate.landed(), WRITES, "{what}");
            let a_uas = uas(&a).await;
            let at_response = read_back(&a).await;
            assert_eq!(at_response, data.concat(), "{what}");

            let b_ua = match function {
                TmfFunction::LogicalUnitReset => vec![(0x29, 0x03)],
                TmfFunction::TargetWarmReset => vec![(0x29, 0x02)],
                _ if tas_on => vec![],
                _ => vec![(0x2F, 0x00)],
            };
            if tas_on {
                for (i, w) in std::mem::take(&mut writes).into_iter().enumerate() {
                    let r = w.await.unwrap();
                    assert_eq!(r.status, 0x40, "{what}: write #{i} {r:?}");
                }
            } else {
                assert_unanswered(&b, &mut writes, &format!("{what}: B's aborted writes")).await;
            }
            // The target forgot the aborted ITTs: B's CmdSN window (all WRITES slots, which
            // the writes held) opens again, as NOP-Ins report it.
            window_reopens(&b, &what).await;
            assert_eq!(uas(&b).await, b_ua, "{what}: B's unit attentions");
            // Still nothing for them after B's next commands.
            assert_unanswered(&b, &mut writes, &format!("{what}: B's aborted writes")).await;
            drop(writes);
            let a_expected = match function {
                TmfFunction::LogicalUnitReset => vec![(0x29, 0x03)],
                TmfFunction::TargetWarmReset => vec![(0x29, 0x02)],
                _ => vec![],
            };
            assert_eq!(a_uas, a_expected, "{what}: A's unit attentions");
            // A reset brings back the default TAS=1; CLEAR TASK SET leaves the mode page.
            let resets = function != TmfFunction::ClearTaskSet;
            assert_eq!(tas(&b).await, tas_on || resets, "{what}");

            // WRITES more writes at once (elsewhere) complete.
            let mut more = Vec::new();
            for i in 0..WRITES {
                let lba = u64::from(BLOCKS) * u64::try_from(WRITES + i).unwrap();
                let cdb = write16_cdb(lba, BLOCKS, true);
                more.push(b.start_command(0, &cdb, pattern(50 + i), 0).await.unwrap());
            }
            for p in more {
                p.wait().await.unwrap().good().unwrap();
            }
            // Nothing of the aborted writes landed after the response.
            assert_eq!(read_back(&a).await, at_response, "{what}");
            assert_eq!(h.gate.landed(), 2 * WRITES, "{what}");
            a.logout().await.unwrap();
            b.logout().await.unwrap();
        }
    }
}

/// ABORT TASK from B of its own write held in the backstore: the response comes only after
/// the write's I/O has ended (SAM-5 §7.2), and the write landed before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_task_of_a_held_write_answers_after_its_io() {
    let h = Harness::start().await;
    let b = h.login(HOST_B).await;
    h.gate.set(false);
    let p = b
        .start_command(0, &write16_cdb(0, BLOCKS, true), pattern(9), 0)
        .await
        .unwrap();
    let itt = p.itt();
    h.gate.entered(1).await;
    let tmf: Pin<Box<dyn Future<Output = _> + Send + '_>> =
        Box::pin(b.task_mgmt(TmfFunction::AbortTask, 0, itt));
    let mut tmf = [tmf];
    assert_unanswered(&b, &mut tmf, "ABORT TASK's response").await;
    assert_eq!(h.gate.landed(), 0);
    h.gate.set(true);
    let [tmf] = tmf;
    assert_eq!(tmf.await.unwrap(), TmfResponse::FunctionComplete);
    assert_eq!(h.gate.landed(), 1);
    // The aborted task's response is dropped (RFC 7143 §11.5.1); the session goes on.
    drop(p);
    assert_eq!(uas(&b).await, vec![]);
    let r = b.read16(0, 0, BLOCKS, 512).await.unwrap().good().unwrap();
    assert_eq!(r.data, pattern(9));
    b.logout().await.unwrap();
}

/// PERSISTENT RESERVE OUT `sa` with reservation type `ty`, key `rk` and service action key
/// `sark` (SPC-4 §6.16), sent and not awaited.
fn prout<'a>(
    s: &'a Session,
    sa: u8,
    ty: u8,
    rk: u64,
    sark: u64,
) -> impl Future<Output = ironlun_initiator::Result<CommandResult>> + Send + 'a {
    let mut list = vec![0u8; 24];
    list[..8].copy_from_slice(&rk.to_be_bytes());
    list[8..16].copy_from_slice(&sark.to_be_bytes());
    let cdb = [0x5F, sa, ty, 0, 0, 0, 0, 0, 24, 0];
    async move { s.command(0, &cdb, Bytes::from(list), 0).await }
}

/// PREEMPT AND ABORT from A of B's Write Exclusive reservation while B's writes are held
/// (SPC-4 §5.13.11.2.6): GOOD only after their I/O ended; with TAS=1 they end TASK ABORTED,
/// with TAS=0 B gets nothing for them and REGISTRATIONS PREEMPTED, then COMMANDS CLEARED BY
/// ANOTHER INITIATOR.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preempt_and_abort_waits_for_bs_held_writes_and_tas_decides_their_status() {
    const WE: u8 = 1;
    for tas_on in [true, false] {
        let what = format!("PREEMPT AND ABORT with TAS={}", u8::from(tas_on));
        let h = Harness::start().await;
        let a = h.login(HOST_A).await;
        let b = h.login(HOST_B).await;
        if !tas_on {
            set_tas(&b, false).await;
            assert_eq!(uas(&a).await, vec![(0x2A, 0x01)], "{what}");
        }
        prout(&a, 0, 0, 0, 0xA).await.unwrap().good().unwrap();
        prout(&b, 0, 0, 0, 0xB).await.unwrap().good().unwrap();
        prout(&b, 1, WE, 0xB, 0).await.unwrap().good().unwrap();
        h.gate.set(false);
        let (data, _, mut writes) = start_writes(&b, 20).await;
        h.gate.entered(WRITES).await;
        let preempt: Pin<Box<dyn Future<Output = _> + Send + '_>> =
            Box::pin(prout(&a, 5, WE, 0xA, 0xB));
        let mut preempt = [preempt];
        assert_unanswered(&a, &mut preempt, &format!("{what}: A's GOOD")).await;
        h.gate.set(true);
        let [preempt] = preempt;
        preempt.await.unwrap().good().unwrap();
        assert_eq!(h.gate.landed(), WRITES, "{what}");
        let at_response = read_back(&a).await;
        assert_eq!(at_response, data.concat(), "{what}");
        if tas_on {
            for (i, w) in std::mem::take(&mut writes).into_iter().enumerate() {
                let r = w.await.unwrap();
                assert_eq!(r.status, 0x40, "{what}: write #{i} {r:?}");
            }
        } else {
            assert_unanswered(&b, &mut writes, &format!("{what}: B's aborted writes")).await;
        }
        window_reopens(&b, &what).await;
        let expected = if tas_on {
            vec![(0x2A, 0x05)]
        } else {
            vec![(0x2A, 0x05), (0x2F, 0x00)]
        };
        assert_eq!(uas(&b).await, expected, "{what}: B's unit attentions");
        assert_unanswered(&b, &mut writes, &format!("{what}: B's aborted writes")).await;
        drop(writes);
        assert_eq!(read_back(&a).await, at_response, "{what}");
        assert_eq!(h.gate.landed(), WRITES, "{what}");
        a.logout().await.unwrap();
        b.logout().await.unwrap();
    }
}
