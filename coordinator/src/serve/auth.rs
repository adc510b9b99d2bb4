//! Tokens for the requests that are not signed: cache uploads (the upload token), an
//! operator's node-key pins (the admin token, or the upload token when there is none), and
//! reading the fleet's data (the read token, or either of the others). A
//! token comes as `Authorization: Bearer TOKEN` or as the password of HTTP Basic (any user
//! name), which is what Nix sends from a netrc file.

use axum::http::{HeaderMap, StatusCode, header};
use base64::Engine;

use super::error::ApiError;
use super::state::App;

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

/// Passes a read of the fleet's data (`/v1/fleet`, report history, `/metrics`, the
/// dashboard) when the server is public-read or the request carries the read, admin or
/// upload token; otherwise 401 with a Basic challenge, so a browser asks for the token.
pub(super) fn check_read(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let cfg = &app.cfg;
    if cfg.public_read {
        return Ok(());
    }
    let tokens = [&cfg.read_token, &cfg.admin_token, &cfg.upload_token];
    let given = given_token(headers);
    let ok = given.as_deref().is_some_and(|g| {
        tokens
            .iter()
            .filter_map(|t| t.as_deref())
            .any(|t| constant_time_eq(g.as_bytes(), t.as_bytes()))
    });
    if ok {
        return Ok(());
    }
    let message = if tokens.iter().all(|t| t.is_none()) {
        "reading the fleet needs a token and this coordinator has none: start serve with \
         --read-token-file FILE, or --public-read"
    } else {
        "reading the fleet needs the read token (or the admin or upload token): \
         `Authorization: Bearer TOKEN`, or TOKEN as the password of HTTP Basic; \
         `roost-coordinator status --token-file FILE`"
    };
    Err(
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).with_header(
            header::WWW_AUTHENTICATE,
            "Basic realm=\"roost\", charset=\"UTF-8\"",
        ),
    )
}
