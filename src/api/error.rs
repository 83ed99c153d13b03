//! Errors the front answers itself, shaped as DynamoDB shapes them (an HTTP status, a JSON
//! body with `__type` and `message`), so that every SDK reports them as it reports
//! DynamoDB's own: the part of `__type` after `#` becomes the error code.

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;

/// The `Content-Type` of DynamoDB's answers.
pub const JSON_1_0: &str = "application/x-amz-json-1.0";

/// Why the front answered a request itself instead of DynamoDB.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No `X-Amz-Target`, or one naming an operation the front does not know.
    #[error("{0}")]
    UnknownOperation(String),
    /// The body is not a JSON object (or its gzip encoding is broken).
    #[error("{0}")]
    Serialization(String),
    /// The request cannot be taken as it is (too large, too slow).
    #[error("{0}")]
    Validation(String),
    /// An operation the daemon's configuration does not allow.
    #[error("{0}")]
    AccessDenied(String),
    /// DynamoDB could not be reached, or did not answer in time (a write's outcome is
    /// then unknown, as with DynamoDB's own internal errors).
    #[error("{0}")]
    Upstream(String),
}

impl ApiError {
    /// The status and `__type` DynamoDB gives this error.
    fn shape(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::UnknownOperation(_) => (
                StatusCode::BAD_REQUEST,
                "com.amazonaws.dynamodb.v20120810#UnknownOperationException",
            ),
            ApiError::Serialization(_) => (
                StatusCode::BAD_REQUEST,
                "com.amazon.coral.service#SerializationException",
            ),
            ApiError::Validation(_) => (
                StatusCode::BAD_REQUEST,
                "com.amazon.coral.validate#ValidationException",
            ),
            ApiError::AccessDenied(_) => (
                StatusCode::BAD_REQUEST,
                "com.amazon.coral.service#AccessDeniedException",
            ),
            ApiError::Upstream(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "com.amazonaws.dynamodb.v20120810#InternalServerError",
            ),
        }
    }

    /// The response that carries this error.
    pub fn response(&self) -> Response<Full<Bytes>> {
        let (status, kind) = self.shape();
        let body = serde_json::json!({ "__type": kind, "message": self.to_string() });
        let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
        *response.status_mut() = status;
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(JSON_1_0),
        );
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn errors_carry_a_status_a_type_and_a_message() {
        let r = ApiError::AccessDenied("no".into()).response();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert_eq!(r.headers()[http::header::CONTENT_TYPE], JSON_1_0);
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            json["__type"],
            "com.amazon.coral.service#AccessDeniedException"
        );
        assert_eq!(json["message"], "no");
        let r = ApiError::Upstream("down".into()).response();
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
