use std::process::ExitCode;

fn main() -> ExitCode {
    sluice_core::service::binary_main("features", sluice_features::FeaturesStage::build)
}
