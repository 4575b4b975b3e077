//! A scratch directory for `ironlun migrate` runs: its journal, the log its hooks append to,
//! and hook commands that kill or hold up the driver at a chosen point.

use std::path::{Path, PathBuf};

/// A temp directory (removed on drop) holding a migration's journal (`m.journal`), the hook
/// log (`hooks.log`) and the marker files of the one-shot hooks.
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `name` in the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The journal to pass as `--journal`.
    pub fn journal(&self) -> PathBuf {
        self.path("m.journal")
    }

    /// A hook that appends `STEP EPOCH LUN FROM TO` (its `IRONLUN_*` variables) to
    /// `hooks.log`, then runs `then`.
    pub fn hook(&self, then: &str) -> String {
        format!(
            "echo \"$IRONLUN_STEP $IRONLUN_EPOCH $IRONLUN_LUN $IRONLUN_FROM $IRONLUN_TO\" >> '{}'; {then}",
            self.path("hooks.log").display()
        )
    }

    /// The steps of the hooks that ran, in order (the first word of each `hooks.log` line).
    pub fn ran(&self) -> Vec<String> {
        std::fs::read_to_string(self.path("hooks.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| l.split(' ').next().unwrap_or("").to_owned())
            .collect()
    }

    /// A hook command that kills the driver (`sh`'s parent) the first time it runs.
    pub fn kill_once(&self) -> String {
        let m = self.path("killed");
        format!(
            "if [ ! -e '{m}' ]; then touch '{m}'; kill -9 $PPID; sleep 1; fi",
            m = m.display()
        )
    }

    /// A hook command that sleeps 5 s the first time it runs: keeps the driver alive after a
    /// journal record so a [`Scratch::kill_at_record`] watcher reliably catches it there (the
    /// whole handover otherwise takes a few milliseconds, faster than the watcher's poll).
    pub fn slow_once(&self) -> String {
        let m = self.path("slowed");
        format!(
            "if [ ! -e '{m}' ]; then touch '{m}'; sleep 5; fi",
            m = m.display()
        )
    }

    /// A hook command that starts (once) a watcher in the background that kills the driver as
    /// soon as the journal holds a `STEP PHASE` record, polling every 5 ms; its output goes
    /// nowhere, so that it does not hold the driver's pipes open.
    pub fn kill_at_record(&self, step: &str, phase: &str) -> String {
        let m = self.path("killed");
        format!(
            "if [ ! -e '{m}' ]; then touch '{m}'; pid=$PPID; \
             ( n=0; while ! grep -q ' {step} {phase} ' '{j}' && [ $n -lt 6000 ]; do \
             sleep 0.005; n=$((n+1)); done; kill -9 $pid ) >/dev/null 2>&1 & fi",
            m = m.display(),
            j = self.journal().display()
        )
    }
}

impl Default for Scratch {
    fn default() -> Scratch {
        Scratch::new()
    }
}
