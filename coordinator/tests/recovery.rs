//! Visits whose sessions a killed coordinator hosted are re-queued by its successor, and say so
//! in their job's events.

mod common;

use std::time::{Duration, Instant};

use common::{Platform, eventually, requeued_events, spec};
use sqlx::PgPool as Pool;

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn a_killed_coordinator_s_sessions_are_requeued_with_a_job_event(pool: Pool) {
    let mut p = Platform::new(&pool, 1, &[]).await;
    let a = p.enrol(0).await;
    let job = p.approved_job(spec(&["h0"], 1)).await;
    let c = a.coordinator();
    let visit = c
        .claim(Duration::from_secs(5))
        .await
        .unwrap()
        .expect("a visit");
    let _session = c.session(visit.visit_id, visit.attempt).await.unwrap();
    let replica: i64 = sqlx::query_scalar("select replica_id from visits where id = $1")
        .bind(visit.visit_id)
        .fetch_one(&pool)
        .await
        .unwrap();
    let killed = Instant::now();
    p.server.kill_and_restart().await;
    // The new process does not know at once that the old one is gone: its heartbeat expires
    // within the replica timeout (3 s), and the next sweep (every second) re-queues the visit.
    let events = eventually(
        Duration::from_secs(15),
        "a visit.requeued event",
        || async {
            let events = requeued_events(&pool, job).await;
            (!events.is_empty()).then_some(events)
        },
    )
    .await;
    let after = killed.elapsed();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["visit_id"], visit.visit_id);
    assert_eq!(events[0]["attempt"], visit.attempt);
    assert_eq!(events[0]["replica"], replica);
    assert_eq!(
        events[0]["reason"],
        "coordinator replica stopped responding"
    );
    assert!(
        after < Duration::from_secs(6),
        "re-queued {after:?} after the kill"
    );
    let (status, last_error, failures): (String, Option<String>, i32) =
        sqlx::query_as("select status, last_error, failures from visits where id = $1")
            .bind(visit.visit_id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(status, "queued");
    assert_eq!(
        last_error.as_deref(),
        Some("coordinator replica stopped responding")
    );
    assert_eq!(failures, 0, "a replica's death is not the visit's failure");
}
