//! What an agent takes of a finished job: its final client layers (sealed to this agent by the
//! agent of the job's last visit) and, when the job's release policy allows, the coordinator's
//! server layer, so that the hospital holds the whole trained network.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use crypto_box::SecretKey;
use medsplit_engine::api::{JobSpec, ModelRelease};
use medsplit_engine::export::{self, ModelCard, TrainedModel};
use medsplit_engine::metrics::{Confusion, EvalKind};

use crate::client::Coordinator;
use crate::{AgentError, model_dir, seal};

/// The job's spec and its final client parameters (in the order of `ClientNet::parameters`),
/// opened with this agent's key and checked against the spec's shapes.
pub async fn final_client(
    coordinator: &Coordinator,
    key: &SecretKey,
    job: i64,
) -> Result<(JobSpec, Vec<f32>), AgentError> {
    let release = coordinator.client_release(job).await?;
    let h = &release.handoff;
    let sender = seal::public_key(&decode(&h.sender_public_key)?)?;
    let client = seal::open(key, &sender, &decode(&h.sealed)?, job, h.from_visit_id)?;
    let expected = release.spec.model_config().client_parameter_count();
    if client.len() != expected {
        return Err(AgentError::Session(format!(
            "the final client weights hold {} values; the job's model has {expected}",
            client.len()
        )));
    }
    Ok((release.spec, client))
}

/// The whole trained network of a finished job and the coordinator's record of it: the final
/// client parameters, opened, and the server layer, checked against the spec's shapes.
pub async fn whole_model(
    coordinator: &Coordinator,
    key: &SecretKey,
    job: i64,
) -> Result<(ModelRelease, Vec<f32>, Vec<f32>), AgentError> {
    let (_, client) = final_client(coordinator, key, job).await?;
    let release = coordinator.model_release(job).await?;
    let bytes = decode(&release.server)?;
    let expected = release.spec.model_config().server_parameter_count();
    if bytes.len() != expected * 4 {
        return Err(AgentError::Session(format!(
            "the server layer holds {} bytes; the job's model has {expected} values",
            bytes.len()
        )));
    }
    let server = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((release, client, server))
}

/// Exports a finished job's whole model into `dir` (which must be empty or absent): the ONNX
/// graph, the safetensors weights and the model card (see [`model_dir::write`]). Returns the
/// card written.
pub async fn export(
    coordinator: &Coordinator,
    key: &SecretKey,
    job: i64,
    dir: &Path,
) -> Result<ModelCard, AgentError> {
    // Refuse an occupied directory before the coordinator records an export.
    if std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()) {
        return Err(AgentError::Config(format!(
            "{} is not empty: export into a new directory",
            dir.display()
        )));
    }
    let (release, client, server) = whole_model(coordinator, key, job).await?;
    let model = TrainedModel::new(release.spec.model_config(), client, server)
        .map_err(|e| AgentError::Session(format!("the released model: {e}")))?;
    let mut card = card(&release, chrono::Utc::now().to_rfc3339())?;
    model_dir::write(dir, &model, &mut card, false)
        .map_err(|e| AgentError::Config(e.to_string()))?;
    Ok(card)
}

/// The model card of a release: the coordinator's record of the job, its last measured round
/// per hospital and pooled.
pub fn card(release: &ModelRelease, exported_at: String) -> Result<ModelCard, AgentError> {
    let evaluation = match &release.evaluation {
        None => None,
        Some(round) => {
            let mut hospitals = Vec::new();
            for h in &round.hospitals {
                let confusion = h.test.confusion().map_err(|e| {
                    AgentError::Session(format!("the test counts of {}: {e}", h.hospital))
                })?;
                hospitals.push(export::HospitalEvaluation {
                    hospital: h.hospital.clone(),
                    confusion,
                });
            }
            let kind = if round
                .hospitals
                .iter()
                .all(|h| h.test.kind == EvalKind::Patient)
            {
                EvalKind::Patient
            } else {
                EvalKind::Beat
            };
            let pooled = Confusion::pooled(hospitals.iter().map(|h| &h.confusion))
                .map_err(|e| AgentError::Session(format!("pooling the test counts: {e}")))?;
            pooled.map(|pooled| export::CardEvaluation {
                round: round.round + 1,
                kind,
                hospitals,
                pooled,
            })
        }
    };
    Ok(ModelCard::new(
        release.job_id,
        release.spec.clone(),
        release.hospitals.clone(),
        release.rounds,
        evaluation,
        exported_at,
        release.exported_by.clone(),
    ))
}

fn decode(s: &str) -> Result<Vec<u8>, AgentError> {
    B64.decode(s)
        .map_err(|_| AgentError::Session("the coordinator sent malformed base64".into()))
}
