//! The dashboard's HTTP surface: its files, the cookie session and CSRF protection.

mod common;

use common::{PASSWORD, Platform};
use reqwest::header::{CONTENT_SECURITY_POLICY, CONTENT_TYPE, COOKIE, ORIGIN, SET_COOKIE};
use serde_json::{Value, json};
use sqlx::PgPool;

async fn text(resp: reqwest::Response) -> (u16, String) {
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn the_dashboard_is_served_from_the_binary(pool: PgPool) {
    let p = Platform::new(&pool, 0, &[]).await;
    let http = reqwest::Client::new();
    let base = &p.server.url;

    // Every page path gets index.html, with a strict content security policy.
    for path in ["/", "/login", "/jobs/42", "/hospital/jobs"] {
        let resp = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(resp.headers()[CONTENT_TYPE], "text/html; charset=utf-8");
        let csp = resp.headers()[CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
        let body = resp.text().await.unwrap();
        assert_eq!(body, include_str!("../../web/index.html"));
    }
    let js = http
        .get(format!("{base}/assets/app.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(js.headers()[CONTENT_TYPE], "text/javascript; charset=utf-8");
    let etag = js.headers()["etag"].clone();
    assert_eq!(js.text().await.unwrap(), include_str!("../../web/app.js"));
    let again = http
        .get(format!("{base}/assets/app.js"))
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);

    let missing = http
        .get(format!("{base}/assets/nope.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    // Unknown API routes stay JSON.
    let (status, body) = text(http.get(format!("{base}/v1/nope")).send().await.unwrap()).await;
    assert_eq!(status, 404);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"],
        "route not found"
    );
    let post = http.post(format!("{base}/jobs")).send().await.unwrap();
    assert_eq!(post.status(), 405);
}

/// The job form checks the API's ranges before it submits (a 4xx would be a console error in
/// the browser), so its table must be the API's.
#[test]
fn the_job_form_checks_the_same_ranges_as_the_api() {
    let js = include_str!("../../web/app.js");
    let table = js
        .split("const INT_FIELDS = [")
        .nth(1)
        .and_then(|rest| rest.split("];").next())
        .expect("INT_FIELDS in app.js");
    let mut found = Vec::new();
    for line in table.lines().map(str::trim).filter(|l| l.starts_with("['")) {
        // ['rounds', 'job-rounds', 'Rounds', 3, 1, 1000, 'hint'],
        let cells: Vec<&str> = line.split(", ").collect();
        let name = cells[0].trim_start_matches("['").trim_end_matches('\'');
        let number = |i: usize| cells[i].parse::<u32>().unwrap_or_else(|_| panic!("{line}"));
        found.push((name.to_string(), number(4), number(5)));
    }
    let expected: Vec<_> = medsplit_engine::api::JobSpec::RANGES
        .iter()
        .map(|&(f, lo, hi)| (f.to_string(), lo, hi))
        .collect();
    assert_eq!(found, expected);
}

/// The job form refuses the seeds the API refuses, before they are rounded to a JavaScript
/// number.
#[test]
fn the_job_form_knows_the_largest_seed() {
    let js = include_str!("../../web/app.js");
    let line = js
        .lines()
        .find(|l| l.starts_with("const MAX_SEED = "))
        .expect("MAX_SEED in app.js");
    let value = line
        .trim_start_matches("const MAX_SEED = ")
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap();
    assert_eq!(
        value.parse::<u64>().unwrap(),
        medsplit_engine::api::JobSpec::MAX_SEED
    );
}

/// The cookie of a `Set-Cookie` header, and its attributes.
fn session_cookie(resp: &reqwest::Response) -> (String, String) {
    let set = resp.headers()[SET_COOKIE].to_str().unwrap().to_string();
    let pair = set.split(';').next().unwrap().to_string();
    (pair, set)
}

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn cookie_sessions_need_the_csrf_token_and_end_at_logout(pool: PgPool) {
    let p = Platform::new(&pool, 1, &[]).await;
    let http = reqwest::Client::new();
    let base = p.server.url.clone();
    let url = |path: &str| format!("{base}{path}");
    let login = json!({ "email": "admin@example.org", "password": PASSWORD });

    // Without a session /v1/me says so (200, so the page can ask before logging in).
    let me: Value = http
        .get(url("/v1/me"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me, json!({ "authenticated": false }));

    // Wrong password: 401 and no cookie.
    let bad = http
        .post(url("/v1/auth/session"))
        .json(&json!({ "email": "admin@example.org", "password": "wrong password!!" }))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);
    assert!(bad.headers().get(SET_COOKIE).is_none());

    // A log-in from another site is refused.
    let cross = http
        .post(url("/v1/auth/session"))
        .header(ORIGIN, "https://evil.example")
        .json(&login)
        .send()
        .await
        .unwrap();
    assert_eq!(cross.status(), 403);

    let resp = http
        .post(url("/v1/auth/session"))
        .header(ORIGIN, &base)
        .json(&login)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (cookie, set) = session_cookie(&resp);
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(set.contains(attr), "{set} lacks {attr}");
    }
    assert!(
        !set.contains("Secure"),
        "plain-HTTP coordinators cannot set Secure cookies"
    );
    let me: Value = resp.json().await.unwrap();
    assert_eq!(me["role"], "platform_admin");
    assert_eq!(me["email"], "admin@example.org");
    let csrf = me["csrf_token"].as_str().unwrap().to_string();
    let admin_id = me["id"].as_i64().unwrap();
    // The cookie's secret is not the CSRF token, and the database holds only its hash.
    let secret = cookie.split_once('=').unwrap().1;
    assert_ne!(secret, csrf);
    let stored: i64 = sqlx::query_scalar(
        "select count(*) from web_sessions where token_hash = sha256($1::bytea)",
    )
    .bind(secret.as_bytes())
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(stored, 1);

    // Reads need only the cookie.
    let me: Value = http
        .get(url("/v1/me"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["csrf_token"], csrf.as_str());
    let hospitals = http
        .get(url("/v1/hospitals"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(hospitals.status(), 200);

    // Changes need the CSRF token, and a browser's Origin must be this coordinator.
    let create = |token: Option<&str>, origin: Option<&str>, name: &str| {
        let mut req = http
            .post(url("/v1/hospitals"))
            .header(COOKIE, &cookie)
            .json(&json!({ "name": name }));
        if let Some(t) = token {
            req = req.header("x-csrf-token", t);
        }
        if let Some(o) = origin {
            req = req.header(ORIGIN, o);
        }
        req.send()
    };
    let (status, body) = text(create(None, None, "a").await.unwrap()).await;
    assert_eq!((status, body.contains("CSRF")), (403, true), "{body}");
    assert_eq!(
        create(Some("forged"), None, "a").await.unwrap().status(),
        403
    );
    let evil = create(Some(&csrf), Some("https://evil.example"), "a")
        .await
        .unwrap();
    assert_eq!(evil.status(), 403);
    let ok = create(Some(&csrf), Some(&base), "from-the-dashboard")
        .await
        .unwrap();
    assert_eq!(ok.status(), 201);
    let audit = p.admin.ok("GET", "/v1/audit", None).await;
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(actions.contains(&"session.create") && actions.contains(&"hospital.create"));

    // A disabled user's session stops working at once.
    let ward = http
        .post(url("/v1/auth/session"))
        .json(&json!({ "email": "admin-h0@example.org", "password": PASSWORD }))
        .send()
        .await
        .unwrap();
    let (ward_cookie, _) = session_cookie(&ward);
    let ward_id = ward.json::<Value>().await.unwrap()["id"].as_i64().unwrap();
    p.admin
        .ok("POST", &format!("/v1/users/{ward_id}/disable"), None)
        .await;
    let agents = http
        .get(url("/v1/agents"))
        .header(COOKIE, &ward_cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(agents.status(), 401);

    // Logging out clears the cookie and ends the session on the server too.
    let out = http
        .delete(url("/v1/auth/session"))
        .header(COOKIE, &cookie)
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), 204);
    assert!(
        out.headers()[SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    let after = http
        .get(url("/v1/hospitals"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), 401);
    let left: i64 = sqlx::query_scalar("select count(*) from web_sessions where user_id = $1")
        .bind(admin_id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
}
