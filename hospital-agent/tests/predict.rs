//! `medsplit-agent predict` and `evaluate` with an exported model, on generated WFDB records,
//! beat files and CSV, and on the MIT-BIH records in ../shared/data/mitdb-raw when present.

use std::path::{Path, PathBuf};
use std::process::Command;

use medsplit_agent::model_dir;
use medsplit_agent::predict::{self, CsvOptions, Input};
use medsplit_engine::api::JobSpec;
use medsplit_engine::export::infer::Classifier;
use medsplit_engine::export::{ModelCard, TrainedModel};
use medsplit_engine::synthetic::Cohort;
use medsplit_engine::wfdb::{Annotation, Record};

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

/// Runs the agent; its success, standard output and standard error.
fn agent(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_medsplit-agent"))
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        stderr,
    )
}

/// An exported (untrained) model of `model` on `preprocessing` in `dir`.
fn export(dir: &Path, model: &str, preprocessing: &str) -> ModelCard {
    let spec: JobSpec = serde_json::from_str(&format!(
        r#"{{"name": "predict test", "hospitals": ["a"], "model": "{model}",
            "preprocessing": "{preprocessing}"}}"#
    ))
    .unwrap();
    let trained = TrainedModel::initial(&spec.model_config(), 21).unwrap();
    let mut card = ModelCard::new(
        1,
        spec,
        vec!["a".into()],
        1,
        None,
        "2026-12-01T15:00:00Z".into(),
        "test".into(),
    );
    model_dir::write(dir, &trained, &mut card, false).unwrap();
    card
}

/// Writes `record` as WFDB files in `dir`: `.hea`, `.dat` (format 212) and, with
/// `annotations`, `.atr` (MIT format).
fn write_record(dir: &Path, record: &Record, annotations: Option<&[Annotation]>) {
    let fs = record.header.sampling_frequency;
    write_signal(dir, record, fs, &record.signals[0], annotations);
}

/// [`write_record`] with `samples` at `fs` in place of the record's signal.
fn write_signal(
    dir: &Path,
    record: &Record,
    fs: f64,
    samples: &[i16],
    annotations: Option<&[Annotation]>,
) {
    let name = &record.header.record_name;
    let spec = &record.header.signals[0];
    let checksum = samples.iter().fold(0i16, |a, &s| a.wrapping_add(s));
    let header = format!(
        "{name} 1 {fs} {}\n{name}.dat 212 {} 12 {} {} {checksum} 0 {}\n",
        samples.len(),
        spec.gain,
        spec.adc_zero,
        samples[0],
        spec.description
    );
    std::fs::write(dir.join(format!("{name}.hea")), header).unwrap();
    let mut dat = Vec::new();
    for pair in samples.chunks(2) {
        let a = (pair[0] as u16) & 0x0fff;
        let b = (pair.get(1).copied().unwrap_or(0) as u16) & 0x0fff;
        dat.extend([
            (a & 0xff) as u8,
            ((a >> 8) | ((b >> 8) << 4)) as u8,
            (b & 0xff) as u8,
        ]);
    }
    std::fs::write(dir.join(format!("{name}.dat")), dat).unwrap();
    let Some(annotations) = annotations else {
        return;
    };
    let mut atr = Vec::new();
    let mut time = 0u64;
    for a in annotations {
        let diff = a.sample - time;
        if diff > 1023 {
            // SKIP: the interval as a PDP-11 long (high word first).
            atr.extend((59u16 << 10).to_le_bytes());
            atr.extend(((diff >> 16) as u16).to_le_bytes());
            atr.extend(((diff & 0xffff) as u16).to_le_bytes());
            atr.extend((u16::from(a.code) << 10).to_le_bytes());
        } else {
            atr.extend(((u16::from(a.code) << 10) | diff as u16).to_le_bytes());
        }
        time = a.sample;
    }
    atr.extend([0, 0]);
    std::fs::write(dir.join(format!("{name}.atr")), atr).unwrap();
}

/// The CSV lines of `predict` (header first).
fn csv_lines(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .map(|l| l.split(',').map(str::to_owned).collect())
        .collect()
}

#[test]
fn predict_and_evaluate_generated_records() {
    let tmp = TempDir::new("predict-wfdb");
    let cohort = Cohort {
        patients: 3,
        beats: 450,
        seed: 5,
    };
    let records = tmp.0.join("records");
    std::fs::create_dir_all(&records).unwrap();
    for i in 0..cohort.patients {
        let (record, annotations) = cohort.record(i);
        write_record(&records, &record, Some(&annotations));
    }
    let model = tmp.0.join("model");
    let card = export(&model, "m1_tail", "inter_patient");
    let model = model.to_str().unwrap();

    let (ok, out, err) = agent(&["predict", "--model", model, records.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(err.contains("classified 450 beats of 3 input(s)"), "{err}");
    let lines = csv_lines(&out);
    assert_eq!(
        lines[0].join(","),
        "record,beat,sample,class,p_N,p_S,p_V,p_F,p_Q"
    );
    assert_eq!(lines.len(), 451);

    // The same beats cut in process, classified by the same weights: the same classes and
    // probabilities, at the annotated R peaks.
    let beats = cohort
        .load(&card.spec.preprocessing, card.spec.labels)
        .unwrap();
    let (trained, _) = model_dir::read(Path::new(model)).unwrap();
    let probabilities = predict::probabilities(&Classifier::new(&trained), beats.rows());
    let (first, annotations) = cohort.record(0);
    let peaks: Vec<u64> = annotations
        .iter()
        .filter(|a| medsplit_engine::preprocess::is_beat(a.symbol))
        .map(|a| a.sample)
        .collect();
    for (i, line) in lines[1..].iter().enumerate() {
        let p: Vec<f32> = line[4..].iter().map(|v| v.parse().unwrap()).collect();
        assert_eq!(p, probabilities[i * 5..(i + 1) * 5], "line {}", i + 2);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        let best = predict::classes_of(&p, 5)[0];
        assert_eq!(line[3], card.classes[best]);
    }
    assert_eq!(lines[1][0], first.header.record_name);
    let first_beats: Vec<&Vec<String>> = lines[1..]
        .iter()
        .filter(|l| l[0] == first.header.record_name)
        .collect();
    assert_eq!(first_beats.len(), peaks.len());
    for (line, peak) in first_beats.iter().zip(&peaks) {
        assert_eq!(line[2], peak.to_string());
    }

    // JSON lines to a file; one record by name.
    let out_file = tmp.0.join("p.jsonl");
    let second = cohort.patient_name(1);
    let (ok, _, err) = agent(&[
        "predict",
        "--model",
        model,
        "--format",
        "json",
        "--out",
        out_file.to_str().unwrap(),
        records.join(format!("{second}.hea")).to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let text = std::fs::read_to_string(&out_file).unwrap();
    let values: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(values.len(), cohort.beats_of(1));
    assert_eq!(values[0]["record"], second.as_str());
    assert_eq!(values[0]["probabilities"].as_array().unwrap().len(), 5);

    // evaluate: the figures of the same predictions.
    let (ok, report, err) = agent(&[
        "evaluate",
        "--model",
        model,
        records.to_str().unwrap(),
        "--records",
        &format!("{},{second}", cohort.patient_name(0)),
    ]);
    assert!(ok, "{err}");
    let inputs = predict::resolve(
        std::slice::from_ref(&records),
        Some(&[cohort.patient_name(0), second.clone()]),
    )
    .unwrap();
    let mut pooled: Option<medsplit_engine::metrics::Confusion> = None;
    for input in &inputs {
        let beats = predict::load(input, &card.spec, CsvOptions::default()).unwrap();
        let p = predict::probabilities(&Classifier::new(&trained), beats.dataset.rows());
        let c = predict::confusion(&card, &beats, &p).unwrap();
        match &mut pooled {
            None => pooled = Some(c),
            Some(all) => all.merge(&c).unwrap(),
        }
    }
    let pooled = pooled.unwrap();
    let all_line = report
        .lines()
        .find(|l| l.trim_start().starts_with("all "))
        .unwrap_or_else(|| panic!("no pooled line in\n{report}"));
    let cells: Vec<&str> = all_line.split_whitespace().collect();
    assert_eq!(cells[1], pooled.total().to_string(), "{report}");
    assert_eq!(
        cells[2],
        format!("{:.2}", 100.0 * pooled.accuracy()),
        "{report}"
    );
    assert_eq!(
        cells[4],
        format!("{:.2}", 100.0 * pooled.majority_rate()),
        "{report}"
    );
    for needle in [
        "per class",
        "Se",
        "PPV",
        "confusion matrix",
        "true \\ predicted",
    ] {
        assert!(report.contains(needle), "missing {needle:?} in\n{report}");
    }

    // A record named that is not there, and one without annotations.
    let (ok, _, err) = agent(&[
        "evaluate",
        "--model",
        model,
        records.to_str().unwrap(),
        "--records",
        "nope",
    ]);
    assert!(!ok && err.contains("record nope is not in"), "{err}");
    let bare = tmp.0.join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    write_record(&bare, &first, None);
    let (ok, _, err) = agent(&["predict", "--model", model, bare.to_str().unwrap()]);
    assert!(
        !ok && err.contains("no annotation file") && err.contains(".atr"),
        "{err}"
    );
}

#[test]
fn records_at_another_sampling_rate_are_cut_in_seconds() {
    let tmp = TempDir::new("predict-250hz");
    let cohort = Cohort {
        patients: 1,
        beats: 120,
        seed: 8,
    };
    let (record, annotations) = cohort.record(0);
    // The 360 Hz signal linearly interpolated at 250 Hz, the annotations moved with it.
    let x = &record.signals[0];
    let ratio = 360.0 / 250.0;
    let resampled: Vec<i16> = (0..((x.len() - 1) as f64 / ratio) as usize)
        .map(|i| {
            let t = i as f64 * ratio;
            let (k, f) = (t as usize, t.fract());
            (f64::from(x[k]) * (1.0 - f) + f64::from(x[k + 1]) * f).round() as i16
        })
        .collect();
    let moved: Vec<Annotation> = annotations
        .iter()
        .map(|a| Annotation {
            sample: ((a.sample as f64 / ratio).round() as u64).min(resampled.len() as u64 - 1),
            ..a.clone()
        })
        .collect();
    write_signal(&tmp.0, &record, 250.0, &resampled, Some(&moved));
    let model = tmp.0.join("model");
    export(&model, "m1_tail", "inter_patient");
    let (ok, out, err) = agent(&[
        "predict",
        "--model",
        model.to_str().unwrap(),
        tmp.0.join(&record.header.record_name).to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let peaks: Vec<String> = moved
        .iter()
        .filter(|a| medsplit_engine::preprocess::is_beat(a.symbol))
        .map(|a| a.sample.to_string())
        .collect();
    let samples: Vec<String> = csv_lines(&out)[1..].iter().map(|l| l[2].clone()).collect();
    assert_eq!(samples, peaks);
}

#[test]
fn predict_beat_files_and_csv() {
    let tmp = TempDir::new("predict-beats");
    let data = medsplit_engine::data::synthetic(120, 3);
    let beats_dir = tmp.0.join("beats");
    std::fs::create_dir_all(&beats_dir).unwrap();
    let f32_bytes: Vec<u8> = data.rows().iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(beats_dir.join("test.f32"), f32_bytes).unwrap();
    std::fs::write(beats_dir.join("test.labels"), data.labels()).unwrap();
    // Provenance: record 100 + i / 60, R peak at 1000 · i.
    let src: Vec<u8> = (0..data.len() as u32)
        .flat_map(|i| [(100 + i / 60).to_le_bytes(), (1000 * i).to_le_bytes()].concat())
        .collect();
    std::fs::write(beats_dir.join("test.src.u32"), src).unwrap();
    let csv: String = (0..data.len())
        .map(|i| {
            let values: Vec<String> = data.row(i).iter().map(f32::to_string).collect();
            format!("{},{}\n", data.labels()[i], values.join(","))
        })
        .collect();
    let csv_path = tmp.0.join("beats.csv");
    std::fs::write(&csv_path, csv).unwrap();

    let model = tmp.0.join("model");
    export(&model, "m1", "papers");
    let model = model.to_str().unwrap();
    let (ok, from_beats, err) = agent(&[
        "predict",
        "--model",
        model,
        beats_dir.join("test").to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let lines = csv_lines(&from_beats);
    assert_eq!(lines.len(), 121);
    assert_eq!(lines[1][..3], ["100", "0", "0"]);
    assert_eq!(lines[61][..3], ["101", "60", "60000"]);

    // The CSV rows are the same beats: the same classes and probabilities (the CSV has no
    // record or R-peak sample: the file's name and an empty sample).
    let (ok, from_csv, err) = agent(&[
        "predict",
        "--model",
        model,
        "--csv-labels",
        "papers",
        csv_path.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let csv_rows = csv_lines(&from_csv);
    assert_eq!(csv_rows.len(), 121);
    assert_eq!(csv_rows[1][..3], ["beats", "0", ""]);
    for (a, b) in lines[1..].iter().zip(&csv_rows[1..]) {
        assert_eq!(a[3..], b[3..]);
    }

    // evaluate: the papers' labels in the AAMI classes the job trains on (the default label set).
    let (ok, report, err) = agent(&["evaluate", "--model", model, beats_dir.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(report.contains("120 beats"), "{report}");

    // A model cut with other preprocessing cannot take the papers' beat files.
    let other = tmp.0.join("other");
    export(&other, "m1_tail", "inter_patient");
    let (ok, _, err) = agent(&[
        "predict",
        "--model",
        other.to_str().unwrap(),
        beats_dir.join("test.f32").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("papers preprocessing"), "{err}");
    let (ok, _, err) = agent(&[
        "predict",
        "--model",
        model,
        tmp.0.join("nothing").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("not a WFDB record"), "{err}");
}

#[test]
fn predict_and_evaluate_mitdb_records() {
    let raw = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/mitdb-raw");
    if !raw.join("100.hea").is_file() {
        println!("SKIPPED: ../shared/data/mitdb-raw not found");
        return;
    }
    let tmp = TempDir::new("predict-mitdb");
    let model = tmp.0.join("model");
    let card = export(&model, "m1_tail", "inter_patient");
    let model = model.to_str().unwrap();
    let (ok, out, err) = agent(&[
        "predict",
        "--model",
        model,
        raw.join("100").to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let expected = medsplit_engine::wfdb::load_records_with(
        &raw,
        &["100"],
        &card.spec.preprocessing,
        card.spec.labels,
    )
    .unwrap();
    assert_eq!(out.lines().count(), expected.len() + 1);

    let (ok, report, err) = agent(&[
        "evaluate",
        "--model",
        model,
        raw.to_str().unwrap(),
        "--records",
        "100,103",
    ]);
    assert!(ok, "{err}");
    for needle in [
        "inputs: 2",
        "  100 ",
        "  103 ",
        "  all ",
        "confusion matrix",
    ] {
        assert!(report.contains(needle), "missing {needle:?} in\n{report}");
    }
}

#[test]
fn inputs_are_resolved_by_kind() {
    let tmp = TempDir::new("resolve");
    std::fs::write(tmp.0.join("7.hea"), "").unwrap();
    std::fs::write(tmp.0.join("b.f32"), "").unwrap();
    let resolved = predict::resolve(
        &[
            tmp.0.join("7"),
            tmp.0.join("7.hea"),
            tmp.0.join("b"),
            tmp.0.join("x.csv"),
        ],
        None,
    )
    .unwrap();
    assert_eq!(
        resolved,
        [
            Input::Wfdb {
                dir: tmp.0.clone(),
                record: "7".into()
            },
            Input::Wfdb {
                dir: tmp.0.clone(),
                record: "7".into()
            },
            Input::Beats {
                dir: tmp.0.clone(),
                stem: "b".into()
            },
            Input::Csv {
                path: tmp.0.join("x.csv")
            },
        ]
    );
    // A directory of records takes its records, not its beat files.
    assert_eq!(
        predict::resolve(std::slice::from_ref(&tmp.0), None).unwrap(),
        [Input::Wfdb {
            dir: tmp.0.clone(),
            record: "7".into()
        }]
    );
}
