//! Failed log-ins are throttled per account and per client address: 429 with Retry-After,
//! the right password included, and each lockout in the audit trail.

mod common;

use common::{PASSWORD, Platform};
use serde_json::{Value, json};
use sqlx::PgPool as Pool;

/// Status, Retry-After and body of a log-in.
async fn login(p: &Platform, path: &str, email: &str, password: &str) -> (u16, Option<u64>, Value) {
    let resp = p
        .admin
        .http
        .post(format!("{}{path}", p.server.url))
        .json(&json!({ "email": email, "password": password }))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    (status, retry, resp.json().await.unwrap())
}

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn failed_logins_are_throttled_per_account_and_per_address(pool: Pool) {
    let p = Platform::new(&pool, 1, &[]).await;
    let researcher = "researcher@example.org";
    // Per account: five failures, then a lockout that the right password does not lift.
    for _ in 0..5 {
        let (status, _, v) = login(&p, "/v1/auth/login", researcher, "wrong password").await;
        assert_eq!(status, 401, "{v}");
    }
    let (status, retry, v) = login(&p, "/v1/auth/login", researcher, "wrong password").await;
    assert_eq!(status, 429, "{v}");
    assert!(
        retry.is_some_and(|s| (1..=60).contains(&s)),
        "Retry-After {retry:?}"
    );
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains("try again")),
        "{v}"
    );
    let (status, retry, v) = login(&p, "/v1/auth/login", researcher, PASSWORD).await;
    assert_eq!((status, retry.is_some()), (429, true), "{v}");
    let (status, _, v) = login(&p, "/v1/auth/session", "Researcher@Example.org", PASSWORD).await;
    assert_eq!(
        status, 429,
        "the dashboard's log-in shares the account's count: {v}"
    );
    // Other accounts from the same address are not locked out by that.
    let (status, _, v) = login(&p, "/v1/auth/login", "admin-h0@example.org", PASSWORD).await;
    assert_eq!(status, 200, "{v}");

    // Per address: twenty failures in all (six so far), whatever the accounts.
    for i in 0..14 {
        let (status, _, v) = login(
            &p,
            "/v1/auth/login",
            &format!("nobody{i}@example.org"),
            "guess",
        )
        .await;
        assert_eq!(status, 401, "{v}");
    }
    let (status, retry, v) = login(&p, "/v1/auth/login", "nobody@example.org", "guess").await;
    assert_eq!((status, retry.is_some()), (429, true), "{v}");
    let (status, _, v) = login(&p, "/v1/auth/login", "admin-h0@example.org", PASSWORD).await;
    assert_eq!(status, 429, "the address is locked out: {v}");

    // Each lockout is audited once, when it starts.
    let lockouts: Vec<(String, String, String)> = sqlx::query_as(
        "select actor, target, detail->>'scope' from audit_log
         where action = 'login.lockout' order by id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        lockouts,
        vec![
            (
                "client:127.0.0.1".to_string(),
                "account:researcher@example.org".to_string(),
                "account".to_string()
            ),
            (
                "client:127.0.0.1".to_string(),
                "address:127.0.0.1".to_string(),
                "address".to_string()
            ),
        ]
    );
}
