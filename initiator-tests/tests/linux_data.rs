//! Tier 7, group 2 (issue 16): data through the Linux kernel initiator, one guest boot.
//!
//! 1. fio writes 4 KiB random blocks at queue depth 32, then 1 MiB sequential blocks, and
//!    verifies each block's crc32c (`--verify_fatal`): no I/O error, no mismatch.
//! 2. `mkfs.xfs`, files written (random data, sha256 recorded), unmounted, `xfs_repair -n`
//!    clean, mounted again, every file's sha256 the same.
//! 3. The files deleted and `fstrim` run: the kernel sends UNMAP (the LUN is thin, `file`
//!    backstore) and the backstore file on the host loses at least that much allocation
//!    (st_blocks, i.e. holes punched), checked on the host.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use ironlun_initiator_tests::linux_guest::{artefact_dir, save_daemon_log, Guest, GuestSpec};
use ironlun_testkit::Daemon;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

const TARGET: &str = "iqn.2026-11.io.ironlun:data";

const CONFIG: &str = r#"
[[portal]]
listen = "127.0.0.1:0"
tpgt = 1

[[target]]
name = "iqn.2026-11.io.ironlun:data"

[[target.lun]]
id = 0
backstore = "file"
path = "data.img"
size = "512MiB"
thin = true
"#;

const S: Duration = Duration::from_secs(1);

/// Bytes allocated to the backstore file on the host.
fn allocated(d: &Daemon) -> u64 {
    std::fs::metadata(d.dir().join("data.img"))
        .unwrap()
        .blocks()
        * 512
}

#[test]
fn fio_verify_xfs_repair_and_fstrim_holes() {
    let t0 = Instant::now();
    let group = artefact_dir("linux_data");
    let d = Daemon::release().config(CONFIG).portals().start();
    let port = d.addr.port().to_string();
    let mut g = Guest::boot(
        &group,
        &GuestSpec {
            name: "initiator",
            initiator: "iqn.2026-11.test:linux-data",
            mem_mib: 2048,
            extra: vec![],
            eth1: None,
        },
        180 * S,
    );
    let env = format!("P={port}; T={TARGET}\n");
    g.step(
        "login",
        90 * S,
        &format!(
            r#"{env}start_iscsid
node_new $T $P
iscsiadm -m node -T $T -p $HOST:$P --login
dev=$(wait_disk $T $P)
[ "$(blockdev --getsize64 $dev)" = 536870912 ] || fail "$dev is not 512 MiB"
q=/sys/block/${{dev#/dev/}}/queue
echo "discard_max_bytes=$(cat $q/discard_max_bytes) provisioning_mode=$(cat /sys/block/${{dev#/dev/}}/device/scsi_disk/*/provisioning_mode)"
[ "$(cat $q/discard_max_bytes)" -gt 0 ] || fail "the kernel sees no discard support on a thin LUN""#
        ),
    );

    // 1. fio with crc32c verification.
    let fio = |name: &str, args: &str| {
        format!(
            r#"{env}dev=$(disk_of $T $P)
fio --name={name} --filename=$dev --direct=1 --ioengine=libaio --verify=crc32c --do_verify=1 \
  --verify_fatal=1 {args} --output=/tmp/{name}.log || {{ cat /tmp/{name}.log; fail "fio {name} failed"; }}
cat /tmp/{name}.log
grep -q 'err= 0' /tmp/{name}.log || fail "fio {name} reports errors""#
        )
    };
    g.step(
        "fio-4k-randwrite-qd32-verify",
        300 * S,
        &fio(
            "rand4k",
            "--rw=randwrite --bs=4k --iodepth=32 --offset=0 --size=32M",
        ),
    );
    g.step(
        "fio-1m-write-verify",
        300 * S,
        &fio(
            "seq1m",
            "--rw=write --bs=1M --iodepth=4 --offset=64M --size=64M",
        ),
    );

    // 2. XFS: files written, unmounted, xfs_repair -n clean, contents kept.
    g.step(
        "xfs-files-repair",
        300 * S,
        &format!(
            r#"{env}dev=$(disk_of $T $P)
mkfs.xfs -f -q $dev
mkdir -p /mnt/x
mount $dev /mnt/x
for i in $(seq 1 24); do head -c 2M /dev/urandom >/mnt/x/file$i; done
mkdir /mnt/x/dir && cp /mnt/x/file1 /mnt/x/dir/copy
(cd /mnt/x && sha256sum file* dir/copy >/tmp/sums)
umount /mnt/x
xfs_repair -n $dev || fail "xfs_repair -n found problems"
mount $dev /mnt/x
(cd /mnt/x && sha256sum -c --quiet /tmp/sums) || fail "file contents changed across the remount"
sync"#
        ),
    );

    // 3. fstrim punches holes in the backstore.
    let before = allocated(&d);
    let out = g.step(
        "delete-and-fstrim",
        120 * S,
        r#"rm -rf /mnt/x/file* /mnt/x/dir
sync
fstrim -v /mnt/x | tee /tmp/fstrim
trimmed=$(awk '{print $(NF-2)}' /tmp/fstrim | tr -d '(')
[ "$trimmed" -gt $((40 * 1048576)) ] || fail "fstrim trimmed only $trimmed bytes"
umount /mnt/x"#,
    );
    let after = allocated(&d);
    eprintln!("tier7: backstore allocation {before} bytes before fstrim, {after} after");
    assert!(
        after + 40 * 1024 * 1024 <= before,
        "fstrim did not reach the backstore as holes: {before} bytes allocated before, {after} \
         after (expected at least 40 MiB less); guest:\n{out}"
    );
    g.step(
        "xfs-repair-after-fstrim",
        120 * S,
        &format!(
            r#"{env}dev=$(disk_of $T $P)
xfs_repair -n $dev || fail "xfs_repair -n found problems after fstrim"
iscsiadm -m node -T $T -p $HOST:$P --logout"#
        ),
    );
    drop(g);
    save_daemon_log(&group, "end", &d.stop());
    eprintln!(
        "tier7: linux_data passed in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
