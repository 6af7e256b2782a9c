//! Circuit breaker with resilience4j's semantics: CLOSED, OPEN, HALF_OPEN plus DISABLED, FORCED_OPEN and
//! METRICS_ONLY; a count- or time-based sliding window with O(1) aggregates; failure-rate and slow-call-rate
//! thresholds; `minimum_calls`; a fixed number of half-open trial calls with an optional maximum wait; an open
//! duration with optional exponential backoff and a cap; automatic or lazy OPEN -> HALF_OPEN.
//!
//! # Clock
//!
//! Every method takes `now_ns`, monotonic nanoseconds chosen by the caller, so tests script time and the
//! bindings read the clock once per call.
//!
//! # Concurrency
//!
//! The state lives in one `AtomicU64` word, `epoch << 3 | state`. [`Breaker::try_acquire`] in CLOSED is one
//! atomic load; recording a success in CLOSED is an index `fetch_add` and a slot swap (count window; a load
//! when the slot already holds that outcome) or a few `fetch_add`s (time window), then the rate check on relaxed
//! loads (a division only when there are failures or slow calls). No lock is held while the guarded call
//! runs: the caller only holds a [`Permit`] value. Transitions (and the time window's once-a-second bucket
//! rotation) take a short mutex and re-check the state word, so two threads never both open the breaker.
//!
//! A permit carries the epoch it was issued in; an outcome that arrives after a transition is not recorded into
//! the new state's window. (A record that checked its epoch just before a concurrent transition may still land in
//! the old window as it is being reset; the window is then off by that one call, never by more.)
//!
//! HALF_OPEN's accounting is exact instead, since a trial lost or counted twice could leave the breaker
//! half-open for good (with `half_open_max_wait_ns = 0` nothing else ends it). The trial permits taken live in
//! one word with the epoch they belong to, `epoch << 32 | issued`, so a permit is taken by a compare-and-swap
//! that fails across any transition, never from a later epoch's fresh count. Trial outcomes and give-backs take
//! the transition lock (at most `half_open_calls` of them an epoch), check the permit's epoch under it, and count
//! only while trials are outstanding: a stale permit is ignored, and a token redeemed twice can neither wrap the
//! count nor complete more trials than were taken.
//!
//! # Transitions
//!
//! Every transition increments [`Metrics::transitions`] and is queued; the caller drains the queue with
//! [`Breaker::take_transitions`] (cheaply polled with [`Breaker::has_transitions`]) to run callbacks and log,
//! whichever method or thread caused it (a state read can move OPEN -> HALF_OPEN with `auto_half_open`).
//!
//! # Errors
//!
//! [`Breaker::new`] returns [`CoreError::Config`] naming the field for an out-of-range configuration. Nothing
//! else fails.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::CoreError;

const NS_PER_S: u64 = 1_000_000_000;
/// Transitions kept for [`Breaker::take_transitions`]; older ones are dropped (and counted) if nobody drains.
const QUEUE_CAP: usize = 1024;
/// Largest count window (calls) and time window (seconds).
pub const MAX_COUNT_WINDOW: u32 = 1 << 20;
pub const MAX_TIME_WINDOW: u32 = 3600;

/// Test seam (feature `test-hooks`, on only for this crate's tests): a closure run at points inside the half-open
/// protocol, on the thread that reaches them, so that a test scripts the interleavings that threads produce (it
/// may call the breaker itself; the hook is not re-entered). Without the feature the points compile to nothing.
#[cfg(feature = "test-hooks")]
pub mod hooks {
    use std::cell::RefCell;

    /// Where the hook runs.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Point {
        /// `try_acquire` in HALF_OPEN has read the trial count and is about to take one.
        HalfOpenIssue,
        /// An outcome (or `on_ignored`) of a half-open permit is about to be counted.
        HalfOpenOutcome,
    }

    type Hook = Box<dyn FnMut(Point)>;

    thread_local! {
        static HOOK: RefCell<Option<Hook>> = const { RefCell::new(None) };
    }

    /// Runs `hook` at every point this thread reaches until [`clear`].
    pub fn set(hook: impl FnMut(Point) + 'static) {
        HOOK.set(Some(Box::new(hook)));
    }

    pub fn clear() {
        HOOK.set(None);
    }

    pub(crate) fn at(point: Point) {
        // Taken out while it runs, so that the breaker calls it makes do not re-enter it.
        if let Some(mut hook) = HOOK.take() {
            hook(point);
            HOOK.with_borrow_mut(|h| {
                if h.is_none() {
                    *h = Some(hook);
                }
            });
        }
    }
}

#[cfg(not(feature = "test-hooks"))]
mod hooks {
    #[derive(Clone, Copy)]
    pub(crate) enum Point {
        HalfOpenIssue,
        HalfOpenOutcome,
    }

    #[inline(always)]
    pub(crate) fn at(_: Point) {}
}

use hooks::Point;

/// The breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum State {
    /// Calls pass and are recorded; rates over the thresholds open the breaker.
    Closed = 0,
    /// Calls are refused until the open duration has passed.
    Open = 1,
    /// `half_open_calls` trial calls pass; their outcome closes or re-opens the breaker.
    HalfOpen = 2,
    /// Calls pass and nothing is recorded.
    Disabled = 3,
    /// Calls are refused until another manual transition.
    ForcedOpen = 4,
    /// Calls pass and are recorded, the breaker never transitions by itself.
    MetricsOnly = 5,
}

impl State {
    fn from_bits(bits: u64) -> Self {
        match bits & 7 {
            0 => Self::Closed,
            1 => Self::Open,
            2 => Self::HalfOpen,
            3 => Self::Disabled,
            4 => Self::ForcedOpen,
            _ => Self::MetricsOnly,
        }
    }

    /// The lower-case name used in Python and in logs (`"half_open"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
            Self::Disabled => "disabled",
            Self::ForcedOpen => "forced_open",
            Self::MetricsOnly => "metrics_only",
        }
    }
}

/// How the sliding window is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    /// The last `window_size` calls.
    Count,
    /// The calls of the last `window_size` seconds, in 1-second buckets.
    Time,
}

/// Configuration; durations in nanoseconds, rates in `(0, 1]`.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    pub window: WindowKind,
    /// Calls (count window) or seconds (time window).
    pub window_size: u32,
    /// Calls in the window before rates are evaluated (capped at `window_size` for a count window).
    pub minimum_calls: u32,
    pub failure_rate: f64,
    /// A call that lasts at least this long is slow.
    pub slow_call_ns: u64,
    pub slow_call_rate: f64,
    /// Time spent OPEN before HALF_OPEN, the first time.
    pub open_ns: u64,
    /// Each consecutive re-open multiplies the open duration by this (1 = constant).
    pub open_backoff: f64,
    pub open_max_ns: u64,
    /// Trial calls permitted in HALF_OPEN.
    pub half_open_calls: u32,
    /// 0 = wait for the trial calls; otherwise re-open if they have not all completed in this time.
    pub half_open_max_wait_ns: u64,
    /// Report (and take) OPEN -> HALF_OPEN at the deadline on any method, not only on the next call.
    pub auto_half_open: bool,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            window: WindowKind::Count,
            window_size: 100,
            minimum_calls: 100,
            failure_rate: 0.5,
            slow_call_ns: 60 * NS_PER_S,
            slow_call_rate: 1.0,
            open_ns: 60 * NS_PER_S,
            open_backoff: 1.0,
            open_max_ns: 600 * NS_PER_S,
            half_open_calls: 10,
            half_open_max_wait_ns: 0,
            auto_half_open: false,
        }
    }
}

fn config_error(field: &'static str, reason: String) -> CoreError {
    CoreError::Config { field, reason }
}

impl BreakerConfig {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), CoreError> {
        let max = match self.window {
            WindowKind::Count => MAX_COUNT_WINDOW,
            WindowKind::Time => MAX_TIME_WINDOW,
        };
        if self.window_size == 0 || self.window_size > max {
            return Err(config_error(
                "window_size",
                format!("must be in [1, {max}] (got {})", self.window_size),
            ));
        }
        if self.minimum_calls == 0 {
            return Err(config_error("minimum_calls", "must be >= 1 (got 0)".into()));
        }
        for (field, rate) in [
            ("failure_rate", self.failure_rate),
            ("slow_call_rate", self.slow_call_rate),
        ] {
            if !(rate > 0.0 && rate <= 1.0) {
                return Err(config_error(
                    field,
                    format!("must be in (0, 1] (got {rate})"),
                ));
            }
        }
        if self.slow_call_ns == 0 {
            return Err(config_error("slow_call_ns", "must be > 0".into()));
        }
        if self.open_ns == 0 {
            return Err(config_error("open_ns", "must be > 0".into()));
        }
        if !(self.open_backoff >= 1.0 && self.open_backoff.is_finite()) {
            return Err(config_error(
                "open_backoff",
                format!("must be a finite number >= 1 (got {})", self.open_backoff),
            ));
        }
        if self.open_max_ns < self.open_ns {
            return Err(config_error(
                "open_max_ns",
                format!(
                    "must be >= open_ns (got {} < {})",
                    self.open_max_ns, self.open_ns
                ),
            ));
        }
        if self.half_open_calls == 0 {
            return Err(config_error(
                "half_open_calls",
                "must be >= 1 (got 0)".into(),
            ));
        }
        Ok(())
    }

    fn effective_minimum(&self) -> u64 {
        match self.window {
            WindowKind::Count => u64::from(self.minimum_calls.min(self.window_size)),
            WindowKind::Time => u64::from(self.minimum_calls),
        }
    }
}

/// What a permitted call must report back (exactly once) with `on_success`, `on_failure` or `on_ignored`.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a permit must be reported back with on_success, on_failure or on_ignored"]
pub struct Permit {
    epoch: u64,
    state: State,
}

impl Permit {
    /// The state the call was permitted in.
    pub fn state(&self) -> State {
        self.state
    }

    /// The permit as a number, for bindings that must hand it through another language; redeem it once with
    /// [`Permit::from_token`].
    pub fn into_token(self) -> u64 {
        (self.epoch << 3) | self.state as u64
    }

    /// The permit that [`Permit::into_token`] made; the caller redeems each token once (a [`Permit`] itself is
    /// moved into the call that reports it). A forged or twice-redeemed token can only record an outcome the
    /// breaker did not permit: it cannot corrupt memory, and in HALF_OPEN it never gives back a trial permit that
    /// was not taken nor completes more trials than were taken (though it may complete a running trial's place).
    pub fn from_token(token: u64) -> Self {
        Self {
            epoch: token >> 3,
            state: State::from_bits(token),
        }
    }
}

/// A call the breaker did not permit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub state: State,
    /// Time until OPEN ends: 0 in HALF_OPEN (all trial permits taken), `u64::MAX` in FORCED_OPEN.
    pub remaining_ns: u64,
}

/// One state change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: State,
    pub to: State,
    pub at_ns: u64,
}

/// A snapshot of the breaker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Metrics {
    pub state: State,
    /// Failed / calls in the window (in HALF_OPEN: over the completed trial calls); -1 below the minimum.
    pub failure_rate: f64,
    /// Slow / calls, same rules.
    pub slow_call_rate: f64,
    /// Calls in the window.
    pub calls: u64,
    pub failed: u64,
    pub slow: u64,
    pub slow_failed: u64,
    /// Calls refused since creation (or the last `reset`).
    pub not_permitted: u64,
    /// Transitions since creation.
    pub transitions: u64,
    /// Time left OPEN (0 unless OPEN; `u64::MAX` when FORCED_OPEN).
    pub open_remaining_ns: u64,
}

/// `Breaker::ho`: the half-open epoch (low 32 bits of the state word's epoch) and the trial permits taken in it.
const HO_ISSUED: u64 = u32::MAX as u64;

fn ho_word(epoch: u64, issued: u64) -> u64 {
    (epoch << 32) | issued
}

/// Whether a `ho` word belongs to `epoch`. The tag is the epoch's low 32 bits: a compare-and-swap could succeed
/// across an epoch change only after 2^32 transitions between its load and its swap.
fn ho_of(ho: u64, epoch: u64) -> bool {
    ho >> 32 == epoch & u64::from(u32::MAX)
}

const REC: u8 = 1;
const FAIL: u8 = 2;
const SLOW: u8 = 4;

/// Window aggregates; updated with wrapping adds and subtracts so that a racing reset nets out, read clamped.
#[derive(Debug, Default)]
struct Totals {
    calls: AtomicU64,
    failed: AtomicU64,
    slow: AtomicU64,
    slow_failed: AtomicU64,
}

impl Totals {
    #[inline]
    fn add(&self, outcome: u8, sign: u64) {
        // sign is 1 (add) or u64::MAX (subtract, wrapping)
        if outcome & REC != 0 {
            self.calls.fetch_add(sign, Ordering::Relaxed);
        }
        if outcome & FAIL != 0 {
            self.failed.fetch_add(sign, Ordering::Relaxed);
        }
        if outcome & SLOW != 0 {
            self.slow.fetch_add(sign, Ordering::Relaxed);
            if outcome & FAIL != 0 {
                self.slow_failed.fetch_add(sign, Ordering::Relaxed);
            }
        }
    }

    #[inline]
    fn read(&self) -> (u64, u64, u64, u64) {
        let clamp = |a: &AtomicU64| {
            let v = a.load(Ordering::Relaxed);
            if v > u64::MAX / 2 {
                0
            } else {
                v
            }
        };
        (
            clamp(&self.calls),
            clamp(&self.failed),
            clamp(&self.slow),
            clamp(&self.slow_failed),
        )
    }

    fn clear(&self) {
        for a in [&self.calls, &self.failed, &self.slow, &self.slow_failed] {
            a.store(0, Ordering::Relaxed);
        }
    }
}

#[derive(Debug, Default)]
struct Bucket {
    second: AtomicU64,
    totals: Totals,
}

#[derive(Debug)]
enum Window {
    /// Ring of outcomes; `next` counts records ever made (the slot is `next % len`).
    Count {
        slots: Box<[AtomicU8]>,
        next: AtomicU64,
    },
    /// One bucket per second; `head` is the latest second rotated in (under `rotate`).
    Time {
        buckets: Box<[Bucket]>,
        head: AtomicU64,
        rotate: Mutex<()>,
    },
}

#[derive(Debug)]
struct SlidingWindow {
    window: Window,
    totals: Totals,
}

impl SlidingWindow {
    fn new(kind: WindowKind, size: u32) -> Self {
        let window = match kind {
            WindowKind::Count => Window::Count {
                slots: (0..size).map(|_| AtomicU8::new(0)).collect(),
                next: AtomicU64::new(0),
            },
            WindowKind::Time => Window::Time {
                buckets: (0..size).map(|_| Bucket::default()).collect(),
                head: AtomicU64::new(0),
                rotate: Mutex::new(()),
            },
        };
        Self {
            window,
            totals: Totals::default(),
        }
    }

    #[inline]
    fn record(&self, outcome: u8, now_ns: u64) {
        match &self.window {
            Window::Count { slots, next } => {
                let i = next.fetch_add(1, Ordering::Relaxed) % slots.len() as u64;
                let slot = &slots[i as usize];
                // The same outcome again (a success after a success, mostly) changes nothing: a load, not a swap.
                if slot.load(Ordering::Relaxed) == outcome {
                    return;
                }
                let old = slot.swap(outcome, Ordering::Relaxed);
                if old != outcome {
                    self.totals.add(old, u64::MAX);
                    self.totals.add(outcome, 1);
                }
            }
            Window::Time { buckets, head, .. } => {
                let second = now_ns / NS_PER_S;
                let mut h = head.load(Ordering::Acquire);
                if second > h {
                    self.advance(second);
                    h = second;
                }
                // A late clock reading lands in the newest bucket.
                let bucket = &buckets[(h % buckets.len() as u64) as usize];
                bucket.totals.add(outcome, 1);
                self.totals.add(outcome, 1);
            }
        }
    }

    /// Expires the buckets that left the time window by `now_ns`; nothing for a count window.
    fn advance_to(&self, now_ns: u64) {
        if let Window::Time { head, .. } = &self.window {
            let second = now_ns / NS_PER_S;
            if second > head.load(Ordering::Acquire) {
                self.advance(second);
            }
        }
    }

    #[cold]
    fn advance(&self, second: u64) {
        let Window::Time {
            buckets,
            head,
            rotate,
        } = &self.window
        else {
            return;
        };
        let _g = rotate.lock().unwrap_or_else(PoisonError::into_inner);
        if second <= head.load(Ordering::Acquire) {
            return;
        }
        let n = buckets.len() as u64;
        for b in &**buckets {
            let s = b.second.load(Ordering::Relaxed);
            if s + n <= second {
                Self::drain(b, &self.totals);
            }
        }
        let b = &buckets[(second % n) as usize];
        if b.second.load(Ordering::Relaxed) != second {
            Self::drain(b, &self.totals);
            b.second.store(second, Ordering::Relaxed);
        }
        head.store(second, Ordering::Release);
    }

    fn drain(b: &Bucket, totals: &Totals) {
        for (from, to) in [
            (&b.totals.calls, &totals.calls),
            (&b.totals.failed, &totals.failed),
            (&b.totals.slow, &totals.slow),
            (&b.totals.slow_failed, &totals.slow_failed),
        ] {
            let v = from.swap(0, Ordering::Relaxed);
            to.fetch_sub(v, Ordering::Relaxed);
        }
    }

    fn clear(&self) {
        match &self.window {
            Window::Count { slots, next } => {
                for s in &**slots {
                    s.store(0, Ordering::Relaxed);
                }
                next.store(0, Ordering::Relaxed);
            }
            Window::Time {
                buckets, rotate, ..
            } => {
                let _g = rotate.lock().unwrap_or_else(PoisonError::into_inner);
                for b in &**buckets {
                    b.totals.clear();
                }
            }
        }
        self.totals.clear();
    }
}

/// Failure and slow rates of `(calls, failed, slow)` against the thresholds.
fn over_threshold(cfg: &BreakerConfig, calls: u64, failed: u64, slow: u64) -> bool {
    if calls == 0 {
        return false;
    }
    // Thresholds are > 0, so a count of 0 is under them: no division on the all-successes path.
    let calls = calls as f64;
    (failed > 0 && failed as f64 / calls >= cfg.failure_rate)
        || (slow > 0 && slow as f64 / calls >= cfg.slow_call_rate)
}

/// The circuit breaker; share it by reference (`Arc`) between threads.
#[derive(Debug)]
pub struct Breaker {
    cfg: BreakerConfig,
    min_calls: u64,
    /// `epoch << 3 | state`; the epoch grows on every transition.
    word: AtomicU64,
    window: SlidingWindow,
    /// OPEN: when it ends. HALF_OPEN: when it began.
    deadline: AtomicU64,
    consecutive_opens: AtomicU32,
    /// `epoch << 32 | issued`: trial permits taken in the half-open epoch (see the module docs); set before the
    /// state word on entering HALF_OPEN, changed by acquirers' compare-and-swap and (down) under `lock`.
    ho: AtomicU64,
    /// Trial calls completed, failed and slow in the half-open epoch: written only under `lock`.
    ho_done: AtomicU32,
    ho_failed: AtomicU32,
    ho_slow: AtomicU32,
    not_permitted: AtomicU64,
    transitions: AtomicU64,
    pending: AtomicBool,
    /// Held for every transition; also holds the queue of transitions not yet taken.
    lock: Mutex<VecDeque<Transition>>,
}

impl Breaker {
    pub fn new(cfg: BreakerConfig) -> Result<Self, CoreError> {
        cfg.validate()?;
        Ok(Self {
            min_calls: cfg.effective_minimum(),
            window: SlidingWindow::new(cfg.window, cfg.window_size),
            cfg,
            word: AtomicU64::new(State::Closed as u64),
            deadline: AtomicU64::new(0),
            consecutive_opens: AtomicU32::new(0),
            ho: AtomicU64::new(0),
            ho_done: AtomicU32::new(0),
            ho_failed: AtomicU32::new(0),
            ho_slow: AtomicU32::new(0),
            not_permitted: AtomicU64::new(0),
            transitions: AtomicU64::new(0),
            pending: AtomicBool::new(false),
            lock: Mutex::new(VecDeque::new()),
        })
    }

    pub fn config(&self) -> &BreakerConfig {
        &self.cfg
    }

    /// Asks to make a call at `now_ns`.
    #[inline]
    pub fn try_acquire(&self, now_ns: u64) -> Result<Permit, Refused> {
        let word = self.word.load(Ordering::Acquire);
        let state = State::from_bits(word);
        match state {
            State::Closed | State::Disabled | State::MetricsOnly => Ok(Permit {
                epoch: word >> 3,
                state,
            }),
            _ => self.acquire_slow(word, now_ns),
        }
    }

    #[cold]
    fn acquire_slow(&self, mut word: u64, now_ns: u64) -> Result<Permit, Refused> {
        loop {
            let state = State::from_bits(word);
            match state {
                State::Closed | State::Disabled | State::MetricsOnly => {
                    return Ok(Permit {
                        epoch: word >> 3,
                        state,
                    });
                }
                State::ForcedOpen => return Err(self.refuse(state, u64::MAX)),
                State::Open => {
                    let until = self.deadline.load(Ordering::Acquire);
                    if now_ns < until {
                        return Err(self.refuse(state, until - now_ns));
                    }
                    self.transition_if(word, State::HalfOpen, now_ns);
                }
                State::HalfOpen => {
                    if self.half_open_expired(now_ns) {
                        self.transition_if(word, State::Open, now_ns);
                    } else if let Some(permit) = self.take_trial(word)? {
                        return Ok(permit);
                    }
                }
            }
            word = self.word.load(Ordering::Acquire);
        }
    }

    /// A trial permit of the half-open epoch of `word`: None when that epoch has ended (the caller reloads the
    /// state word), refused when its trials are all taken.
    fn take_trial(&self, word: u64) -> Result<Option<Permit>, Refused> {
        let epoch = word >> 3;
        // Entering HALF_OPEN stores `ho` before the state word, so it is this epoch's or a later one's.
        let mut ho = self.ho.load(Ordering::Acquire);
        hooks::at(Point::HalfOpenIssue);
        loop {
            if !ho_of(ho, epoch) {
                return Ok(None);
            }
            if ho & HO_ISSUED >= u64::from(self.cfg.half_open_calls) {
                // All taken, unless the epoch ended meanwhile (closed, say): then the caller looks again.
                if self.word.load(Ordering::Acquire) != word {
                    return Ok(None);
                }
                return Err(self.refuse(State::HalfOpen, 0));
            }
            // Fails if a transition replaced the word meanwhile, even one that reset the count to this value.
            match self
                .ho
                .compare_exchange_weak(ho, ho + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(now) => ho = now,
            }
        }
        // Taken in this epoch; if it ended meanwhile, the permit is stale and the count it took is that epoch's.
        Ok(
            (self.word.load(Ordering::Acquire) == word).then_some(Permit {
                epoch,
                state: State::HalfOpen,
            }),
        )
    }

    fn refuse(&self, state: State, remaining_ns: u64) -> Refused {
        self.not_permitted.fetch_add(1, Ordering::Relaxed);
        Refused {
            state,
            remaining_ns,
        }
    }

    fn half_open_expired(&self, now_ns: u64) -> bool {
        let wait = self.cfg.half_open_max_wait_ns;
        wait > 0 && now_ns >= self.deadline.load(Ordering::Acquire).saturating_add(wait)
    }

    /// Reports a call that succeeded after `duration_ns`.
    #[inline]
    pub fn on_success(&self, permit: Permit, duration_ns: u64, now_ns: u64) {
        let slow = if duration_ns >= self.cfg.slow_call_ns {
            SLOW
        } else {
            0
        };
        self.record(permit, REC | slow, now_ns);
    }

    /// Reports a call that failed after `duration_ns`.
    pub fn on_failure(&self, permit: Permit, duration_ns: u64, now_ns: u64) {
        let slow = if duration_ns >= self.cfg.slow_call_ns {
            SLOW
        } else {
            0
        };
        self.record(permit, REC | FAIL | slow, now_ns);
    }

    /// Reports a call whose outcome does not count (an ignored exception, a cancellation): a half-open trial
    /// permit is given back.
    pub fn on_ignored(&self, permit: Permit, _now_ns: u64) {
        if permit.state != State::HalfOpen {
            return;
        }
        hooks::at(Point::HalfOpenOutcome);
        let _q = self.queue();
        if self.word.load(Ordering::Acquire) != (permit.epoch << 3) | State::HalfOpen as u64 {
            return;
        }
        // Under the lock the epoch is current and `done` still; acquirers may raise the count meanwhile.
        let done = u64::from(self.ho_done.load(Ordering::Relaxed));
        let mut ho = self.ho.load(Ordering::Acquire);
        while ho & HO_ISSUED > done {
            match self
                .ho
                .compare_exchange_weak(ho, ho - 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(now) => ho = now,
            }
        }
        // Nothing outstanding: a token given back twice.
    }

    #[inline]
    fn current(&self, epoch: u64) -> bool {
        self.word.load(Ordering::Acquire) >> 3 == epoch
    }

    #[inline]
    fn record(&self, permit: Permit, outcome: u8, now_ns: u64) {
        match permit.state {
            State::Closed | State::MetricsOnly => {
                if !self.current(permit.epoch) {
                    return;
                }
                self.window.record(outcome, now_ns);
                if permit.state == State::Closed {
                    let (calls, failed, slow, _) = self.window.totals.read();
                    if calls >= self.min_calls && over_threshold(&self.cfg, calls, failed, slow) {
                        self.transition_if(
                            (permit.epoch << 3) | State::Closed as u64,
                            State::Open,
                            now_ns,
                        );
                    }
                }
            }
            State::HalfOpen => self.record_half_open(permit, outcome, now_ns),
            State::Disabled | State::Open | State::ForcedOpen => {}
        }
    }

    /// A trial call's outcome; the last one closes or re-opens the breaker. Counted under the transition lock,
    /// so that no transition comes between the epoch check and the count.
    #[inline(never)]
    fn record_half_open(&self, permit: Permit, outcome: u8, now_ns: u64) {
        if !self.current(permit.epoch) {
            return;
        }
        hooks::at(Point::HalfOpenOutcome);
        let mut q = self.queue();
        let word = (permit.epoch << 3) | State::HalfOpen as u64;
        if self.word.load(Ordering::Acquire) != word {
            return;
        }
        let done = self.ho_done.load(Ordering::Relaxed);
        // Only a trial taken and not yet completed counts: a token redeemed twice completes nothing more.
        if u64::from(done) >= self.ho.load(Ordering::Acquire) & HO_ISSUED {
            return;
        }
        let failed = self.ho_failed.load(Ordering::Relaxed) + u32::from(outcome & FAIL != 0);
        let slow = self.ho_slow.load(Ordering::Relaxed) + u32::from(outcome & SLOW != 0);
        let done = done + 1;
        self.ho_failed.store(failed, Ordering::Relaxed);
        self.ho_slow.store(slow, Ordering::Relaxed);
        self.ho_done.store(done, Ordering::Relaxed);
        if done == self.cfg.half_open_calls {
            let to = if over_threshold(
                &self.cfg,
                u64::from(done),
                u64::from(failed),
                u64::from(slow),
            ) {
                State::Open
            } else {
                State::Closed
            };
            self.enter(&mut q, word, to, now_ns);
        }
    }

    fn queue(&self) -> MutexGuard<'_, VecDeque<Transition>> {
        self.lock.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Moves to `to` if the state word is still `expected`; returns whether it did.
    #[cold]
    fn transition_if(&self, expected: u64, to: State, now_ns: u64) -> bool {
        let mut q = self.queue();
        if self.word.load(Ordering::Acquire) != expected {
            return false;
        }
        self.enter(&mut q, expected, to, now_ns);
        true
    }

    /// With the lock held: sets up `to` and publishes the new word.
    fn enter(&self, q: &mut VecDeque<Transition>, word: u64, to: State, now_ns: u64) {
        let from = State::from_bits(word);
        let epoch = (word >> 3) + 1;
        match to {
            State::Open => {
                let k = if from == State::HalfOpen {
                    self.consecutive_opens.load(Ordering::Relaxed) + 1
                } else {
                    1
                };
                self.consecutive_opens.store(k, Ordering::Relaxed);
                let factor = self
                    .cfg
                    .open_backoff
                    .powi(k.saturating_sub(1).min(i32::MAX as u32) as i32);
                let open =
                    (self.cfg.open_ns as f64 * factor).min(self.cfg.open_max_ns as f64) as u64;
                self.deadline
                    .store(now_ns.saturating_add(open), Ordering::Release);
            }
            State::HalfOpen => {
                // Released by the state word's store below: whoever sees the new epoch sees its fresh count.
                self.ho.store(ho_word(epoch, 0), Ordering::Release);
                self.ho_done.store(0, Ordering::Relaxed);
                self.ho_failed.store(0, Ordering::Relaxed);
                self.ho_slow.store(0, Ordering::Relaxed);
                self.deadline.store(now_ns, Ordering::Release);
            }
            State::Closed | State::MetricsOnly => {
                self.consecutive_opens.store(0, Ordering::Relaxed);
                self.window.clear();
            }
            State::Disabled | State::ForcedOpen => {}
        }
        self.word.store((epoch << 3) | to as u64, Ordering::Release);
        if from != to {
            self.transitions.fetch_add(1, Ordering::Relaxed);
            if q.len() == QUEUE_CAP {
                q.pop_front();
            }
            q.push_back(Transition {
                from,
                to,
                at_ns: now_ns,
            });
            self.pending.store(true, Ordering::Release);
        }
    }

    fn manual(&self, to: State, now_ns: u64) {
        let mut q = self.queue();
        let word = self.word.load(Ordering::Acquire);
        self.enter(&mut q, word, to, now_ns);
    }

    /// The state at `now_ns`; takes OPEN -> HALF_OPEN at the deadline when `auto_half_open`, and HALF_OPEN -> OPEN
    /// once `half_open_max_wait` has passed.
    pub fn state(&self, now_ns: u64) -> State {
        loop {
            let word = self.word.load(Ordering::Acquire);
            let state = State::from_bits(word);
            let to = match state {
                State::Open
                    if self.cfg.auto_half_open
                        && now_ns >= self.deadline.load(Ordering::Acquire) =>
                {
                    State::HalfOpen
                }
                State::HalfOpen if self.half_open_expired(now_ns) => State::Open,
                _ => return state,
            };
            self.transition_if(word, to, now_ns);
        }
    }

    /// FORCED_OPEN: refuse every call until another manual transition.
    pub fn force_open(&self, now_ns: u64) {
        self.manual(State::ForcedOpen, now_ns);
    }

    /// DISABLED: permit every call and record nothing.
    pub fn disable(&self, now_ns: u64) {
        self.manual(State::Disabled, now_ns);
    }

    /// METRICS_ONLY: permit and record every call, never transition by itself (the window starts empty).
    pub fn metrics_only(&self, now_ns: u64) {
        self.manual(State::MetricsOnly, now_ns);
    }

    /// CLOSED with an empty window and the backoff reset.
    pub fn close(&self, now_ns: u64) {
        self.manual(State::Closed, now_ns);
    }

    /// As [`close`](Self::close), and the not-permitted count back to 0.
    pub fn reset(&self, now_ns: u64) {
        self.manual(State::Closed, now_ns);
        self.not_permitted.store(0, Ordering::Relaxed);
    }

    /// Whether transitions wait in the queue (one relaxed load).
    #[inline]
    pub fn has_transitions(&self) -> bool {
        self.pending.load(Ordering::Relaxed)
    }

    /// Takes the queued transitions, oldest first.
    pub fn take_transitions(&self) -> Vec<Transition> {
        let mut q = self.queue();
        self.pending.store(false, Ordering::Release);
        q.drain(..).collect()
    }

    pub fn metrics(&self, now_ns: u64) -> Metrics {
        let state = self.state(now_ns);
        self.window.advance_to(now_ns);
        let (calls, failed, slow, slow_failed) = if state == State::HalfOpen {
            let (f, s) = (
                self.ho_failed.load(Ordering::Relaxed),
                self.ho_slow.load(Ordering::Relaxed),
            );
            (
                u64::from(self.ho_done.load(Ordering::Relaxed)),
                u64::from(f),
                u64::from(s),
                0,
            )
        } else {
            self.window.totals.read()
        };
        let minimum = if state == State::HalfOpen {
            u64::from(self.cfg.half_open_calls)
        } else {
            self.min_calls
        };
        let rate = |n: u64| {
            if calls >= minimum && calls > 0 {
                n as f64 / calls as f64
            } else {
                -1.0
            }
        };
        let open_remaining_ns = match state {
            State::Open => self.deadline.load(Ordering::Acquire).saturating_sub(now_ns),
            State::ForcedOpen => u64::MAX,
            _ => 0,
        };
        Metrics {
            state,
            failure_rate: rate(failed),
            slow_call_rate: rate(slow),
            calls,
            failed,
            slow,
            slow_failed,
            not_permitted: self.not_permitted.load(Ordering::Relaxed),
            transitions: self.transitions.load(Ordering::Relaxed),
            open_remaining_ns,
        }
    }
}
