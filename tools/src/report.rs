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
}
