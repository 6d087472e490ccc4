//! A JSON event against the digits bundle's tabular spec: what ingest checks (`check`)
//! and what the features stage makes of it (`vectorise`): a vector of the spec's width, or an
//! error; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_core::model::ModelManifest;

/// The digits bundle's manifest, read once.
static MANIFEST: std::sync::LazyLock<ModelManifest> =
    std::sync::LazyLock::new(|| toml::from_str(include_str!("../../models/digits/model.toml")).unwrap());

fuzz_target!(|data: &[u8]| {
    let manifest = &*MANIFEST;
    let spec = manifest.input.tabular.as_ref().unwrap();
    let Ok(event) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    if let Some(object) = event.as_object() {
        let _ = spec.check(object);
    }
    if let Ok(vector) = sluice_features::tabular::vectorise(spec, &event) {
        assert_eq!(vector.len(), spec.vector_len());
    }
});
