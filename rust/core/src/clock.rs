//! A cheap monotonic clock for stamping events: `CLOCK_MONOTONIC_COARSE` costs a few nanoseconds (a vDSO read
//! without the TSC) at a resolution of a few milliseconds, which is all that linger deadlines, record TTLs and
//! oldest-event ages need. Stamping every `submit` with the precise clock would cost several times more.

/// Nanoseconds on the coarse monotonic clock.
#[inline]
pub fn coarse_ns() -> u64 {
    read(libc::CLOCK_MONOTONIC_COARSE)
}

/// Nanoseconds on the precise monotonic clock (same epoch as [`coarse_ns`]).
#[inline]
pub fn precise_ns() -> u64 {
    read(libc::CLOCK_MONOTONIC)
}

#[inline]
fn read(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; clock_gettime only writes into it.
    let rc = unsafe { libc::clock_gettime(clock, &raw mut ts) };
    debug_assert_eq!(rc, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    #[test]
    fn clocks_move_forward_together() {
        let a = super::coarse_ns();
        let b = super::precise_ns();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(super::coarse_ns() > a);
        // coarse lags precise by at most a tick (a few ms)
        assert!(b + 20_000_000 >= a);
    }
}
