//! `kill -9` of the daemon during allocating writes to a dynamic VHD LUN (issue 7, acceptance 2;
//! DESIGN.md §3 rule 10; semantics.md §4.4).
//!
//! 50 runs, in groups of [`RUNS_PER_IMAGE`] on one image: the daemon creates a fresh 256 MiB
//! dynamic VHD (2 MiB blocks) for the first run of a group and serves the image the previous
//! run's kill left behind for the others (a restart on a crashed image). Two sessions, each with
//! [`WRITERS_PER_SESSION`] writers, write unique regions (at most two per block, most of them the
//! first write to their block, so most writes allocate): FUA writes, plain writes followed by
//! SYNCHRONIZE CACHE, and plain writes never synced. The daemon is killed with SIGKILL once a
//! random number of writes is acknowledged plus a random delay, with writes in flight.
//!
//! After each kill:
//! - the image opens ([`VhdBackend::open`]), `ironlun_backstore::vhd::check` finds no error
//!   (leaked space from an interrupted allocation is allowed), `qemu-img info -f vpc` reads it
//!   with the right virtual size, and `qemu-img check -f vpc` reports no errors (QEMU 10 answers "does not
//!   support checks" for vpc, exit 63, which is accepted);
//! - the whole disk read by [`VhdBackend`] and by `qemu-img convert -f vpc -O raw` is identical,
//!   and every 512-byte sector is: the written data for a durable write (acknowledged with FUA,
//!   or acknowledged before a SYNCHRONIZE CACHE that returned GOOD); zeroes or the written data
//!   for any other write; zeroes where nothing was written; and, for a region an earlier run of
//!   the group left in some state, exactly that state.
//!
//! At the end of a group the daemon is started once more on the image, reads every region back
//! over iSCSI, writes one more (FUA) region, and stops cleanly with SIGTERM; the image is checked
//! again.
//!
//! `kill -9` leaves the page cache intact, so this test proves crash consistency of the process
//! (no torn metadata, no stale bytes, acknowledged writes present), not the fsync ordering against
//! power loss; that is the crash-state enumeration in the backstore's VHD tests. The seed is
//! printed; `VHD_KILL_SEED=N` replays a run's choices (timing still varies).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]

use bytes::Bytes;
use ironlun_backstore::vhd::{check, DiskType, VhdBackend};
use ironlun_backstore::BlockBackend;
use ironlun_initiator::Session;
use ironlun_testkit::{pattern, Daemon, Login, PROMPT};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const IRONLUN: &str = env!("CARGO_BIN_EXE_ironlun");

const TARGET: &str = "iqn.2026-11.io.ironlun:vhdkill";
const INITIATORS: [&str; 2] = [
    "iqn.2026-11.io.ironlun:vhdkill-a",
    "iqn.2026-11.io.ironlun:vhdkill-b",
];
const LUN: u64 = 0;
const SECTOR: u64 = 512;
const SECTOR_U32: u32 = 512;
/// The LUN: 256 MiB, 128 dynamic blocks of 2 MiB (the size the daemon creates).
const DISK: u64 = 256 << 20;
const VHD_BLOCK: u64 = 2 << 20;
const RUNS: usize = 50;
const RUNS_PER_IMAGE: usize = 5;
const WRITERS_PER_SESSION: usize = 2;
/// The kill comes once 0..MAX_ACKS_BEFORE_KILL writes are acknowledged (then a random delay).
const MAX_ACKS_BEFORE_KILL: u64 = 24;
/// Longest write: 64 KiB.
const MAX_SECTORS_PER_WRITE: u64 = 128;
const IMAGE: &str = "lun0.vhd";
const ZERO: [u8; 512] = [0; 512];

/// xorshift64*: deterministic choices from the printed seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// How a write is issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Fua,
    /// Plain write, then SYNCHRONIZE CACHE from the same writer.
    ThenSync,
    /// Plain write, never synced by its writer (others' syncs may cover it).
    Plain,
}

/// What the initiator knows about one write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Sent, no response (yet).
    InFlight,
    /// GOOD, not known to be durable.
    Acked,
    /// GOOD with FUA, or GOOD before a SYNCHRONIZE CACHE that returned GOOD.
    Durable,
}

/// One unique region of the disk and what was (maybe) written there.
#[derive(Debug, Clone)]
struct Region {
    offset: u64,
    data: Bytes,
    mode: Mode,
    state: State,
    /// Set once a check has read the region after a kill: exactly these bytes from then on.
    settled: Option<Bytes>,
}

/// Shared by the writers of one run.
struct Log {
    regions: Vec<Region>,
    /// Regions not yet written, in the order they are taken.
    pool: Vec<(u64, u64)>,
    acks: u64,
    syncs_good: u64,
    allocating: u64,
}

fn config(image: &str) -> String {
    format!(
        "[[target]]\nname = \"{TARGET}\"\n[[target.lun]]\nid = 0\nbackstore = \"vhd\"\n\
         path = \"{image}\"\nsize = \"{}MiB\"\n",
        DISK >> 20
    )
}

/// The regions of one image, shuffled with a bias: the first region of every block (the
/// allocating write) tends to come before the second.
fn region_pool(rng: &mut Rng) -> Vec<(u64, u64)> {
    let half = VHD_BLOCK / 2;
    let mut keyed: Vec<(u64, (u64, u64))> = Vec::new();
    for block in 0..DISK / VHD_BLOCK {
        for h in 0..2u64 {
            let base = block * VHD_BLOCK + h * half;
            let sectors = 1 + rng.below(MAX_SECTORS_PER_WRITE);
            let start = rng.below(half / SECTOR - sectors + 1);
            let key = rng.below(1000) + h * 600;
            keyed.push((key, (base + start * SECTOR, sectors * SECTOR)));
        }
    }
    keyed.sort_by_key(|k| k.0);
    // Taken from the end.
    keyed.into_iter().rev().map(|k| k.1).collect()
}

/// One writer: take a region, write it (mode chosen at random), record the outcome; stop at the
/// first error (the daemon is gone).
async fn writer(s: Session, log: Arc<Mutex<Log>>, seed: u64, acked: Arc<AtomicU64>) -> u64 {
    let mut rng = Rng::new(seed);
    let mut done = 0u64;
    loop {
        let (idx, offset, data, mode) = {
            let mut l = log.lock().unwrap();
            let Some((offset, len)) = l.pool.pop() else {
                return done;
            };
            let mode = match rng.below(3) {
                0 => Mode::Fua,
                1 => Mode::ThenSync,
                _ => Mode::Plain,
            };
            let data = pattern(seed ^ offset, len as usize);
            let block = offset / VHD_BLOCK;
            if !l.regions.iter().any(|r| r.offset / VHD_BLOCK == block) {
                l.allocating += 1;
            }
            l.regions.push(Region {
                offset,
                data: data.clone(),
                mode,
                state: State::InFlight,
                settled: None,
            });
            (l.regions.len() - 1, offset, data, mode)
        };
        let r = s
            .write16(LUN, offset / SECTOR, SECTOR_U32, data, mode == Mode::Fua)
            .await;
        match r {
            Ok(r) if r.response == 0 && r.status == 0 => {}
            Ok(r) => panic!(
                "write at {offset}: status {:#x} response {} sense {:?}",
                r.status,
                r.response,
                r.sense_key()
            ),
            Err(_) => return done,
        }
        {
            let mut l = log.lock().unwrap();
            l.regions[idx].state = if mode == Mode::Fua {
                State::Durable
            } else {
                State::Acked
            };
            l.acks += 1;
        }
        acked.fetch_add(1, Ordering::SeqCst);
        done += 1;
        if mode == Mode::ThenSync {
            // Every write acknowledged before the sync is sent is covered by it.
            let covered: Vec<usize> = {
                let l = log.lock().unwrap();
                (0..l.regions.len())
                    .filter(|&i| l.regions[i].state == State::Acked)
                    .collect()
            };
            match s.synchronize_cache(LUN).await {
                Ok(r) if r.response == 0 && r.status == 0 => {
                    let mut l = log.lock().unwrap();
                    for i in covered {
                        l.regions[i].state = State::Durable;
                    }
                    l.syncs_good += 1;
                }
                Ok(r) => panic!(
                    "SYNCHRONIZE CACHE: status {:#x} response {} sense {:?}",
                    r.status,
                    r.response,
                    r.sense_key()
                ),
                Err(_) => return done,
            }
        }
    }
}

/// The expected content of every sector: index into `regions`, or none (zeroes).
fn sector_owners(regions: &[Region]) -> Vec<u32> {
    let mut owner = vec![u32::MAX; (DISK / SECTOR) as usize];
    for (i, r) in regions.iter().enumerate() {
        let first = (r.offset / SECTOR) as usize;
        for s in 0..r.data.len() / 512 {
            assert_eq!(owner[first + s], u32::MAX, "regions overlap");
            owner[first + s] = i as u32;
        }
    }
    owner
}

/// Check one 512-byte sector `sector` holding `got` against the regions; `Err` says why not.
fn check_sector(regions: &[Region], owner: &[u32], sector: u64, got: &[u8]) -> Result<(), String> {
    let o = owner[sector as usize];
    if o == u32::MAX {
        return if got == ZERO {
            Ok(())
        } else {
            Err(format!("sector {sector}: never written, not zero"))
        };
    }
    let r = &regions[o as usize];
    let at =
        ((sector * SECTOR - r.offset) as usize)..((sector * SECTOR - r.offset + SECTOR) as usize);
    if let Some(settled) = &r.settled {
        return if got == &settled[at] {
            Ok(())
        } else {
            Err(format!(
                "sector {sector}: changed since an earlier check (region at {}, {:?})",
                r.offset, r.mode
            ))
        };
    }
    let new = &r.data[at];
    match r.state {
        State::Durable if got == new => Ok(()),
        State::Durable => Err(format!(
            "sector {sector}: durable {:?} write at {} lost (zero: {})",
            r.mode,
            r.offset,
            got == ZERO
        )),
        _ if got == new || got == ZERO => Ok(()),
        s => Err(format!(
            "sector {sector}: {s:?} {:?} write at {}: neither zeroes nor its data",
            r.mode, r.offset
        )),
    }
}

/// `ironlun vhd check` finds no error (leaks, the space an interrupted allocation leaves, are
/// allowed); the leaked bytes.
fn vhd_check(path: &Path, what: &str) -> u64 {
    let r = check::check_path(path).unwrap_or_else(|e| panic!("{what}: vhd check: {e}"));
    assert!(
        r.errors.is_empty(),
        "{what}: vhd check errors: {:?}",
        r.errors
    );
    assert_eq!(r.disk_type, Some(DiskType::Dynamic), "{what}: {r:?}");
    assert_eq!(r.virtual_size, Some(DISK), "{what}: {r:?}");
    r.leaked_bytes()
}

/// The whole disk as `VhdBackend` reads it and as `qemu-img convert` reads it: identical, and
/// every sector valid; `ironlun_backstore::vhd::check` finds no error. Returns the disk (for
/// settling regions) and the leaked bytes.
fn check_image(path: &Path, work: &Path, regions: &[Region], what: &str) -> (Bytes, u64) {
    let leaked = vhd_check(path, what);
    // Our reader.
    let b =
        VhdBackend::open(path, true).unwrap_or_else(|e| panic!("{what}: VhdBackend::open: {e}"));
    assert_eq!(b.size(), DISK, "{what}: size");
    let ours = b.read(0, DISK as usize).expect("read the whole disk");
    drop(b);

    // QEMU's.
    let info = Command::new("qemu-img")
        .args(["info", "-f", "vpc", "--output=json"])
        .arg(path)
        .output()
        .expect("qemu-img (scripts/install-deps.sh installs qemu-utils)");
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.status.success(),
        "{what}: qemu-img info: {}",
        String::from_utf8_lossy(&info.stderr)
    );
    assert!(
        text.contains(&format!("\"virtual-size\": {DISK},")),
        "{what}: qemu-img info: {text}"
    );
    let check = Command::new("qemu-img")
        .args(["check", "-f", "vpc"])
        .arg(path)
        .output()
        .expect("qemu-img check");
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let unsupported = check.status.code() == Some(63) && out.contains("does not support checks");
    let clean = check.status.success() && out.contains("No errors");
    assert!(
        unsupported || clean,
        "{what}: qemu-img check ({:?}): {out}",
        check.status
    );
    let raw = work.join("disk.raw");
    let conv = Command::new("qemu-img")
        .args(["convert", "-f", "vpc", "-O", "raw"])
        .arg(path)
        .arg(&raw)
        .output()
        .expect("qemu-img convert");
    assert!(
        conv.status.success(),
        "{what}: qemu-img convert: {}",
        String::from_utf8_lossy(&conv.stderr)
    );
    let theirs = std::fs::read(&raw).expect("read converted disk");
    std::fs::remove_file(&raw).expect("remove converted disk");
    assert_eq!(theirs.len() as u64, DISK, "{what}: converted size");

    let owner = sector_owners(regions);
    let mut bad = Vec::new();
    for (i, (a, q)) in ours.chunks(512).zip(theirs.chunks(512)).enumerate() {
        if a != q {
            bad.push(format!(
                "sector {i}: VhdBackend and qemu-img read different bytes"
            ));
        } else if let Err(e) = check_sector(regions, &owner, i as u64, a) {
            bad.push(e);
        }
        if bad.len() >= 10 {
            break;
        }
    }
    assert!(bad.is_empty(), "{what}:\n{}", bad.join("\n"));
    (ours, leaked)
}

/// After a check: every region is exactly what was read.
fn settle(regions: &mut [Region], disk: &[u8]) {
    for r in regions.iter_mut() {
        let at = r.offset as usize;
        r.settled = Some(Bytes::copy_from_slice(&disk[at..at + r.data.len()]));
    }
}

/// One run: daemon on `dir`, writers, kill -9 at a random moment, check.
async fn run_once(dir: &Path, log: Arc<Mutex<Log>>, rng: &mut Rng, run: usize) -> String {
    let d = Daemon::builder(IRONLUN)
        .config(&config(IMAGE))
        .start_in(dir);
    let before = {
        let l = log.lock().unwrap();
        (l.regions.len(), l.acks, l.syncs_good, l.allocating)
    };
    let acked = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (k, name) in INITIATORS.iter().enumerate() {
        let s = Login::new(name)
            .target(TARGET)
            .ready(&[LUN], 3)
            .connect(d.addr)
            .await;
        for w in 0..WRITERS_PER_SESSION {
            let seed = rng.next() ^ ((run * 16 + k * 4 + w) as u64);
            tasks.push(tokio::spawn(writer(
                s.clone(),
                log.clone(),
                seed,
                acked.clone(),
            )));
        }
    }
    let target = rng.below(MAX_ACKS_BEFORE_KILL + 1);
    let delay = Duration::from_micros(rng.below(3000));
    let deadline = Instant::now() + PROMPT;
    while acked.load(Ordering::SeqCst) < target {
        assert!(
            Instant::now() < deadline,
            "run {run}: only {} of {target} writes acknowledged; stderr:\n{}",
            acked.load(Ordering::SeqCst),
            d.stderr()
        );
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    std::thread::sleep(delay);
    let at_kill = acked.load(Ordering::SeqCst);
    d.kill9();
    for t in tasks {
        tokio::time::timeout(PROMPT, t)
            .await
            .expect("writer did not stop after the kill")
            .expect("writer panicked");
    }
    let l = log.lock().unwrap();
    let new = &l.regions[before.0..];
    let durable = new.iter().filter(|r| r.state == State::Durable).count();
    let in_flight = new.iter().filter(|r| r.state == State::InFlight).count();
    format!(
        "run {run:2}: {} writes ({} first in their block), {} acked ({at_kill} at the kill, \
         +{}us), {durable} durable, {in_flight} in flight, {} syncs",
        new.len(),
        l.allocating - before.3,
        l.acks - before.1,
        delay.as_micros(),
        l.syncs_good - before.2
    )
}

/// The daemon on the crashed image once more: every region reads over iSCSI as the last check
/// settled it, a new FUA write lands, SIGTERM stops it cleanly.
async fn restart_and_serve(dir: &Path, log: &Mutex<Log>, rng: &mut Rng) {
    let d = Daemon::builder(IRONLUN)
        .config(&config(IMAGE))
        .start_in(dir);
    let s = Login::new(INITIATORS[0])
        .target(TARGET)
        .ready(&[LUN], 3)
        .connect(d.addr)
        .await;
    let cap = s.read_capacity16(LUN).await.expect("READ CAPACITY (16)");
    assert_eq!(cap.bytes(), Some(DISK));
    let regions: Vec<Region> = log.lock().unwrap().regions.clone();
    for r in &regions {
        let got = s
            .read16(
                LUN,
                r.offset / SECTOR,
                (r.data.len() / 512) as u32,
                SECTOR_U32,
            )
            .await
            .expect("read")
            .good()
            .expect("read GOOD");
        assert_eq!(
            Some(&got.data),
            r.settled.as_ref(),
            "region at {} read over iSCSI after the restart",
            r.offset
        );
    }
    let (offset, len) = log.lock().unwrap().pool.pop().expect("a free region");
    let data = pattern(rng.next(), len as usize);
    s.write16(LUN, offset / SECTOR, SECTOR_U32, data.clone(), true)
        .await
        .expect("write")
        .good()
        .expect("FUA write after the restart");
    log.lock().unwrap().regions.push(Region {
        offset,
        data,
        mode: Mode::Fua,
        state: State::Durable,
        settled: None,
    });
    s.logout().await.expect("logout");
    drop(d); // SIGTERM, clean exit asserted
}

fn seed() -> u64 {
    match std::env::var("VHD_KILL_SEED") {
        Ok(s) => s.parse().expect("VHD_KILL_SEED: a number"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_allocating_writes_leaves_a_consistent_vhd_with_every_durable_write() {
    let seed = seed();
    println!("VHD_KILL_SEED={seed}");
    let mut rng = Rng::new(seed);
    let started = Instant::now();
    let mut image_dir: Option<tempfile::TempDir> = None;
    let mut log: Option<Arc<Mutex<Log>>> = None;
    for run in 0..RUNS {
        if run % RUNS_PER_IMAGE == 0 {
            image_dir = Some(tempfile::tempdir().expect("temp dir"));
            log = Some(Arc::new(Mutex::new(Log {
                regions: Vec::new(),
                pool: region_pool(&mut rng),
                acks: 0,
                syncs_good: 0,
                allocating: 0,
            })));
        }
        let dir: PathBuf = image_dir.as_ref().unwrap().path().to_path_buf();
        let log = log.clone().unwrap();
        let line = run_once(&dir, log.clone(), &mut rng, run).await;
        println!("{line}");
        let image = dir.join(IMAGE);
        {
            let mut l = log.lock().unwrap();
            let what = format!("run {run} (seed {seed})");
            let (disk, leaked) = check_image(&image, &dir, &l.regions, &what);
            settle(&mut l.regions, &disk);
            println!("        checked: {leaked} bytes leaked by interrupted allocations");
        }
        if run % RUNS_PER_IMAGE == RUNS_PER_IMAGE - 1 {
            restart_and_serve(&dir, &log, &mut rng).await;
            let mut l = log.lock().unwrap();
            let what = format!("run {run} after the restart (seed {seed})");
            let (disk, _) = check_image(&image, &dir, &l.regions, &what);
            settle(&mut l.regions, &disk);
            println!(
                "image of runs {}..={run}: {} regions, {} bytes",
                run + 1 - RUNS_PER_IMAGE,
                l.regions.len(),
                std::fs::metadata(&image).map(|m| m.len()).unwrap_or(0)
            );
        }
    }
    println!("{RUNS} runs in {:.1} s", started.elapsed().as_secs_f64());
}
