//! A finished job's model: its client layers sealed to each agent of its hospitals, its server
//! layer released only to them, only once the job has completed and only when the job's release
//! policy allows; every release recorded.

mod common;

use std::time::Duration;

use common::{Platform, spec};
use medsplit_agent::AgentError;
use medsplit_agent::release;
use serde_json::json;
use sqlx::PgPool as Pool;

fn status(e: AgentError) -> u16 {
    match e {
        AgentError::Status { status, .. } => status,
        AgentError::Revoked => 401,
        other => panic!("unexpected error: {other}"),
    }
}

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn only_participants_take_a_finished_model_and_every_export_is_recorded(pool: Pool) {
    let p = Platform::new(&pool, 3, &[]).await;
    let agents = [p.enrol(0).await, p.enrol(1).await, p.enrol(2).await];
    let running: Vec<_> = agents[..2].iter().map(|a| a.spawn()).collect();
    let job = p.approved_job(spec(&["h0", "h1"], 2)).await;
    // Not finished yet: no model.
    let (a0, a1, outsider) = (
        agents[0].coordinator(),
        agents[1].coordinator(),
        agents[2].coordinator(),
    );
    let pending = p
        .researcher
        .ok("POST", "/v1/jobs", Some(spec(&["h0"], 1)))
        .await["id"]
        .as_i64()
        .unwrap();
    assert_eq!(status(a0.model_release(pending).await.unwrap_err()), 409);
    assert_eq!(status(a0.client_release(pending).await.unwrap_err()), 409);

    let done = p.wait_job(job, Duration::from_secs(120)).await;
    assert_eq!(done["status"], "completed", "{done}");
    for r in running {
        r.task.abort();
    }

    // The whole model, exported at an agent of a participating hospital; an occupied directory
    // is refused before anything is released.
    let dir = common::temp_dir("export");
    std::fs::write(dir.join("notes.txt"), "kept").unwrap();
    let key = &agents[0].state.secret_key;
    let refused = release::export(&a0, key, job, &dir).await.unwrap_err();
    assert!(refused.to_string().contains("not empty"), "{refused}");
    let out = dir.join("model");
    let card = release::export(&a0, key, job, &out).await.unwrap();
    let (model, read_back) = medsplit_agent::model_dir::read(&out).unwrap();
    assert_eq!(read_back, card);
    let config = card.spec.model_config();
    assert_eq!(model.config, config);
    let checkpoint: Vec<u8> =
        sqlx::query_scalar("select server_checkpoint from jobs where id = $1")
            .bind(job)
            .fetch_one(&pool)
            .await
            .unwrap();
    let stored: Vec<f32> = checkpoint
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(
        model.server, stored,
        "the exported layer is the final checkpoint"
    );
    let client = model.client.clone();
    assert_eq!(client.len(), config.client_parameter_count());
    // The card: the job, its hospitals and rounds, who exported it, each hospital's test
    // counts of the last round and their pool, the files' checksums.
    assert_eq!(
        (card.job_id, card.rounds, card.hospitals.clone()),
        (job, 2, vec!["h0".to_string(), "h1".to_string()])
    );
    assert_eq!(card.classes, ["N", "L", "R", "A", "V"]);
    assert!(
        card.exported_by.contains("agent-h0") && card.exported_by.contains("of h0"),
        "{}",
        card.exported_by
    );
    let evaluation = card.evaluation.as_ref().expect("the last round measured");
    assert_eq!(evaluation.round, 2);
    assert_eq!(evaluation.kind, medsplit_engine::metrics::EvalKind::Patient);
    let metrics = p
        .researcher
        .ok("GET", &format!("/v1/jobs/{job}/metrics"), None)
        .await;
    let last_round = &metrics["rounds"][1];
    for (i, h) in evaluation.hospitals.iter().enumerate() {
        assert_eq!(h.hospital, format!("h{i}"));
        let reported = &metrics["visits"][2 + i]["test_evaluation"]["confusion"];
        assert_eq!(serde_json::to_value(h.confusion.rows()).unwrap(), *reported);
    }
    assert_eq!(
        serde_json::to_value(evaluation.pooled.rows()).unwrap(),
        last_round["pooled_test_evaluation"]["confusion"]
    );
    let names: Vec<&str> = card.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["model.onnx", "model.safetensors"]);
    let markdown = std::fs::read_to_string(out.join("model-card.md")).unwrap();
    assert!(markdown.contains(&format!("job {job}")), "{markdown}");
    // Both participants hold the same final client weights.
    let (_, other) = release::final_client(&a1, &agents[1].state.secret_key, job)
        .await
        .unwrap();
    assert_eq!(other, client);

    // Outside the job, or not an agent: refused.
    assert_eq!(status(outsider.model_release(job).await.unwrap_err()), 403);
    assert_eq!(status(outsider.client_release(job).await.unwrap_err()), 403);
    let (code, body) = p.researcher.get(&format!("/v1/jobs/{job}/model")).await;
    assert_eq!(code, 403, "{body}");
    let (code, _) = p
        .researcher
        .get(&format!("/v1/jobs/{job}/model/client"))
        .await;
    assert_eq!(code, 403);

    // A revoked agent gets nothing.
    let id1 = agents[1].state.identity.agent_id;
    let (code, v) = p.hospital_admins[1]
        .post(&format!("/v1/agents/{id1}/revoke"), json!({}))
        .await;
    assert_eq!(code, 204, "{v}");
    assert_eq!(status(a1.model_release(job).await.unwrap_err()), 401);
    assert_eq!(status(a1.client_release(job).await.unwrap_err()), 401);

    // One export recorded: who, when; audited; visible to the job's viewers, not to outsiders.
    let exports = p
        .researcher
        .ok("GET", &format!("/v1/jobs/{job}/exports"), None)
        .await;
    let exports = exports.as_array().unwrap();
    assert_eq!(
        exports.len(),
        1,
        "only the export that went through: {exports:?}"
    );
    assert_eq!(exports[0]["hospital"], "h0");
    assert_eq!(exports[0]["agent_id"], agents[0].state.identity.agent_id);
    assert!(exports[0]["at"].as_str().is_some());
    let seen_by_admin = p.hospital_admins[1]
        .ok("GET", &format!("/v1/jobs/{job}/exports"), None)
        .await;
    assert_eq!(seen_by_admin.as_array().unwrap().len(), 1);
    let (code, _) = p.hospital_admins[2]
        .get(&format!("/v1/jobs/{job}/exports"))
        .await;
    assert_eq!(code, 404);
    let audited: i64 = sqlx::query_scalar(
        "select count(*) from audit_log where action = 'model.export' and target = $1 and actor = $2",
    )
    .bind(format!("job:{job}"))
    .bind(format!("agent:{}", agents[0].state.identity.agent_id))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(audited, 1);
}

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn under_the_nobody_policy_the_server_layer_stays_on_the_coordinator(pool: Pool) {
    let p = Platform::new(&pool, 1, &[]).await;
    let agent = p.enrol(0).await;
    let running = agent.spawn();
    let mut s = spec(&["h0"], 1);
    s["release"] = json!("nobody");
    let job = p.approved_job(s).await;
    let shown = p.hospital_admins[0]
        .ok("GET", &format!("/v1/jobs/{job}"), None)
        .await;
    assert_eq!(
        shown["spec"]["release"], "nobody",
        "consent shows the policy"
    );
    let done = p.wait_job(job, Duration::from_secs(120)).await;
    assert_eq!(done["status"], "completed", "{done}");
    running.task.abort();
    let c = agent.coordinator();
    match c.model_release(job).await.unwrap_err() {
        AgentError::Status { status, message } => {
            assert_eq!(status, 403);
            assert!(message.contains("nobody"), "{message}");
        }
        other => panic!("{other}"),
    }
    // Its client layers stay with the hospitals (private inference uses them).
    let (spec, client) = release::final_client(&c, &agent.state.secret_key, job)
        .await
        .unwrap();
    assert_eq!(client.len(), spec.model_config().client_parameter_count());
    let exports = p
        .researcher
        .ok("GET", &format!("/v1/jobs/{job}/exports"), None)
        .await;
    assert_eq!(exports, json!([]));
    // A policy that is not one is refused with the field named.
    let mut bad = spec_value();
    bad["release"] = json!("everyone");
    let (code, body) = p.researcher.post("/v1/jobs", bad).await;
    assert_eq!(code, 422, "{body}");
    assert!(body.to_string().contains("release"), "{body}");
}

fn spec_value() -> serde_json::Value {
    spec(&["h0"], 1)
}
