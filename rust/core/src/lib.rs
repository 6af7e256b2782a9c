//! `treasure_core`: the pure-Rust heart of treasure_engine.
//!
//! No Python here: everything in this crate is tested with `cargo test`, measured with criterion and fuzzed
//! with `cargo fuzz` on its own. The PyO3 bindings in `rust/py` only convert types and errors.

pub mod batch;
pub mod breaker;
pub mod clock;
pub mod error;
pub mod kpl;
pub mod log;
pub mod md5x;
pub mod metrics;
pub mod records;
pub mod ring;
pub mod shards;
pub mod spill;
pub mod wal;
pub mod wire;

pub use error::CoreError;
