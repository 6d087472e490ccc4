//! A ResNet-18 bundle end to end: `sluice bundle resnet18` checks torchvision-named weights
//! against the labels, and the pipeline classifies photos of any size and shape with ImageNet
//! preprocessing. The weights are seeded random ones (no trained ResNet can be downloaded
//! here): the test checks the plumbing and the arithmetic, not what the photos show.

mod common;

use std::io::Cursor;
use std::path::Path;
use std::process::Command;

use common::{bin, test_env};
use image::{DynamicImage, ImageFormat, RgbImage};
use sluice_core::envelope::ContentType;
use sluice_core::image::ImageLimits;
use sluice_core::model::ModelBundle;
use sluice_inference::model::CandleClassifier;

const CLASSES: usize = 10;

fn sluice(bundle: &Path, args: &[&str]) -> std::process::Output {
    let out = test_env(&mut Command::new(bin("sluice"))).env("SLUICE__MODEL__DIR", bundle).args(args).output().unwrap();
    assert!(out.status.success(), "sluice {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// `sluice bundle resnet18` of `weights` (none: `--random-weights`), whatever its outcome.
fn bundle_resnet18(weights: Option<&Path>, labels: &Path, out: &Path) -> std::process::Output {
    let mut command = Command::new(bin("sluice"));
    command.args(["bundle", "resnet18"]);
    match weights {
        Some(weights) => command.arg("--weights").arg(weights),
        None => command.arg("--random-weights"),
    };
    command.arg("--labels").arg(labels).arg("--out").arg(out).output().unwrap()
}

fn photo(width: u32, height: u32, format: ImageFormat) -> Vec<u8> {
    let img = RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x * 255 / width) as u8, (y * 255 / height) as u8, ((x + y) % 256) as u8])
    });
    let mut out = Vec::new();
    DynamicImage::ImageRgb8(img).write_to(&mut Cursor::new(&mut out), format).unwrap();
    out
}

#[test]
fn a_resnet18_bundle_classifies_photos_through_the_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("resnet18.safetensors");
    sluice_cli::resnet18::write_random_weights(&weights, CLASSES, 7).unwrap();
    let labels = dir.path().join("labels.txt");
    std::fs::write(&labels, (0..CLASSES).map(|i| format!("kind {i}\n")).collect::<String>()).unwrap();

    // Labels that do not match the weights' outputs: refused, and no bundle is left behind.
    let few = dir.path().join("few.txt");
    std::fs::write(&few, "a\nb\nc\n").unwrap();
    let wrong = dir.path().join("wrong");
    let out = bundle_resnet18(Some(&weights), &few, &wrong);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("3 classes"), "{stderr}");
    assert!(!wrong.exists());

    let bundle_dir = dir.path().join("bundle");
    let out = bundle_resnet18(Some(&weights), &labels, &bundle_dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bundle = ModelBundle::load(&bundle_dir).unwrap();

    // Landscape, portrait and square photos, JPEG and PNG, none of them 224×224.
    let files = dir.path().join("photos");
    std::fs::create_dir(&files).unwrap();
    let photos = [
        ("wide.jpg", photo(640, 360, ImageFormat::Jpeg), ContentType::Jpeg),
        ("tall.png", photo(180, 300, ImageFormat::Png), ContentType::Png),
        ("square.png", photo(96, 96, ImageFormat::Png), ContentType::Png),
    ];
    for (name, data, _) in &photos {
        std::fs::write(files.join(name), data).unwrap();
    }
    let store = dir.path().join("s.sqlite");
    let store = store.to_str().unwrap();
    sluice(&bundle_dir, &["produce", "--store", store, "--dir", files.to_str().unwrap()]);
    sluice(&bundle_dir, &["run", "--store", store, "--until-drained"]);

    let stats: serde_json::Value =
        serde_json::from_slice(&sluice(&bundle_dir, &["stats", "--store", store, "--json"]).stdout).unwrap();
    assert_eq!(stats["records_in"], 3, "{stats}");
    assert_eq!(stats["results"].as_u64().unwrap() + stats["review"].as_u64().unwrap(), 3, "{stats}");

    // Each result is what the model gives for that photo preprocessed as the features stage does.
    let classifier = CandleClassifier::load(&bundle, candle_core::Device::Cpu, "candle-cpu").unwrap();
    let mut expected: Vec<Vec<f32>> = photos
        .iter()
        .map(|(_, data, content_type)| {
            let vector =
                sluice_features::vectorise(&bundle.manifest, *content_type, data, &ImageLimits::default()).unwrap();
            assert_eq!(vector.len(), 3 * 224 * 224);
            // Normalised here, on the CPU, as vectors were before they were stored as pixels:
            // the pipeline normalises on the model's device, and the two must agree.
            let values = vector.to_values(bundle.manifest.input.image.as_ref()).unwrap();
            classifier.predict(&values, 1).unwrap().remove(0)
        })
        .collect();
    let listed = String::from_utf8(sluice(&bundle_dir, &["results", "--store", store, "--json"]).stdout).unwrap();
    let results: Vec<serde_json::Value> = listed.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(results.len(), 3, "{listed}");
    for result in &results {
        assert_eq!(result["model"], "resnet18");
        assert_eq!(result["backend"], "candle-cpu");
        let got: Vec<f32> =
            result["probabilities"].as_array().unwrap().iter().map(|p| p.as_f64().unwrap() as f32).collect();
        assert_eq!(got.len(), CLASSES);
        let position = expected
            .iter()
            .position(|want| want.iter().zip(&got).all(|(a, b)| (a - b).abs() < 1e-5))
            .unwrap_or_else(|| panic!("{got:?} is none of {expected:?}"));
        expected.remove(position);
        let best = (0..CLASSES).max_by(|&a, &b| got[a].total_cmp(&got[b])).unwrap();
        assert_eq!(result["label"], format!("kind {best}"));
    }
}

#[test]
fn a_bundle_with_random_weights_gets_the_seeded_stand_in_weights() {
    let dir = tempfile::tempdir().unwrap();
    let labels = dir.path().join("labels.txt");
    std::fs::write(&labels, (0..CLASSES).map(|i| format!("kind {i}\n")).collect::<String>()).unwrap();
    let out_dir = dir.path().join("bundle");
    let neither = Command::new(bin("sluice"))
        .args(["bundle", "resnet18", "--labels"])
        .arg(&labels)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(!neither.status.success() && !out_dir.exists(), "weights, or random ones, must be asked for");
    let out = bundle_resnet18(None, &labels, &out_dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let expected = dir.path().join("expected.safetensors");
    sluice_cli::resnet18::write_random_weights(&expected, CLASSES, 0).unwrap();
    let bundle = ModelBundle::load(&out_dir).unwrap();
    assert_eq!(bundle.manifest.labels.len(), CLASSES);
    let written = std::fs::read(out_dir.join(sluice_core::model::WEIGHTS_FILE)).unwrap();
    assert!(written == std::fs::read(&expected).unwrap(), "the bundle holds the seed-0 weights");
    // Readable by others (a container's worker runs as a user of its own), not the staging
    // folder's private mode.
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&out_dir), 0o755);
    assert_eq!(mode(&out_dir.join(sluice_core::model::WEIGHTS_FILE)), 0o644);

    // Labels twice: refused before anything is made, naming the flag.
    std::fs::write(&labels, "cat\ncat\ndog\n").unwrap();
    let again = dir.path().join("again");
    let out = bundle_resnet18(None, &labels, &again);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !again.exists(), "{stderr}");
    assert!(stderr.contains("\"cat\" comes twice") && stderr.contains("--labels"), "{stderr}");
}
