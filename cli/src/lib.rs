//! The library behind the `sluice` command: demo, producer, trainer, bundle maker, in-process
//! pipeline, DLQ tools, monitoring, benchmarks.

/// `println!` that hands back the error where `println!` panics: a reader gone (`| head`) is a
/// broken pipe, which `main` passes over.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*)
    }};
}

/// [`outln!`] without the newline, as `print!` is `println!`.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout(), $($arg)*)
    }};
}

pub mod bench;
pub mod demo;
pub mod digits;
pub mod dlq;
pub mod feedback;
pub mod load;
pub mod load_bench;
pub mod monitor;
pub mod pipeline;
pub mod pipeline_bench;
pub mod produce;
pub mod progress;
pub mod report;
pub mod resnet18;
pub mod results;
pub mod review;
pub mod stats;
pub mod top;
pub mod train;
