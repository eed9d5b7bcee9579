//! One training session per visit: a WebSocket whose binary frames are the engine's wire
//! messages (the server layer answers each one) and whose text frames are
//! [`AgentFrame`]/[`CoordinatorFrame`] control messages. The visit is completed — metrics,
//! checkpoint of the server layer, sealed client weights, next visit queued — in one
//! transaction fenced by the attempt number.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use medsplit_engine::api::{AgentFrame, CoordinatorFrame, FieldError, VisitReport, close};
use medsplit_engine::metrics::{Confusion, EvalKind};
use medsplit_engine::protocol::{Privacy, ServerSession};
use medsplit_engine::wire;
use serde::Deserialize;
use serde_json::json;

use crate::auth::{Principal, Role};
use crate::error::{Error, Result};
use crate::http::{Path, Query, parse_body, text};
use crate::{AppState, db};

#[derive(Deserialize)]
pub struct SessionQuery {
    attempt: i32,
}

struct Visit {
    id: i64,
    attempt: i32,
    agent_id: i64,
    hospital_id: i64,
    job_id: i64,
    /// The classes of the job's label set, in label order.
    classes: Vec<String>,
    /// Whether this visit's round measures the test set.
    evaluates: bool,
    /// Whether the job trains with DP-SGD (its reports then carry `dp`).
    dp: bool,
}

/// `GET /v1/visits/{id}/session?attempt=N`: only the agent holding this attempt of the visit,
/// from the visit's hospital, may open it.
pub async fn upgrade(
    State(s): State<AppState>,
    p: Principal,
    Path(visit_id): Path<i64>,
    Query(q): Query<SessionQuery>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response> {
    let ws = ws?;
    p.require(Role::Agent)?;
    if s.draining() {
        return Err(Error::Unavailable("the coordinator is shutting down"));
    }
    let visit = db::visit(&s.db, visit_id)
        .await?
        .ok_or(Error::NotFound("visit"))?;
    if Some(visit.hospital_id) != p.hospital {
        return Err(Error::Forbidden("this visit belongs to another hospital"));
    }
    if visit.status != "running" || visit.agent_id != Some(p.id) || visit.attempt != q.attempt {
        return Err(Error::Conflict(
            "this attempt does not hold the visit".into(),
        ));
    }
    let job = db::job(&s.db, visit.job_id)
        .await?
        .ok_or(Error::NotFound("job"))?;
    let spec = job.spec.0;
    let config = spec.model_config();
    let privacy = if spec.insecure_plaintext {
        Privacy::Plaintext
    } else {
        Privacy::Encrypted
    };
    // A job's first visit starts from the source job's final layer when it has one.
    let checkpoint = match (db::checkpoint(&s.db, job.id).await?, spec.init_from) {
        (None, Some(source)) => Some(db::checkpoint(&s.db, source).await?.ok_or_else(|| {
            Error::Internal(format!(
                "job {}: source job {source} has no checkpoint",
                job.id
            ))
        })?),
        (checkpoint, _) => checkpoint,
    };
    let server = match checkpoint {
        Some(bytes) => {
            ServerSession::resume(&config, privacy, spec.server_optimizer, &decode_f32(&bytes))
        }
        None => ServerSession::new(&config, privacy, spec.server_optimizer, spec.seed),
    }
    .map_err(|e| Error::Internal(format!("job {}: server layer: {e}", job.id)))?;
    let server = if spec.train_client {
        server
    } else {
        server.frozen_client()
    };
    // Up to the job's batches in flight: their messages are answered in the order they arrive.
    let server = server
        .with_depth(spec.in_flight() as usize)
        .map_err(|e| Error::Internal(format!("job {}: server layer: {e}", job.id)))?;
    let visit = Visit {
        id: visit.id,
        attempt: q.attempt,
        agent_id: p.id,
        hospital_id: visit.hospital_id,
        job_id: job.id,
        classes: spec
            .labels
            .class_names()
            .iter()
            .map(|c| c.to_string())
            .collect(),
        evaluates: u32::try_from(visit.round).is_ok_and(|r| spec.evaluates(r)),
        dp: spec.dp.is_some(),
    };
    // This replica hosts the session from now on: should it go away, another re-queues the
    // visit at once instead of waiting for the lease.
    if !db::host_session(&s.db, visit.id, visit.attempt, visit.agent_id, s.replica).await? {
        return Err(Error::Conflict(
            "this attempt does not hold the visit".into(),
        ));
    }
    let limit = s.settings.max_message_bytes;
    Ok(ws
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| run(s, socket, visit, server)))
}

pub fn encode_f32(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

pub fn decode_f32(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Counters of one session.
#[derive(Default)]
struct Counters {
    bytes_up: i64,
    bytes_down: i64,
    messages: i64,
    server_time: Duration,
    /// Messages and bytes per (direction, kind): what the privacy report shows the coordinator saw.
    kinds: BTreeMap<(&'static str, &'static str), (i64, i64)>,
}

impl Counters {
    fn count(&mut self, direction: &'static str, kind: Option<&'static str>, bytes: usize) {
        let entry = self
            .kinds
            .entry((direction, kind.unwrap_or("unreadable")))
            .or_default();
        entry.0 += 1;
        entry.1 += bytes as i64;
    }

    fn message_kinds(&self) -> Vec<db::MessageKind> {
        self.kinds
            .iter()
            .map(|(&(direction, kind), &(count, bytes))| db::MessageKind {
                direction: direction.into(),
                kind: kind.into(),
                count,
                bytes,
            })
            .collect()
    }
}

async fn run(s: AppState, mut socket: WebSocket, visit: Visit, server: ServerSession) {
    let of = crate::SessionOf {
        agent_id: visit.agent_id,
        hospital_id: visit.hospital_id,
        job_id: visit.job_id,
    };
    let mut stop = s.sessions.register(visit.id, Some(visit.attempt), of);
    let end = serve(&s, &mut socket, &visit, server, &mut stop).await;
    s.sessions.unregister(visit.id, &stop);
    let (code, reason) = match end {
        End::Completed => (1000, "visit completed".to_string()),
        End::AgentLeft => return,
        End::Stopped(code) => (
            code,
            match code {
                close::REVOKED => "agent revoked",
                close::SHUTDOWN => "coordinator shutting down; the visit will be retried",
                _ => "this attempt no longer holds the visit",
            }
            .to_string(),
        ),
        End::TooBig => (1009, "message too big".to_string()),
        End::Bad(reason) => (close::BAD_MESSAGE, reason),
        End::Failed => (1011, "internal error".to_string()),
    };
    tracing::info!(visit = visit.id, attempt = visit.attempt, code, %reason, "session closed");
    let reason: String = reason.chars().take(120).collect();
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await;
}

enum End {
    Completed,
    AgentLeft,
    Stopped(u16),
    TooBig,
    Bad(String),
    Failed,
}

async fn serve(
    s: &AppState,
    socket: &mut WebSocket,
    visit: &Visit,
    server: ServerSession,
    stop: &mut tokio::sync::watch::Receiver<Option<u16>>,
) -> End {
    let mut server = Some(server);
    let mut counters = Counters::default();
    let mut last_progress = Instant::now() - Duration::from_secs(10);
    loop {
        let message = tokio::select! {
            _ = stop.changed() => return End::Stopped(stop.borrow().unwrap_or(close::FENCED)),
            m = socket.recv() => m,
        };
        let message = match message {
            None | Some(Ok(Message::Close(_))) => return End::AgentLeft,
            Some(Err(e)) => {
                let text = e.to_string();
                return if text.contains("too long") || text.contains("too big") {
                    End::TooBig
                } else {
                    tracing::debug!(visit = visit.id, error = %text, "session read failed");
                    End::AgentLeft
                };
            }
            Some(Ok(m)) => m,
        };
        match message {
            Message::Binary(bytes) => {
                counters.bytes_up += bytes.len() as i64;
                counters.count("up", wire::client_kind(&bytes), bytes.len());
                let started = Instant::now();
                let srv = server.as_mut().expect("server layer present");
                let reply = compute(|| srv.handle(&bytes));
                counters.server_time += started.elapsed();
                match reply {
                    Ok(reply) => {
                        counters.bytes_down += reply.len() as i64;
                        counters.count("down", wire::server_kind(&reply), reply.len());
                        counters.messages += 2;
                        if socket.send(Message::Binary(reply.into())).await.is_err() {
                            return End::AgentLeft;
                        }
                        // The layer's update and weight transforms run while the agent computes.
                        // Their cost is fixed by the model (~0.1 ms), not by the message, so they
                        // run inline rather than through `compute`'s hand-off of the worker.
                        let started = Instant::now();
                        let prepared = srv.prepare();
                        counters.server_time += started.elapsed();
                        if let Err(e) = prepared {
                            tracing::error!(visit = visit.id, error = %e, "server layer failed");
                            return End::Failed;
                        }
                    }
                    Err(e) => return End::Bad(format!("bad message: {e}")),
                }
            }
            Message::Text(text) => match parse_body::<AgentFrame>(text.as_bytes()) {
                Ok(AgentFrame::Progress {
                    samples_done,
                    samples_total,
                    epoch,
                    epochs,
                }) => {
                    if last_progress.elapsed() >= Duration::from_secs(1) && samples_total > 0 {
                        last_progress = Instant::now();
                        let within = samples_done.min(samples_total) as f64 / samples_total as f64;
                        let progress =
                            ((epoch.saturating_sub(1)) as f64 + within) / epochs.max(1) as f64;
                        if let Err(e) = db::set_progress(
                            &s.db,
                            visit.id,
                            visit.attempt,
                            progress.clamp(0.0, 1.0),
                        )
                        .await
                        {
                            tracing::warn!(error = %e, "progress not recorded");
                        }
                    }
                }
                Ok(AgentFrame::Complete(report)) => {
                    let server = server.as_mut().expect("server layer present");
                    return match complete(s, visit, server, report, &counters).await {
                        Ok(true) => {
                            let frame = serde_json::to_string(&CoordinatorFrame::Completed)
                                .expect("serializable");
                            let _ = socket.send(Message::Text(frame.into())).await;
                            End::Completed
                        }
                        Ok(false) => End::Stopped(close::FENCED),
                        Err(Error::Invalid(e)) => End::Bad(format!("bad report: {e}")),
                        Err(e) => {
                            tracing::error!(visit = visit.id, error = %e, "completing the visit failed");
                            End::Failed
                        }
                    };
                }
                Err(e) => return End::Bad(format!("bad control frame: {e}")),
            },
            Message::Ping(_) | Message::Pong(_) => {}
            Message::Close(_) => return End::AgentLeft,
        }
    }
}

/// Runs CPU-bound work (the HE products take milliseconds) without stalling the other tasks of
/// a multi-threaded runtime.
pub(crate) fn compute<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// What a checked report records.
struct Checked {
    sealed: Vec<(i64, Vec<u8>)>,
    test: Option<(EvalKind, Confusion)>,
}

/// Checks a report against the job's agents. Copies sealed to an agent revoked (or of a hospital
/// disabled) since the claim are dropped: no weights are kept for it.
fn check_report(r: &VisitReport, visit: &Visit, agents: &[db::JobAgent]) -> Result<Checked> {
    let unit = |field: &str, v: f64| {
        if (0.0..=1.0).contains(&v) {
            Ok(())
        } else {
            Err(FieldError::new(field, "must be in [0, 1]"))
        }
    };
    unit("train_accuracy", r.train_accuracy)?;
    if let Some(a) = r.test_accuracy {
        unit("test_accuracy", a)?;
    }
    if !r.train_loss.is_finite() || r.train_loss < 0.0 {
        return Err(FieldError::new("train_loss", "must be finite and non-negative").into());
    }
    let test = check_test(r, visit)?;
    check_dp(r, visit)?;
    let mut out = Vec::new();
    for (i, copy) in r.sealed.iter().enumerate() {
        let Some(agent) = agents.iter().find(|a| a.id == copy.recipient_agent_id) else {
            return Err(FieldError::new(
                format!("sealed[{i}].recipient_agent_id"),
                "not an agent of this job's hospitals",
            )
            .into());
        };
        let bytes = B64
            .decode(&copy.sealed)
            .ok()
            .filter(|b| b.len() <= 4 << 20)
            .ok_or_else(|| {
                FieldError::new(
                    format!("sealed[{i}].sealed"),
                    "must be base64, at most 4 MiB",
                )
            })?;
        if agent.active {
            out.push((copy.recipient_agent_id, bytes));
        }
    }
    if out.is_empty() {
        return Err(FieldError::new(
            "sealed",
            "the weights must be sealed to at least one active agent",
        )
        .into());
    }
    Ok(Checked { sealed: out, test })
}

/// The DP report: present exactly when the job trains with DP-SGD, with figures in range.
fn check_dp(r: &VisitReport, visit: &Visit) -> Result<()> {
    let Some(dp) = &r.dp else {
        if visit.dp {
            return Err(
                FieldError::new("dp", "the job trains with DP-SGD: the report is missing").into(),
            );
        }
        return Ok(());
    };
    if !visit.dp {
        return Err(FieldError::new("dp", "the job does not train with DP-SGD").into());
    }
    if !(dp.sampling_rate > 0.0 && dp.sampling_rate <= 1.0) {
        return Err(FieldError::new("dp.sampling_rate", "must be in (0, 1]").into());
    }
    if !(dp.noise_multiplier.is_finite() && dp.noise_multiplier > 0.0) {
        return Err(FieldError::new("dp.noise_multiplier", "must be a positive number").into());
    }
    if !(dp.epsilon_spent.is_finite() && dp.epsilon_spent >= 0.0) {
        return Err(FieldError::new("dp.epsilon_spent", "must be a non-negative number").into());
    }
    Ok(())
}

/// The test measurement: present exactly when the round measures the test set, one row and
/// column per class of the job's label set (its names, in its order), counts that sum to `test_samples`, and the accuracy
/// they give.
fn check_test(r: &VisitReport, visit: &Visit) -> Result<Option<(EvalKind, Confusion)>> {
    let Some(t) = &r.test_evaluation else {
        if visit.evaluates {
            return Err(FieldError::new(
                "test_evaluation",
                "this round measures the test set: the confusion matrix is missing",
            )
            .into());
        }
        if r.test_accuracy.is_some() {
            return Err(FieldError::new("test_accuracy", "must come with test_evaluation").into());
        }
        return Ok(None);
    };
    if !visit.evaluates {
        return Err(FieldError::new(
            "test_evaluation",
            "this round does not measure the test set",
        )
        .into());
    }
    for (i, name) in t.classes.iter().enumerate() {
        text::check(&format!("test_evaluation.classes[{i}]"), name)?;
    }
    let confusion = t
        .confusion()
        .map_err(|e| FieldError::new("test_evaluation", e.to_string()))?;
    if confusion.classes() != visit.classes.as_slice() {
        return Err(FieldError::new(
            "test_evaluation.classes",
            format!(
                "must be the job's label set's classes {}, got {}",
                visit.classes.join(" "),
                confusion.classes().join(" ")
            ),
        )
        .into());
    }
    let total = confusion.total();
    if total == 0 || i64::try_from(total).is_err() {
        return Err(FieldError::new(
            "test_evaluation.confusion",
            format!("must count 1 to {} beats, got {total}", i64::MAX),
        )
        .into());
    }
    if total != r.test_samples {
        return Err(FieldError::new(
            "test_evaluation.confusion",
            format!(
                "counts sum to {total}, but test_samples is {}",
                r.test_samples
            ),
        )
        .into());
    }
    let accuracy = confusion.accuracy();
    if r.test_accuracy.is_none_or(|a| (a - accuracy).abs() > 1e-9) {
        return Err(FieldError::new(
            "test_accuracy",
            format!("must be the confusion matrix's accuracy, {accuracy}"),
        )
        .into());
    }
    Ok(Some((t.kind, confusion)))
}

/// Records the visit; false when this attempt was fenced off meanwhile.
async fn complete(
    s: &AppState,
    visit: &Visit,
    server: &mut ServerSession,
    report: VisitReport,
    c: &Counters,
) -> Result<bool> {
    let agents = db::job_agents(&s.db, visit.job_id).await?;
    let Checked { sealed, test } = check_report(&report, visit, &agents)?;
    let parameters = server
        .model()
        .map_err(|e| Error::Internal(format!("job {}: server layer: {e}", visit.job_id)))?
        .parameters();
    let outcome = db::VisitOutcome {
        train_loss: report.train_loss,
        train_accuracy: report.train_accuracy,
        train_samples: report.train_samples as i64,
        test_accuracy: test.as_ref().map(|(_, c)| c.accuracy()),
        test_samples: test.as_ref().map_or(0, |(_, c)| c.total() as i64),
        test: test.as_ref().map(|(kind, c)| {
            let counts = c.rows().into_iter().flatten().map(|v| v as i64).collect();
            (c.classes().to_vec(), counts, kind.as_str())
        }),
        bytes_up: c.bytes_up,
        bytes_down: c.bytes_down,
        messages: c.messages,
        server_seconds: c.server_time.as_secs_f64(),
        message_kinds: c.message_kinds(),
        dp: report.dp.clone(),
    };
    let mut tx = s.db.begin().await?;
    let Some((job_id, seq)) =
        db::complete_visit(&mut tx, visit.id, visit.attempt, visit.agent_id, &outcome).await?
    else {
        return Ok(false);
    };
    db::store_checkpoint(&mut *tx, job_id, &encode_f32(&parameters)).await?;
    // The copies earlier visits sealed can no longer be read: a job keeps one set, its latest.
    db::delete_stale_sealed(&mut *tx, job_id, seq).await?;
    for (recipient, bytes) in sealed {
        db::store_sealed(&mut *tx, visit.id, recipient, visit.agent_id, &bytes).await?;
    }
    db::job_event(
        &mut *tx,
        job_id,
        "visit.completed",
        json!({
            "visit_id": visit.id, "seq": seq,
            "train_loss": report.train_loss, "train_accuracy": report.train_accuracy,
            "test_accuracy": test.as_ref().map(|(_, c)| c.accuracy()),
            "test_majority_rate": test.as_ref().map(|(_, c)| c.majority_rate()),
            "test_evaluation": test.as_ref().map(|(kind, _)| kind.as_str()),
            "bytes_up": c.bytes_up, "bytes_down": c.bytes_down,
            "epsilon_spent": report.dp.as_ref().map(|d| d.epsilon_spent),
        }),
    )
    .await?;
    if db::advance(&mut tx, job_id).await? {
        db::job_event(&mut *tx, job_id, "job.completed", json!({})).await?;
    }
    tx.commit().await?;
    s.work.notify_waiters();
    Ok(true)
}
