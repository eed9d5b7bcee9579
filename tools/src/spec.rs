//! Job specs as researchers write them (JSON or TOML files), checked here as the coordinator
//! checks them, and described in one line from the coordinator's view of a job.

use std::path::Path;

use anyhow::{Context, bail};
use medsplit_engine::api::JobSpec;
use medsplit_engine::preprocess::{LabelSet, Preprocessing};
use serde_json::Value;

/// Fields given on the command line, replacing the spec file's.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// The label set: `aami` or `papers`.
    pub labels: Option<String>,
    /// The preprocessing: a preset name (`papers`, `inter_patient`) or a JSON object
    /// (`{"preset": "inter_patient", "beat_len": 256}`).
    pub preprocessing: Option<String>,
}

impl Overrides {
    fn apply(&self, body: &mut Value) -> anyhow::Result<()> {
        let Some(object) = body.as_object_mut() else {
            bail!("a job spec must be a table (TOML) or an object (JSON)");
        };
        if let Some(labels) = &self.labels {
            let value = Value::String(labels.clone());
            serde_json::from_value::<LabelSet>(value.clone())
                .map_err(|e| anyhow::anyhow!("--labels: {e}"))?;
            object.insert("labels".into(), value);
        }
        if let Some(p) = &self.preprocessing {
            let value = if p.trim_start().starts_with('{') {
                serde_json::from_str(p).context("--preprocessing: not a JSON object")?
            } else {
                Value::String(p.clone())
            };
            serde_json::from_value::<Preprocessing>(value.clone())
                .map_err(|e| anyhow::anyhow!("--preprocessing: {e}"))?;
            object.insert("preprocessing".into(), value);
        }
        Ok(())
    }

    fn is_empty(&self) -> bool {
        self.labels.is_none() && self.preprocessing.is_none()
    }
}

/// Reads a job spec file (`.toml`, else JSON): the body to submit, after the checks the
/// coordinator makes (unknown fields, types, ranges, the model's limits), so that a mistake is
/// reported with its line or field before anything is sent.
pub fn read(path: &Path) -> anyhow::Result<Value> {
    read_with(path, &Overrides::default())
}

/// [`read`], with fields replaced by `overrides` (before the checks).
pub fn read_with(path: &Path, overrides: &Overrides) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let toml = path.extension().is_some_and(|e| e == "toml");
    parse_with(&text, toml, overrides).with_context(|| path.display().to_string())
}

/// [`read`] on text: TOML when `toml`, else JSON.
pub fn parse(text: &str, toml: bool) -> anyhow::Result<Value> {
    parse_with(text, toml, &Overrides::default())
}

/// [`read_with`] on text.
pub fn parse_with(text: &str, toml: bool, overrides: &Overrides) -> anyhow::Result<Value> {
    // The file alone first, so that its mistakes come with their line.
    let (mut body, mut spec): (Value, JobSpec) = if toml {
        (toml::from_str(text)?, toml::from_str(text)?)
    } else {
        (serde_json::from_str(text)?, serde_json::from_str(text)?)
    };
    if !overrides.is_empty() {
        overrides.apply(&mut body)?;
        spec = serde_json::from_value(body.clone())?;
    }
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
    let labels = spec["labels"].as_str().unwrap_or("aami");
    let preprocessing = net["preprocessing"].as_str().unwrap_or("papers");
    let start = match spec["init_from"].as_i64() {
        Some(source) if spec["train_client"] == false => {
            format!("; starts from job {source}, server layer only")
        }
        Some(source) => format!("; starts from job {source}"),
        None => String::new(),
    };
    format!(
        "model {} ({}); labels {labels}; preprocessing {preprocessing}; {work}; class weights \
         {weights}; client lr {}{start}",
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
        assert_eq!(spec.labels, LabelSet::Aami);
        assert_eq!(spec.preprocessing, Preprocessing::inter_patient());
        assert_eq!(spec.model_config().cut_width().0, 260);
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
    fn labels_and_preprocessing_come_from_the_file_or_the_command_line() {
        let base = "name = \"j\"\nhospitals = [\"a\"]\n";
        let file = parse(
            &format!("{base}labels = \"papers\"\npreprocessing = \"inter_patient\"\n"),
            true,
        )
        .unwrap();
        let spec: JobSpec = serde_json::from_value(file).unwrap();
        assert_eq!(spec.labels, LabelSet::Papers);
        assert_eq!(spec.preprocessing, Preprocessing::inter_patient());

        let table = "[preprocessing]\npreset = \"inter_patient\"\nbeat_len = 256\n";
        let spec: JobSpec =
            serde_json::from_value(parse(&format!("{base}{table}"), true).unwrap()).unwrap();
        assert_eq!(spec.preprocessing.beat_len, 256);
        assert_eq!(spec.preprocessing.feature_len(), 4);

        let flags = Overrides {
            labels: Some("papers".into()),
            preprocessing: Some(r#"{"preset": "inter_patient", "rr": null}"#.into()),
        };
        let body =
            parse_with(&format!("{base}preprocessing = \"papers\"\n"), true, &flags).unwrap();
        assert_eq!(body["labels"], "papers");
        let spec: JobSpec = serde_json::from_value(body).unwrap();
        assert_eq!(spec.preprocessing.rr, None);
        assert_eq!(spec.preprocessing.lead.as_deref(), Some("MLII"));
        let named = Overrides {
            preprocessing: Some("inter_patient".into()),
            ..Overrides::default()
        };
        assert_eq!(
            parse_with(base, true, &named).unwrap()["preprocessing"],
            "inter_patient"
        );

        for (flags, needle) in [
            (
                Overrides {
                    labels: Some("mitbih".into()),
                    ..Overrides::default()
                },
                "--labels: unknown variant `mitbih`",
            ),
            (
                Overrides {
                    preprocessing: Some("raw".into()),
                    ..Overrides::default()
                },
                "--preprocessing: unknown preprocessing preset \"raw\"",
            ),
            (
                Overrides {
                    preprocessing: Some("{\"beat_len\": ".into()),
                    ..Overrides::default()
                },
                "--preprocessing: not a JSON object",
            ),
            (
                Overrides {
                    preprocessing: Some(r#"{"beat_len": 4096}"#.into()),
                    ..Overrides::default()
                },
                "model: the cut layer would hold 8192 values",
            ),
            (
                Overrides {
                    preprocessing: Some(r#"{"after_s": -1}"#.into()),
                    ..Overrides::default()
                },
                "preprocessing.after_s",
            ),
        ] {
            let err = format!("{:#}", parse_with(base, true, &flags).unwrap_err());
            assert!(err.contains(needle), "{flags:?}: {err}");
        }
    }

    #[test]
    fn jobs_are_described_by_their_model_and_local_work() {
        let job = json!({
            "spec": {
                "model": { "preset": "m1_tail", "blocks": [
                    { "channels": 16, "kernel": 7, "pool": 2 },
                    { "channels": 8, "kernel": 5, "pool": 2 }], "tail": 16, "leaky_slope": 0.01 },
                "local_epochs": 1, "local_steps": 50, "batch_size": 4,
                "class_weights": "balanced", "client_lr": 0.002, "labels": "aami",
            },
            "network": { "cut_width": 260, "server_outputs": 16, "classes": 5,
                "preprocessing": "inter_patient" },
        });
        assert_eq!(model_name(&job["spec"]), "m1_tail");
        assert_eq!(
            describe(&job),
            "model m1_tail (conv 16×k7/2 → conv 8×k5/2 → cut 260 (encrypted) → server 16 → \
             client tail → 5); labels aami; preprocessing inter_patient; 50 steps of 4 beats per \
             visit; class weights balanced; client lr 0.002"
        );
        let mut tuned = job.clone();
        tuned["spec"]["init_from"] = json!(7);
        assert!(describe(&tuned).ends_with("client lr 0.002; starts from job 7"));
        tuned["spec"]["train_client"] = json!(false);
        assert!(describe(&tuned).ends_with("; starts from job 7, server layer only"));
        assert_eq!(model_name(&json!({ "model": { "blocks": [] } })), "custom");
        assert_eq!(model_name(&json!({ "model": "m1" })), "m1");
    }
}
