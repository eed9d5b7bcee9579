//! `medsplit-bench` end to end: a short run on synthetic beats writes the documented JSON.

use std::process::Command;

#[test]
fn bench_writes_the_documented_json() {
    let dir = std::env::temp_dir().join(format!("medsplit-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("out.json");
    let output = Command::new(env!("CARGO_BIN_EXE_medsplit-bench"))
        .args([
            "--synthetic-train",
            "400",
            "--synthetic-test",
            "100",
            "--epochs",
            "2",
        ])
        .args([
            "--batch-size",
            "4",
            "--batches-in-flight",
            "1",
            "--modes",
            "local,split,split-he",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.contains("| split-he | 4 | 1 | 2 |"), "{table}");

    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["dataset"], "synthetic");
    assert_eq!(report["train_samples"], 400);
    assert_eq!(report["test_samples"], 100);
    assert!(report["threads"].as_u64().unwrap() >= 1);
    let results = report["results"].as_array().unwrap();
    let modes: Vec<&str> = results
        .iter()
        .map(|r| r["mode"].as_str().unwrap())
        .collect();
    assert_eq!(modes, ["local", "split", "split-he"]);
    for r in results {
        assert_eq!(r["transport"], "in-process");
        assert_eq!(r["batch_size"], 4);
        assert_eq!(r["batches_in_flight"], 1);
        assert_eq!(r["epochs"], 2);
        assert!(r["seconds_per_epoch"].as_f64().unwrap() > 0.0);
        let accuracy = r["test_accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&accuracy));
        let up = r["bytes_client_to_server_per_epoch"].as_u64().unwrap();
        let down = r["bytes_server_to_client_per_epoch"].as_u64().unwrap();
        match r["mode"].as_str().unwrap() {
            "local" => assert_eq!((up, down), (0, 0)),
            // 100 batches of 4 beats: 4·256 f32 up and 4·5 f32 down per forward at least.
            "split" => assert!(up > 100 * 4 * 256 * 4 && down > 100 * 4 * 5 * 4),
            // Per batch of four: one 46-bit-packed body (11.8 kB) for the forward and one
            // for the backward up; three logit and three input-gradient outputs down.
            _ => assert!(
                up > 100 * 2 * 11_000 && down > 100 * 6 * 8_000,
                "{up} {down}"
            ),
        }
    }
    // local and split, one batch at a time, compute the same thing: same accuracy.
    assert_eq!(results[0]["test_accuracy"], results[1]["test_accuracy"]);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bench_refuses_bad_arguments_with_a_clear_message() {
    let output = Command::new(env!("CARGO_BIN_EXE_medsplit-bench"))
        .args(["--data", "/nonexistent-medsplit-dir", "--epochs", "1"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot read /nonexistent-medsplit-dir/train.f32"),
        "{stderr}"
    );
}

#[test]
fn bench_runs_through_a_real_coordinator_over_websocket() {
    if std::env::var_os("DATABASE_URL").is_none() {
        eprintln!("SKIPPED: DATABASE_URL not set (scripts/test provides one)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("medsplit-bench-ws-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("out.json");
    let output = Command::new(env!("CARGO_BIN_EXE_medsplit-bench"))
        .args([
            "--synthetic-train",
            "200",
            "--synthetic-test",
            "50",
            "--epochs",
            "2",
        ])
        .args([
            "--modes",
            "split,split-he,cyclic-he",
            "--hospitals",
            "2",
            "--rounds",
            "3",
            "--local-steps",
            "5",
            "--transport",
            "websocket",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    for (r, epochs) in results.iter().zip([2, 2, 3]) {
        assert_eq!(r["transport"], "websocket");
        assert_eq!(r["epoch_seconds"].as_array().unwrap().len(), epochs);
        let acc = r["test_accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc));
        let support: u64 = r["metrics"]["confusion"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| row.as_array().unwrap())
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert_eq!(support, 50, "every test beat is counted once");
    }
    // Cyclic: two hospitals, each with its own agent, three rounds of five batches per visit,
    // the client weights handed from agent to agent through the coordinator.
    let cyclic = &results[2];
    assert_eq!(cyclic["mode"], "cyclic-he");
    assert_eq!(
        (cyclic["epochs"].as_u64(), cyclic["local_steps"].as_u64()),
        (Some(3), Some(5))
    );
    assert_eq!(cyclic["hospitals"].as_array().unwrap().len(), 2);
    assert!(stderr.contains("in 6 visits"), "{stderr}");
    // Encryption costs traffic: split-he moves far more bytes than plaintext split.
    let up = |i: usize| {
        results[i]["bytes_client_to_server_per_epoch"]
            .as_u64()
            .unwrap()
    };
    assert!(up(1) > 5 * up(0), "split {} vs split-he {}", up(0), up(1));
    // Local training has no network to go through.
    let output = Command::new(env!("CARGO_BIN_EXE_medsplit-bench"))
        .args([
            "--synthetic-train",
            "20",
            "--epochs",
            "1",
            "--modes",
            "local",
            "--transport",
            "websocket",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("needs a split mode"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The inter-patient benchmark on the raw MIT-BIH records: DS1 trains, DS2 tests, AAMI classes,
/// whole patients on each side; cyclic-he divides DS1's patients among hospitals.
#[test]
fn inter_patient_benchmark_reports_clinical_metrics_by_patient() {
    let records = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/data/mitdb-raw"
    ));
    if !records.join("100.hea").is_file() {
        eprintln!("SKIPPED: ../shared/data/mitdb-raw not found");
        return;
    }
    let dir = std::env::temp_dir().join(format!("medsplit-bench-ip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("out.json");
    let output = Command::new(env!("CARGO_BIN_EXE_medsplit-bench"))
        .arg("--records")
        .arg(records)
        .args(["--split", "inter-patient", "--modes", "local,cyclic-he"])
        .args([
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--hospitals",
            "3",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["evaluation"], "patient");
    assert_eq!(
        report["labels"],
        serde_json::json!(["N", "S", "V", "F", "Q"])
    );
    // The beat counts of the data's README (every AAMI beat of DS1 and DS2).
    assert_eq!(report["train_samples"], 51_021);
    assert_eq!(report["test_samples"], 49_712);
    let train: Vec<&str> = report["train_patients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let test: Vec<&str> = report["test_patients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!((train.len(), test.len()), (22, 22));
    assert!(
        train.iter().all(|p| !test.contains(p)),
        "a patient on both sides"
    );
    for r in report["results"].as_array().unwrap() {
        let m = &r["metrics"];
        let confusion = m["confusion"].as_array().unwrap();
        let total: u64 = confusion
            .iter()
            .flat_map(|row| row.as_array().unwrap())
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert_eq!(total, 49_712);
        // DS2's N share: the figure to beat.
        let majority = m["majority_rate"].as_f64().unwrap();
        assert!((majority - 44_259.0 / 49_712.0).abs() < 1e-9, "{majority}");
        for class in ["N", "S", "V", "F", "Q"] {
            let c = &m["per_class"][class];
            for key in ["se", "ppv", "f1"] {
                assert!(
                    (0.0..=1.0).contains(&c[key].as_f64().unwrap()),
                    "{class} {key}"
                );
            }
        }
        assert_eq!(m["per_class"]["S"]["support"], 1_837);
        assert_eq!(m["per_class"]["V"]["support"], 3_221);
        if r["mode"] == "cyclic-he" {
            let hospitals = r["hospitals"].as_array().unwrap();
            assert_eq!(hospitals.len(), 3);
            let mut all: Vec<&str> = hospitals
                .iter()
                .flat_map(|h| h.as_array().unwrap())
                .map(|p| p.as_str().unwrap())
                .collect();
            all.sort_unstable();
            let mut expected = train.clone();
            expected.sort_unstable();
            assert_eq!(all, expected, "each DS1 patient at exactly one hospital");
            assert!(r["bytes_client_to_server_per_epoch"].as_u64().unwrap() > 0);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// In-process cyclic-he with `--local-steps`: each visit trains that many batches, so twice the
/// steps move twice the traffic per round.
#[test]
fn cyclic_visits_train_the_local_steps_asked_for() {
    let dir = std::env::temp_dir().join(format!("medsplit-bench-steps-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |steps: &str| {
        let json = dir.join(format!("steps-{steps}.json"));
        let output = Command::new(env!("CARGO_BIN_EXE_medsplit-bench"))
            .args(["--synthetic-train", "120", "--synthetic-test", "40"])
            .args(["--modes", "cyclic-he", "--hospitals", "2", "--rounds", "2"])
            .args(["--local-steps", steps, "--json"])
            .arg(&json)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{stderr}");
        assert!(stderr.contains("beats dealt in turn"), "{stderr}");
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        let r = report["results"][0].clone();
        assert_eq!(
            (r["epochs"].as_u64(), r["local_steps"].as_u64()),
            (Some(2), steps.parse().ok())
        );
        r["bytes_client_to_server_per_epoch"].as_u64().unwrap() as f64
    };
    let (few, more) = (run("3"), run("6"));
    let ratio = more / few;
    assert!(
        (1.9..2.1).contains(&ratio),
        "{few} vs {more} bytes up per round"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_exported_cyclic_model_reproduces_the_benchmarks_figures_in_plaintext() {
    use medsplit_agent::predict::{self, CsvOptions, Input, Model};
    let dir = std::env::temp_dir().join(format!("medsplit-bench-export-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data = dir.join("beats");
    std::fs::create_dir_all(&data).unwrap();
    for (stem, n, seed) in [("train", 600, 1), ("test", 300, 2)] {
        let beats = medsplit_engine::data::synthetic(n, seed);
        let bytes: Vec<u8> = beats.rows().iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(data.join(format!("{stem}.f32")), bytes).unwrap();
        std::fs::write(data.join(format!("{stem}.labels")), beats.labels()).unwrap();
    }
    let (export, json) = (dir.join("model"), dir.join("out.json"));
    let output = Command::new(env!("CARGO_BIN_EXE_medsplit-bench"))
        .arg("--data")
        .arg(&data)
        .args(["--modes", "cyclic-he", "--epochs", "2", "--hospitals", "2"])
        .args(["--batch-size", "16", "--export"])
        .arg(&export)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let rows: Vec<Vec<u64>> =
        serde_json::from_value(report["results"][0]["metrics"]["confusion"].clone()).unwrap();
    let classes = report["labels"].as_array().unwrap();
    let classes = classes
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    let bench = medsplit_engine::metrics::Confusion::from_counts(classes, &rows).unwrap();

    // The card holds the run's figures; evaluating the exported files in plaintext gives them
    // again (the benchmark measured through HE).
    let model = Model::open(&export).unwrap();
    let evaluation = model.card.evaluation.as_ref().unwrap();
    assert_eq!(evaluation.pooled, bench);
    assert_eq!(
        (model.card.rounds, model.card.hospitals.len()),
        (2, 2),
        "{:?}",
        model.card
    );
    let input = Input::Beats {
        dir: data.clone(),
        stem: "test".into(),
    };
    let beats = predict::load(&input, &model.card.spec, CsvOptions::default()).unwrap();
    let p = predict::probabilities(&model.classifier, beats.dataset.rows());
    let plain = predict::confusion(&model.card, &beats, &p).unwrap();
    assert_eq!(plain.total(), 300);
    let mut figures = vec![(plain.accuracy(), bench.accuracy())];
    for c in 0..5 {
        let (a, b) = (plain.class_metrics(c), bench.class_metrics(c));
        figures.extend([(a.se, b.se), (a.ppv, b.ppv), (a.f1, b.f1)]);
    }
    for (a, b) in figures {
        assert!(
            (a - b).abs() <= 0.001,
            "{a} vs {b}: {:?} / {:?}",
            plain.rows(),
            bench.rows()
        );
    }

    // A second export into the same directory is refused before training.
    let output = Command::new(env!("CARGO_BIN_EXE_medsplit-bench"))
        .arg("--data")
        .arg(&data)
        .args(["--modes", "cyclic-he", "--epochs", "1", "--export"])
        .arg(&export)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("not empty"));
    std::fs::remove_dir_all(&dir).ok();
}
