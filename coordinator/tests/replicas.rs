//! Several coordinator processes (replicas) on one database, alone and behind a real HAProxy:
//! a new replica cancels nothing; a revocation, a cancellation or a hospital's disabling through
//! one replica ends the session on another within a second; a killed replica's visit runs again
//! on the other within five seconds; a rolling restart loses no completed visit.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use medsplit_agent::client::Session;
use serde_json::{Value, json};
use sqlx::PgPool as Pool;
use tokio_tungstenite::tungstenite::Message;

const LONG_LEASE: [&str; 2] = ["--lease-seconds", "30"];

async fn count(pool: &Pool, sql: &str, id: i64) -> i64 {
    sqlx::query_scalar(sql)
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The close code that ends `ws`, and how long after `since` it came.
async fn closed(ws: &mut Session, since: Instant) -> (u16, Duration) {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(f))))) => return (u16::from(f.code), since.elapsed()),
            Ok(Some(Ok(_))) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// Nothing arrives on `ws` for a moment: the session is still open.
async fn still_open(ws: &mut Session) {
    let got = tokio::time::timeout(Duration::from_millis(300), ws.next()).await;
    assert!(got.is_err(), "the session ended: {got:?}");
}

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn a_new_replica_cancels_nothing_and_stops_through_it_reach_sessions_on_the_first(
    pool: Pool,
) {
    let p = Platform::new(&pool, 3, &LONG_LEASE).await;
    let agents: Vec<_> = futures_util::future::join_all((0..3).map(|i| p.enrol(i))).await;
    let mut jobs = Vec::new();
    let mut sessions = Vec::new();
    for (i, a) in agents.iter().enumerate() {
        let job = p.approved_job(spec(&[&format!("h{i}")], 1)).await;
        let c = a.coordinator();
        let v = c.claim(Duration::from_secs(5)).await.unwrap().unwrap();
        assert_eq!(v.job_id, job);
        sessions.push(c.session(v.visit_id, v.attempt).await.unwrap());
        jobs.push(job);
    }

    // A second replica starts, and outlives the replica timeout: the sessions on the first go on.
    let b = Server::start(&p.server.db_url, 0, &LONG_LEASE).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    for ws in &mut sessions {
        still_open(ws).await;
    }
    for &job in &jobs {
        let running = count(
            &pool,
            "select count(*) from visits where job_id = $1 and status = 'running' and attempt = 1",
            job,
        )
        .await;
        assert_eq!(running, 1);
    }
    let requeued: i64 =
        sqlx::query_scalar("select count(*) from job_events where kind = 'visit.requeued'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(requeued, 0);

    // Through the second replica: revoke h0's agent, cancel h1's job, disable h2.
    let admin_b = b.api().login("admin-h0@example.org").await;
    let researcher_b = b.api().login("researcher@example.org").await;
    let platform_admin_b = b.api().login("admin@example.org").await;
    let actions: [(&Api, String, u16); 3] = [
        (
            &admin_b,
            format!("/v1/agents/{}/revoke", agents[0].state.identity.agent_id),
            4403,
        ),
        (&researcher_b, format!("/v1/jobs/{}/cancel", jobs[1]), 4409),
        (
            &platform_admin_b,
            format!("/v1/hospitals/{}/disable", p.hospital_ids[2]),
            4403,
        ),
    ];
    for (i, (api, path, code)) in actions.iter().enumerate() {
        let since = Instant::now();
        let (status, body) = api.post(path, json!({})).await;
        assert!(status == 200 || status == 204, "{path}: {status} {body}");
        let (got, after) = closed(&mut sessions[i], since).await;
        assert_eq!(got, *code, "{path}");
        eprintln!("{path} through replica B: session on A closed with {got} after {after:?}");
        assert!(
            after < Duration::from_secs(1),
            "{path}: the session on the other replica ended {after:?} later"
        );
        // The others are untouched.
        for later in &mut sessions[i + 1..] {
            still_open(later).await;
        }
    }
}

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn a_session_whose_visit_was_taken_unannounced_ends_at_the_next_check(pool: Pool) {
    let p = Platform::new(&pool, 1, &LONG_LEASE).await;
    let a = p.enrol(0).await;
    p.approved_job(spec(&["h0"], 1)).await;
    let c = a.coordinator();
    let v = c.claim(Duration::from_secs(5)).await.unwrap().unwrap();
    let mut ws = c.session(v.visit_id, v.attempt).await.unwrap();
    still_open(&mut ws).await;
    // A change that sends no notification (as one made while a replica's LISTEN connection was
    // down): the periodic check of open sessions finds it.
    let since = Instant::now();
    sqlx::query("update visits set status = 'queued', agent_id = null where id = $1")
        .bind(v.visit_id)
        .execute(&pool)
        .await
        .unwrap();
    let (code, after) = closed(&mut ws, since).await;
    assert_eq!(code, 4409);
    eprintln!("unannounced change: session closed after {after:?}");
    assert!(after < Duration::from_secs(3), "ended {after:?} later");
}

/// Two replicas behind HAProxy, three hospitals' agents reaching them through it, and a job of
/// `rounds` rounds over the three with visits long enough to interrupt.
struct Cluster {
    p: Platform,
    second: Server,
    balancer: medsplit_balancer::Balancer,
    job: i64,
    running: Vec<Running>,
}

impl Cluster {
    async fn start(pool: &Pool, extra: &[&str], beats: usize, rounds: u32) -> Cluster {
        let p = Platform::new(pool, 3, extra).await;
        let second = Server::start(&p.server.db_url, 0, extra).await;
        let balancer = balancer(&[p.server.port, second.port]).await;
        let mut running = Vec::new();
        for i in 0..3 {
            let mut a = p.enrol(i).await.through(&balancer.url);
            a.data = std::sync::Arc::new(synthetic_data(beats, i as u64));
            running.push(a.spawn());
        }
        let mut s = spec(&["h0", "h1", "h2"], rounds);
        s["batch_size"] = json!(2);
        let job = p.approved_job(s).await;
        Cluster {
            p,
            second,
            balancer,
            job,
            running,
        }
    }

    /// The running visit once it is training: (id, attempt, hosting replica's port).
    async fn training(&self, pool: &Pool, limit: Duration) -> (i64, i32, u16) {
        eventually(limit, "a visit training", || async {
            let row: Option<(i64, i32, Option<String>)> = sqlx::query_as(
                "select v.id, v.attempt, r.address from visits v join replicas r on r.id = v.replica_id
                 where v.job_id = $1 and v.status = 'running' and v.progress > 0",
            )
            .bind(self.job)
            .fetch_optional(pool)
            .await
            .unwrap();
            let (id, attempt, address) = row?;
            let port = address?.rsplit(':').next().unwrap().parse().unwrap();
            Some((id, attempt, port))
        })
        .await
    }

    fn replica(&mut self, port: u16) -> &mut Server {
        if self.p.server.port == port {
            &mut self.p.server
        } else {
            assert_eq!(self.second.port, port);
            &mut self.second
        }
    }

    /// The job completes, every visit exactly once.
    async fn completes(self, pool: &Pool, visits: usize) {
        let job = self.p.wait_job(self.job, Duration::from_secs(300)).await;
        assert_eq!(job["status"], "completed", "{job}");
        let completed: Vec<i64> = sqlx::query_scalar(
            "select (detail->>'visit_id')::bigint from job_events
             where job_id = $1 and kind = 'visit.completed' order by id",
        )
        .bind(self.job)
        .fetch_all(pool)
        .await
        .unwrap();
        let mut unique = completed.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(
            (completed.len(), unique.len()),
            (visits, visits),
            "{completed:?}"
        );
        for r in self.running {
            r.stop.send_replace(true);
            let _ = r.task.await;
        }
        drop(self.balancer);
    }
}

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn a_replica_killed_mid_visit_has_its_visit_running_on_the_other_within_five_seconds(
    pool: Pool,
) {
    let mut cluster = Cluster::start(&pool, &LONG_LEASE, 3000, 1).await;
    let (visit, attempt, port) = cluster.training(&pool, Duration::from_secs(120)).await;
    let killed = Instant::now();
    cluster.replica(port).kill().await;
    // The agent's session is reset; it gives the visit back through the balancer and claims it
    // again on the live replica.
    let again = eventually(
        Duration::from_secs(30),
        "the visit running again",
        || async {
            let row: Option<(i32, Option<String>)> = sqlx::query_as(
            "select v.attempt, r.address from visits v left join replicas r on r.id = v.replica_id
             where v.id = $1 and v.status = 'running'",
        )
        .bind(visit)
        .fetch_optional(&pool)
        .await
        .unwrap();
            let (a, address) = row?;
            let address = address.filter(|_| a > attempt)?;
            assert!(!address.ends_with(&format!(":{port}")), "{address}");
            Some(killed.elapsed())
        },
    )
    .await;
    eprintln!("replica killed: its visit ran again on the other after {again:?}");
    assert!(
        again < Duration::from_secs(5),
        "the visit ran again {again:?} after the kill"
    );
    cluster.completes(&pool, 3).await;
}

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn a_rolling_restart_of_every_replica_loses_no_completed_visit(pool: Pool) {
    let extra = ["--lease-seconds", "30", "--drain-seconds", "1"];
    let mut cluster = Cluster::start(&pool, &extra, 1500, 2).await;
    for port in [cluster.p.server.port, cluster.second.port] {
        cluster.training(&pool, Duration::from_secs(120)).await;
        let server = cluster.replica(port);
        let status = server.terminate(Duration::from_secs(30)).await;
        assert!(status.success(), "{status}");
        *server = Server::start(&server.db_url.clone(), port, &extra).await;
    }
    let job = cluster.job;
    cluster.completes(&pool, 6).await;
    // Visits handed back by a draining replica were re-queued without counting a failure.
    for e in &requeued_events(&pool, job).await {
        assert_eq!(e["reason"], "coordinator replica shut down", "{e}");
    }
}

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn a_dashboard_session_works_on_every_replica_behind_the_balancer(pool: Pool) {
    let p = Platform::new(&pool, 0, &LONG_LEASE).await;
    let second = Server::start(&p.server.db_url, 0, &LONG_LEASE).await;
    let balancer = balancer(&[p.server.port, second.port]).await;
    let http = reqwest::Client::new();
    let login = http
        .post(format!("{}/v1/auth/session", balancer.url))
        .header("origin", &balancer.url)
        .json(&json!({ "email": "admin@example.org", "password": PASSWORD }))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200);
    let cookie = login
        .headers()
        .get("set-cookie")
        .unwrap()
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let me: Value = login.json().await.unwrap();
    let csrf = me["csrf_token"].as_str().unwrap().to_string();
    // Round robin: consecutive requests reach both replicas; the session is a row in Postgres.
    let me = |cookie: String| {
        let http = http.clone();
        let url = format!("{}/v1/me", balancer.url);
        async move {
            let me: Value = http
                .get(url)
                .header("cookie", cookie)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            me["authenticated"].as_bool().unwrap()
        }
    };
    for _ in 0..4 {
        assert!(me(cookie.clone()).await);
    }
    let logout = http
        .delete(format!("{}/v1/auth/session", balancer.url))
        .header("origin", &balancer.url)
        .header("cookie", &cookie)
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert!(logout.status().is_success(), "{}", logout.status());
    for _ in 0..4 {
        assert!(!me(cookie.clone()).await, "logged out on every replica");
    }
}
