//! The hospital's policy, enforced by its agent: a job it does not allow is refused with the
//! reason, before any data is read and without a training session.

mod common;

use std::time::Duration;

use common::{Platform, spec};
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
        // Refused before training: no session carried anything.
        let m = p
            .researcher
            .ok("GET", &format!("/v1/jobs/{id}/metrics"), None)
            .await;
        let visit = &m["visits"][0];
        assert!(visit["bytes_up"].is_null(), "{key}: {visit}");
        assert_eq!(
            visit["failures"], 1,
            "{key}: refused once, not retried: {visit}"
        );
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
