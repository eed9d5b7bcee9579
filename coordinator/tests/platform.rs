//! The platform end to end on real Postgres (a fresh database per test) with a real coordinator
//! process: enrolment, roles, job lifecycle, leases, crashes, bad input, cyclic training.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use medsplit_agent::daemon::Datasets;
use serde_json::json;
use sqlx::PgPool;
use tokio_tungstenite::tungstenite::Message;

type Pool = PgPool;

/// Waits until the job's running visit has reported progress.
async fn wait_until_training(pool: &Pool, job: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let p: Option<f64> = sqlx::query_scalar(
            "select progress from visits where job_id = $1 and status = 'running'",
        )
        .bind(job)
        .fetch_optional(pool)
        .await
        .unwrap()
        .flatten();
        if p.is_some_and(|p| p > 0.0) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "training did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn count(pool: &Pool, sql: &str, id: i64) -> i64 {
    sqlx::query_scalar(sql)
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn three_agents_train_a_cyclic_encrypted_job(pool: Pool) {
    let p = Platform::new(&pool, 3, &[]).await;
    let agents: Vec<_> = futures_util::future::join_all((0..3).map(|i| p.enrol(i))).await;
    let running: Vec<_> = agents.iter().map(|a| a.spawn()).collect();
    let id = p.approved_job(spec(&["h0", "h1", "h2"], 2)).await;
    let job = p.wait_job(id, Duration::from_secs(240)).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["visits_done"], 6);

    let m = p
        .researcher
        .ok("GET", &format!("/v1/jobs/{id}/metrics"), None)
        .await;
    let rounds = m["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2);
    for r in rounds {
        let hs = r["hospitals"].as_array().unwrap();
        let names: Vec<_> = hs.iter().map(|h| h["hospital"].as_str().unwrap()).collect();
        assert_eq!(names, ["h0", "h1", "h2"], "cyclic order");
        for h in hs {
            let acc = h["test_accuracy"]
                .as_f64()
                .expect("every hospital measured test accuracy");
            assert!((0.0..=1.0).contains(&acc));
        }
    }
    // Each hospital tests on a patient it never trained on, which two short rounds need not
    // get right; but the model learns: the training loss falls from round 1 to round 2.
    let mean_loss = |round: &serde_json::Value| {
        let hospitals = round["hospitals"].as_array().unwrap();
        let sum: f64 = hospitals
            .iter()
            .map(|h| h["train_loss"].as_f64().unwrap())
            .sum();
        sum / hospitals.len() as f64
    };
    let (first, second) = (mean_loss(&rounds[0]), mean_loss(&rounds[1]));
    assert!(second < first, "training loss {first} then {second}");
    for v in m["visits"].as_array().unwrap() {
        assert_eq!(v["status"], "completed");
        assert_eq!(v["attempt"], 1, "no visit retried in a clean run");
        assert!(
            v["bytes_up"].as_i64().unwrap() > 10_000,
            "encrypted traffic was counted"
        );
    }
    check_test_metrics(&pool, id, &m).await;
    // Each visit's weights were sealed to every agent, and each completed visit deleted the
    // copies before it: the final visit's three are left. The server layer was checkpointed.
    let sealed: Vec<(i32, i64)> = sqlx::query_as(
        "select v.seq, count(*) from sealed_weights s join visits v on v.id = s.visit_id
         where v.job_id = $1 group by v.seq",
    )
    .bind(id)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(sealed, vec![(5, 3)]);
    assert_eq!(
        count(
            &pool,
            "select count(*) from jobs where id = $1 and server_checkpoint is not null",
            id
        )
        .await,
        1
    );
    // The sealed bytes never contain the agent's identity key.
    let blobs: Vec<Vec<u8>> = sqlx::query_scalar("select sealed from sealed_weights")
        .fetch_all(&pool)
        .await
        .unwrap();
    for a in &agents {
        assert!(
            !blobs
                .iter()
                .any(|b| medsplit_agent::state::contains_key(b, &a.state.secret_key))
        );
    }
    // The audit trail has who did what.
    let audit = p.admin.ok("GET", "/v1/audit", None).await;
    let actions: Vec<_> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_string())
        .collect();
    for a in [
        "hospital.create",
        "user.create",
        "enrolment_token.create",
        "agent.enrol",
        "job.create",
        "job.approved",
    ] {
        assert!(
            actions.iter().any(|x| x == a),
            "audit lacks {a}: {actions:?}"
        );
    }
    for r in running {
        r.stop.send_replace(true);
        r.task.await.unwrap().unwrap();
    }
}

/// A job that configures its model and its local work: the M1-with-tail preset, balanced class
/// weights, its own client learning rate, and a fixed number of batches per visit. Every visit
/// trains exactly `local_steps` batches (not passes over the hospital's data), and the job reads
/// back as it was asked for, under its preset's name.
#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn a_configured_job_trains_its_local_steps_per_visit(pool: Pool) {
    let p = Platform::new(&pool, 2, &[]).await;
    let agents: Vec<_> = futures_util::future::join_all((0..2).map(|i| p.enrol(i))).await;
    let running: Vec<_> = agents.iter().map(|a| a.spawn()).collect();
    let mut body = spec(&["h0", "h1"], 2);
    body["model"] = json!("m1_tail");
    body["class_weights"] = json!("balanced");
    body["client_lr"] = json!(0.002);
    body["local_steps"] = json!(3);
    let id = p.approved_job(body).await;
    let job = p.wait_job(id, Duration::from_secs(240)).await;
    assert_eq!(job["status"], "completed", "{job}");
    let s = &job["spec"];
    assert_eq!(s["model"]["preset"], "m1_tail", "{s}");
    assert_eq!(s["model"]["tail"], 16);
    assert_eq!(
        (&s["class_weights"], &s["client_lr"], &s["local_steps"]),
        (&json!("balanced"), &json!(0.002), &json!(3))
    );
    let m = p
        .researcher
        .ok("GET", &format!("/v1/jobs/{id}/metrics"), None)
        .await;
    let visits = m["visits"].as_array().unwrap();
    assert_eq!(visits.len(), 4);
    for v in visits {
        // 3 steps of 8 beats; a pass over a hospital's 150-odd training beats would be more.
        assert_eq!(v["train_samples"], 3 * 8, "{v}");
        assert!(
            v["test_accuracy"]
                .as_f64()
                .is_some_and(|a| (0.0..=1.0).contains(&a))
        );
    }
    for r in running {
        r.stop.send_replace(true);
        r.task.await.unwrap().unwrap();
    }
}

/// Each visit's stored confusion matrix counts its test set, and REST derives the clinical
/// figures from it: per visit, and pooled over each round's hospitals.
async fn check_test_metrics(pool: &Pool, job: i64, m: &serde_json::Value) {
    let stored: Vec<(i64, i64, i64, i32, String)> = sqlx::query_as(
        "select id, test_samples, (select sum(c)::bigint from unnest(test_confusion) c),
                cardinality(test_classes), test_evaluation
         from visits where job_id = $1 order by seq",
    )
    .bind(job)
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(stored.len(), m["visits"].as_array().unwrap().len());
    for (id, samples, sum, classes, kind) in &stored {
        assert!(*samples > 0, "visit {id} measured its test set");
        assert_eq!(
            sum, samples,
            "visit {id}: the confusion counts the test set"
        );
        assert_eq!(*classes, 5);
        assert_eq!(kind, "patient", "the agents' split is by patient");
    }
    let unit = |v: &serde_json::Value| {
        let x = v.as_f64().unwrap_or(-1.0);
        assert!((0.0..=1.0).contains(&x), "{v}");
        x
    };
    for v in m["visits"].as_array().unwrap() {
        let e = &v["test_evaluation"];
        assert_eq!(e["kind"], "patient");
        let classes: Vec<&str> = e["classes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert_eq!(classes, ["N", "L", "R", "A", "V"]);
        let rows: Vec<Vec<u64>> = serde_json::from_value(e["confusion"].clone()).unwrap();
        let total: u64 = rows.iter().flatten().sum();
        let diagonal: u64 = (0..5).map(|i| rows[i][i]).sum();
        assert_eq!(Some(total), v["test_samples"].as_u64());
        let accuracy = diagonal as f64 / total as f64;
        assert!((unit(&e["accuracy"]) - accuracy).abs() < 1e-12, "{e}");
        assert!((unit(&v["test_accuracy"]) - accuracy).abs() < 1e-12);
        let support: Vec<u64> = rows.iter().map(|r| r.iter().sum()).collect();
        let majority = *support.iter().max().unwrap() as f64 / total as f64;
        assert!((unit(&e["majority_rate"]) - majority).abs() < 1e-12, "{e}");
        let mut se_sum = 0.0;
        for (c, name) in classes.iter().enumerate() {
            let k = &e["per_class"][name];
            assert_eq!(k["support"].as_u64(), Some(support[c]), "{e}");
            let se = diagonal_share(rows[c][c], support[c]);
            let predicted: u64 = rows.iter().map(|r| r[c]).sum();
            assert!((unit(&k["se"]) - se).abs() < 1e-12, "{name}: {k}");
            assert!((unit(&k["ppv"]) - diagonal_share(rows[c][c], predicted)).abs() < 1e-12);
            unit(&k["f1"]);
            se_sum += se;
        }
        let present = support.iter().filter(|&&n| n > 0).count() as f64;
        assert!((unit(&e["balanced_accuracy"]) - se_sum / present).abs() < 1e-12);
        unit(&e["macro_f1"]);
    }
    for r in m["rounds"].as_array().unwrap() {
        let round = r["round"].as_i64().unwrap();
        let of_round: Vec<&serde_json::Value> = m["visits"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["round"].as_i64() == Some(round))
            .collect();
        let mut pooled = vec![vec![0u64; 5]; 5];
        for v in &of_round {
            let rows: Vec<Vec<u64>> =
                serde_json::from_value(v["test_evaluation"]["confusion"].clone()).unwrap();
            for (p, r) in pooled.iter_mut().flatten().zip(rows.iter().flatten()) {
                *p += r;
            }
        }
        let got = &r["pooled_test_evaluation"];
        assert_eq!(got["confusion"], json!(pooled), "round {round}");
        assert_eq!(got["kind"], "patient");
        for (h, v) in r["hospitals"].as_array().unwrap().iter().zip(&of_round) {
            assert_eq!(
                h["test_majority_rate"],
                v["test_evaluation"]["majority_rate"]
            );
        }
    }
}

fn diagonal_share(hits: u64, of: u64) -> f64 {
    if of == 0 {
        0.0
    } else {
        hits as f64 / of as f64
    }
}

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn enrolment_tokens_are_one_time_and_expire(pool: Pool) {
    let p = Platform::new(&pool, 1, &[]).await;
    let anon = p.server.api();
    let key = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let t = p.hospital_admins[0]
        .ok("POST", "/v1/enrolment-tokens", Some(json!({})))
        .await;
    let token = t["token"].as_str().unwrap();
    assert!(t["command"].as_str().unwrap().contains(&format!(
        "medsplit-agent enrol --coordinator {} --token {token}",
        p.server.url
    )));
    let enrol = json!({ "token": token, "name": "a1", "public_key": key, "version": "t" });
    let (s, v) = anon.post("/v1/agents/enrol", enrol.clone()).await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = anon.post("/v1/agents/enrol", enrol).await;
    assert_eq!(
        (s, v["error"].as_str().unwrap()),
        (410, "enrolment token already used")
    );

    let t = p.hospital_admins[0]
        .ok(
            "POST",
            "/v1/enrolment-tokens",
            Some(json!({ "ttl_seconds": 60 })),
        )
        .await;
    sqlx::query("update enrolment_tokens set expires_at = now() - interval '1 second' where used_at is null")
        .execute(&pool).await.unwrap();
    let (s, v) = anon
        .post(
            "/v1/agents/enrol",
            json!({ "token": t["token"], "name": "a2", "public_key": key, "version": "t" }),
        )
        .await;
    assert_eq!(
        (s, v["error"].as_str().unwrap()),
        (410, "enrolment token expired")
    );
    let (s, _) = anon
        .post(
            "/v1/agents/enrol",
            json!({ "token": "nope", "name": "a3", "public_key": key, "version": "t" }),
        )
        .await;
    assert_eq!(s, 401);
    // Tokens are stored hashed.
    let stored: Vec<Vec<u8>> = sqlx::query_scalar("select token_hash from enrolment_tokens")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert!(
        stored
            .iter()
            .all(|h| h.len() == 32 && !String::from_utf8_lossy(h).contains(token))
    );
    // Agent state written by the real binary path is private.
    let dir = std::env::temp_dir().join(format!("medsplit-state-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let sk = medsplit_agent::state::new_key();
    medsplit_agent::state::save(
        &dir,
        &medsplit_agent::state::Identity {
            coordinator: "x".into(),
            agent_id: 1,
            hospital_id: 1,
            credential: "c".into(),
        },
        &sk,
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    for f in ["identity.json", "identity.key"] {
        assert_eq!(
            std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    std::fs::set_permissions(
        dir.join("identity.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let err = medsplit_agent::state::load(&dir)
        .err()
        .expect("readable key refused")
        .to_string();
    assert!(err.contains("can be read by other users"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn roles_are_enforced(pool: Pool) {
    let p = Platform::new(&pool, 2, &[]).await;
    let (a0, a1) = (p.enrol(0).await, p.enrol(1).await);
    // A researcher cannot enrol agents, create hospitals or users, or approve jobs.
    assert_eq!(
        p.researcher.post("/v1/enrolment-tokens", json!({})).await.0,
        403
    );
    assert_eq!(
        p.researcher
            .post("/v1/hospitals", json!({ "name": "x" }))
            .await
            .0,
        403
    );
    assert_eq!(p.researcher.get("/v1/audit").await.0, 403);
    // A hospital admin cannot create jobs or hospitals.
    assert_eq!(
        p.hospital_admins[0]
            .post("/v1/jobs", spec(&["h0"], 1))
            .await
            .0,
        403
    );
    assert_eq!(
        p.hospital_admins[0]
            .post("/v1/hospitals", json!({ "name": "y" }))
            .await
            .0,
        403
    );
    // No token, a garbage token, an expired token: 401.
    assert_eq!(p.server.api().get("/v1/jobs").await.0, 401);
    let mut forged = p.server.api();
    forged.token = Some("eyJhbGciOiJIUzI1NiJ9.e30.x".into());
    assert_eq!(forged.get("/v1/jobs").await.0, 401);
    let expired = medsplit_coordinator::auth::Keys::from_secret(
        b"test-signing-key-0123456789abcdef0123456789",
    )
    .issue(
        1,
        medsplit_coordinator::auth::Role::PlatformAdmin,
        None,
        -10,
    );
    let mut old = p.server.api();
    old.token = Some(expired);
    assert_eq!(old.get("/v1/hospitals").await.0, 401);

    // A job only at h1: h0's agent cannot claim it nor join its session.
    let job = p.approved_job(spec(&["h1"], 1)).await;
    let c0 = a0.coordinator();
    assert!(c0.claim(Duration::from_secs(1)).await.unwrap().is_none());
    let c1 = a1.coordinator();
    let visit = c1
        .claim(Duration::from_secs(5))
        .await
        .unwrap()
        .expect("h1's agent claims");
    assert_eq!(visit.job_id, job);
    match c0.session(visit.visit_id, visit.attempt).await {
        Err(medsplit_agent::AgentError::Status { status, .. }) => assert_eq!(status, 403),
        other => panic!("h0's agent joined h1's session: {:?}", other.err()),
    }
    // h0's admin cannot approve or see a job that does not name h0; it cannot revoke h1's agent.
    assert_eq!(
        p.hospital_admins[0]
            .post(
                &format!("/v1/jobs/{job}/consent"),
                json!({ "decision": "approve" })
            )
            .await
            .0,
        404
    );
    assert_eq!(
        p.hospital_admins[0]
            .post(
                &format!("/v1/agents/{}/revoke", a1.state.identity.agent_id),
                json!({})
            )
            .await
            .0,
        404
    );
    // Agents cannot use user endpoints.
    let agent_token = p.server.api();
    let (s, _) = agent_token.get("/v1/jobs").await;
    assert_eq!(s, 401);

    // Revocation takes effect at once, including the open session.
    let mut session = c1.session(visit.visit_id, visit.attempt).await.unwrap();
    p.hospital_admins[1]
        .ok(
            "POST",
            &format!("/v1/agents/{}/revoke", a1.state.identity.agent_id),
            Some(json!({})),
        )
        .await;
    let closed = tokio::time::timeout(Duration::from_secs(10), session.next())
        .await
        .unwrap();
    match closed {
        Some(Ok(Message::Close(Some(f)))) => assert_eq!(u16::from(f.code), 4403),
        other => panic!("session not closed on revocation: {other:?}"),
    }
    assert!(matches!(
        c1.heartbeat(None).await,
        Err(medsplit_agent::AgentError::Revoked)
    ));
    let agents = p.hospital_admins[1].ok("GET", "/v1/agents", None).await;
    assert!(agents[0]["revoked_at"].is_string());
}

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn job_lifecycle_and_consent(pool: Pool) {
    let p = Platform::new(&pool, 2, &[]).await;
    let job = p
        .researcher
        .ok("POST", "/v1/jobs", Some(spec(&["h0", "h1"], 1)))
        .await;
    let id = job["id"].as_i64().unwrap();
    assert_eq!(job["status"], "pending");
    assert_eq!(
        job["spec"]["insecure_plaintext"], false,
        "HE is on by default"
    );
    // One approval is not enough.
    let v = p.hospital_admins[0]
        .ok(
            "POST",
            &format!("/v1/jobs/{id}/consent"),
            Some(json!({ "decision": "approve" })),
        )
        .await;
    assert_eq!(v["status"], "pending");
    assert_eq!(
        count(&pool, "select count(*) from visits where job_id = $1", id).await,
        0
    );
    let v = p.hospital_admins[1]
        .ok(
            "POST",
            &format!("/v1/jobs/{id}/consent"),
            Some(json!({ "decision": "approve" })),
        )
        .await;
    assert_eq!(v["status"], "running");
    assert_eq!(v["visits_total"], 2);
    // Deciding twice is refused.
    assert_eq!(
        p.hospital_admins[1]
            .post(
                &format!("/v1/jobs/{id}/consent"),
                json!({ "decision": "decline" })
            )
            .await
            .0,
        409
    );
    // Cancel.
    let v = p
        .researcher
        .ok("POST", &format!("/v1/jobs/{id}/cancel"), Some(json!({})))
        .await;
    assert_eq!(v["status"], "cancelled");
    assert_eq!(
        p.researcher
            .post(&format!("/v1/jobs/{id}/cancel"), json!({}))
            .await
            .0,
        409
    );
    assert_eq!(
        count(
            &pool,
            "select count(*) from visits where job_id = $1 and status <> 'cancelled'",
            id
        )
        .await,
        0
    );

    // A declined job never runs.
    let a0 = p.enrol(0).await;
    let job = p
        .researcher
        .ok("POST", "/v1/jobs", Some(spec(&["h0", "h1"], 1)))
        .await;
    let id = job["id"].as_i64().unwrap();
    p.hospital_admins[1]
        .ok(
            "POST",
            &format!("/v1/jobs/{id}/consent"),
            Some(json!({ "decision": "decline" })),
        )
        .await;
    assert_eq!(
        p.hospital_admins[0]
            .post(
                &format!("/v1/jobs/{id}/consent"),
                json!({ "decision": "approve" })
            )
            .await
            .0,
        409
    );
    let v = p
        .researcher
        .ok("GET", &format!("/v1/jobs/{id}"), None)
        .await;
    assert_eq!(v["status"], "declined");
    assert!(
        a0.coordinator()
            .claim(Duration::from_secs(1))
            .await
            .unwrap()
            .is_none()
    );
    let events = p
        .researcher
        .ok("GET", &format!("/v1/jobs/{id}/events"), None)
        .await;
    let kinds: Vec<_> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["job.created", "consent.declined", "job.declined"]);
    // Another researcher does not see the job.
    p.admin
        .ok(
            "POST",
            "/v1/users",
            Some(json!({ "email": "r2@example.org", "password": PASSWORD, "role": "researcher" })),
        )
        .await;
    let r2 = p.server.api().login("r2@example.org").await;
    assert_eq!(r2.get(&format!("/v1/jobs/{id}")).await.0, 404);
}

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn malformed_job_specs_name_the_field(pool: Pool) {
    let p = Platform::new(&pool, 1, &[]).await;
    let cases = [
        (json!({ "hospitals": ["h0"] }), "name"),
        (
            json!({ "name": "j", "hospitals": ["h0"], "rounds": "three" }),
            "rounds",
        ),
        (
            json!({ "name": "j", "hospitals": ["h0"], "rounds": 0 }),
            "rounds",
        ),
        (
            json!({ "name": "j", "hospitals": ["h0"], "batch_size": 100000 }),
            "batch_size",
        ),
        (
            json!({ "name": "j", "hospitals": ["h0"], "colour": "red" }),
            "colour",
        ),
        (
            json!({ "name": "j", "hospitals": ["h0", "nowhere"] }),
            "hospitals[1]",
        ),
        (
            json!({ "name": "j", "hospitals": ["h0", "h0"] }),
            "hospitals[1]",
        ),
        (json!({ "name": "j", "hospitals": [] }), "hospitals"),
        (
            json!({ "name": "j", "hospitals": ["h0"], "model": "m9" }),
            "model",
        ),
        (
            json!({ "name": "j", "hospitals": ["h0"], "server_optimizer": { "kind": "adam", "lr": -1.0 } }),
            "server_optimizer.lr",
        ),
        (
            json!({ "name": "j", "hospitals": ["h0"], "model": { "blocks": [{ "channels": 8, "kernel": 4, "pool": 2 }] } }),
            "model.blocks[0].kernel",
        ),
        (
            json!({ "name": "j", "hospitals": ["h0"], "model": { "preset": "m1", "tail": 500 } }),
            "model.tail",
        ),
        (
            json!({ "name": "j", "hospitals": ["h0"], "local_steps": 0 }),
            "local_steps",
        ),
        (
            json!({ "name": "j", "hospitals": ["h0"], "client_lr": 2.0 }),
            "client_lr",
        ),
        (
            json!({ "name": "j", "hospitals": ["h0"], "class_weights": { "fixed": [1.0, 2.0] } }),
            "class_weights",
        ),
        (
            json!({ "name": "j", "hospitals": ["h0"], "class_weights": "inverse" }),
            "class_weights",
        ),
        (
            json!({ "name": "j", "hospitals": ["h0"], "labels": "mitbih" }),
            "labels",
        ),
        (
            json!({ "name": "j", "hospitals": ["h0"], "preprocessing": "raw" }),
            "preprocessing",
        ),
        (
            json!({ "name": "j", "hospitals": ["h0"], "preprocessing": { "beat_len": 0 } }),
            "preprocessing.beat_len",
        ),
        (
            json!({ "name": "j", "hospitals": ["h0"], "preprocessing": { "preset": "inter_patient", "before_s": 20 } }),
            "preprocessing.before_s",
        ),
        (
            json!({ "name": "j", "hospitals": ["h0"], "preprocessing": { "rr": { "local_beats": 0 } } }),
            "preprocessing.rr.local_beats",
        ),
        // Within the preprocessing's limits, but a cut wider than the HE packing holds.
        (
            json!({ "name": "j", "hospitals": ["h0"], "preprocessing": { "beat_len": 4096 } }),
            "model",
        ),
    ];
    for (body, field) in cases {
        let (status, v) = p.researcher.post("/v1/jobs", body.clone()).await;
        assert_eq!(status, 422, "{body} → {v}");
        let got = v["field"].as_str().unwrap_or_default();
        assert!(
            got == field || (field == "name" && got == "."),
            "{body}: field {got:?}, expected {field:?} ({v})"
        );
    }
    let (status, v) = p.researcher.post("/v1/jobs", json!("not an object")).await;
    assert!(status == 422 || status == 400, "{v}");
    let resp = p
        .researcher
        .http
        .post(format!("{}/v1/jobs", p.server.url))
        .bearer_auth(p.researcher.token.as_ref().unwrap())
        .header("content-type", "application/json")
        .body("{ not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    assert_eq!(
        count(&pool, "select count(*) from jobs where $1 = $1", 0).await,
        0,
        "nothing stored"
    );
}

/// A job names its label set and preprocessing; the API returns both as stored (the
/// preprocessing in full) and the inputs and shapes they give the network.
#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn labels_and_preprocessing_round_trip_through_the_api(pool: Pool) {
    let p = Platform::new(&pool, 1, &[]).await;
    let body = json!({
        "name": "inter-patient", "hospitals": ["h0"], "model": "m1",
        "labels": "papers",
        "preprocessing": { "preset": "inter_patient", "beat_len": 256, "normalisation": "beat" },
    });
    let (status, created) = p.researcher.post("/v1/jobs", body).await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_i64().unwrap();
    let job = p
        .researcher
        .ok("GET", &format!("/v1/jobs/{id}"), None)
        .await;
    let spec = &job["spec"];
    assert_eq!(spec["labels"], "papers");
    let pre = &spec["preprocessing"];
    assert_eq!(
        (
            &pre["lead"],
            &pre["beat_len"],
            &pre["normalisation"],
            &pre["rr"]
        ),
        (
            &json!("MLII"),
            &json!(256),
            &json!("beat"),
            &json!({ "local_beats": 10, "rhythm": false })
        ),
        "{pre}"
    );
    assert_eq!(
        pre["baseline"],
        json!({ "median": { "first_s": 0.2, "second_s": 0.6 } })
    );
    let net = &job["network"];
    assert_eq!(
        net["preprocessing"],
        "custom (256 samples from 0.25 s before to 0.45 s after the peak, typical beat subtracted, RR features)"
    );
    assert_eq!(pre["template"], "subtract", "{pre}");
    assert_eq!(
        (&net["beat_len"], &net["features"]),
        (&json!(256), &json!(4))
    );
    // M1 keeps 8 channels of 256 / 4 samples; the 4 RR features join them at the cut.
    assert_eq!(net["cut_width"], 8 * 64 + 4);
    assert_eq!(net["class_names"], json!(["N", "L", "R", "A", "V"]));
    // What the API returned is a spec it accepts again, meaning the same job.
    let mut again = spec.clone();
    again["name"] = json!("again");
    let (status, copy) = p.researcher.post("/v1/jobs", again).await;
    assert_eq!(status, 201, "{copy}");
    assert_eq!(copy["spec"]["preprocessing"], *pre);
    assert_eq!(copy["network"], *net);

    // Left out: AAMI labels and the papers' preprocessing, by name.
    let (status, plain) = p
        .researcher
        .post("/v1/jobs", json!({ "name": "plain", "hospitals": ["h0"] }))
        .await;
    assert_eq!(status, 201, "{plain}");
    assert_eq!(plain["spec"]["labels"], "aami");
    assert_eq!(plain["spec"]["preprocessing"]["denoise"], true);
    assert_eq!(plain["network"]["preprocessing"], "papers");
    assert_eq!(
        plain["network"]["class_names"],
        json!(["N", "S", "V", "F", "Q"])
    );
    assert_eq!(
        (
            &plain["network"]["features"],
            &plain["network"]["cut_width"]
        ),
        (&json!(0), &json!(256))
    );
    let (status, named) = p
        .researcher
        .post(
            "/v1/jobs",
            json!({ "name": "named", "hospitals": ["h0"], "preprocessing": "inter_patient" }),
        )
        .await;
    assert_eq!(status, 201, "{named}");
    assert_eq!(named["network"]["preprocessing"], "inter_patient");
}

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn expired_leases_are_retried_and_fenced(pool: Pool) {
    let p = Platform::new(&pool, 1, &[]).await;
    let a = p.enrol(0).await;
    let c = a.coordinator();
    let mut s = spec(&["h0"], 1);
    s["max_attempts"] = json!(2);
    s["on_failure"] = json!("fail");
    let id = p.approved_job(s).await;
    let first = c.claim(Duration::from_secs(5)).await.unwrap().unwrap();
    assert_eq!(first.attempt, 1);
    assert!(
        c.heartbeat(Some((first.visit_id, first.attempt)))
            .await
            .unwrap()
    );
    // Backdate the lease: the sweeper re-queues the visit.
    sqlx::query("update visits set lease_expires_at = now() - interval '1 minute' where id = $1")
        .bind(first.visit_id)
        .execute(&pool)
        .await
        .unwrap();
    let second = c
        .claim(Duration::from_secs(10))
        .await
        .unwrap()
        .expect("re-queued");
    assert_eq!((second.visit_id, second.attempt), (first.visit_id, 2));
    // The old attempt is fenced: no heartbeat, no session.
    assert!(
        !c.heartbeat(Some((first.visit_id, first.attempt)))
            .await
            .unwrap()
    );
    assert!(matches!(
        c.session(first.visit_id, first.attempt).await,
        Err(medsplit_agent::AgentError::Status { status: 409, .. })
    ));
    // A second expiry exhausts max_attempts: the policy (fail) applies.
    sqlx::query("update visits set lease_expires_at = now() - interval '1 minute' where id = $1")
        .bind(first.visit_id)
        .execute(&pool)
        .await
        .unwrap();
    let job = p.wait_job(id, Duration::from_secs(20)).await;
    assert_eq!(job["status"], "failed");
    assert!(job["error"].as_str().unwrap().contains("failed 2 times"));

    // With the skip policy the round goes on without that hospital.
    let mut s = spec(&["h0"], 2);
    s["max_attempts"] = json!(1);
    let id = p.approved_job(s).await;
    let v = c.claim(Duration::from_secs(5)).await.unwrap().unwrap();
    c.release(v.visit_id, v.attempt, "testing").await.unwrap();
    let running = a.spawn();
    let job = p.wait_job(id, Duration::from_secs(120)).await;
    assert_eq!(job["status"], "completed");
    let m = p
        .researcher
        .ok("GET", &format!("/v1/jobs/{id}/metrics"), None)
        .await;
    let statuses: Vec<_> = m["visits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["skipped", "completed"]);
    running.stop.send_replace(true);
    running.task.await.unwrap().unwrap();
}

/// A visit the hospital's data cannot serve is refused: no retry, the job's policy applies at
/// once, and the researcher reads the reason in the job's error, its events and the visit.
#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn a_refused_visit_is_not_retried_and_its_reason_reaches_the_job(pool: Pool) {
    let p = Platform::new(&pool, 2, &[]).await;
    let c = p.enrol(0).await.coordinator();
    let reason = "this hospital's data cannot give what the job asks: its labels are AAMI";
    let mut s = spec(&["h0"], 1);
    s["max_attempts"] = json!(5);
    s["on_failure"] = json!("fail");
    let id = p.approved_job(s).await;
    let v = c.claim(Duration::from_secs(5)).await.unwrap().unwrap();
    assert_eq!(v.attempt, 1);
    c.refuse(v.visit_id, v.attempt, reason).await.unwrap();
    let job = p.wait_job(id, Duration::from_secs(20)).await;
    assert_eq!(job["status"], "failed", "{job}");
    let error = job["error"].as_str().unwrap();
    assert!(
        error.starts_with(&format!("visit {} (hospital ", v.visit_id))
            && error.contains(") was refused: ")
            && error.ends_with(reason),
        "{error}"
    );
    let events = p
        .researcher
        .ok("GET", &format!("/v1/jobs/{id}/events"), None)
        .await;
    let failed: Vec<_> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "visit.failed")
        .collect();
    assert_eq!(failed.len(), 1, "{events}");
    let d = &failed[0]["detail"];
    assert_eq!(
        (&d["error"], &d["retry"], &d["refused"], &d["failures"]),
        (&json!(reason), &json!(false), &json!(true), &json!(1))
    );

    // Skipped at once: the round goes on at the next hospital, the visit keeps its reason.
    let a1 = p.enrol(1).await;
    let running = a1.spawn();
    let mut s = spec(&["h0", "h1"], 1);
    s["max_attempts"] = json!(5);
    let id = p.approved_job(s).await;
    let v = c.claim(Duration::from_secs(5)).await.unwrap().unwrap();
    c.refuse(v.visit_id, v.attempt, reason).await.unwrap();
    let job = p.wait_job(id, Duration::from_secs(120)).await;
    assert_eq!(job["status"], "completed", "{job}");
    let m = p
        .researcher
        .ok("GET", &format!("/v1/jobs/{id}/metrics"), None)
        .await;
    let visits = m["visits"].as_array().unwrap();
    assert_eq!(
        (
            &visits[0]["status"],
            &visits[0]["attempt"],
            &visits[0]["last_error"]
        ),
        (&json!("skipped"), &json!(1), &json!(reason)),
        "{m}"
    );
    assert_eq!(visits[1]["status"], "completed");
    // A plain release is still retried.
    let mut s = spec(&["h0"], 1);
    s["max_attempts"] = json!(2);
    let id = p.approved_job(s).await;
    let v = c.claim(Duration::from_secs(5)).await.unwrap().unwrap();
    c.release(v.visit_id, v.attempt, "network trouble")
        .await
        .unwrap();
    let again = c.claim(Duration::from_secs(10)).await.unwrap().unwrap();
    assert_eq!((again.visit_id, again.attempt), (v.visit_id, 2));
    c.refuse(again.visit_id, again.attempt, reason)
        .await
        .unwrap();
    let job = p.wait_job(id, Duration::from_secs(20)).await;
    assert_eq!(
        job["status"], "completed",
        "skipped, the job's only visit: {job}"
    );
    running.stop.send_replace(true);
    running.task.await.unwrap().unwrap();
}

/// Agents cut their data per job from their configuration. Asked for the papers' label set, a
/// hospital whose CSV is labelled in AAMI classes cannot give it: it refuses the visit, not
/// retried, and the researcher reads why; the same agent then serves a job asking for AAMI.
#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn an_agent_whose_data_cannot_give_the_label_set_refuses_with_the_reason(pool: Pool) {
    let p = Platform::new(&pool, 2, &[]).await;
    let (a0, a1) = (p.enrol(0).await, p.enrol(1).await);
    let dir = temp_dir("labels");
    // Two patients' beats, labelled N S V F Q.
    let samples = vec!["0.5"; 128].join(",");
    let csv: String = (0..60)
        .map(|i| format!("{},p{},{samples}\n", i % 5, i % 2))
        .collect();
    std::fs::write(dir.join("aami.csv"), csv).unwrap();
    let config = |name: &str, sources: String| {
        let path = dir.join(format!("{name}.toml"));
        let state = dir.join(format!("{name}-state"));
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(
            &path,
            format!("state_dir = {:?}\n{sources}", state.display().to_string()),
        )
        .unwrap();
        medsplit_agent::config::Config::load(&path).unwrap()
    };
    let synthetic = config(
        "h0",
        "[[sources]]\nformat = \"synthetic\"\npatients = 4\nbeats = 240\nseed = 1\n".into(),
    );
    let aami = config(
        "h1",
        format!(
            "[[sources]]\nformat = \"csv\"\npath = {:?}\npatient_column = true\nlabels = \"aami\"\n",
            dir.join("aami.csv").display().to_string()
        ),
    );
    let r0 = a0.spawn_with(Arc::new(
        Datasets::new(synthetic)
            .unwrap()
            .with_policy(common::trusting()),
    ));
    let r1 = a1.spawn_with(Arc::new(
        Datasets::new(aami).unwrap().with_policy(common::trusting()),
    ));

    let mut s = spec(&["h0", "h1"], 1);
    s["local_steps"] = json!(2);
    s["max_attempts"] = json!(3);
    s["on_failure"] = json!("fail");
    let id = p.approved_job(s).await;
    let job = p.wait_job(id, Duration::from_secs(120)).await;
    assert_eq!(job["status"], "failed", "{job}");
    let error = job["error"].as_str().unwrap();
    assert!(
        error.contains("was refused: this hospital's data cannot give what the job asks")
            && error.contains("AAMI")
            && error.contains("papers"),
        "{error}"
    );
    let m = p
        .researcher
        .ok("GET", &format!("/v1/jobs/{id}/metrics"), None)
        .await;
    let visits = m["visits"].as_array().unwrap();
    assert_eq!(
        visits[0]["status"], "completed",
        "h0 cut its cohort for the job: {m}"
    );
    assert_eq!(
        visits[0]["test_evaluation"]["classes"],
        json!(["N", "L", "R", "A", "V"])
    );
    assert_eq!(visits[1]["attempt"], 1, "refused once, not retried: {m}");
    assert_eq!(
        visits[1]["last_error"],
        json!(error.split_once(": ").unwrap().1)
    );

    // The refusing agent goes on, and serves a job asking for what its data holds.
    let mut s = spec(&["h1"], 1);
    s["labels"] = json!("aami");
    s["local_steps"] = json!(2);
    let id = p.approved_job(s).await;
    let job = p.wait_job(id, Duration::from_secs(120)).await;
    assert_eq!(job["status"], "completed", "{job}");
    let m = p
        .researcher
        .ok("GET", &format!("/v1/jobs/{id}/metrics"), None)
        .await;
    let e = &m["visits"][0]["test_evaluation"];
    assert_eq!(e["classes"], json!(["N", "S", "V", "F", "Q"]));
    assert_eq!(e["kind"], "patient");
    for r in [r0, r1] {
        r.stop.send_replace(true);
        r.task.await.unwrap().unwrap();
    }
}

/// A visit with batches in flight, through the coordinator and a real agent, trains exactly as
/// the engine's in-process pipelined training of the same batches (the network changes nothing
/// but timing), and not as one batch at a time.
#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn a_pipelined_visit_trains_as_the_engine_does_in_process(pool: Pool) {
    use medsplit_engine::api::JobSpec;
    use medsplit_engine::model::Objective;
    use medsplit_engine::protocol::{ClientSession, InProcess, Privacy, ServerSession};
    use medsplit_engine::training::{epoch_order, gather};

    let p = Platform::new(&pool, 1, &[]).await;
    let mut a = p.enrol(0).await;
    a.data = Arc::new(synthetic_data(600, 0));
    // In the clear, so that the weights can be compared bit for bit (HE noise is fresh on every
    // run): the hospital's policy allows it here.
    let running = a.spawn_under(medsplit_agent::policy::Policy {
        allow_plaintext: true,
        ..common::trusting()
    });
    let mut body = spec(&["h0"], 1);
    body["insecure_plaintext"] = json!(true);
    body["batches_in_flight"] = json!(4);
    let id = p.approved_job(body.clone()).await;
    let job = p.wait_job(id, Duration::from_secs(120)).await;
    assert_eq!(job["status"], "completed", "{job}");
    let bytes: Vec<u8> = sqlx::query_scalar("select server_checkpoint from jobs where id = $1")
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
    let trained: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();

    // The same visit in process: round 0, first hospital, one pass in the visit's order.
    let spec: JobSpec = serde_json::from_value(body).unwrap();
    let config = spec.model_config();
    let train = &a.data.train;
    let in_process = |depth: usize| {
        let mut client = ClientSession::new(&config, Privacy::Plaintext, spec.seed).unwrap();
        client
            .set_objective(Objective {
                client_lr: spec.client_lr,
                class_weights: spec.class_weights.for_counts(&train.class_counts()),
            })
            .unwrap();
        let server = ServerSession::new(
            &config,
            Privacy::Plaintext,
            spec.server_optimizer,
            spec.seed,
        )
        .unwrap();
        let mut visit = InProcess::from_sessions(client, server)
            .with_depth(depth)
            .unwrap();
        let order = epoch_order(train.len(), spec.seed, 0);
        visit
            .train_pipelined(
                order
                    .chunks(spec.batch_size as usize)
                    .map(|batch| gather(train, batch)),
            )
            .unwrap();
        visit
    };
    let mut pipelined = in_process(4);
    assert_eq!(trained, pipelined.server.model().unwrap().parameters());
    assert_ne!(
        trained,
        in_process(1).server.model().unwrap().parameters(),
        "four in flight is not one at a time"
    );
    // The visit's test measurement (its evaluation steps in flight four at a time too) is that
    // of the same model one step at a time.
    let expected = medsplit_engine::training::evaluate(
        &mut pipelined,
        &a.data.test,
        16,
        &spec.labels.class_names(),
    )
    .unwrap();
    let m = p
        .researcher
        .ok("GET", &format!("/v1/jobs/{id}/metrics"), None)
        .await;
    assert_eq!(
        m["visits"][0]["test_accuracy"],
        json!(expected.accuracy()),
        "{m}"
    );
    running.stop.send_replace(true);
    running.task.await.unwrap().unwrap();
}

/// A one-hospital job long enough to interrupt (2,000 batches of 2) with `in_flight` batches in
/// flight: the agent, the job and the running agent.
async fn long_visit(p: &Platform, in_flight: u32) -> (TestAgent, i64, Running) {
    let mut a = p.enrol(0).await;
    a.data = std::sync::Arc::new(synthetic_data(4000, 0));
    let mut s = spec(&["h0"], 1);
    s["batch_size"] = json!(2);
    s["batches_in_flight"] = json!(in_flight);
    let id = p.approved_job(s).await;
    let running = a.spawn();
    (a, id, running)
}

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn a_killed_agent_s_visit_is_retried(pool: Pool) {
    killed_agent(pool, 1).await;
}

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn a_killed_agent_s_pipelined_visit_is_retried(pool: Pool) {
    killed_agent(pool, 8).await;
}

async fn killed_agent(pool: Pool, in_flight: u32) {
    let p = Platform::new(&pool, 1, &[]).await;
    let (a, id, running) = long_visit(&p, in_flight).await;
    // Wait until training is under way, then kill the agent without a goodbye.
    wait_until_training(&pool, id).await;
    running.task.abort();
    let _ = running.task.await;
    // The lease (4 s) expires; a restarted agent gets the visit again as attempt 2.
    let again = a.spawn();
    let job = p.wait_job(id, Duration::from_secs(180)).await;
    assert_eq!(job["status"], "completed");
    let (attempt, failures): (i32, i32) =
        sqlx::query_as("select attempt, failures from visits where job_id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((attempt, failures), (2, 1));
    again.stop.send_replace(true);
    again.task.await.unwrap().unwrap();
}

/// A session whose attempt loses its lease mid-visit is closed (the coordinator fences it);
/// the visit is trained again by the next attempt and completes once.
#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn a_pipelined_session_that_loses_its_lease_is_fenced_and_retried(pool: Pool) {
    lost_lease(pool, 8).await;
}

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn a_session_that_loses_its_lease_is_fenced_and_retried(pool: Pool) {
    lost_lease(pool, 1).await;
}

async fn lost_lease(pool: Pool, in_flight: u32) {
    let p = Platform::new(&pool, 1, &[]).await;
    let (_a, id, running) = long_visit(&p, in_flight).await;
    wait_until_training(&pool, id).await;
    // Backdate the lease until the sweeper re-queues the visit and fences the running attempt
    // (the agent's heartbeats renew it meanwhile).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while count(
        &pool,
        "select count(*) from visits where job_id = $1 and status = 'running' and attempt = 1",
        id,
    )
    .await
        == 1
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lease was never lost"
        );
        sqlx::query(
            "update visits set lease_expires_at = now() - interval '1 minute' where job_id = $1 and attempt = 1",
        )
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let job = p.wait_job(id, Duration::from_secs(180)).await;
    assert_eq!(job["status"], "completed", "{job}");
    let (attempt, status): (i32, String) =
        sqlx::query_as("select attempt, status from visits where job_id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((attempt, status.as_str()), (2, "completed"));
    let completed = count(
        &pool,
        "select count(*) from job_events where job_id = $1 and kind = 'visit.completed'",
        id,
    )
    .await;
    assert_eq!(completed, 1);
    running.stop.send_replace(true);
    running.task.await.unwrap().unwrap();
}

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn coordinator_killed_mid_job_resumes_without_losing_or_repeating_visits(pool: Pool) {
    killed_coordinator(pool, 1).await;
}

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn coordinator_killed_mid_pipelined_job_resumes_without_losing_or_repeating_visits(
    pool: Pool,
) {
    killed_coordinator(pool, 8).await;
}

async fn killed_coordinator(pool: Pool, in_flight: u32) {
    let mut p = Platform::new(&pool, 3, &[]).await;
    let agents: Vec<_> = futures_util::future::join_all((0..3).map(|i| p.enrol(i))).await;
    let running: Vec<_> = agents.iter().map(|a| a.spawn()).collect();
    let mut s = spec(&["h0", "h1", "h2"], 2);
    s["batches_in_flight"] = json!(in_flight);
    let id = p.approved_job(s).await;
    // Kill once the first visits are done and another is in flight.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while count(
        &pool,
        "select count(*) from visits where job_id = $1 and status = 'completed'",
        id,
    )
    .await
        < 2
    {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let checkpoint_before: Option<Vec<u8>> =
        sqlx::query_scalar("select server_checkpoint from jobs where id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(checkpoint_before.is_some());
    p.server.kill_and_restart().await;
    let job = p.wait_job(id, Duration::from_secs(240)).await;
    assert_eq!(job["status"], "completed", "{job}");
    // Every visit completed exactly once.
    let completed: Vec<i64> = sqlx::query_scalar(
        "select (detail->>'visit_id')::bigint from job_events where job_id = $1 and kind = 'visit.completed' order by id")
        .bind(id).fetch_all(&pool).await.unwrap();
    let mut unique = completed.clone();
    unique.sort();
    unique.dedup();
    assert_eq!((completed.len(), unique.len()), (6, 6), "{completed:?}");
    for r in running {
        r.stop.send_replace(true);
        let _ = r.task.await;
    }
}

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn garbled_and_oversized_frames_close_the_session_and_lose_nothing(pool: Pool) {
    let p = Platform::new(&pool, 1, &["--max-message-bytes", "65536"]).await;
    let a = p.enrol(0).await;
    let c = a.coordinator();
    let id = p.approved_job(spec(&["h0"], 1)).await;
    let v = c.claim(Duration::from_secs(5)).await.unwrap().unwrap();
    for (frame, code) in [
        (Message::binary(vec![0xde, 0xad, 0xbe, 0xef]), 4400u16),
        (Message::text("{\"type\":\"nonsense\"}"), 4400),
        (Message::binary(vec![7u8; 200_000]), 1009),
    ] {
        let mut ws = c.session(v.visit_id, v.attempt).await.unwrap();
        ws.send(frame).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap();
        match got {
            Some(Ok(Message::Close(Some(f)))) => assert_eq!(u16::from(f.code), code, "{f:?}"),
            other => panic!("expected close {code}, got {other:?}"),
        }
    }
    // Nothing lost: the visit still belongs to this attempt, and training it works.
    let visit = p
        .researcher
        .ok("GET", &format!("/v1/jobs/{id}/metrics"), None)
        .await;
    assert_eq!(visit["visits"][0]["status"], "running");
    assert!(c.heartbeat(Some((v.visit_id, v.attempt))).await.unwrap());
    let summary = medsplit_agent::visit::run(
        &c,
        &a.state.secret_key,
        &v,
        &a.data,
        &mut medsplit_agent::visit::Quiet,
    )
    .await
    .unwrap();
    assert!(summary.test_accuracy.is_some());
    let job = p.wait_job(id, Duration::from_secs(30)).await;
    assert_eq!(job["status"], "completed");
}

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn a_malformed_test_confusion_closes_the_session_with_its_reason(pool: Pool) {
    let p = Platform::new(&pool, 1, &[]).await;
    let a = p.enrol(0).await;
    let c = a.coordinator();
    let mut job = spec(&["h0"], 1);
    job["labels"] = json!("papers");
    let id = p.approved_job(job).await;
    let v = c.claim(Duration::from_secs(5)).await.unwrap().unwrap();
    let classes = json!(["N", "L", "R", "A", "V"]);
    let good = json!([
        [2, 0, 0, 0, 0],
        [0, 2, 0, 0, 0],
        [0, 0, 2, 0, 0],
        [0, 0, 0, 2, 0],
        [0, 0, 0, 0, 1]
    ]);
    let report = |test_accuracy: serde_json::Value, test_samples: u64, test: serde_json::Value| {
        json!({
            "type": "complete",
            "train_loss": 0.5, "train_accuracy": 0.5, "train_samples": 8,
            "test_accuracy": test_accuracy, "test_samples": test_samples,
            "test_evaluation": test,
            "sealed": [{ "recipient_agent_id": v.recipients[0].agent_id, "sealed": "AAAA" }],
        })
    };
    let cases = [
        // Counts that do not sum to test_samples.
        (
            report(
                json!(1.0),
                10,
                json!({ "kind": "beat", "classes": classes, "confusion": good }),
            ),
            "test_evaluation.confusion: counts sum to 9, but test_samples is 10",
        ),
        // Not square.
        (
            report(
                json!(1.0),
                9,
                json!({ "kind": "beat", "classes": classes, "confusion": [[9, 0, 0, 0, 0]] }),
            ),
            "test_evaluation: the confusion matrix has 1 rows for 5 classes",
        ),
        // Fewer classes than the job's label set.
        (
            report(
                json!(1.0),
                2,
                json!({ "kind": "beat", "classes": ["N", "V"], "confusion": [[1, 0], [0, 1]] }),
            ),
            "test_evaluation.classes: must be the job's label set's classes N L R A V, got N V",
        ),
        // As many classes, but another label set's.
        (
            report(
                json!(1.0),
                9,
                json!({ "kind": "beat", "classes": ["N", "S", "V", "F", "Q"], "confusion": good }),
            ),
            "test_evaluation.classes: must be the job's label set's classes N L R A V, got N S V F Q",
        ),
        // An accuracy the counts do not give.
        (
            report(
                json!(0.5),
                9,
                json!({ "kind": "beat", "classes": classes, "confusion": good }),
            ),
            "test_accuracy: must be the confusion matrix's accuracy, 1",
        ),
        // Nothing counted.
        (
            report(
                json!(0.0),
                0,
                json!({ "kind": "beat", "classes": classes, "confusion": vec![vec![0; 5]; 5] }),
            ),
            "test_evaluation.confusion: must count 1 to",
        ),
        // A class name that would rewrite a terminal.
        (
            report(
                json!(1.0),
                9,
                json!({ "kind": "beat", "classes": ["N", "L", "R", "\u{1b}[2J", "V"], "confusion": good }),
            ),
            "test_evaluation.classes[3]: must not contain control",
        ),
        // The round measures the test set, but the report has no counts.
        (
            report(json!(null), 0, json!(null)),
            "test_evaluation: this round measures the test set",
        ),
        // An unknown kind of split.
        (
            report(
                json!(1.0),
                9,
                json!({ "kind": "record", "classes": classes, "confusion": good }),
            ),
            "bad control frame",
        ),
    ];
    for (frame, reason) in cases {
        let mut ws = c.session(v.visit_id, v.attempt).await.unwrap();
        ws.send(Message::text(frame.to_string())).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap();
        match got {
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!(u16::from(f.code), 4400, "{f:?}");
                assert!(
                    f.reason.contains(reason),
                    "{reason:?} not in {:?}",
                    f.reason
                );
            }
            other => panic!("expected close 4400 ({reason}), got {other:?}"),
        }
    }
    // Nothing was recorded; the visit still belongs to this attempt and trains normally.
    let stored: Option<Vec<i64>> =
        sqlx::query_scalar("select test_confusion from visits where id = $1")
            .bind(v.visit_id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(stored, None);
    let summary = medsplit_agent::visit::run(
        &c,
        &a.state.secret_key,
        &v,
        &a.data,
        &mut medsplit_agent::visit::Quiet,
    )
    .await
    .unwrap();
    let job = p.wait_job(id, Duration::from_secs(30)).await;
    assert_eq!(job["status"], "completed");
    let m = p
        .researcher
        .ok("GET", &format!("/v1/jobs/{id}/metrics"), None)
        .await;
    let test = summary.test.expect("the visit measured its test set");
    assert_eq!(
        m["visits"][0]["test_evaluation"]["confusion"],
        json!(test.rows())
    );
    check_test_metrics(&pool, id, &m).await;
}

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn tls_end_to_end_with_a_private_ca(pool: Pool) {
    // A private CA and a server certificate for 127.0.0.1, made with the openssl CLI.
    let dir = std::env::temp_dir().join(format!("medsplit-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, cert, key) = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    let ext = dir.join("ext.cnf");
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .current_dir(&dir)
            .args(args)
            .output()
            .expect("the openssl command-line tool is installed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-days",
                "1",
                "-subj",
                "/CN=test-ca",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
                "key.pem",
                "-out",
                "leaf.csr",
            ],
        ]
        .concat(),
    );
    openssl(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
        "-out",
        "cert.pem",
    ]);
    let db_url = database_url(&pool).await;
    medsplit_coordinator::create_admin(&pool, "admin@example.org", PASSWORD)
        .await
        .unwrap();
    let server = Server::start(
        &db_url,
        0,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    )
    .await;
    assert!(
        server.url.starts_with("https://127.0.0.1:"),
        "{}",
        server.url
    );
    // Without the CA the agent refuses the certificate.
    let untrusted = medsplit_agent::client::Endpoint::new(&server.url, None).unwrap();
    let err = medsplit_agent::client::enrol(&untrusted, "t", "a", "k")
        .await
        .err()
        .unwrap();
    assert!(matches!(err, medsplit_agent::AgentError::Http(_)), "{err}");
    // With it: log in, enrol, claim and train a visit over HTTPS and WSS.
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap())
        .build()
        .unwrap();
    let anon = Api {
        base: server.url.clone(),
        http,
        token: None,
    };
    let admin = anon.login("admin@example.org").await;
    let h = admin
        .ok("POST", "/v1/hospitals", Some(json!({ "name": "h0" })))
        .await;
    admin.ok("POST", "/v1/users", Some(json!({ "email": "ha@example.org", "password": PASSWORD, "role": "hospital_admin", "hospital_id": h["id"] }))).await;
    admin
        .ok(
            "POST",
            "/v1/users",
            Some(json!({ "email": "r@example.org", "password": PASSWORD, "role": "researcher" })),
        )
        .await;
    let ha = anon.login("ha@example.org").await;
    let researcher = anon.login("r@example.org").await;
    let token = ha.ok("POST", "/v1/enrolment-tokens", Some(json!({}))).await;
    let endpoint = medsplit_agent::client::Endpoint::new(&server.url, Some(&ca)).unwrap();
    let secret = medsplit_agent::state::new_key();
    use base64::Engine;
    let public = base64::engine::general_purpose::STANDARD.encode(secret.public_key().as_bytes());
    let enrolled =
        medsplit_agent::client::enrol(&endpoint, token["token"].as_str().unwrap(), "tls", &public)
            .await
            .unwrap();
    let job = researcher
        .ok("POST", "/v1/jobs", Some(spec(&["h0"], 1)))
        .await;
    ha.ok(
        "POST",
        &format!("/v1/jobs/{}/consent", job["id"]),
        Some(json!({ "decision": "approve" })),
    )
    .await;
    let c = medsplit_agent::client::Coordinator::new(endpoint, enrolled.credential);
    let v = c.claim(Duration::from_secs(5)).await.unwrap().unwrap();
    let data = synthetic_data(100, 1);
    let summary =
        medsplit_agent::visit::run(&c, &secret, &v, &data, &mut medsplit_agent::visit::Quiet)
            .await
            .unwrap();
    assert!(summary.bytes_up > 0 && summary.test_accuracy.is_some());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_signing_key_file_must_be_private_and_long() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("medsplit-key-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("jwt.key");
    std::fs::write(&path, "x".repeat(48)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = medsplit_coordinator::auth::Keys::from_file(&path)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("can be read by other users"), "{err}");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(medsplit_coordinator::auth::Keys::from_file(&path).is_ok());
    std::fs::write(&path, "short").unwrap();
    let err = medsplit_coordinator::auth::Keys::from_file(&path)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("too short"), "{err}");
    let err = medsplit_coordinator::auth::Keys::from_file(&dir.join("missing"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("missing"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn an_agent_shutting_down_gives_its_visit_back_at_once(pool: Pool) {
    let p = Platform::new(&pool, 1, &["--lease-seconds", "600"]).await;
    let mut a = p.enrol(0).await;
    a.data = std::sync::Arc::new(synthetic_data(4000, 0));
    let mut s = spec(&["h0"], 1);
    s["batch_size"] = json!(2);
    let id = p.approved_job(s).await;
    let (running, logs) = a.spawn_logged();
    wait_until_training(&pool, id).await;
    // What SIGTERM does in `medsplit-agent run`: the daemon stops and returns cleanly.
    running.stop.send_replace(true);
    running.task.await.unwrap().unwrap();
    assert!(
        logs.text()
            .contains("shutting down; the visit in progress will be retried"),
        "{}",
        logs.text()
    );
    // The visit is back in the queue now, long before its 600 s lease would have expired.
    let (status, failures, error): (String, i32, Option<String>) =
        sqlx::query_as("select status, failures, last_error from visits where job_id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .map(|r: (String, i32, Option<String>)| r)
            .unwrap();
    assert_eq!((status.as_str(), failures), ("queued", 1), "{error:?}");
    assert!(error.unwrap_or_default().contains("shutting down"));
    let again = a.spawn();
    let job = p.wait_job(id, Duration::from_secs(120)).await;
    assert_eq!(job["status"], "completed");
    again.stop.send_replace(true);
    again.task.await.unwrap().unwrap();
}

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn enrolment_checks_the_state_directory_before_spending_the_token(pool: Pool) {
    let p = Platform::new(&pool, 1, &[]).await;
    let created = p.hospital_admins[0]
        .ok("POST", "/v1/enrolment-tokens", Some(json!({})))
        .await;
    let token = created["token"].as_str().unwrap().to_string();
    // The command names the state directory of the operations guide and the systemd unit.
    let command = created["command"].as_str().unwrap();
    assert!(
        command.ends_with(&format!(
            "--token {token} --state-dir /var/lib/medsplit-agent"
        )),
        "{command}"
    );
    let dir = std::env::temp_dir().join(format!("medsplit-enrol-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let blocker = dir.join("file");
    std::fs::write(&blocker, "").unwrap();
    let endpoint = medsplit_agent::client::Endpoint::new(&p.server.url, None).unwrap();
    let err = medsplit_agent::enrol(&endpoint, &token, "a1", &blocker.join("state"))
        .await
        .expect_err("a state directory beneath a file cannot be created");
    assert!(matches!(err, medsplit_agent::AgentError::State(_)), "{err}");
    // The token was not spent: it enrols the agent into a directory that works, once.
    let state = dir.join("state");
    let identity = medsplit_agent::enrol(&endpoint, &token, "a1", &state)
        .await
        .unwrap();
    assert_eq!(identity.hospital_id, p.hospital_ids[0]);
    let loaded = medsplit_agent::state::load(&state).unwrap();
    assert_eq!(loaded.identity.agent_id, identity.agent_id);
    let agents = p.hospital_admins[0].ok("GET", "/v1/agents", None).await;
    assert_eq!(agents.as_array().unwrap().len(), 1, "{agents}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The daemon's claim waits 25 s for work; a revoked agent (or one of a disabled hospital) must
/// not wait for it to end, but stop at the first refused heartbeat (every 5 s).
#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn a_revoked_agent_stops_at_the_first_refusal(pool: Pool) {
    let p = Platform::new(&pool, 2, &[]).await;
    let (a0, a1) = (p.enrol(0).await, p.enrol(1).await);
    let (r0, r1) = (a0.spawn(), a1.spawn());
    for (i, a) in [&a0, &a1].into_iter().enumerate() {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while count(
            &pool,
            "select count(*) from agents where id = $1 and last_seen_at is not null",
            a.state.identity.agent_id,
        )
        .await
            == 0
        {
            assert!(tokio::time::Instant::now() < deadline, "agent {i} not seen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    p.hospital_admins[0]
        .ok(
            "POST",
            &format!("/v1/agents/{}/revoke", a0.state.identity.agent_id),
            Some(json!({})),
        )
        .await;
    p.admin
        .ok(
            "POST",
            &format!("/v1/hospitals/{}/disable", p.hospital_ids[1]),
            None,
        )
        .await;
    for r in [r0, r1] {
        let ended = tokio::time::timeout(Duration::from_secs(15), r.task)
            .await
            .expect("the daemon stops before its claim's long poll ends")
            .unwrap();
        assert!(
            matches!(ended, Err(medsplit_agent::AgentError::Revoked)),
            "{:?}",
            ended.err()
        );
    }
}

/// Seeds are whole numbers that every JSON reader keeps exact: the largest one round-trips, a
/// larger one is refused with a field error instead of being changed.
#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn seeds_round_trip_exactly_or_are_refused(pool: Pool) {
    let p = Platform::new(&pool, 1, &[]).await;
    let max = medsplit_engine::api::JobSpec::MAX_SEED;
    assert_eq!(max, 9_007_199_254_740_991);
    for seed in [max + 1, u64::MAX] {
        let mut s = spec(&["h0"], 1);
        s["seed"] = json!(seed);
        let (status, v) = p.researcher.post("/v1/jobs", s).await;
        assert_eq!((status, v["field"].as_str()), (422, Some("seed")), "{v}");
        let error = v["error"].as_str().unwrap();
        assert!(
            error.contains("9007199254740991") && error.contains(&seed.to_string()),
            "{error}"
        );
    }
    let mut s = spec(&["h0"], 1);
    s["seed"] = json!(max);
    let job = p.researcher.ok("POST", "/v1/jobs", Some(s)).await;
    let id = job["id"].as_i64().unwrap();
    let shown = p
        .researcher
        .ok("GET", &format!("/v1/jobs/{id}"), None)
        .await;
    assert_eq!(shown["spec"]["seed"].as_u64(), Some(max));
    // Within 2^53 a JSON number is exact in JavaScript too.
    assert_eq!(max as f64 as u64, max);
}

/// An agent that never connected (its enrolment could not write its state, say) can be deleted
/// by its hospital's admin, with the weights sealed to it; one that has connected cannot.
#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn a_never_seen_agent_can_be_deleted_by_its_hospital_admin(pool: Pool) {
    let p = Platform::new(&pool, 2, &[]).await;
    let (a, ghost) = (p.enrol(0).await, p.enrol(0).await);
    let ghost_id = ghost.state.identity.agent_id;
    // A job trained by `a` seals its weights to every agent of h0, the ghost included.
    let id = p.approved_job(spec(&["h0"], 1)).await;
    let running = a.spawn();
    assert_eq!(
        p.wait_job(id, Duration::from_secs(120)).await["status"],
        "completed"
    );
    running.stop.send_replace(true);
    running.task.await.unwrap().unwrap();
    let sealed_to = |agent: i64| {
        count(
            &pool,
            "select count(*) from sealed_weights where recipient_agent_id = $1",
            agent,
        )
    };
    assert_eq!(sealed_to(ghost_id).await, 1);

    let path = |agent: i64| format!("/v1/agents/{agent}");
    // Not another hospital's admin, not a researcher; not an agent that has connected.
    assert_eq!(
        p.hospital_admins[1]
            .call("DELETE", &path(ghost_id), None)
            .await
            .0,
        404
    );
    assert_eq!(
        p.researcher.call("DELETE", &path(ghost_id), None).await.0,
        403
    );
    let (status, v) = p.hospital_admins[0]
        .call("DELETE", &path(a.state.identity.agent_id), None)
        .await;
    assert_eq!(status, 409, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("revoke it instead"),
        "{v}"
    );

    let (status, v) = p.hospital_admins[0]
        .call("DELETE", &path(ghost_id), None)
        .await;
    assert_eq!(status, 204, "{v}");
    assert_eq!(sealed_to(ghost_id).await, 0);
    assert_eq!(sealed_to(a.state.identity.agent_id).await, 1);
    let agents = p.hospital_admins[0].ok("GET", "/v1/agents", None).await;
    let ids: Vec<i64> = agents
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [a.state.identity.agent_id]);
    // Its credential is refused; deleting it again finds nothing.
    assert!(matches!(
        ghost.coordinator().heartbeat(None).await,
        Err(medsplit_agent::AgentError::Revoked)
    ));
    assert_eq!(
        p.hospital_admins[0]
            .call("DELETE", &path(ghost_id), None)
            .await
            .0,
        404
    );
    let audit = p.admin.ok("GET", "/v1/audit", None).await;
    let entry = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "agent.delete")
        .expect("audited");
    assert_eq!(entry["target"], format!("agent:{ghost_id}"));
    assert_eq!(entry["detail"]["name"], "agent-h0");
}

/// Hospital admins see which researcher asks for a job, and its number: names may repeat.
#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn jobs_name_their_researcher(pool: Pool) {
    let p = Platform::new(&pool, 1, &[]).await;
    let created = p
        .researcher
        .ok("POST", "/v1/jobs", Some(spec(&["h0"], 1)))
        .await;
    assert_eq!(created["owner"], "researcher@example.org");
    let seen = p.hospital_admins[0].ok("GET", "/v1/jobs", None).await;
    assert_eq!(seen[0]["id"], created["id"]);
    assert_eq!(seen[0]["owner"], "researcher@example.org");
    let one = p
        .admin
        .ok("GET", &format!("/v1/jobs/{}", created["id"]), None)
        .await;
    assert_eq!(one["owner"], "researcher@example.org");
}
