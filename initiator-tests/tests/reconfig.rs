//! Tier 6: live reconfiguration seen by libiscsi. A LUN added with `ironlun ctl lun add` is
//! listed by `iscsi-ls` without a restart and is saved in the config file; a LUN grown with
//! `ironlun ctl lun resize` reports its new size to `iscsi-readcapacity16`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use ironlun_testkit::{require_tool, run, Daemon};
use std::process::Command;

const X: &str = "iqn.2026-11.io.ironlun:reconfig";

#[test]
fn lun_added_and_grown_live_is_seen_by_libiscsi() {
    for t in ["iscsi-ls", "iscsi-readcapacity16"] {
        require_tool(t);
    }
    let config = format!(
        "# kept across saves\n[[target]]\nname = \"{X}\"\n\n[[target.lun]]\nid = 0\nbackstore = \"ram\"\nsize = \"4MiB\"\n"
    );
    let d = Daemon::release().config(&config).start();
    let ls = || {
        let (ok, out) = run(Command::new("iscsi-ls").arg("-s").arg(d.portal()));
        assert!(ok, "{out}");
        out
    };
    let before = ls();
    assert!(
        before.contains("Lun:0") && !before.contains("Lun:1"),
        "{before}"
    );

    let out = d.ctl(&[
        "lun",
        "add",
        &format!("{X}/1"),
        "--backstore",
        "file",
        "--path",
        "lun1.img",
        "--size",
        "8M",
    ]);
    assert!(out.contains("saved to"), "{out}");
    let after = ls();
    assert!(
        after.contains("Lun:1"),
        "iscsi-ls does not list the new LUN:\n{after}"
    );
    let saved = std::fs::read_to_string(d.dir().join("ironlun.toml")).unwrap();
    assert!(saved.starts_with("# kept across saves"), "{saved}");
    assert!(
        saved.contains("id = 1") && saved.contains("lun1.img"),
        "{saved}"
    );

    let url = format!("{}/{X}/1", d.portal());
    let size = || {
        let (ok, out) = run(Command::new("iscsi-readcapacity16").arg("-s").arg(&url));
        assert!(ok, "{out}");
        out.trim()
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("size: {out}"))
    };
    assert_eq!(size(), 8 << 20);
    d.ctl(&["lun", "resize", &format!("{X}/1"), "16M"]);
    assert_eq!(size(), 16 << 20);
    assert_eq!(
        std::fs::metadata(d.dir().join("lun1.img")).unwrap().len(),
        16 << 20
    );
    d.stop();
}
