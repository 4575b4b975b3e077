//! libiscsi's COMPARE AND WRITE and multipath suites against the release daemon (issue 8,
//! acceptance 1): `SCSI.CompareAndWrite` and `SCSI.MultipathIO` with two initiator names and
//! `--dataloss`, the two paths through two different portals (portal groups 1 and 2) of one
//! daemon, 0 failures and 0 skips. `Inquiry` runs too: its BlockLimits test reads the
//! MAXIMUM COMPARE AND WRITE LENGTH this issue fills in.

#![allow(clippy::indexing_slicing)]

use ironlun_testkit::{conformance_paths, repo_root, require_tool, Daemon};

const TARGET: &str = "iqn.2026-11.io.ironlun:caw";

/// Two portals on free loopback ports, one thin RAM LUN. Eight logical blocks per physical
/// block: CompareAndWrite.InvalidDataOutSize runs only when LBPPB ≥ 2.
const CONFIG: &str = r#"
[[portal]]
listen = "127.0.0.1:0"
tpgt = 1

[[portal]]
listen = "127.0.0.1:0"
tpgt = 2

[[target]]
name = "iqn.2026-11.io.ironlun:caw"

[[target.lun]]
id = 0
backstore = "ram"
size = "64MiB"
serial = "caw-conformance"
physical_block_size = 4096
"#;

#[test]
fn libiscsi_compare_and_write_and_multipath_suites_pass_without_skips() {
    require_tool("iscsi-test-cu");
    let d = Daemon::release().config(CONFIG).portals().start();
    assert_eq!(d.addrs.len(), 2, "two portals: {:?}", d.addrs);
    assert_ne!(d.addrs[0], d.addrs[1]);
    let urls: Vec<String> = d
        .addrs
        .iter()
        .map(|a| format!("iscsi://{a}/{TARGET}/0"))
        .collect();
    let out_dir = repo_root().join("target/conformance-caw");
    let (ok, out) = conformance_paths(
        "CompareAndWrite MultipathIO Inquiry",
        true,
        &[&urls[0], &urls[1]],
        &out_dir,
    );
    println!("{out}");
    assert!(
        ok,
        "COMPARE AND WRITE / multipath suites failed or skipped:\n{out}"
    );
    assert!(out.contains("conformance: required suites clean"), "{out}");
    for suite in ["SCSI.CompareAndWrite", "SCSI.MultipathIO"] {
        let row = out
            .lines()
            .find(|l| l.starts_with(suite))
            .unwrap_or_else(|| panic!("no {suite} row:\n{out}"));
        assert!(row.contains(" ok"), "{row}");
    }
    d.stop();
}
