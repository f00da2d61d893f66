//! Giving memory back to the system once large work is done.
//!
//! A flush, a history point, a render and a summary of 1,000 bots each
//! build megabytes that live a moment, between allocations that stay (the
//! store's view of each series, new label values, sketches). glibc's
//! malloc keeps such freed memory resident: measured with 1,000 bots
//! (`tests/api/many_bots.rs`), some 15 MB of the process's 78 MB was free
//! heap that `malloc_trim` gave back (mimalloc, tried as the global
//! allocator instead, kept more: 89 MB, peak 112 MB). Elsewhere these are
//! no-ops.

/// Large buffers (a render, a summary) are mapped and unmapped on their
/// own from the first byte past 128 KiB. glibc raises that threshold to
/// the size of any mapped block freed (up to 32 MiB), after which each new
/// render landed in the heap, where a smaller allocation after it pins
/// it. Setting the threshold once turns that adjustment off.
pub fn init() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's tuning; M_MMAP_THRESHOLD with
    // a value in its documented range (0 to 32 MiB on 64-bit).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Returns the free pages of every malloc arena to the system: after a
/// flush or history point that wrote (each builds the rows it sent).
/// Costs a walk of the heap's free lists, about a millisecond here.
pub fn give_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory malloc holds free.
    unsafe {
        libc::malloc_trim(0);
    }
}
