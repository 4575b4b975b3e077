//! Shell completions and manual pages generated from the clap definition of the `ironlun`
//! command line (`ironlun completions SHELL`, `ironlun man [--out-dir DIR]`), so that they
//! never drift from the flags the binary accepts.

use std::io::Write;
use std::path::{Path, PathBuf};

pub use clap_complete::Shell;

/// Write the completion script for `shell` of `cmd` (named by `cmd`'s name) to `out`.
pub fn completions(cmd: &mut clap::Command, shell: Shell, out: &mut dyn Write) {
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, cmd, name, out);
}

/// The roff source of the top-level page `NAME(1)` of `cmd`.
pub fn man_page(cmd: clap::Command, out: &mut dyn Write) -> std::io::Result<()> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    clap_mangen::Man::new(cmd).render(out)
}

/// One page per command and subcommand (`ironlun.1`, `ironlun-serve.1`, `ironlun-ctl.1`,
/// `ironlun-ctl-reservations.1`, …) written into `dir`, which is created if missing; returns
/// the files written, sorted.
pub fn man_pages(cmd: clap::Command, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(cmd, dir)?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "1"))
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn demo() -> clap::Command {
        clap::Command::new("demo")
            .about("A demo")
            .subcommand(clap::Command::new("serve").about("Serve"))
            .subcommand(
                clap::Command::new("ctl")
                    .about("Ask")
                    .subcommand(clap::Command::new("events").about("Events")),
            )
    }

    #[test]
    fn bash_completion_names_subcommands() {
        let mut out = Vec::new();
        completions(&mut demo(), Shell::Bash, &mut out);
        let s = String::from_utf8(out).unwrap();
        assert!(s.contains("serve") && s.contains("events"), "{s}");
    }

    #[test]
    fn man_pages_per_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        let files = man_pages(demo(), dir.path()).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            ["demo-ctl-events.1", "demo-ctl.1", "demo-serve.1", "demo.1"]
        );
        let mut top = Vec::new();
        man_page(demo(), &mut top).unwrap();
        let top = String::from_utf8(top).unwrap();
        assert!(top.starts_with(".ie"), "{top}");
        assert!(top.contains(".TH demo 1"), "{top}");
    }
}
