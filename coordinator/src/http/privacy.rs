//! Privacy per job: the ε each hospital is projected to spend (shown before consent) and has
//! spent, the maximum its admin set (consent over it is refused), and the privacy report — what
//! the coordinator saw, what the attack harness recovers from that at the job's batch size and
//! DP setting, and what DP costs in accuracy on the inter-patient benchmark.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use medsplit_engine::api::{DpSpec, JobSpec};
use medsplit_engine::dp;
use serde::Serialize;
use serde_json::Value;

use super::Path;
use super::jobs::visible_job;
use crate::auth::Principal;
use crate::error::{Error, Result};
use crate::{AppState, db};

/// The attack harness's measurements (`medsplit-bench --attack`, docs/benchmarks.md).
const ATTACKS: &str = include_str!("../../../docs/privacy/attacks.json");
/// DS2 accuracy of the inter-patient benchmark with and without DP (docs/benchmarks.md).
const ACCURACY: &str = include_str!("../../../docs/privacy/accuracy.json");

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/v1/jobs/{id}/privacy", get(report))
}

/// One hospital's ε on one job.
#[derive(Serialize)]
pub(super) struct HospitalPrivacy {
    hospital_id: i64,
    hospital: String,
    /// Training beats its agents last reported (under the default cut); `None`: none reported.
    train_samples: Option<i64>,
    /// ε over the whole job at the spec's δ, projected from `train_samples` (or, before any
    /// report, the spec's target ε). `None`: the job has no DP (ε is unbounded) or it cannot be
    /// projected (`projection_note` says why).
    projected_epsilon: Option<f64>,
    /// σ and q of the projection (the agent derives its own from its exact data).
    noise_multiplier: Option<f64>,
    sampling_rate: Option<f64>,
    projection_note: Option<String>,
    /// ε spent after the hospital's completed visits (as its agent reported it).
    epsilon_spent: Option<f64>,
    /// The most ε the hospital spends on one job, if its admin set a maximum.
    max_epsilon: Option<f64>,
}

struct Projection {
    epsilon: f64,
    noise_multiplier: Option<f64>,
    sampling_rate: Option<f64>,
}

/// The ε a hospital with `train_samples` beats would spend on the job; `Err` says why there is
/// no projection.
fn project(spec: &JobSpec, train_samples: Option<i64>) -> std::result::Result<Projection, String> {
    let Some(settings) = &spec.dp else {
        return Err("the job has no differential privacy: ε is unbounded".into());
    };
    match train_samples {
        Some(n) if n > 0 => {
            let plan = dp::plan(spec, n as u64).map_err(|e| e.to_string())?;
            Ok(Projection {
                epsilon: plan.epsilon,
                noise_multiplier: Some(plan.noise_multiplier),
                sampling_rate: Some(plan.sampling_rate),
            })
        }
        _ => match settings {
            DpSpec {
                target_epsilon: Some(target),
                ..
            } => Ok(Projection {
                epsilon: *target,
                noise_multiplier: None,
                sampling_rate: None,
            }),
            _ => Err(
                "no agent of the hospital has reported its data size, which sets the sampling \
                 rate"
                    .into(),
            ),
        },
    }
}

/// Every hospital's ε on job `job_id`.
pub(super) async fn hospitals(
    e: &db::Db,
    job_id: i64,
    spec: &JobSpec,
    hospitals: &[db::JobHospital],
) -> Result<Vec<HospitalPrivacy>> {
    let mut out = Vec::with_capacity(hospitals.len());
    for h in hospitals {
        let train_samples = db::hospital_train_samples(e, h.hospital_id).await?;
        let max_epsilon = db::hospital(e, h.hospital_id)
            .await?
            .and_then(|h| h.max_epsilon);
        let (projected_epsilon, noise_multiplier, sampling_rate, projection_note) =
            match project(spec, train_samples) {
                Ok(p) => (Some(p.epsilon), p.noise_multiplier, p.sampling_rate, None),
                Err(note) => (None, None, None, Some(note)),
            };
        out.push(HospitalPrivacy {
            hospital_id: h.hospital_id,
            hospital: h.name.clone(),
            train_samples,
            projected_epsilon,
            noise_multiplier,
            sampling_rate,
            projection_note,
            epsilon_spent: db::epsilon_spent(e, job_id, h.hospital_id).await?,
            max_epsilon,
        });
    }
    Ok(out)
}

/// Refuses (409) a hospital's approval of a job whose ε would exceed the hospital's maximum, or
/// cannot be projected while a maximum is set.
pub(super) async fn check_consent(e: &db::Db, spec: &JobSpec, hospital_id: i64) -> Result<()> {
    let Some(max) = db::hospital(e, hospital_id)
        .await?
        .and_then(|h| h.max_epsilon)
    else {
        return Ok(());
    };
    let n = db::hospital_train_samples(e, hospital_id).await?;
    match project(spec, n) {
        Err(why) => Err(Error::Conflict(format!(
            "this hospital spends at most ε = {max} on a job, and this job's ε cannot be \
             projected: {why}"
        ))),
        Ok(p) if p.epsilon > max => Err(Error::Conflict(format!(
            "this job would spend ε = {:.2} of this hospital's privacy (δ = {}), over its maximum \
             of {max}",
            p.epsilon,
            spec.dp.as_ref().map_or(0.0, |d| d.delta)
        ))),
        Ok(_) => Ok(()),
    }
}

#[derive(Serialize)]
struct Report {
    job_id: i64,
    batch_size: u32,
    /// Whether activations and the gradients the coordinator returns are encrypted
    /// (`insecure_plaintext` is false).
    encrypted: bool,
    dp: Option<DpSpec>,
    hospitals: Vec<HospitalPrivacy>,
    /// What the coordinator received (`up`) and sent (`down`) over the job's completed visits.
    seen: Vec<Seen>,
    attack: Attack,
    /// The inter-patient benchmark's DS2 figures with and without DP (docs/privacy/accuracy.json).
    accuracy: Value,
}

#[derive(Serialize)]
struct Seen {
    direction: String,
    kind: String,
    count: i64,
    bytes: i64,
    /// What the coordinator learns from messages of this kind.
    carries: String,
}

#[derive(Serialize)]
struct Attack {
    /// The batch size the figures were measured at: the largest measured batch size not above
    /// the job's (a smaller batch leaks more), or the smallest measured.
    measured_batch_size: u64,
    dp: bool,
    /// The ε of the measured DP setting (with `dp`).
    measured_epsilon: Option<f64>,
    /// The harness's rows for that batch size and DP setting (both attackers, both windows):
    /// `cosine_median`, `recovered_share`, `label_recovery`, `knn_accuracy`, `majority_rate`, …
    results: Vec<Value>,
    commands: Value,
}

fn carries(direction: &str, kind: &str, encrypted: bool, dp: bool) -> String {
    let noised = if dp {
        ", each beat's share clipped and Gaussian noise added (DP-SGD)"
    } else {
        ""
    };
    let summed = format!(
        "the batch-summed gradient of the coordinator's layer (Σ aᵀg, Σ g) in plaintext{noised}"
    );
    match (direction, kind, encrypted) {
        ("up", "Forward", true) => "cut-layer activations, encrypted: the coordinator computes on \
                                    them without seeing them"
            .into(),
        ("up", "Forward", false) => "cut-layer activations in plaintext".into(),
        ("up", "Backward", true) => format!("Enc(dJ/dlogits), and {summed}"),
        ("up", "Backward", false) => format!("dJ/dlogits in plaintext, and {summed}"),
        ("up", "FrozenForward", _) => format!("cut-layer activations (as Forward), and {summed}"),
        ("up", "Update", _) => summed,
        ("down", "Logits", true) => "the layer's outputs, encrypted under the agent's key".into(),
        ("down", "InputGradients", true) => {
            "dJ/dactivations, encrypted under the agent's key".into()
        }
        ("down", "Logits" | "InputGradients", false) => "the same in plaintext".into(),
        ("down", "Updated", _) => "an acknowledgement".into(),
        _ => "unreadable: the session ended on it".into(),
    }
}

fn attack(batch_size: u32, dp: bool) -> Result<Attack> {
    let all: Value = serde_json::from_str(ATTACKS)
        .map_err(|e| Error::Internal(format!("docs/privacy/attacks.json: {e}")))?;
    let rows: Vec<&Value> = all["results"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["dp"].as_bool() == Some(dp))
        .collect();
    let sizes: Vec<u64> = rows
        .iter()
        .filter_map(|r| r["batch_size"].as_u64())
        .collect();
    let measured = sizes
        .iter()
        .copied()
        .filter(|&b| b <= u64::from(batch_size))
        .max()
        .or_else(|| sizes.iter().copied().min())
        .unwrap_or(0);
    let results: Vec<Value> = rows
        .into_iter()
        .filter(|r| r["batch_size"].as_u64() == Some(measured))
        .cloned()
        .collect();
    Ok(Attack {
        measured_batch_size: measured,
        dp,
        measured_epsilon: results.iter().find_map(|r| r["epsilon"].as_f64()),
        results,
        commands: all["commands"].clone(),
    })
}

async fn report(
    State(s): State<AppState>,
    p: Principal,
    Path(id): Path<i64>,
) -> Result<Json<Report>> {
    let job = visible_job(&s, &p, id).await?;
    let spec = &job.spec.0;
    let encrypted = !spec.insecure_plaintext;
    let mut seen: Vec<Seen> = Vec::new();
    for visit in db::visits(&s.db, id).await? {
        if visit.status != "completed" {
            continue;
        }
        for k in visit.message_kinds.map(|k| k.0).unwrap_or_default() {
            match seen
                .iter_mut()
                .find(|s| s.direction == k.direction && s.kind == k.kind)
            {
                Some(s) => {
                    s.count += k.count;
                    s.bytes += k.bytes;
                }
                None => seen.push(Seen {
                    carries: carries(&k.direction, &k.kind, encrypted, spec.dp.is_some()),
                    direction: k.direction,
                    kind: k.kind,
                    count: k.count,
                    bytes: k.bytes,
                }),
            }
        }
    }
    let accuracy: Value = serde_json::from_str(ACCURACY)
        .map_err(|e| Error::Internal(format!("docs/privacy/accuracy.json: {e}")))?;
    let job_hospitals = db::job_hospitals(&s.db, id).await?;
    Ok(Json(Report {
        job_id: id,
        batch_size: spec.batch_size,
        encrypted,
        dp: spec.dp.clone(),
        hospitals: hospitals(&s.db, id, spec, &job_hospitals).await?,
        seen,
        attack: attack(spec.batch_size, spec.dp.is_some())?,
        accuracy,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attack_figures_are_those_of_the_largest_measured_batch_not_above_the_jobs() {
        let a = attack(16, false).unwrap();
        assert_eq!(a.measured_batch_size, 8);
        assert!(!a.results.is_empty());
        assert!(
            a.results
                .iter()
                .all(|r| r["dp"] == false && r["batch_size"] == 8)
        );
        let a = attack(32, true).unwrap();
        assert_eq!(a.measured_batch_size, 32);
        assert!(a.measured_epsilon.is_some());
        assert_eq!(attack(1, true).unwrap().measured_batch_size, 1);
    }

    #[test]
    fn the_benchmark_figures_parse() {
        let v: Value = serde_json::from_str(ACCURACY).unwrap();
        assert!(v["without_dp"]["accuracy"].is_number());
        assert!(v["with_dp"]["accuracy"].is_number());
    }
}
