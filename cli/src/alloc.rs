//! The allocator, chosen by the process's role before `main`: mimalloc for the
//! coordinator (`shoal up`, `shoal coordinator`), glibc's malloc for everything
//! else (the agent, the client commands, `quickstart`, the MPI helpers).
//!
//! Why two: the coordinator's control loop allocates and frees many small,
//! short-lived values for each job (its launch, its row). glibc's malloc and
//! free took 31% of its samples on zero-work jobs, and with mimalloc it spends
//! about 20% less CPU on them. But a client command is one short process, and with
//! mimalloc `shoal job submit --wait` took ~0.6 ms longer at the median and up
//! to 25 ms at p95 (bench/RESULTS.md, issue 17 parts 6, 8 and 9). And an idle
//! agent, one on every node, holds 17 MB with glibc's malloc and 28 MB with
//! mimalloc's per-thread heaps, against a 30 MB goal. One binary runs them all,
//! so the choice is made per process.
//!
//! What is left of mimalloc in a process that does not use it: its own
//! constructor, which reads its options from the environment (`shoal --version`
//! 1.16 → 1.20 ms of CPU, within that host's spread; part 9).
//!
//! How: glibc runs the functions of `.init_array` before Rust's runtime starts,
//! with the process's `argc` and `argv` (Rust's standard library reads its own
//! arguments the same way). [`choose`] reads the role there. The choice is made
//! once and never changes: an allocation made before it (none is expected; no
//! constructor of ours allocates) settles it on glibc's, so a block is always
//! freed by the allocator that gave it. Elsewhere than Linux with glibc, glibc's
//! (the system's) malloc is used throughout.
//!
//! Only Rust's allocations change: C libraries linked in (SQLite, Open MPI)
//! keep calling glibc's `malloc`.

#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU8, Ordering};

use mimalloc::MiMalloc;

const UNDECIDED: u8 = 0;
const SYSTEM: u8 = 1;
const MIMALLOC: u8 = 2;

static CHOSEN: AtomicU8 = AtomicU8::new(UNDECIDED);

/// The roles that allocate through mimalloc: the coordinator's, by the first
/// argument.
pub fn uses_mimalloc(first_arg: &[u8]) -> bool {
    matches!(first_arg, b"up" | b"coordinator")
}

/// Which allocator this process uses ("mimalloc" or "system"), for its log.
pub fn chosen() -> &'static str {
    match CHOSEN.load(Ordering::Relaxed) {
        MIMALLOC => "mimalloc",
        _ => "system",
    }
}

/// The process's allocator: see the module's doc.
pub struct ByRole;

impl ByRole {
    /// The allocator in use; the first allocation settles an undecided one on
    /// glibc's.
    #[inline]
    fn mimalloc(&self) -> bool {
        match CHOSEN.load(Ordering::Relaxed) {
            MIMALLOC => true,
            SYSTEM => false,
            _ => {
                // Settled here if `choose` has not run (or another thread got
                // here first, or `choose` did, in which case its choice stands).
                let settled = CHOSEN
                    .compare_exchange(UNDECIDED, SYSTEM, Ordering::Relaxed, Ordering::Relaxed)
                    .unwrap_or_else(|now| now);
                settled == MIMALLOC
            }
        }
    }
}

// SAFETY: each call goes to one allocator, the same for the whole process once
// any block exists (`CHOSEN` moves only away from UNDECIDED, and before any
// block is handed out), so every block is freed and grown by the allocator that
// gave it, with the layout it was given for; both allocators uphold
// `GlobalAlloc`'s contract themselves.
unsafe impl GlobalAlloc for ByRole {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if self.mimalloc() {
            unsafe { MiMalloc.alloc(layout) }
        } else {
            unsafe { System.alloc(layout) }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if self.mimalloc() {
            unsafe { MiMalloc.alloc_zeroed(layout) }
        } else {
            unsafe { System.alloc_zeroed(layout) }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if self.mimalloc() {
            unsafe { MiMalloc.dealloc(ptr, layout) }
        } else {
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if self.mimalloc() {
            unsafe { MiMalloc.realloc(ptr, layout, new_size) }
        } else {
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }
}

/// Reads the role from `argv[1]`, before Rust's runtime (and any allocation
/// of ours) starts; glibc passes `argc`, `argv` and `envp` to these functions.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
extern "C" fn choose(
    argc: std::ffi::c_int,
    argv: *const *const std::ffi::c_char,
    _envp: *const *const std::ffi::c_char,
) {
    let mimalloc = argc > 1
        && !argv.is_null()
        // SAFETY: glibc passes the process's argv: `argc` valid pointers to
        // NUL-terminated strings (then a null one), alive for the whole process.
        && unsafe {
            let first = *argv.add(1);
            !first.is_null() && uses_mimalloc(std::ffi::CStr::from_ptr(first).to_bytes())
        };
    let choice = if mimalloc { MIMALLOC } else { SYSTEM };
    // An allocation made before this settled it already: that choice stands.
    let _ = CHOSEN.compare_exchange(UNDECIDED, choice, Ordering::Relaxed, Ordering::Relaxed);
}

/// Before the standard library's own (`.init_array.00099`, which reads argv
/// too) and any constructor without a priority.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[used]
#[unsafe(link_section = ".init_array.00098")]
static CHOOSE: extern "C" fn(
    std::ffi::c_int,
    *const *const std::ffi::c_char,
    *const *const std::ffi::c_char,
) = choose;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_coordinator_is_told_apart_from_the_other_roles_by_its_first_argument() {
        for role in ["up", "coordinator"] {
            assert!(uses_mimalloc(role.as_bytes()), "{role}");
        }
        for other in [
            "agent",
            "job",
            "cluster",
            "quickstart",
            "mpi",
            "--version",
            "ups",
            "",
        ] {
            assert!(!uses_mimalloc(other.as_bytes()), "{other}");
        }
    }

    /// This test binary is a process like any other: its constructor read its
    /// first argument (a test filter, if any) before the first allocation.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn the_choice_follows_the_first_argument_and_blocks_work_through_it() {
        let first = std::env::args().nth(1).unwrap_or_default();
        let want = if uses_mimalloc(first.as_bytes()) {
            "mimalloc"
        } else {
            "system"
        };
        assert_eq!(chosen(), want);
        let mut block = vec![7u8; 1 << 20];
        block.resize(3 << 20, 1);
        assert_eq!(
            block.iter().map(|&b| u64::from(b)).sum::<u64>(),
            (7 << 20) + (2 << 20)
        );
    }
}
