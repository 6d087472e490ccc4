use std::process::ExitCode;

fn main() -> ExitCode {
    sluice_core::service::binary_main("ingest", sluice_ingest::IngestStage::build)
}
