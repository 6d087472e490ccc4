//! sluice-core: the contracts every part of the sluice pipeline relies on.
//!
//! - [`envelope`]: the versioned record envelope; [`record`]: predictions, results, DLQ entries.
//! - [`backend`]: the stream, queue, feature store, result store and blob store traits, and
//!   their implementations.
//! - [`worker`]: the one loop shape every stage runs; [`service`]: what every worker binary shares.
//! - [`error`]: failures classified Retryable / Permanent with reason codes.
//! - [`model`]: the model bundle (`model.toml` + `model.safetensors`).

pub mod backend;
pub mod capture;
pub mod config;
pub mod dlq;
pub mod envelope;
pub mod error;
pub mod image;
pub mod model;
pub mod record;
pub mod service;
pub mod shutdown;
pub mod stats;
pub mod telemetry;
pub mod testing;
pub mod threads;
pub mod topology;
pub mod vector;
pub mod worker;

pub use error::{ReasonCode, Result, SluiceError};
