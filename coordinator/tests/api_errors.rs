//! Every error the API gives is the JSON error shape, whatever refused the request: a
//! handler, an extractor, the router or a layer; and JSON bodies are parsed strictly.

mod common;

use common::Platform;
use serde_json::{Value, json};
use sqlx::PgPool as Pool;

/// Sends a request and returns its status, `Content-Type` and JSON body (panics if the body is
/// not JSON).
async fn send(req: reqwest::RequestBuilder) -> (u16, String, Value) {
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("{status} answered with a body that is not JSON: {text:?}"));
    (status, content_type, body)
}

/// POSTs a JSON body of just over 1 MiB to `path` on `base` (`http://host:port`); the status
/// and the JSON body of the answer.
async fn oversized_post(base: &str, path: &str, token: &str) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = base.trim_start_matches("http://");
    let stream = tokio::net::TcpStream::connect(host).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let body = format!(r#"{{"name": "{}"}}"#, "x".repeat((1 << 20) + 64));
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let write = tokio::spawn(async move {
        // A refusal may close the connection mid-body: that is the point, not an error.
        let _ = writer.write_all(head.as_bytes()).await;
        let _ = writer.write_all(body.as_bytes()).await;
        let _ = writer.shutdown().await;
    });
    let mut answer = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        let mut buf = [0u8; 8192];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
            // Stop once the headers and the whole announced body are in.
            if let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&answer[..end]).to_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                if length.is_some_and(|n| answer.len() >= end + 4 + n) {
                    break;
                }
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer to the oversized body");
    write.abort();
    let text = String::from_utf8_lossy(&answer).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    assert!(
        head.to_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    let body = serde_json::from_str(body)
        .unwrap_or_else(|_| panic!("{status} answered with a body that is not JSON: {body:?}"));
    (status, body)
}

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn every_error_is_json(pool: Pool) {
    let p = Platform::new(&pool, 1, &[]).await;
    let url = |path: &str| format!("{}{path}", p.server.url);
    let http = &p.admin.http;
    let admin = p.admin.token.as_deref().unwrap();
    let hospital_admin = p.hospital_admins[0].token.as_deref().unwrap();
    let researcher = p.researcher.token.as_deref().unwrap();
    let job = r#"{"name": "j", "hospitals": ["h0"]}"#;
    let cases: Vec<(&str, reqwest::RequestBuilder, u16)> = vec![
        (
            "a negative number where a u64 is expected",
            http.post(url("/v1/enrolment-tokens"))
                .bearer_auth(hospital_admin)
                .json(&json!({ "ttl_seconds": -1 })),
            422,
        ),
        (
            "trailing garbage after the body",
            http.post(url("/v1/jobs"))
                .bearer_auth(researcher)
                .header("content-type", "application/json")
                .body(format!("{job}xx")),
            400,
        ),
        (
            "a second JSON value after the body",
            http.post(url("/v1/jobs"))
                .bearer_auth(researcher)
                .header("content-type", "application/json")
                .body(format!("{job} {job}")),
            400,
        ),
        (
            "a JSON body sent as text/plain",
            http.post(url("/v1/jobs"))
                .bearer_auth(researcher)
                .header("content-type", "text/plain")
                .body(job),
            415,
        ),
        (
            "a JSON body without Content-Type",
            http.post(url("/v1/jobs")).bearer_auth(researcher).body(job),
            415,
        ),
        (
            "a form posted to the enrolment tokens",
            http.post(url("/v1/enrolment-tokens"))
                .bearer_auth(hospital_admin)
                .header("content-type", "application/x-www-form-urlencoded")
                .body("ttl_seconds=5"),
            415,
        ),
        (
            "a method the route does not have",
            http.delete(url("/v1/hospitals")).bearer_auth(admin),
            405,
        ),
        (
            "a method the dashboard's pages do not have",
            http.post(url("/jobs")),
            405,
        ),
        (
            "a route that does not exist",
            http.get(url("/v1/nowhere")),
            404,
        ),
        (
            "a dashboard asset that does not exist",
            http.get(url("/assets/nothing.js")),
            404,
        ),
        (
            "a path parameter that is not a number",
            http.get(url("/v1/jobs/abc")).bearer_auth(admin),
            400,
        ),
        (
            "a query parameter that is not a number",
            http.get(url("/v1/audit?limit=abc")).bearer_auth(admin),
            400,
        ),
        (
            "a training session without its attempt",
            http.get(url("/v1/visits/1/session")).bearer_auth(admin),
            400,
        ),
        (
            "a training session that is not a WebSocket upgrade",
            http.get(url("/v1/visits/1/session?attempt=1"))
                .bearer_auth(admin),
            400,
        ),
        (
            "a body that is not JSON",
            http.post(url("/v1/auth/login"))
                .header("content-type", "application/json")
                .body("{ not json"),
            400,
        ),
    ];
    for (what, req, expected) in cases {
        let (status, content_type, body) = send(req).await;
        assert_eq!(status, expected, "{what}: {body}");
        assert!(
            content_type.starts_with("application/json"),
            "{what}: Content-Type {content_type:?}"
        );
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}: {body}"
        );
        if status == 422 {
            assert_eq!(body["field"], "ttl_seconds", "{what}: {body}");
        }
    }
    // A body over the 1 MiB limit. The server may answer and close before the client has
    // written the whole body, so the request goes over a raw connection whose writer ignores a
    // closed pipe while the reader waits for the answer.
    let (status, body) = oversized_post(&p.server.url, "/v1/hospitals", admin).await;
    assert_eq!(status, 413, "{body}");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "413: {body}"
    );
    let resp = http
        .delete(url("/v1/hospitals"))
        .bearer_auth(admin)
        .send()
        .await
        .unwrap();
    let allow = resp.headers().get("allow").map(|v| v.to_str().unwrap());
    assert!(
        allow.is_some_and(|a| a.contains("POST")),
        "405 says what is allowed: {allow:?}"
    );
    let stored: i64 = sqlx::query_scalar("select count(*) from jobs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, 0, "no job was created");
    // Without a body (and without Content-Type), an enrolment token gets the default validity.
    let (status, _, v) = send(
        http.post(url("/v1/enrolment-tokens"))
            .bearer_auth(hospital_admin),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    // A JSON media type with parameters is JSON.
    let (status, _, v) = send(
        http.post(url("/v1/jobs"))
            .bearer_auth(researcher)
            .header("content-type", "Application/JSON; charset=utf-8")
            .body(job),
    )
    .await;
    assert_eq!(status, 201, "{v}");
}
