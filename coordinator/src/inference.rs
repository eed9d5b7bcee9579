//! Private inference on a finished job's model: a WebSocket on which an agent of one of the
//! job's hospitals sends encrypted cut-layer activations (the engine's forward messages of
//! evaluation steps) and the coordinator answers each with its final server layer applied to the
//! ciphertexts. The session is forward-only: no gradients, no update, nothing stored but one
//! audit entry with its counts when it ends. Always encrypted, whatever the job trained with.

use std::time::{Duration, Instant};

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use medsplit_engine::api::close;
use medsplit_engine::protocol::{Privacy, ServerSession};
use serde_json::json;

use crate::auth::Principal;
use crate::error::{Error, Result};
use crate::http::Path;
use crate::http::models::finished_job_of_agent;
use crate::session::{compute, decode_f32};
use crate::{AppState, db};

/// `GET /v1/jobs/{id}/inference`: an agent of a hospital of the job, once the job has
/// completed.
pub async fn upgrade(
    State(s): State<AppState>,
    p: Principal,
    Path(job_id): Path<i64>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response> {
    let ws = ws?;
    if s.draining() {
        return Err(Error::Unavailable("the coordinator is shutting down"));
    }
    let job = finished_job_of_agent(&s, &p, job_id).await?;
    let hospital = p.hospital()?;
    let checkpoint = db::checkpoint(&s.db, job_id)
        .await?
        .ok_or_else(|| Error::Internal(format!("job {job_id}: completed without a checkpoint")))?;
    let config = job.spec.0.model_config();
    let server = ServerSession::inference(&config, Privacy::Encrypted, &decode_f32(&checkpoint))
        .map_err(|e| Error::Internal(format!("job {job_id}: server layer: {e}")))?;
    let limit = s.settings.max_message_bytes;
    Ok(ws
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| run(s, socket, p, job_id, hospital, server)))
}

/// What one session served.
#[derive(Default)]
struct Counters {
    bytes_up: i64,
    bytes_down: i64,
    messages: i64,
    server_time: Duration,
}

async fn run(
    s: AppState,
    mut socket: WebSocket,
    p: Principal,
    job_id: i64,
    hospital: i64,
    mut server: ServerSession,
) {
    let (key, mut stop) = s.sessions.register_inference(crate::SessionOf {
        agent_id: p.id,
        hospital_id: hospital,
        job_id,
    });
    let started = Instant::now();
    let mut c = Counters::default();
    let end = serve(&mut socket, &mut server, &mut c, &mut stop).await;
    s.sessions.unregister(key, &stop);
    let beats = server.forwarded();
    tracing::info!(
        job = job_id,
        agent = p.id,
        beats,
        bytes_up = c.bytes_up,
        bytes_down = c.bytes_down,
        "inference session closed"
    );
    let detail = json!({
        "hospital_id": hospital,
        "beats": beats,
        "bytes_up": c.bytes_up,
        "bytes_down": c.bytes_down,
        "messages": c.messages,
        "server_seconds": c.server_time.as_secs_f64(),
        "wall_seconds": started.elapsed().as_secs_f64(),
        "ended": end.as_ref().map_or("closed by the agent", |(_, reason)| reason.as_str()),
    });
    if let Err(e) = db::audit(
        &s.db,
        &p.actor(),
        "model.inference",
        &format!("job:{job_id}"),
        detail,
    )
    .await
    {
        tracing::error!(job = job_id, error = %e, "inference session not audited");
    }
    if let Some((code, reason)) = end {
        let reason: String = reason.chars().take(120).collect();
        let _ = socket
            .send(Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            })))
            .await;
    }
}

/// Answers forward messages until the agent closes (`None`) or the session must end (the close
/// code and reason to send).
async fn serve(
    socket: &mut WebSocket,
    server: &mut ServerSession,
    c: &mut Counters,
    stop: &mut tokio::sync::watch::Receiver<Option<u16>>,
) -> Option<(u16, String)> {
    loop {
        let message = tokio::select! {
            _ = stop.changed() => {
                let code = stop.borrow().unwrap_or(close::SHUTDOWN);
                let reason = match code {
                    close::REVOKED => "agent revoked",
                    _ => "coordinator shutting down",
                };
                return Some((code, reason.to_string()));
            }
            m = socket.recv() => m,
        };
        let bytes = match message {
            None | Some(Ok(Message::Close(_))) => return None,
            Some(Err(e)) => {
                let text = e.to_string();
                return (text.contains("too long") || text.contains("too big"))
                    .then(|| (1009, "message too big".to_string()));
            }
            Some(Ok(Message::Binary(bytes))) => bytes,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Text(_))) => {
                return Some((
                    close::BAD_MESSAGE,
                    "an inference session carries binary forward messages only".into(),
                ));
            }
        };
        c.bytes_up += bytes.len() as i64;
        let started = Instant::now();
        let reply = compute(|| server.handle(&bytes));
        c.server_time += started.elapsed();
        match reply {
            Ok(reply) => {
                c.bytes_down += reply.len() as i64;
                c.messages += 2;
                if socket.send(Message::Binary(reply.into())).await.is_err() {
                    return None;
                }
                // The weight transforms for this message's chunk sizes, while the agent decrypts.
                if let Err(e) = server.prepare() {
                    tracing::error!(error = %e, "server layer failed");
                    return Some((1011, "internal error".into()));
                }
            }
            Err(e) => return Some((close::BAD_MESSAGE, format!("bad message: {e}"))),
        }
    }
}
