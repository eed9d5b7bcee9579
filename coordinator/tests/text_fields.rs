//! Every text field of every operation in openapi.json refuses control and formatting
//! characters with 422 naming the field. The fields come from the document, so that a field
//! added to the API is covered without touching this test.

mod common;

use common::Platform;
use serde_json::{Value, json};
use sqlx::PgPool as Pool;

/// Text the API must refuse wherever it appears: NUL (which Postgres cannot store), other C0
/// and C1 controls, bidirectional overrides and isolates, zero-width characters, the BOM and
/// the line separator.
const BAD: [&str; 10] = [
    "\u{0}",
    "a\u{0}b",
    "tab\there",
    "\u{1b}[31mred",
    "del\u{7f}",
    "next\u{85}line",
    "\u{202e}\u{200b}evil",
    "\u{2066}isolate\u{2069}",
    "\u{feff}bom",
    "line\u{2028}sep",
];

#[derive(Clone, Debug)]
enum Seg {
    Key(String),
    Index,
}

fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(r) => {
            let pointer = r.strip_prefix('#').expect("local $ref");
            resolve(doc, doc.pointer(pointer).expect("$ref resolves"))
        }
        None => schema,
    }
}

fn has_type(schema: &Value, t: &str) -> bool {
    match &schema["type"] {
        Value::String(s) => s == t,
        Value::Array(ts) => ts.iter().any(|x| x == t),
        _ => false,
    }
}

/// Paths of every string-valued field a request body of `schema` may hold.
fn text_fields(doc: &Value, schema: &Value, path: &mut Vec<Seg>, out: &mut Vec<Vec<Seg>>) {
    let schema = resolve(doc, schema);
    for key in ["allOf", "oneOf", "anyOf"] {
        for sub in schema[key].as_array().into_iter().flatten() {
            text_fields(doc, sub, path, out);
        }
    }
    let string_enum = schema["enum"]
        .as_array()
        .is_some_and(|e| e.iter().any(Value::is_string));
    if has_type(schema, "string") || string_enum {
        out.push(path.clone());
    }
    if let Some(props) = schema["properties"].as_object() {
        for (name, sub) in props {
            path.push(Seg::Key(name.clone()));
            text_fields(doc, sub, path, out);
            path.pop();
        }
    }
    if has_type(schema, "array") {
        path.push(Seg::Index);
        text_fields(doc, &schema["items"], path, out);
        path.pop();
    }
}

/// The field as the API names it: `name`, `hospitals[0]`, `server_optimizer.kind`.
fn field_name(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) if out.is_empty() => out.push_str(k),
            Seg::Key(k) => out.push_str(&format!(".{k}")),
            Seg::Index => out.push_str("[0]"),
        }
    }
    out
}

/// A body that holds `text` at `path` and nothing else.
fn body_with(path: &[Seg], text: &str) -> Value {
    match path.split_first() {
        None => Value::String(text.into()),
        Some((Seg::Key(k), rest)) => json!({ k.as_str(): body_with(rest, text) }),
        Some((Seg::Index, rest)) => json!([body_with(rest, text)]),
    }
}

#[sqlx::test(migrator = "medsplit_coordinator::MIGRATOR")]
async fn every_text_field_refuses_control_and_formatting_characters(pool: Pool) {
    let p = Platform::new(&pool, 1, &[]).await;
    let doc: Value = serde_json::from_str(include_str!("../openapi.json")).unwrap();
    let token = p.admin.token.clone().unwrap();
    let mut covered = Vec::new();
    for (route, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if !["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                continue;
            }
            let url_path = route.replace("{id}", "1");
            // (field, query string, body) for each text field of the operation.
            let mut cases: Vec<(String, String, Option<Vec<Seg>>)> = Vec::new();
            let body = &op["requestBody"]["content"]["application/json"]["schema"];
            if !body.is_null() {
                let mut fields = Vec::new();
                text_fields(&doc, body, &mut Vec::new(), &mut fields);
                for f in fields {
                    cases.push((field_name(&f), String::new(), Some(f)));
                }
            }
            for param in op["parameters"].as_array().into_iter().flatten() {
                let param = resolve(&doc, param);
                if param["in"] == "query" && has_type(resolve(&doc, &param["schema"]), "string") {
                    let name = param["name"].as_str().unwrap().to_string();
                    cases.push((name.clone(), name, None));
                }
            }
            for (field, query_name, body_path) in cases {
                for bad in BAD {
                    let mut url = format!("{}{url_path}", p.server.url);
                    if !query_name.is_empty() {
                        let encoded: String = bad.bytes().map(|b| format!("%{b:02X}")).collect();
                        url.push_str(&format!("?{query_name}={encoded}"));
                    }
                    let mut req = p
                        .admin
                        .http
                        .request(method.to_uppercase().parse().unwrap(), &url)
                        .bearer_auth(&token);
                    if let Some(path) = &body_path {
                        req = req.json(&body_with(path, bad));
                    }
                    let resp = req.send().await.unwrap();
                    let status = resp.status().as_u16();
                    let text = resp.text().await.unwrap();
                    let v: Value = serde_json::from_str(&text)
                        .unwrap_or_else(|_| panic!("{method} {route} {field}: not JSON: {text}"));
                    assert_eq!(
                        (status, v["field"].as_str()),
                        (422, Some(field.as_str())),
                        "{method} {route} {field} = {bad:?}: {v}"
                    );
                    assert!(
                        v["message"]
                            .as_str()
                            .is_some_and(|m| m.contains("control or formatting")),
                        "{method} {route} {field}: {v}"
                    );
                }
                covered.push(format!("{method} {route} {field}"));
            }
        }
    }
    // The document was read: every operation that takes text is covered.
    for expected in [
        "post /v1/auth/login email",
        "post /v1/auth/login password",
        "post /v1/auth/session email",
        "post /v1/users email",
        "post /v1/hospitals name",
        "post /v1/agents/enrol version",
        "post /v1/agents/token credential",
        "post /v1/agent/heartbeat version",
        "post /v1/visits/{id}/release reason",
        "post /v1/jobs name",
        "post /v1/jobs hospitals[0]",
        "post /v1/jobs server_optimizer.kind",
        "post /v1/jobs model",
        "post /v1/jobs model.preset",
        "post /v1/jobs class_weights",
        "post /v1/jobs labels",
        "post /v1/jobs preprocessing",
        "post /v1/jobs preprocessing.preset",
        "post /v1/jobs preprocessing.lead",
        "post /v1/jobs preprocessing.baseline",
        "post /v1/jobs/{id}/consent decision",
    ] {
        assert!(
            covered.iter().any(|c| c == expected),
            "{expected} not covered: {covered:?}"
        );
    }
    let stored: i64 = sqlx::query_scalar(
        "select (select count(*) from jobs) + (select count(*) from hospitals where name <> 'h0')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(stored, 0, "nothing was stored");
}
