//! The schedule's background work. Postgres holds the schedule; this only wakes waiting claims
//! and applies lease expiry.

use serde_json::json;

use crate::{AppState, db};

/// Wakes waiting claims whenever a visit is queued anywhere (Postgres NOTIFY). Claims also poll,
/// so a lost connection only delays them.
pub async fn listen(state: AppState) {
    loop {
        match sqlx::postgres::PgListener::connect_with(&state.db).await {
            Ok(mut listener) => {
                if let Err(e) = listener.listen(db::VISITS_CHANNEL).await {
                    tracing::warn!(error = %e, "LISTEN failed");
                } else {
                    loop {
                        match listener.recv().await {
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
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
}

pub async fn sweep_forever(state: AppState) {
    let mut tick = tokio::time::interval(state.settings.sweep_interval);
    let mut purged_at = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        if let Err(e) = sweep(&state).await {
            tracing::warn!(error = %e, "lease sweep failed");
        }
        if purged_at.elapsed() >= std::time::Duration::from_secs(60) {
            purged_at = tokio::time::Instant::now();
            state.logins.prune();
            if let Err(e) = crate::db::purge_web_sessions(&state.db).await {
                tracing::warn!(error = %e, "purging expired dashboard sessions failed");
            }
        }
    }
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
        state
            .sessions
            .stop_where(medsplit_engine::api::close::FENCED, |id, _| id == v.id);
        apply_failure(state, &mut tx, v, false).await?;
    }
    tx.commit().await?;
    state.work.notify_waiters();
    Ok(())
}

/// What follows a failed attempt of visit `v` (already re-queued, its failure counted): another
/// attempt, or once it has had `max_attempts` (at once when the hospital `refused` it) the job's
/// policy. The events and the job's error carry the attempt's last error.
pub async fn apply_failure(
    state: &AppState,
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
        state
            .sessions
            .stop_where(medsplit_engine::api::close::FENCED, |_, o| {
                o.job_id == v.job_id
            });
    }
    Ok(())
}
