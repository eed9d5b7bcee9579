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
    assert!(table.contains("| split-he | 4 | 2 |"), "{table}");

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
            // One 46-bit-packed body (11.8 kB) per forward and three per backward.
            _ => assert!(up > 100 * 4 * 11_000 && down > 100 * 15_000, "{up} {down}"),
        }
    }
    // local and split compute the same thing: same accuracy.
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
            "split,split-he",
            "--transport",
            "websocket",
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
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for r in results {
        assert_eq!(r["transport"], "websocket");
        assert_eq!(r["epoch_seconds"].as_array().unwrap().len(), 2);
        let acc = r["test_accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc));
    }
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
