//! Process-wide allocator tuning for training.
//!
//! Every tensor operation allocates its output, and training reallocates the
//! same large buffers every step. glibc serves allocations above a dynamic
//! threshold with fresh `mmap`s and returns freed memory to the kernel, so each
//! step pays page faults and zero-filling for its activations again (about a
//! sixth of a SegNet-mini step here). Keeping large blocks in the heap makes
//! later steps reuse warm pages; the cost is that the process keeps its peak
//! memory instead of shrinking between steps.
#![allow(unsafe_code)]

/// Serve large blocks from the heap (no per-allocation mmap) and keep freed
/// memory for reuse. Call once, early, from a binary. A no-op off glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const MIB: libc::c_int = 1 << 20;
        // SAFETY: mallopt only adjusts allocator parameters; it is called before
        // any threads that allocate are started, and its arguments are valid
        // option codes with non-negative values.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * MIB);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1024 * MIB);
            libc::mallopt(libc::M_TOP_PAD, 256 * MIB);
        }
    }
}
