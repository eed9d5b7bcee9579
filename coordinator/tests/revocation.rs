//! A revoked agent, or one of a disabled hospital, gets no visit and no weights: not from a
//! claim already waiting, not from one racing the revocation, not from a visit in progress.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Platform, spec};
use medsplit_coordinator::db;
use sqlx::PgPool as Pool;

async fn last_seen(pool: &Pool, agent: i64) -> Option<chrono::DateTime<chrono::Utc>> {
    sqlx::query_scalar("select last_seen_at from agents where id = $1")
        .bind(agent)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn revocation_ends_a_waiting_claim_without_a_visit(pool: Pool) {
    let p = Platform::new(&pool, 1, &[]).await;
    let a = p.enrol(0).await;
    let id = a.state.identity.agent_id;
    let c = Arc::new(a.coordinator());
    assert!(c.heartbeat(None).await.unwrap());
    let before = last_seen(&pool, id).await;
    let claim = tokio::spawn({
        let c = c.clone();
        async move { c.claim(Duration::from_secs(45)).await }
    });
    // The claim has been let in (its request marks the agent seen) and is waiting.
    tokio::time::timeout(Duration::from_secs(20), async {
        while last_seen(&pool, id).await == before {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the claim reached the coordinator");
    let (status, v) = p.hospital_admins[0]
        .post(&format!("/v1/agents/{id}/revoke"), serde_json::json!({}))
        .await;
    assert_eq!(status, 204, "{v}");
    let job = p.approved_job(spec(&["h0"], 1)).await;
    let got = tokio::time::timeout(Duration::from_secs(40), claim)
        .await
        .expect("the revocation ended the claim")
        .unwrap();
    assert!(got.is_err(), "a revoked agent was handed {got:?}");
    let (status, attempt): (String, i32) =
        sqlx::query_as("select status, attempt from visits where job_id = $1 and seq = 0")
            .bind(job)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((status.as_str(), attempt), ("queued", 0));
}

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn revoked_agents_and_disabled_hospitals_get_no_visit_and_no_weights(pool: Pool) {
    let p = Platform::new(&pool, 2, &[]).await;
    let (h0, h1) = (p.hospital_ids[0], p.hospital_ids[1]);
    let a = p.enrol(0).await;
    let b = p.enrol(0).await;
    let d = p.enrol(0).await;
    let c = p.enrol(1).await;
    let [a_id, b_id, c_id, d_id] = [&a, &b, &c, &d].map(|x| x.state.identity.agent_id);
    let job = p.approved_job(spec(&["h0", "h1"], 1)).await;
    let revoke = |id: i64| {
        let admin = p.hospital_admins[0].clone();
        async move {
            let (status, v) = admin
                .post(&format!("/v1/agents/{id}/revoke"), serde_json::json!({}))
                .await;
            assert_eq!(status, 204, "{v}");
        }
    };

    // The claiming statement itself refuses a revoked agent, whatever its token said.
    revoke(d_id).await;
    let claimed = db::claim_visit(&pool, d_id, h0, 30.0).await.unwrap();
    assert!(claimed.is_none(), "a revoked agent claimed a visit");

    // Agents revoked, or whose hospital is disabled, while a visit runs get no copy of its
    // weights, and the visit still completes.
    let coordinator = a.coordinator();
    let visit = coordinator
        .claim(Duration::from_secs(5))
        .await
        .unwrap()
        .expect("a visit for h0");
    let mut offered: Vec<i64> = visit.recipients.iter().map(|r| r.agent_id).collect();
    offered.sort();
    assert_eq!(offered, vec![a_id, b_id, c_id], "d is revoked");
    revoke(b_id).await;
    let (status, v) = p
        .admin
        .post(
            &format!("/v1/hospitals/{h1}/disable"),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(status, 204, "{v}");
    let active: Vec<(i64, bool)> = db::job_agents(&pool, job)
        .await
        .unwrap()
        .iter()
        .map(|x| (x.id, x.active))
        .collect();
    assert_eq!(
        active,
        vec![(a_id, true), (b_id, false), (d_id, false), (c_id, false)]
    );
    medsplit_agent::visit::run(
        &coordinator,
        &a.state.secret_key,
        &visit,
        &a.data,
        &mut medsplit_agent::visit::Quiet,
    )
    .await
    .expect("the visit completes");
    let sealed_to: Vec<i64> = sqlx::query_scalar(
        "select recipient_agent_id from sealed_weights where visit_id = $1 order by 1",
    )
    .bind(visit.visit_id)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(sealed_to, vec![a_id]);

    // h1's visit is queued now, but its agent's hospital is disabled.
    let queued: String =
        sqlx::query_scalar("select status from visits where job_id = $1 and seq = 1")
            .bind(job)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(queued, "queued");
    let claimed = db::claim_visit(&pool, c_id, h1, 30.0).await.unwrap();
    assert!(
        claimed.is_none(),
        "an agent of a disabled hospital claimed a visit"
    );
}
