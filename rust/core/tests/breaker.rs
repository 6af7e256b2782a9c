//! The breaker against a scripted clock, case by case from resilience4j's documented behaviour; a proptest
//! state machine against a plain reference model; and threads whose counts add up.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};

use proptest::prelude::*;
use treasure_core::breaker::hooks::{self, Point};
use treasure_core::breaker::{
    Breaker, BreakerConfig, Permit, Refused, State, Transition, WindowKind,
};
use treasure_core::CoreError;

const S: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;

fn cfg() -> BreakerConfig {
    BreakerConfig {
        window: WindowKind::Count,
        window_size: 10,
        minimum_calls: 4,
        failure_rate: 0.5,
        slow_call_ns: S,
        slow_call_rate: 1.0,
        open_ns: 10 * S,
        open_backoff: 1.0,
        open_max_ns: 100 * S,
        half_open_calls: 2,
        half_open_max_wait_ns: 0,
        auto_half_open: false,
    }
}

fn ok(b: &Breaker, now: u64) {
    let p = b.try_acquire(now).expect("permitted");
    b.on_success(p, MS, now);
}

fn fail(b: &Breaker, now: u64) {
    let p = b.try_acquire(now).expect("permitted");
    b.on_failure(p, MS, now);
}

fn refused(b: &Breaker, now: u64) -> Refused {
    b.try_acquire(now).expect_err("refused")
}

fn states(ts: &[Transition]) -> Vec<(State, State)> {
    ts.iter().map(|t| (t.from, t.to)).collect()
}

#[test]
fn bad_config_names_the_field() {
    let cases: Vec<(&str, BreakerConfig)> = vec![
        (
            "window_size",
            BreakerConfig {
                window_size: 0,
                ..cfg()
            },
        ),
        (
            "window_size",
            BreakerConfig {
                window: WindowKind::Time,
                window_size: 3601,
                ..cfg()
            },
        ),
        (
            "minimum_calls",
            BreakerConfig {
                minimum_calls: 0,
                ..cfg()
            },
        ),
        (
            "failure_rate",
            BreakerConfig {
                failure_rate: 0.0,
                ..cfg()
            },
        ),
        (
            "failure_rate",
            BreakerConfig {
                failure_rate: 1.01,
                ..cfg()
            },
        ),
        (
            "failure_rate",
            BreakerConfig {
                failure_rate: f64::NAN,
                ..cfg()
            },
        ),
        (
            "slow_call_rate",
            BreakerConfig {
                slow_call_rate: -0.5,
                ..cfg()
            },
        ),
        (
            "slow_call_ns",
            BreakerConfig {
                slow_call_ns: 0,
                ..cfg()
            },
        ),
        (
            "open_ns",
            BreakerConfig {
                open_ns: 0,
                ..cfg()
            },
        ),
        (
            "open_backoff",
            BreakerConfig {
                open_backoff: 0.5,
                ..cfg()
            },
        ),
        (
            "open_max_ns",
            BreakerConfig {
                open_max_ns: S,
                ..cfg()
            },
        ),
        (
            "half_open_calls",
            BreakerConfig {
                half_open_calls: 0,
                ..cfg()
            },
        ),
    ];
    for (field, c) in cases {
        match Breaker::new(c) {
            Err(CoreError::Config { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: expected a config error, got {other:?}"),
        }
    }
    assert!(Breaker::new(BreakerConfig::default()).is_ok());
}

#[test]
fn rates_wait_for_minimum_calls() {
    let b = Breaker::new(cfg()).unwrap();
    for _ in 0..3 {
        fail(&b, 0);
    }
    // 3 failures out of 3 calls, but the minimum is 4
    assert_eq!(b.state(0), State::Closed);
    assert!(b.metrics(0).failure_rate < 0.0);
    ok(&b, 0); // 3/4 = 75% >= 50%: a success can complete the minimum and open it
    assert_eq!(b.state(0), State::Open);
    assert_eq!(
        states(&b.take_transitions()),
        vec![(State::Closed, State::Open)]
    );
}

#[test]
fn minimum_is_capped_by_the_count_window() {
    let b = Breaker::new(BreakerConfig {
        window_size: 2,
        minimum_calls: 100,
        ..cfg()
    })
    .unwrap();
    fail(&b, 0);
    assert_eq!(b.state(0), State::Closed);
    ok(&b, 0); // 1/2 = 50%
    assert_eq!(b.state(0), State::Open);
}

#[test]
fn below_the_threshold_stays_closed_and_old_calls_slide_out() {
    let b = Breaker::new(cfg()).unwrap();
    // f s s s: 25% < 50%
    fail(&b, 0);
    for _ in 0..3 {
        ok(&b, 0);
    }
    assert_eq!(b.state(0), State::Closed);
    let m = b.metrics(0);
    assert_eq!((m.calls, m.failed), (4, 1));
    assert!((m.failure_rate - 0.25).abs() < 1e-9);
    // fill the window of 10 with successes, then 5 failures: the first failure has slid out
    for _ in 0..6 {
        ok(&b, 0);
    }
    assert_eq!(b.metrics(0).failed, 1);
    ok(&b, 0); // pushes the failure out
    assert_eq!(b.metrics(0).failed, 0);
    for _ in 0..4 {
        fail(&b, 0);
    }
    assert_eq!(b.state(0), State::Closed); // 4/10
    fail(&b, 0); // 5/10
    assert_eq!(b.state(0), State::Open);
}

#[test]
fn slow_calls_open_it() {
    let b = Breaker::new(BreakerConfig {
        slow_call_rate: 0.5,
        ..cfg()
    })
    .unwrap();
    for _ in 0..2 {
        let p = b.try_acquire(0).unwrap();
        b.on_success(p, 2 * S, 0);
        let p = b.try_acquire(0).unwrap();
        b.on_success(p, S - 1, 0);
    }
    let m = b.metrics(0);
    assert_eq!((m.calls, m.slow, m.failed, m.state), (4, 2, 0, State::Open));
}

#[test]
fn open_refuses_with_the_remaining_time_then_half_open_on_the_next_call() {
    let b = Breaker::new(cfg()).unwrap();
    for _ in 0..4 {
        fail(&b, 0);
    }
    let r = refused(&b, 3 * S);
    assert_eq!(
        r,
        Refused {
            state: State::Open,
            remaining_ns: 7 * S
        }
    );
    // lazy: the state still reads OPEN after the deadline until a call comes
    assert_eq!(b.state(20 * S), State::Open);
    let p = b.try_acquire(20 * S).unwrap();
    assert_eq!(p.state(), State::HalfOpen);
    assert_eq!(b.state(20 * S), State::HalfOpen);
    b.on_ignored(p, 20 * S);
    let m = b.metrics(20 * S);
    assert_eq!((m.not_permitted, m.transitions), (1, 2));
}

#[test]
fn auto_half_open_reports_it_at_the_deadline() {
    let b = Breaker::new(BreakerConfig {
        auto_half_open: true,
        ..cfg()
    })
    .unwrap();
    for _ in 0..4 {
        fail(&b, 0);
    }
    assert_eq!(b.state(10 * S - 1), State::Open);
    assert_eq!(b.state(10 * S), State::HalfOpen);
    let ts = b.take_transitions();
    assert_eq!(
        states(&ts),
        vec![(State::Closed, State::Open), (State::Open, State::HalfOpen)]
    );
    assert_eq!(ts[1].at_ns, 10 * S);
    assert!(!b.has_transitions());
}

fn opened(c: BreakerConfig) -> Breaker {
    let b = Breaker::new(c).unwrap();
    for _ in 0..4 {
        fail(&b, 0);
    }
    assert_eq!(b.state(0), State::Open);
    b
}

#[test]
fn half_open_permits_exactly_the_trial_calls_and_closes() {
    let b = opened(cfg());
    let p1 = b.try_acquire(10 * S).unwrap();
    let p2 = b.try_acquire(10 * S).unwrap();
    assert_eq!(
        refused(&b, 10 * S),
        Refused {
            state: State::HalfOpen,
            remaining_ns: 0
        }
    );
    b.on_success(p1, MS, 10 * S);
    assert_eq!(b.state(10 * S), State::HalfOpen); // waits for every trial call
    assert!(b.try_acquire(10 * S).is_err());
    b.on_failure(p2, MS, 10 * S); // 1/2 = 50% >= 50%: re-open
    assert_eq!(b.state(10 * S), State::Open);
    // second open lasts as long (no backoff); then two successes close it with an empty window
    let p1 = b.try_acquire(20 * S).unwrap();
    let p2 = b.try_acquire(20 * S).unwrap();
    b.on_success(p1, MS, 20 * S);
    b.on_success(p2, MS, 20 * S);
    assert_eq!(b.state(20 * S), State::Closed);
    assert_eq!(b.metrics(20 * S).calls, 0);
    assert_eq!(
        states(&b.take_transitions()),
        vec![
            (State::Closed, State::Open),
            (State::Open, State::HalfOpen),
            (State::HalfOpen, State::Open),
            (State::Open, State::HalfOpen),
            (State::HalfOpen, State::Closed),
        ]
    );
}

#[test]
fn ignored_trial_calls_give_their_permit_back() {
    let b = opened(cfg());
    let p1 = b.try_acquire(10 * S).unwrap();
    let p2 = b.try_acquire(10 * S).unwrap();
    b.on_ignored(p1, 10 * S);
    let p3 = b.try_acquire(10 * S).unwrap();
    assert!(b.try_acquire(10 * S).is_err());
    b.on_success(p2, MS, 10 * S);
    b.on_success(p3, MS, 10 * S);
    assert_eq!(b.state(10 * S), State::Closed);
}

#[test]
fn half_open_max_wait_reopens() {
    let b = opened(BreakerConfig {
        half_open_max_wait_ns: 5 * S,
        ..cfg()
    });
    let p = b.try_acquire(10 * S).unwrap();
    assert_eq!(b.state(15 * S - 1), State::HalfOpen);
    assert_eq!(b.state(15 * S), State::Open);
    // the late outcome belongs to a finished epoch and changes nothing
    b.on_success(p, MS, 15 * S);
    assert_eq!(b.state(15 * S), State::Open);
    assert_eq!(refused(&b, 16 * S).remaining_ns, 9 * S);
}

#[test]
fn backoff_grows_the_open_time_up_to_the_cap() {
    let b = opened(BreakerConfig {
        open_backoff: 2.0,
        open_max_ns: 35 * S,
        half_open_calls: 1,
        ..cfg()
    });
    let mut now = 0;
    for expected in [10, 20, 35, 35] {
        assert_eq!(
            refused(&b, now).remaining_ns,
            expected * S,
            "open for {expected} s"
        );
        now += expected * S;
        let p = b.try_acquire(now).unwrap();
        b.on_failure(p, MS, now);
    }
    // a success closes it and resets the backoff
    now += 35 * S;
    let p = b.try_acquire(now).unwrap();
    b.on_success(p, MS, now);
    assert_eq!(b.state(now), State::Closed);
    for _ in 0..4 {
        fail(&b, now);
    }
    assert_eq!(refused(&b, now).remaining_ns, 10 * S);
}

#[test]
fn late_outcomes_are_not_recorded_into_the_next_state() {
    let b = Breaker::new(cfg()).unwrap();
    let late: Vec<Permit> = (0..3).map(|_| b.try_acquire(0).unwrap()).collect();
    for _ in 0..4 {
        fail(&b, 0);
    }
    b.close(S);
    for p in late {
        b.on_failure(p, MS, S);
    }
    assert_eq!(b.metrics(S).calls, 0);
    assert_eq!(b.state(S), State::Closed);
}

#[test]
fn forced_disabled_and_metrics_only() {
    let b = Breaker::new(cfg()).unwrap();
    b.force_open(0);
    assert_eq!(
        refused(&b, 1000 * S),
        Refused {
            state: State::ForcedOpen,
            remaining_ns: u64::MAX
        }
    );
    assert_eq!(b.state(1000 * S), State::ForcedOpen);

    b.disable(0);
    for _ in 0..20 {
        fail(&b, 0);
    }
    assert_eq!(b.state(0), State::Disabled);
    assert_eq!(b.metrics(0).calls, 0);

    b.metrics_only(0);
    for _ in 0..20 {
        fail(&b, 0);
    }
    let m = b.metrics(0);
    assert_eq!((m.state, m.calls, m.failed), (State::MetricsOnly, 10, 10));
    assert!((m.failure_rate - 1.0).abs() < 1e-9);

    b.reset(0);
    let m = b.metrics(0);
    assert_eq!(
        (m.state, m.calls, m.not_permitted, m.transitions),
        (State::Closed, 0, 0, 4)
    );
    assert_eq!(
        states(&b.take_transitions()),
        vec![
            (State::Closed, State::ForcedOpen),
            (State::ForcedOpen, State::Disabled),
            (State::Disabled, State::MetricsOnly),
            (State::MetricsOnly, State::Closed),
        ]
    );
}

#[test]
fn time_window_forgets_old_seconds() {
    let b = Breaker::new(BreakerConfig {
        window: WindowKind::Time,
        window_size: 10,
        ..cfg()
    })
    .unwrap();
    let t0 = 1000 * S;
    for _ in 0..10 {
        ok(&b, t0);
    }
    for i in 1..4 {
        fail(&b, t0 + i * S);
    }
    let m = b.metrics(t0 + 3 * S);
    assert_eq!((m.calls, m.failed, m.state), (13, 3, State::Closed));
    // at t0+10 the first second (the successes) has left the window; at t0+13.5 everything has
    let m = b.metrics(t0 + 10 * S);
    assert_eq!((m.calls, m.failed), (3, 3));
    assert_eq!(b.metrics(t0 + 13 * S + S / 2).calls, 0);
    // failures spread over the window open it once the minimum is in
    for i in 0..4 {
        fail(&b, t0 + 20 * S + i * S);
    }
    assert_eq!(b.state(t0 + 23 * S), State::Open);
}

// ----- state machine vs a reference model -----

#[derive(Debug, Clone)]
enum Op {
    Acquire,
    Complete {
        which: usize,
        fail: bool,
        slow: bool,
        ignore: bool,
    },
    Advance(u64),
    State,
    Manual(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Acquire),
        4 => (0usize..8, any::<bool>(), prop::bool::weighted(0.2), prop::bool::weighted(0.1))
            .prop_map(|(which, fail, slow, ignore)| Op::Complete { which, fail, slow, ignore }),
        2 => (0u64..15).prop_map(|s| Op::Advance(s * S / 2)),
        1 => Just(Op::State),
        1 => (0u8..20).prop_map(Op::Manual),
    ]
}

/// The documented behaviour, written plainly: a deque for the window, fields for everything else.
struct Model {
    c: BreakerConfig,
    state: State,
    epoch: u64,
    window: VecDeque<(bool, bool)>,
    deadline: u64,
    opens: u32,
    issued: u32,
    done: u32,
    failed: u32,
    slow: u32,
}

impl Model {
    fn go(&mut self, to: State, now: u64) {
        match to {
            State::Open => {
                self.opens = if self.state == State::HalfOpen {
                    self.opens + 1
                } else {
                    1
                };
                let d = self.c.open_ns as f64 * self.c.open_backoff.powi(self.opens as i32 - 1);
                self.deadline = now + d.min(self.c.open_max_ns as f64) as u64;
            }
            State::HalfOpen => {
                (self.issued, self.done, self.failed, self.slow) = (0, 0, 0, 0);
                self.deadline = now;
            }
            State::Closed | State::MetricsOnly => {
                self.opens = 0;
                self.window.clear();
            }
            _ => {}
        }
        self.state = to;
        self.epoch += 1;
    }

    fn over(&self, calls: usize, failed: usize, slow: usize) -> bool {
        calls > 0
            && (failed as f64 / calls as f64 >= self.c.failure_rate
                || slow as f64 / calls as f64 >= self.c.slow_call_rate)
    }

    fn tick(&mut self, now: u64) {
        loop {
            if self.state == State::Open && self.c.auto_half_open && now >= self.deadline {
                self.go(State::HalfOpen, now);
            } else if self.state == State::HalfOpen
                && self.c.half_open_max_wait_ns > 0
                && now >= self.deadline + self.c.half_open_max_wait_ns
            {
                self.go(State::Open, now);
            } else {
                return;
            }
        }
    }

    fn acquire(&mut self, now: u64) -> Option<(u64, State)> {
        loop {
            match self.state {
                State::Open if now >= self.deadline => self.go(State::HalfOpen, now),
                State::HalfOpen
                    if self.c.half_open_max_wait_ns > 0
                        && now >= self.deadline + self.c.half_open_max_wait_ns =>
                {
                    self.go(State::Open, now);
                }
                State::Open | State::ForcedOpen => return None,
                State::HalfOpen => {
                    if self.issued >= self.c.half_open_calls {
                        return None;
                    }
                    self.issued += 1;
                    return Some((self.epoch, State::HalfOpen));
                }
                s => return Some((self.epoch, s)),
            }
        }
    }

    fn complete(
        &mut self,
        epoch: u64,
        state: State,
        fail: bool,
        slow: bool,
        ignore: bool,
        now: u64,
    ) {
        if epoch != self.epoch {
            return;
        }
        match state {
            State::HalfOpen if ignore => self.issued -= 1,
            _ if ignore => {}
            State::Closed | State::MetricsOnly => {
                if self.window.len() == self.c.window_size as usize {
                    self.window.pop_front();
                }
                self.window.push_back((fail, slow));
                let n = self.window.len();
                let f = self.window.iter().filter(|w| w.0).count();
                let s = self.window.iter().filter(|w| w.1).count();
                let min = self.c.minimum_calls.min(self.c.window_size) as usize;
                if state == State::Closed && n >= min && self.over(n, f, s) {
                    self.go(State::Open, now);
                }
            }
            State::HalfOpen => {
                self.done += 1;
                self.failed += u32::from(fail);
                self.slow += u32::from(slow);
                if self.done == self.c.half_open_calls {
                    let over =
                        self.over(self.done as usize, self.failed as usize, self.slow as usize);
                    self.go(if over { State::Open } else { State::Closed }, now);
                }
            }
            _ => {}
        }
    }
}

fn config_strategy() -> impl Strategy<Value = BreakerConfig> {
    (
        1u32..6,
        1u32..6,
        1u32..4,
        any::<bool>(),
        prop_oneof![Just(0u64), Just(3 * S)],
        0usize..3,
    )
        .prop_map(
            |(
                window_size,
                minimum_calls,
                half_open_calls,
                auto_half_open,
                half_open_max_wait_ns,
                backoff,
            )| {
                BreakerConfig {
                    window_size,
                    minimum_calls,
                    half_open_calls,
                    auto_half_open,
                    half_open_max_wait_ns,
                    open_backoff: [1.0, 1.5, 2.0][backoff],
                    slow_call_rate: 0.6,
                    open_ns: 2 * S,
                    open_max_ns: 5 * S,
                    ..cfg()
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn matches_the_reference_model(c in config_strategy(), ops in prop::collection::vec(op(), 1..120)) {
        let b = Breaker::new(c.clone()).unwrap();
        let mut m = Model {
            c, state: State::Closed, epoch: 0, window: VecDeque::new(), deadline: 0, opens: 0,
            issued: 0, done: 0, failed: 0, slow: 0,
        };
        let mut now = 0u64;
        let mut held: Vec<(Permit, (u64, State))> = Vec::new();
        let mut transitions = 0u64;
        for op in ops {
            match op {
                Op::Acquire => {
                    let got = b.try_acquire(now);
                    let want = m.acquire(now);
                    prop_assert_eq!(got.is_ok(), want.is_some(), "acquire at {} in {:?}", now, m.state);
                    if let (Ok(p), Some(w)) = (got, want) {
                        prop_assert_eq!(p.state(), w.1);
                        held.push((p, w));
                    }
                }
                Op::Complete { which, fail, slow, ignore } => {
                    if !held.is_empty() {
                        let (p, (epoch, state)) = held.remove(which % held.len());
                        let d = if slow { 2 * S } else { MS };
                        if ignore {
                            b.on_ignored(p, now);
                        } else if fail {
                            b.on_failure(p, d, now);
                        } else {
                            b.on_success(p, d, now);
                        }
                        m.complete(epoch, state, fail, slow, ignore, now);
                    }
                }
                Op::Advance(d) => now += d,
                Op::State => {
                    m.tick(now);
                    prop_assert_eq!(b.state(now), m.state);
                }
                Op::Manual(k) => match k {
                    0 => { b.force_open(now); m.go(State::ForcedOpen, now); }
                    1 => { b.disable(now); m.go(State::Disabled, now); }
                    2 => { b.metrics_only(now); m.go(State::MetricsOnly, now); }
                    3 => { b.reset(now); m.go(State::Closed, now); }
                    4 => { b.close(now); m.go(State::Closed, now); }
                    _ => {}
                },
            }
            // Compare without triggering lazy transitions: state() may move OPEN -> HALF_OPEN (auto) in both.
            m.tick(now);
            prop_assert_eq!(b.state(now), m.state);
            if matches!(m.state, State::Closed | State::MetricsOnly) {
                let metrics = b.metrics(now);
                prop_assert_eq!(metrics.calls, m.window.len() as u64);
                prop_assert_eq!(metrics.failed, m.window.iter().filter(|w| w.0).count() as u64);
                prop_assert_eq!(metrics.slow, m.window.iter().filter(|w| w.1).count() as u64);
            }
            transitions += b.take_transitions().len() as u64;
            prop_assert_eq!(transitions, b.metrics(now).transitions);
        }
    }
}

// ----- threads -----

#[test]
fn counts_add_up_across_threads() {
    const THREADS: usize = 8;
    const CALLS: usize = 20_000;
    // Metrics-only never transitions: every permitted call must land in the window (sized to hold them all).
    let b = Arc::new(
        Breaker::new(BreakerConfig {
            window_size: (THREADS * CALLS) as u32,
            minimum_calls: 1,
            ..cfg()
        })
        .unwrap(),
    );
    b.metrics_only(0);
    let failures = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (b, failures, barrier) = (b.clone(), failures.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                for i in 0..CALLS {
                    let p = b.try_acquire(0).unwrap();
                    if (i + t) % 7 == 0 {
                        failures.fetch_add(1, Ordering::Relaxed);
                        b.on_failure(p, MS, 0);
                    } else {
                        b.on_success(p, MS, 0);
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let m = b.metrics(0);
    assert_eq!(m.calls, (THREADS * CALLS) as u64);
    assert_eq!(m.failed, failures.load(Ordering::Relaxed));

    // A real breaker under fire from many threads: permitted + refused == attempted, and it opened once.
    let b = Arc::new(
        Breaker::new(BreakerConfig {
            minimum_calls: 10,
            window_size: 100,
            ..cfg()
        })
        .unwrap(),
    );
    let permitted = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|_| {
            let (b, permitted, barrier) = (b.clone(), permitted.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                for _ in 0..CALLS {
                    if let Ok(p) = b.try_acquire(S) {
                        permitted.fetch_add(1, Ordering::Relaxed);
                        b.on_failure(p, MS, S);
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let m = b.metrics(S);
    assert_eq!(m.state, State::Open);
    assert_eq!(
        permitted.load(Ordering::Relaxed) + m.not_permitted,
        (THREADS * CALLS) as u64
    );
    assert_eq!(
        states(&b.take_transitions()),
        vec![(State::Closed, State::Open)]
    );
}

// ----- half-open epochs: interleavings scripted with the test hooks, and threads -----

/// Runs `f` once, the first time this thread reaches `point` inside a breaker call.
fn once_at(point: Point, f: impl FnOnce() + 'static) {
    let mut f = Some(f);
    hooks::set(move |p| {
        if p == point {
            if let Some(f) = f.take() {
                f();
            }
        }
    });
}

#[test]
fn a_trial_permit_is_not_taken_from_a_later_epoch() {
    // auto_half_open: the script goes OPEN -> HALF_OPEN with a state read, without taking a trial permit.
    let b = Arc::new(opened(BreakerConfig {
        half_open_calls: 1,
        auto_half_open: true,
        ..cfg()
    }));
    assert_eq!(b.state(10 * S), State::HalfOpen);
    // This acquire has read the trial count (0) and not yet taken a trial when another caller takes the only
    // one and fails it (HALF_OPEN -> OPEN), and 10 s later the breaker is half-open again, its count back at 0.
    let other = b.clone();
    once_at(Point::HalfOpenIssue, move || {
        let p = other.try_acquire(10 * S).expect("the other caller's trial");
        other.on_failure(p, MS, 10 * S);
        assert_eq!(other.state(20 * S), State::HalfOpen);
    });
    let late = b.try_acquire(20 * S);
    hooks::clear();
    // The count it read belongs to the finished epoch: it takes the new epoch's trial, not a phantom one that
    // nobody will ever report (which would leave the breaker half-open for good, with no maximum wait).
    let p = late.expect("the new epoch's trial permit");
    assert_eq!(p.state(), State::HalfOpen);
    assert!(b.try_acquire(20 * S).is_err(), "one trial call only");
    b.on_success(p, MS, 20 * S);
    assert_eq!(b.state(20 * S), State::Closed);
    assert_eq!(
        states(&b.take_transitions()),
        vec![
            (State::Closed, State::Open),
            (State::Open, State::HalfOpen),
            (State::HalfOpen, State::Open),
            (State::Open, State::HalfOpen),
            (State::HalfOpen, State::Closed),
        ]
    );
}

#[derive(Debug, Clone, Copy)]
enum Redeem {
    Success,
    Failure,
    Ignored,
}

fn redeem(b: &Breaker, p: Permit, how: Redeem, now: u64) {
    match how {
        Redeem::Success => b.on_success(p, MS, now),
        Redeem::Failure => b.on_failure(p, MS, now),
        Redeem::Ignored => b.on_ignored(p, now),
    }
}

#[test]
fn a_trial_outcome_in_flight_across_an_epoch_change_is_not_counted_in_the_next() {
    for how in [Redeem::Success, Redeem::Failure, Redeem::Ignored] {
        let b = Arc::new(opened(BreakerConfig {
            half_open_calls: 1,
            auto_half_open: true,
            ..cfg()
        }));
        let stale = b.try_acquire(10 * S).unwrap();
        // While its outcome is on its way in: closed by hand, opened by four failures, half-open 10 s later.
        let other = b.clone();
        once_at(Point::HalfOpenOutcome, move || {
            other.close(10 * S);
            for _ in 0..4 {
                fail(&other, 10 * S);
            }
            assert_eq!(other.state(20 * S), State::HalfOpen);
        });
        redeem(&b, stale, how, 20 * S);
        hooks::clear();
        // The new epoch's accounting is untouched: no trial completed, its one trial permit free ...
        let m = b.metrics(20 * S);
        assert_eq!(
            (m.state, m.calls, m.failed),
            (State::HalfOpen, 0, 0),
            "{how:?}"
        );
        let p = b
            .try_acquire(20 * S)
            .unwrap_or_else(|r| panic!("{how:?}: the new epoch's trial permit was refused: {r:?}"));
        assert!(b.try_acquire(20 * S).is_err(), "{how:?}");
        // ... and its own trial decides.
        if matches!(how, Redeem::Failure) {
            b.on_failure(p, MS, 20 * S);
            assert_eq!(b.state(20 * S), State::Open, "{how:?}");
        } else {
            b.on_success(p, MS, 20 * S);
            assert_eq!(b.state(20 * S), State::Closed, "{how:?}");
        }
    }
}

#[test]
fn a_permit_redeemed_twice_counts_once() {
    // Permits are moved into on_success / on_failure / on_ignored; a token (what the bindings hand through
    // Python) can be turned into a permit twice. The second must neither give back a trial it did not take
    // (wrapping the count) nor complete a trial that is still running.
    for how in [Redeem::Ignored, Redeem::Success, Redeem::Failure] {
        let b = opened(cfg()); // two trial calls
        let token = b.try_acquire(10 * S).unwrap().into_token();
        redeem(&b, Permit::from_token(token), how, 10 * S);
        redeem(&b, Permit::from_token(token), how, 10 * S);
        assert_eq!(b.state(10 * S), State::HalfOpen, "{how:?}");
        let done = u64::from(!matches!(how, Redeem::Ignored));
        assert_eq!(b.metrics(10 * S).calls, done, "{how:?}");
        // exactly the trial permits not yet taken are there
        let left: Vec<Permit> = (done..2)
            .map(|_| b.try_acquire(10 * S).expect("a trial permit"))
            .collect();
        assert!(b.try_acquire(10 * S).is_err(), "{how:?}");
        for p in left {
            b.on_success(p, MS, 10 * S);
        }
        // 1 failure in 2 trials is 50%: open; otherwise closed
        let want = if matches!(how, Redeem::Failure) {
            State::Open
        } else {
            State::Closed
        };
        assert_eq!(b.state(10 * S), want, "{how:?}");
    }
}

#[test]
fn half_open_epochs_under_threads_never_wedge_the_breaker() {
    // Threads take trial permits and report them (success, failure or ignored, some late) while others cycle
    // the breaker through OPEN and HALF_OPEN on a shared clock. However that interleaves, once every permit is
    // reported the breaker must still be able to close: a trial permit lost or counted twice in some epoch
    // would leave it HALF_OPEN refusing every call (there is no maximum wait).
    const THREADS: u64 = 8;
    const ROUNDS: u64 = 200_000;
    let b = Arc::new(
        Breaker::new(BreakerConfig {
            window_size: 4,
            minimum_calls: 2,
            open_ns: 50,
            open_max_ns: 50,
            half_open_calls: 2,
            auto_half_open: true,
            ..cfg()
        })
        .unwrap(),
    );
    let clock = Arc::new(AtomicU64::new(S));
    let barrier = Arc::new(Barrier::new(THREADS as usize));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (b, clock, barrier) = (b.clone(), clock.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut rng = 0x9E37_79B9_7F4A_7C15_u64 ^ (t + 1);
                let mut held: Vec<Permit> = Vec::new();
                barrier.wait();
                for _ in 0..ROUNDS {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let now = clock.fetch_add(1 + rng % 8, Ordering::Relaxed);
                    if rng.is_multiple_of(5) {
                        b.state(now);
                    }
                    if let Ok(p) = b.try_acquire(now) {
                        held.push(p);
                    }
                    // report a held permit now and then, oldest first, so that some land in a later epoch
                    if held.len() > 2 || (rng >> 8).is_multiple_of(3) {
                        if let Some(p) = (!held.is_empty()).then(|| held.remove(0)) {
                            let how = [Redeem::Success, Redeem::Failure, Redeem::Ignored]
                                [((rng >> 16) % 3) as usize];
                            redeem(&b, p, how, clock.load(Ordering::Relaxed));
                        }
                    }
                }
                let now = clock.load(Ordering::Relaxed);
                for p in held {
                    b.on_failure(p, MS, now);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let mut now = clock.load(Ordering::Relaxed) + S;
    for _ in 0..10 {
        if let Ok(p) = b.try_acquire(now) {
            b.on_success(p, MS, now);
        }
        if b.state(now) == State::Closed {
            return;
        }
        now += S;
    }
    panic!("wedged: {:?}", b.metrics(now));
}
