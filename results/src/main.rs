use std::process::ExitCode;

fn main() -> ExitCode {
    sluice_core::service::binary_main(sluice_core::topology::StageName::Results, sluice_results::ResultsStage::build)
}
