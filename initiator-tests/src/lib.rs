//! End-to-end tests in `tests/` (DESIGN.md §4 tiers 6 and 7): the release daemon, started by
//! `ironlun_testkit::Daemon::release`, driven by real initiators. This library holds only what
//! tier 7 adds: the Linux guest.
//!
//! The daemon binary is `$IRONLUN_BIN`, else `target/release/ironlun` of this workspace
//! (`scripts/test.sh` builds it first). A missing binary or tool is a test failure, never a skip.

pub mod linux_guest;
