//! Tokens for the requests that are not signed: cache uploads (the upload token) and an
//! operator's node-key pins (the admin token, or the upload token when there is none). A
//! token comes as `Authorization: Bearer TOKEN` or as the password of HTTP Basic (any user
//! name), which is what Nix sends from a netrc file.

use axum::http::{HeaderMap, StatusCode, header};
use base64::Engine;

use super::error::ApiError;

/// The token from `Authorization: Bearer T` or the password of `Authorization: Basic`.
fn given_token(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    if let Some(b) = v.strip_prefix("Bearer ") {
        return Some(b.trim().to_owned());
    }
    let basic = v.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(basic.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    Some(match text.split_once(':') {
        Some((_, password)) => password.to_owned(),
        None => text,
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Passes when the request carries `want`; otherwise 401 with `refusal` as the message.
pub(super) fn check(headers: &HeaderMap, want: &str, refusal: &str) -> Result<(), ApiError> {
    if given_token(headers).is_some_and(|g| constant_time_eq(g.as_bytes(), want.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            refusal,
        ))
    }
}
