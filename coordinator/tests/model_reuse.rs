//! A finished job's model in use through the coordinator: private inference (the agent's client
//! layers, the coordinator's final layer on ciphertexts) and fine-tuning a new job from it.

mod common;

use std::time::Duration;

use common::*;
use medsplit_agent::AgentError;
use medsplit_agent::inference::PrivateInference;
use medsplit_agent::predict::{Format, InputArgs};
use medsplit_engine::export::TrainedModel;
use medsplit_engine::export::infer::Classifier;
use medsplit_engine::model::predictions;
use medsplit_engine::protocol::{ClientSession, InProcess, Privacy, ServerSession};
use medsplit_engine::training::gather;
use serde_json::{Value, json};
use sqlx::PgPool as Pool;

async fn checkpoint(pool: &Pool, job: i64) -> Vec<f32> {
    let bytes: Vec<u8> = sqlx::query_scalar("select server_checkpoint from jobs where id = $1")
        .bind(job)
        .fetch_one(pool)
        .await
        .unwrap();
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// The `model.inference` audit entries of `job`, waited for (a session is audited once it has
/// closed).
async fn inference_audit(pool: &Pool, job: i64, expected: usize) -> Vec<(String, Value)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let rows: Vec<(String, Value)> = sqlx::query_as(
            "select actor, detail from audit_log where action = 'model.inference' and target = $1 order by id",
        )
        .bind(format!("job:{job}"))
        .fetch_all(pool)
        .await
        .unwrap();
        if rows.len() >= expected || tokio::time::Instant::now() > deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Each visit's hospital and its messages (each way counted), in order.
async fn messages(pool: &Pool, job: i64) -> Vec<(i64, i64)> {
    sqlx::query_as("select hospital_id, messages from visits where job_id = $1 order by seq")
        .bind(job)
        .fetch_all(pool)
        .await
        .unwrap()
}

fn status(e: AgentError) -> u16 {
    match e {
        AgentError::Status { status, .. } => status,
        e => panic!("expected a refusal, got {e}"),
    }
}

/// A job trained in the clear still serves inference encrypted: the agent's probabilities are
/// those of the plaintext forward pass of the same weights within HE error, with the same
/// classes; the coordinator keeps an audit entry with the counts. Refused for a job that has not
/// completed, for an agent of a hospital outside the job and for a revoked agent (whose open
/// session is closed).
#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn private_inference_agrees_with_the_plaintext_model_and_is_audited(pool: Pool) {
    let p = Platform::new(&pool, 3, &[]).await;
    let agents: Vec<_> = futures_util::future::join_all((0..3).map(|i| p.enrol(i))).await;
    // Plaintext training, so that the encrypted inference can be compared with the plaintext
    // model: the hospitals' policy allows it here.
    let allowing = medsplit_agent::policy::Policy {
        allow_plaintext: true,
        ..common::trusting()
    };
    let running: Vec<_> = agents[..2]
        .iter()
        .map(|a| a.spawn_under(allowing.clone()))
        .collect();
    let mut body = spec(&["h0", "h1"], 1);
    body["insecure_plaintext"] = json!(true);
    let id = p.approved_job(body.clone()).await;
    // A job that has not completed (still waiting for consent) serves no inference.
    let pending = p
        .researcher
        .ok("POST", "/v1/jobs", Some(body.clone()))
        .await["id"]
        .as_i64()
        .unwrap();
    let a0 = agents[0].coordinator();
    let refused = a0.inference_session(pending).await.map(|_| ());
    assert_eq!(status(refused.unwrap_err()), 409);
    let job = p.wait_job(id, Duration::from_secs(240)).await;
    assert_eq!(job["status"], "completed", "{job}");

    let key = &agents[0].state.secret_key;
    let (spec, mut session) = PrivateInference::connect(&a0, key, id).await.unwrap();
    let config = spec.model_config();
    let data = &agents[0].data;
    let all: Vec<usize> = (0..data.test.len()).collect();
    let (rows, _) = gather(&data.test, &all);
    // More than one message's worth of beats, the last message ragged.
    let rows: Vec<f32> = rows
        .iter()
        .copied()
        .cycle()
        .take(config.input_len() * (PrivateInference::BATCH + 37))
        .collect();
    let beats = rows.len() / config.input_len();
    let private = session.probabilities(&rows).await.unwrap();
    let traffic = session.close().await.unwrap();
    assert_eq!(traffic.beats as usize, beats);
    assert_eq!(traffic.messages, 2);

    // The plaintext forward pass of the same weights: the final client layers, the checkpoint.
    let (_, client) = medsplit_agent::release::final_client(&a0, key, id)
        .await
        .unwrap();
    let server = checkpoint(&pool, id).await;
    let mut plain = InProcess::from_sessions(
        ClientSession::resume(&config, Privacy::Plaintext, &client).unwrap(),
        ServerSession::inference(&config, Privacy::Plaintext, &server).unwrap(),
    );
    let expected = plain.infer(&rows).unwrap();
    assert_eq!(private.len(), expected.len());
    let largest = private
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(largest <= 1e-5, "probabilities differ by {largest}");
    let classes = config.classes;
    let mut compared = 0;
    for (row, (pr, er)) in private
        .chunks_exact(classes)
        .zip(expected.chunks_exact(classes))
        .enumerate()
    {
        let mut sorted = er.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        if sorted[0] - sorted[1] > 1e-3 {
            compared += 1;
            assert_eq!(
                predictions(pr, classes).next(),
                predictions(er, classes).next(),
                "row {row}"
            );
        }
    }
    assert!(
        compared > beats / 2,
        "only {compared} of {beats} rows compared"
    );

    // One audit entry with the session's counts, nothing else stored.
    let audit = inference_audit(&pool, id, 1).await;
    assert_eq!(audit.len(), 1, "{audit:?}");
    let (actor, detail) = &audit[0];
    assert_eq!(
        actor,
        &format!("agent:{}", agents[0].state.identity.agent_id)
    );
    assert_eq!(detail["beats"], beats);
    assert_eq!(detail["bytes_up"], traffic.bytes_up);
    assert_eq!(detail["bytes_down"], traffic.bytes_down);
    assert_eq!(detail["hospital_id"], p.hospital_ids[0]);
    assert!(
        traffic.bytes_up > 1000 * beats as u64,
        "ciphertexts, not plaintext activations"
    );

    // `medsplit-agent predict --job` on beat files: the classes and probabilities of the exported
    // model's own forward pass, within HE error.
    let dir = temp_dir("predict-job");
    let (test_rows, test_labels) = gather(&data.test, &all);
    let bytes: Vec<u8> = test_rows.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(dir.join("beats.f32"), bytes).unwrap();
    std::fs::write(dir.join("beats.labels"), &test_labels).unwrap();
    let args = InputArgs {
        model: None,
        inputs: vec![dir.join("beats.f32")],
        config: None,
        records: None,
        csv_patient_column: false,
        csv_labels: None,
    };
    let out = dir.join("predictions.csv");
    medsplit_agent::inference::predict(&a0, key, id, &args, Format::Csv, Some(&out))
        .await
        .unwrap();
    let exported = TrainedModel::new(config.clone(), client.clone(), server.clone()).unwrap();
    let local = medsplit_agent::predict::probabilities(&Classifier::new(&exported), &test_rows);
    let names = spec.labels.class_names();
    let text = std::fs::read_to_string(&out).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next().unwrap(),
        format!("record,beat,sample,class,p_{}", names.join(",p_"))
    );
    let mut rows_read = 0;
    for (i, (line, expected)) in lines.zip(local.chunks_exact(classes)).enumerate() {
        let fields: Vec<&str> = line.split(',').collect();
        assert_eq!(fields[1], i.to_string());
        let p: Vec<f32> = fields[4..].iter().map(|v| v.parse().unwrap()).collect();
        let largest = p
            .iter()
            .zip(expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(largest <= 1e-5, "beat {i}: {p:?} vs {expected:?}");
        let mut sorted = expected.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        if sorted[0] - sorted[1] > 1e-3 {
            let class = predictions(expected, classes).next().unwrap();
            assert_eq!(fields[3], names[class], "beat {i}");
        }
        rows_read += 1;
    }
    assert_eq!(rows_read, data.test.len());
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(inference_audit(&pool, id, 2).await.len(), 2);

    // An agent of a hospital outside the job.
    let outsider = agents[2].coordinator();
    let refused = outsider.inference_session(id).await.map(|_| ());
    assert_eq!(status(refused.unwrap_err()), 403);

    // Revoking an agent closes its open session and refuses new ones.
    let a1 = agents[1].coordinator();
    let (_, mut open) = PrivateInference::connect(&a1, &agents[1].state.secret_key, id)
        .await
        .unwrap();
    open.probabilities(&rows[..config.input_len() * 3])
        .await
        .unwrap();
    let agent1 = agents[1].state.identity.agent_id;
    p.hospital_admins[1]
        .ok("POST", &format!("/v1/agents/{agent1}/revoke"), None)
        .await;
    // The close frame (4403), or the connection already gone when the next message goes out.
    match open.probabilities(&rows[..config.input_len()]).await {
        Err(AgentError::Closed { code, .. }) => {
            assert_eq!(code, medsplit_engine::api::close::REVOKED)
        }
        Err(AgentError::Session(_)) => {}
        other => panic!(
            "the revoked agent's session went on: {:?}",
            other.map(|_| ())
        ),
    }
    let refused = agents[1]
        .coordinator()
        .inference_session(id)
        .await
        .map(|_| ());
    assert!(matches!(refused, Err(AgentError::Revoked)), "{refused:?}");
    let audit = inference_audit(&pool, id, 3).await;
    assert_eq!(audit.len(), 3);
    assert_eq!(audit[2].1["beats"], 3);
    for r in running {
        r.stop.send_replace(true);
        let _ = r.task.await.unwrap();
    }
}

/// A job can start from a finished job's model and train only the server layer: its submission
/// is checked against the source; its client weights come out bit for bit as they went in, its
/// server layer moves, and each training batch is one message each way.
#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn a_fine_tune_job_trains_the_server_layer_of_a_finished_job_alone(pool: Pool) {
    let p = Platform::new(&pool, 3, &[]).await;
    let agents: Vec<_> = futures_util::future::join_all((0..3).map(|i| p.enrol(i))).await;
    let running: Vec<_> = agents[..2].iter().map(|a| a.spawn()).collect();
    // The source's model may not leave the coordinator: neither may its fine-tuned successor's.
    let mut body = spec(&["h0", "h1"], 1);
    body["release"] = json!("nobody");
    let source = p.approved_job(body).await;

    let tune = |hospitals: &[&str]| {
        let mut body = spec(hospitals, 1);
        body["name"] = json!("fine-tune");
        body["init_from"] = json!(source);
        body["train_client"] = json!(false);
        body["release"] = json!("nobody");
        body
    };
    let refused = |body: Value, field: &'static str, says: &'static str| {
        let researcher = p.researcher.clone();
        async move {
            let (status, v) = researcher.post("/v1/jobs", body).await;
            assert_eq!(status, 422, "{v}");
            assert_eq!(v["field"], field, "{v}");
            assert!(v["error"].as_str().unwrap().contains(says), "{v}");
        }
    };
    // A job that has not completed (waiting for consent) cannot be started from.
    let pending = p
        .researcher
        .ok("POST", "/v1/jobs", Some(spec(&["h0", "h1"], 1)))
        .await["id"]
        .as_i64()
        .unwrap();
    let mut body = tune(&["h0", "h1"]);
    body["init_from"] = json!(pending);
    refused(body, "init_from", "is pending: only a completed job").await;
    let job = p.wait_job(source, Duration::from_secs(240)).await;
    assert_eq!(job["status"], "completed", "{job}");

    let mut body = tune(&["h0", "h1"]);
    body["init_from"] = json!(source + 100);
    refused(body, "init_from", "no job").await;
    refused(
        tune(&["h0", "h2"]),
        "init_from",
        "\"h2\" (hospitals[1]) did not take part",
    )
    .await;
    let mut body = tune(&["h0", "h1"]);
    body["labels"] = json!("aami");
    refused(body, "init_from", "another label set").await;
    let mut body = tune(&["h0", "h1"]);
    body["model"] = json!("m1_tail");
    refused(body, "init_from", "another model").await;
    let mut body = spec(&["h0", "h1"], 1);
    body["train_client"] = json!(false);
    refused(body, "train_client", "init_from").await;
    let mut body = tune(&["h0", "h1"]);
    body["release"] = json!("participants");
    refused(body, "release", "keeps release \"nobody\"").await;
    // Another researcher may not see the source job.
    p.admin
        .ok(
            "POST",
            "/v1/users",
            Some(
                json!({ "email": "other@example.org", "password": PASSWORD, "role": "researcher" }),
            ),
        )
        .await;
    let other = p.server.api().login("other@example.org").await;
    let (status, v) = other.post("/v1/jobs", tune(&["h0", "h1"])).await;
    assert_eq!((status, &v["field"]), (422, &json!("init_from")), "{v}");

    let id = p.approved_job(tune(&["h0", "h1"])).await;
    let job = p.wait_job(id, Duration::from_secs(240)).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["source"]["id"], source, "{job}");
    assert_eq!(job["spec"]["train_client"], false);

    // The client layers are those the source ended with, bit for bit; the server layer moved.
    let a0 = agents[0].coordinator();
    let key = &agents[0].state.secret_key;
    let (_, before) = medsplit_agent::release::final_client(&a0, key, source)
        .await
        .unwrap();
    let (_, after) = medsplit_agent::release::final_client(&a0, key, id)
        .await
        .unwrap();
    assert_eq!(
        before.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        after.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    let (s0, s1) = (checkpoint(&pool, source).await, checkpoint(&pool, id).await);
    assert_eq!(s0.len(), s1.len());
    assert_ne!(s0, s1, "the server layer trained");

    // Messages (each way counted): one per training batch each way here, two in the source;
    // the test set's batches (16 beats) carry the last gradient.
    for (job, per_batch) in [(source, 2), (id, 1)] {
        let rows = messages(&pool, job).await;
        assert_eq!(rows.len(), 2);
        for (hospital, messages) in rows {
            let i = p.hospital_ids.iter().position(|&h| h == hospital).unwrap();
            let data = &agents[i].data;
            let train = data.train.len().div_ceil(8) as i64;
            let test = data.test.len().div_ceil(16) as i64;
            assert_eq!(messages, 2 * (per_batch * train + test), "job {job}, h{i}");
        }
    }
    for r in running {
        r.stop.send_replace(true);
        r.task.await.unwrap().unwrap();
    }
}
