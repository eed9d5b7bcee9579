//! The hospital's own policy: the `[policy]` table of agent.toml, checked on every assignment
//! before any data is read. The coordinator chooses what to ask; this decides what the agent
//! trains, so a coordinator that lies about a job's consent or settings cannot make the agent
//! send more than the hospital allows. A refused visit is given back as refused, with the
//! reason, and never trained.
//!
//! The defaults are the safe ones: no plaintext, no batch of one beat (whose gradient sums give
//! the beat away exactly; docs/threat-model.md), and bounds on the work a job may ask.

use medsplit_engine::api::{ModelName, VisitAssignment};
use medsplit_engine::preprocess::LabelSet;
use serde::Deserialize;

/// What this hospital trains.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// Only jobs an admin approved at this agent (`medsplit-agent approve`), with the
    /// specification approved: the coordinator's record of consent is not enough. Default true.
    pub require_approval: bool,
    /// Jobs with `insecure_plaintext` (activations and gradients in the clear). Default false.
    pub allow_plaintext: bool,
    /// The smallest batch a job may ask (the expected batch under DP). Default 2.
    pub min_batch_size: u32,
    /// Only jobs with differential privacy. Default false; the ε limit is `max_epsilon` at the
    /// top of the file, which also refuses jobs without DP when set.
    pub require_dp: bool,
    /// The label sets a job may ask. Default both (`aami`, `papers`).
    pub labels: Vec<LabelSet>,
    /// The models a job may ask: preset names, or `custom` for a table of layers. Default the
    /// three presets.
    pub models: Vec<String>,
    /// At most this many rounds. Default 100.
    pub max_rounds: u32,
    /// At most this many passes over the training data per visit. Default 10.
    pub max_local_epochs: u32,
    /// At most this many batches per visit (`local_steps`). Default 100,000.
    pub max_local_steps: u32,
    /// Only jobs of these researchers (their e-mail addresses); empty: any.
    pub researchers: Vec<String>,
    /// Only these jobs; empty: any.
    pub jobs: Vec<i64>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            require_approval: true,
            allow_plaintext: false,
            min_batch_size: 2,
            require_dp: false,
            labels: vec![LabelSet::Aami, LabelSet::Papers],
            models: ModelName::ALL
                .iter()
                .map(|m| m.as_str().to_string())
                .collect(),
            max_rounds: 100,
            max_local_epochs: 10,
            max_local_steps: 100_000,
            researchers: Vec::new(),
            jobs: Vec::new(),
        }
    }
}

impl Policy {
    /// Checks the policy's own values (at start-up).
    pub fn validate(&self) -> Result<(), String> {
        if self.min_batch_size == 0 {
            return Err("policy.min_batch_size must be at least 1".into());
        }
        for m in &self.models {
            if m != "custom" && !ModelName::ALL.iter().any(|p| p.as_str() == m) {
                return Err(format!(
                    "policy.models: unknown model {m:?} (m1, m1_wide, m1_tail or custom)"
                ));
            }
        }
        Ok(())
    }

    /// Why this hospital does not train assignment `a`, if it does not.
    pub fn check(&self, a: &VisitAssignment) -> Result<(), String> {
        let spec = &a.spec;
        let job = a.job_id;
        if !self.jobs.is_empty() && !self.jobs.contains(&job) {
            return Err(format!(
                "job {job} is not among the jobs this hospital's policy allows"
            ));
        }
        if !self.researchers.is_empty() {
            let owner = a.owner.as_deref().unwrap_or("");
            if !self
                .researchers
                .iter()
                .any(|r| r.eq_ignore_ascii_case(owner))
            {
                return Err(format!(
                    "job {job} belongs to {}, who is not among the researchers this hospital's \
                     policy allows",
                    if owner.is_empty() {
                        "an unnamed researcher"
                    } else {
                        owner
                    }
                ));
            }
        }
        if spec.insecure_plaintext && !self.allow_plaintext {
            return Err(format!(
                "job {job} turns encryption off (insecure_plaintext): the coordinator would see \
                 every beat's activations; this hospital's policy does not allow it"
            ));
        }
        if spec.batch_size < self.min_batch_size {
            return Err(format!(
                "job {job} asks for batches of {} beats; this hospital's policy asks for at \
                 least {} (small batches give the beats away to the coordinator)",
                spec.batch_size, self.min_batch_size
            ));
        }
        if self.require_dp && spec.dp.is_none() {
            return Err(format!(
                "job {job} has no differential privacy; this hospital's policy requires it"
            ));
        }
        if !self.labels.contains(&spec.labels) {
            return Err(format!(
                "job {job} asks for the label set {}; this hospital's policy allows {}",
                spec.labels,
                self.labels
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let model = spec
            .model
            .preset
            .map_or("custom", |m| m.as_str())
            .to_string();
        if !self.models.contains(&model) {
            return Err(format!(
                "job {job} asks for the model {model}; this hospital's policy allows {}",
                self.models.join(", ")
            ));
        }
        if spec.rounds > self.max_rounds {
            return Err(format!(
                "job {job} asks for {} rounds; this hospital's policy allows at most {}",
                spec.rounds, self.max_rounds
            ));
        }
        match spec.local_steps {
            Some(steps) if steps > self.max_local_steps => Err(format!(
                "job {job} asks for {steps} batches per visit; this hospital's policy allows at \
                 most {}",
                self.max_local_steps
            )),
            None if spec.local_epochs > self.max_local_epochs => Err(format!(
                "job {job} asks for {} passes per visit; this hospital's policy allows at most {}",
                spec.local_epochs, self.max_local_epochs
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment(spec: serde_json::Value) -> VisitAssignment {
        let mut base = serde_json::json!({ "name": "j", "hospitals": ["a"] });
        base.as_object_mut()
            .unwrap()
            .extend(spec.as_object().unwrap().clone());
        serde_json::from_value(serde_json::json!({
            "visit_id": 1, "attempt": 1, "job_id": 7, "round": 0, "position": 0, "spec": base,
            "handoff": null, "recipients": [], "lease_seconds": 30,
            "owner": "ada@research.example",
        }))
        .unwrap()
    }

    fn refused(policy: &Policy, spec: serde_json::Value) -> String {
        policy.check(&assignment(spec)).unwrap_err()
    }

    #[test]
    fn the_defaults_refuse_plaintext_and_single_beat_batches_and_allow_the_usual_job() {
        let p = Policy::default();
        assert_eq!(p.check(&assignment(serde_json::json!({}))), Ok(()));
        let plain = refused(&p, serde_json::json!({ "insecure_plaintext": true }));
        assert!(plain.contains("insecure_plaintext"), "{plain}");
        let one = refused(&p, serde_json::json!({ "batch_size": 1 }));
        assert!(one.contains("at least 2"), "{one}");
        assert!(refused(&p, serde_json::json!({ "rounds": 101 })).contains("at most 100"));
        assert!(refused(&p, serde_json::json!({ "local_epochs": 11 })).contains("passes"));
        assert!(refused(&p, serde_json::json!({ "local_steps": 100_001 })).contains("batches per"));
        let custom = refused(&p, serde_json::json!({ "model": { "tail": 8 } }));
        assert!(custom.contains("model custom"), "{custom}");
    }

    #[test]
    fn each_key_narrows_what_is_trained() {
        let p: Policy = toml::from_str(
            r#"
            allow_plaintext = true
            min_batch_size = 16
            require_dp = true
            labels = ["aami"]
            models = ["m1_tail", "custom"]
            researchers = ["Ada@research.example"]
            jobs = [7]
            "#,
        )
        .unwrap();
        p.validate().unwrap();
        let ok = serde_json::json!({
            "batch_size": 32, "model": "m1_tail", "insecure_plaintext": true,
            "class_weights": "uniform", "dp": { "target_epsilon": 8 },
        });
        // (insecure_plaintext with dp is refused by the spec itself; the policy only checks.)
        assert_eq!(p.check(&assignment(ok.clone())), Ok(()));
        let with = |key: &str, v: serde_json::Value| {
            let mut s = ok.clone();
            s[key] = v;
            s
        };
        assert!(refused(&p, with("batch_size", 8.into())).contains("at least 16"));
        assert!(refused(&p, with("dp", serde_json::Value::Null)).contains("requires it"));
        assert!(refused(&p, with("labels", "papers".into())).contains("allows aami"));
        assert!(refused(&p, with("model", "m1".into())).contains("allows m1_tail, custom"));
        let mut other = assignment(ok.clone());
        other.owner = Some("eve@example.org".into());
        assert!(p.check(&other).unwrap_err().contains("eve@example.org"));
        other.owner = None;
        assert!(p.check(&other).unwrap_err().contains("unnamed"));
        let mut later = assignment(ok);
        later.job_id = 8;
        assert!(p.check(&later).unwrap_err().contains("job 8"));
    }

    #[test]
    fn bad_values_are_refused_at_start_up() {
        let zero = Policy {
            min_batch_size: 0,
            ..Policy::default()
        };
        assert!(zero.validate().is_err());
        let unknown = Policy {
            models: vec!["m2".into()],
            ..Policy::default()
        };
        assert!(unknown.validate().unwrap_err().contains("m2"));
        assert!(toml::from_str::<Policy>("allow_plaintex = true").is_err());
    }
}
