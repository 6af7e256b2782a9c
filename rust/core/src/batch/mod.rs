//! The producer pipeline: `submit` into the ring, a batcher thread that turns events into sealed PutRecords
//! requests, and the bookkeeping of what Kinesis said about each record.
//!
//! ```text
//! submit ─► ring ─► batcher thread: route (MD5, cached) ─► per-shard KPL aggregate ─► per-shard queues
//!                                                         (retry queue first)      ─► open request ─► ready
//! sender (Python) ─► poll ready ─► POST ─► complete()/fail() ─► inbox ─► batcher: retry, back off or dead-letter
//! ```
//!
//! Invariant (counted by tests): every accepted event is delivered, dead-lettered or still in flight;
//! `accepted == delivered + dead_lettered + in_flight`.

mod batcher;
mod config;
mod event;
mod offline;
mod pipeline;
mod rate;
mod request;
mod shared;
mod stats;
mod waker;

pub use config::BatcherConfig;
pub use event::{check_partition_key, event_len, Wait};
pub use offline::{seal_offline, seal_offline_with, seal_staged, StagedEvents};
pub use pipeline::{CompleteSummary, Overflow, Pipeline};
pub use request::Request;
pub use stats::{DeadRecord, RequestFailure, Stats};
