//! Counters, gauges and log-linear histograms in atomics, a registry by (name, labels), and one snapshot of
//! everything per scrape.
//!
//! Recording never takes a lock: a handle is an `Arc` of atomics, and an update is one `fetch_add` (counter,
//! histogram bucket) or a short compare-and-swap loop on an `f64` held as bits (gauge, fractional counter
//! increments, histogram sum). Only creating or removing a series and listing them take the registry's mutex.
//!
//! A [`Histogram`] splits every power of two of its range into 8 linear sub-buckets (HdrHistogram with three
//! bits of precision): the bucket of a value comes from the exponent and the top three mantissa bits of the
//! float, so `record` is O(1) with no loop, and any value in range is known to within 1/8 of itself. Buckets are
//! closed above, `(lo, hi]`, as Prometheus' `le` is; values at or below the range's floor share the first
//! bucket, values above its ceiling an overflow bucket; negative and NaN values are counted as `rejected` and
//! otherwise ignored. The export is coarser and fixed: one cumulative bound per power of two, then `+Inf`.
//!
//! Errors: a bad metric or label name, a name registered again with another kind or histogram layout, or a
//! layout out of range is a [`CoreError::Config`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crossbeam_utils::CachePadded;

use crate::CoreError;

/// Adds `delta` to an `f64` stored as bits, with a compare-and-swap loop.
#[inline]
fn add_f64(cell: &AtomicU64, delta: f64) {
    let mut current = cell.load(Ordering::Relaxed);
    loop {
        let next = (f64::from_bits(current) + delta).to_bits();
        match cell.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return,
            Err(seen) => current = seen,
        }
    }
}

/// A monotonic counter. Integral increments are one `fetch_add` on an integer, exact up to `2**64`;
/// fractional ones go to an `f64` beside it. Padded to a cache line so that counters of different shards
/// recorded on different threads do not share one.
#[derive(Debug, Default)]
pub struct Counter {
    whole: CachePadded<AtomicU64>,
    fraction: AtomicU64,
}

/// `2**64` as an `f64`: integral increments below it go to the integer part.
const TWO_POW_64: f64 = 18_446_744_073_709_551_616.0;

impl Counter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.whole.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n`.
    #[inline]
    pub fn inc_by(&self, n: u64) {
        self.whole.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds `n`; returns false (and adds nothing) when `n` is negative, NaN or infinite, since a counter only
    /// goes up.
    #[inline]
    pub fn add(&self, n: f64) -> bool {
        if (0.0..TWO_POW_64).contains(&n) && n.fract() == 0.0 {
            self.whole.fetch_add(n as u64, Ordering::Relaxed);
            true
        } else if n >= 0.0 && n.is_finite() {
            add_f64(&self.fraction, n);
            true
        } else {
            false
        }
    }

    /// The sum of the integral increments, exact.
    pub fn whole(&self) -> u64 {
        self.whole.load(Ordering::Relaxed)
    }

    /// The current value.
    pub fn value(&self) -> f64 {
        self.whole.load(Ordering::Relaxed) as f64
            + f64::from_bits(self.fraction.load(Ordering::Relaxed))
    }
}

/// A value that goes up and down: an `f64` held as bits.
#[derive(Debug, Default)]
pub struct Gauge {
    bits: CachePadded<AtomicU64>,
}

impl Gauge {
    pub fn new() -> Self {
        Self::default()
    }

    #[inline]
    pub fn set(&self, v: f64) {
        self.bits.store(v.to_bits(), Ordering::Relaxed);
    }

    #[inline]
    pub fn add(&self, v: f64) {
        add_f64(&self.bits, v);
    }

    #[inline]
    pub fn sub(&self, v: f64) {
        add_f64(&self.bits, -v);
    }

    pub fn value(&self) -> f64 {
        f64::from_bits(self.bits.load(Ordering::Relaxed))
    }
}

/// Linear sub-buckets per power of two, as a number of mantissa bits.
const SUB_BITS: u32 = 3;
const SUBS: usize = 1 << SUB_BITS;
/// The exported bounds are one per power of two from the floor to the ceiling, then `+Inf`: at most this many.
pub const MAX_EXPORTED_BOUNDS: usize = 40;

/// The range of a histogram: powers of two from `2**min_exp` to `2**max_exp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HistogramLayout {
    min_exp: i32,
    max_exp: i32,
}

impl HistogramLayout {
    /// Durations in seconds: `2**-20` (about 1 µs) to `2**12` (4096 s, over an hour); 34 exported bounds.
    pub const SECONDS: Self = Self {
        min_exp: -20,
        max_exp: 12,
    };
    /// Sizes and counts: 1 to `2**20` (about a million); 22 exported bounds.
    pub const COUNT: Self = Self {
        min_exp: 0,
        max_exp: 20,
    };

    /// A range from `2**min_exp` to `2**max_exp`, normal floats only, spanning 1 to 38 powers of two (so that
    /// the export has at most 40 bounds).
    pub fn new(min_exp: i32, max_exp: i32) -> Result<Self, CoreError> {
        let span = i64::from(max_exp) - i64::from(min_exp);
        if min_exp < -1022 || max_exp > 1023 || span < 1 || span > (MAX_EXPORTED_BOUNDS - 2) as i64
        {
            return Err(CoreError::Config {
                field: "histogram layout",
                reason: format!(
                    "needs -1022 <= min_exp < max_exp <= 1023 and at most {} powers of two (got 2**{min_exp} \
                     to 2**{max_exp})",
                    MAX_EXPORTED_BOUNDS - 2
                ),
            });
        }
        Ok(Self { min_exp, max_exp })
    }

    pub fn min_exp(&self) -> i32 {
        self.min_exp
    }

    pub fn max_exp(&self) -> i32 {
        self.max_exp
    }

    fn powers(self) -> usize {
        (self.max_exp - self.min_exp) as usize
    }

    /// Buckets: the floor bucket, 8 per power of two, the overflow bucket.
    pub fn buckets(&self) -> usize {
        self.powers() * SUBS + 2
    }

    /// The exported upper bounds: `2**min_exp`, `2**(min_exp + 1)`, ..., `2**max_exp`, `+Inf`.
    pub fn bounds(&self) -> Vec<f64> {
        (self.min_exp..=self.max_exp)
            .map(pow2)
            .chain(std::iter::once(f64::INFINITY))
            .collect()
    }

    /// `(lo, hi]` of bucket `i` (the floor bucket is `(-inf... 0, 2**min_exp]`, reported as `(0, 2**min_exp]`;
    /// the overflow bucket is `(2**max_exp, +inf]`).
    pub fn bucket_range(&self, i: usize) -> (f64, f64) {
        let last = self.buckets() - 1;
        if i == 0 {
            (0.0, pow2(self.min_exp))
        } else if i >= last {
            (pow2(self.max_exp), f64::INFINITY)
        } else {
            let k = i - 1;
            let base = pow2(self.min_exp + (k / SUBS) as i32);
            let sub = (k % SUBS) as f64;
            let step = base / SUBS as f64;
            (base + sub * step, base + (sub + 1.0) * step)
        }
    }

    /// The bucket of a positive (or zero) value, from its bits: no loop, no branch on the range.
    #[inline]
    fn index(self, v: f64) -> usize {
        let mantissa_shift = 52 - SUB_BITS;
        // `bits - 1` makes the buckets closed above: a value exactly on a bound falls in the bucket below it.
        // The sign bit is masked so that -0.0 counts as the zero it is.
        let key = (v.to_bits() & !(1 << 63)).saturating_sub(1) >> mantissa_shift;
        let floor_key = pow2(self.min_exp).to_bits() >> mantissa_shift;
        // The floor value itself has key floor_key - 1, index 0; anything smaller saturates to 0.
        let i = key.saturating_sub(floor_key - 1) as usize;
        i.min(self.buckets() - 1)
    }
}

/// `2**e` for a normal exponent.
fn pow2(e: i32) -> f64 {
    f64::from_bits(((i64::from(e) + 1023) as u64) << 52)
}

/// A log-linear histogram of positive values.
#[derive(Debug)]
pub struct Histogram {
    layout: HistogramLayout,
    bounds: Arc<[f64]>,
    buckets: Box<[AtomicU64]>,
    sum: CachePadded<AtomicU64>,
    rejected: AtomicU64,
}

impl Histogram {
    pub fn new(layout: HistogramLayout) -> Self {
        Self {
            layout,
            bounds: layout.bounds().into(),
            buckets: (0..layout.buckets()).map(|_| AtomicU64::new(0)).collect(),
            sum: CachePadded::new(AtomicU64::new(0f64.to_bits())),
            rejected: AtomicU64::new(0),
        }
    }

    pub fn layout(&self) -> HistogramLayout {
        self.layout
    }

    /// The exported upper bounds (see [`HistogramLayout::bounds`]), shared.
    pub fn bounds(&self) -> &Arc<[f64]> {
        &self.bounds
    }

    /// Records one value: negative or NaN values are only counted as rejected.
    #[inline]
    pub fn record(&self, v: f64) {
        // -0.0 is not below 0.0: it is recorded as a zero.
        if v.is_nan() || v < 0.0 {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.buckets[self.layout.index(v)].fetch_add(1, Ordering::Relaxed);
        add_f64(&self.sum, v);
    }

    /// Values recorded (rejected ones not included): the sum of the buckets.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    pub fn sum(&self) -> f64 {
        f64::from_bits(self.sum.load(Ordering::Relaxed))
    }

    /// Negative and NaN values seen.
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// The count of each bucket (see [`HistogramLayout::bucket_range`]).
    pub fn bucket_counts(&self) -> Vec<u64> {
        self.buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect()
    }

    /// Writes the cumulative counts at the exported bounds into `out` (cleared first) and returns
    /// `(sum, count)`; the count is the last cumulative count, so the two agree under concurrent recording.
    pub fn export_into(&self, out: &mut Vec<u64>) -> (f64, u64) {
        out.clear();
        let mut running = self.buckets[0].load(Ordering::Relaxed);
        out.push(running);
        for chunk in self.buckets[1..self.buckets.len() - 1].chunks_exact(SUBS) {
            running += chunk.iter().map(|b| b.load(Ordering::Relaxed)).sum::<u64>();
            out.push(running);
        }
        running += self.buckets[self.buckets.len() - 1].load(Ordering::Relaxed);
        out.push(running);
        (self.sum(), running)
    }

    /// The `q`-quantile (0 < q <= 1) at bucket precision: the middle of the bucket holding the value of rank
    /// `ceil(q * count)`, so within 1/16 of a value in range; the floor or the ceiling for values outside it.
    /// `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let counts = self.bucket_counts();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (lo, hi) = self.layout.bucket_range(i);
                return Some(if i == 0 {
                    hi
                } else if hi.is_infinite() {
                    lo
                } else {
                    f64::midpoint(lo, hi)
                });
            }
        }
        None
    }
}

/// What a series is, with its handle.
#[derive(Debug, Clone)]
pub enum Metric {
    Counter(Arc<Counter>),
    Gauge(Arc<Gauge>),
    Histogram(Arc<Histogram>),
}

/// The kind of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram(HistogramLayout),
}

impl Kind {
    /// `counter`, `gauge` or `histogram`, as Prometheus' `# TYPE` line says.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram(_) => "histogram",
        }
    }

    fn describe(self) -> String {
        match self {
            Self::Histogram(l) => format!("a histogram of 2**{} to 2**{}", l.min_exp, l.max_exp),
            other => format!("a {}", other.as_str()),
        }
    }
}

impl Metric {
    fn new(kind: Kind) -> Self {
        match kind {
            Kind::Counter => Self::Counter(Arc::default()),
            Kind::Gauge => Self::Gauge(Arc::default()),
            Kind::Histogram(layout) => Self::Histogram(Arc::new(Histogram::new(layout))),
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Self::Counter(_) => Kind::Counter,
            Self::Gauge(_) => Kind::Gauge,
            Self::Histogram(h) => Kind::Histogram(h.layout),
        }
    }
}

/// Label pairs, sorted by name.
pub type Labels = Arc<[(String, String)]>;

/// One series of a registry: a family's name and help, its labels, its metric, and whatever the owner of the
/// registry keeps beside it (`A`; the Python binding keeps its Python objects there).
#[derive(Debug)]
pub struct Series<A = ()> {
    pub name: Arc<str>,
    pub help: Arc<str>,
    pub labels: Labels,
    pub metric: Metric,
    pub extra: A,
}

#[derive(Debug)]
struct Family<A> {
    name: Arc<str>,
    help: Arc<str>,
    kind: Kind,
    series: BTreeMap<Vec<(String, String)>, Arc<Series<A>>>,
}

#[derive(Debug)]
struct Inner<A> {
    families: BTreeMap<String, Family<A>>,
    len: usize,
}

/// Metrics by (name, sorted labels). Creating, removing and listing lock a mutex; recording on a handle never
/// does.
#[derive(Debug)]
pub struct Registry<A = ()> {
    inner: Mutex<Inner<A>>,
}

impl<A> Default for Registry<A> {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                families: BTreeMap::new(),
                len: 0,
            }),
        }
    }
}

/// Prometheus' metric name: `[a-zA-Z_:][a-zA-Z0-9_:]*`.
pub fn validate_metric_name(name: &str) -> Result<(), CoreError> {
    let ok = name.bytes().enumerate().all(|(i, b)| {
        b.is_ascii_alphabetic() || b == b'_' || b == b':' || (i > 0 && b.is_ascii_digit())
    });
    if ok && !name.is_empty() {
        Ok(())
    } else {
        Err(CoreError::Config {
            field: "name",
            reason: format!("{name:?} is not a metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)"),
        })
    }
}

/// Prometheus' label name: `[a-zA-Z_][a-zA-Z0-9_]*`, not starting with `__` (reserved).
pub fn validate_label_name(name: &str) -> Result<(), CoreError> {
    let ok = name
        .bytes()
        .enumerate()
        .all(|(i, b)| b.is_ascii_alphabetic() || b == b'_' || (i > 0 && b.is_ascii_digit()));
    if ok && !name.is_empty() && !name.starts_with("__") {
        Ok(())
    } else {
        Err(CoreError::Config {
            field: "labels",
            reason: format!(
                "{name:?} is not a label name ([a-zA-Z_][a-zA-Z0-9_]*, not starting with __)"
            ),
        })
    }
}

/// Sorted, validated labels.
fn label_key(
    labels: &[(&str, &str)],
    kind: Option<Kind>,
) -> Result<Vec<(String, String)>, CoreError> {
    let mut key: Vec<(String, String)> = Vec::with_capacity(labels.len());
    for &(k, v) in labels {
        validate_label_name(k)?;
        if k == "le" && matches!(kind, Some(Kind::Histogram(_))) {
            return Err(CoreError::Config {
                field: "labels",
                reason: "\"le\" is reserved for the buckets of a histogram".to_owned(),
            });
        }
        key.push((k.to_owned(), v.to_owned()));
    }
    key.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    if let Some(w) = key.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(CoreError::Config {
            field: "labels",
            reason: format!("label {:?} given twice", w[0].0),
        });
    }
    Ok(key)
}

impl<A: Default> Registry<A> {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner<A>> {
        // Nothing panics while the lock is held but an allocation failure; the data stays consistent anyway.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The series of `name` and `labels`, made if missing. The help of a family is the first one given; the
    /// kind must match the family's.
    pub fn register(
        &self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        kind: Kind,
    ) -> Result<Arc<Series<A>>, CoreError> {
        validate_metric_name(name)?;
        let key = label_key(labels, Some(kind))?;
        let mut inner = self.lock();
        let family = match inner.families.get_mut(name) {
            Some(f) => f,
            None => inner.families.entry(name.to_owned()).or_insert(Family {
                name: name.into(),
                help: help.into(),
                kind,
                series: BTreeMap::new(),
            }),
        };
        if family.kind != kind {
            return Err(CoreError::Config {
                field: "name",
                reason: format!(
                    "metric {name} is {}, not {}",
                    family.kind.describe(),
                    kind.describe()
                ),
            });
        }
        if let Some(s) = family.series.get(&key) {
            return Ok(Arc::clone(s));
        }
        let series = Arc::new(Series {
            name: Arc::clone(&family.name),
            help: Arc::clone(&family.help),
            labels: key.clone().into(),
            metric: Metric::new(kind),
            extra: A::default(),
        });
        family.series.insert(key, Arc::clone(&series));
        inner.len += 1;
        Ok(series)
    }

    pub fn counter(
        &self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
    ) -> Result<Arc<Counter>, CoreError> {
        match &self.register(name, help, labels, Kind::Counter)?.metric {
            Metric::Counter(c) => Ok(Arc::clone(c)),
            _ => unreachable!("register checks the kind"),
        }
    }

    pub fn gauge(
        &self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
    ) -> Result<Arc<Gauge>, CoreError> {
        match &self.register(name, help, labels, Kind::Gauge)?.metric {
            Metric::Gauge(g) => Ok(Arc::clone(g)),
            _ => unreachable!("register checks the kind"),
        }
    }

    pub fn histogram(
        &self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        layout: HistogramLayout,
    ) -> Result<Arc<Histogram>, CoreError> {
        match &self
            .register(name, help, labels, Kind::Histogram(layout))?
            .metric
        {
            Metric::Histogram(h) => Ok(Arc::clone(h)),
            _ => unreachable!("register checks the kind"),
        }
    }

    /// Forgets a series (its handles keep working, unseen); the family goes with its last series. Returns
    /// whether it was there.
    pub fn remove(&self, name: &str, labels: &[(&str, &str)]) -> Result<bool, CoreError> {
        let key = label_key(labels, None)?;
        let removed;
        {
            let mut inner = self.lock();
            let Some(family) = inner.families.get_mut(name) else {
                return Ok(false);
            };
            removed = family.series.remove(&key);
            if family.series.is_empty() {
                inner.families.remove(name);
            }
            if removed.is_some() {
                inner.len -= 1;
            }
        }
        // `removed` drops here, after the lock: `A` may run code of its own when it drops.
        Ok(removed.is_some())
    }

    /// The number of series.
    pub fn len(&self) -> usize {
        self.lock().len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every series, by name then labels, taken under the lock in one pass; read their values afterwards.
    pub fn series(&self) -> Vec<Arc<Series<A>>> {
        let inner = self.lock();
        let mut all = Vec::with_capacity(inner.len);
        for family in inner.families.values() {
            all.extend(family.series.values().cloned());
        }
        all
    }

    /// Plain data of every series, by name then labels.
    pub fn snapshot(&self) -> Vec<Sample> {
        let mut all = Vec::new();
        let mut buf = Vec::new();
        for s in self.series() {
            let value = match &s.metric {
                Metric::Counter(c) => Value::Counter(c.value()),
                Metric::Gauge(g) => Value::Gauge(g.value()),
                Metric::Histogram(h) => {
                    let (sum, count) = h.export_into(&mut buf);
                    Value::Histogram(HistogramValue {
                        bounds: Arc::clone(&h.bounds),
                        cumulative: buf.clone(),
                        sum,
                        count,
                    })
                }
            };
            all.push(Sample {
                name: Arc::clone(&s.name),
                help: Arc::clone(&s.help),
                labels: Arc::clone(&s.labels),
                value,
            });
        }
        all
    }
}

/// One series in a snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: Arc<str>,
    pub help: Arc<str>,
    pub labels: Labels,
    pub value: Value,
}

impl Sample {
    pub fn kind(&self) -> &'static str {
        match self.value {
            Value::Counter(_) => "counter",
            Value::Gauge(_) => "gauge",
            Value::Histogram(_) => "histogram",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Counter(f64),
    Gauge(f64),
    Histogram(HistogramValue),
}

/// A histogram as exported: cumulative counts at fixed upper bounds (the last is `+Inf`), sum and count.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramValue {
    pub bounds: Arc<[f64]>,
    pub cumulative: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}
