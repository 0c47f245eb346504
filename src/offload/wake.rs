//! Wakes the worker threads of offloading listeners when a server is evicted, so they
//! take the evicted server's sessions out of the kernel at once instead of at their next
//! 50 ms tick (offloaded datagrams no longer wake them).
//!
//! Each such worker registers an eventfd in its epoll set; [`evicted`] (called by
//! `ServerHandle::evict`) writes to every registered one. Without offloading listeners
//! the list is empty and `evicted` costs one uncontended lock.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, Weak};

static WAKERS: Mutex<Vec<Weak<OwnedFd>>> = Mutex::new(Vec::new());

/// A registered eventfd; unregistered when dropped.
pub struct Waker {
    fd: Arc<OwnedFd>,
}

impl Waker {
    /// A new non-blocking eventfd, registered.
    pub fn new() -> std::io::Result<Waker> {
        // SAFETY: plain syscall; the result is checked before use.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
        let mut all = WAKERS.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(&fd));
        Ok(Waker { fd })
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Clears the pending wakeups.
    pub fn drain(&self) {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into `v` from our own non-blocking eventfd.
        unsafe { libc::read(self.fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }
}

/// A server was evicted: wake every offloading worker.
pub fn evicted() {
    let all = WAKERS.lock().unwrap_or_else(|p| p.into_inner());
    if all.is_empty() {
        return;
    }
    let one = 1u64;
    for fd in all.iter().filter_map(Weak::upgrade) {
        // SAFETY: writes 8 bytes to a live eventfd; a full counter (EAGAIN) is fine.
        unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}
