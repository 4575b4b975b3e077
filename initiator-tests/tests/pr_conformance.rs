//! libiscsi's persistent-reservation and SPC-2 reservation suites against the release daemon
//! (issue 5, acceptance 1): two initiator names, `--dataloss`, 0 failures and 0 skips.

use ironlun_testkit::{conformance_of, repo_root, require_tool, Daemon};

const TARGET: &str = "iqn.2026-11.io.ironlun:lab";

/// Every PR family iscsi-test-cu 1.19 has, plus Reserve6. Each must run every test: a skip
/// here means a command or reservation type the target does not support.
const PR_SUITES: &str = "PrinReadKeys PrinServiceactionRange PrinReportCapabilities ProutRegister \
ProutReserve ProutClear ProutPreempt Reserve6";

#[test]
fn libiscsi_pr_suites_pass_without_skips() {
    require_tool("iscsi-test-cu");
    // The embedded default's lab target, with target resets allowed without CHAP: Reserve6's
    // TargetColdReset and TargetWarmReset send them (the default "chap" would answer
    // "Function authorization failed" and libiscsi would skip).
    let d = Daemon::release()
        .config(
            r#"
[[target]]
name = "iqn.2026-11.io.ironlun:lab"
allow_target_reset = "all"

[[target.lun]]
id = 0
backstore = "file"
path = "lun0.img"
size = "1GiB"
"#,
        )
        .start();
    let url = format!("{}/{TARGET}/0", d.portal());
    let out_dir = repo_root().join("target/conformance-pr");
    let (ok, out) = conformance_of(PR_SUITES, true, &url, &out_dir);
    println!("{out}");
    assert!(ok, "PR conformance suites failed or skipped:\n{out}");
    assert!(out.contains("conformance: required suites clean"), "{out}");
    d.stop();
}
