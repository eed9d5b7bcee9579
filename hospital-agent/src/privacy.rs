//! The agent's side of differential privacy: the DP-SGD plan of a visit, the hospital's budget
//! checked before any step is taken, and a ledger of the steps this agent has taken per job.
//!
//! The budget is the smaller of the maximum the coordinator passes on (the hospital admin's
//! setting) and the agent's own `max_epsilon` (its configuration): a coordinator that drops the
//! first cannot lift the second. The steps counted before a visit are the larger of the
//! ledger's (every step this agent took on the job, including visits that failed half-way:
//! their noised gradients left all the same) and those the job's earlier rounds took by plan.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use medsplit_engine::api::{DpReport, VisitAssignment};
use medsplit_engine::dp::{self, DpPlan};
use medsplit_engine::dpsgd::DpSgd;
use serde::{Deserialize, Serialize};

use crate::{AgentError, state};

/// Where the agent's privacy budget comes from.
#[derive(Clone, Debug, Default)]
pub struct Budget {
    /// The agent's own maximum ε per job (its configuration), if any.
    pub max_epsilon: Option<f64>,
    /// The ledger file (in the state directory); `None`: no ledger (tests, benchmarks).
    pub ledger: Option<PathBuf>,
}

#[derive(Default, Serialize, Deserialize)]
struct LedgerFile {
    /// DP-SGD steps taken per job id.
    jobs: BTreeMap<i64, u64>,
}

const LEDGER: &str = "privacy-ledger.json";

impl Budget {
    /// The budget of an agent whose state directory is `dir`.
    pub fn in_state_dir(dir: &Path, max_epsilon: Option<f64>) -> Self {
        Self {
            max_epsilon,
            ledger: Some(dir.join(LEDGER)),
        }
    }

    fn read(&self) -> Result<LedgerFile, AgentError> {
        match &self.ledger {
            Some(path) => state::read_json(path, "a privacy ledger"),
            None => Ok(LedgerFile::default()),
        }
    }

    /// Steps this agent has recorded for `job`.
    pub fn steps(&self, job: i64) -> Result<u64, AgentError> {
        Ok(self.read()?.jobs.get(&job).copied().unwrap_or(0))
    }

    /// Records `steps` more steps for `job` (written 0600, then renamed into place).
    fn record(&self, job: i64, steps: u64) -> Result<(), AgentError> {
        let Some(path) = &self.ledger else {
            return Ok(());
        };
        let mut ledger = self.read()?;
        *ledger.jobs.entry(job).or_default() += steps;
        state::write_json(path, &ledger)
    }
}

/// A visit's DP-SGD: the plan for this hospital, the session settings, and the steps counted
/// before it.
pub struct PrivateVisit {
    pub plan: DpPlan,
    pub sgd: DpSgd,
    /// Steps counted before this visit.
    pub steps_before: u64,
}

impl PrivateVisit {
    /// The DP-SGD of visit `a` over `train_samples` training beats, or `None` for a job
    /// without DP. Refuses ([`AgentError::OverBudget`]) a visit that would take the hospital
    /// past its budget, before any step, and a job without DP when there is a budget; otherwise records the visit's steps in the ledger
    /// (before training: a visit that fails half-way has spent them).
    pub fn start(
        a: &VisitAssignment,
        train_samples: usize,
        budget: &Budget,
    ) -> Result<Option<Self>, AgentError> {
        let limits = [a.max_epsilon, budget.max_epsilon];
        let limit = limits.into_iter().flatten().reduce(f64::min);
        let Some(spec) = &a.spec.dp else {
            // Without DP nothing bounds ε: a hospital with a maximum does not train such a job.
            return match limit {
                Some(limit) => Err(AgentError::OverBudget(format!(
                    "job {} has no differential privacy, so its ε is unbounded; this hospital \
                     spends at most ε = {limit} on a job",
                    a.job_id
                ))),
                None => Ok(None),
            };
        };
        let plan = dp::plan(&a.spec, train_samples as u64)
            .map_err(|e| AgentError::Unsupported(format!("differential privacy: {e}")))?;
        let by_plan = u64::from(a.round) * plan.steps_per_visit;
        let steps_before = budget.steps(a.job_id)?.max(by_plan);
        let after = dp::spent(&plan, steps_before + plan.steps_per_visit)
            .max(a.epsilon_spent.unwrap_or(0.0));
        if let Some(limit) = limit
            && after > limit
        {
            return Err(AgentError::OverBudget(format!(
                "this visit would bring the hospital's ε on job {} to {after:.3} (δ = {}), over \
                 its maximum of {limit}",
                a.job_id, spec.delta
            )));
        }
        budget.record(a.job_id, plan.steps_per_visit)?;
        let sgd = DpSgd {
            clip_norm: spec.clip_norm,
            noise_multiplier: plan.noise_multiplier,
            expected_batch: plan.sampling_rate * train_samples as f64,
            padded_batch: plan.padded_batch as usize,
            seed: None,
        };
        Ok(Some(Self {
            plan,
            sgd,
            steps_before,
        }))
    }

    /// What the visit reports: its steps and the ε spent after them.
    pub fn report(&self) -> DpReport {
        DpReport {
            steps: self.plan.steps_per_visit,
            sampling_rate: self.plan.sampling_rate,
            noise_multiplier: self.plan.noise_multiplier,
            padded_batch: self.plan.padded_batch,
            epsilon_spent: dp::spent(&self.plan, self.steps_before + self.plan.steps_per_visit),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn assignment(dp: serde_json::Value, round: u32, max_epsilon: Option<f64>) -> VisitAssignment {
        serde_json::from_value(serde_json::json!({
            "visit_id": 1, "attempt": 1, "job_id": 7, "round": round, "position": 0,
            "spec": {
                "name": "j", "hospitals": ["a"], "rounds": 2, "batch_size": 8,
                "class_weights": "uniform", "dp": dp,
            },
            "handoff": null, "recipients": [], "lease_seconds": 30,
            "max_epsilon": max_epsilon, "epsilon_spent": null,
        }))
        .unwrap()
    }

    fn ledger() -> Budget {
        let dir = std::env::temp_dir().join(format!(
            "medsplit-ledger-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        fs::create_dir_all(&dir).unwrap();
        Budget::in_state_dir(&dir, None)
    }

    #[test]
    fn a_job_without_dp_is_refused_under_any_maximum() {
        let plain = assignment(serde_json::Value::Null, 0, None);
        assert!(
            PrivateVisit::start(&plain, 100, &Budget::default())
                .unwrap()
                .is_none()
        );
        let capped = assignment(serde_json::Value::Null, 0, Some(8.0));
        let e = PrivateVisit::start(&capped, 100, &Budget::default())
            .err()
            .unwrap();
        assert!(
            matches!(&e, AgentError::OverBudget(m) if m.contains("unbounded")),
            "{e}"
        );
        let own = Budget {
            max_epsilon: Some(8.0),
            ledger: None,
        };
        assert!(PrivateVisit::start(&plain, 100, &own).is_err());
    }

    #[test]
    fn the_ledger_counts_every_visit_and_the_smaller_maximum_refuses_before_training() {
        let dp = serde_json::json!({ "noise_multiplier": 1.0 });
        let budget = ledger();
        let n = 400;
        let plan = dp::plan(&assignment(dp.clone(), 0, None).spec, n).unwrap();
        let first = PrivateVisit::start(&assignment(dp.clone(), 0, None), n as usize, &budget)
            .unwrap()
            .unwrap();
        assert_eq!(first.steps_before, 0);
        assert_eq!(budget.steps(7).unwrap(), plan.steps_per_visit);
        let one_visit = first.report().epsilon_spent;
        assert!((one_visit - dp::spent(&plan, plan.steps_per_visit)).abs() < 1e-12);
        // The same visit again (it failed half-way): its steps count twice, and a maximum
        // between one and two visits' ε refuses it without recording anything.
        let two_visits = dp::spent(&plan, 2 * plan.steps_per_visit);
        let limit = (one_visit + two_visits) / 2.0;
        let e = PrivateVisit::start(&assignment(dp.clone(), 0, Some(limit)), n as usize, &budget)
            .err()
            .unwrap();
        assert!(matches!(e, AgentError::OverBudget(_)), "{e}");
        assert_eq!(budget.steps(7).unwrap(), plan.steps_per_visit);
        let own = Budget {
            max_epsilon: Some(limit),
            ..budget.clone()
        };
        assert!(
            PrivateVisit::start(&assignment(dp.clone(), 0, Some(100.0)), n as usize, &own).is_err()
        );
        let again = PrivateVisit::start(
            &assignment(dp, 0, Some(two_visits + 1e-6)),
            n as usize,
            &budget,
        )
        .unwrap()
        .unwrap();
        assert_eq!(again.steps_before, plan.steps_per_visit);
        assert!((again.report().epsilon_spent - two_visits).abs() < 1e-12);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(budget.ledger.as_ref().unwrap())
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
