//! Shared test fixtures, one concern a file: DynamoDB Local, daemons, random names, raw
//! protocol frames, a proxy that swallows or holds back answers, Redis servers, the AWS
//! SDK's client.

use std::net::TcpListener;

mod daemon;
mod dynamodb;
mod names;
mod proxy;
mod raw;
mod redis;
mod redis_cluster;
mod sdk;

pub use daemon::{http_get, rss, spawn_api_daemon, spawn_daemon, spawn_daemon_at, Daemon};
pub use dynamodb::{dynamo_config, dynamodb_toml, endpoint, OwnLocal};
pub use names::{key, name, value};
pub use proxy::Proxy;
pub use raw::{field, msgpack_map, Raw, Val};
pub use redis::RedisServer;
pub use redis_cluster::RedisCluster;
pub use sdk::{api_url, attribute, key_part, n, s, sdk_client};

/// A loopback port nobody listens on at the moment.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
