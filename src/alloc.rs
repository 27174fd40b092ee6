//! Allocator settings for the `ddpm` binary and the benchmarks (a program embedding the library
//! may use them too). A training or sampling step allocates and frees the same large activation
//! buffers every step, up to ~20 MB each at the `mnist` preset. Two things make that slow with
//! glibc's defaults, and both are set here:
//!
//! - freed blocks go back to the kernel, and coming back costs a page fault per 4 KiB;
//! - with 4 KiB pages, the ~150 MB a step touches need ~37,000 TLB entries, far more than the
//!   core has, so the convolutions' reads of many channel planes at once miss the TLB.
//!
//! [`keep_freed_memory`] fixes the first; [`HugePageHeap`] the second, by letting the kernel back
//! the heap with 2 MiB pages (transparent huge pages). Measured on the `mnist` preset, batch 64,
//! 2 threads: see benches/README.md.

use std::alloc::{GlobalAlloc, Layout, System};

/// Asks glibc's allocator to keep freed blocks for reuse instead of returning them to the
/// kernel, and to grow its heap in steps of 64 MiB. Memory use is then the peak of one step,
/// held. The `ddpm` binary and the benchmarks call this first. Does nothing off Linux/glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters (under the allocator's own lock).
    unsafe {
        // Blocks up to 32 MiB (glibc's largest allowed threshold on 64-bit) come from the
        // heap, and the heap is never trimmed.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        // Each growth of the heap reserves 64 MiB more than asked (address space only, until
        // touched), so [`HugePageHeap`] can mark it before anything writes to it.
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
    heap::start_marking();
}

/// The system allocator, with the heap marked for transparent huge pages (`madvise(2)`
/// `MADV_HUGEPAGE`) as it grows. Blocks come from the system allocator unchanged; after each
/// allocation of at least 64 KiB, the part of the heap added since the last such allocation is
/// marked, before the caller touches it, so the kernel backs it with 2 MiB pages where it can.
/// This is what glibc's own `glibc.malloc.hugetlb=1` tunable does, which can only be set from
/// the environment. Where the kernel's THP mode is `always`, `never`, or the platform is not
/// Linux/glibc, this is the system allocator and nothing else.
///
/// Install it with `#[global_allocator]` and call [`keep_freed_memory`] at start-up, as the
/// `ddpm` binary does.
pub struct HugePageHeap;

/// Allocations at least this large check whether the heap has grown.
const CHECK_AT: usize = 64 << 10;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod heap {
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// 2 MiB, the x86-64 and aarch64 (4 KiB granule) huge page.
    const HUGE: usize = 2 << 20;

    /// The end of the part of the heap already marked (0 before the first check).
    static MARKED: AtomicUsize = AtomicUsize::new(0);

    /// Marks from the first 2 MiB boundary at or above the current break on: what the heap
    /// holds now may have been touched already, what it grows by has not (and nothing below
    /// the heap is marked).
    pub(super) fn start_marking() {
        // SAFETY: `sbrk(0)` reads the current break; it changes nothing.
        let top = unsafe { libc::sbrk(0) } as usize;
        if top != usize::MAX {
            let _ =
                MARKED.compare_exchange(0, top.next_multiple_of(HUGE), Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// Marks the heap's growth since the last call.
    pub(super) fn mark_growth() {
        // SAFETY: `sbrk(0)` reads the current break; it changes nothing.
        let top = unsafe { libc::sbrk(0) } as usize;
        let marked = MARKED.load(Ordering::Relaxed);
        if top <= marked || top == usize::MAX {
            return;
        }
        // Several threads may get here at once; one marks the range, the others see it marked.
        if MARKED.compare_exchange(marked, top, Ordering::Relaxed, Ordering::Relaxed).is_err() {
            return;
        }
        // Without `start_marking`, the first call only records the break: the heap below it may
        // have been touched. Later calls continue where the previous one stopped, rounded down
        // to a 2 MiB boundary (its last, partial huge page is marked again), which stays inside
        // the heap: the first mark is a boundary at or above the heap's start.
        if marked == 0 {
            MARKED.store(top.next_multiple_of(HUGE), Ordering::Relaxed);
            return;
        }
        let start = marked & !(HUGE - 1);
        if top > start {
            // SAFETY: [start, top) lies inside the heap (between an earlier break and the
            // current one), which the heap only ever grows, since `keep_freed_memory` stops
            // trimming; MADV_HUGEPAGE changes how the kernel backs the pages, not their
            // contents. A failure (e.g. no THP support) leaves the pages as they were.
            unsafe { libc::madvise(start as *mut libc::c_void, top - start, libc::MADV_HUGEPAGE) };
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod heap {
    pub(super) fn start_marking() {}
    pub(super) fn mark_growth() {}
}

// SAFETY: every block comes from `System` and goes back to it with the same layout; the
// marking only advises the kernel about pages of the heap.
unsafe impl GlobalAlloc for HugePageHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `layout`, passed on.
        let p = unsafe { System.alloc(layout) };
        if layout.size() >= CHECK_AT {
            heap::mark_growth();
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if layout.size() >= CHECK_AT {
            heap::mark_growth();
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with this layout (every block here does).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as `dealloc`, and the caller's contract for `new_size`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if new_size >= CHECK_AT {
            heap::mark_growth();
        }
        p
    }
}
