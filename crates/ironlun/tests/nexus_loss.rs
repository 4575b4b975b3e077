//! Tier 4: a logout is an I_T nexus loss whose effects are in place when the Logout Response
//! arrives (SAM-5 §6.3.4; SPC-2 §5.5.1: a RESERVE(6) ends with its nexus). Session A takes an
//! SPC-2 reservation and logs out; session B's WRITE sent right after A's logout completed must
//! not meet A's reservation. Before the fix the daemon wrote the Logout Response first and
//! left the LUs after, so B's WRITE could win the race (libiscsi's Sanitize.Reset met it in CI:
//! its SANITIZE came right after Sanitize.Reservations' second session logged out).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use ironlun_initiator::scsi::write16_cdb;
use ironlun_testkit::{past_ua, session, Daemon, PROMPT};

const IRONLUN: &str = env!("CARGO_BIN_EXE_ironlun");
const RESERVATION_CONFLICT: u8 = 0x18;
const ROUNDS: u32 = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_is_gone_when_its_logout_completes() {
    let d = Daemon::builder(IRONLUN).start();
    let b = session(d.addr, "iqn.2026-11.io.test:nexus-b").await;
    let block = Bytes::from(vec![0x5a; 512]);
    for round in 0..ROUNDS {
        let a = session(d.addr, "iqn.2026-11.io.test:nexus-a").await;
        let (r, _) = past_ua(&a, 0, &[0x16, 0, 0, 0, 0, 0], Bytes::new(), 0).await;
        assert_eq!(r.status, 0, "round {round}: RESERVE(6)");
        tokio::time::timeout(PROMPT, a.logout())
            .await
            .expect("logout hung")
            .expect("logout");
        let (w, _) = past_ua(&b, 0, &write16_cdb(8, 1, false), block.clone(), 0).await;
        assert_ne!(
            w.status, RESERVATION_CONFLICT,
            "round {round}: B met the reservation of a session whose logout had completed"
        );
        assert_eq!(w.status, 0, "round {round}: WRITE {:?}", w.sense_key());
    }
    d.stop();
}
