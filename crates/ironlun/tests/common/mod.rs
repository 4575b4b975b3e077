//! Shim for the daemon tests not yet ported to `ironlun_testkit`: its items under their old
//! names, and a `Daemon` that runs the `ironlun` binary cargo built for these tests.

#![allow(dead_code, unused_imports)]

pub use ironlun_testkit::{
    admin_connect, opts, parse_http_response, pattern, session, AdminStream, BackgroundIo, Refused,
    BLOCKS, BLOCK_SIZE, LISTEN_ANY, PROMPT, TARGET,
};
use std::path::Path;

/// `ironlun_testkit::Daemon` on this package's binary, with the old constructors.
pub struct Daemon(ironlun_testkit::Daemon);

fn builder() -> ironlun_testkit::DaemonBuilder {
    ironlun_testkit::Daemon::builder(env!("CARGO_BIN_EXE_ironlun"))
}

impl Daemon {
    pub fn start() -> Daemon {
        Daemon(builder().start())
    }

    pub fn start_with_config(config: &str) -> Daemon {
        Daemon(builder().config(config).start())
    }

    pub fn start_with_config_files(config: &str, files: &[(&str, &str)]) -> Daemon {
        let b = files
            .iter()
            .fold(builder().config(config), |b, (n, t)| b.file(n, t));
        Daemon(b.start())
    }

    /// `serve` on `dir` with exactly `args` (no implied `--listen`).
    pub fn spawn(dir: &Path, config: Option<&str>, args: &[&str]) -> Result<Daemon, Refused> {
        let b = builder().portals().args(args);
        let b = match config {
            Some(c) => b.config(c),
            None => b,
        };
        b.spawn_in(dir).map(Daemon)
    }

    pub fn spawn_ok(dir: &Path, config: Option<&str>, args: &[&str]) -> Daemon {
        Self::spawn(dir, config, args).unwrap_or_else(|r| {
            panic!(
                "daemon exited at start ({}); stderr:\n{}",
                r.status, r.stderr
            )
        })
    }

    pub fn kill9(self) {
        self.0.kill9()
    }
}

impl std::ops::Deref for Daemon {
    type Target = ironlun_testkit::Daemon;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}
