//! Persistent reservations end to end through the daemon (issue 5, acceptance 3 and 4): what
//! libiscsi does not cover (REGISTER AND MOVE, READ FULL STATUS, SPEC_I_PT, PRgeneration,
//! unit attentions to each party) and the command sequences of the real users: fence_scsi,
//! Windows cluster validation and QEMU's migrate-pr (semantics.md §2.1, §2.2, §3.1).
//!
//! Each host is our initiator with its own name (and ISID where it matters) on the embedded
//! default target's LUN 0.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use bytes::Bytes;
use ironlun_initiator::pr::{
    iscsi_transport_id, kind, register_and_move_params, InAction, OutAction, OutParams,
};
use ironlun_initiator::{CommandResult, Session};
use ironlun_testkit::{Daemon, Login};
use std::net::SocketAddr;

const IRONLUN: &str = env!("CARGO_BIN_EXE_ironlun");

const LUN: u64 = 0;
const GOOD: u8 = 0x00;
const CHECK_CONDITION: u8 = 0x02;
const RESERVATION_CONFLICT: u8 = 0x18;

/// UNIT ATTENTION additional sense codes (SPC-4 Annex D).
const RESERVATIONS_PREEMPTED: (u8, u8) = (0x2A, 0x03);
const RESERVATIONS_RELEASED: (u8, u8) = (0x2A, 0x04);
const REGISTRATIONS_PREEMPTED: (u8, u8) = (0x2A, 0x05);
const I_T_NEXUS_LOSS: (u8, u8) = (0x29, 0x07);

/// A host: initiator name and ISID.
struct Host {
    name: &'static str,
    isid: [u8; 6],
}

const A: Host = Host {
    name: "iqn.2026-11.test:host-a",
    isid: [0x80, 0, 0, 0, 0, 0x0a],
};
const B: Host = Host {
    name: "iqn.2026-11.test:host-b",
    isid: [0x80, 0, 0, 0, 0, 0x0b],
};
const C: Host = Host {
    name: "iqn.2026-11.test:host-c",
    isid: [0x80, 0, 0, 0, 0, 0x0c],
};

impl Host {
    fn with_isid(&self, last: u8) -> Host {
        let mut isid = self.isid;
        isid[5] = last;
        Host {
            name: self.name,
            isid,
        }
    }

    fn port(&self) -> String {
        let hex: String = self.isid.iter().map(|b| format!("{b:02x}")).collect();
        format!("{},i,0x{hex}", self.name)
    }
}

/// Log in as `h` and consume the login's unit attentions (29h/xx and any queued for it).
async fn login(addr: SocketAddr, h: &Host) -> Session {
    let s = Login::new(h.name)
        .isid(h.isid)
        .try_connect(addr)
        .await
        .expect("login");
    drain_uas(&s).await;
    s
}

/// TEST UNIT READY until GOOD; the unit attentions it reported, in order.
async fn drain_uas(s: &Session) -> Vec<(u8, u8)> {
    let mut seen = Vec::new();
    for _ in 0..20 {
        let r = s.test_unit_ready(LUN).await.expect("TUR");
        if r.status == GOOD {
            return seen;
        }
        let k = r.sense_key().expect("TUR CHECK CONDITION without sense");
        assert_eq!(k.key, 6, "TUR failed with {k:?}, not a unit attention");
        seen.push((k.asc, k.ascq));
    }
    panic!("TEST UNIT READY never GOOD: {seen:?}");
}

async fn prout(s: &Session, action: OutAction, ty: u8, key: u64, sa_key: u64) -> CommandResult {
    s.pr_out(LUN, action, ty, &OutParams::keys(key, sa_key))
        .await
        .expect("PR OUT")
}

fn ok(r: &CommandResult, what: &str) {
    assert_eq!(
        r.status,
        GOOD,
        "{what}: status {:#x} sense {:?}",
        r.status,
        r.sense_key()
    );
}

fn conflict(r: &CommandResult, what: &str) {
    assert_eq!(
        r.status,
        RESERVATION_CONFLICT,
        "{what}: status {:#x} sense {:?}",
        r.status,
        r.sense_key()
    );
}

fn illegal(r: &CommandResult, asc: u8, what: &str) {
    assert_eq!(r.status, CHECK_CONDITION, "{what}: status {:#x}", r.status);
    let k = r.sense_key().expect("sense");
    assert_eq!((k.key, k.asc), (5, asc), "{what}: {k:?}");
}

async fn write(s: &Session, lba: u64, tag: u8) -> CommandResult {
    let cdb = ironlun_initiator::scsi::write16_cdb(lba, 1, false);
    s.command(LUN, &cdb, Bytes::from(vec![tag; 512]), 0)
        .await
        .expect("WRITE")
}

async fn read(s: &Session, lba: u64) -> CommandResult {
    let cdb = ironlun_initiator::scsi::read16_cdb(lba, 1);
    s.command(LUN, &cdb, Bytes::new(), 512).await.expect("READ")
}

async fn keys(s: &Session) -> (u32, Vec<u64>) {
    let k = s.read_keys(LUN).await.expect("READ KEYS");
    let mut v = k.keys;
    v.sort_unstable();
    (k.generation, v)
}

async fn reservation(s: &Session) -> Option<(u64, u8)> {
    s.read_reservation(LUN)
        .await
        .expect("READ RESERVATION")
        .reservation
        .map(|(key, _, ty)| (key, ty))
}

/// READ FULL STATUS shows exactly one registration: `h`'s initiator port, holding.
async fn assert_sole_holder(s: &Session, h: &Host) {
    let st = s.read_full_status(LUN).await.expect("READ FULL STATUS");
    assert_eq!(st.descriptors.len(), 1, "{st:?}");
    assert!(st.descriptors[0].holder, "{st:?}");
    assert_eq!(st.descriptors[0].initiator(), h.port());
}

#[tokio::test]
async fn register_and_move_hands_the_reservation_to_the_named_port() {
    let d = Daemon::builder(IRONLUN).start();
    let a = login(d.addr, &A).await;
    let b = login(d.addr, &B).await;
    ok(
        &prout(&a, OutAction::Register, 0, 0, 0xA).await,
        "A REGISTER",
    );
    ok(
        &prout(&a, OutAction::Reserve, kind::WRITE_EXCLUSIVE, 0xA, 0).await,
        "A RESERVE WE",
    );
    let (gen0, _) = keys(&a).await;

    let tid = iscsi_transport_id(B.name, Some(B.isid));
    let mv = |sa_key: u64, unreg: bool, rtpi: u16, tid: &[u8]| {
        register_and_move_params(0xA, sa_key, unreg, false, rtpi, tid)
    };
    // Refusals first; none may change anything.
    let r = b
        .pr_out_raw(LUN, OutAction::RegisterAndMove, 0, mv(0xB, false, 1, &tid))
        .await
        .unwrap();
    conflict(&r, "REGISTER AND MOVE from an unregistered nexus");
    let r = a
        .pr_out_raw(LUN, OutAction::RegisterAndMove, 0, mv(0, false, 1, &tid))
        .await
        .unwrap();
    illegal(&r, 0x26, "REGISTER AND MOVE with SARK 0");
    let own = iscsi_transport_id(A.name, Some(A.isid));
    let r = a
        .pr_out_raw(LUN, OutAction::RegisterAndMove, 0, mv(0xB, false, 1, &own))
        .await
        .unwrap();
    illegal(&r, 0x26, "REGISTER AND MOVE to the caller's own port");
    let r = a
        .pr_out_raw(
            LUN,
            OutAction::RegisterAndMove,
            0,
            mv(0xB, false, 999, &tid),
        )
        .await
        .unwrap();
    illegal(&r, 0x26, "REGISTER AND MOVE to an unknown target port");
    assert_eq!(keys(&a).await, (gen0, vec![0xA]));
    assert_eq!(reservation(&a).await, Some((0xA, kind::WRITE_EXCLUSIVE)));

    // The move: B (never registered, named by TransportID) becomes the WE holder with key B.
    let r = a
        .pr_out_raw(LUN, OutAction::RegisterAndMove, 0, mv(0xB, false, 1, &tid))
        .await
        .unwrap();
    ok(&r, "REGISTER AND MOVE");
    let (gen1, k) = keys(&a).await;
    assert_eq!(
        gen1,
        gen0.wrapping_add(1),
        "REGISTER AND MOVE bumps PRgeneration"
    );
    assert_eq!(k, vec![0xA, 0xB], "UNREG=0 keeps the caller registered");
    assert_eq!(
        reservation(&b).await,
        Some((0xB, kind::WRITE_EXCLUSIVE)),
        "same type, new holder"
    );
    let scope = b
        .read_reservation(LUN)
        .await
        .unwrap()
        .reservation
        .map(|r| r.1);
    assert_eq!(
        scope,
        Some(0),
        "LU_SCOPE kept (the type is not copied into the scope)"
    );
    ok(&write(&b, 10, 0xBB).await, "the new holder writes");
    conflict(
        &write(&a, 10, 0xAA).await,
        "the old holder no longer writes",
    );
    ok(&read(&a, 10).await, "WE: a non-holder still reads");
    assert_eq!(
        drain_uas(&a).await,
        vec![],
        "REGISTER AND MOVE queues no unit attention"
    );

    // And back with UNREG=1: B leaves, A holds again.
    let back = iscsi_transport_id(A.name, Some(A.isid));
    let p = register_and_move_params(0xB, 0xA1, true, false, 1, &back);
    ok(
        &b.pr_out_raw(LUN, OutAction::RegisterAndMove, 0, p)
            .await
            .unwrap(),
        "move back, UNREG=1",
    );
    assert_eq!(
        keys(&a).await.1,
        vec![0xA1],
        "UNREG=1 unregisters the caller; A's key replaced"
    );
    assert_eq!(reservation(&a).await, Some((0xA1, kind::WRITE_EXCLUSIVE)));
}

#[tokio::test]
async fn read_full_status_lists_every_registration_with_its_transport_id() {
    let d = Daemon::builder(IRONLUN).start();
    let a = login(d.addr, &A).await;
    let b = login(d.addr, &B).await;
    ok(
        &prout(&a, OutAction::Register, 0, 0, 0xA).await,
        "A REGISTER",
    );
    ok(
        &prout(&b, OutAction::RegisterAndIgnoreExistingKey, 0, 0, 0xB).await,
        "B REGISTER AND IGNORE",
    );
    ok(
        &prout(
            &a,
            OutAction::Reserve,
            kind::WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
            0xA,
            0,
        )
        .await,
        "A RESERVE WERO",
    );

    let st = b.read_full_status(LUN).await.expect("READ FULL STATUS");
    assert_eq!(st.descriptors.len(), 2, "{st:?}");
    let da = st
        .descriptors
        .iter()
        .find(|e| e.key == 0xA)
        .expect("A's descriptor");
    let db = st
        .descriptors
        .iter()
        .find(|e| e.key == 0xB)
        .expect("B's descriptor");
    assert!(da.holder && !db.holder);
    assert_eq!(
        (da.scope, da.kind),
        (0, kind::WRITE_EXCLUSIVE_REGISTRANTS_ONLY)
    );
    assert_eq!(
        (da.rtpi, db.rtpi),
        (1, 1),
        "registered through target port 1"
    );
    assert!(!da.all_tg_pt);
    // TransportID format 01b: the initiator port with its ISID, upper nibble 4h, protocol 5h.
    assert_eq!(da.transport_id[0], 0x45);
    assert_eq!(da.initiator(), A.port());
    assert_eq!(db.initiator(), B.port());
    assert_eq!(da.transport_id.len() % 4, 0);
    let full = st.additional_length;

    // Truncated to 8 bytes: the header only, ADDITIONAL LENGTH still the full length.
    let r = a.pr_in(LUN, InAction::ReadFullStatus, 8).await.unwrap();
    ok(&r, "READ FULL STATUS, allocation length 8");
    assert_eq!(r.data.len(), 8);
    assert_eq!(u32::from_be_bytes(r.data[4..8].try_into().unwrap()), full);
    // Same answer on every I_T nexus.
    assert_eq!(a.read_full_status(LUN).await.unwrap(), st);
}

#[tokio::test]
async fn spec_i_pt_registers_the_listed_ports_all_or_nothing() {
    let d = Daemon::builder(IRONLUN).start();
    let a = login(d.addr, &A).await;
    let b = login(d.addr, &B).await;
    let c2 = C.with_isid(0x2c);
    let c = login(d.addr, &c2).await;

    // B by initiator port (format 01b), C by initiator device (format 00b: any ISID).
    let p = OutParams {
        key: 0,
        service_action_key: 0x5,
        transport_ids: vec![
            iscsi_transport_id(B.name, Some(B.isid)),
            iscsi_transport_id(C.name, None),
        ],
        ..OutParams::default()
    };
    ok(
        &a.pr_out(LUN, OutAction::Register, 0, &p).await.unwrap(),
        "REGISTER SPEC_I_PT",
    );
    assert_eq!(keys(&a).await.1, vec![5, 5, 5]);
    // Each listed nexus is registered: it may reserve and write under WERO.
    ok(
        &prout(
            &b,
            OutAction::Reserve,
            kind::WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
            5,
            0,
        )
        .await,
        "B RESERVE",
    );
    ok(
        &write(&c, 20, 0xCC).await,
        "C (registered by device name) writes under WERO",
    );
    ok(
        &prout(
            &b,
            OutAction::Release,
            kind::WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
            5,
            0,
        )
        .await,
        "B RELEASE",
    );
    drain_uas(&a).await;
    drain_uas(&c).await;

    // A list naming an already registered nexus is refused as a whole.
    let x = Host {
        name: "iqn.2026-11.test:host-x",
        isid: [0x80, 0, 0, 0, 0, 0x0d],
    };
    let gen = keys(&a).await.0;
    let p = OutParams {
        key: 0,
        service_action_key: 0x7,
        transport_ids: vec![
            iscsi_transport_id(x.name, Some(x.isid)),
            iscsi_transport_id(B.name, Some(B.isid)),
        ],
        ..OutParams::default()
    };
    let dd = login(
        d.addr,
        &Host {
            name: "iqn.2026-11.test:host-d",
            isid: [0x80, 0, 0, 0, 0, 0x0e],
        },
    )
    .await;
    let r = dd.pr_out(LUN, OutAction::Register, 0, &p).await.unwrap();
    illegal(&r, 0x26, "SPEC_I_PT naming a registered nexus");
    assert_eq!(
        keys(&a).await,
        (gen, vec![5, 5, 5]),
        "nothing registered, no generation bump"
    );
    // SPEC_I_PT with any other service action is refused.
    let r = dd
        .pr_out(LUN, OutAction::RegisterAndIgnoreExistingKey, 0, &p)
        .await
        .unwrap();
    illegal(&r, 0x26, "SPEC_I_PT with REGISTER AND IGNORE EXISTING KEY");
}

#[tokio::test]
async fn prgeneration_counts_registration_changes_only() {
    let d = Daemon::builder(IRONLUN).start();
    let a = login(d.addr, &A).await;
    let b = login(d.addr, &B).await;
    let g0 = keys(&a).await.0;
    let steps: Vec<(&Session, OutAction, u8, u64, u64, u32, &str)> = vec![
        (&a, OutAction::Register, 0, 0, 0xA, 1, "register"),
        (&a, OutAction::Register, 0, 0xA, 0xA2, 1, "change key"),
        (
            &a,
            OutAction::Reserve,
            kind::WRITE_EXCLUSIVE,
            0xA2,
            0,
            0,
            "reserve",
        ),
        (
            &a,
            OutAction::Reserve,
            kind::WRITE_EXCLUSIVE,
            0xA2,
            0,
            0,
            "reserve again (same type)",
        ),
        (&b, OutAction::Register, 0, 0, 0xB, 1, "second registrant"),
        (
            &b,
            OutAction::Reserve,
            kind::WRITE_EXCLUSIVE,
            0xB,
            0,
            0,
            "conflicting reserve",
        ),
        (
            &a,
            OutAction::Release,
            kind::WRITE_EXCLUSIVE,
            0xA2,
            0,
            0,
            "release",
        ),
        (
            &a,
            OutAction::Register,
            0,
            0x999,
            0x1,
            0,
            "wrong key: conflict",
        ),
        (
            &b,
            OutAction::Preempt,
            kind::WRITE_EXCLUSIVE,
            0xB,
            0xA2,
            1,
            "preempt",
        ),
        (&b, OutAction::Clear, 0, 0xB, 0, 1, "clear"),
    ];
    let mut expect = g0;
    for (s, action, ty, key, sa, bump, what) in steps {
        let _ = prout(s, action, ty, key, sa).await;
        expect = expect.wrapping_add(bump);
        // PR IN reports a pending unit attention like any other command: consume them first.
        drain_uas(&a).await;
        drain_uas(&b).await;
        assert_eq!(keys(&a).await.0, expect, "after {what}");
    }
    assert_eq!(
        keys(&a).await.1,
        Vec::<u64>::new(),
        "CLEAR removed every registration"
    );
}

#[tokio::test]
async fn unit_attentions_reach_exactly_the_parties_the_standard_names() {
    let d = Daemon::builder(IRONLUN).start();
    let a = login(d.addr, &A).await;
    let b = login(d.addr, &B).await;
    let c = login(d.addr, &C).await;
    for (s, k) in [(&a, 0xA), (&b, 0xB), (&c, 0xC)] {
        ok(&prout(s, OutAction::Register, 0, 0, k).await, "REGISTER");
    }
    let wero = kind::WRITE_EXCLUSIVE_REGISTRANTS_ONLY;
    ok(
        &prout(&a, OutAction::Reserve, wero, 0xA, 0).await,
        "A RESERVE WERO",
    );
    assert_eq!(drain_uas(&b).await, vec![], "RESERVE queues nothing");

    // RELEASE of a registrants-only reservation: every other registrant, not the caller.
    ok(
        &prout(&a, OutAction::Release, wero, 0xA, 0).await,
        "A RELEASE",
    );
    assert_eq!(drain_uas(&a).await, vec![]);
    assert_eq!(drain_uas(&b).await, vec![RESERVATIONS_RELEASED]);
    assert_eq!(drain_uas(&c).await, vec![RESERVATIONS_RELEASED]);

    // PREEMPT of a non-holder's key: only the preempted nexus.
    ok(
        &prout(&a, OutAction::Reserve, kind::WRITE_EXCLUSIVE, 0xA, 0).await,
        "A RESERVE WE",
    );
    ok(
        &prout(&b, OutAction::Preempt, kind::WRITE_EXCLUSIVE, 0xB, 0xC).await,
        "B PREEMPT C",
    );
    assert_eq!(drain_uas(&c).await, vec![REGISTRATIONS_PREEMPTED]);
    assert_eq!(drain_uas(&a).await, vec![]);
    assert_eq!(drain_uas(&b).await, vec![]);

    // A registrant that is logged out gets its attention when it comes back (after the
    // I_T nexus loss it also missed).
    ok(
        &prout(&c, OutAction::Register, 0, 0, 0xC).await,
        "C registers again",
    );
    c.logout().await.expect("logout");
    ok(
        &prout(&a, OutAction::Preempt, kind::WRITE_EXCLUSIVE, 0xA, 0xC).await,
        "A PREEMPT C (away)",
    );
    let c = Login::new(C.name)
        .isid(C.isid)
        .try_connect(d.addr)
        .await
        .unwrap();
    let seen = drain_uas(&c).await;
    assert_eq!(
        seen,
        vec![I_T_NEXUS_LOSS, REGISTRATIONS_PREEMPTED],
        "C on return"
    );

    // PREEMPT of the holder with a new type: the preempted holder gets 2Ah/05h, the other
    // registrants 2Ah/04h (type changed), the caller nothing.
    ok(
        &prout(&c, OutAction::Register, 0, 0, 0xC).await,
        "C registers again",
    );
    ok(
        &prout(&b, OutAction::Preempt, wero, 0xB, 0xA).await,
        "B PREEMPT holder A, type WERO",
    );
    assert_eq!(drain_uas(&a).await, vec![REGISTRATIONS_PREEMPTED]);
    assert_eq!(drain_uas(&c).await, vec![RESERVATIONS_RELEASED]);
    assert_eq!(drain_uas(&b).await, vec![]);

    // CLEAR: every other registrant.
    ok(
        &prout(&a, OutAction::Register, 0, 0, 0xA).await,
        "A registers again",
    );
    ok(&prout(&b, OutAction::Clear, 0, 0xB, 0).await, "B CLEAR");
    assert_eq!(drain_uas(&a).await, vec![RESERVATIONS_PREEMPTED]);
    assert_eq!(drain_uas(&c).await, vec![RESERVATIONS_PREEMPTED]);
    assert_eq!(drain_uas(&b).await, vec![]);
}

/// fence_scsi (ClusterLabs fence-agents, semantics.md §2.2): unfence = TUR, REGISTER AND
/// IGNORE EXISTING KEY, RESERVE type 5 if nobody holds one; fence = PREEMPT AND ABORT type 5
/// with the victim's key; a node that re-logs in with a new ISID re-registers and preempts
/// its own stale key.
#[tokio::test]
async fn fence_scsi_unfence_fence_and_self_preempt() {
    let d = Daemon::builder(IRONLUN).start();
    let wero = kind::WRITE_EXCLUSIVE_REGISTRANTS_ONLY;
    let (k1, k2) = (0x6a8b_0001u64, 0x6a8b_0002u64);
    let n1 = login(d.addr, &A).await;
    let n2 = login(d.addr, &B).await;

    // Unfence node 1, then node 2.
    for (s, k) in [(&n1, k1), (&n2, k2)] {
        drain_uas(s).await;
        ok(
            &prout(s, OutAction::RegisterAndIgnoreExistingKey, 0, 0, k).await,
            "sg_persist -o -I -S key",
        );
        if reservation(s).await.is_none() {
            ok(
                &prout(s, OutAction::Reserve, wero, k, 0).await,
                "sg_persist -o -R -T 5",
            );
        }
    }
    assert_eq!(
        reservation(&n2).await,
        Some((k1, wero)),
        "node 1 holds, node 2 did not reserve"
    );
    ok(&write(&n1, 30, 1).await, "node 1 writes");
    ok(
        &write(&n2, 31, 2).await,
        "node 2 (registered) writes under WERO",
    );

    // Fence node 2 from node 1.
    ok(
        &prout(&n1, OutAction::PreemptAndAbort, wero, k1, k2).await,
        "sg_persist -o -A -T 5 -K k1 -S k2",
    );
    assert_eq!(keys(&n1).await.1, vec![k1], "the victim's key is gone");
    assert_eq!(
        reservation(&n1).await,
        Some((k1, wero)),
        "a reservation still exists"
    );
    // The victim: its TUR reports the preemption, then it can no longer write.
    assert_eq!(drain_uas(&n2).await, vec![REGISTRATIONS_PREEMPTED]);
    conflict(&write(&n2, 31, 3).await, "fenced node writes");
    ok(&read(&n2, 31).await, "fenced node still reads (WERO)");

    // Node 1 reboots: same name, new ISID. Its old registration is orphaned on the old nexus.
    drop(n1);
    let n1b = login(d.addr, &A.with_isid(0x1b)).await;
    conflict(&write(&n1b, 32, 4).await, "new ISID is not registered yet");
    ok(
        &prout(&n1b, OutAction::RegisterAndIgnoreExistingKey, 0, 0, k1).await,
        "re-register",
    );
    assert_eq!(
        keys(&n1b).await.1,
        vec![k1, k1],
        "old and new nexus both carry k1"
    );
    // The key was already present: PREEMPT(own, own) type 5 takes over and drops the stale one.
    ok(
        &prout(&n1b, OutAction::Preempt, wero, k1, k1).await,
        "sg_persist -o -P -T 5 -K k1 -S k1",
    );
    assert_eq!(
        keys(&n1b).await.1,
        vec![k1],
        "the stale registration is gone"
    );
    assert_sole_holder(&n1b, &A.with_isid(0x1b)).await;
    ok(&write(&n1b, 32, 5).await, "the re-logged-in node writes");
}

/// Windows failover cluster validation's PR steps (MS-CSVP CprepDisk*, semantics.md §2.1):
/// register + reserve from A, read it back, PREEMPT from unregistered B conflicts, B
/// registers and preempts, B unregisters; Clear → Register → Reserve.
#[tokio::test]
async fn windows_cluster_validation_sequence() {
    let d = Daemon::builder(IRONLUN).start();
    let wero = kind::WRITE_EXCLUSIVE_REGISTRANTS_ONLY;
    let (ka, kb) = (0x0101_0000_4d53_4654u64, 0x0202_0000_4d53_4654u64);
    let a = login(d.addr, &A).await;
    let b = login(d.addr, &B).await;

    ok(
        &prout(&a, OutAction::RegisterAndIgnoreExistingKey, 0, 0, ka).await,
        "CprepDiskPRRegister A",
    );
    ok(
        &prout(&a, OutAction::Reserve, wero, ka, 0).await,
        "CprepDiskPRReserve A",
    );
    // CprepDiskIsPRPresent from both nodes: held by A, visible on every nexus.
    assert_eq!(reservation(&a).await, Some((ka, wero)));
    assert_eq!(reservation(&b).await, Some((ka, wero)));
    conflict(
        &prout(&b, OutAction::Preempt, wero, kb, ka).await,
        "PREEMPT from unregistered B",
    );
    ok(
        &prout(&b, OutAction::RegisterAndIgnoreExistingKey, 0, 0, kb).await,
        "CprepDiskPRRegister B",
    );
    ok(
        &prout(&b, OutAction::Preempt, wero, kb, ka).await,
        "CprepDiskPRPreempt B",
    );
    assert_eq!(
        reservation(&b).await,
        Some((kb, wero)),
        "ownership moved to B"
    );
    assert_eq!(keys(&b).await.1, vec![kb]);
    ok(&read(&b, 0).await, "B reads");
    ok(&write(&b, 40, 7).await, "B writes");
    assert_eq!(drain_uas(&a).await, vec![REGISTRATIONS_PREEMPTED]);
    conflict(&write(&a, 40, 8).await, "A lost its registration");
    // CprepDiskPRUnRegister B: the holder of a registrants-only reservation leaves → released.
    ok(
        &prout(&b, OutAction::RegisterAndIgnoreExistingKey, 0, 0, 0).await,
        "CprepDiskPRUnRegister B",
    );
    assert_eq!(reservation(&a).await, None);
    assert_eq!(keys(&a).await.1, Vec::<u64>::new());
    // Clear → Register → Reserve.
    ok(
        &prout(&a, OutAction::RegisterAndIgnoreExistingKey, 0, 0, ka).await,
        "A registers",
    );
    ok(
        &prout(&a, OutAction::Clear, 0, ka, 0).await,
        "CprepDiskPRClear",
    );
    ok(
        &prout(&a, OutAction::RegisterAndIgnoreExistingKey, 0, 0, ka).await,
        "CprepDiskPRRegister",
    );
    ok(
        &prout(&a, OutAction::Reserve, wero, ka, 0).await,
        "CprepDiskPRReserve",
    );
    assert_eq!(reservation(&b).await, Some((ka, wero)));
    ok(
        &prout(&a, OutAction::Release, wero, ka, 0).await,
        "CprepDiskPRRelease",
    );
    assert_eq!(reservation(&b).await, None);
}

/// QEMU 11 `scsi-block,migrate-pr=on` (semantics.md §3.1): the destination REGISTERs the
/// guest's key and PREEMPTs with RK = SARK = that key and the guest's type. With a
/// reservation the destination takes it and the source is unregistered; without one the
/// PREEMPT removes every registration with that key, the caller's too, so it re-registers.
#[tokio::test]
async fn qemu_migrate_pr_register_then_preempt_with_equal_keys() {
    let d = Daemon::builder(IRONLUN).start();
    let key = 0x5145_4d55u64;
    let wero = kind::WRITE_EXCLUSIVE_REGISTRANTS_ONLY;
    let src = login(d.addr, &A).await;
    let dst = login(d.addr, &B).await;

    // The guest registered and reserved through the source host.
    ok(
        &prout(&src, OutAction::Register, 0, 0, key).await,
        "guest REGISTER (source)",
    );
    ok(
        &prout(&src, OutAction::Reserve, wero, key, 0).await,
        "guest RESERVE (source)",
    );
    // post_load on the destination.
    ok(
        &prout(&dst, OutAction::Register, 0, 0, key).await,
        "destination REGISTER",
    );
    ok(
        &prout(&dst, OutAction::Preempt, wero, key, key).await,
        "destination PREEMPT(K, K)",
    );
    assert_eq!(
        keys(&dst).await.1,
        vec![key],
        "only the destination stays registered"
    );
    assert_sole_holder(&dst, &B).await;
    ok(&write(&dst, 50, 9).await, "destination writes");
    assert_eq!(drain_uas(&src).await, vec![REGISTRATIONS_PREEMPTED]);
    conflict(&write(&src, 50, 10).await, "source fenced");

    // Second migration, no reservation this time (the guest only registered).
    ok(
        &prout(&dst, OutAction::Release, wero, key, 0).await,
        "guest RELEASE",
    );
    ok(
        &prout(&src, OutAction::Register, 0, 0, key).await,
        "back on the source: REGISTER",
    );
    ok(
        &prout(&src, OutAction::Preempt, 0, key, key).await,
        "PREEMPT(K, K) without a reservation",
    );
    assert_eq!(
        keys(&src).await.1,
        Vec::<u64>::new(),
        "every registration with K removed, the caller's too"
    );
    ok(
        &prout(&src, OutAction::Register, 0, 0, key).await,
        "re-register (robust migrate-pr)",
    );
    assert_eq!(keys(&src).await.1, vec![key]);
    assert_eq!(reservation(&src).await, None);
}
