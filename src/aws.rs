//! The AWS SDK configuration shared by the DynamoDB client (and later the Streams client):
//! endpoint, region, credentials, timeouts and retries from [`DynamoConfig`].
//!
//! Every call gets an operation timeout and an attempt timeout: the SDK's default has only
//! a connect timeout, so a dead pooled connection could otherwise hang a request forever.

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};

use crate::config::DynamoConfig;

/// Loads the SDK configuration: settings from `config`, everything left empty from the
/// standard AWS chain (environment, profile, instance or pod role).
pub async fn sdk_config(config: &DynamoConfig) -> SdkConfig {
    let retry = match config.retry_mode.as_str() {
        "adaptive" => RetryConfig::adaptive(),
        _ => RetryConfig::standard(),
    }
    .with_max_attempts(config.max_attempts);
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(config.connect_timeout())
        .operation_attempt_timeout(config.attempt_timeout())
        .operation_timeout(config.operation_timeout())
        .build();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .retry_config(retry)
        .timeout_config(timeouts);
    if !config.endpoint.is_empty() {
        loader = loader.endpoint_url(&config.endpoint);
    }
    if !config.region.is_empty() {
        loader = loader.region(Region::new(config.region.clone()));
    }
    if config.use_dummy_credentials {
        loader = loader.test_credentials();
    }
    loader.load().await
}

/// A DynamoDB client for `config`.
pub async fn dynamodb_client(config: &DynamoConfig) -> aws_sdk_dynamodb::Client {
    aws_sdk_dynamodb::Client::new(&sdk_config(config).await)
}
