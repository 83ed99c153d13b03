//! Integration tests: the daemon over its socket, against DynamoDB Local.
//!
//! The harness starts one DynamoDB Local for this test binary on a free loopback port (or
//! uses `DDBCACHED_TEST_ENDPOINT`), creates the tables once, and starts an in-process
//! daemon per test on its own socket. Tests use random namespaces and topics, so they can
//! share the tables and run in parallel.

mod api;
mod api_cache;
mod api_differential;
mod api_stores;
mod cache;
mod check;
mod cli;
mod clients;
mod corpus;
mod faults;
mod fleet;
mod harness;
mod kv;
mod log;
mod memory;
mod ops;
mod outage;
mod protocol;
mod stream;
mod tables;
