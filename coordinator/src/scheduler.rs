//! The schedule's background work. Postgres holds the schedule; this keeps the replica's
//! heartbeat, wakes waiting claims, ends sessions other replicas stopped, and re-queues visits
//! whose lease expired or whose replica is gone.
//!
//! Every replica runs all of it. None of it needs to run once only: each step is idempotent by
//! construction (the sweeps lock the rows they change with `for update skip locked`, so each
//! visit is re-queued by one replica; purges delete what is expired, and a second delete finds
//! nothing).

use std::time::Duration;

use medsplit_engine::api::close;
use serde_json::json;

use crate::control::{self, Stop};
use crate::{AppState, db};

/// Records every `replica_timeout / 3` that this replica is alive.
pub async fn beat_forever(state: AppState) {
    let mut tick = tokio::time::interval(state.settings.replica_timeout / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = db::replica_heartbeat(&state.db, state.replica).await {
            tracing::warn!(error = %e, "replica heartbeat failed");
        }
    }
}

/// Wakes waiting claims whenever a visit is queued anywhere, and ends the sessions that any
/// replica stopped (Postgres NOTIFY). Claims also poll and the sweep checks open sessions, so a
/// lost connection only delays them; after reconnecting, the open sessions are checked at once.
pub async fn listen(state: AppState) {
    loop {
        match sqlx::postgres::PgListener::connect_with(&state.db).await {
            Ok(mut listener) => {
                if let Err(e) = listener
                    .listen_all([db::VISITS_CHANNEL, db::CONTROL_CHANNEL])
                    .await
                {
                    tracing::warn!(error = %e, "LISTEN failed");
                } else {
                    // What was missed while not listening.
                    state.work.notify_waiters();
                    if let Err(e) = control::check_open_sessions(&state).await {
                        tracing::warn!(error = %e, "checking open sessions failed");
                    }
                    loop {
                        match listener.recv().await {
                            Ok(n) if n.channel() == db::CONTROL_CHANNEL => {
                                control::received(&state, n.payload())
                            }
                            Ok(_) => state.work.notify_waiters(),
                            Err(e) => {
                                tracing::warn!(error = %e, "notification stream lost");
                                break;
                            }
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot open a LISTEN connection"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

pub async fn sweep_forever(state: AppState) {
    let mut tick = tokio::time::interval(state.settings.sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut purged_at = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        if let Err(e) = sweep(&state).await {
            tracing::warn!(error = %e, "lease sweep failed");
        }
        if let Err(e) = requeue_orphans(&state).await {
            tracing::warn!(error = %e, "re-queueing the visits of stopped replicas failed");
        }
        if let Err(e) = control::check_open_sessions(&state).await {
            tracing::warn!(error = %e, "checking open sessions failed");
        }
        if purged_at.elapsed() >= Duration::from_secs(60) {
            purged_at = tokio::time::Instant::now();
            state.logins.prune();
            if let Err(e) = db::purge_web_sessions(&state.db).await {
                tracing::warn!(error = %e, "purging expired dashboard sessions failed");
            }
            if let Err(e) = db::prune_replicas(&state.db).await {
                tracing::warn!(error = %e, "pruning old replicas failed");
            }
            if let Some(retention) = state.settings.retention
                && let Err(e) = purge(&state, retention).await
            {
                tracing::warn!(error = %e, "purging finished jobs' events failed");
            }
        }
    }
}

/// Deletes what the retention setting lets go of finished jobs.
pub async fn purge(state: &AppState, retention: Duration) -> Result<(), sqlx::Error> {
    let mut tx = state.db.begin().await?;
    let purged = db::purge_finished_jobs(&mut tx, retention.as_secs_f64()).await?;
    tx.commit().await?;
    if purged.events > 0 || purged.visits > 0 {
        tracing::info!(
            events = purged.events,
            visits = purged.visits,
            "purged finished jobs' events and message counts"
        );
    }
    Ok(())
}

/// Re-queues, without counting a failure, the visits whose sessions were hosted by a replica
/// that shut down or stopped beating for `replica_timeout`, with a `visit.requeued` job event
/// each; ends those sessions should their replica still be running (it stalled).
pub async fn requeue_orphans(state: &AppState) -> Result<(), sqlx::Error> {
    let mut tx = state.db.begin().await?;
    let timeout = state.settings.replica_timeout.as_secs_f64();
    let orphaned = db::requeue_orphans(&mut *tx, timeout).await?;
    if orphaned.is_empty() {
        return Ok(());
    }
    for v in &orphaned {
        let reason = if v.stopped {
            "coordinator replica shut down"
        } else {
            "coordinator replica stopped responding"
        };
        requeued(&mut tx, v.job_id, v.id, v.attempt, reason, v.replica_id).await?;
        control::announce(&mut *tx, Stop::Visit(v.id), close::FENCED).await?;
    }
    tx.commit().await?;
    let visits: Vec<i64> = orphaned.iter().map(|v| v.id).collect();
    tracing::info!(?visits, "re-queued the visits of replicas that are gone");
    state.work.notify_waiters();
    Ok(())
}

/// At the end of a graceful shutdown: re-queues, without counting a failure, the visits whose
/// sessions this replica still hosts, with a `visit.requeued` job event each.
pub async fn hand_back(state: &AppState) -> Result<(), sqlx::Error> {
    const REASON: &str = "coordinator replica shut down";
    let mut tx = state.db.begin().await?;
    let handed = db::requeue_hosted(&mut *tx, state.replica, REASON).await?;
    for v in &handed {
        requeued(&mut tx, v.job_id, v.id, v.attempt, REASON, state.replica).await?;
    }
    tx.commit().await?;
    if !handed.is_empty() {
        let visits: Vec<i64> = handed.iter().map(|v| v.id).collect();
        tracing::info!(?visits, "handed back the visits still open at shutdown");
    }
    Ok(())
}

/// Records that attempt `attempt` of visit `visit` (of `job`) went back to the queue, hosted by
/// `replica`, for `reason` (a `visit.requeued` event), and wakes the claims waiting on the job.
async fn requeued(
    tx: &mut sqlx::PgConnection,
    job: i64,
    visit: i64,
    attempt: i32,
    reason: &str,
    replica: i64,
) -> Result<(), sqlx::Error> {
    let detail =
        json!({ "visit_id": visit, "attempt": attempt, "reason": reason, "replica": replica });
    db::job_event(&mut *tx, job, "visit.requeued", detail).await?;
    db::notify_queued(&mut *tx, job).await
}

/// Re-queues visits whose lease expired; a visit that has failed `max_attempts` times gets the
/// job's policy: skipped (the round goes on without that hospital) or the job fails.
pub async fn sweep(state: &AppState) -> Result<(), sqlx::Error> {
    let mut tx = state.db.begin().await?;
    let expired = db::take_expired(&mut tx).await?;
    if expired.is_empty() {
        return Ok(());
    }
    for v in &expired {
        control::announce(&mut *tx, Stop::Visit(v.id), close::FENCED).await?;
        apply_failure(&mut tx, v, false).await?;
    }
    tx.commit().await?;
    for v in &expired {
        control::apply(&state.sessions, Stop::Visit(v.id), close::FENCED);
    }
    state.work.notify_waiters();
    Ok(())
}

/// What follows a failed attempt of visit `v` (already re-queued, its failure counted): another
/// attempt, or once it has had `max_attempts` (at once when the hospital `refused` it) the job's
/// policy. The events and the job's error carry the attempt's last error.
pub async fn apply_failure(
    tx: &mut sqlx::PgConnection,
    v: &db::Expired,
    refused: bool,
) -> Result<(), sqlx::Error> {
    let exhausted = refused || v.failures >= v.max_attempts;
    db::job_event(
        &mut *tx,
        v.job_id,
        "visit.failed",
        json!({ "visit_id": v.id, "seq": v.seq, "failures": v.failures, "retry": !exhausted,
                "refused": refused, "error": v.last_error }),
    )
    .await?;
    if !exhausted {
        db::notify_queued(&mut *tx, v.job_id).await?;
    } else if v.on_failure == "skip" {
        db::skip_visit(&mut *tx, v.id).await?;
        db::job_event(
            &mut *tx,
            v.job_id,
            "visit.skipped",
            json!({ "visit_id": v.id }),
        )
        .await?;
        if db::advance(&mut *tx, v.job_id).await? {
            db::job_event(&mut *tx, v.job_id, "job.completed", json!({})).await?;
        }
    } else {
        let what = match (refused, v.failures) {
            (true, _) => "was refused".to_owned(),
            (false, 1) => "failed once".to_owned(),
            (false, n) => format!("failed {n} times"),
        };
        let mut reason = format!("visit {} (hospital {}) {what}", v.id, v.hospital_id);
        if let Some(e) = &v.last_error {
            reason.push_str(&format!(": {e}"));
        }
        db::end_job(&mut *tx, v.job_id, "failed", Some(&reason)).await?;
        db::job_event(
            &mut *tx,
            v.job_id,
            "job.failed",
            json!({ "reason": reason }),
        )
        .await?;
        // Delivered to every replica, this one included, when the caller commits.
        control::announce(&mut *tx, Stop::Job(v.job_id), close::FENCED).await?;
    }
    Ok(())
}
