//! The hospital's policy, enforced by its agent: a job it does not allow is refused with the
//! reason, before any data is read and without a training session.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Platform, spec};
use medsplit_agent::daemon::Datasets;
use medsplit_agent::policy::Policy;
use serde_json::json;
use sqlx::PgPool as Pool;

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn the_agent_refuses_what_its_hospitals_policy_does_not_allow(pool: Pool) {
    let p = Platform::new(&pool, 1, &[]).await;
    let agent = p.enrol(0).await;
    let running = agent.spawn();
    let cases = [
        ("insecure_plaintext", json!(true), "turns encryption off"),
        ("batch_size", json!(1), "at least 2"),
        ("rounds", json!(500), "at most 100"),
    ];
    for (key, value, reason) in cases {
        let mut s = spec(&["h0"], 1);
        s[key] = value;
        s["on_failure"] = json!("fail");
        let id = p.approved_job(s).await;
        let job = p.wait_job(id, Duration::from_secs(60)).await;
        assert_eq!(job["status"], "failed", "{key}: {job}");
        let error = job["error"].as_str().unwrap();
        assert!(
            error.contains("refused by the hospital's policy") && error.contains(reason),
            "{key}: {error}"
        );
        // Refused before training: no session carried anything, and not retried.
        assert_no_session(&p, id).await;
    }
    // The usual job trains.
    let id = p.approved_job(spec(&["h0"], 1)).await;
    let job = p.wait_job(id, Duration::from_secs(120)).await;
    assert_eq!(job["status"], "completed", "{job}");
    running.task.abort();
}

/// A coordinator (here: its database, edited) that gives a peer agent another public key, to open
/// the weights sealed to it: the agent that pinned the peer's key refuses the visit, sealing
/// nothing to the substituted key.
#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn a_substituted_peer_key_is_refused(pool: Pool) {
    let p = Platform::new(&pool, 2, &[]).await;
    let (a0, a1) = (p.enrol(0).await, p.enrol(1).await);
    let running = [a0.spawn(), a1.spawn()];
    // A first job: each agent pins the other's key.
    let id = p.approved_job(spec(&["h0", "h1"], 1)).await;
    let job = p.wait_job(id, Duration::from_secs(120)).await;
    assert_eq!(job["status"], "completed", "{job}");
    let stranger = medsplit_agent::state::new_key();
    sqlx::query("update agents set public_key = $1 where id = $2")
        .bind(stranger.public_key().as_bytes().to_vec())
        .bind(a1.state.identity.agent_id)
        .execute(&pool)
        .await
        .unwrap();
    let mut s = spec(&["h0", "h1"], 1);
    s["on_failure"] = json!("fail");
    let id = p.approved_job(s).await;
    let job = p.wait_job(id, Duration::from_secs(60)).await;
    assert_eq!(job["status"], "failed", "{job}");
    let error = job["error"].as_str().unwrap();
    assert!(
        error.contains("a public key changed")
            && error.contains(&format!("agent {}", a1.state.identity.agent_id)),
        "{error}"
    );
    let sealed: i64 = sqlx::query_scalar(
        "select count(*) from sealed_weights s join visits v on v.id = s.visit_id where v.job_id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(sealed, 0);
    for r in running {
        r.task.abort();
    }
}

/// The hospital approves each job at its agent as well as on the dashboard: a job consented to on
/// the dashboard only (a coordinator that forges consent could record that) is refused; a job
/// approved at the agent trains; one whose specification the coordinator changed after the
/// approval is refused. Nothing but the refusal leaves the agent.
#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn the_agent_trains_only_jobs_approved_at_it(pool: Pool) {
    let p = Platform::new(&pool, 1, &[]).await;
    let agent = p.enrol(0).await;
    let data = agent.data.clone();
    let datasets = Arc::new(
        Datasets::with_loader(move |_, _| Ok(data.clone())).with_policy(Policy::default()),
    );
    let running = agent.spawn_with(datasets.clone());
    let refused = |job: &serde_json::Value, reason: &str| {
        assert_eq!(job["status"], "failed", "{job}");
        let error = job["error"].as_str().unwrap();
        assert!(
            error.contains("refused by the hospital's policy") && error.contains(reason),
            "{error}"
        );
    };
    let mut s = spec(&["h0"], 1);
    s["on_failure"] = json!("fail");

    // Consent on the dashboard only.
    let id = p.approved_job(s.clone()).await;
    let job = p.wait_job(id, Duration::from_secs(60)).await;
    refused(&job, &format!("medsplit-agent approve {id}"));
    assert_no_session(&p, id).await;

    // Approved at the agent first, as `medsplit-agent approve` does: the job as the coordinator
    // describes it to the agent, with the digest the dashboard shows.
    let (id, shown) = pending_job(&p, &s).await;
    let described = agent.coordinator().job(id).await.unwrap();
    assert_eq!(described.digest(), shown["digest"].as_str().unwrap());
    assert!(described.describe().contains(&described.digest()));
    datasets.approvals.approve(&described).unwrap();
    consent(&p, id).await;
    let job = p.wait_job(id, Duration::from_secs(120)).await;
    assert_eq!(job["status"], "completed", "{job}");

    // Approved, then the coordinator changes the batch size in its database.
    let (id, _) = pending_job(&p, &s).await;
    let described = agent.coordinator().job(id).await.unwrap();
    datasets.approvals.approve(&described).unwrap();
    sqlx::query("update jobs set spec = jsonb_set(spec, '{batch_size}', '2') where id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    consent(&p, id).await;
    let job = p.wait_job(id, Duration::from_secs(60)).await;
    refused(&job, "changed since");
    assert_no_session(&p, id).await;
    running.task.abort();
}

/// A coordinator that hands an agent older client weights than it has already had of the job
/// (here: a finished job's last visit queued again, its predecessor marked skipped, so that the
/// first visit's weights are handed over; the coordinator deleted those copies when the second
/// visit completed, so the last visit's copies are relabelled as the first's): the agent refuses
/// it before opening them.
#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn older_weights_than_the_agent_has_had_are_refused(pool: Pool) {
    let p = Platform::new(&pool, 1, &[]).await;
    let agent = p.enrol(0).await;
    let running = agent.spawn();
    let mut s = spec(&["h0"], 3);
    s["on_failure"] = json!("fail");
    let id = p.approved_job(s).await;
    let job = p.wait_job(id, Duration::from_secs(180)).await;
    assert_eq!(job["status"], "completed", "{job}");
    let mut tx = pool.begin().await.unwrap();
    for sql in [
        "update jobs set status = 'running', finished_at = null where id = $1",
        "update visits set status = 'skipped' where job_id = $1 and seq = 1",
        "update visits set status = 'queued', agent_id = null where job_id = $1 and seq = 2",
        "update sealed_weights set visit_id = (select id from visits where job_id = $1 and seq = 0)
         where visit_id = (select id from visits where job_id = $1 and seq = 2)",
        "select pg_notify('medsplit_visits', $1::text)",
    ] {
        sqlx::query(sql).bind(id).execute(&mut *tx).await.unwrap();
    }
    tx.commit().await.unwrap();
    let job = p.wait_job(id, Duration::from_secs(60)).await;
    assert_eq!(job["status"], "failed", "{job}");
    let error = job["error"].as_str().unwrap();
    assert!(error.contains("rolls the job back"), "{error}");
    let visits: Vec<(i64, String)> =
        sqlx::query_as("select id, status from visits where job_id = $1 order by seq")
            .bind(id)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(
        error.contains(&format!("weights of visit {}", visits[0].0))
            && error.contains(&format!("those of visit {}", visits[2].0)),
        "{error} {visits:?}"
    );
    running.task.abort();
}

/// A job submitted and not yet consented to, with its view.
async fn pending_job(p: &Platform, s: &serde_json::Value) -> (i64, serde_json::Value) {
    let job = p.researcher.ok("POST", "/v1/jobs", Some(s.clone())).await;
    (job["id"].as_i64().unwrap(), job)
}

async fn consent(p: &Platform, id: i64) {
    p.hospital_admins[0]
        .ok(
            "POST",
            &format!("/v1/jobs/{id}/consent"),
            Some(json!({ "decision": "approve" })),
        )
        .await;
}

/// The job's only visit was refused once and carried nothing.
async fn assert_no_session(p: &Platform, id: i64) {
    let m = p
        .researcher
        .ok("GET", &format!("/v1/jobs/{id}/metrics"), None)
        .await;
    let visit = &m["visits"][0];
    assert!(visit["bytes_up"].is_null(), "{visit}");
    assert_eq!(visit["failures"], 1, "{visit}");
}
