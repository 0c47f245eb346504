//! Giving freed heap memory back to the OS after a burst of TURN-over-TCP connections
//! closed. glibc's allocator keeps freed chunks inside its arenas (the memory is reusable
//! by the process but stays resident), so after thousands of connections went away the
//! RSS would stay at its peak. When at least [`TRIM_AFTER`] connections closed since the
//! last trim, a task calls `malloc_trim(0)` (at most every [`TRIM_EVERY`], on a blocking
//! thread). Other allocators (musl) need nothing and the call is compiled out.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Closed connections that justify a trim.
pub(crate) const TRIM_AFTER: usize = 256;
/// How often the trim task looks.
pub(crate) const TRIM_EVERY: Duration = Duration::from_secs(5);

/// Counts closed connections since the last trim.
#[derive(Debug, Default)]
pub(crate) struct Trimmer {
    closed: AtomicUsize,
}

impl Trimmer {
    /// One more connection closed.
    pub(crate) fn closed(&self) {
        self.closed.fetch_add(1, Ordering::Relaxed);
    }

    /// Trims when enough connections closed since the last time; returns whether it did.
    pub(crate) async fn maybe_trim(&self) -> bool {
        if self.closed.load(Ordering::Relaxed) < TRIM_AFTER {
            return false;
        }
        self.closed.store(0, Ordering::Relaxed);
        let _ = tokio::task::spawn_blocking(release_free_memory).await;
        true
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_memory() {
    // SAFETY: malloc_trim only walks the allocator's own arenas under their locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_memory() {}
