//! The RBD backstore against a real one-node Ceph (`ironlun_testkit::Ceph`, started here;
//! missing Ceph tools or libraries fail the test): the shared conformance suite on a fresh
//! image per check, and the storage fence: a second client's `take_exclusive` breaks the
//! first one's lock, blocklists it, and the first one's late write fails and is not on the
//! medium.
//!
//! One `#[test]` runs everything, so that the cluster is stopped (by PID) when it ends.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ironlun_backstore::conformance::{self, pattern};
use ironlun_backstore::{
    rbd_available, BackstoreError, BlockBackend, Extent, RbdBackend, RbdOptions, Result,
};
use ironlun_testkit::ceph::{Ceph, POOL};

/// An RBD backstore whose `read`, `write` and `flush` go through `read_async`, `write_async`
/// and `flush_async` (librbd's `rbd_aio_*`), so the conformance suite checks those.
struct ViaAsync(RbdBackend);

impl BlockBackend for ViaAsync {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.0.read_async(offset, len).wait()
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.0
            .write_async(offset, Bytes::copy_from_slice(data), fua)
            .wait()
    }
    fn flush(&self) -> Result<()> {
        self.0.flush_async().wait()
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.0.write_zeroes(offset, len, unmap)
    }
    fn unmap(&self, offset: u64, len: u64) -> Result<()> {
        self.0.unmap(offset, len)
    }
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.0.extents(offset, len)
    }
    fn resize(&self, new_size: u64) -> Result<()> {
        self.0.resize(new_size)
    }
}

fn options(ceph: &Ceph, image: &str) -> RbdOptions {
    RbdOptions {
        ceph_conf: Some(ceph.conf()),
        ..RbdOptions::new(POOL, image)
    }
}

#[test]
fn rbd_backstore_on_a_real_cluster() {
    assert!(
        rbd_available(),
        "librados.so.2/librbd.so.1 cannot be loaded: run scripts/install-deps.sh"
    );
    let t = Instant::now();
    let ceph = Ceph::start();
    eprintln!("ceph up in {:.1?}", t.elapsed());

    let t = Instant::now();
    let n = AtomicU32::new(0);
    let make = |size: u64| {
        let name = format!("conf{}", n.fetch_add(1, Ordering::Relaxed));
        RbdBackend::open(RbdOptions {
            create_size: Some(size),
            ..options(&ceph, &name)
        })
        .unwrap()
    };
    if let Err(e) = conformance::run_all(&make) {
        panic!("conformance:\n{e}");
    }
    // Again with reads, writes and flushes through the asynchronous methods.
    if let Err(e) = conformance::run_all(&|size| ViaAsync(make(size))) {
        panic!("conformance through the async methods:\n{e}");
    }
    eprintln!(
        "conformance: {} checks on {} images in {:.1?}",
        conformance::checks::<RbdBackend>().len(),
        n.load(Ordering::Relaxed),
        t.elapsed()
    );

    a_missing_image_is_refused(&ceph);
    take_exclusive_fences_the_previous_writer(&ceph);
}

/// Without `create_size` a missing image is an error naming it; a missing pool too.
fn a_missing_image_is_refused(ceph: &Ceph) {
    let e = RbdBackend::open(options(ceph, "nosuch")).unwrap_err();
    assert!(e.to_string().contains("rbd/nosuch"), "{e}");
    let e = RbdBackend::open(RbdOptions {
        pool: "nopool".into(),
        ..options(ceph, "x")
    })
    .unwrap_err();
    assert!(e.to_string().contains("nopool"), "{e}");
}

/// A takes the lock and writes; B takes it over (breaking A's lock: A is blocklisted); A's
/// next write fails as `Fenced` and is not on the medium; B reads and writes; A, taking the
/// lock back, connects anew and fences B in turn; a released lock is taken without a
/// blocklist entry.
fn take_exclusive_fences_the_previous_writer(ceph: &Ceph) {
    ceph.create_image("fence", 4 << 20);
    let a = RbdBackend::open(options(ceph, "fence")).unwrap();
    let b = RbdBackend::open(options(ceph, "fence")).unwrap();
    a.take_exclusive().unwrap();
    assert!(a.holds_lock().unwrap());
    a.take_exclusive().unwrap(); // idempotent
    a.write(0, &pattern(1, 4096), true).unwrap();
    let (a_name, a_addr) = a.client();
    assert!(
        !ceph.blocklist().contains(&a_addr),
        "{a_addr} blocklisted early"
    );

    let t = Instant::now();
    b.take_exclusive().unwrap();
    let took = t.elapsed();
    eprintln!("B took the lock from A ({a_name} {a_addr}) in {took:.1?}");
    assert!(b.holds_lock().unwrap());
    let listed = ceph.blocklist();
    assert!(
        listed
            .iter()
            .any(|l| a_addr.contains(l.as_str()) || l.contains(&a_addr)),
        "A's address {a_addr} is not on the blocklist {listed:?}"
    );

    assert!(a.holds_exclusive() && b.holds_exclusive());
    let late = a.write(0, &pattern(2, 4096), true);
    assert!(
        matches!(late, Err(BackstoreError::Fenced { .. })),
        "A's late write: {late:?}"
    );
    assert!(!a.holds_exclusive(), "A still believes it holds the lock");
    let late = a
        .write_async(0, Bytes::from(pattern(2, 4096)), false)
        .wait();
    assert!(
        matches!(late, Err(BackstoreError::Fenced { .. })),
        "A's late asynchronous write: {late:?}"
    );
    assert!(matches!(
        a.flush_async().wait(),
        Err(BackstoreError::Fenced { .. })
    ));
    assert_eq!(&b.read(0, 4096).unwrap()[..], &pattern(1, 4096)[..]);
    b.write(4096, &pattern(3, 4096), true).unwrap();
    assert!(matches!(
        a.read(4096, 4096),
        Err(BackstoreError::Fenced { .. })
    ));

    // A becomes the writer again: it connects anew and fences B.
    a.take_exclusive().unwrap();
    let (_, a_addr2) = a.client();
    assert_ne!(a_addr, a_addr2, "A kept its fenced client");
    assert_eq!(&a.read(4096, 4096).unwrap()[..], &pattern(3, 4096)[..]);
    a.write(8192, &pattern(4, 4096), true).unwrap();
    assert!(matches!(
        b.write(8192, &pattern(5, 4096), false),
        Err(BackstoreError::Fenced { .. })
    ));
    assert_eq!(&a.read(8192, 4096).unwrap()[..], &pattern(4, 4096)[..]);

    // A gives the lock up: B (fenced, so connecting anew) takes it without blocklisting A,
    // and A's writes are refused (the lock is B's) rather than landing.
    let listed = ceph.blocklist().len();
    a.release_exclusive().unwrap();
    assert!(!a.holds_exclusive());
    b.take_exclusive().unwrap();
    assert_eq!(ceph.blocklist().len(), listed, "a released lock was broken");
    b.write(12_288, &pattern(6, 4096), true).unwrap();
    let r = a.write(12_288, &pattern(7, 4096), true);
    assert!(matches!(r, Err(BackstoreError::Fenced { .. })), "{r:?}");
    assert_eq!(&b.read(12_288, 4096).unwrap()[..], &pattern(6, 4096)[..]);
}

/// A cluster that does not answer is reported while opening, naming the step and the
/// `ceph.conf`, within the file's `client_mount_timeout` (which overrides the backstore's
/// 30 s default).
#[test]
fn an_unreachable_cluster_is_reported() {
    assert!(rbd_available(), "librbd1 is not installed");
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let conf = dir.path().join("ceph.conf");
    std::fs::write(
        &conf,
        format!(
            "[global]\nmon host = v2:127.0.0.1:{port}\nms bind msgr1 = false\n\
             auth client required = none\nclient mount timeout = 2\n"
        ),
    )
    .unwrap();
    let t = Instant::now();
    let e = RbdBackend::open(RbdOptions {
        ceph_conf: Some(conf.clone()),
        ..RbdOptions::new("rbd", "x")
    })
    .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("connecting to the cluster") && msg.contains(&conf.display().to_string()),
        "{msg}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t.elapsed()
    );
}
