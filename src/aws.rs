//! The AWS SDK configuration shared by the daemon's AWS clients: endpoint, region,
//! credentials, timeouts and retries from [`DynamoConfig`], and an interceptor that counts
//! calls, outcomes, attempts and throttled attempts per DynamoDB API.
//!
//! Every call gets an operation timeout and an attempt timeout: the SDK's default has only
//! a connect timeout, so a dead pooled connection could otherwise hang a request forever.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_dynamodb::config::interceptors::{
    BeforeDeserializationInterceptorContextRef, BeforeSerializationInterceptorContextRef,
    BeforeTransmitInterceptorContextRef, FinalizerInterceptorContextRef,
};
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_types::config_bag::{Storable, StoreReplace};
use std::time::Instant;

use crate::metrics::{Exposition, Kind, Metrics};

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

/// How a DynamoDB call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CallOutcome {
    Ok = 0,
    Throttled = 1,
    Timeout = 2,
    Error = 3,
}

impl CallOutcome {
    const ALL: [CallOutcome; 4] = [
        CallOutcome::Ok,
        CallOutcome::Throttled,
        CallOutcome::Timeout,
        CallOutcome::Error,
    ];

    fn name(self) -> &'static str {
        match self {
            CallOutcome::Ok => "ok",
            CallOutcome::Throttled => "throttled",
            CallOutcome::Timeout => "timeout",
            CallOutcome::Error => "error",
        }
    }
}

/// Calls, their outcomes and attempts (a call's first try and its retries) per DynamoDB
/// API; call durations go to the metrics' histograms.
#[derive(Default)]
pub struct ApiCalls {
    counts: Mutex<BTreeMap<String, CallCount>>,
    metrics: Option<Arc<Metrics>>,
}

/// The counts of one API.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallCount {
    pub calls: u64,
    pub attempts: u64,
    /// Attempts DynamoDB throttled.
    pub throttled: u64,
    /// Calls by outcome: ok, throttled, timeout, error.
    pub outcomes: [u64; 4],
}

impl std::fmt::Debug for ApiCalls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiCalls")
            .field("counts", &self.counts)
            .finish_non_exhaustive()
    }
}

impl ApiCalls {
    /// Counts whose calls' durations go to `metrics`.
    pub fn with_metrics(metrics: Arc<Metrics>) -> ApiCalls {
        ApiCalls {
            counts: Mutex::default(),
            metrics: Some(metrics),
        }
    }

    /// The counts so far, by API name (`GetItem`, `Query`, ...).
    pub fn snapshot(&self) -> BTreeMap<String, CallCount> {
        self.counts
            .lock()
            .expect("api call counts poisoned")
            .clone()
    }

    fn finished(&self, api: &str, call: &CallState, outcome: CallOutcome) {
        {
            let mut counts = self.counts.lock().expect("api call counts poisoned");
            let c = match counts.get_mut(api) {
                Some(c) => c,
                None => counts.entry(api.to_owned()).or_default(),
            };
            c.calls += 1;
            c.attempts += call.attempts;
            c.throttled += call.throttled;
            c.outcomes[outcome as usize] += 1;
        }
        if let Some(m) = &self.metrics {
            m.call_duration(api, call.started.elapsed());
        }
    }

    /// Writes the counters into a scrape.
    pub fn export(&self, out: &mut Exposition) {
        let counts = self.snapshot();
        let name = "ddbcached_dynamodb_calls_total";
        out.family(
            name,
            Kind::Counter,
            "DynamoDB and Streams calls by API and outcome.",
        );
        for (api, c) in &counts {
            for o in CallOutcome::ALL {
                out.sample(
                    name,
                    &[("api", api), ("outcome", o.name())],
                    c.outcomes[o as usize],
                );
            }
        }
        out.by_label(
            "ddbcached_dynamodb_throttles_total",
            Kind::Counter,
            "Attempts DynamoDB throttled, by API.",
            "api",
            counts.iter().map(|(api, c)| (api.as_str(), c.throttled)),
        );
        out.by_label(
            "ddbcached_dynamodb_retries_total",
            Kind::Counter,
            "Attempts beyond the first, by API.",
            "api",
            counts
                .iter()
                .map(|(api, c)| (api.as_str(), c.attempts.saturating_sub(c.calls))),
        );
    }
}

/// One call in progress, kept in the SDK's config bag between the interceptor's hooks.
#[derive(Clone, Debug)]
struct CallState {
    started: Instant,
    attempts: u64,
    throttled: u64,
    last_throttled: bool,
}

impl Storable for CallState {
    type Storer = StoreReplace<Self>;
}

/// The error types DynamoDB answers with when it throttles.
const THROTTLING: [&[u8]; 4] = [
    b"ThrottlingException",
    b"ProvisionedThroughputExceededException",
    b"RequestLimitExceeded",
    b"LimitExceededException",
];

#[derive(Debug)]
struct CountCalls(Arc<ApiCalls>);

impl CountCalls {
    fn update(cfg: &mut ConfigBag, change: impl FnOnce(&mut CallState)) {
        if let Some(mut call) = cfg.load::<CallState>().cloned() {
            change(&mut call);
            cfg.interceptor_state().store_put(call);
        }
    }
}

impl Intercept for CountCalls {
    fn name(&self) -> &'static str {
        "ddbcached::CountCalls"
    }

    fn read_before_execution(
        &self,
        _: &BeforeSerializationInterceptorContextRef<'_>,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        cfg.interceptor_state().store_put(CallState {
            started: Instant::now(),
            attempts: 0,
            throttled: 0,
            last_throttled: false,
        });
        Ok(())
    }

    fn read_before_attempt(
        &self,
        _: &BeforeTransmitInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        Self::update(cfg, |c| c.attempts += 1);
        Ok(())
    }

    fn read_before_deserialization(
        &self,
        ctx: &BeforeDeserializationInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let response = ctx.response();
        let throttled = response.status().as_u16() == 400
            && response.body().bytes().is_some_and(|body| {
                THROTTLING
                    .iter()
                    .any(|t| body.windows(t.len()).any(|w| w == *t))
            });
        Self::update(cfg, |c| {
            c.throttled += u64::from(throttled);
            c.last_throttled = throttled;
        });
        Ok(())
    }

    // The operation's name is in the config bag only once execution has begun, so the
    // call is counted when it ends (however it ends).
    fn read_after_execution(
        &self,
        ctx: &FinalizerInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let api = cfg
            .load::<Metadata>()
            .map_or("unknown", |m| m.name())
            .to_owned();
        let Some(call) = cfg.load::<CallState>().cloned() else {
            return Ok(());
        };
        let outcome = match ctx.output_or_error() {
            Some(Ok(_)) => CallOutcome::Ok,
            Some(Err(e)) if e.is_timeout_error() => CallOutcome::Timeout,
            _ if call.last_throttled => CallOutcome::Throttled,
            _ => CallOutcome::Error,
        };
        self.0.finished(&api, &call, outcome);
        Ok(())
    }
}
