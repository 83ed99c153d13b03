//! Error codes carried on the wire, and the errors of the client side.
//!
//! Codes are part of the protocol: a code keeps its number and meaning forever; new
//! conditions get new numbers. `docs/PROTOCOL.md` lists them for client authors.

use std::fmt;

/// The stable numeric code of an error response (`code` field; 0 means success).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// The frame body is not a MessagePack map of the documented shape.
    Malformed = 1,
    /// `op` names no operation this server knows.
    UnknownOperation = 2,
    /// A field is missing, has the wrong type or an invalid value (empty key, bad UTF-8...).
    InvalidArgument = 3,
    /// The frame exceeds the server's `max_frame_bytes`; the server closes the connection.
    FrameTooLarge = 4,
    /// The item would exceed DynamoDB's 400 KB item limit; nothing was written.
    ValueTooLarge = 5,
    /// The first frame of a connection was not `hello`; the server closes the connection.
    HandshakeRequired = 6,
    /// `hello` asked for a protocol version the server does not speak; the connection closes.
    UnsupportedVersion = 7,
    /// DynamoDB could not be reached; a write was not applied.
    Unavailable = 16,
    /// DynamoDB kept throttling after the configured retries; a write was not applied.
    Throttled = 17,
    /// The DynamoDB call did not finish within the configured timeout. For a write the
    /// outcome is unknown: it may or may not have been applied.
    Timeout = 18,
    /// Index allocation lost to concurrent writers more times than allowed; nothing was written.
    Conflict = 19,
    /// DynamoDB rejected the call for another reason (the message says which).
    Backend = 20,
    /// The server is shutting down and takes no new requests.
    ShuttingDown = 21,
    /// A bug in the server; the message says what failed.
    Internal = 255,
}

impl ErrorCode {
    /// Every code, for documentation and exhaustive tests.
    pub const ALL: [ErrorCode; 14] = [
        ErrorCode::Malformed,
        ErrorCode::UnknownOperation,
        ErrorCode::InvalidArgument,
        ErrorCode::FrameTooLarge,
        ErrorCode::ValueTooLarge,
        ErrorCode::HandshakeRequired,
        ErrorCode::UnsupportedVersion,
        ErrorCode::Unavailable,
        ErrorCode::Throttled,
        ErrorCode::Timeout,
        ErrorCode::Conflict,
        ErrorCode::Backend,
        ErrorCode::ShuttingDown,
        ErrorCode::Internal,
    ];

    /// The number sent on the wire.
    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// The code for a number received on the wire; `None` for numbers this version
    /// does not know (a newer server may send them).
    pub fn from_u16(n: u16) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_u16() == n)
    }

    /// The position in [`ErrorCode::ALL`].
    pub fn index(self) -> usize {
        match self {
            ErrorCode::Malformed => 0,
            ErrorCode::UnknownOperation => 1,
            ErrorCode::InvalidArgument => 2,
            ErrorCode::FrameTooLarge => 3,
            ErrorCode::ValueTooLarge => 4,
            ErrorCode::HandshakeRequired => 5,
            ErrorCode::UnsupportedVersion => 6,
            ErrorCode::Unavailable => 7,
            ErrorCode::Throttled => 8,
            ErrorCode::Timeout => 9,
            ErrorCode::Conflict => 10,
            ErrorCode::Backend => 11,
            ErrorCode::ShuttingDown => 12,
            ErrorCode::Internal => 13,
        }
    }

    /// The snake_case name used in logs, metrics labels and the CLI's JSON output.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::UnknownOperation => "unknown_operation",
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::ValueTooLarge => "value_too_large",
            ErrorCode::HandshakeRequired => "handshake_required",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Throttled => "throttled",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Backend => "backend",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.as_u16())
    }
}

/// An error response as a value: the code and the server's message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ServerError {
    /// The numeric code as received (kept raw so unknown codes survive).
    pub raw_code: u16,
    /// The code, when this version knows it.
    pub code: ErrorCodeOrUnknown,
    /// Human-readable detail.
    pub message: String,
}

impl ServerError {
    /// An error with a known code.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ServerError {
        ServerError {
            raw_code: code.as_u16(),
            code: ErrorCodeOrUnknown::Known(code),
            message: message.into(),
        }
    }

    /// The code, if known to this version.
    pub fn known_code(&self) -> Option<ErrorCode> {
        match self.code {
            ErrorCodeOrUnknown::Known(c) => Some(c),
            ErrorCodeOrUnknown::Unknown(_) => None,
        }
    }
}

/// A code received from the server, which may be newer than this client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCodeOrUnknown {
    Known(ErrorCode),
    Unknown(u16),
}

impl From<u16> for ErrorCodeOrUnknown {
    fn from(n: u16) -> Self {
        match ErrorCode::from_u16(n) {
            Some(c) => ErrorCodeOrUnknown::Known(c),
            None => ErrorCodeOrUnknown::Unknown(n),
        }
    }
}

impl fmt::Display for ErrorCodeOrUnknown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorCodeOrUnknown::Known(c) => c.fmt(f),
            ErrorCodeOrUnknown::Unknown(n) => write!(f, "unknown ({n})"),
        }
    }
}

/// What the client can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error response.
    #[error("server error {0}")]
    Server(#[from] ServerError),
    /// The socket failed or closed.
    #[error("connection to {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The connection is gone (closed by the server or after an earlier error).
    #[error("connection closed")]
    Closed,
    /// The server sent something this client cannot interpret.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// An argument cannot be sent (for example a namespace that is not UTF-8).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl ClientError {
    /// The server's error code, when the server answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server(e) => e.known_code(),
            _ => None,
        }
    }
}
