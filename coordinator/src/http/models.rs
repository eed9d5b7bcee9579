//! A finished job's model: its client layers sealed to each agent of the job's hospitals, its
//! server layer released to them when the job's release policy allows, and the record of who
//! exported it.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use medsplit_engine::api::{
    ClientRelease, Handoff, HospitalEvaluation, ModelRelease, Release, RoundEvaluation,
    TestEvaluation,
};
use serde_json::json;

use super::jobs::{Evaluation, visible_job};
use super::{Path, audit};
use crate::auth::{Principal, Role};
use crate::error::{Error, Result};
use crate::{AppState, db};

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/jobs/{id}/model", get(release))
        .route("/v1/jobs/{id}/model/client", get(client_weights))
        .route("/v1/jobs/{id}/exports", get(exports))
}

/// The completed job an agent of one of its hospitals asks for. An agent outside the job is
/// told the job does not exist for it.
pub(crate) async fn finished_job_of_agent(
    s: &AppState,
    p: &Principal,
    id: i64,
) -> Result<db::JobRow> {
    p.require(Role::Agent)?;
    let hospital = p.hospital()?;
    let job = db::job(&s.db, id).await?.ok_or(Error::NotFound("job"))?;
    let hospitals = db::job_hospitals(&s.db, id).await?;
    if !hospitals.iter().any(|h| h.hospital_id == hospital) {
        return Err(Error::Forbidden(
            "this agent's hospital did not take part in the job",
        ));
    }
    if job.status != "completed" {
        return Err(Error::Conflict(format!(
            "the job is {}: only a completed job has a model",
            job.status
        )));
    }
    Ok(job)
}

/// `GET /v1/jobs/{id}/model/client`: the job's final client weights, sealed to the calling agent
/// by the agent of the job's last completed visit. Allowed under every release policy: the
/// weights are the hospitals' own, and private inference needs them.
async fn client_weights(
    State(s): State<AppState>,
    p: Principal,
    Path(id): Path<i64>,
) -> Result<Json<ClientRelease>> {
    let job = finished_job_of_agent(&s, &p, id).await?;
    let row = db::handoff(&s.db, id, i32::MAX, p.id)
        .await?
        .ok_or(Error::NotFound(
            "final weights sealed to this agent (it was enrolled after the job's last visit)",
        ))?;
    Ok(Json(ClientRelease {
        job_id: id,
        spec: job.spec.0,
        handoff: Handoff {
            from_visit_id: row.visit_id,
            sender_agent_id: row.sender_agent_id,
            sender_public_key: B64.encode(&row.sender_public_key),
            sealed: B64.encode(&row.sealed),
        },
    }))
}

/// `GET /v1/jobs/{id}/model`: the server layer and the job's record, for an agent of a
/// participating hospital to export the whole model; refused when the job's policy keeps the
/// server layer on the coordinator. Every release is audited and listed under the job's exports.
async fn release(
    State(s): State<AppState>,
    p: Principal,
    Path(id): Path<i64>,
) -> Result<Json<ModelRelease>> {
    let job = finished_job_of_agent(&s, &p, id).await?;
    let spec = job.spec.0;
    if spec.release == Release::Nobody {
        return Err(Error::Forbidden(
            "the job's release policy is \"nobody\": its server layer stays on the coordinator \
             (use private inference: medsplit-agent predict --job)",
        ));
    }
    let server = db::checkpoint(&s.db, id)
        .await?
        .ok_or_else(|| Error::Internal(format!("job {id}: completed without a checkpoint")))?;
    let hospitals = db::job_hospitals(&s.db, id).await?;
    let visits = db::visits(&s.db, id).await?;
    let name = |h: i64| {
        hospitals
            .iter()
            .find(|x| x.hospital_id == h)
            .map(|x| x.name.clone())
            .unwrap_or_default()
    };
    let measured: Vec<(&db::Visit, Evaluation)> = visits
        .iter()
        .filter_map(|v| Some((v, Evaluation::of(v)?)))
        .collect();
    let evaluation = measured
        .iter()
        .map(|(v, _)| v.round)
        .max()
        .map(|round| RoundEvaluation {
            round: round as u32,
            hospitals: measured
                .iter()
                .filter(|(v, _)| v.round == round)
                .map(|(v, e)| HospitalEvaluation {
                    hospital: name(v.hospital_id),
                    test: TestEvaluation::new(e.kind, &e.metrics),
                })
                .collect(),
        });
    let rounds = visits
        .iter()
        .filter(|v| v.status == "completed")
        .map(|v| v.round + 1)
        .max()
        .unwrap_or(0) as u32;
    let hospital = p.hospital()?;
    let agent = db::list_agents(&s.db, hospital)
        .await?
        .into_iter()
        .find(|a| a.id == p.id)
        .map(|a| a.name)
        .unwrap_or_default();
    let exported_by = format!("agent {agent} ({}) of {}", p.id, name(hospital));
    let mut tx = s.db.begin().await?;
    db::record_export(&mut *tx, id, p.id, hospital).await?;
    audit(
        &mut *tx,
        &p,
        "model.export",
        format!("job:{id}"),
        json!({ "hospital_id": hospital }),
    )
    .await?;
    db::job_event(
        &mut *tx,
        id,
        "model.exported",
        json!({ "agent_id": p.id, "hospital": name(hospital) }),
    )
    .await?;
    tx.commit().await?;
    Ok(Json(ModelRelease {
        job_id: id,
        job_name: job.name,
        owner: job.owner,
        hospitals: hospitals.iter().map(|h| h.name.clone()).collect(),
        rounds,
        finished_at: job.finished_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
        server: B64.encode(&server),
        evaluation,
        exported_by,
        spec,
    }))
}

/// `GET /v1/jobs/{id}/exports`: which agent exported the job's model, when; for whoever may see
/// the job.
async fn exports(
    State(s): State<AppState>,
    p: Principal,
    Path(id): Path<i64>,
) -> Result<Json<Vec<db::ExportRow>>> {
    visible_job(&s, &p, id).await?;
    Ok(Json(db::exports(&s.db, id).await?))
}
