//! A feature store written before vectors were versioned (bare little-endian f32s) is still
//! read, and a vector from a newer build is refused for its record alone, saying why.

use sluice_core::ReasonCode;
use sluice_core::backend::Backend;
use sluice_core::config::StoreConfig;
use sluice_core::envelope::RecordId;
use sluice_core::vector::{FeatureVector, MAGIC, VERSION, f32_to_le_bytes};

#[tokio::test]
async fn an_embedded_store_from_before_versions_is_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sqlite");
    let backend = Backend::open(&StoreConfig { path: path.clone(), ..StoreConfig::default() }).await.unwrap();
    let id = |s: &str| RecordId::parse(s).unwrap();
    backend.features.put_if_absent(vec![(id("new"), FeatureVector::Pixels(vec![1, 2, 3]))]).await.unwrap();

    // Rows as the earlier build wrote them, and one from a build newer than this one.
    let mut newer = MAGIC.to_vec();
    newer.extend([VERSION + 1, 0, 9, 9]);
    let db = rusqlite::Connection::open(&path).unwrap();
    for (record, bytes) in [("old", f32_to_le_bytes(&[0.5, -1.0, 2.25])), ("newer", newer)] {
        db.execute("INSERT INTO features (record_id, vector, created_ms) VALUES (?1, ?2, 0)", (record, bytes)).unwrap();
    }

    let got = backend.features.get_batch(&[id("new"), id("old"), id("newer")]).await.unwrap();
    assert_eq!(got[&id("new")].as_ref().unwrap(), &FeatureVector::Pixels(vec![1, 2, 3]));
    assert_eq!(got[&id("old")].as_ref().unwrap(), &FeatureVector::Values(vec![0.5, -1.0, 2.25]));
    let refused = got[&id("newer")].as_ref().unwrap_err();
    assert_eq!(refused.code(), ReasonCode::FeatureShapeMismatch);
    assert!(refused.is_retryable(), "a worker of the newer build, in a rolling upgrade, reads it");
    assert!(refused.to_string().contains("encoding version 2"), "{refused}");
}
