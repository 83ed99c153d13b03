//! The ddbcached wire protocol: message types, the frame and body codec, and an async client.
//!
//! This crate is everything a Rust program needs to talk to a ddbcached daemon and nothing
//! more: it depends on neither the AWS SDK nor the cache. The daemon uses the same types,
//! so client and server cannot disagree on the format. `docs/PROTOCOL.md` in the repository
//! describes the format for clients in other languages.
//!
//! - [`codec`]: frames (4-byte big-endian length prefix) and MessagePack bodies.
//! - [`message`]: [`Request`], [`Reply`] and the items of streamed results.
//! - [`error`]: stable [`ErrorCode`]s and the client's errors.
//! - [`client`]: [`Client`], a pipelined connection.

pub mod client;
pub mod codec;
pub mod error;
pub mod message;

pub use client::{Client, ServerInfo};
pub use error::{ClientError, ErrorCode, ServerError};
pub use message::{Items, Op, Reply, Request, RequestRef, Versioned, PROTOCOL_VERSION};
