//! Tier 7, group 1 (issue 16): open-iscsi in a Linux guest against the release daemon.
//!
//! One guest boot, steps in order (each asserts; see `initiator-tests/src/linux_guest.rs` for
//! the artefacts):
//! 1. SendTargets discovery without discovery CHAP lists every target at the portal asked.
//! 2. The daemon restarted with discovery CHAP: discovery without credentials and with a wrong
//!    secret fails, with the right ones it succeeds.
//! 3. Login with one-way CHAP (a wrong secret refused first), then with mutual CHAP (a wrong
//!    target secret refused by the initiator first); logout each.
//! 4. CRC32C header and data digests negotiated (`iscsiadm -m session -P 2`), data written and
//!    read back through them.
//! 5. `kill -9` of the daemon under a background writer (fio, rate-limited so it spans the
//!    outage, then verifying every block's crc32c), daemon restarted on the same ports: the
//!    session recovers, fio finishes without an I/O error or a mismatch, older data reads back.
//! 6. SIGTERM of the daemon under a background writer: the daemon asks the initiator to log out
//!    (Async Message event 1), iscsid logs "Target requests logout" and sends a Logout, the
//!    daemon exits 0; restarted, the initiator logs back in and no I/O fails.
//! 7. Logout: the session and its disk are gone.
//! 8. Discovery of a target served on two portals (127.0.0.1:P1 tag 1 and 127.0.0.1:P2 tag 2)
//!    lists both TargetAddress entries, and `iscsiadm -m node --login` logs in to both.
//!    **Fails until SendTargets returns every portal (issue 16, finding 1).** Last, so the
//!    steps above run whatever it shows.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use ironlun_initiator_tests::linux_guest::{
    artefact_dir, free_port, save_daemon_log, Guest, GuestSpec,
};
use ironlun_testkit::Daemon;
use std::time::{Duration, Instant};

const PLAIN: &str = "iqn.2026-11.io.ironlun:plain";
const CHAP: &str = "iqn.2026-11.io.ironlun:chap";
const MUTUAL: &str = "iqn.2026-11.io.ironlun:mutual";

fn config(p1: u16, p2: u16, discovery_chap: bool) -> String {
    let discovery = if discovery_chap {
        "[discovery]\nchap = { user = \"disco\", secret = \"discovery-secret\" }\n"
    } else {
        ""
    };
    format!(
        r#"
[[portal]]
listen = "127.0.0.1:{p1}"
tpgt = 1

[[portal]]
listen = "127.0.0.1:{p2}"
tpgt = 2

{discovery}
[[target]]
name = "{PLAIN}"

[[target.lun]]
id = 0
backstore = "file"
path = "plain.img"
size = "64MiB"

[[target]]
name = "{CHAP}"
chap = {{ user = "alice", secret = "alice-secret-12" }}

[[target.lun]]
id = 0
backstore = "ram"
size = "16MiB"

[[target]]
name = "{MUTUAL}"
chap = {{ user = "bob", secret = "bob-secret-1234", mutual_user = "lab", mutual_secret = "target-secret-2" }}

[[target.lun]]
id = 0
backstore = "ram"
size = "16MiB"
"#
    )
}

const S: Duration = Duration::from_secs(1);

#[test]
fn open_iscsi_discovery_chap_digests_recovery_logout() {
    let t0 = Instant::now();
    let group = artefact_dir("linux_iscsiadm");
    let (p1, p2) = (free_port(), free_port());
    let mut d = Daemon::release()
        .config(&config(p1, p2, false))
        .portals()
        .start();
    let mut g = Guest::boot(
        &group,
        &GuestSpec {
            name: "initiator",
            initiator: "iqn.2026-11.test:linux-initiator",
            mem_mib: 2048,
            extra: vec![],
            eth1: None,
        },
        180 * S,
    );
    let env = format!("P1={p1}; P2={p2}; PLAIN={PLAIN}; CHAP={CHAP}; MUTUAL={MUTUAL}\n");
    g.step(
        "start-iscsid",
        60 * S,
        &format!("{env}start_iscsid\niscsiadm --version"),
    );

    // 1. Discovery without CHAP.
    g.step(
        "discovery-no-chap",
        60 * S,
        &format!(
            r#"{env}out=$(iscsiadm -m discovery -t st -p $HOST:$P1)
echo "$out"
for t in $PLAIN $CHAP $MUTUAL; do
  echo "$out" | grep -qx "127.0.0.1:$P1,1 $t" || fail "discovery lacks $t at 127.0.0.1:$P1,1"
done
iscsiadm -m node -o delete"#
        ),
    );

    // 2. Discovery CHAP.
    save_daemon_log(&group, "1-no-discovery-chap", &d.signal_and_wait("TERM"));
    d.respawn(Some(&config(p1, p2, true)));
    g.step(
        "discovery-chap",
        90 * S,
        &format!(
            r#"{env}if iscsiadm -m discovery -t st -p $HOST:$P1; then fail "discovery without CHAP succeeded"; fi
disco() {{
  iscsiadm -m discoverydb -t st -p $HOST:$P1 -o new >/dev/null
  iscsiadm -m discoverydb -t st -p $HOST:$P1 -o update -n discovery.sendtargets.auth.authmethod -v CHAP
  iscsiadm -m discoverydb -t st -p $HOST:$P1 -o update -n discovery.sendtargets.auth.username -v disco
  iscsiadm -m discoverydb -t st -p $HOST:$P1 -o update -n discovery.sendtargets.auth.password -v "$1"
  iscsiadm -m discoverydb -t st -p $HOST:$P1 --discover
}}
if disco wrong-secret-123; then fail "discovery with a wrong CHAP secret succeeded"; fi
out=$(disco discovery-secret)
echo "$out"
echo "$out" | grep -qx "127.0.0.1:$P1,1 $PLAIN" || fail "CHAP discovery lacks $PLAIN"
iscsiadm -m node -o delete"#
        ),
    );

    // 3. One-way and mutual CHAP logins.
    g.step(
        "login-chap",
        120 * S,
        &format!(
            r#"{env}node_new $CHAP $P1
node_set $CHAP $P1 node.session.auth.authmethod CHAP
node_set $CHAP $P1 node.session.auth.username alice
node_set $CHAP $P1 node.session.auth.password wrong-secret-99
if iscsiadm -m node -T $CHAP -p $HOST:$P1 --login; then fail "login with a wrong CHAP secret succeeded"; fi
node_set $CHAP $P1 node.session.auth.password alice-secret-12
iscsiadm -m node -T $CHAP -p $HOST:$P1 --login
dev=$(wait_disk $CHAP $P1)
[ "$(blockdev --getsize64 $dev)" = 16777216 ] || fail "$dev is not 16 MiB"
pattern_write $dev 0 1 chap
pattern_verify $dev 0 1 chap
iscsiadm -m node -T $CHAP -p $HOST:$P1 --logout
[ -z "$(session_state $CHAP)" ] || fail "session to $CHAP still there after logout""#
        ),
    );
    g.step(
        "login-mutual-chap",
        120 * S,
        &format!(
            r#"{env}node_new $MUTUAL $P1
node_set $MUTUAL $P1 node.session.auth.authmethod CHAP
node_set $MUTUAL $P1 node.session.auth.username bob
node_set $MUTUAL $P1 node.session.auth.password bob-secret-1234
node_set $MUTUAL $P1 node.session.auth.username_in lab
node_set $MUTUAL $P1 node.session.auth.password_in not-the-target-secret
if iscsiadm -m node -T $MUTUAL -p $HOST:$P1 --login; then fail "login accepted a target that failed mutual CHAP"; fi
node_set $MUTUAL $P1 node.session.auth.password_in target-secret-2
iscsiadm -m node -T $MUTUAL -p $HOST:$P1 --login
dev=$(wait_disk $MUTUAL $P1)
pattern_write $dev 2 1 mutual
pattern_verify $dev 2 1 mutual
iscsiadm -m node -T $MUTUAL -p $HOST:$P1 --logout"#
        ),
    );

    // 4. CRC32C digests.
    g.step(
        "login-crc32c-digests",
        120 * S,
        &format!(
            r#"{env}node_new $PLAIN $P1
node_set $PLAIN $P1 'node.conn[0].iscsi.HeaderDigest' CRC32C
node_set $PLAIN $P1 'node.conn[0].iscsi.DataDigest' CRC32C
iscsiadm -m node -T $PLAIN -p $HOST:$P1 --login
dev=$(wait_disk $PLAIN $P1)
iscsiadm -m session -P 2 | tee /tmp/session
grep -q 'HeaderDigest: CRC32C' /tmp/session || fail "header digest not CRC32C"
grep -q 'DataDigest: CRC32C' /tmp/session || fail "data digest not CRC32C"
pattern_write $dev 0 8 digest
pattern_verify $dev 0 8 digest"#
        ),
    );

    // 5. kill -9 under a background writer.
    // fio writes 16 MiB at 2 MiB/s (8 s, so the daemon stops in the middle) and then verifies
    // the crc32c of every block; it exits non-zero on any I/O error or mismatch.
    let writer = format!(
        r#"{env}dev=$(disk_of $PLAIN $P1)
rm -f /tmp/writer.rc
( fio --name=writer --filename=$dev --offset=16M --size=16M --rw=write --bs=64k --direct=1 \
    --ioengine=libaio --iodepth=4 --rate=2m --verify=crc32c --do_verify=1 --output=/tmp/writer.log
  echo $? >/tmp/writer.rc ) >/dev/null 2>&1 &
sleep 1; [ ! -f /tmp/writer.rc ] || fail "the writer finished before the daemon was stopped""#
    );
    let check_writer = format!(
        r#"{env}dev=$(disk_of $PLAIN $P1)
wait_for 120 test -f /tmp/writer.rc
cat /tmp/writer.log
[ "$(cat /tmp/writer.rc)" = 0 ] || fail "fio saw an I/O error or a verify mismatch"
grep -q 'err= 0' /tmp/writer.log || fail "fio reports errors"
wait_for 30 sh -c "iscsiadm -m session -P 1 | grep -q 'iSCSI Session State: LOGGED_IN'"
pattern_verify $dev 0 8 digest
iscsiadm -m session -P 2 | grep -q 'DataDigest: CRC32C' || fail "digests lost after recovery"
dmesg | grep -E 'connection[0-9]+:0: detected conn error' | tail -3"#
    );
    g.step("writer-before-kill9", 60 * S, &writer);
    save_daemon_log(&group, "2-before-kill9", &d.signal_and_wait("KILL"));
    std::thread::sleep(2 * S);
    d.respawn(None);
    let out = g.step("recovered-after-kill9", 180 * S, &check_writer);
    assert!(
        out.contains("detected conn error"),
        "no connection error logged by the kernel after kill -9:\n{out}"
    );

    // 6. SIGTERM: the async logout request is honoured and the initiator logs back in.
    g.step("writer-before-sigterm", 60 * S, &writer);
    let t = Instant::now();
    let log = d.signal_and_wait("TERM");
    eprintln!(
        "tier7: daemon exited {:.1} s after SIGTERM",
        t.elapsed().as_secs_f64()
    );
    save_daemon_log(&group, "3-before-sigterm", &log);
    std::thread::sleep(S);
    d.respawn(None);
    g.step("recovered-after-sigterm", 180 * S, &check_writer);
    g.step(
        "async-logout-honoured",
        30 * S,
        r#"cat /host/iscsid.log
grep -q 'Target requests logout' /host/iscsid.log || fail "iscsid never saw the target's logout request""#,
    );

    // 7. Logout.
    g.step(
        "logout",
        60 * S,
        &format!(
            r#"{env}iscsiadm -m node -T $PLAIN -p $HOST:$P1 --logout
[ -z "$(session_state $PLAIN)" ] || fail "session still there after logout"
wait_for 20 sh -c "! test -e /dev/disk/by-path/ip-$HOST:$P1-iscsi-$PLAIN-lun-0"
if iscsiadm -m session; then fail "a session is left"; fi
iscsiadm -m node -o delete"#
        ),
    );

    // 8. Every portal in SendTargets (issue 16 finding 1; fails until that fix is merged).
    g.step(
        "discovery-lists-every-portal (issue 16 finding 1)",
        120 * S,
        &format!(
            r#"{env}out=$(iscsiadm -m discoverydb -t st -p $HOST:$P1 --discover)
echo "$out"
echo "$out" | grep -qx "127.0.0.1:$P1,1 $PLAIN" || fail "SendTargets lacks 127.0.0.1:$P1,1 for $PLAIN"
echo "$out" | grep -qx "127.0.0.1:$P2,2 $PLAIN" || fail "SendTargets lacks the second portal 127.0.0.1:$P2,2 for $PLAIN (issue 16 finding 1)"
repoint_discovered
iscsiadm -m node -T $PLAIN --login
n=$(iscsiadm -m session | grep -c "$PLAIN")
[ "$n" = 2 ] || fail "$n sessions to $PLAIN after a login to every discovered portal, not 2"
iscsiadm -m node -T $PLAIN --logout"#
        ),
    );
    drop(g);
    save_daemon_log(&group, "4-end", &d.stop());
    eprintln!(
        "tier7: linux_iscsiadm passed in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
