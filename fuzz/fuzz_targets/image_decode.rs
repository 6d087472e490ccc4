//! Image bytes as PNG and as JPEG, decoded under the default limits (dimensions and the
//! decoder's allocations) and preprocessed as the digits bundle says: an image within the
//! limits or an error, never a panic or an allocation past the limits. Ingest's structure check
//! (no pixels decoded) runs on the same bytes: it never panics, and passes every image a decode
//! passes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_core::envelope::ContentType;
use sluice_core::image::{ImageCheck, ImageLimits, check, decode};
use sluice_core::model::ModelManifest;

/// The digits bundle's manifest, read once.
static MANIFEST: std::sync::LazyLock<ModelManifest> =
    std::sync::LazyLock::new(|| toml::from_str(include_str!("../../models/digits/model.toml")).unwrap());

fuzz_target!(|data: &[u8]| {
    let manifest = &*MANIFEST;
    let spec = manifest.input.image.as_ref().unwrap();
    let limits = ImageLimits::default();
    for content_type in [ContentType::Png, ContentType::Jpeg] {
        let structure = check(data, content_type, &limits, ImageCheck::Structure);
        if let Ok(image) = decode(data, content_type, &limits) {
            assert!(image.width() <= limits.max_width && image.height() <= limits.max_height);
            assert_eq!(sluice_features::image::preprocess(&image, spec).len(), spec.vector_len());
            assert!(structure.is_ok(), "a decoded image failed the structure check: {structure:?}");
        }
    }
});
