//! The extractors of the handlers: a JSON body, path and query parameters. Each refuses in the
//! API's JSON error shape, and each passes its text through the [`text`](super::text) check.

use std::net::{IpAddr, SocketAddr};

use axum::body::Bytes;
use axum::extract::{
    ConnectInfo, FromRequest, FromRequestParts, OptionalFromRequest, RawPathParams, Request,
};
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use medsplit_engine::api::FieldError;
use serde::de::DeserializeOwned;

use super::text;
use crate::AppState;
use crate::error::{Error, Result};

/// A JSON body: sent as `application/json`, parsed strictly, errors naming the field.
///
/// As `Option<Body<T>>`, a request without a body (and without `Content-Type`) gives `None`.
pub struct Body<T>(pub T);

/// Whether the request declares a JSON body (`application/json`, parameters allowed).
fn declares_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

impl<T: DeserializeOwned> FromRequest<AppState> for Body<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &AppState) -> Result<Self> {
        if !declares_json(req.headers()) {
            return Err(Error::not_json());
        }
        let bytes = Bytes::from_request(req, state).await?;
        parse_body(&bytes).map(Body)
    }
}

impl<T: DeserializeOwned> OptionalFromRequest<AppState> for Body<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &AppState) -> Result<Option<Self>> {
        if req.headers().contains_key(header::CONTENT_TYPE) {
            return <Self as FromRequest<AppState>>::from_request(req, state)
                .await
                .map(Some);
        }
        let bytes = Bytes::from_request(req, state).await?;
        if bytes.is_empty() {
            Ok(None)
        } else {
            Err(Error::not_json())
        }
    }
}

/// Parses a JSON body strictly (one value, nothing after it), refuses control and formatting
/// characters in every string ([`text`]), then reads it as `T`; errors name the field.
pub fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| Error::BadRequest(format!("invalid JSON body: {e}")))?;
    text::check_json(&value)?;
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let mut field = e.path().to_string();
        let message = e.inner().to_string();
        if let Some(missing) = message
            .strip_prefix("missing field `")
            .and_then(|m| m.split('`').next())
        {
            field = if field == "." {
                missing.to_string()
            } else {
                format!("{field}.{missing}")
            };
        }
        if field == "." || e.inner().is_syntax() || e.inner().is_eof() {
            Error::BadRequest(format!("invalid JSON body: {message}"))
        } else {
            Error::Invalid(FieldError::new(field, message))
        }
    })
}

/// Path parameters.
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send> FromRequestParts<AppState> for Path<T> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self> {
        for (name, value) in &RawPathParams::from_request_parts(parts, state).await? {
            text::check(name, value)?;
        }
        let axum::extract::Path(value) =
            axum::extract::Path::<T>::from_request_parts(parts, state).await?;
        Ok(Path(value))
    }
}

/// Query-string parameters.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned> FromRequestParts<AppState> for Query<T> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self> {
        let axum::extract::Query(pairs) =
            axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)?;
        for (name, value) in &pairs {
            let field: String = name.chars().filter(|c| !text::refused(*c)).collect();
            text::check(&field, name)?;
            text::check(&field, value)?;
        }
        let axum::extract::Query(value) = axum::extract::Query::<T>::try_from_uri(&parts.uri)?;
        Ok(Query(value))
    }
}

/// The client's address: the last one in the header that a reverse proxy sets
/// (`Settings::client_address_header`), or else the peer's.
pub struct ClientAddress(pub Option<IpAddr>);

impl FromRequestParts<AppState> for ClientAddress {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self> {
        if let Some(name) = &state.settings.client_address_header {
            let last = parts
                .headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .next_back()
                .map(str::trim);
            let ip = last.and_then(|a| {
                a.parse::<IpAddr>()
                    .ok()
                    .or_else(|| a.parse::<SocketAddr>().ok().map(|s| s.ip()))
            });
            return Ok(ClientAddress(ip));
        }
        let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>();
        Ok(ClientAddress(peer.map(|c| c.0.ip())))
    }
}
