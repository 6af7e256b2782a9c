//! Wake-up file descriptor: an eventfd the sender's event loop watches.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::CoreError;

use super::config::bad;

#[derive(Debug)]
pub(super) struct Waker {
    pub(super) fd: i32,
    armed: AtomicBool,
}

impl Waker {
    pub(super) fn new() -> Result<Self, CoreError> {
        // SAFETY: eventfd has no memory-safety preconditions; a negative result is handled.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(bad(
                "wakeup_fd",
                std::io::Error::last_os_error().to_string(),
            ));
        }
        Ok(Self {
            fd,
            armed: AtomicBool::new(true),
        })
    }

    /// Signals the sender once per drain: later signals are skipped until it re-arms by draining.
    pub(super) fn wake(&self) {
        if self.armed.swap(false, Ordering::AcqRel) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a valid u64 to our own eventfd; EAGAIN (counter full) is harmless.
            unsafe { libc::write(self.fd, (&raw const one).cast(), 8) };
        }
    }

    /// Clears the signal, then re-arms: in that order, a `wake` in between is skipped (the caller looks at
    /// what it would have signalled after draining), never swallowed by the read with the waker left disarmed.
    pub(super) fn drain(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads at most 8 bytes into a valid u64 from our own non-blocking eventfd.
        unsafe { libc::read(self.fd, (&raw mut value).cast(), 8) };
        self.armed.store(true, Ordering::SeqCst);
    }
}

impl Drop for Waker {
    fn drop(&mut self) {
        // SAFETY: the fd is ours and closed exactly once.
        unsafe { libc::close(self.fd) };
    }
}
