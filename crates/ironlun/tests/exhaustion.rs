//! Resource exhaustion by peers that stop reading (issue 15, findings 1, 3 and 4): raw peers
//! flood immediate READs (and non-immediate READs filling the CmdSN window) and never read
//! their sockets. The daemon must hold its memory to `[limits] max_buffered` plus a margin,
//! its threads to the configured total, keep serving a bystander session without a gap over
//! 1 s, and give the memory and descriptors back once the peers are gone.
//!
//! Figures come from `/proc/PID/status` (VmRSS, Threads) and `/proc/PID/fd`, sampled every
//! 50 ms. The tests of this file run one at a time (they measure a whole process on a shared
//! machine).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]

use bytes::Bytes;
use ironlun_initiator::RawConnection;
use ironlun_iscsi::pdu::{Header, ScsiCommand, TaskAttr};
use ironlun_iscsi::Pdu;
use ironlun_testkit::{opts, strip_ansi, Daemon, BLOCK_SIZE, PROMPT, TARGET};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const IRONLUN: &str = env!("CARGO_BIN_EXE_ironlun");

const MIB: u64 = 1 << 20;
/// `[limits] max_buffered` of these tests.
const MAX_BUFFERED: u64 = 64 * MIB;
/// What the daemon may hold beyond `max_buffered` (code, heap slack, the receive and send
/// arenas, metrics): the bound is `MAX_BUFFERED + MARGIN` of RSS.
const MARGIN: u64 = 64 * MIB;
/// How far RSS may stay above the idle baseline once the peers are gone. The read-buffer pools
/// free what they keep after 5 s idle, and the daemon gives free heap memory back after 10 s
/// without payload (`ironlun::heap`); what remains is heap pages that still hold a live
/// allocation. Measured: back to the baseline to the MiB.
const RSS_SETTLE_TOLERANCE: u64 = 8 * MIB;
/// How long after the peers are gone RSS may take to come back: the heap release comes 10 to
/// 15 s after the last payload moved.
const SETTLE_WITHIN: Duration = Duration::from_secs(30);
/// Longest pause the bystander may see between two completed READs.
const MAX_GAP: Duration = Duration::from_secs(1);

/// Daemon-wide: serialises the tests of this file.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn config() -> String {
    config_with(MAX_BUFFERED)
}

fn config_with(max_buffered: u64) -> String {
    format!(
        "[runtime]\nworker_threads = 2\nblocking_threads = 8\n\
         [limits]\nmax_buffered = \"{}MiB\"\n\
         [timeouts]\nnop_interval = 0\n\
         [[target]]\nname = \"{TARGET}\"\n\
         [[target.lun]]\nid = 0\nbackstore = \"file\"\npath = \"lun0.img\"\nsize = \"1GiB\"\n",
        max_buffered / MIB
    )
}

/// The daemon's `max_threads` as logged at start.
fn max_threads(d: &Daemon) -> u64 {
    // The start-up log line may still be on its way through the stderr reader thread.
    let deadline = Instant::now() + PROMPT;
    let mut err = strip_ansi(&d.stderr());
    while !err.contains("max_threads=") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        err = strip_ansi(&d.stderr());
    }
    let at = err
        .find("max_threads=")
        .unwrap_or_else(|| panic!("no max_threads in the log:\n{err}"));
    err[at + "max_threads=".len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .expect("max_threads number")
}

/// (VmRSS in bytes, Threads) of `pid`.
fn status(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:") * 1024, field("Threads:"))
}

/// Peaks of RSS and Threads, sampled every 50 ms until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(u64, u64)>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let (mut rss, mut threads) = (0, 0);
            while !flag.load(Ordering::SeqCst) {
                let (r, t) = status(pid);
                rss = rss.max(r);
                threads = threads.max(t);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (rss, threads)
        });
        Sampler { stop, task }
    }

    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("sampler")
    }
}

/// A session doing 64 KiB READs back to back, recording the longest pause between two.
struct Bystander {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(u64, Duration)>,
}

impl Bystander {
    async fn start(d: &Daemon) -> Bystander {
        let s = ironlun_testkit::session(d.addr, "iqn.2026-11.io.ironlun:bystander").await;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let (mut n, mut gap, mut last) = (0u64, Duration::ZERO, Instant::now());
            while !flag.load(Ordering::SeqCst) {
                let r = tokio::time::timeout(PROMPT, s.read16(0, (n % 64) * 128, 128, BLOCK_SIZE))
                    .await
                    .expect("bystander READ timed out")
                    .expect("bystander READ");
                assert_eq!((r.status, r.data.len()), (0, 64 * 1024));
                n += 1;
                gap = gap.max(last.elapsed());
                last = Instant::now();
            }
            s.logout().await.expect("bystander logout");
            (n, gap)
        });
        Bystander { stop, task }
    }

    async fn finish(self) -> (u64, Duration) {
        self.stop.store(true, Ordering::SeqCst);
        tokio::time::timeout(PROMPT, self.task)
            .await
            .expect("bystander did not stop")
            .expect("bystander failed")
    }
}

/// The READs a flooding peer sends.
#[derive(Clone, Copy)]
struct Flood {
    /// Non-immediate READs (they fill the CmdSN window).
    window: u32,
    /// Immediate READs after them.
    immediate: u32,
    /// Blocks per READ.
    blocks: u32,
    /// ExpectedDataTransferLength; `None`: the CDB's length. 0 also clears the R bit.
    expected: Option<u32>,
}

fn read16(itt: u32, cmd_sn: u32, exp_stat_sn: u32, immediate: bool, lba: u64, f: Flood) -> Pdu {
    let (blocks, edtl) = (f.blocks, f.expected.unwrap_or(f.blocks * BLOCK_SIZE));
    let mut cdb = [0u8; 16];
    cdb[0] = 0x88;
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
    Pdu {
        header: Header::ScsiCommand(ScsiCommand {
            immediate,
            final_: true,
            read: edtl > 0,
            write: false,
            attr: TaskAttr::Simple,
            lun: 0,
            itt,
            expected_data_transfer_length: edtl,
            cmd_sn,
            exp_stat_sn,
            cdb,
        }),
        ahs: Vec::new(),
        data: Bytes::new(),
    }
}

/// Log in raw as `name` and send the READs of `f`; never read the socket. Returns the
/// connection, to be dropped when the flood ends.
async fn flood(d: &Daemon, name: &str, f: Flood) -> RawConnection {
    let (mut raw, n) = RawConnection::login(d.addr, &opts(name))
        .await
        .expect("raw login");
    let mut bytes = Vec::new();
    let span = (1u64 << 30) / u64::from(BLOCK_SIZE) - u64::from(f.blocks);
    for i in 0..f.window {
        let lba = (u64::from(i) * u64::from(f.blocks)) % span;
        let pdu = read16(
            0x1000 + i,
            n.cmd_sn.wrapping_add(i),
            n.exp_stat_sn,
            false,
            lba,
            f,
        );
        bytes.extend_from_slice(&raw.encode(&pdu));
    }
    for i in 0..f.immediate {
        let lba = (u64::from(i) * u64::from(f.blocks)) % span;
        let sn = n.cmd_sn.wrapping_add(f.window);
        let pdu = read16(0x10_0000 + i, sn, n.exp_stat_sn, true, lba, f);
        bytes.extend_from_slice(&raw.encode(&pdu));
    }
    raw.send_bytes(&bytes).await.expect("send the flood");
    raw
}

/// Baseline (RSS, Threads, fds) of an idle daemon that served one session already.
async fn baseline(d: &Daemon) -> (u64, u64, usize) {
    let s = ironlun_testkit::session(d.addr, "iqn.2026-11.io.ironlun:warmup").await;
    for i in 0..16u64 {
        let r = s
            .read16(0, i * 2048, 2048, BLOCK_SIZE)
            .await
            .expect("warm-up READ");
        assert_eq!(r.status, 0);
    }
    s.logout().await.expect("logout");
    drop(s);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (rss, threads) = status(d.pid());
    (rss, threads, d.open_fds())
}

/// After the peers are gone: fds back to the baseline and RSS within the tolerance.
async fn settles(d: &Daemon, rss0: u64, fds0: usize) -> u64 {
    d.settle_fds(fds0).await;
    let deadline = Instant::now() + SETTLE_WITHIN;
    loop {
        let (rss, _) = status(d.pid());
        if rss <= rss0 + RSS_SETTLE_TOLERANCE {
            return rss;
        }
        assert!(
            Instant::now() < deadline,
            "RSS stays at {} MiB after the flood (baseline {} MiB)",
            rss / MIB,
            rss0 / MIB
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Findings 1 and 4: three peers each send 128 window READs and 512 immediate READs of 1 MiB
/// and never read. RSS stays under max_buffered + 64 MiB, threads under the configured total,
/// the bystander never waits a second, and after the peers leave fds and RSS come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_of_unread_1mib_reads_stays_in_budget() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut d = Daemon::builder(IRONLUN).config(&config()).start();
    let limit = max_threads(&d);
    let (rss0, threads0, fds0) = baseline(&d).await;
    let sampler = Sampler::start(d.pid());
    let bystander = Bystander::start(&d).await;
    let mut peers = Vec::new();
    for i in 0..3 {
        peers.push(
            flood(
                &d,
                &format!("iqn.2026-11.io.ironlun:flood{i}"),
                Flood {
                    window: 128,
                    immediate: 512,
                    blocks: 2048,
                    expected: None,
                },
            )
            .await,
        );
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    d.assert_healthy();
    drop(peers);
    let (reads, gap) = bystander.finish().await;
    let (rss, threads) = sampler.finish().await;
    eprintln!(
        "1 MiB flood: RSS peak {} MiB, threads peak {threads}",
        rss / MIB
    );
    let settled = settles(&d, rss0, fds0).await;
    eprintln!(
        "1 MiB flood: RSS baseline {} MiB, peak {} MiB, settled {} MiB; threads baseline {threads0}, \
         peak {threads}, max_threads {limit}; bystander {reads} READs, longest gap {gap:?}",
        rss0 / MIB,
        rss / MIB,
        settled / MIB
    );
    assert!(
        rss < MAX_BUFFERED + MARGIN,
        "RSS peaked at {} MiB (max_buffered {} MiB)",
        rss / MIB,
        MAX_BUFFERED / MIB
    );
    assert!(
        threads <= limit,
        "{threads} threads, configured total {limit}"
    );
    assert!(gap < MAX_GAP, "the bystander waited {gap:?}");
    assert!(reads > 10, "the bystander did only {reads} READs");
}

/// Finding 3: 160 immediate 16 MiB READs from one peer that never reads (a command as large
/// as a connection's share runs one at a time), with a bystander.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_of_unread_16mib_reads_stays_in_budget() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut d = Daemon::builder(IRONLUN).config(&config()).start();
    let limit = max_threads(&d);
    let (rss0, _, fds0) = baseline(&d).await;
    let sampler = Sampler::start(d.pid());
    let bystander = Bystander::start(&d).await;
    let f = Flood {
        window: 0,
        immediate: 160,
        blocks: 32 * 1024,
        expected: None,
    };
    let peer = flood(&d, "iqn.2026-11.io.ironlun:flood16", f).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    d.assert_healthy();
    drop(peer);
    let (reads, gap) = bystander.finish().await;
    let (rss, threads) = sampler.finish().await;
    let settled = settles(&d, rss0, fds0).await;
    eprintln!(
        "16 MiB flood: RSS baseline {} MiB, peak {} MiB, settled {} MiB; threads peak {threads}, \
         max_threads {limit}; bystander {reads} READs, longest gap {gap:?}",
        rss0 / MIB,
        rss / MIB,
        settled / MIB
    );
    assert!(
        rss < MAX_BUFFERED + MARGIN,
        "RSS peaked at {} MiB",
        rss / MIB
    );
    assert!(
        threads <= limit,
        "{threads} threads, configured total {limit}"
    );
    assert!(gap < MAX_GAP, "the bystander waited {gap:?}");
}

/// A READ whose CDB asks for more than its ExpectedDataTransferLength is charged the buffer the
/// LU allocates, not the expected length: 128 window and 160 immediate READs of 16 MiB sent
/// with an expected length of 0 run one at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_asking_more_than_expected_are_charged_their_buffers() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut d = Daemon::builder(IRONLUN).config(&config()).start();
    let (rss0, _, fds0) = baseline(&d).await;
    let sampler = Sampler::start(d.pid());
    let f = Flood {
        window: 128,
        immediate: 160,
        blocks: 32 * 1024,
        expected: Some(0),
    };
    let peer = flood(&d, "iqn.2026-11.io.ironlun:overflow", f).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    d.assert_healthy();
    drop(peer);
    let (rss, threads) = sampler.finish().await;
    let settled = settles(&d, rss0, fds0).await;
    eprintln!(
        "16 MiB READs with expected length 0: RSS baseline {} MiB, peak {} MiB, settled {} MiB; \
         threads peak {threads}",
        rss0 / MIB,
        rss / MIB,
        settled / MIB
    );
    assert!(
        rss < MAX_BUFFERED + MARGIN,
        "RSS peaked at {} MiB",
        rss / MIB
    );
}

/// Finding 4: three sessions each keeping eight 1 MiB READs in flight use the blocking pools
/// to their bound and no further.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_busy_connections_stay_under_the_thread_total() {
    let _one = ONE_AT_A_TIME.lock().await;
    let d = Daemon::builder(IRONLUN).config(&config()).start();
    let limit = max_threads(&d);
    assert!(limit < 32, "the test config allows {limit} threads");
    let sampler = Sampler::start(d.pid());
    let mut sessions = Vec::new();
    for i in 0..3 {
        sessions.push(
            ironlun_testkit::session(d.addr, &format!("iqn.2026-11.io.ironlun:busy{i}")).await,
        );
    }
    let until = Instant::now() + Duration::from_secs(3);
    let mut tasks = Vec::new();
    for (i, s) in sessions.iter().enumerate() {
        for q in 0..8u64 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < until {
                    let lba = (((i as u64 * 8 + q) * 64 + n) % 1000) * 2048;
                    let r = s.read16(0, lba, 2048, BLOCK_SIZE).await.expect("READ");
                    assert_eq!(r.status, 0);
                    n += 1;
                }
                n
            }));
        }
    }
    let mut reads = 0;
    for t in tasks {
        reads += t.await.expect("reader");
    }
    let (_, threads) = sampler.finish().await;
    eprintln!(
        "3 busy sessions: {reads} READs of 1 MiB, threads peak {threads}, max_threads {limit}"
    );
    assert!(
        threads <= limit,
        "{threads} threads, configured total {limit}"
    );
    for s in sessions {
        s.logout().await.expect("logout");
    }
}

/// The value of an unlabelled series of the daemon's `/metrics`.
fn metric(d: &Daemon, name: &str) -> Option<u64> {
    use std::io::{Read, Write};
    let mut s = d.admin_connect();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .expect("metrics request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("metrics response");
    raw.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Finding 2's class, on the Data-Out side: peers fill their CmdSN window with WRITEs that
/// each carry 256 KiB of immediate data but never send the last 512 bytes the target then
/// solicits, so no command completes and everything received stays assembled in the
/// connection. Received bytes are charged to the budget: a connection past its share stops
/// being read (TCP back-pressure on the peer), so RSS stays under max_buffered + 64 MiB while
/// the bystander keeps reading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_of_unfinished_writes_stays_in_budget() {
    let _one = ONE_AT_A_TIME.lock().await;
    const IMMEDIATE: u32 = 256 * 1024;
    let mut d = Daemon::builder(IRONLUN).config(&config()).start();
    let limit = max_threads(&d);
    let (rss0, _, fds0) = baseline(&d).await;
    let sampler = Sampler::start(d.pid());
    let bystander = Bystander::start(&d).await;
    let mut peers = Vec::new();
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    for p in 0..6u32 {
        let (mut raw, n) =
            RawConnection::login(d.addr, &opts(&format!("iqn.2026-11.io.ironlun:writer{p}")))
                .await
                .expect("raw login");
        assert!(n.immediate_data, "ImmediateData=Yes agreed");
        assert!(n.first_burst_length >= IMMEDIATE, "FirstBurstLength agreed");
        let window = n.max_cmd_sn.wrapping_sub(n.cmd_sn).wrapping_add(1);
        let sent = sent.clone();
        peers.push(tokio::spawn(async move {
            let payload = Bytes::from(vec![0x5au8; IMMEDIATE as usize]);
            for c in 0..window {
                let blocks = (IMMEDIATE + 512) / BLOCK_SIZE;
                let mut cdb = [0u8; 16];
                cdb[0] = 0x8a;
                let lba = u64::from(p * 1024 + c) * u64::from(blocks);
                cdb[2..10].copy_from_slice(&lba.to_be_bytes());
                cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
                let cmd = Pdu {
                    header: Header::ScsiCommand(ScsiCommand {
                        immediate: false,
                        final_: true,
                        read: false,
                        write: true,
                        attr: TaskAttr::Simple,
                        lun: 0,
                        itt: 0x2000 + c,
                        expected_data_transfer_length: blocks * BLOCK_SIZE,
                        cmd_sn: n.cmd_sn.wrapping_add(c),
                        exp_stat_sn: n.exp_stat_sn,
                        cdb,
                    }),
                    ahs: Vec::new(),
                    data: payload.clone(),
                };
                if raw.send_pdu(&cmd).await.is_err() {
                    break;
                }
                sent.fetch_add(u64::from(IMMEDIATE), Ordering::Relaxed);
            }
            raw
        }));
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    d.assert_healthy();
    let sent_bytes = sent.load(Ordering::Relaxed);
    for p in peers {
        p.abort();
        let _ = p.await;
    }
    let (reads, gap) = bystander.finish().await;
    let (rss, threads) = sampler.finish().await;
    let settled = settles(&d, rss0, fds0).await;
    eprintln!(
        "unfinished writes: {} MiB of immediate data sent; RSS baseline {} MiB, peak {} MiB, \
         settled {} MiB; threads peak {threads}, max_threads {limit}; bystander {reads} READs, \
         longest gap {gap:?}",
        sent_bytes / MIB,
        rss0 / MIB,
        rss / MIB,
        settled / MIB
    );
    assert!(
        rss < MAX_BUFFERED + MARGIN,
        "RSS peaked at {} MiB",
        rss / MIB
    );
    assert!(
        threads <= limit,
        "{threads} threads, configured total {limit}"
    );
    assert!(gap < MAX_GAP, "the bystander waited {gap:?}");
}

/// The well-behaved side of Data-Out pacing: four sessions of our initiator each keep 16
/// WRITEs of 1 to 4 MiB in flight (about 160 MiB at once) against `max_buffered = 16MiB`.
/// The target solicits their data only as the budget has room, so every WRITE completes GOOD
/// (no deadlock) and reads back intact. A WRITE refused with TASK SET FULL (its immediate and
/// unsolicited data did not fit) is retried by the test, as a SCSI initiator would; the
/// count is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn well_behaved_writers_beyond_the_budget_all_complete() {
    let _one = ONE_AT_A_TIME.lock().await;
    const SESSIONS: u64 = 4;
    const DEPTH: u64 = 16;
    const ROUNDS: u64 = 2;
    const SLOT: u64 = 4 * MIB;
    let max_buffered = 16 * MIB;
    let d = Daemon::builder(IRONLUN)
        .config(&config_with(max_buffered))
        .start();
    let sampler = Sampler::start(d.pid());
    let source = ironlun_testkit::pattern(15, (2 * SLOT) as usize);
    let task_set_full = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let mut sessions = Vec::new();
    for i in 0..SESSIONS {
        sessions.push(
            ironlun_testkit::session(d.addr, &format!("iqn.2026-11.io.ironlun:writer{i}")).await,
        );
    }
    let mut tasks = Vec::new();
    for (si, s) in sessions.iter().enumerate() {
        for q in 0..DEPTH {
            let (s, source, tsf) = (s.clone(), source.clone(), task_set_full.clone());
            let slot = si as u64 * DEPTH + q;
            tasks.push(tokio::spawn(async move {
                let mut bytes = 0u64;
                for round in 0..ROUNDS {
                    let len = (1 + (slot + round) % 4) * MIB;
                    let region = slot * ROUNDS + round;
                    let lba = region * SLOT / u64::from(BLOCK_SIZE);
                    let at = ((slot * 7 + round) * 4096 % SLOT) as usize;
                    let data = source.slice(at..at + len as usize);
                    loop {
                        let r = tokio::time::timeout(
                            Duration::from_secs(60),
                            s.write16(0, lba, BLOCK_SIZE, data.clone(), false),
                        )
                        .await
                        .expect("WRITE did not complete in 60 s: deadlock")
                        .expect("WRITE");
                        match r.status {
                            0 => break,
                            0x28 => {
                                tsf.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(1)).await;
                            }
                            other => panic!("WRITE status {other:#x}, sense {:?}", r.sense),
                        }
                    }
                    let blocks = (len / u64::from(BLOCK_SIZE)) as u32;
                    let r = tokio::time::timeout(
                        Duration::from_secs(60),
                        s.read16(0, lba, blocks, BLOCK_SIZE),
                    )
                    .await
                    .expect("READ did not complete in 60 s")
                    .expect("READ");
                    assert_eq!(r.status, 0, "READ back");
                    assert!(r.data == data, "data of region {region} read back changed");
                    bytes += len;
                }
                bytes
            }));
        }
    }
    let mut written = 0;
    for t in tasks {
        written += t.await.expect("writer");
    }
    let elapsed = started.elapsed();
    let (rss, _) = sampler.finish().await;
    let refused = task_set_full.load(Ordering::Relaxed);
    eprintln!(
        "well-behaved writers: {} MiB written and read back by {} WRITEs at QD{DEPTH} x \
         {SESSIONS} sessions in {elapsed:?} with max_buffered {} MiB; TASK SET FULL {refused} \
         times (retried); RSS peak {} MiB",
        written / MIB,
        SESSIONS * DEPTH * ROUNDS,
        max_buffered / MIB,
        rss / MIB
    );
    for s in sessions {
        s.logout().await.expect("logout");
    }
    // The daemon counts the same refusals, and holds no payload once the sessions are gone.
    assert_eq!(
        metric(&d, "ironlun_task_set_full_total"),
        Some(refused),
        "/metrics TASK SET FULL count"
    );
    assert_eq!(
        metric(&d, "ironlun_payload_buffered_limit_bytes"),
        Some(max_buffered)
    );
    let deadline = Instant::now() + PROMPT;
    while metric(&d, "ironlun_payload_buffered_bytes") != Some(0) {
        assert!(
            Instant::now() < deadline,
            "payload still charged after logout"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
