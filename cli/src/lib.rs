//! The library behind the `sluice` command: demo, producer, trainer, in-process pipeline, DLQ tools.

pub mod bench;
pub mod demo;
pub mod digits;
pub mod dlq;
pub mod pipeline;
pub mod produce;
pub mod train;
