//! The dashboard: the files of `web/`, built into the binary. Every path outside the API gets
//! `index.html` (the page routes in the browser); the page talks to the same REST API as every
//! other client, authenticated by its session cookie.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::AppState;
use crate::error::Error;

struct Asset {
    /// The file's name in `web/`.
    file: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($file:literal, $type:literal) => {
        Asset {
            file: $file,
            content_type: $type,
            body: include_bytes!(concat!("../../web/", $file)),
        }
    };
}

const INDEX: Asset = asset!("index.html", "text/html; charset=utf-8");

/// Served under `/assets/`.
const ASSETS: [Asset; 3] = [
    asset!("app.js", "text/javascript; charset=utf-8"),
    asset!("app.css", "text/css; charset=utf-8"),
    asset!("favicon.svg", "image/svg+xml"),
];

/// Only this origin's own files run; nothing inline, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
    style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; \
    base-uri 'none'; form-action 'self'";

/// Fallback of the router: the dashboard's files, or a JSON 404 under `/v1/`.
pub async fn serve(
    State(s): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let path = uri.path();
    if path == "/v1" || path.starts_with("/v1/") {
        return Error::NotFound("route").into_response();
    }
    if method != Method::GET && method != Method::HEAD {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "GET, HEAD")],
        )
            .into_response();
    }
    let asset = match path.strip_prefix("/assets/") {
        Some(name) => match ASSETS.iter().find(|a| a.file == name) {
            Some(a) => a,
            None => return (StatusCode::NOT_FOUND, "no such file").into_response(),
        },
        None => &INDEX,
    };
    let body = match &s.settings.web_dir {
        Some(dir) => match tokio::fs::read(dir.join(asset.file)).await {
            Ok(bytes) => bytes.into(),
            Err(e) => return Error::Internal(format!("{}: {e}", asset.file)).into_response(),
        },
        None => axum::body::Bytes::from_static(asset.body),
    };
    let etag = format!("\"{}\"", hex(&Sha256::digest(&body)[..12]));
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes());
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        body.into_response()
    };
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::ETAG, HeaderValue::from_str(&etag).expect("hex"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    response
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
