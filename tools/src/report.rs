//! Text reports of a job's test measurements, from `GET /v1/jobs/{id}/metrics`: per round, each
//! hospital's accuracy next to the majority-class rate of the same test set, macro-F1 and
//! balanced accuracy, the kind of split, and per-class sensitivity, PPV and F1.

use std::fmt::Write;

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
    let width = evaluated
        .iter()
        .map(|(h, _)| h.chars().count())
        .chain([6])
        .max()
        .unwrap_or(6);
    let _ = writeln!(
        out,
        "  {:<width$}  {:<7}  {:>7}  {:>9}  {:>9}  {:>8}  {:>9}",
        "hospital", "split", "beats", "accuracy", "majority", "macro-F1", "bal. acc."
    );
    for (name, e) in evaluated
        .iter()
        .map(|(h, e)| (h.as_str(), *e))
        .chain([("pooled", pooled)])
    {
        let beats: u64 = e["confusion"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_array)
            .flatten()
            .filter_map(Value::as_u64)
            .sum();
        let _ = writeln!(
            out,
            "  {:<width$}  {:<7}  {:>7}  {:>9}  {:>9}  {:>8}  {:>9}",
            name,
            e["kind"].as_str().unwrap_or("?"),
            beats,
            pct(&e["accuracy"]),
            pct(&e["majority_rate"]),
            fixed(&e["macro_f1"]),
            pct(&e["balanced_accuracy"]),
        );
    }
    let groups: Vec<(&str, &Value)> = match detail {
        Detail::Pooled => vec![("pooled", pooled)],
        Detail::PerHospital => evaluated
            .iter()
            .map(|(h, e)| (h.as_str(), *e))
            .chain([("pooled", pooled)])
            .collect(),
    };
    let class_width = pooled["classes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|c| c.chars().count())
        .max()
        .unwrap_or(1);
    let _ = writeln!(
        out,
        "  {:<width$}  {:<class_width$}  {:>8}  {:>8}  {:>6}  {:>7}",
        "per class", "", "Se", "PPV", "F1", "support"
    );
    for (name, e) in groups {
        for (i, class) in e["classes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .enumerate()
        {
            let c = &e["per_class"][class];
            let _ = writeln!(
                out,
                "  {:<width$}  {:<class_width$}  {:>8}  {:>8}  {:>6}  {:>7}",
                if i == 0 { name } else { "" },
                class,
                pct(&c["se"]),
                pct(&c["ppv"]),
                fixed(&c["f1"]),
                c["support"].as_u64().unwrap_or(0),
            );
        }
    }
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

fn pct(v: &Value) -> String {
    v.as_f64()
        .map(|x| format!("{:.2} %", 100.0 * x))
        .unwrap_or_else(|| "-".into())
}

fn fixed(v: &Value) -> String {
    v.as_f64()
        .map(|x| format!("{x:.3}"))
        .unwrap_or_else(|| "-".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use medsplit_engine::metrics::Confusion;
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
}
