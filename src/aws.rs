//! The AWS SDK configuration shared by the daemon's AWS clients: endpoint, region,
//! credentials, timeouts and retries from [`DynamoConfig`], and an interceptor that counts
//! calls and attempts per DynamoDB API.
//!
//! Every call gets an operation timeout and an attempt timeout: the SDK's default has only
//! a connect timeout, so a dead pooled connection could otherwise hang a request forever.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_dynamodb::config::interceptors::{
    BeforeTransmitInterceptorContextRef, FinalizerInterceptorContextRef,
};
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::orchestrator::Metadata;

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

/// A DynamoDB client for `config`, counting its calls into `calls`.
pub async fn dynamodb_client(
    config: &DynamoConfig,
    calls: Arc<ApiCalls>,
) -> aws_sdk_dynamodb::Client {
    dynamodb_client_from(&sdk_config(config).await, calls)
}

/// A DynamoDB client on a loaded SDK configuration, counting its calls into `calls`.
pub fn dynamodb_client_from(sdk: &SdkConfig, calls: Arc<ApiCalls>) -> aws_sdk_dynamodb::Client {
    let config = aws_sdk_dynamodb::config::Builder::from(sdk)
        .interceptor(CountCalls(calls))
        .build();
    aws_sdk_dynamodb::Client::from_conf(config)
}

/// A DynamoDB Streams client on the same configuration (DynamoDB Local serves both APIs
/// on one endpoint; on AWS the SDK picks the streams endpoint for the region).
pub fn streams_client_from(
    sdk: &SdkConfig,
    calls: Arc<ApiCalls>,
) -> aws_sdk_dynamodbstreams::Client {
    let config = aws_sdk_dynamodbstreams::config::Builder::from(sdk)
        .interceptor(CountCalls(calls))
        .build();
    aws_sdk_dynamodbstreams::Client::from_conf(config)
}

/// Calls and attempts (a call's first try and its retries) per DynamoDB API.
#[derive(Debug, Default)]
pub struct ApiCalls {
    counts: Mutex<BTreeMap<String, CallCount>>,
}

/// The counts of one API.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallCount {
    pub calls: u64,
    pub attempts: u64,
}

impl ApiCalls {
    /// The counts so far, by API name (`GetItem`, `Query`, ...).
    pub fn snapshot(&self) -> BTreeMap<String, CallCount> {
        self.counts
            .lock()
            .expect("api call counts poisoned")
            .clone()
    }

    /// Calls of every API together.
    pub fn total_calls(&self) -> u64 {
        self.snapshot().values().map(|c| c.calls).sum()
    }

    fn bump(&self, cfg: &ConfigBag, field: fn(&mut CallCount) -> &mut u64) {
        let api = cfg.load::<Metadata>().map_or("unknown", |m| m.name());
        let mut counts = self.counts.lock().expect("api call counts poisoned");
        *field(counts.entry(api.to_owned()).or_default()) += 1;
    }
}

#[derive(Debug)]
struct CountCalls(Arc<ApiCalls>);

impl Intercept for CountCalls {
    fn name(&self) -> &'static str {
        "ddbcached::CountCalls"
    }

    // Counted when the call ends (however it ends): the operation's name is in the
    // config bag only once execution has begun.
    fn read_after_execution(
        &self,
        _: &FinalizerInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        self.0.bump(cfg, |c| &mut c.calls);
        Ok(())
    }

    fn read_before_attempt(
        &self,
        _: &BeforeTransmitInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        self.0.bump(cfg, |c| &mut c.attempts);
        Ok(())
    }
}
