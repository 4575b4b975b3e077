//! The block-device backstore on real loop devices (`losetup -f --show FILE`): the shared
//! conformance suite (fast paths and every fallback), size and logical block size, UNMAP
//! reading zeroes and really deallocating the backing file, FUA reaching the backing file,
//! exclusive open, read-only mode, and refusal of non-devices.
//!
//! Needs root and `/dev/loop-control`. Where the machine offers no loop device, each test
//! prints "SKIPPED: no loop device on this machine" and passes (the one documented exception
//! to "a missing tool fails"); `losetup` itself missing fails when loop devices are offered or
//! when `CI` is set.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use ironlun_backstore::blockdev::FastPaths;
use ironlun_backstore::conformance::{self, pattern};
use ironlun_backstore::{
    BackstoreError, BlockBackend, BlockDevBackend, BlockDevOptions, Extent, Result,
};

/// A loop device over a sparse file in a temporary directory; detached on drop.
struct LoopDevice {
    dev: PathBuf,
    backing: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopDevice {
    /// Attach a fresh all-zero file of `size` bytes with `sector` byte logical blocks.
    fn new(size: u64, sector: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing.img");
        std::fs::File::create(&backing)
            .unwrap()
            .set_len(size)
            .unwrap();
        let out = Command::new("losetup")
            .args(["-f", "--show", "-b", &sector.to_string()])
            .arg(&backing)
            .output()
            .unwrap_or_else(|e| panic!("losetup: {e}"));
        assert!(
            out.status.success(),
            "losetup -f --show {}: {}",
            backing.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let printed = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        // The guard first, so that the device is detached even if the checks below fail.
        let guard = Self {
            dev: PathBuf::from(&printed),
            backing,
            _dir: dir,
        };
        assert!(
            printed.starts_with("/dev/loop"),
            "losetup printed {printed:?}"
        );
        guard
    }

    fn open(&self, read_only: bool) -> Result<BlockDevBackend> {
        BlockDevBackend::open(&self.dev, BlockDevOptions { read_only })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        match Command::new("losetup").arg("-d").arg(&self.dev).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "losetup -d {}: {}",
                self.dev.display(),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("losetup -d {}: {e}", self.dev.display()),
        }
    }
}

/// Whether loop devices can be used here; `false` (after a loud note) when the machine
/// offers none. Panics when `losetup` is missing although loop devices exist or under CI.
fn loop_devices() -> bool {
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let offered = root && Path::new("/dev/loop-control").exists();
    let losetup = Command::new("losetup").arg("--version").output().is_ok();
    if !losetup && (offered || std::env::var_os("CI").is_some()) {
        panic!("losetup is not installed (scripts/install-deps.sh installs it)");
    }
    if !offered {
        eprintln!(
            "SKIPPED: no loop device on this machine (needs root and /dev/loop-control; \
             root = {root})"
        );
    }
    offered
}

/// A block-device backstore together with the loop device it lives on (dropped after it).
struct LoopLu {
    lu: BlockDevBackend,
    _dev: LoopDevice,
}

impl LoopLu {
    fn new(size: u64, paths: Option<FastPaths>) -> Self {
        let dev = LoopDevice::new(size, 512);
        let mut lu = dev.open(false).unwrap();
        if let Some(p) = paths {
            lu = lu.with_fast_paths(p);
        }
        Self { lu, _dev: dev }
    }
}

impl BlockBackend for LoopLu {
    fn size(&self) -> u64 {
        self.lu.size()
    }
    fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.lu.read(offset, len)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.lu.write(offset, data, fua)
    }
    fn flush(&self) -> Result<()> {
        self.lu.flush()
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.lu.write_zeroes(offset, len, unmap)
    }
    fn unmap(&self, offset: u64, len: u64) -> Result<()> {
        self.lu.unmap(offset, len)
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.lu.extents(offset, len)
    }
    fn thin_provisioning(&self) -> bool {
        self.lu.thin_provisioning()
    }
}

const NONE: FastPaths = FastPaths {
    dsync: false,
    punch_hole: false,
    zero_range: false,
    zeroout: false,
};

const MIB: u64 = 1 << 20;

fn sysfs_limit(dev: &Path, name: &str) -> u64 {
    let base = dev.file_name().unwrap().to_str().unwrap();
    std::fs::read_to_string(format!("/sys/block/{base}/queue/{name}"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Bytes the filesystem has allocated to the loop device's backing file.
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn conformance_with_kernel_paths() {
    if !loop_devices() {
        return;
    }
    conformance::run_all(&|size| LoopLu::new(size, None)).unwrap();
}

#[test]
fn conformance_with_every_fallback() {
    if !loop_devices() {
        return;
    }
    conformance::run_all(&|size| LoopLu::new(size, Some(NONE))).unwrap();
}

/// Zeroing through `BLKZEROOUT` alone (the pre-4.9 kernel path): the ioctl is accepted and the
/// ranges, aligned or not, read as zeroes.
#[test]
fn blkzeroout_path_zeroes() {
    if !loop_devices() {
        return;
    }
    let only_zeroout = FastPaths {
        zeroout: true,
        ..NONE
    };
    let lu = LoopLu::new(MIB, Some(only_zeroout));
    lu.write(0, &pattern(3, 1 << 20), false).unwrap();
    lu.unmap(4096, 64 << 10).unwrap();
    lu.write_zeroes(100_001, 70_000, false).unwrap();
    assert!(
        lu.lu.fast_paths().zeroout,
        "BLKZEROOUT reported unsupported"
    );
    let got = lu.read(0, 1 << 20).unwrap();
    let want = pattern(3, 1 << 20);
    assert_eq!(got[..4096], want[..4096]);
    assert!(got[4096..4096 + (64 << 10)].iter().all(|&b| b == 0));
    assert_eq!(
        got[4096 + (64 << 10)..100_001],
        want[4096 + (64 << 10)..100_001]
    );
    assert!(got[100_001..170_001].iter().all(|&b| b == 0));
    assert_eq!(got[170_001..], want[170_001..]);
}

#[test]
fn size_and_block_size_come_from_the_device() {
    if !loop_devices() {
        return;
    }
    let dev = LoopDevice::new(64 * MIB, 512);
    let lu = dev.open(false).unwrap();
    assert_eq!(lu.size(), 64 * MIB);
    assert_eq!(lu.logical_block_size(), 512);
    assert_eq!(lu.path(), dev.dev);
    assert!(matches!(
        lu.read(64 * MIB - 1, 2),
        Err(BackstoreError::OutOfRange { .. })
    ));
    drop(lu);
    let dev4k = LoopDevice::new(8 * MIB, 4096);
    let lu = dev4k.open(false).unwrap();
    assert_eq!(lu.size(), 8 * MIB);
    assert_eq!(lu.logical_block_size(), 4096);
    // Unaligned zeroing on a 4 KiB device: the kernel gets the aligned middle only.
    lu.write(0, &pattern(8, 3 * 4096), false).unwrap();
    lu.unmap(100, 2 * 4096).unwrap();
    let got = lu.read(0, 3 * 4096).unwrap();
    let want = pattern(8, 3 * 4096);
    assert_eq!(got[..100], want[..100]);
    assert!(got[100..100 + 2 * 4096].iter().all(|&b| b == 0));
    assert_eq!(got[100 + 2 * 4096..], want[100 + 2 * 4096..]);
}

/// UNMAP on a loop device reads zeroes and (where the device can deallocate, which
/// `thin_provisioning` must then say) punches a hole in the backing file.
#[test]
fn resize_follows_a_grown_device_only() {
    if !loop_devices() {
        return;
    }
    let lo = LoopDevice::new(1 << 20, 512);
    let b = lo.open(false).unwrap();
    b.write(0, &pattern(3, 4096), false).unwrap();
    // The device has not grown: refused, nothing changes.
    assert!(matches!(
        b.resize(2 << 20),
        Err(BackstoreError::OutOfRange { .. })
    ));
    assert_eq!(b.size(), 1 << 20);
    // Grow the backing file and tell the loop driver (`losetup -c`), then resize.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&lo.backing)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    let out = Command::new("losetup")
        .arg("-c")
        .arg(&lo.dev)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    b.resize(2 << 20).unwrap();
    assert_eq!(b.size(), 2 << 20);
    assert_eq!(&b.read(0, 4096).unwrap()[..], &pattern(3, 4096)[..]);
    b.write((2 << 20) - 4096, &pattern(4, 4096), true).unwrap();
    assert_eq!(
        &b.read((2 << 20) - 4096, 4096).unwrap()[..],
        &pattern(4, 4096)[..]
    );
    assert!(matches!(
        b.resize(1 << 20),
        Err(BackstoreError::Shrink { .. })
    ));
}

#[test]
fn unmap_reads_zeroes_and_deallocates() {
    if !loop_devices() {
        return;
    }
    let dev = LoopDevice::new(64 * MIB, 512);
    let lu = dev.open(false).unwrap();
    let can = sysfs_limit(&dev.dev, "discard_max_bytes") > 0
        && sysfs_limit(&dev.dev, "write_zeroes_max_bytes") > 0;
    assert_eq!(lu.thin_provisioning(), can);
    let data = pattern(17, 8 << 20);
    lu.write(MIB, &data, false).unwrap();
    lu.flush().unwrap();
    let before = allocated(&dev.backing);
    assert!(before >= 8 * MIB, "backing file holds {before} bytes");
    lu.unmap(2 * MIB, 4 * MIB).unwrap();
    lu.flush().unwrap();
    let got = lu.read(MIB, 8 << 20).unwrap();
    assert_eq!(got[..1 << 20], data[..1 << 20]);
    assert!(got[1 << 20..5 << 20].iter().all(|&b| b == 0));
    assert_eq!(got[5 << 20..], data[5 << 20..]);
    // GET LBA STATUS has nothing better to say than "mapped" on a block device.
    assert_eq!(
        lu.extents(2 * MIB, 4 * MIB).unwrap(),
        vec![Extent {
            offset: 2 * MIB,
            len: 4 * MIB,
            mapped: true
        }]
    );
    let after = allocated(&dev.backing);
    if can {
        assert!(
            after + 4 * MIB <= before,
            "unmap did not deallocate: {before} -> {after} bytes allocated"
        );
        assert!(lu.fast_paths().punch_hole);
    }
    // Zeroing without unmap leaves the range allocated.
    lu.write_zeroes(6 * MIB, MIB, false).unwrap();
    lu.flush().unwrap();
    assert!(allocated(&dev.backing) >= after.saturating_sub(MIB));
    assert!(lu.read(6 * MIB, 1 << 20).unwrap().iter().all(|&b| b == 0));
}

/// A FUA write is in the backing file when it returns, without a flush: the loop device
/// forwards it only after the block layer saw the write through (RWF_DSYNC, or the fallback's
/// fdatasync). A plain write followed by `flush` gets there too.
#[test]
fn fua_and_flush_reach_the_backing_file() {
    if !loop_devices() {
        return;
    }
    for paths in [None, Some(NONE)] {
        let dev = LoopDevice::new(4 * MIB, 512);
        let mut lu = dev.open(false).unwrap();
        if let Some(p) = paths {
            lu = lu.with_fast_paths(p);
        }
        let fua = pattern(61, 65_536);
        lu.write(4096, &fua, true).unwrap();
        let backing = std::fs::read(&dev.backing).unwrap();
        assert_eq!(backing[4096..4096 + 65_536], fua[..], "{paths:?}");
        let plain = pattern(62, 10_000);
        lu.write(2 * MIB, &plain, false).unwrap();
        lu.flush().unwrap();
        let backing = std::fs::read(&dev.backing).unwrap();
        let at = usize::try_from(2 * MIB).unwrap();
        assert_eq!(backing[at..at + 10_000], plain[..], "{paths:?}");
        assert_eq!(lu.fast_paths().dsync, paths.is_none());
    }
}

#[test]
fn a_device_in_use_is_refused() {
    if !loop_devices() {
        return;
    }
    let dev = LoopDevice::new(MIB, 512);
    let lu = dev.open(false).unwrap();
    for read_only in [false, true] {
        let err = dev.open(read_only).unwrap_err();
        assert!(err.to_string().contains("in use"), "{err}");
    }
    drop(lu);
    dev.open(false).unwrap();
}

#[test]
fn read_only_refuses_changes() {
    if !loop_devices() {
        return;
    }
    let dev = LoopDevice::new(MIB, 512);
    std::fs::write(&dev.backing, vec![7u8; 1 << 20]).unwrap();
    let lu = dev.open(true).unwrap();
    assert!(lu.is_read_only());
    assert!(lu.read(0, 4096).unwrap().iter().all(|&b| b == 7));
    for r in [
        lu.write(0, &[1], false),
        lu.write(0, &[1], true),
        lu.unmap(0, 4096),
        lu.write_zeroes(0, 4096, false),
        lu.write_zeroes(0, 4096, true),
    ] {
        assert!(matches!(r, Err(BackstoreError::ReadOnly { .. })), "{r:?}");
    }
    lu.flush().unwrap();
    assert!(std::fs::read(&dev.backing).unwrap().iter().all(|&b| b == 7));
}

/// A regular file is refused even when it is a loop device's backing file.
#[test]
fn the_backing_file_itself_is_refused() {
    if !loop_devices() {
        return;
    }
    let dev = LoopDevice::new(MIB, 512);
    let err = BlockDevBackend::open(&dev.backing, BlockDevOptions::default()).unwrap_err();
    assert!(err.to_string().contains("not a block device"), "{err}");
}
