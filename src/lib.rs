//! ddbcached: a sidecar daemon that serves zio-flow's key-value and indexed stores from
//! DynamoDB to local executors over a Unix socket.
//!
//! Layout:
//! - [`daemon`]: the composition root: the whole daemon built from a configuration, in
//!   the order that keeps the cache correct, and run until shutdown.
//! - [`config`]: settings and their environment overrides.
//! - [`aws`]: the AWS SDK configuration (endpoint, credentials, timeouts, retries).
//! - [`tables`]: creating and checking the tables.
//! - [`store`]: the stores' semantics on DynamoDB.
//! - [`cache`]: the versioned cache and its guards against stale fills.
//! - [`locks`]: per-key async locks.
//! - [`service`]: one request in, its replies out: the read path and the write path.
//! - [`coherence`]: what a change in the tables means for the cache (own writes' echoes,
//!   reconcile or drop, flush on lost continuity, freshness).
//! - [`registry`]: the tables cached and who caches each (the stores, the DynamoDB API
//!   front); [`changes`]: the one path by which every change reaches every cache of its
//!   table.
//! - [`stream`]: the DynamoDB Streams tailers, which hand what they read to a
//!   [`stream::sink::Sink`].
//! - [`fleet`]: fleet mode: relay leases, publishing to Redis, consuming from it.
//! - [`connection`]: one client connection: handshake, pipelining, streamed replies;
//!   [`peer`]: who may connect to a Unix socket.
//! - [`api`]: DynamoDB's own HTTP API for any AWS SDK (forwarded, re-signed).
//! - [`server`]: the socket, the accept loop and shutdown; [`server_stats`]: what the
//!   socket front counts.
//! - [`probe`]: health, and the metrics exposition every part writes into.
//! - [`metrics`]: Prometheus metrics; [`http`]: the endpoint serving them and readiness.

pub mod api;
pub mod aws;
pub mod cache;
pub mod changes;
pub mod coherence;
pub mod config;
pub mod connection;
pub mod daemon;
pub mod fleet;
pub mod freshness;
pub mod http;
pub mod locks;
pub mod metrics;
pub mod peer;
pub mod probe;
pub mod registry;
pub mod server;
pub mod server_stats;
pub mod service;
pub mod store;
pub mod stream;
pub mod tables;
