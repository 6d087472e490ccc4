use std::process::ExitCode;

fn main() -> ExitCode {
    sluice_core::service::binary_main("inference", sluice_inference::InferenceStage::build)
}
