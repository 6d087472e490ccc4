//! A configuration file: every section the stages read, from whatever TOML (or not) it is.
//! Read or refused with an error; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_core::config::Settings;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let settings = Settings::from_toml(text);
    let _ = settings.store();
    let _ = settings.worker();
    let _ = settings.model();
    let _ = settings.telemetry();
    let _ = settings.section::<sluice_ingest::IngestConfig>("ingest");
    let _ = settings.section::<sluice_features::FeaturesConfig>("features");
});
