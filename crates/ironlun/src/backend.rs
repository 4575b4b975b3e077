//! Glue between the SCSI layer's [`IoOp`]s and the backstores: opening LUN backends from the
//! config, and performing one operation (on the blocking pool; see [`crate::target`]).

use crate::config::{BackstoreKind, Lun};
use ironlun_backstore::uring::{UringBackend, UringOptions};
use ironlun_backstore::vhd::{create_dynamic, CreateOptions, VhdBackend};
use ironlun_backstore::{
    file::FileBackend, file::FileOptions, ram::RamBackend, BackstoreError, BlockBackend,
    BlockDevBackend, BlockDevOptions, RbdBackend, RbdOptions,
};
use ironlun_scsi::lu::{IoErrorKind, IoOp, IoResult};
use std::path::Path;
use std::sync::Arc;

/// Open (creating when needed) the backend a LUN describes.
pub fn open(lun: &Lun) -> Result<Arc<dyn BlockBackend>, String> {
    match &lun.backstore {
        BackstoreKind::Ram => {
            let size = lun.size.ok_or("a ram backstore needs a size")?;
            let b = RamBackend::new(size).map_err(|e| format!("ram backstore: {e}"))?;
            Ok(Arc::new(b))
        }
        BackstoreKind::File { path } => open_file(lun, path),
        BackstoreKind::Uring {
            path,
            direct,
            ring_depth,
        } => {
            create_parent(path)?;
            let opts = UringOptions {
                size: lun.size,
                create: true,
                read_only: lun.read_only,
                direct: *direct,
                ring_depth: *ring_depth,
                ..UringOptions::default()
            };
            match UringBackend::open(path, opts) {
                Ok(b) => check_block_multiple(lun, path, Arc::new(b)),
                Err(BackstoreError::Unsupported(what)) => {
                    tracing::warn!(path = %path.display(), %what, "io_uring unavailable; serving the LUN with the file backstore");
                    open_file(lun, path)
                }
                Err(e) => Err(format!("{}: {e}", path.display())),
            }
        }
        BackstoreKind::Vhd { path } => open_vhd(lun, path),
        BackstoreKind::Block { path } => open_block(lun, path),
        BackstoreKind::Rbd {
            pool,
            image,
            ceph_conf,
            client,
        } => open_rbd(lun, pool, image, ceph_conf.as_deref(), client),
    }
}

/// Open an RBD image, creating it with the configured `size` when it is missing (an existing
/// image's size must then match). Taking its exclusive lock is the caller's: at start on one
/// node, on becoming the active gateway in cluster mode.
fn open_rbd(
    lun: &Lun,
    pool: &str,
    image: &str,
    ceph_conf: Option<&Path>,
    client: &str,
) -> Result<Arc<dyn BlockBackend>, String> {
    let opts = RbdOptions {
        pool: pool.to_owned(),
        image: image.to_owned(),
        ceph_conf: ceph_conf.map(Path::to_path_buf),
        client: client.to_owned(),
        create_size: if lun.read_only { None } else { lun.size },
        read_only: lun.read_only,
    };
    let name = format!("rbd image {pool}/{image}");
    let b = RbdBackend::open(opts).map_err(|e| format!("{name}: {e}"))?;
    let (id, addrs) = b.client();
    tracing::info!(pool, image, size = b.size(), client = %id, %addrs, "rbd image open");
    if let Some(size) = lun.size.filter(|s| *s != b.size()) {
        return Err(format!(
            "{name}: the image's size is {} bytes, the config says size = {size}; \
             drop `size` (the image decides) or resize the image",
            b.size()
        ));
    }
    check_block_multiple(lun, Path::new(&name), Arc::new(b))
}

/// Open a block device exclusively. Its size is the LUN's capacity, and the LUN's block size
/// must be a whole number of the device's logical blocks (a 512-byte LUN on a 4Kn disk would
/// need read-modify-write for every write).
fn open_block(lun: &Lun, path: &Path) -> Result<Arc<dyn BlockBackend>, String> {
    let opts = BlockDevOptions {
        read_only: lun.read_only,
    };
    let b = BlockDevBackend::open(path, opts).map_err(|e| e.to_string())?;
    let device_block = b.logical_block_size();
    if !lun.block_size.is_multiple_of(device_block) {
        return Err(format!(
            "{}: block_size = {} is not a multiple of the device's logical block size {device_block}; \
             set block_size = {device_block} or larger",
            path.display(),
            lun.block_size
        ));
    }
    check_block_multiple(lun, path, Arc::new(b))
}

/// Open a VHD image, or create a dynamic one of the configured size when the file is missing.
/// Created images store the size exactly (`force_size`, creator "qem2"), so the LUN has the
/// configured capacity rather than a CHS-rounded one.
fn open_vhd(lun: &Lun, path: &Path) -> Result<Arc<dyn BlockBackend>, String> {
    let b = if path.exists() {
        let b = VhdBackend::open(path, lun.read_only)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some(size) = lun.size.filter(|s| *s != b.size()) {
            return Err(format!(
                "{}: the image's virtual size is {} bytes, the config says size = {size}; \
                 drop `size` (the image decides) or resize the image",
                path.display(),
                b.size()
            ));
        }
        b
    } else {
        let Some(size) = lun.size else {
            return Err(format!(
                "{}: no such VHD image (give `size` to create a dynamic one)",
                path.display()
            ));
        };
        if lun.read_only {
            return Err(format!(
                "{}: no such VHD image, and a read-only LUN does not create one",
                path.display()
            ));
        }
        create_parent(path)?;
        let opts = CreateOptions {
            force_size: true,
            ..CreateOptions::new()
        };
        create_dynamic(path, size, &opts).map_err(|e| format!("{}: {e}", path.display()))?
    };
    check_block_multiple(lun, path, Arc::new(b))
}

fn create_parent(path: &Path) -> Result<(), String> {
    match path.parent() {
        Some(dir) => std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display())),
        None => Ok(()),
    }
}

fn open_file(lun: &Lun, path: &Path) -> Result<Arc<dyn BlockBackend>, String> {
    create_parent(path)?;
    let opts = FileOptions {
        size: lun.size,
        create: true,
        read_only: lun.read_only,
    };
    let b = FileBackend::open(path, opts).map_err(|e| format!("{}: {e}", path.display()))?;
    check_block_multiple(lun, path, Arc::new(b))
}

fn check_block_multiple(
    lun: &Lun,
    path: &Path,
    b: Arc<dyn BlockBackend>,
) -> Result<Arc<dyn BlockBackend>, String> {
    if !b.size().is_multiple_of(u64::from(lun.block_size)) {
        return Err(format!(
            "{}: size {} is not a multiple of block size {}",
            path.display(),
            b.size(),
            lun.block_size
        ));
    }
    Ok(b)
}

/// Perform one operation on an async backend (io_uring, RBD): reads, writes and flushes are
/// awaited without occupying a thread; the rest run synchronously on the blocking pool.
pub async fn perform_async(backend: &Arc<dyn BlockBackend>, op: IoOp) -> IoResult {
    let r = match &op {
        IoOp::Read { offset, len } => match usize::try_from(*len) {
            Ok(len) => backend.read_async(*offset, len).await.map(IoResult::Data),
            Err(_) => return IoResult::Error(IoErrorKind::Other),
        },
        IoOp::Write { offset, data, fua } => backend
            .write_async(*offset, data.clone(), *fua)
            .await
            .map(|()| IoResult::Done),
        IoOp::Flush => backend.flush_async().await.map(|()| IoResult::Done),
        // The rest are synchronous calls, rare but not always short (on RBD each is a network
        // round trip): on the blocking pool, never on an async worker.
        _ => {
            let b = Arc::clone(backend);
            return tokio::task::spawn_blocking(move || perform(&*b, &op))
                .await
                .unwrap_or(IoResult::Error(IoErrorKind::Other));
        }
    };
    match r {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "backstore operation failed");
            IoResult::Error(kind(&op, &e))
        }
    }
}

/// The one mapping of backstore failures into what the SCSI layer reports (DESIGN.md §3 rule 4).
fn kind(op: &IoOp, e: &BackstoreError) -> IoErrorKind {
    match e {
        BackstoreError::NoSpace { .. } => IoErrorKind::NoSpace,
        BackstoreError::Unsupported(_) => IoErrorKind::Unsupported,
        // Another gateway took the medium over (RBD: this client was blocklisted): NOT
        // READY, ASYMMETRIC ACCESS STATE TRANSITION (02/04/0A), never GOOD, so that the
        // initiator retries on the gateway that holds the medium now. The write did not land.
        BackstoreError::Fenced { .. } => IoErrorKind::Fenced,
        BackstoreError::OutOfRange { .. }
        | BackstoreError::ReadOnly { .. }
        | BackstoreError::Shrink { .. } => IoErrorKind::Other,
        BackstoreError::Io { .. } => match op {
            IoOp::Read { .. } | IoOp::MapStatus { .. } => IoErrorKind::ReadError,
            _ => IoErrorKind::WriteError,
        },
    }
}

/// Perform one operation synchronously. Runs on a blocking thread.
pub fn perform(backend: &dyn BlockBackend, op: &IoOp) -> IoResult {
    let r = match op {
        IoOp::Read { offset, len } => match usize::try_from(*len) {
            Ok(len) => backend.read(*offset, len).map(IoResult::Data),
            Err(_) => return IoResult::Error(IoErrorKind::Other),
        },
        IoOp::Write { offset, data, fua } => {
            backend.write(*offset, data, *fua).map(|()| IoResult::Done)
        }
        IoOp::Flush => backend.flush().map(|()| IoResult::Done),
        IoOp::WriteZeroes { offset, len, unmap } => backend
            .write_zeroes(*offset, *len, *unmap)
            .map(|()| IoResult::Done),
        IoOp::Unmap { ranges } => ranges
            .iter()
            .try_for_each(|(o, l)| backend.unmap(*o, *l))
            .map(|()| IoResult::Done),
        IoOp::MapStatus { offset, len } => backend.extents(*offset, *len).map(|v| {
            IoResult::Extents(v.into_iter().map(|e| (e.offset, e.len, e.mapped)).collect())
        }),
        // Spans logical units: carried out by crate::target::xcopy, never by one backend.
        IoOp::ExtendedCopy(_) => return IoResult::Error(IoErrorKind::Unsupported),
    };
    match r {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "backstore operation failed");
            IoResult::Error(kind(op, &e))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn block_lun(path: &Path, block_size: u32) -> Lun {
        Lun {
            id: 0,
            backstore: BackstoreKind::Block {
                path: path.to_owned(),
            },
            size: None,
            block_size,
            serial: "s".into(),
            naa: [0; 16],
            read_only: false,
            thin: true,
            write_cache: true,
            physical_block_exponent: 0,
            sanitize_rate: None,
            offline: false,
            persist_reservations: Default::default(),
        }
    }

    #[test]
    fn block_backstore_refuses_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, [0u8; 4096]).unwrap();
        let err = open(&block_lun(&path, 512)).map(|_| ()).unwrap_err();
        assert!(err.contains("not a block device"), "{err}");
        assert!(err.contains("disk.img"), "{err}");
    }

    /// A 512-byte LUN on a 4 KiB-sector device is refused, naming both sizes. Needs a loop
    /// device (root); without one this says so loudly and checks nothing else.
    #[test]
    fn block_size_must_be_a_multiple_of_the_devices() {
        use std::process::Command;
        let root = std::fs::metadata("/proc/self")
            .is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
        if !root || !Path::new("/dev/loop-control").exists() {
            eprintln!("SKIPPED: no loop device on this machine");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing.img");
        std::fs::File::create(&backing)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let out = Command::new("losetup")
            .args(["-f", "--show", "-b", "4096"])
            .arg(&backing)
            .output()
            .expect("losetup (scripts/install-deps.sh installs it)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let small = open(&block_lun(&dev, 512)).map(|b| b.size());
        let fits = open(&block_lun(&dev, 4096)).map(|b| b.size());
        let detached = Command::new("losetup").arg("-d").arg(&dev).status();
        let err = small.unwrap_err();
        assert!(
            err.contains("block_size = 512") && err.contains("logical block size 4096"),
            "{err}"
        );
        assert_eq!(fits.unwrap(), 1 << 20);
        assert!(detached.unwrap().success());
    }
}
