//! A stream record as any producer may write it, through the ingest stage's own `process`:
//! sniffing, envelope parsing, payload checks (JSON events against the digits bundle's tabular
//! spec, images decoded under the limits). Every input ends in an outcome; none panics.
#![no_main]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use sluice_core::backend::BlobStore;
use sluice_core::model::ModelManifest;
use sluice_core::worker::{Delivery, Origin, Outcome, Stage};
use sluice_ingest::{IngestConfig, IngestStage};

/// Claim-checks in memory (the embedded store's in a file would make every run slow).
#[derive(Default)]
struct Blobs(Mutex<HashMap<String, Vec<u8>>>);

#[async_trait::async_trait]
impl BlobStore for Blobs {
    async fn put(&self, data: Vec<u8>) -> sluice_core::Result<String> {
        let mut blobs = self.0.lock().unwrap();
        let reference = format!("blob:{}", blobs.len());
        blobs.insert(reference.clone(), data);
        Ok(reference)
    }

    async fn get(&self, reference: &str) -> sluice_core::Result<Vec<u8>> {
        self.0.lock().unwrap().get(reference).cloned().ok_or_else(|| {
            sluice_core::SluiceError::permanent(sluice_core::ReasonCode::ClaimCheckMissing, reference.to_owned())
        })
    }
}

/// The digits bundle's manifest, read once.
static MANIFEST: std::sync::LazyLock<ModelManifest> =
    std::sync::LazyLock::new(|| toml::from_str(include_str!("../../models/digits/model.toml")).unwrap());

fuzz_target!(|data: &[u8]| {
    let manifest = &*MANIFEST;
    let stage = IngestStage::new(IngestConfig::default(), Arc::new(Blobs::default()))
        .with_tabular(manifest.input.tabular.clone());
    let delivery = Delivery {
        body: data.to_vec(),
        attributes: BTreeMap::new(),
        receive_count: 1,
        first_received_ms: None,
        origin: Origin::Stream { shard: "shard-0000".into(), sequence: "1".into(), arrived_ms: 1, replay: false },
    };
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let outcomes = runtime.block_on(stage.process(std::slice::from_ref(&delivery)));
    assert_eq!(outcomes.len(), 1);
    if let Outcome::Failed { error, .. } = &outcomes[0] {
        assert!(!error.is_retryable(), "bad input is permanent: {error}");
    }
});
