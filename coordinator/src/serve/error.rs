//! Every error answer is JSON `{"error": code, "message": text}` (DESIGN §5): handlers return
//! [`ApiError`], and a middleware rewrites the few plain-text answers axum and hyper make on
//! their own (unknown method, bad query string, …) into the same shape.

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::store::StoreError;

/// An error answer with its status, a stable code and a human message.
#[derive(Debug)]
pub struct ApiError {
    pub(super) status: StatusCode,
    pub(super) code: &'static str,
    pub(super) message: String,
    /// A header to answer with (a 401's `WWW-Authenticate`).
    header: Option<(header::HeaderName, HeaderValue)>,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            header: None,
        }
    }

    /// Answers with `name: value` too.
    pub(super) fn with_header(mut self, name: header::HeaderName, value: &'static str) -> Self {
        self.header = Some((name, HeaderValue::from_static(value)));
        self
    }

    /// A failure of the coordinator itself while doing `what`: the detail goes to its log
    /// (it may name the coordinator's own files), the client learns what failed.
    pub(super) fn internal(what: &str, e: impl std::fmt::Display) -> Self {
        tracing::error!("{what}: {e}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the coordinator failed while {what}; its log has the details"),
        )
    }

    /// A failure of the state folder while doing `what`: 507 when the disk is full, 503 when
    /// the report database is unavailable, else [`ApiError::internal`]. Nothing of the
    /// coordinator's paths reaches the client.
    pub(super) fn store(what: &str, e: StoreError) -> Self {
        if e.is_disk_full() {
            tracing::error!("{what}: {e}");
            return Self::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "insufficient_storage",
                format!(
                    "the coordinator's disk is full: {what} failed and nothing was stored; \
                     free space on the coordinator, then retry"
                ),
            );
        }
        if let StoreError::ReportsUnavailable(_) = e {
            return Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "reports_unavailable",
                format!(
                    "{what} failed: the coordinator's report database could not be opened \
                     when it started (its log says why); agents keep their reports queued"
                ),
            );
        }
        Self::internal(what, e)
    }

    pub(super) fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// A request body over `limit` bytes.
    pub(super) fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the request body is over the {limit}-byte limit"),
        )
    }

    pub(super) fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }
}

impl ApiError {
    /// The status to answer with.
    pub(super) fn status(&self) -> StatusCode {
        self.status
    }

    /// The JSON body: `{"error": code, "message": text}`.
    pub(super) fn body(&self) -> String {
        json_body(self.code, &self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = json_error(self.status, self.code, &self.message);
        if let Some((k, v)) = self.header {
            r.headers_mut().insert(k, v);
        }
        r.extensions_mut().insert(Answered {
            code: self.code,
            message: self.message,
        });
        r
    }
}

/// An error answer's code and message, kept in the response's extensions so the middleware
/// that logs refusals and records them per node (`observe.rs`) sees why.
#[derive(Debug, Clone)]
pub(super) struct Answered {
    pub code: &'static str,
    pub message: String,
}

/// What handlers return.
pub(super) type ApiResult = Result<Response, ApiError>;

fn json_body(code: &str, message: &str) -> String {
    serde_json::json!({ "error": code, "message": message }).to_string()
}

fn json_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        json_body(code, message),
    )
        .into_response()
}

/// A code for an error status that no handler chose.
fn code_for(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::REQUEST_TIMEOUT => "timeout",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        s if s.is_server_error() => "internal",
        _ => "error",
    }
}

/// Rewrites error answers that are not JSON yet into `{"error", "message"}`.
pub(super) async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 16 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    let mut out = json_error(status, code_for(status), &message);
    // Keep headers such as `Allow` on 405.
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    out
}
