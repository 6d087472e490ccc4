//! ImageNet preprocessing (shorter side to 256, centre crop 224) against torchvision's transforms
//! on the same pictures, computed once with Pillow by `bench/preprocess_reference.py` (what
//! torchvision runs on a PIL image) and committed beside them.
//!
//! Both resamplers are held to it: the one the stage uses (`fast_image_resize`) and `image`'s,
//! which it replaced.

use std::path::Path;

use image::DynamicImage;
use sluice_core::model::ImageInput;
use sluice_features::image::{Resampler, preprocess_with};

/// The largest and the mean difference from Pillow, in levels of 255, either resampler may show
/// (both round differently from Pillow's fixed point; measured: 1 and at most 0.17).
const TOLERANCE: (u8, f64) = (1, 0.25);

fn load(path: &Path) -> DynamicImage {
    image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn matches_torchvision_on_pil_images() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/imagenet");
    let spec = ImageInput::imagenet();
    let mut checked = 0;
    for (name, resampler, (max_levels, mean_levels)) in ["landscape-512x384", "portrait-300x500", "small-97x131"]
        .into_iter()
        .flat_map(|name| [(name, Resampler::Fast, TOLERANCE), (name, Resampler::Image, TOLERANCE)])
    {
        let ours = preprocess_with(&load(&dir.join(format!("{name}.png"))), &spec, resampler);
        let expected = load(&dir.join(format!("{name}.expected.png"))).to_rgb8();
        let plane = 224 * 224;
        let (mut worst, mut sum) = (0u8, 0u64);
        for (i, pixel) in expected.pixels().enumerate() {
            for c in 0..3 {
                let d = ours[c * plane + i].abs_diff(pixel.0[c]);
                worst = worst.max(d);
                sum += u64::from(d);
            }
        }
        let mean = sum as f64 / (3 * plane) as f64;
        println!("{name}, {resampler:?}: largest difference {worst} levels, mean {mean:.3}");
        assert!(worst <= max_levels && mean <= mean_levels, "{name} {resampler:?}: largest {worst}, mean {mean:.3}");
        checked += 1;
    }
    assert_eq!(checked, 6);
}
