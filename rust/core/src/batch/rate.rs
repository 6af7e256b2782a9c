//! The per-shard token bucket (records and bytes per second).

#[derive(Debug)]
pub(super) struct TokenBucket {
    pub(super) tokens: f64,
    pub(super) rate: f64,
    last_ns: u64,
}

impl TokenBucket {
    pub(super) fn new(rate: f64, now: u64) -> Self {
        Self {
            tokens: rate,
            rate,
            last_ns: now,
        }
    }
    pub(super) fn refill(&mut self, now: u64) {
        if now > self.last_ns {
            self.tokens =
                (self.tokens + self.rate * (now - self.last_ns) as f64 / 1e9).min(self.rate);
            self.last_ns = now;
        }
    }
    /// Whether less than half the bucket is left: the rate is what holds sending back.
    pub(super) fn drawn(&self) -> bool {
        self.tokens < self.rate / 2.0
    }
    /// A cost above the bucket's size is allowed once the bucket is full.
    pub(super) fn can_take(&self, cost: f64) -> bool {
        self.tokens >= cost.min(self.rate)
    }
    pub(super) fn take(&mut self, cost: f64) {
        self.tokens -= cost;
    }
    /// Nanoseconds until `cost` would be available.
    pub(super) fn wait_ns(&self, cost: f64) -> u64 {
        let missing = cost.min(self.rate) - self.tokens;
        if missing <= 0.0 {
            0
        } else {
            (missing / self.rate * 1e9) as u64 + 1
        }
    }
}
