//! Tier 6, issue #4 acceptance 5: libiscsi's required conformance suites with header digests
//! (`?header_digest=crc32c` in the URL), and proof from the daemon's log that CRC32C was in
//! force.
//!
//! iscsi-test-cu overrides the URL's digest with its own offer "None,CRC32C" (libiscsi
//! test-tool/iscsi-support.c), and the responder takes the first value it supports (RFC 7143
//! §6.2.1), so the daemon here supports only CRC32C: every session then runs with it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use ironlun_testkit::{conformance, repo_root, require_tool, strip_ansi, Daemon};

const TARGET: &str = "iqn.2026-11.io.ironlun:lab";
const CONFIG: &str = "[negotiation]\nheader_digest = [\"CRC32C\"]\n[[target]]\nname = \"iqn.2026-11.io.ironlun:lab\"\n\
[[target.lun]]\nid = 0\nbackstore = \"file\"\npath = \"lun0.img\"\nsize = \"1GiB\"\n";

#[test]
fn libiscsi_conformance_with_header_digests() {
    require_tool("iscsi-test-cu");
    let d = Daemon::release().config(CONFIG).start();
    let url = format!("{}/{TARGET}/0?header_digest=crc32c", d.portal());
    let (ok, out) = conformance(&url, &repo_root().join("target/conformance-hd"));
    println!("{out}");
    assert!(
        ok,
        "required conformance suites failed with header digests:\n{out}"
    );
    assert!(out.contains("conformance: required suites clean"), "{out}");
    let log = strip_ansi(&d.stop());
    // Every login line names the digests in force (`header_digest=… data_digest=…`).
    let logins: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" login ") && l.contains("header_digest="))
        .collect();
    assert!(
        !logins.is_empty(),
        "no login lines in the daemon log:\n{log}"
    );
    assert!(
        logins.iter().all(|l| l.contains("header_digest=CRC32C")),
        "a session ran without the header digest:\n{}",
        logins.join("\n")
    );
}
