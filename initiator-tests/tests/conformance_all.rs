//! The whole iscsi-test-cu suite against the release daemon (issue 8, acceptance 1).
//!
//! One daemon with two portals (two ports on 127.0.0.1, portal groups 1 and 2) and:
//! - LUN 0: a 256 MiB thin file LUN, 512-byte blocks, `sanitize_rate` 32 MiB/s so that a
//!   SANITIZE OVERWRITE lasts about 8 s (Sanitize.Reset checks NOT READY, SANITIZE IN PROGRESS
//!   three seconds after starting one, then across task management functions and a new login);
//! - LUN 1: a read-only RAM LUN;
//! - LUN 2: a 64 MiB file LUN with 8 logical blocks per physical block (`physical_block_size`);
//! - NOP-In pings after 30 s idle, answered within 60 s: Sanitize.Reset sleeps 60 s between
//!   TEST UNIT READYs in a single-threaded initiator that cannot answer a ping meanwhile (with
//!   the default 5 s + 10 s the connection closes, the re-login brings a unit attention, the
//!   next TEST UNIT READY fails and the test sleeps again, forever).
//!
//! Run 1: every SCSI.* and iSCSI.* family iscsi-test-cu lists, one process per family
//! (scripts/conformance.sh), with `--dataloss --allow-sanitize`, two initiator names and the
//! LUN 0 URL of each portal (the second for MultipathIO's second path; Sanitize gets one URL:
//! with two, libiscsi shares one second session across the family's tests and the RESERVE(6)
//! Sanitize.Reservations takes on it is never released, so Sanitize.Reset would meet a
//! reservation conflict on any target). Run 2: ReadOnly against
//! LUN 1, where it exercises instead of skipping. Run 3: WriteSame10/16 and CompareAndWrite
//! against LUN 2, where UnmapUnaligned and InvalidDataOutSize run (they need LBPPB ≥ 2). The test fails on any failure, crash or
//! timeout, and on any skip not in [`ALLOWED_SKIPS`] (each with the reason it is fine) or in
//! [`PENDING_ON_OTHER_BRANCHES`] (features other issue-8 branches implement; the lead empties
//! that table after merging them). Each allowed skip must still be seen, so a fixed one is
//! noticed. Runtime: 209 s measured (51 families + the read-only run; Sanitize.Reset alone
//! waits 60 s by design).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use ironlun_initiator_tests::{repo_root, require_tool, run, Daemon};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

const TARGET: &str = "iqn.2026-11.io.ironlun:lab";

/// Skips the suite cannot avoid here: (suite, test, what libiscsi prints, why it is fine).
const ALLOWED_SKIPS: &[(&str, &str, &str, &str)] = &[
    (
        "PreventAllow",
        "*",
        "not removable",
        "RMB=0: the medium of a disk LUN is not removable, so PREVENT has nothing to prevent",
    ),
    (
        "StartStopUnit",
        "*",
        "not removable",
        "as PreventAllow: LOEJ only applies to removable media",
    ),
    (
        "WriteSame10",
        "ZeroBlocks",
        "does not support 0-blocks",
        "WSNZ=1 in VPD B0h: NUMBER OF LOGICAL BLOCKS 0 (to the end of the medium) is refused. \
         With WSNZ=0 the suite's own WriteSame10.UnmapUntilEnd fails on a correct target: it \
         sends WRITE SAME (10) with UNMAP=1 and a block of 0xFF and expects zeroes back, while \
         SBC-3 writes a block that does not match the unmapped pattern (WRITE SAME (16)'s \
         version of the test sends zeroes); measured 2026-11-26 with WSNZ=0: ZeroBlocks passes, \
         UnmapUntilEnd fails",
    ),
    (
        "WriteSame16",
        "ZeroBlocks",
        "does not support 0-blocks",
        "as WriteSame10.ZeroBlocks",
    ),
    (
        "WriteSame10",
        "UnmapUnaligned",
        "LBPPB < 2",
        "LUN 0 has one logical block per physical block (GetLBAStatus.UnmapSingle cannot pass \
         otherwise); run 3 exercises it on LUN 2, 8 logical blocks per physical block",
    ),
    ("WriteSame16", "UnmapUnaligned", "LBPPB < 2", "as above"),
    ("WriteSame10", "InvalidDataOutSize", "LBPPB < 2", "as above"),
    ("WriteSame16", "InvalidDataOutSize", "LBPPB < 2", "as above"),
    (
        "CompareAndWrite",
        "InvalidDataOutSize",
        "LBPPB < 2",
        "as above",
    ),
    (
        "Sanitize",
        "CryptoErase",
        "CRYPTO_ERASE is not",
        "no backstore encrypts its medium: CRYPTOGRAPHIC ERASE is refused (INVALID FIELD IN CDB) \
         and not reported by REPORT SUPPORTED OPERATION CODES",
    ),
    (
        "Sanitize",
        "Readonly",
        "CRYPTO_ERASE is not",
        "its CRYPTOGRAPHIC ERASE step, as Sanitize.CryptoErase (OVERWRITE and BLOCK ERASE run)",
    ),
    (
        "Sanitize",
        "Reservations",
        "CRYPTO_ERASE is not",
        "as Sanitize.Readonly",
    ),
    (
        "ReadOnly",
        "ReadOnlySBC",
        "not write-protected",
        "run 1 uses the writable LUN 0; run 2 runs it against the read-only LUN 1",
    ),
];

/// Families or tests other issue-8 branches implement: (suite, test or "*", reason). Allowed
/// to fail or skip here until the lead merges those branches and empties this table.
const PENDING_ON_OTHER_BRANCHES: &[(&str, &str, &str)] = &[];

/// One family's line of scripts/conformance.sh's summary file.
#[derive(Debug)]
struct Row {
    suite: String,
    tests: u32,
    failed: u32,
    status: String,
    failed_tests: Vec<String>,
    /// (test, reason libiscsi printed).
    skips: Vec<(String, String)>,
}

fn summary(out_dir: &Path) -> Vec<Row> {
    let text = std::fs::read_to_string(out_dir.join("summary.txt")).unwrap();
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\x1f').collect();
            assert!(f.len() >= 8, "summary line {l:?}");
            let suite = f[0].split_once('.').map_or(f[0], |(_, s)| s).to_owned();
            let skips = f[7]
                .split(" | ")
                .filter(|s| !s.is_empty())
                .map(|s| {
                    let (t, r) = s.split_once(": ").unwrap_or((s, ""));
                    (t.to_owned(), r.to_owned())
                })
                .collect();
            Row {
                suite,
                tests: f[1].parse().unwrap(),
                failed: f[3].parse().unwrap(),
                status: f[5].to_owned(),
                failed_tests: f[6]
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
                skips,
            }
        })
        .collect()
}

fn pending(suite: &str, test: &str) -> bool {
    PENDING_ON_OTHER_BRANCHES
        .iter()
        .any(|(s, t, _)| *s == suite && (*t == "*" || *t == test))
}

fn allowed(suite: &str, test: &str, reason: &str) -> Option<usize> {
    ALLOWED_SKIPS
        .iter()
        .position(|(s, t, why, _)| *s == suite && (*t == "*" || *t == test) && reason.contains(why))
}

/// Run conformance.sh; check every row; return the problems and the allowed skips seen.
fn check(rows: &[Row], seen: &mut BTreeSet<usize>) -> Vec<String> {
    let mut bad = Vec::new();
    for r in rows {
        if r.status != "ok" || r.tests == 0 {
            if !pending(&r.suite, "*") {
                bad.push(format!(
                    "{}: status {} with {} tests",
                    r.suite, r.status, r.tests
                ));
            }
            continue;
        }
        if r.failed > 0 {
            for t in &r.failed_tests {
                if !pending(&r.suite, t) {
                    bad.push(format!("{}.{t}: FAILED", r.suite));
                }
            }
        }
        for (t, why) in &r.skips {
            if let Some(i) = allowed(&r.suite, t, why) {
                seen.insert(i);
            } else if !pending(&r.suite, t) {
                bad.push(format!(
                    "{}.{t}: skipped ({why}) without an entry in ALLOWED_SKIPS",
                    r.suite
                ));
            }
        }
    }
    bad
}

fn conformance(args: &[&str], url: &str, out_dir: &Path) -> String {
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("scripts/conformance.sh"))
        .args(args)
        .arg("--out")
        .arg(out_dir)
        .arg(url);
    let (_, out) = run(&mut cmd);
    out
}

#[test]
fn whole_suite_one_process_per_family() {
    require_tool("iscsi-test-cu");
    let started = std::time::Instant::now();
    let daemon = Daemon::start_portals(
        r#"
[timeouts]
nop_interval = 30
nop_timeout = 60

[[portal]]
listen = "127.0.0.1:0"
tpgt = 1

[[portal]]
listen = "127.0.0.1:0"
tpgt = 2

[[target]]
name = "iqn.2026-11.io.ironlun:lab"

[[target.lun]]
id = 0
backstore = "file"
path = "lun0.img"
size = "256MiB"
sanitize_rate = "32MiB"

[[target.lun]]
id = 1
backstore = "ram"
size = "64MiB"
read_only = true

[[target.lun]]
id = 2
backstore = "file"
path = "lun2.img"
size = "64MiB"
physical_block_size = 4096
"#,
    );
    assert_eq!(daemon.addrs.len(), 2, "two portals: {:?}", daemon.addrs);
    let url = |portal: usize, lun: u32| format!("iscsi://{}/{TARGET}/{lun}", daemon.addrs[portal]);
    let logs = tempfile::tempdir().unwrap();

    let all = logs.path().join("all");
    let out = conformance(
        &[
            "--allow-sanitize",
            "--url2",
            &url(1, 0),
            "--single-path",
            "SCSI.Sanitize",
            "--timeout",
            "400",
        ],
        &url(0, 0),
        &all,
    );
    println!("{out}");
    let rows = summary(&all);
    let families = rows.len();
    assert!(
        families >= 50,
        "expected every family, got {families}:\n{out}"
    );
    let mut seen = BTreeSet::new();
    let mut bad = check(&rows, &mut seen);

    let ro = logs.path().join("readonly");
    let out = conformance(&["--suites", "SCSI.ReadOnly"], &url(0, 1), &ro);
    println!("{out}");
    let rows = summary(&ro);
    assert_eq!(rows.len(), 1);
    // Against the read-only LUN, ReadOnlySBC must run, never skip (it skips as a whole while
    // COMPARE AND WRITE, its first step, is missing: pending).
    for (t, why) in &rows[0].skips {
        if !pending("ReadOnly", t) {
            bad.push(format!(
                "ReadOnly.{t} on the read-only LUN: skipped ({why})"
            ));
        }
    }
    bad.extend(check(&rows, &mut BTreeSet::new()));

    // Run 3: WRITE SAME and COMPARE AND WRITE on LUN 2 (LBPPB = 8), where UnmapUnaligned and
    // InvalidDataOutSize run.
    let lbppb = logs.path().join("lbppb");
    let out = conformance(
        &[
            "--suites",
            "SCSI.WriteSame10 SCSI.WriteSame16 SCSI.CompareAndWrite",
        ],
        &url(0, 2),
        &lbppb,
    );
    println!("{out}");
    let rows = summary(&lbppb);
    assert_eq!(rows.len(), 3);
    for r in &rows {
        for (t, why) in &r.skips {
            if t != "ZeroBlocks" {
                bad.push(format!(
                    "{}.{t} on the LBPPB=8 LUN: skipped ({why})",
                    r.suite
                ));
            }
        }
    }
    bad.extend(check(&rows, &mut BTreeSet::new()));

    // Every allowed skip still happens (a fixed one must leave the table).
    for (i, (s, t, why, _)) in ALLOWED_SKIPS.iter().enumerate() {
        if !seen.contains(&i) && !pending(s, t) {
            bad.push(format!(
                "{s}.{t}: allowed skip ({why}) no longer seen: remove it"
            ));
        }
    }
    let elapsed = started.elapsed();
    println!("{families} families + ReadOnly on the read-only LUN in {elapsed:?}");
    let err = daemon.stop();
    assert!(
        bad.is_empty(),
        "{}\nlogs: {}\ndaemon:\n{err}",
        bad.join("\n"),
        {
            let keep = logs.keep();
            keep.display().to_string()
        }
    );
}
