//! Visits that a coordinator's restart re-queues say so in their job's events.

mod common;

use std::time::Duration;

use common::{Platform, spec};
use serde_json::Value;
use sqlx::PgPool as Pool;

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn a_restart_requeues_running_visits_with_a_job_event(pool: Pool) {
    let mut p = Platform::new(&pool, 1, &[]).await;
    let a = p.enrol(0).await;
    let job = p.approved_job(spec(&["h0"], 1)).await;
    let visit = a
        .coordinator()
        .claim(Duration::from_secs(5))
        .await
        .unwrap()
        .expect("a visit");
    p.server.kill_and_restart().await;
    let events: Vec<Value> = sqlx::query_scalar(
        "select detail from job_events where job_id = $1 and kind = 'visit.requeued' order by id",
    )
    .bind(job)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["visit_id"], visit.visit_id);
    assert_eq!(events[0]["attempt"], visit.attempt);
    assert_eq!(events[0]["reason"], "coordinator restarted");
    let (status, last_error): (String, Option<String>) =
        sqlx::query_as("select status, last_error from visits where id = $1")
            .bind(visit.visit_id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(status, "queued");
    assert_eq!(last_error.as_deref(), Some("coordinator restarted"));
}
