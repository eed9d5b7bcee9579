//! What the coordinator keeps of finished jobs: the retention purge deletes old jobs' events and
//! per-message-kind counts, and nothing of jobs that finished recently or still run.

use medsplit_coordinator::db;
use serde_json::json;
use sqlx::PgPool as Pool;

async fn job(pool: &Pool, owner: i64, status: &str, finished_days_ago: Option<f64>) -> i64 {
    sqlx::query_scalar(
        "insert into jobs (name, owner_id, spec, status, rounds, max_attempts, on_failure, finished_at)
         values ('j', $1, '{}', $2, 1, 3, 'skip', now() - make_interval(secs => $3 * 86400))
         returning id",
    )
    .bind(owner)
    .bind(status)
    .bind(finished_days_ago)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn the_retention_purge_keeps_recent_and_running_jobs_whole(pool: Pool) {
    let owner = db::create_user(&pool, "r@example.org", "x", "researcher", None)
        .await
        .unwrap()
        .id;
    let hospital = db::create_hospital(&pool, "h").await.unwrap().id;
    let old = job(&pool, owner, "completed", Some(40.0)).await;
    let recent = job(&pool, owner, "completed", Some(2.0)).await;
    let running = job(&pool, owner, "running", None).await;
    for id in [old, recent, running] {
        db::job_event(&pool, id, "visit.completed", json!({}))
            .await
            .unwrap();
        sqlx::query(
            "insert into visits (job_id, seq, round, position, hospital_id, status, train_loss, message_kinds)
             values ($1, 0, 0, 0, $2, 'completed', 0.5, '[]')",
        )
        .bind(id)
        .bind(hospital)
        .execute(&pool)
        .await
        .unwrap();
    }
    let mut tx = pool.begin().await.unwrap();
    let purged = db::purge_finished_jobs(&mut tx, 30.0 * 86_400.0)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!((purged.events, purged.visits), (1, 1));
    for (id, kept) in [(old, false), (recent, true), (running, true)] {
        let (events, kinds, loss): (i64, i64, i64) = sqlx::query_as(
            "select (select count(*) from job_events where job_id = $1),
                    (select count(*) from visits where job_id = $1 and message_kinds is not null),
                    (select count(*) from visits where job_id = $1 and train_loss = 0.5)",
        )
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(
            (events, kinds),
            if kept { (1, 1) } else { (0, 0) },
            "job {id}"
        );
        assert_eq!(loss, 1, "a visit's figures stay");
    }
    // A second purge finds nothing: it is safe on every replica at once.
    let mut tx = pool.begin().await.unwrap();
    let again = db::purge_finished_jobs(&mut tx, 30.0 * 86_400.0)
        .await
        .unwrap();
    assert_eq!((again.events, again.visits), (0, 0));
}
