//! `ironlun completions SHELL` and `ironlun man`: generated from the clap definition; the bash
//! script parses and names the subcommands, every man page renders without a groff warning.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_ironlun");

fn run(args: &[&str]) -> String {
    let o = Command::new(BIN).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "ironlun {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn bash_completion_parses_and_names_subcommands() {
    let script = run(&["completions", "bash"]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ironlun.bash");
    std::fs::write(&path, &script).unwrap();
    let o = Command::new("bash").arg("-n").arg(&path).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(script.contains("complete -F _ironlun"), "not registered");
    for sub in [
        "serve",
        "ctl",
        "migrate",
        "vhd",
        "check",
        "completions",
        "man",
        "reservations",
        "ownership",
        "handover",
        "port-group",
        "events",
        "--log-format",
    ] {
        assert!(script.contains(sub), "bash completion lacks {sub}");
    }
    // The other shells generate too.
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        assert!(run(&["completions", shell]).contains("ironlun"), "{shell}");
    }
    let o = Command::new(BIN)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
}

/// `groff -k -man -Tutf8 -ww -z FILE`: every warning on, preconv for UTF-8; stderr must be
/// empty.
fn render(page: &std::path::Path) {
    let o = Command::new("groff")
        .args(["-k", "-man", "-Tutf8", "-ww", "-z"])
        .arg(page)
        .stdin(Stdio::null())
        .output()
        .expect("groff (package groff-base; scripts/install-deps.sh installs it)");
    assert!(
        o.status.success() && o.stderr.is_empty(),
        "{}: {}",
        page.display(),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn man_pages_render_without_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let top = run(&["man"]);
    assert!(top.contains(".TH ironlun 1"), "{top}");
    for s in ["serve", "ctl", "completions"] {
        assert!(top.contains(s), "ironlun(1) does not mention {s}");
    }
    let top_path = dir.path().join("stdout.1");
    std::fs::write(&top_path, &top).unwrap();
    render(&top_path);

    let out = dir.path().join("man1");
    let listed = run(&["man", "--out-dir", out.to_str().unwrap()]);
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for want in [
        "ironlun.1",
        "ironlun-serve.1",
        "ironlun-ctl.1",
        "ironlun-ctl-reservations.1",
        "ironlun-migrate.1",
        "ironlun-vhd.1",
        "ironlun-completions.1",
        "ironlun-man.1",
    ] {
        assert!(names.iter().any(|n| n == want), "no {want} in {names:?}");
    }
    assert_eq!(listed.lines().count(), names.len(), "{listed}");
    for n in &names {
        render(&out.join(n));
    }
    let serve = std::fs::read_to_string(out.join("ironlun-serve.1")).unwrap();
    assert!(serve.contains("log\\-format"), "{serve}");
    // man(1) itself formats it.
    let o = Command::new("man")
        .arg("-l")
        .arg(out.join("ironlun-ctl.1"))
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "80")
        .output()
        .expect("man (package man-db)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("reservations"));
}
