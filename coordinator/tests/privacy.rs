//! ε per hospital: projected from each hospital's reported data before consent, refused at
//! consent over the hospital's maximum, refused again by the agent past it, spent as the agents
//! report it; and the privacy report of a finished job.

mod common;

use std::time::Duration;

use common::{Platform, spec};
use medsplit_engine::api::JobSpec;
use serde_json::{Value, json};
use sqlx::PgPool as Pool;

fn with_dp(hospitals: &[&str], rounds: u32, dp: Value) -> Value {
    let mut s = spec(hospitals, rounds);
    s["dp"] = dp;
    s["class_weights"] = json!("uniform");
    s
}

/// The ε the agent's accountant gives a hospital with `n` training beats on `spec`.
fn plan(spec: &Value, n: usize) -> medsplit_engine::dp::DpPlan {
    let spec: JobSpec = serde_json::from_value(spec.clone()).unwrap();
    medsplit_engine::dp::plan(&spec, n as u64).unwrap()
}

fn of<'a>(job: &'a Value, hospital: &str) -> &'a Value {
    job["privacy"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["hospital"] == hospital)
        .unwrap_or_else(|| panic!("no {hospital} in {job}"))
}

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn a_hospitals_maximum_epsilon_holds_at_consent_and_at_its_agents(pool: Pool) {
    let p = Platform::new(&pool, 2, &[]).await;
    let agents = [p.enrol(0).await, p.enrol(1).await];
    for a in &agents {
        a.coordinator()
            .report_data(a.data.train.len(), a.data.test.len())
            .await
            .unwrap();
    }
    let (h0, h1) = (p.hospital_ids[0], p.hospital_ids[1]);

    // Only the hospital's own admins (and platform admins) set its maximum; bad values are
    // refused at the field.
    let path = |id: i64| format!("/v1/hospitals/{id}/max-epsilon");
    let (status, _) = p.hospital_admins[1]
        .call("PUT", &path(h0), Some(json!({ "max_epsilon": 100 })))
        .await;
    assert_eq!(status, 403);
    for bad in [json!(0), json!(-1), json!(1e6), json!("8")] {
        let (status, body) = p.hospital_admins[0]
            .call("PUT", &path(h0), Some(json!({ "max_epsilon": bad })))
            .await;
        assert_eq!(status, 422, "{bad}: {body}");
        assert_eq!(body["field"], "max_epsilon", "{body}");
    }
    let set = p.hospital_admins[0]
        .ok("PUT", &path(h0), Some(json!({ "max_epsilon": 4 })))
        .await;
    assert_eq!(set["max_epsilon"], 4.0);

    // Without DP, ε is unbounded: h0 cannot approve, h1 (no maximum) can.
    let consent = async |i: usize, job: i64| {
        p.hospital_admins[i]
            .call(
                "POST",
                &format!("/v1/jobs/{job}/consent"),
                Some(json!({ "decision": "approve" })),
            )
            .await
    };
    let plain = p
        .researcher
        .ok("POST", "/v1/jobs", Some(spec(&["h0", "h1"], 1)))
        .await;
    let id = plain["id"].as_i64().unwrap();
    let (status, body) = consent(0, id).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("unbounded"),
        "{body}"
    );
    assert_eq!(consent(1, id).await.0, 200);

    // With a fixed σ, ε follows from each hospital's reported data: shown before consent, the
    // agent's accountant's figure; over h0's maximum it is refused with the figure.
    let loud = with_dp(&["h0", "h1"], 2, json!({ "noise_multiplier": 0.6 }));
    let job = p
        .researcher
        .ok("POST", "/v1/jobs", Some(loud.clone()))
        .await;
    let id = job["id"].as_i64().unwrap();
    for (i, name) in ["h0", "h1"].into_iter().enumerate() {
        let shown = of(&job, name);
        let n = agents[i].data.train.len();
        assert_eq!(shown["train_samples"], n as i64, "{shown}");
        let expected = plan(&loud, n).epsilon;
        let projected = shown["projected_epsilon"].as_f64().unwrap();
        assert!(
            (projected - expected).abs() < 1e-9,
            "{projected} vs {expected}"
        );
        assert!(shown["epsilon_spent"].is_null());
    }
    assert!(of(&job, "h0")["projected_epsilon"].as_f64().unwrap() > 4.0);
    assert_eq!(of(&job, "h0")["max_epsilon"], 4.0);
    let (status, body) = consent(0, id).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("over its maximum"),
        "{body}"
    );

    // A target ε within the maximum is approved; the job runs, and each hospital's ε spent is
    // what its agent's accountant reports after its last visit.
    let quiet = with_dp(&["h0", "h1"], 2, json!({ "target_epsilon": 3 }));
    let id = p.approved_job(quiet.clone()).await;
    let running: Vec<_> = agents.iter().map(|a| a.spawn()).collect();
    let done = p.wait_job(id, Duration::from_secs(180)).await;
    assert_eq!(done["status"], "completed", "{done}");
    for (i, name) in ["h0", "h1"].into_iter().enumerate() {
        let shown = of(&done, name);
        let spent = shown["epsilon_spent"].as_f64().unwrap();
        let projected = shown["projected_epsilon"].as_f64().unwrap();
        assert!((projected - 3.0).abs() < 0.01, "{shown}");
        let planned = plan(&quiet, agents[i].data.train.len());
        assert!(
            (spent - planned.epsilon).abs() < 1e-9,
            "{spent} vs {planned:?}"
        );
        assert!(spent <= 3.0 + 1e-9 && spent > 2.0, "{shown}");
    }

    // The privacy report: what the coordinator saw, by kind, adds up to the visits' traffic;
    // the harness's figures are those measured with DP at the job's batch size.
    let report = p
        .researcher
        .ok("GET", &format!("/v1/jobs/{id}/privacy"), None)
        .await;
    let metrics = p
        .researcher
        .ok("GET", &format!("/v1/jobs/{id}/metrics"), None)
        .await;
    let visits = metrics["visits"].as_array().unwrap();
    let total = |key: &str| visits.iter().map(|v| v[key].as_i64().unwrap()).sum::<i64>();
    let seen = report["seen"].as_array().unwrap();
    let sum = |direction: &str, what: &str| {
        seen.iter()
            .filter(|m| m["direction"] == direction)
            .map(|m| m[what].as_i64().unwrap())
            .sum::<i64>()
    };
    assert_eq!(sum("up", "bytes"), total("bytes_up"), "{report}");
    assert_eq!(sum("down", "bytes"), total("bytes_down"), "{report}");
    assert_eq!(sum("up", "count") + sum("down", "count"), total("messages"));
    let count = |direction: &str, kind: &str| {
        seen.iter()
            .find(|m| m["direction"] == direction && m["kind"] == kind)
            .map_or(0, |m| m["count"].as_i64().unwrap())
    };
    assert!(count("up", "Backward") > 0, "{report}");
    assert_eq!(count("up", "Backward"), count("down", "InputGradients"));
    assert_eq!(count("up", "Forward"), count("down", "Logits"));
    let backward = seen.iter().find(|m| m["kind"] == "Backward").unwrap();
    assert!(
        backward["carries"].as_str().unwrap().contains("DP-SGD"),
        "{backward}"
    );
    let attack = &report["attack"];
    assert_eq!(attack["measured_batch_size"], 8);
    assert_eq!(attack["dp"], true);
    let rows = attack["results"].as_array().unwrap();
    assert!(!rows.is_empty());
    assert!(rows.iter().all(|r| r["dp"] == true && r["batch_size"] == 8));
    assert!(report["accuracy"]["with_dp"]["accuracy"].is_number());
    assert_eq!(report["hospitals"].as_array().unwrap().len(), 2);

    // A maximum set after approval: the agent refuses the visit that would pass it, with the
    // reason, and the job (`on_failure: fail`) fails on it.
    let mut strict = with_dp(&["h0", "h1"], 2, json!({ "target_epsilon": 3 }));
    strict["on_failure"] = json!("fail");
    let id = p.approved_job(strict).await;
    p.hospital_admins[1]
        .ok("PUT", &path(h1), Some(json!({ "max_epsilon": 1 })))
        .await;
    let failed = p.wait_job(id, Duration::from_secs(120)).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("over its maximum of 1"), "{error}");
    // The audit trail holds both settings.
    let audit = p.admin.ok("GET", "/v1/audit", None).await;
    let settings = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "hospital.max_epsilon")
        .count();
    assert_eq!(settings, 2, "{audit}");
    for r in running {
        r.task.abort();
    }
}

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn data_reports_are_checked_and_only_agents_send_them(pool: Pool) {
    let p = Platform::new(&pool, 1, &[]).await;
    let agent = p.enrol(0).await;
    let (status, body) = p.hospital_admins[0]
        .call(
            "PUT",
            "/v1/agent/data",
            Some(json!({ "train_samples": 1, "test_samples": 1 })),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    let c = agent.coordinator();
    c.report_data(120, 30).await.unwrap();
    // Without DP nothing is projected, and the job says why.
    let job = p
        .researcher
        .ok("POST", "/v1/jobs", Some(spec(&["h0"], 1)))
        .await;
    let shown = of(&job, "h0");
    assert_eq!(shown["train_samples"], 120);
    assert!(shown["projected_epsilon"].is_null());
    assert!(
        shown["projection_note"]
            .as_str()
            .unwrap()
            .contains("no differential privacy")
    );
}
