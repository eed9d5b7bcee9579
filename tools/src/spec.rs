//! Job specs as researchers write them (JSON or TOML files), checked here as the coordinator
//! checks them, and described in one line from the coordinator's view of a job.

use std::path::Path;

use anyhow::{Context, bail};
use medsplit_engine::api::JobSpec;
use serde_json::Value;

/// Reads a job spec file (`.toml`, else JSON): the body to submit, after the checks the
/// coordinator makes (unknown fields, types, ranges, the model's limits), so that a mistake is
/// reported with its line or field before anything is sent.
pub fn read(path: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let toml = path.extension().is_some_and(|e| e == "toml");
    parse(&text, toml).with_context(|| path.display().to_string())
}

/// [`read`] on text: TOML when `toml`, else JSON.
pub fn parse(text: &str, toml: bool) -> anyhow::Result<Value> {
    let (body, spec): (Value, JobSpec) = if toml {
        (toml::from_str(text)?, toml::from_str(text)?)
    } else {
        (serde_json::from_str(text)?, serde_json::from_str(text)?)
    };
    if let Err(e) = spec.validate() {
        bail!("{e}");
    }
    Ok(body)
}

/// The model's name in a job's spec (as the coordinator returns it): its preset, or `custom`.
pub fn model_name(spec: &Value) -> String {
    match &spec["model"] {
        Value::String(name) => name.clone(),
        model => model["preset"].as_str().unwrap_or("custom").to_string(),
    }
}

/// One line on what a job trains (from `GET /v1/jobs/{id}`): the model and its shapes, the
/// local work per visit, the class weights and the client's learning rate.
pub fn describe(job: &Value) -> String {
    let spec = &job["spec"];
    let model = &spec["model"];
    let net = &job["network"];
    let mut layers = Vec::new();
    for b in model["blocks"].as_array().into_iter().flatten() {
        layers.push(format!(
            "conv {}×k{}/{}",
            b["channels"], b["kernel"], b["pool"]
        ));
    }
    if net.is_object() {
        layers.push(format!("cut {} (encrypted)", net["cut_width"]));
        layers.push(format!("server {}", net["server_outputs"]));
        if model["tail"].is_u64() {
            layers.push(format!("client tail → {}", net["classes"]));
        }
    }
    let batch = spec["batch_size"].as_u64().unwrap_or(0);
    let work = match spec["local_steps"].as_u64() {
        Some(steps) => format!("{steps} steps of {batch} beats per visit"),
        None => {
            let epochs = spec["local_epochs"].as_u64().unwrap_or(1);
            let s = if epochs == 1 { "" } else { "s" };
            format!("{epochs} epoch{s} in batches of {batch} per visit")
        }
    };
    let weights = match &spec["class_weights"] {
        Value::String(w) => w.clone(),
        Value::Object(o) if o.contains_key("fixed") => format!("fixed {}", o["fixed"]),
        Value::Null => "uniform".into(),
        other => other.to_string(),
    };
    format!(
        "model {} ({}); {work}; class weights {weights}; client lr {}",
        model_name(spec),
        layers.join(" → "),
        spec["client_lr"]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The example spec of the operations guide.
    fn documented_example() -> &'static str {
        let guide = include_str!("../../docs/operations.md");
        let jobs = guide.split("\n## Jobs").nth(1).expect("a Jobs section");
        jobs.split("```toml\n")
            .nth(1)
            .and_then(|b| b.split("```").next())
            .expect("a TOML example in the Jobs section")
    }

    #[test]
    fn the_documented_spec_is_accepted_with_every_configurable_field() {
        let body = parse(documented_example(), true).unwrap();
        let spec: JobSpec = serde_json::from_value(body.clone()).unwrap();
        assert_eq!(spec.local_steps, Some(50));
        assert_eq!(spec.client_lr, 0.002);
        assert_eq!(
            spec.class_weights,
            medsplit_engine::api::ClassWeights::Balanced
        );
        assert_eq!(spec.model.preset, None, "the example replaces the tail");
        assert_eq!(spec.model_config().server_outputs(), 32);
        assert_eq!(body["model"]["preset"], "m1_tail");
    }

    #[test]
    fn specs_are_checked_before_they_are_sent() {
        let base = "name = \"j\"\nhospitals = [\"a\"]\n";
        let ok = parse(
            &format!("{base}model = \"m1_wide\"\nlocal_steps = 10\n"),
            true,
        )
        .unwrap();
        assert_eq!(ok["model"], "m1_wide");
        let blocks = "[model]\nblocks = [{ channels = 8, kernel = 9, pool = 4 }]\ntail = 8\n";
        parse(&format!("{base}{blocks}"), true).unwrap();
        let weights = "class_weights = { fixed = [1, 2, 2, 4, 1.5] }\n";
        parse(&format!("{base}{weights}"), true).unwrap();

        for (extra, needle) in [
            ("model = \"m2\"\n", "unknown model \"m2\""),
            (
                "local_steps = 0\n",
                "local_steps: must be between 1 and 1000000",
            ),
            ("client_lr = 0\n", "client_lr"),
            ("class_weights = \"inverse\"\n", "inverse"),
            ("class_weights = { fixed = [1, 2] }\n", "class_weights"),
            (
                "[model]\nblocks = [{ channels = 8, kernel = 4, pool = 2 }]\n",
                "model.blocks[0].kernel",
            ),
            ("[model]\ndepth = 3\n", "depth"),
        ] {
            let err = format!("{:#}", parse(&format!("{base}{extra}"), true).unwrap_err());
            assert!(err.contains(needle), "{extra}: {err}");
        }
        let err = parse(r#"{"name": "j", "hospitals": ["a"], "tail": 3}"#, false).unwrap_err();
        assert!(err.to_string().contains("unknown field `tail`"), "{err}");
    }

    #[test]
    fn jobs_are_described_by_their_model_and_local_work() {
        let job = json!({
            "spec": {
                "model": { "preset": "m1_tail", "blocks": [
                    { "channels": 16, "kernel": 7, "pool": 2 },
                    { "channels": 8, "kernel": 5, "pool": 2 }], "tail": 16, "leaky_slope": 0.01 },
                "local_epochs": 1, "local_steps": 50, "batch_size": 4,
                "class_weights": "balanced", "client_lr": 0.002,
            },
            "network": { "cut_width": 256, "server_outputs": 16, "classes": 5 },
        });
        assert_eq!(model_name(&job["spec"]), "m1_tail");
        assert_eq!(
            describe(&job),
            "model m1_tail (conv 16×k7/2 → conv 8×k5/2 → cut 256 (encrypted) → server 16 → \
             client tail → 5); 50 steps of 4 beats per visit; class weights balanced; client lr 0.002"
        );
        assert_eq!(model_name(&json!({ "model": { "blocks": [] } })), "custom");
        assert_eq!(model_name(&json!({ "model": "m1" })), "m1");
    }
}
