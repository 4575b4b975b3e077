//! `conf/libvirt/qemu-hook` against the real daemon (issue 19 acceptance 3): the hook is run
//! with the arguments and the domain XML libvirt passes at each phase (libvirt's hook
//! documentation, "qemu": `DOMAIN OPERATION SUB-OPERATION EXTRA`, the XML on stdin), as two
//! hypervisors would, host-a and host-b, each logged in to the LU with its own initiator
//! name. Covered: a plain start owns the LU; an incoming migration arms the handover and the
//! destination's first write commits it while the source's writes up to the switchover stay;
//! the source's release after a migration whose destination never wrote commits it; a failed
//! incoming migration is aborted at the destination's release; a stop releases; a start on a
//! host while another owns the LU is refused; a domain without ironlun metadata is left alone.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use ironlun_initiator::Session;
use ironlun_testkit::{session, tagged, Daemon, BLOCK_SIZE, TARGET};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const IRONLUN: &str = env!("CARGO_BIN_EXE_ironlun");
const HOST_A: &str = "iqn.2026-01.test:host-a";
const HOST_B: &str = "iqn.2026-01.test:host-b";
const GOOD: u8 = 0x00;
const CHECK_CONDITION: u8 = 0x02;
const RESERVATION_CONFLICT: u8 = 0x18;

fn hook_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../conf/libvirt/qemu-hook")
}

/// The domain XML of `vm1` with its disk listed in ironlun's metadata (as `virsh dumpxml`
/// would show it, trimmed to what the hook reads plus a disk element).
fn domain_xml(admin: &str) -> String {
    format!(
        r#"<domain type='kvm'>
  <name>vm1</name>
  <uuid>6a1d1b5e-2f0a-4b43-9d3c-0c8f6f3f2a11</uuid>
  <metadata>
    <ironlun:disks xmlns:ironlun="http://ironlun.io/xmlns/libvirt/1" admin="{admin}">
      <ironlun:disk lun="{TARGET}/0"/>
    </ironlun:disks>
  </metadata>
  <devices>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='none' io='native'/>
      <source dev='/dev/disk/by-path/ip-127.0.0.1:3260-iscsi-{TARGET}-lun-0'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
"#
    )
}

/// One hook run on `host`'s hypervisor: `qemu vm1 OP SUB -` with `xml` on stdin.
fn hook(host: &str, state: &Path, op: &str, sub: &str, xml: &str) -> Output {
    let mut child = Command::new("python3")
        .arg(hook_path())
        .args(["vm1", op, sub, "-"])
        .env("IRONLUN_BIN", IRONLUN)
        .env("IRONLUN_INITIATOR", host)
        .env("IRONLUN_HOOK_STATE", state)
        .env("IRONLUN_DEADLINE_MS", "200")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs the hook (python3 is installed by scripts/install-deps.sh)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(xml.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Run the phases `phases` on `host`, each expected to succeed.
fn phases(host: &str, state: &Path, xml: &str, phases: &[(&str, &str)]) {
    for (op, sub) in phases {
        let o = hook(host, state, op, sub, xml);
        assert!(
            o.status.success(),
            "{host}: {op} {sub}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            o.stdout.is_empty(),
            "the hook prints no XML: the domain stays as it is"
        );
    }
}

fn ownership(d: &Daemon) -> Value {
    let o = d.binary().ctl_at(
        d.admin_url(),
        &["ownership", &format!("{TARGET}/0"), "--json"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

async fn write(s: &Session, lba: u64, writer: u64, seq: u64) -> u8 {
    s.write16(0, lba, BLOCK_SIZE, tagged(writer, seq), false)
        .await
        .unwrap()
        .status
}

/// A write after losing the LU: 2Ah/05h once, then RESERVATION CONFLICT.
async fn fenced(s: &Session) {
    let st = write(s, 4096, 0xF, 0).await;
    assert!(
        matches!(st, CHECK_CONDITION | RESERVATION_CONFLICT),
        "{st:#x}"
    );
    assert_eq!(write(s, 4096, 0xF, 1).await, RESERVATION_CONFLICT);
}

const START: [(&str, &str); 3] = [
    ("prepare", "begin"),
    ("start", "begin"),
    ("started", "begin"),
];
const INCOMING: [(&str, &str); 4] = [
    ("migrate", "begin"),
    ("prepare", "begin"),
    ("start", "begin"),
    ("started", "begin"),
];
const STOP: [(&str, &str); 2] = [("stopped", "end"), ("release", "end")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hook_hands_the_disk_over_at_each_libvirt_phase() {
    let d = Daemon::builder(IRONLUN).start();
    let state_a = tempfile::tempdir().unwrap();
    let state_b = tempfile::tempdir().unwrap();
    let (sa, sb) = (state_a.path(), state_b.path());
    let xml = domain_xml(d.admin_url());
    let a = session(d.addr, HOST_A).await;
    let b = session(d.addr, HOST_B).await;

    // A domain without ironlun metadata: nothing happens.
    let plain = "<domain type='kvm'><name>vm1</name></domain>";
    phases(HOST_A, sa, plain, &START);
    assert!(ownership(&d)["owner"].is_null());

    // Plain start on host-a: it owns the LU and writes; host-b only reads.
    phases(HOST_A, sa, &xml, &START);
    let o = ownership(&d);
    assert_eq!(
        (o["owner"].as_str(), o["epoch"].as_u64()),
        (Some(HOST_A), Some(1))
    );
    assert_eq!(write(&a, 0, 0xA, 0).await, GOOD);
    assert_eq!(write(&b, 8, 0xB, 0).await, RESERVATION_CONFLICT);

    // A start of the same domain on host-b is refused while host-a owns the LU.
    let o = hook(HOST_B, sb, "prepare", "begin", &xml);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("owned by") && err.contains("ctl failover"),
        "{err}"
    );

    // Live migration host-a -> host-b. The destination's phases arm the handover; host-a
    // writes through pre-copy; host-b reads.
    phases(HOST_B, sb, &xml, &INCOMING);
    let o = ownership(&d);
    assert_eq!(o["owner"], HOST_A);
    assert_eq!(o["handover"]["state"], "prepared", "{o}");
    assert_eq!(o["handover"]["to"], HOST_B);
    for i in 1..=8 {
        assert_eq!(write(&a, i * 8, 0xA, i).await, GOOD, "pre-copy write {i}");
    }
    assert_eq!(b.read16(0, 0, 8, BLOCK_SIZE).await.unwrap().status, GOOD);
    // Switchover: the source guest stopped; the destination's first write commits.
    assert_eq!(write(&b, 1024, 0xB, 1).await, GOOD);
    let o = ownership(&d);
    assert_eq!(
        (o["owner"].as_str(), o["epoch"].as_u64()),
        (Some(HOST_B), Some(2))
    );
    assert!(o["handover"].is_null(), "{o}");
    fenced(&a).await;
    for i in 0..=8u64 {
        let r = b.read16(0, i * 8, 8, BLOCK_SIZE).await.unwrap();
        assert_eq!(
            r.data,
            tagged(0xA, i),
            "host-a's write {i} before the switchover"
        );
    }
    // The source's QEMU goes away: nothing more to do.
    phases(HOST_A, sa, &xml, &STOP);
    assert_eq!(ownership(&d)["owner"], HOST_B);
    assert_eq!(ownership(&d)["epoch"], 2);

    // A migration back to host-a that fails: host-a's QEMU stops before running the guest;
    // its release aborts the handover and host-b keeps writing.
    phases(HOST_A, sa, &xml, &INCOMING);
    assert_eq!(ownership(&d)["handover"]["to"], HOST_A);
    phases(HOST_A, sa, &xml, &STOP);
    let o = ownership(&d);
    assert_eq!(o["owner"], HOST_B);
    assert!(o["handover"].is_null(), "{o}");
    assert_eq!(write(&b, 1024, 0xB, 2).await, GOOD);
    assert_eq!(write(&a, 1024, 0xA, 99).await, RESERVATION_CONFLICT);

    // A migration to host-a whose guest has not written when host-b's QEMU goes away: the
    // source's release commits it.
    phases(HOST_A, sa, &xml, &INCOMING);
    phases(HOST_B, sb, &xml, &STOP);
    let o = ownership(&d);
    assert_eq!(o["owner"], HOST_A, "{o}");
    assert!(o["handover"].is_null(), "{o}");
    fenced(&b).await;
    assert_eq!(write(&a, 2048, 0xA, 100).await, GOOD);

    // A plain stop on host-a releases the LU; then host-b starts the domain.
    phases(HOST_A, sa, &xml, &STOP);
    assert!(ownership(&d)["owner"].is_null());
    phases(HOST_B, sb, &xml, &START);
    assert_eq!(ownership(&d)["owner"], HOST_B);
    assert_eq!(write(&b, 2048, 0xB, 3).await, GOOD);
}
