//! The attack harness on synthetic beats: at batch size 1 the coordinator recovers every
//! activation and label exactly, from the backward message alone; the JSON has the documented
//! keys.

use std::process::Command;

use medsplit_engine::data::synthetic;
use medsplit_engine::model::{ModelConfig, Objective, ServerOptimizer};
use medsplit_engine::protocol::Privacy;
use medsplit_tools::attack::{self, AttackOptions, Target};

#[test]
fn batch_size_one_is_recovered_exactly_in_both_privacy_modes() {
    let train = synthetic(200, 7);
    let config = ModelConfig::m1();
    let target = Target {
        config: &config,
        objective: Objective::default(),
        optimizer: ServerOptimizer::default(),
        train: &train,
    };
    for privacy in [Privacy::Encrypted, Privacy::Plaintext] {
        let options = AttackOptions {
            batch_sizes: vec![1, 2],
            samples: 30,
            later: 60,
            privacy,
            reference_rows: 100,
            ..AttackOptions::default()
        };
        let report = attack::run(&target, &options).unwrap();
        assert_eq!(report.results.len(), 4, "two windows per batch size");
        for r in report.results.iter().filter(|r| r.batch_size == 1) {
            assert_eq!(r.samples, 30);
            assert_eq!(r.exact_share, 1.0, "{privacy:?} {r:?}");
            assert!(r.cosine_median > 0.9999, "{privacy:?} {r:?}");
            assert_eq!(r.label_recovery, Some(1.0), "{privacy:?} {r:?}");
        }
        // Two samples of a batch lie in the span of the summed gradient: still recovered well.
        for r in report.results.iter().filter(|r| r.batch_size == 2) {
            assert!(r.recovered_share >= 0.8, "{privacy:?} {r:?}");
        }
    }
}

#[test]
fn the_bench_writes_the_attack_json() {
    let dir = std::env::temp_dir().join(format!("medsplit-attack-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("attack.json");
    let output = Command::new(env!("CARGO_BIN_EXE_medsplit-bench"))
        .args([
            "--synthetic-train",
            "300",
            "--attack",
            "--attack-batch-sizes",
            "1,8",
        ])
        .args(["--attack-samples", "40", "--attack-malicious", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.contains("honest-but-curious"), "{table}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 4, "two attackers, two batch sizes");
    for r in results {
        for key in [
            "batch_size",
            "dp",
            "epsilon",
            "cosine_median",
            "recovered_share",
            "label_recovery",
            "knn_accuracy",
            "majority_rate",
        ] {
            assert!(r.get(key).is_some(), "{key} missing in {r}");
        }
        assert_eq!(r["dp"], false);
        if r["batch_size"] == 1 {
            assert_eq!(r["recovered_share"], 1.0, "{r}");
            assert_eq!(r["label_recovery"], 1.0, "{r}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}
