//! Tier 6: ACLs seen by libiscsi. An initiator outside a target's `allowed_initiators` does
//! not see it in `iscsi-ls -s` and its login is refused with AUTHORIZATION FAILURE (0202).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use ironlun_testkit::{require_tool, run, Daemon};
use std::process::Command;

const OPEN: &str = "iqn.2026-11.io.ironlun:open";
const PROTECTED: &str = "iqn.2026-11.io.ironlun:protected";
const INSIDER: &str = "iqn.2026-11.io.test:insider";
const OUTSIDER: &str = "iqn.2026-11.io.test:outsider";

fn config() -> String {
    format!(
        r#"
[[target]]
name = "{OPEN}"
[[target.lun]]
id = 0
backstore = "ram"
size = "4MiB"

[[target]]
name = "{PROTECTED}"
allowed_initiators = ["{INSIDER}"]
[[target.lun]]
id = 0
backstore = "ram"
size = "4MiB"
"#
    )
}

#[test]
fn outsider_neither_sees_nor_logs_in_to_a_protected_target() {
    for t in ["iscsi-ls", "iscsi-inq"] {
        require_tool(t);
    }
    let d = Daemon::release().config(&config()).start();

    let (ok, out) = run(Command::new("iscsi-ls")
        .args(["-s", "-i", OUTSIDER])
        .arg(d.portal()));
    assert!(ok, "{out}");
    assert!(out.contains(&format!("Target:{OPEN} ")), "{out}");
    assert!(out.contains("Lun:0"), "{out}");
    assert!(
        !out.contains(PROTECTED),
        "outsider sees the protected target:\n{out}"
    );

    let (ok, out) = run(Command::new("iscsi-ls")
        .args(["-s", "-i", INSIDER])
        .arg(d.portal()));
    assert!(ok, "{out}");
    assert!(out.contains(&format!("Target:{PROTECTED} ")), "{out}");

    let url = format!("{}/{PROTECTED}/0", d.portal());
    let (ok, out) = run(Command::new("iscsi-inq").args(["-i", OUTSIDER]).arg(&url));
    assert!(!ok, "outsider logged in:\n{out}");
    assert!(
        out.to_lowercase().contains("authorization"),
        "not refused for authorization:\n{out}"
    );

    let (ok, out) = run(Command::new("iscsi-inq").args(["-i", INSIDER]).arg(&url));
    assert!(ok, "{out}");
    assert!(
        out.contains("Peripheral Device Type:DIRECT_ACCESS"),
        "{out}"
    );
    d.stop();
}
