//! How the process's allocator keeps and gives back freed memory (glibc malloc; elsewhere the
//! allocator's defaults stand and this module does nothing).
//!
//! glibc's defaults make RSS follow the instantaneous working set: up to eight arenas per core,
//! each heap trimmed as soon as 128 KiB at its top are free, and buffers above a moving mmap
//! threshold mapped and unmapped one by one. Under mixed I/O (a burst of 1 MiB writes at QD32
//! between 4 KiB ones) RSS then jumps by tens of MiB and falls back within seconds, and the
//! scattered arenas fragment (issue 15's soak measured +30 MiB transients). The daemon instead
//! ([`configure`], once, before any runtime thread starts):
//!
//! - keeps one arena (`M_ARENA_MAX`): `malloc_trim` gives back free pages inside every arena
//!   but shrinks only the main arena's top, so memory freed at the top of a per-thread arena
//!   would stay resident when idle. Small allocations mostly bypass the arena lock through
//!   glibc's per-thread cache; measured on 2 cores, throughput did not drop (issue 15 note);
//! - serves every buffer up to [`MMAP_THRESHOLD`] from the heaps (`M_MMAP_THRESHOLD`, which
//!   also stops glibc from moving the threshold), so payload buffers are reused, not remapped;
//! - lets the heaps keep up to `[limits] max_buffered` of free memory (`M_TRIM_THRESHOLD`):
//!   the budget ([`crate::budget`]) bounds the payload held at once, so what is kept is memory
//!   the next burst takes again;
//!
//! and gives free memory back once the daemon is idle: [`IdleRelease`] watches the budget's
//! [`activity`](crate::budget::MemoryBudget::activity) and, after [`IDLE_TICKS`] looks in a
//! row without a charge and once the read-buffer pools have freed what they parked,
//! [`release`] returns every free page to the kernel (`malloc_trim`). Busy, RSS stays at the
//! high-water mark of the load; idle, it falls back to the baseline.

/// Arenas malloc may use (see the module doc for why one).
pub const ARENAS: i32 = 1;

/// Largest allocation served from the heaps rather than its own mapping: glibc's ceiling for
/// the setting (half its 64 MiB heap size on 64-bit), above any single PDU or Data-In buffer
/// but the largest transfers (`Limits::max_transfer`, 64 MiB).
pub const MMAP_THRESHOLD: usize = 32 * 1024 * 1024;

/// Consecutive looks without a charge before [`IdleRelease`] asks for a release. With looks
/// every 5 s this is 10 s: longer than the read-buffer pools keep an idle buffer
/// (`ironlun_backstore::buffers::IDLE_AFTER`), so they have freed theirs first.
pub const IDLE_TICKS: u32 = 2;

/// Set the allocator's policy (see the module doc) for a daemon whose budget is
/// `max_buffered` bytes. Call once, before threads are started (arenas already made stay).
/// Returns false when the allocator refused a setting or is not glibc's.
pub fn configure(max_buffered: u64) -> bool {
    imp::configure(max_buffered)
}

/// Give free heap memory back to the kernel. Returns whether any was.
pub fn release() -> bool {
    imp::release()
}

/// When to call [`release`]: once per idle period, at the first periodic look that finds the
/// budget's activity counter unchanged for [`IDLE_TICKS`] looks and the read-buffer pools
/// empty (buffers parked when the last connections closed are freed a sweep later; a release
/// before that would leave them in the heap).
#[derive(Debug, Default)]
pub struct IdleRelease {
    last: Option<u64>,
    idle_ticks: u32,
    released: bool,
}

impl IdleRelease {
    /// One periodic look at the activity counter and whether the pools park anything; true
    /// when memory should be released now.
    pub fn tick(&mut self, activity: u64, pools_empty: bool) -> bool {
        if self.last != Some(activity) {
            self.last = Some(activity);
            self.idle_ticks = 0;
            self.released = false;
            return false;
        }
        self.idle_ticks = self.idle_ticks.saturating_add(1);
        if self.idle_ticks >= IDLE_TICKS && pools_empty && !self.released {
            self.released = true;
            return true;
        }
        false
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
mod imp {
    use super::{ARENAS, MMAP_THRESHOLD};
    use std::os::raw::c_int;

    fn clamp(v: u64) -> c_int {
        c_int::try_from(v).unwrap_or(c_int::MAX)
    }

    pub fn configure(max_buffered: u64) -> bool {
        let mmap = clamp(u64::try_from(MMAP_THRESHOLD).unwrap_or(u64::MAX));
        let trim = clamp(max_buffered);
        let mut ok = true;
        for (param, value) in [
            (libc::M_ARENA_MAX, ARENAS),
            (libc::M_MMAP_THRESHOLD, mmap),
            (libc::M_TRIM_THRESHOLD, trim),
        ] {
            // SAFETY: mallopt only changes malloc's tunables; it takes plain integers and is
            // safe to call at any time (glibc serialises it against allocations).
            ok &= unsafe { libc::mallopt(param, value) } == 1;
        }
        ok
    }

    pub fn release() -> bool {
        // SAFETY: malloc_trim walks the arenas under their locks and returns free pages with
        // madvise; it frees nothing still allocated and takes no pointer.
        unsafe { libc::malloc_trim(0) == 1 }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub fn configure(_max_buffered: u64) -> bool {
        false
    }

    pub fn release() -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_once_after_idle_ticks_and_again_only_after_new_activity() {
        let mut r = IdleRelease::default();
        assert!(!r.tick(5, true), "first look only records the counter");
        assert!(!r.tick(5, true), "one idle look is not enough");
        assert!(r.tick(5, true), "second idle look releases");
        assert!(!r.tick(5, true), "once per idle period");
        assert!(!r.tick(5, true));
        assert!(!r.tick(6, true), "activity resets");
        assert!(!r.tick(7, true), "still busy");
        assert!(!r.tick(7, true));
        assert!(r.tick(7, true), "idle again: release again");
    }

    #[test]
    fn waits_for_the_pools_to_empty() {
        let mut r = IdleRelease::default();
        assert!(!r.tick(1, false));
        assert!(!r.tick(1, false));
        assert!(!r.tick(1, false), "idle, but buffers are still parked");
        assert!(r.tick(1, true), "the sweep freed them: release");
        assert!(!r.tick(1, true));
    }

    #[test]
    fn configure_and_release_are_accepted_by_glibc() {
        if cfg!(all(target_os = "linux", target_env = "gnu")) {
            assert!(configure(256 * 1024 * 1024));
            // A freed large block at the heap's top can always be given back.
            let v = vec![1u8; 4 * 1024 * 1024];
            drop(std::hint::black_box(v));
            release();
        } else {
            assert!(!configure(256 * 1024 * 1024));
        }
    }
}
