//! The README's first command, shortened: `medsplit demo` with real processes.

use std::process::Command;

#[test]
fn the_demo_trains_a_cyclic_job_across_real_processes() {
    if std::env::var_os("DATABASE_URL").is_none() {
        eprintln!("SKIPPED: DATABASE_URL not set (scripts/test provides one)");
        return;
    }
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_medsplit"));
    if !exe.with_file_name("medsplit-agent").exists() {
        // cargo builds every binary of the workspace before running `cargo test --workspace`.
        panic!("medsplit-agent is not built next to {}", exe.display());
    }
    let json = std::env::temp_dir().join(format!("medsplit-demo-test-{}.json", std::process::id()));
    let export = std::env::temp_dir().join(format!("medsplit-demo-model-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&export);
    let out = Command::new(exe)
        .args([
            "demo",
            "--rounds",
            "2",
            "--hospitals",
            "2",
            "--samples",
            "300",
            "--json",
        ])
        .arg(&json)
        .arg("--export")
        .arg(&export)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Each round: the kind of split, every hospital's accuracy next to its majority-class
    // rate, and per-class figures of the pooled matrix.
    for needle in [
        "model m1 (conv 16×k7/2 → conv 8×k5/2 → cut 256 (encrypted) → server 5)",
        "round  1: test sets split by patient",
        "round  2: test sets split by patient",
        "accuracy   majority  macro-F1  bal. acc.",
        "per class",
    ] {
        assert!(stdout.contains(needle), "{needle:?} not in\n{stdout}");
    }
    for h in ["hospital-1", "hospital-2", "pooled"] {
        let rows = stdout
            .lines()
            .filter(|l| l.trim_start().starts_with(&format!("{h} ")) && l.contains(" patient "))
            .count();
        assert_eq!(rows, 2, "one row per round for {h}:\n{stdout}");
    }
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(summary["status"], "completed");
    assert_eq!(summary["visits"], 4);
    assert_eq!(summary["he"], true);
    let rounds = summary["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2);
    for r in rounds {
        for h in ["hospital-1", "hospital-2"] {
            let acc = r["test_accuracy"][h].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&acc));
            let majority = r["test_majority_rate"][h].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&majority));
        }
        let pooled = &r["pooled_test"];
        assert_eq!(pooled["kind"], "patient");
        let total: u64 = pooled["per_class"]
            .as_object()
            .unwrap()
            .values()
            .map(|c| c["support"].as_u64().unwrap())
            .sum();
        let counted: u64 = pooled["confusion"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| row.as_array().unwrap())
            .map(|n| n.as_u64().unwrap())
            .sum();
        assert!(total > 0 && total == counted, "{pooled}");
    }
    // The last hospital exported the final model and measured it on its held-out patients, in
    // plaintext: the beats and the accuracy it reported for the last round, through HE (a beat
    // near a decision boundary may fall the other way).
    let figures = |start: &str| -> (u64, f64) {
        let line = stdout
            .lines()
            .rfind(|l| l.trim_start().starts_with(start) && l.contains(" patient "))
            .unwrap_or_else(|| panic!("no {start:?} line in\n{stdout}"));
        let words: Vec<&str> = line[line.find(" patient ").unwrap()..]
            .split_whitespace()
            .collect();
        (words[1].parse().unwrap(), words[2].parse().unwrap())
    };
    assert!(
        stdout.contains("hospital-2 evaluates the exported model on its held-out patients"),
        "{stdout}"
    );
    let (beats, trained) = figures("hospital-2 ");
    let (exported_beats, exported) = figures("held-out test set ");
    assert_eq!(beats, exported_beats, "{stdout}");
    assert!(
        (trained - exported).abs() * beats as f64 <= 100.0 * 1.01,
        "{trained} % through HE, {exported} % exported:\n{stdout}"
    );
    assert!(export.join("model.onnx").is_file() && export.join("model-card.json").is_file());
    assert_eq!(summary["export"]["hospital"], "hospital-2");
    std::fs::remove_dir_all(&export).unwrap();
    std::fs::remove_file(&json).unwrap();
}

/// `medsplit demo --records DIR`: each hospital's agent holds whole patients of raw records and
/// holds some of them out; the job trains the inter-patient configuration on AAMI classes.
#[test]
fn the_demo_gives_each_hospital_whole_patients_of_raw_records() {
    if std::env::var_os("DATABASE_URL").is_none() {
        eprintln!("SKIPPED: DATABASE_URL not set (scripts/test provides one)");
        return;
    }
    let raw = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/data/mitdb-raw"
    ));
    if !raw.join("100.hea").is_file() {
        eprintln!("SKIPPED: ../shared/data/mitdb-raw not found");
        return;
    }
    // Six records (two hospitals of three patients), so the run stays short; a paced record
    // beside them is left out.
    let dir = std::env::temp_dir().join(format!("medsplit-demo-records-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for record in ["100", "101", "103", "105", "106", "119", "107"] {
        for ext in ["hea", "dat", "atr"] {
            let name = format!("{record}.{ext}");
            std::os::unix::fs::symlink(raw.join(&name), dir.join(&name)).unwrap();
        }
    }
    let json = dir.join("summary.json");
    let out = Command::new(env!("CARGO_BIN_EXE_medsplit"))
        .args(["demo", "--rounds", "1", "--hospitals", "2", "--records"])
        .arg(&dir)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("hospital-1 holds records 100 103 106"),
        "{stderr}"
    );
    assert!(
        stderr.contains("hospital-2 holds records 101 105 119"),
        "{stderr}"
    );
    for needle in ["model m1_tail", "round  1: test sets split by patient"] {
        assert!(stdout.contains(needle), "{needle:?} not in\n{stdout}");
    }
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(summary["status"], "completed");
    assert_eq!(summary["visits"], 2);
    let pooled = &summary["rounds"][0]["pooled_test"];
    assert_eq!(
        pooled["classes"],
        serde_json::json!(["N", "S", "V", "F", "Q"])
    );
    assert_eq!(pooled["kind"], "patient");
    // A bad directory is refused before anything starts.
    let out = Command::new(env!("CARGO_BIN_EXE_medsplit"))
        .args(["demo", "--hospitals", "4", "--records"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("6 usable records"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).ok();
}
