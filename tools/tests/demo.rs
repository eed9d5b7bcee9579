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
    std::fs::remove_file(&json).unwrap();
}
