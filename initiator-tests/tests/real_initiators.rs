//! Tier 6 (DESIGN.md §4): the release daemon driven by libiscsi's tools and qemu-img.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use ironlun_testkit::{conformance, qemu_img_round_trip, repo_root, require_tool, run, Daemon};
use std::process::Command;

const TARGET: &str = "iqn.2026-11.io.ironlun:lab";

#[test]
fn default_lun_is_reported_by_libiscsi_tools() {
    for t in ["iscsi-ls", "iscsi-inq", "iscsi-readcapacity16"] {
        require_tool(t);
    }
    let d = Daemon::release().start();
    let url = format!("{}/{TARGET}/0", d.portal());
    assert_eq!(d.urls, vec![url.clone()]);

    let (ok, out) = run(Command::new("iscsi-ls").arg("-s").arg(d.portal()));
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("Target:{TARGET} Portal:{},1", d.addr)),
        "{out}"
    );
    assert!(
        out.contains("Lun:0") && out.contains("Type:DIRECT_ACCESS") && out.contains("Size:1"),
        "{out}"
    );

    let (ok, out) = run(Command::new("iscsi-inq").arg(&url));
    assert!(ok, "{out}");
    assert!(
        out.contains("Peripheral Device Type:DIRECT_ACCESS"),
        "{out}"
    );
    assert!(out.contains("Vendor:IRONLUN"), "{out}");
    assert!(out.contains("CmdQue:1"), "{out}");

    let (ok, out) = run(Command::new("iscsi-inq")
        .args(["-e", "1", "-c", "131"])
        .arg(&url));
    assert!(ok, "{out}");
    assert!(
        out.contains("NAA"),
        "VPD 83h lacks an NAA designator:\n{out}"
    );

    let (ok, out) = run(Command::new("iscsi-readcapacity16").arg(&url));
    assert!(ok, "{out}");
    assert!(out.contains("LOGICAL BLOCK LENGTH IN BYTES:512"), "{out}");
    assert!(out.contains("Total size:1073741824"), "{out}");
    assert!(out.contains("LBPME:1"), "{out}");
    d.stop();
}

fn qemu_roundtrip(block_size: u32) {
    require_tool("qemu-img");
    let size = 64u64 << 20;
    let cfg = format!(
        "[[target]]\nname = \"{TARGET}\"\n[[target.lun]]\nid = 0\nbackstore = \"file\"\npath = \"lun.img\"\nsize = {size}\nblock_size = {block_size}\n"
    );
    let d = Daemon::release().config(&cfg).start();
    let url = format!("{}/{TARGET}/0", d.portal());
    qemu_img_round_trip(&url, d.dir(), 0x9e37_79b9_7f4a_7c15 ^ u64::from(block_size));
    let src = d.dir().join("src.raw");
    // And straight against the LUN.
    let (ok, out) = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&url));
    assert!(ok && out.contains("Images are identical"), "{out}");
    d.stop();
}

#[test]
fn qemu_img_convert_roundtrip_512() {
    qemu_roundtrip(512);
}

#[test]
fn qemu_img_convert_roundtrip_4096() {
    qemu_roundtrip(4096);
}

#[test]
fn libiscsi_conformance_required_suites() {
    require_tool("iscsi-test-cu");
    let d = Daemon::release().start();
    let url = format!("{}/{TARGET}/0", d.portal());
    let (ok, out) = conformance(&url, &repo_root().join("target/conformance"));
    println!("{out}");
    assert!(ok, "required conformance suites failed:\n{out}");
    assert!(out.contains("conformance: required suites clean"), "{out}");
    d.stop();
}
