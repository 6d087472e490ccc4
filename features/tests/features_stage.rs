//! The features stage on the shipped digits bundle: images and JSON events become the same
//! vectors, and what cannot be vectorised is a permanent failure with a reason.

use std::path::Path;

use sluice_core::ReasonCode;
use sluice_core::backend::{Backend, Receipt};
use sluice_core::config::{Settings, StoreConfig};
use sluice_core::envelope::{ContentType, Envelope, Payload, RecordId};
use sluice_core::topology::QueueName;
use sluice_core::vector::FeatureVector;
use sluice_core::worker::{Delivery, Origin, Outcome, Stage};
use sluice_features::FeaturesStage;

async fn setup() -> (tempfile::TempDir, Backend, FeaturesStage) {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreConfig { path: dir.path().join("s.sqlite"), ..StoreConfig::default() };
    let backend = Backend::open(&store).await.unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/digits");
    let settings = Settings::load(None).unwrap().set("model.dir", model);
    let stage = FeaturesStage::build(&settings, &backend).unwrap();
    (dir, backend, stage)
}

fn delivery(envelope: &Envelope) -> Delivery {
    Delivery {
        body: envelope.to_json(),
        attributes: Default::default(),
        receive_count: 1,
        first_received_ms: None,
        origin: Origin::Queue(Receipt("r".into())),
    }
}

/// A digit-like 8×8 image with intensities that are exact multiples of 255/16.
fn digit_pixels() -> Vec<u8> {
    (0..64u32).map(|i| ((i * 7) % 17) as u8).collect()
}

/// A smooth diagonal ramp, which survives downscaling.
fn gradient() -> Vec<u8> {
    (0..64u32).map(|i| ((i % 8 + i / 8) * 16 / 14) as u8).collect()
}

fn png_of(pixels: &[u8], side: u32) -> Vec<u8> {
    let img = image::GrayImage::from_fn(side, side, |x, y| {
        let v = u32::from(pixels[((y * 8 / side) * 8 + x * 8 / side) as usize]);
        image::Luma([((v * 255 + 8) / 16) as u8])
    });
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out
}

fn envelope(id: &str, content_type: ContentType, data: Vec<u8>) -> Envelope {
    Envelope::inline(RecordId::parse(id).unwrap(), "test", content_type, data)
}

#[tokio::test]
async fn images_and_events_become_the_same_vector() {
    let (_dir, backend, stage) = setup().await;
    let pixels = digit_pixels();
    let event: serde_json::Map<String, serde_json::Value> =
        pixels.iter().enumerate().map(|(i, &v)| (format!("p{i:02}"), v.into())).collect();
    let batch = [
        delivery(&envelope("png", ContentType::Png, png_of(&pixels, 8))),
        delivery(&envelope("event", ContentType::Json, serde_json::to_vec(&event).unwrap())),
        delivery(&envelope("gradient", ContentType::Png, png_of(&gradient(), 8))),
        delivery(&envelope("big-gradient", ContentType::Png, png_of(&gradient(), 64))),
    ];
    let outcomes = stage.process(&batch).await;
    for outcome in &outcomes {
        let Outcome::Forward(messages) = outcome else { panic!("expected a forward, got {outcome:?}") };
        assert_eq!(messages[0].0, QueueName::Inference);
        let forwarded = Envelope::from_json(&messages[0].1.body).unwrap();
        assert_eq!(forwarded.payload, Payload::Released, "the payload is not carried past features");
        assert!(forwarded.timestamps.featured_ms.is_some());
        let bundle = sluice_core::model::ModelBundle::load(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/digits"));
        let said = messages[0].1.attributes.get(sluice_core::record::message_attr::INPUT_SPEC);
        assert_eq!(
            said,
            Some(&bundle.unwrap().manifest.input.fingerprint()),
            "inference is told what input it was made for"
        );
    }
    let ids: Vec<RecordId> =
        ["png", "event", "gradient", "big-gradient"].iter().map(|s| RecordId::parse(*s).unwrap()).collect();
    let vectors = backend.features.get_batch(&ids).await.unwrap();
    let [png, event, small, big] = [0, 1, 2, 3].map(|i| vectors[&ids[i]].as_ref().unwrap());
    let [
        FeatureVector::Pixels(png),
        FeatureVector::Values(event),
        FeatureVector::Pixels(small),
        FeatureVector::Pixels(big),
    ] = [png, event, small, big]
    else {
        panic!("images are stored as pixels, events as values")
    };
    let [png, small, big] = [png, small, big].map(|p| p.iter().map(|&v| f32::from(v) / 255.0).collect::<Vec<_>>());
    assert_eq!(png.len(), 64);
    assert_eq!(big.len(), 64, "a larger image is resized to the model's input");
    for i in 0..64 {
        assert!((png[i] - event[i]).abs() < 1.0 / 255.0, "feature {i}: image {} vs event {}", png[i], event[i]);
        assert!((small[i] - big[i]).abs() < 0.1, "feature {i}: 8x8 {} vs resized 64x64 {}", small[i], big[i]);
    }
}

#[tokio::test]
async fn what_cannot_be_vectorised_fails_permanently_with_a_reason() {
    let (_dir, backend, stage) = setup().await;
    let batch = [
        delivery(&envelope("bad-field", ContentType::Json, br#"{"p00": "dark"}"#.to_vec())),
        delivery(&envelope("not-object", ContentType::Json, b"[1, 2, 3]".to_vec())),
        Delivery { body: b"not an envelope".to_vec(), ..delivery(&envelope("x", ContentType::Json, b"{}".to_vec())) },
        delivery(&envelope("bomb", ContentType::Png, sluice_core::image::png_header_only(100_000, 100_000))),
    ];
    let codes: Vec<ReasonCode> = stage
        .process(&batch)
        .await
        .into_iter()
        .map(|o| match o {
            Outcome::Failed { error, .. } => {
                assert!(!error.is_retryable(), "{error}");
                error.code()
            }
            other => panic!("expected a failure, got {other:?}"),
        })
        .collect();
    assert_eq!(
        codes,
        [
            ReasonCode::SchemaMismatch,
            ReasonCode::SchemaMismatch,
            ReasonCode::MalformedMessage,
            ReasonCode::ImageTooLarge
        ]
    );
    let none = backend.features.get_batch(&[RecordId::parse("bad-field").unwrap()]).await.unwrap();
    assert!(none.is_empty(), "nothing is stored for a failed record");
}

/// A claim-checked object is read only up to `features.max_claim_check_bytes`: ingest checked
/// it, but a producer can write it again after that, and a huge one would take the worker's
/// memory. One over the limit fails as `payload_too_large`, its record's own failure.
#[tokio::test]
async fn a_claim_checked_object_over_the_limit_is_refused() {
    let (_dir, backend, _) = setup().await;
    let (big_png, small_png) = (png_of(&gradient(), 512), png_of(&gradient(), 8));
    assert!(big_png.len() > small_png.len());
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/digits");
    let settings =
        Settings::load(None).unwrap().set("model.dir", model).set("features.max_claim_check_bytes", small_png.len());
    let stage = FeaturesStage::build(&settings, &backend).unwrap();
    let mut big = envelope("big", ContentType::Png, Vec::new());
    big.payload = Payload::ClaimCheck { reference: backend.blobs.put(big_png).await.unwrap() };
    let mut small = envelope("small", ContentType::Png, Vec::new());
    small.payload = Payload::ClaimCheck { reference: backend.blobs.put(small_png).await.unwrap() };
    let outcomes = stage.process(&[delivery(&big), delivery(&small)]).await;
    match &outcomes[0] {
        Outcome::Failed { error, .. } => assert_eq!(error.code(), ReasonCode::PayloadTooLarge, "{error}"),
        other => panic!("expected a failure, got {other:?}"),
    }
    assert!(matches!(outcomes[1], Outcome::Forward(_)), "{:?}", outcomes[1]);
}

/// Claim-checked payloads are fetched a few at a time and vectorised like inline ones; in a batch
/// that mixes both (and a claim-check whose blob is gone) each outcome stays in its delivery's
/// place.
#[tokio::test]
async fn claim_checked_and_inline_payloads_keep_their_places_in_the_batch() {
    let (_dir, backend, stage) = setup().await;
    let claim_checked = |id: &str, reference: String| {
        let mut envelope = envelope(id, ContentType::Png, Vec::new());
        envelope.payload = Payload::ClaimCheck { reference };
        envelope
    };
    let mut batch = Vec::new();
    let mut expected = Vec::new();
    for i in 0..2 * sluice_core::threads::stage_threads() + 1 {
        let png = png_of(&gradient(), 8 + 8 * i as u32);
        batch.push(delivery(&envelope(&format!("inline-{i}"), ContentType::Png, png.clone())));
        let reference = backend.blobs.put(png).await.unwrap();
        batch.push(delivery(&claim_checked(&format!("checked-{i}"), reference)));
        expected.extend([format!("inline-{i}"), format!("checked-{i}")]);
    }
    batch.insert(3, delivery(&claim_checked("gone", "blob:999999".to_owned())));
    expected.insert(3, "gone".to_owned());

    let outcomes = stage.process(&batch).await;
    let got: Vec<String> = outcomes
        .iter()
        .map(|outcome| match outcome {
            Outcome::Forward(messages) => Envelope::from_json(&messages[0].1.body).unwrap().record_id.to_string(),
            Outcome::Failed { error, record_id } => {
                assert_eq!(error.code(), ReasonCode::ClaimCheckMissing, "{error}");
                record_id.as_ref().unwrap().to_string()
            }
        })
        .collect();
    assert_eq!(got, expected, "each outcome in its delivery's place");
    for i in 0..2 * sluice_core::threads::stage_threads() + 1 {
        let ids = [format!("inline-{i}"), format!("checked-{i}")].map(|id| RecordId::parse(id).unwrap());
        let vectors = backend.features.get_batch(&ids).await.unwrap();
        assert_eq!(vectors[&ids[0]], vectors[&ids[1]], "a claim-checked payload vectorised as the same one inline");
    }
}
