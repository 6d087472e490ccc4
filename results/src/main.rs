use std::process::ExitCode;

fn main() -> ExitCode {
    sluice_core::service::binary_main("results", sluice_results::ResultsStage::build)
}
