//! An exported model's directory: the ONNX graph run by an independent runtime (tract, in
//! tools/onnx-check) agrees with MedSplit's own forward pass, the safetensors file reads back,
//! the card holds its checksums and damaged files are refused.

use std::path::{Path, PathBuf};
use std::process::Command;

use medsplit_agent::model_dir::{self, ModelDirError};
use medsplit_engine::api::JobSpec;
use medsplit_engine::export::infer::{Classifier, burn_logits, softmax_assign};
use medsplit_engine::export::{ModelCard, TrainedModel};

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("medsplit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A job spec of `model` and `preprocessing` (JSON values).
fn spec(model: &str, preprocessing: &str) -> JobSpec {
    serde_json::from_str(&format!(
        r#"{{"name": "export test", "hospitals": ["a", "b"], "model": {model},
            "preprocessing": {preprocessing}, "rounds": 2}}"#
    ))
    .unwrap()
}

/// The shapes checked: the three presets, side features with a tail (m1_tail on inter_patient)
/// and without one (three blocks on 96-sample beats).
fn cases() -> Vec<JobSpec> {
    vec![
        spec(r#""m1""#, r#""papers""#),
        spec(r#""m1_wide""#, r#""papers""#),
        spec(r#""m1_tail""#, r#""papers""#),
        spec(r#""m1_tail""#, r#""inter_patient""#),
        spec(
            r#"{"blocks": [{"channels": 8, "kernel": 9, "pool": 2},
                           {"channels": 6, "kernel": 5, "pool": 3},
                           {"channels": 4, "kernel": 3, "pool": 1}],
                "leaky_slope": 0.2}"#,
            r#"{"preset": "inter_patient", "beat_len": 96}"#,
        ),
    ]
}

/// A model of the spec's shapes with PyTorch's initialisation, and its card.
fn exported(spec: &JobSpec, seed: u64) -> (TrainedModel, ModelCard) {
    let mut model = TrainedModel::initial(&spec.model_config(), seed).unwrap();
    // Weights of a trained network's size rather than the initial ones: outputs that vary.
    for v in model.client.iter_mut().chain(&mut model.server) {
        *v *= 2.0;
    }
    let card = ModelCard::new(
        9,
        spec.clone(),
        spec.hospitals.clone(),
        2,
        None,
        "2026-12-01T15:00:00Z".into(),
        "agent 3 of a".into(),
    );
    (model, card)
}

/// `n` rows of waveform-like values and side features.
fn rows(n: usize, len: usize, seed: usize) -> Vec<f32> {
    (0..n * len)
        .map(|i| {
            let t = (i % len) as f32;
            (t * 0.17 + seed as f32).sin() * 1.3 + ((i * 7919 + seed) % 101) as f32 / 200.0
        })
        .collect()
}

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn write_f32(path: &Path, values: &[f32]) {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

fn worst(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn the_onnx_graph_agrees_with_medsplits_forward_pass() {
    let tmp = TempDir::new("onnx");
    let n = 33;
    let mut expected = Vec::new();
    let mut dirs = Vec::new();
    for (i, spec) in cases().iter().enumerate() {
        let (model, mut card) = exported(spec, 10 + i as u64);
        let dir = tmp.0.join(format!("case{i}"));
        model_dir::write(&dir, &model, &mut card, false).unwrap();
        let config = &model.config;
        let x = rows(n, config.input_len(), i);
        let (beats, features): (Vec<f32>, Vec<f32>) = {
            let mut b = Vec::new();
            let mut f = Vec::new();
            for row in x.chunks_exact(config.input_len()) {
                b.extend_from_slice(&row[..config.beat_len]);
                f.extend_from_slice(&row[config.beat_len..]);
            }
            (b, f)
        };
        std::fs::write(
            dir.join("shape.txt"),
            format!("{n} {} {}", config.beat_len, config.features),
        )
        .unwrap();
        write_f32(&dir.join("beat.f32"), &beats);
        if config.features > 0 {
            write_f32(&dir.join("features.f32"), &features);
        }
        let logits = burn_logits(&model, &x);
        let mut probabilities = logits.clone();
        probabilities
            .chunks_exact_mut(config.classes)
            .for_each(softmax_assign);
        expected.push((dir.clone(), model, x, logits, probabilities));
        dirs.push(dir);
    }

    // The independent runtime, built from its own lock file.
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/onnx-check/Cargo.toml");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["run", "--quiet", "--release", "--locked", "--manifest-path"])
        .arg(&manifest)
        .arg("--")
        .args(&dirs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "onnx-check failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    for (dir, model, x, logits, probabilities) in expected {
        let config = &model.config;
        let onnx_logits = read_f32(&dir.join("logits.f32"));
        let onnx_probabilities = read_f32(&dir.join("probabilities.f32"));
        let what = format!("{config:?}");
        let (dl, dp) = (
            worst(&onnx_logits, &logits),
            worst(&onnx_probabilities, &probabilities),
        );
        assert!(
            dl < 1e-5 && dp < 1e-5,
            "{what}: logits {dl}, probabilities {dp}"
        );
        // The inputs are not all classified alike: the check is not of a constant.
        let spread = logits
            .chunks_exact(config.classes)
            .map(|r| r[0] - r[1])
            .fold((f32::MAX, f32::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
        assert!(
            spread.1 - spread.0 > 1e-2,
            "{what}: logits hardly vary ({spread:?})"
        );
        // The plain-Rust pass that predict uses agrees too.
        let plain = Classifier::new(&model).logits(&x);
        assert!(worst(&plain, &logits) < 1e-5, "{what}: plain forward pass");
    }
}

#[test]
fn a_model_directory_reads_back_checked() {
    let tmp = TempDir::new("model-dir");
    let spec = spec(r#""m1_tail""#, r#""inter_patient""#);
    let (model, mut card) = exported(&spec, 4);
    let dir = tmp.0.join("model");
    model_dir::write(&dir, &model, &mut card, false).unwrap();
    let names: Vec<&str> = card.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, [model_dir::ONNX_FILE, model_dir::SAFETENSORS_FILE]);
    let onnx = std::fs::read(dir.join(model_dir::ONNX_FILE)).unwrap();
    assert_eq!(card.files[0].sha256, model_dir::sha256_hex(&onnx));
    let markdown = std::fs::read_to_string(dir.join(model_dir::CARD_MARKDOWN_FILE)).unwrap();
    assert!(markdown.contains(&card.files[1].sha256), "{markdown}");

    let (back, back_card) = model_dir::read(&dir).unwrap();
    assert_eq!(back, model);
    assert_eq!(back_card, card);

    // A directory in use is refused, unless asked.
    let err = model_dir::write(&dir, &model, &mut card, false).unwrap_err();
    assert!(matches!(err, ModelDirError::NotEmpty(_)), "{err}");
    model_dir::write(&dir, &model, &mut card, true).unwrap();

    // A changed weight file no longer matches the card.
    let weights = dir.join(model_dir::SAFETENSORS_FILE);
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&weights, bytes).unwrap();
    let err = model_dir::read(&dir).unwrap_err();
    assert!(
        matches!(&err, ModelDirError::Checksum { path, .. } if path == &weights),
        "{err}"
    );

    // A model of other shapes than its card's is not written.
    let other = spec_of_other_shape();
    let (wide, _) = exported(&other, 1);
    let err = model_dir::write(&tmp.0.join("other"), &wide, &mut card, false).unwrap_err();
    assert!(matches!(err, ModelDirError::Shapes { .. }), "{err}");
}

fn spec_of_other_shape() -> JobSpec {
    spec(r#""m1_wide""#, r#""papers""#)
}
