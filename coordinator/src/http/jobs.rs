//! Jobs: created by researchers, consented to by each named hospital, watched by all of them.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use medsplit_engine::api::{FieldError, JobSpec, Release, job_digest, key_fingerprint};
use medsplit_engine::metrics::{Confusion, EvalKind};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{Body, Path, Query, audit};
use crate::auth::{Principal, Role};
use crate::control::{self, Stop};
use crate::error::{Error, Result};
use crate::{AppState, db};
use medsplit_engine::api::close;

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/jobs", get(list_jobs).post(create_job))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/v1/jobs/{id}/consent", post(consent))
        .route("/v1/jobs/{id}/metrics", get(metrics))
        .route("/v1/jobs/{id}/events", get(events))
}

#[derive(Serialize)]
pub struct JobView {
    id: i64,
    name: String,
    status: String,
    owner_id: i64,
    /// The owner's e-mail address: who asks the hospitals' consent.
    owner: String,
    spec: JobSpec,
    /// What a hospital approves at its agent (`medsplit-agent approve` shows the same digest):
    /// SHA-256 of the id, the owner and the specification.
    digest: String,
    network: Network,
    /// The job whose model this one starts from (`spec.init_from`).
    source: Option<SourceJob>,
    hospitals: Vec<db::JobHospital>,
    /// The agents of the job's hospitals (the client weights are sealed to the active ones),
    /// with their key fingerprints for the hospitals to compare out of band.
    agents: Vec<AgentKey>,
    /// Each hospital's ε on this job: projected (before consent) and spent, and its maximum.
    privacy: Vec<super::privacy::HospitalPrivacy>,
    visits_done: usize,
    visits_total: usize,
    current: Option<Current>,
    error: Option<String>,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
}

#[derive(Serialize)]
struct AgentKey {
    id: i64,
    name: String,
    hospital: String,
    active: bool,
    key_fingerprint: String,
}

/// The shapes of the network the spec describes: what the coordinator's encrypted layer sees,
/// and the inputs each hospital cuts for it.
#[derive(Serialize)]
struct Network {
    /// The job's preprocessing in a few words: its preset's name, or `custom (…)`.
    preprocessing: String,
    /// Waveform samples per beat and side features (RR intervals) after them, per input row.
    beat_len: usize,
    features: usize,
    /// Values per beat at the cut layer, encrypted on their way to the coordinator.
    cut_width: usize,
    /// Outputs of the coordinator's layer (the client tail's input, or the logits).
    server_outputs: usize,
    classes: usize,
    /// The label set's class names, in label order.
    class_names: Vec<&'static str>,
}

impl Network {
    fn of(spec: &JobSpec) -> Self {
        let config = spec.model_config();
        Self {
            preprocessing: spec.preprocessing.describe(),
            beat_len: config.beat_len,
            features: config.features,
            cut_width: config.cut_width().0,
            server_outputs: config.server_outputs(),
            classes: config.classes,
            class_names: spec.labels.class_names().to_vec(),
        }
    }
}

/// The finished job a job starts from, as its consent card names it.
#[derive(Serialize)]
struct SourceJob {
    id: i64,
    name: String,
    finished_at: Option<DateTime<Utc>>,
}

#[derive(Serialize)]
struct Current {
    visit_id: i64,
    round: i32,
    hospital: String,
    status: String,
    progress: f64,
}

async fn job_view(e: &db::Db, job: db::JobRow) -> Result<JobView> {
    let hospitals = db::job_hospitals(e, job.id).await?;
    let visits = db::visits(e, job.id).await?;
    let done = visits
        .iter()
        .filter(|v| matches!(v.status.as_str(), "completed" | "skipped"))
        .count();
    let current = visits
        .iter()
        .find(|v| matches!(v.status.as_str(), "queued" | "running"))
        .map(|v| Current {
            visit_id: v.id,
            round: v.round,
            hospital: hospitals
                .iter()
                .find(|h| h.hospital_id == v.hospital_id)
                .map(|h| h.name.clone())
                .unwrap_or_default(),
            status: v.status.clone(),
            progress: v.progress.unwrap_or(0.0),
        });
    let source = match job.spec.init_from {
        Some(id) => db::job(e, id).await?.map(|j| SourceJob {
            id: j.id,
            name: j.name,
            finished_at: j.finished_at,
        }),
        None => None,
    };
    let privacy = super::privacy::hospitals(e, job.id, &job.spec, &hospitals).await?;
    let agents = db::job_agents(e, job.id)
        .await?
        .into_iter()
        .map(|a| AgentKey {
            id: a.id,
            key_fingerprint: key_fingerprint(&a.public_key),
            name: a.name,
            hospital: a.hospital,
            active: a.active,
        })
        .collect();
    Ok(JobView {
        digest: job_digest(job.id, &job.owner, &job.spec),
        agents,
        id: job.id,
        source,
        privacy,
        name: job.name,
        status: job.status,
        owner_id: job.owner_id,
        owner: job.owner,
        visits_total: (job.spec.rounds as usize) * hospitals.len(),
        network: Network::of(&job.spec),
        spec: job.spec.0,
        hospitals,
        visits_done: done,
        current,
        error: job.error,
        created_at: job.created_at,
        started_at: job.started_at,
        finished_at: job.finished_at,
    })
}

/// Loads a job the caller may see: its owner, a platform admin, or an admin or agent of a
/// hospital it names.
pub(super) async fn visible_job(s: &AppState, p: &Principal, id: i64) -> Result<db::JobRow> {
    let job = db::job(&s.db, id).await?.ok_or(Error::NotFound("job"))?;
    let allowed = match p.role {
        Role::PlatformAdmin => true,
        Role::Researcher => job.owner_id == p.id,
        Role::HospitalAdmin | Role::Agent => db::job_hospitals(&s.db, id)
            .await?
            .iter()
            .any(|h| Some(h.hospital_id) == p.hospital),
    };
    if !allowed {
        return Err(Error::NotFound("job"));
    }
    Ok(job)
}

async fn create_job(
    State(s): State<AppState>,
    p: Principal,
    Body(spec): Body<JobSpec>,
) -> Result<(StatusCode, Json<JobView>)> {
    p.require(Role::Researcher)?;
    let spec = spec.with_default_in_flight();
    spec.validate()?;
    let found = db::hospitals_by_name(&s.db, &spec.hospitals).await?;
    let mut ids = Vec::new();
    for (i, name) in spec.hospitals.iter().enumerate() {
        let id = found
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| *id)
            .ok_or_else(|| {
                FieldError::new(
                    format!("hospitals[{i}]"),
                    format!("no hospital named {name:?}"),
                )
            })?;
        ids.push(id);
    }
    if let Some(source) = spec.init_from {
        check_source(&s, &p, &spec, source, &ids).await?;
    }
    let on_failure = match spec.on_failure {
        medsplit_engine::api::FailurePolicy::Skip => "skip",
        medsplit_engine::api::FailurePolicy::Fail => "fail",
    };
    let mut tx = s.db.begin().await?;
    let id = db::insert_job(&mut *tx, p.id, &spec, on_failure).await?;
    for (position, hospital) in ids.into_iter().enumerate() {
        db::insert_job_hospital(&mut *tx, id, position as i32, hospital).await?;
    }
    db::job_event(
        &mut *tx,
        id,
        "job.created",
        json!({ "awaiting_consent": spec.hospitals }),
    )
    .await?;
    audit(
        &mut *tx,
        &p,
        "job.create",
        format!("job:{id}"),
        json!({ "name": spec.name }),
    )
    .await?;
    tx.commit().await?;
    let job = db::job(&s.db, id).await?.ok_or(Error::NotFound("job"))?;
    Ok((StatusCode::CREATED, Json(job_view(&s.db, job).await?)))
}

/// A job that starts from another's model: the source exists and the researcher may see it (as
/// `GET /v1/jobs/{id}`), it has completed, its model, label set and preprocessing are the new
/// job's, and every hospital of the new job took part in it (only their agents hold its client
/// weights). A model that may not leave the coordinator (release `nobody`) passes that policy on.
async fn check_source(
    s: &AppState,
    p: &Principal,
    spec: &JobSpec,
    source: i64,
    hospitals: &[i64],
) -> Result<()> {
    let refuse = |message: String| Err(FieldError::new("init_from", message).into());
    let job = match visible_job(s, p, source).await {
        Ok(job) => job,
        Err(Error::NotFound(_)) => return refuse(format!("no job {source} that you can see")),
        Err(e) => return Err(e),
    };
    if job.status != "completed" {
        return refuse(format!(
            "job {source} is {}: only a completed job's model can be started from",
            job.status
        ));
    }
    if let Some(what) = spec.differs_in_model_from(&job.spec.0) {
        let what = if what == "labels" { "label set" } else { what };
        return refuse(format!(
            "job {source} has another {what}: a job starts from a model of its own layers, \
             label set and preprocessing"
        ));
    }
    if job.spec.release == Release::Nobody && spec.release != Release::Nobody {
        return Err(FieldError::new(
            "release",
            format!(
                "job {source}'s model may not leave the coordinator (release \"nobody\"): a job \
                 that starts from it keeps release \"nobody\""
            ),
        )
        .into());
    }
    let took_part = db::job_hospitals(&s.db, source).await?;
    for (i, id) in hospitals.iter().enumerate() {
        if !took_part.iter().any(|h| h.hospital_id == *id) {
            return refuse(format!(
                "hospital {:?} (hospitals[{i}]) did not take part in job {source}: its agents \
                 do not hold that model's client weights",
                spec.hospitals[i]
            ));
        }
    }
    Ok(())
}

async fn list_jobs(State(s): State<AppState>, p: Principal) -> Result<Json<Vec<JobView>>> {
    let jobs = match p.role {
        Role::PlatformAdmin => db::list_jobs(&s.db, None).await?,
        Role::Researcher => db::list_jobs(&s.db, Some(p.id)).await?,
        Role::HospitalAdmin => db::jobs_for_hospital(&s.db, p.hospital()?).await?,
        Role::Agent => return Err(Error::Forbidden("agents claim visits instead")),
    };
    let mut out = Vec::with_capacity(jobs.len());
    for job in jobs {
        out.push(job_view(&s.db, job).await?);
    }
    Ok(Json(out))
}

async fn get_job(
    State(s): State<AppState>,
    p: Principal,
    Path(id): Path<i64>,
) -> Result<Json<JobView>> {
    let job = visible_job(&s, &p, id).await?;
    Ok(Json(job_view(&s.db, job).await?))
}

async fn cancel_job(
    State(s): State<AppState>,
    p: Principal,
    Path(id): Path<i64>,
) -> Result<Json<JobView>> {
    let job = visible_job(&s, &p, id).await?;
    if !(p.role == Role::PlatformAdmin || (p.role == Role::Researcher && job.owner_id == p.id)) {
        return Err(Error::Forbidden(
            "only the job's owner or a platform admin can cancel it",
        ));
    }
    let mut tx = s.db.begin().await?;
    if !db::end_job(&mut tx, id, "cancelled", None).await? {
        return Err(Error::Conflict(format!(
            "the job is already {}",
            job.status
        )));
    }
    db::job_event(&mut *tx, id, "job.cancelled", json!({ "by": p.actor() })).await?;
    audit(&mut *tx, &p, "job.cancel", format!("job:{id}"), json!({})).await?;
    control::announce(&mut *tx, Stop::Job(id), close::FENCED).await?;
    tx.commit().await?;
    control::apply(&s.sessions, Stop::Job(id), close::FENCED);
    let job = db::job(&s.db, id).await?.ok_or(Error::NotFound("job"))?;
    Ok(Json(job_view(&s.db, job).await?))
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Decision {
    Approve,
    Decline,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Consent {
    decision: Decision,
}

async fn consent(
    State(s): State<AppState>,
    p: Principal,
    Path(id): Path<i64>,
    Body(body): Body<Consent>,
) -> Result<Json<JobView>> {
    p.require(Role::HospitalAdmin)?;
    let hospital = p.hospital()?;
    let job = visible_job(&s, &p, id).await?;
    if matches!(body.decision, Decision::Approve) {
        super::privacy::check_consent(&s.db, &job.spec, hospital).await?;
    }
    let decision = match body.decision {
        Decision::Approve => "approved",
        Decision::Decline => "declined",
    };
    let mut tx = s.db.begin().await?;
    if !db::set_consent(&mut *tx, id, hospital, decision, p.id).await? {
        return Err(Error::Conflict(
            "the job is not awaiting this hospital's decision".into(),
        ));
    }
    audit(
        &mut *tx,
        &p,
        &format!("job.{decision}"),
        format!("job:{id}"),
        json!({ "hospital_id": hospital }),
    )
    .await?;
    db::job_event(
        &mut *tx,
        id,
        &format!("consent.{decision}"),
        json!({ "hospital_id": hospital }),
    )
    .await?;
    if decision == "declined" {
        db::decline_job(&mut *tx, id).await?;
        db::job_event(
            &mut *tx,
            id,
            "job.declined",
            json!({ "hospital_id": hospital }),
        )
        .await?;
    } else if db::start_job_if_approved(&mut tx, id).await? {
        db::job_event(&mut *tx, id, "job.started", json!({})).await?;
    }
    tx.commit().await?;
    s.work.notify_waiters();
    let job = db::job(&s.db, id).await?.ok_or(Error::NotFound("job"))?;
    Ok(Json(job_view(&s.db, job).await?))
}

#[derive(Serialize)]
struct Metrics {
    visits: Vec<VisitMetrics>,
    /// Test figures per round and hospital, as each hospital's agent measured them on its own
    /// held-out data after its visit, and pooled over the round's hospitals.
    rounds: Vec<RoundMetrics>,
}

#[derive(Serialize)]
struct VisitMetrics {
    #[serde(flatten)]
    visit: db::Visit,
    hospital: String,
    test_evaluation: Option<Evaluation>,
}

/// A test measurement: which kind of split the test set came from, the class order, and the
/// confusion matrix with the figures it gives.
#[derive(Clone, Serialize)]
pub(super) struct Evaluation {
    pub kind: EvalKind,
    classes: Vec<String>,
    #[serde(flatten)]
    pub metrics: Confusion,
}

impl Evaluation {
    /// The stored measurement of a visit, if it has one.
    pub(super) fn of(v: &db::Visit) -> Option<Self> {
        let (classes, counts, kind) = (
            v.test_classes.as_ref()?,
            v.test_confusion.as_ref()?,
            v.test_evaluation.as_deref()?,
        );
        let n = classes.len().max(1);
        let rows: Vec<Vec<u64>> = counts
            .chunks(n)
            .map(|row| row.iter().map(|&c| c.max(0) as u64).collect())
            .collect();
        match (
            EvalKind::parse(kind),
            Confusion::from_counts(classes.clone(), &rows),
        ) {
            (Some(kind), Ok(metrics)) => Some(Self {
                kind,
                classes: classes.clone(),
                metrics,
            }),
            (_, Err(e)) => {
                tracing::error!(visit = v.id, error = %e, "stored confusion matrix unreadable");
                None
            }
            (None, _) => {
                tracing::error!(visit = v.id, kind, "stored evaluation kind unknown");
                None
            }
        }
    }

    /// The pooled measurement of several test sets: patient-wise only when every one is.
    fn pooled<'a>(all: impl IntoIterator<Item = &'a Evaluation> + Clone) -> Option<Self> {
        let first = all.clone().into_iter().next()?;
        let kind = if all.clone().into_iter().all(|e| e.kind == EvalKind::Patient) {
            EvalKind::Patient
        } else {
            EvalKind::Beat
        };
        match Confusion::pooled(all.into_iter().map(|e| &e.metrics)) {
            Ok(metrics) => metrics.map(|metrics| Self {
                kind,
                classes: first.classes.clone(),
                metrics,
            }),
            Err(e) => {
                tracing::warn!(error = %e, "test sets of one round not pooled");
                None
            }
        }
    }
}

#[derive(Serialize)]
struct RoundMetrics {
    round: i32,
    hospitals: Vec<HospitalRound>,
    mean_test_accuracy: Option<f64>,
    /// The confusion matrices of the round's hospitals added up.
    pooled_test_evaluation: Option<Evaluation>,
}

#[derive(Serialize)]
struct HospitalRound {
    hospital: String,
    status: String,
    train_loss: Option<f64>,
    train_accuracy: Option<f64>,
    test_accuracy: Option<f64>,
    test_majority_rate: Option<f64>,
}

async fn metrics(
    State(s): State<AppState>,
    p: Principal,
    Path(id): Path<i64>,
) -> Result<Json<Metrics>> {
    visible_job(&s, &p, id).await?;
    let hospitals = db::job_hospitals(&s.db, id).await?;
    let name = |h: i64| {
        hospitals
            .iter()
            .find(|x| x.hospital_id == h)
            .map(|x| x.name.clone())
            .unwrap_or_default()
    };
    let visits: Vec<VisitMetrics> = db::visits(&s.db, id)
        .await?
        .into_iter()
        .map(|v| VisitMetrics {
            hospital: name(v.hospital_id),
            test_evaluation: Evaluation::of(&v),
            visit: v,
        })
        .collect();
    let mut rounds: Vec<RoundMetrics> = Vec::new();
    for (i, v) in visits.iter().enumerate() {
        let round = v.visit.round;
        if rounds.last().is_none_or(|r| r.round != round) {
            let of_round: Vec<&Evaluation> = visits[i..]
                .iter()
                .take_while(|w| w.visit.round == round)
                .filter_map(|w| w.test_evaluation.as_ref())
                .collect();
            let accs: Vec<f64> = visits[i..]
                .iter()
                .take_while(|w| w.visit.round == round)
                .filter_map(|w| w.visit.test_accuracy)
                .collect();
            rounds.push(RoundMetrics {
                round,
                hospitals: Vec::new(),
                mean_test_accuracy: (!accs.is_empty())
                    .then(|| accs.iter().sum::<f64>() / accs.len() as f64),
                pooled_test_evaluation: Evaluation::pooled(of_round.iter().copied()),
            });
        }
        rounds
            .last_mut()
            .expect("pushed")
            .hospitals
            .push(HospitalRound {
                hospital: v.hospital.clone(),
                status: v.visit.status.clone(),
                train_loss: v.visit.train_loss,
                train_accuracy: v.visit.train_accuracy,
                test_accuracy: v.visit.test_accuracy,
                test_majority_rate: v
                    .test_evaluation
                    .as_ref()
                    .map(|e| e.metrics.majority_rate()),
            });
    }
    Ok(Json(Metrics { visits, rounds }))
}

#[derive(Deserialize)]
struct After {
    after: Option<i64>,
}

async fn events(
    State(s): State<AppState>,
    p: Principal,
    Path(id): Path<i64>,
    Query(q): Query<After>,
) -> Result<Json<Vec<db::JobEvent>>> {
    visible_job(&s, &p, id).await?;
    Ok(Json(
        db::job_events(&s.db, id, q.after.unwrap_or(0), 500).await?,
    ))
}
