//! Text reports of a job's test measurements, from `GET /v1/jobs/{id}/metrics`: per round, each
//! hospital's accuracy next to the majority-class rate of the same test set, macro-F1 and
//! balanced accuracy, the kind of split, and per-class sensitivity, PPV and F1.

use std::fmt::Write;

use medsplit_engine::metrics::{Confusion, EvalKind, ReportRow, text_report};
use serde_json::Value;

/// How much of a round to show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detail {
    /// Per-class figures of the pooled matrix only.
    Pooled,
    /// Per-class figures of every hospital and of the pooled matrix.
    PerHospital,
}

/// The report of `round` (an element of the response's `rounds`), with the evaluations of its
/// visits taken from the response's `visits`. Round numbers are shown from 1.
pub fn round(metrics: &Value, round: &Value, detail: Detail) -> String {
    let number = round["round"].as_i64().unwrap_or(0);
    let evaluated: Vec<(String, &Value)> = metrics["visits"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["round"].as_i64() == Some(number))
        .filter(|v| v["test_evaluation"].is_object())
        .map(|v| {
            (
                v["hospital"].as_str().unwrap_or("").to_string(),
                &v["test_evaluation"],
            )
        })
        .collect();
    let pooled = &round["pooled_test_evaluation"];
    let mut out = String::new();
    if evaluated.is_empty() || !pooled.is_object() {
        let _ = writeln!(out, "round {:>2}: test set not measured", number + 1);
        return out;
    }
    let _ = writeln!(
        out,
        "round {:>2}: test sets {}",
        number + 1,
        kind_label(&pooled["kind"])
    );
    let parsed: Vec<(&str, Option<EvalKind>, Confusion)> = evaluated
        .iter()
        .map(|(h, e)| (h.as_str(), *e))
        .chain([("pooled", pooled)])
        .filter_map(|(name, e)| {
            // The class order is `classes` (a JSON object such as `per_class` keeps no order
            // once parsed into a value).
            let classes = serde_json::from_value::<Vec<String>>(e["classes"].clone()).ok()?;
            let counts = serde_json::from_value::<Vec<Vec<u64>>>(e["confusion"].clone()).ok()?;
            let confusion = Confusion::from_counts(classes, &counts).ok()?;
            Some((
                name,
                e["kind"].as_str().and_then(EvalKind::parse),
                confusion,
            ))
        })
        .collect();
    let rows: Vec<ReportRow> = parsed
        .iter()
        .map(|(name, kind, confusion)| ReportRow {
            name,
            kind: *kind,
            confusion,
        })
        .collect();
    let per_class = match detail {
        Detail::Pooled => &rows[rows.len().saturating_sub(1)..],
        Detail::PerHospital => &rows[..],
    };
    out.push_str(&text_report("hospital", &rows, per_class));
    out
}

/// How a report names a kind of split.
pub fn kind_label(kind: &Value) -> &'static str {
    match kind.as_str() {
        Some("patient") => "split by patient (test patients unseen in training)",
        Some("beat") => {
            "split by beat: the same patients are in training and test, which flatters the model"
        }
        _ => "of unknown split",
    }
}

/// The privacy report of a job (`GET /v1/jobs/{id}/privacy`) as text: ε per hospital, what
/// the coordinator saw, the attack harness's figures at the job's batch size and DP setting, and
/// DP's accuracy cost on the inter-patient benchmark.
pub fn privacy(r: &Value) -> String {
    let mut out = String::new();
    let eps = |v: &Value| v.as_f64().map_or("—".to_string(), |x| format!("{x:.2}"));
    let pct = |v: &Value| {
        v.as_f64()
            .map_or("—".to_string(), |x| format!("{:.2} %", 100.0 * x))
    };
    let _ = writeln!(out, "job {}: batch size {}", r["job_id"], r["batch_size"]);
    match r["dp"].as_object() {
        None => {
            let _ = writeln!(
                out,
                "differential privacy: none (ε is unbounded: nothing bounds what the coordinator \
                 and the next hospital learn)"
            );
        }
        Some(dp) => {
            let _ = writeln!(
                out,
                "differential privacy: DP-SGD, clip norm {}, δ {}, {}",
                dp["clip_norm"],
                dp["delta"],
                match (
                    dp["noise_multiplier"].as_f64(),
                    dp["target_epsilon"].as_f64()
                ) {
                    (Some(sigma), _) => format!("noise multiplier {sigma}"),
                    (None, Some(target)) => format!("target ε {target}"),
                    _ => String::new(),
                }
            );
            let _ = writeln!(
                out,
                "\n  {:<20} {:>14} {:>12} {:>8} {:>8}",
                "hospital", "training beats", "projected ε", "ε spent", "max ε"
            );
            for h in r["hospitals"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "  {:<20} {:>14} {:>12} {:>8} {:>8}{}",
                    h["hospital"].as_str().unwrap_or(""),
                    h["train_samples"]
                        .as_i64()
                        .map_or("—".into(), |n| n.to_string()),
                    eps(&h["projected_epsilon"]),
                    eps(&h["epsilon_spent"]),
                    h["max_epsilon"]
                        .as_f64()
                        .map_or("none".into(), |m| m.to_string()),
                    h["projection_note"]
                        .as_str()
                        .map_or(String::new(), |n| format!("  ({n})")),
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "\nwhat the coordinator saw ({}):",
        if r["encrypted"] == true {
            "activations and returned gradients encrypted"
        } else {
            "encryption off"
        }
    );
    let seen = r["seen"].as_array().map(Vec::as_slice).unwrap_or_default();
    if seen.is_empty() {
        let _ = writeln!(out, "  nothing yet: no visit has completed");
    }
    for m in seen {
        let _ = writeln!(
            out,
            "  {:<4} {:<15} {:>9} messages {:>12} bytes  {}",
            m["direction"].as_str().unwrap_or(""),
            m["kind"].as_str().unwrap_or(""),
            m["count"],
            m["bytes"],
            m["carries"].as_str().unwrap_or("")
        );
    }
    let a = &r["attack"];
    let _ = writeln!(
        out,
        "\nthe attack harness at batch size {}{} (centered cosine against the true activations):",
        a["measured_batch_size"],
        match a["measured_epsilon"].as_f64() {
            Some(e) if a["dp"] == true => format!(", with DP at ε {e:.2}"),
            _ => ", without DP".into(),
        }
    );
    let _ = writeln!(
        out,
        "  {:<20} {:<12} {:>8} {:>10} {:>8} {:>9} {:>9}",
        "coordinator", "training", "median", "share>0.9", "labels", "kNN", "majority"
    );
    for row in a["results"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {:<20} {:<12} {:>8} {:>10} {:>8} {:>9} {:>9}",
            row["attacker"].as_str().unwrap_or(""),
            row["window"].as_str().unwrap_or(""),
            row["cosine_median"]
                .as_f64()
                .map_or("—".into(), |c| format!("{c:.3}")),
            pct(&row["recovered_share"]),
            pct(&row["label_recovery"]),
            pct(&row["knn_accuracy"]),
            pct(&row["majority_rate"]),
        );
    }
    let acc = &r["accuracy"];
    let _ = writeln!(
        out,
        "\nDP's cost: {}",
        acc["task"]
            .as_str()
            .unwrap_or("the inter-patient benchmark")
    );
    for (name, x) in [
        ("without DP", &acc["without_dp"]),
        ("with DP", &acc["with_dp"]),
    ] {
        let classes: Vec<String> = x["classes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                format!(
                    "{} {:.1}/{:.1}",
                    c["name"].as_str().unwrap_or(""),
                    100.0 * c["sensitivity"].as_f64().unwrap_or(0.0),
                    100.0 * c["ppv"].as_f64().unwrap_or(0.0)
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "  {:<10} accuracy {} (majority class {}), macro-F1 {}; Se/PPV {}",
            name,
            pct(&x["accuracy"]),
            pct(&x["majority_rate"]),
            x["macro_f1"]
                .as_f64()
                .map_or("—".into(), |f| format!("{f:.3}")),
            classes.join(", ")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn evaluation(kind: &str, pairs: &[(usize, usize)]) -> Value {
        let c = Confusion::from_pairs(["N", "V"], pairs.iter().copied()).unwrap();
        let mut v = serde_json::to_value(&c).unwrap();
        v["kind"] = json!(kind);
        v["classes"] = json!(["N", "V"]);
        v
    }

    #[test]
    fn a_round_shows_accuracy_next_to_the_majority_rate_and_per_class_figures() {
        // hospital-a: 3 N (2 right), 1 V (right); hospital-b: 4 N (all right).
        let a = evaluation("beat", &[(0, 0), (0, 0), (0, 1), (1, 1)]);
        let b = evaluation("beat", &[(0, 0), (0, 0), (0, 0), (0, 0)]);
        let pooled = evaluation(
            "beat",
            &[
                (0, 0),
                (0, 0),
                (0, 1),
                (1, 1),
                (0, 0),
                (0, 0),
                (0, 0),
                (0, 0),
            ],
        );
        let metrics = json!({
            "visits": [
                { "round": 0, "hospital": "hospital-a", "test_evaluation": a },
                { "round": 0, "hospital": "hospital-b", "test_evaluation": b },
                { "round": 1, "hospital": "hospital-a", "test_evaluation": null },
            ],
            "rounds": [
                { "round": 0, "pooled_test_evaluation": pooled },
                { "round": 1, "pooled_test_evaluation": null },
            ],
        });
        let text = round(&metrics, &metrics["rounds"][0], Detail::PerHospital);
        assert!(
            text.starts_with("round  1: test sets split by beat"),
            "{text}"
        );
        let lines = |text: &str| -> Vec<String> {
            text.lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect()
        };
        let line = |start: &str| {
            lines(&text)
                .into_iter()
                .find(|l| l.starts_with(start))
                .unwrap_or_else(|| panic!("no {start:?} line in\n{text}"))
        };
        // 3 of 4 right, majority 3 of 4, macro-F1 (0.8 + 0.667) / 2, balanced (2/3 + 1) / 2.
        assert_eq!(
            line("hospital-a beat"),
            "hospital-a beat 4 75.00 % 75.00 % 0.733 83.33 %"
        );
        assert_eq!(
            line("pooled beat"),
            "pooled beat 8 87.50 % 87.50 % 0.795 92.86 %"
        );
        // Per class of hospital-a: N Se 2/3 PPV 1, V Se 1 PPV 1/2.
        assert_eq!(
            line("hospital-a N"),
            "hospital-a N 66.67 % 100.00 % 0.800 3"
        );
        assert_eq!(line("V"), "V 100.00 % 50.00 % 0.667 1");
        // Pooled: N Se 6/7 PPV 1.
        assert_eq!(line("pooled N"), "pooled N 85.71 % 100.00 % 0.923 7");
        let pooled_only = lines(&round(&metrics, &metrics["rounds"][0], Detail::Pooled));
        assert!(!pooled_only.iter().any(|l| l.starts_with("hospital-a N")));
        assert!(pooled_only.iter().any(|l| l.starts_with("pooled N")));
        assert_eq!(
            round(&metrics, &metrics["rounds"][1], Detail::Pooled),
            "round  2: test set not measured\n"
        );
    }

    /// Classes come in the label set's order, not in the order of a parsed JSON object's keys.
    #[test]
    fn classes_keep_the_label_sets_order() {
        // 3 N beats right, 1 F beat right, 2 S beats called N.
        let c = Confusion::from_pairs(
            ["N", "S", "V", "F", "Q"],
            [(0, 0), (0, 0), (0, 0), (3, 3), (1, 0), (1, 0)],
        )
        .unwrap();
        let mut e = serde_json::to_value(&c).unwrap();
        e["kind"] = json!("patient");
        e["classes"] = json!(["N", "S", "V", "F", "Q"]);
        // As the CLI receives it: text parsed into a value.
        let e: Value = serde_json::from_str(&e.to_string()).unwrap();
        let metrics = json!({
            "visits": [{ "round": 0, "hospital": "h", "test_evaluation": e }],
            "rounds": [{ "round": 0, "pooled_test_evaluation": e }],
        });
        let text = round(&metrics, &metrics["rounds"][0], Detail::Pooled);
        let line = |class: &str| {
            text.lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .find(|l| {
                    l.starts_with(&format!("pooled {class} "))
                        || l.starts_with(&format!("{class} "))
                })
                .unwrap_or_else(|| panic!("no {class} line in\n{text}"))
        };
        assert_eq!(line("F"), "F 100.00 % 100.00 % 1.000 1");
        assert_eq!(line("S"), "S 0.00 % 0.00 % 0.000 2");
        assert!(line("N").ends_with(" 3"), "{text}");
    }

    #[test]
    fn the_privacy_report_names_each_figure() {
        let report = json!({
            "job_id": 4, "batch_size": 32, "encrypted": true,
            "dp": { "target_epsilon": 8.0, "noise_multiplier": null, "delta": 1e-5, "clip_norm": 1.0 },
            "hospitals": [
                { "hospital": "oslo", "train_samples": 17000, "projected_epsilon": 7.99,
                  "epsilon_spent": 3.5, "max_epsilon": 8.0, "projection_note": null },
                { "hospital": "bergen", "train_samples": null, "projected_epsilon": 8.0,
                  "epsilon_spent": null, "max_epsilon": null, "projection_note": null },
            ],
            "seen": [{ "direction": "up", "kind": "Backward", "count": 531, "bytes": 1234,
                       "carries": "Enc(dJ/dlogits)" }],
            "attack": { "measured_batch_size": 32, "dp": true, "measured_epsilon": 8.0,
                        "results": [{ "attacker": "malicious", "window": "start",
                                      "cosine_median": -0.197, "recovered_share": 0.004,
                                      "label_recovery": 0.23, "knn_accuracy": 0.321,
                                      "majority_rate": 0.247 }] },
            "accuracy": { "task": "DS1 to DS2",
                          "without_dp": { "accuracy": 0.927, "majority_rate": 0.89, "macro_f1": 0.376,
                                          "classes": [{ "name": "V", "sensitivity": 0.983, "ppv": 0.733 }] },
                          "with_dp": { "accuracy": 0.942, "majority_rate": 0.89, "macro_f1": 0.37,
                                       "classes": [{ "name": "V", "sensitivity": 0.822, "ppv": 0.954 }] } },
        });
        let text = privacy(&report);
        let squeezed: Vec<String> = text
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        let has = |line: &str| squeezed.iter().any(|l| l == line);
        assert!(has("oslo 17000 7.99 3.50 8"), "{text}");
        assert!(has("bergen — 8.00 — none"), "{text}");
        assert!(
            has("up Backward 531 messages 1234 bytes Enc(dJ/dlogits)"),
            "{text}"
        );
        assert!(
            has("malicious start -0.197 0.40 % 23.00 % 32.10 % 24.70 %"),
            "{text}"
        );
        assert!(
            has(
                "with DP accuracy 94.20 % (majority class 89.00 %), macro-F1 0.370; Se/PPV V 82.2/95.4"
            ),
            "{text}"
        );
        assert!(text.contains("target ε 8"), "{text}");
        let plain = privacy(&json!({ "dp": null, "seen": [], "attack": {}, "accuracy": {} }));
        assert!(plain.contains("ε is unbounded"), "{plain}");
        assert!(plain.contains("no visit has completed"), "{plain}");
    }
}
