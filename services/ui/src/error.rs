//! [`AppError`]: every failure of a dashboard route, answered as JSON `{"error": "..."}` with a
//! status that says whose fault it is. Never an HTML error page, never a stack trace.

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tonic::Code;

/// A failed dashboard request.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The request itself is wrong (a field, a number, a kind).
    #[error("{0}")]
    BadRequest(String),
    /// No such instance (or page).
    #[error("{0}")]
    NotFound(String),
    /// The instance is not in a state that allows this.
    #[error("{0}")]
    Conflict(String),
    /// Refused by the cross-site or Host checks.
    #[error("{0}")]
    Forbidden(String),
    /// The admin token is missing or wrong.
    #[error("{0}")]
    Unauthorized(String),
    /// A part of the mesh the request needs (control, Redis) cannot be reached.
    #[error("{0}")]
    Unavailable(String),
    /// Control answered with a failure of its own (e.g. an instance did not start).
    #[error("{0}")]
    Upstream(String),
    /// Control did not answer in time.
    #[error("{0}")]
    Timeout(String),
    /// The body could not be read (too large, not JSON, wrong fields).
    #[error("{message}")]
    Rejected {
        /// Status chosen by the extractor (400, 413, 415, 422).
        status: StatusCode,
        /// What was wrong.
        message: String,
    },
    /// Anything else: logged in full, answered with a generic message.
    #[error("internal error")]
    Internal(String),
}

impl AppError {
    /// The status code of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            AppError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AppError::NotFound(_) => StatusCode::NOT_FOUND,
            AppError::Conflict(_) => StatusCode::CONFLICT,
            AppError::Forbidden(_) => StatusCode::FORBIDDEN,
            AppError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            AppError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            AppError::Upstream(_) => StatusCode::BAD_GATEWAY,
            AppError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            AppError::Rejected { status, .. } => *status,
            AppError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Maps a control service answer. A status with a source came from our own client (the
    /// connection failed): control is unreachable. Without one it is control's own answer,
    /// whose messages are written for users (they name the id and the known ones).
    pub fn from_control(status: &tonic::Status, control: &str) -> Self {
        let message = dlb::client::status_message(status);
        if std::error::Error::source(status).is_some() {
            return AppError::Unavailable(format!(
                "control at {control} is unreachable: {message}"
            ));
        }
        match status.code() {
            Code::NotFound => AppError::NotFound(message),
            Code::InvalidArgument => AppError::BadRequest(message),
            Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => {
                AppError::Conflict(message)
            }
            Code::DeadlineExceeded | Code::Cancelled => AppError::Timeout(format!(
                "control at {control} did not finish in time: {message}"
            )),
            _ => AppError::Upstream(format!("control: {message}")),
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let AppError::Internal(detail) = &self {
            tracing::error!(error = %detail, "request failed");
        }
        let mut response = (status, Json(json!({ "error": self.to_string() }))).into_response();
        if status == StatusCode::UNAUTHORIZED
            && let Ok(value) = "Bearer realm=\"dlb\"".parse()
        {
            response
                .headers_mut()
                .insert(axum::http::header::WWW_AUTHENTICATE, value);
        }
        response
    }
}

impl From<JsonRejection> for AppError {
    fn from(rejection: JsonRejection) -> Self {
        AppError::Rejected {
            status: rejection.status(),
            message: rejection.body_text(),
        }
    }
}

impl From<QueryRejection> for AppError {
    fn from(rejection: QueryRejection) -> Self {
        AppError::Rejected {
            status: rejection.status(),
            message: rejection.body_text(),
        }
    }
}
