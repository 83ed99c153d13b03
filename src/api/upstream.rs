//! Forwarding a request to DynamoDB: re-signed (SigV4) with the daemon's own credentials,
//! sent once (the client's SDK retries what it wants retried, as it would against
//! DynamoDB: a second attempt from here could apply a write twice), and DynamoDB's answer
//! relayed as it came: status, body, request id and checksum.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_config::SdkConfig;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::error::{ApiError, JSON_1_0};
use crate::config::DynamoConfig;

/// The largest answer taken from DynamoDB (its largest, a BatchGetItem's, is 16 MB).
const MAX_RESPONSE_BYTES: usize = 32 * 1024 * 1024;

/// Headers of DynamoDB's answer that the client gets as they came.
const RELAYED: [&str; 3] = ["content-type", "x-amzn-requestid", "x-amz-crc32"];

/// Why the front cannot reach DynamoDB at all; the daemon does not start.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no AWS region: set dynamodb.region or AWS_REGION")]
    NoRegion,
    #[error("no AWS credentials provider in the SDK configuration")]
    NoCredentials,
    #[error("dynamodb.endpoint = {0} is not a valid URL")]
    Endpoint(String),
    #[error("no trusted root certificate found for TLS to {0} (install ca-certificates)")]
    NoRoots(String),
    #[error("TLS cannot be set up: {0}")]
    Tls(#[from] rustls::Error),
}

/// DynamoDB, as the front reaches it.
pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    endpoint: Uri,
    /// `host[:port]` of the endpoint: signed, and sent as the `Host` header.
    host: HeaderValue,
    region: String,
    credentials: SharedCredentialsProvider,
    timeout: Duration,
}

impl Upstream {
    /// DynamoDB at `config.endpoint` (or the region's public endpoint), with the SDK's
    /// region and credentials chain.
    pub fn new(sdk: &SdkConfig, config: &DynamoConfig) -> Result<Upstream, UpstreamError> {
        let region = sdk.region().ok_or(UpstreamError::NoRegion)?.to_string();
        let credentials = sdk
            .credentials_provider()
            .ok_or(UpstreamError::NoCredentials)?;
        let url = match config.endpoint.as_str() {
            "" => format!("https://dynamodb.{region}.amazonaws.com"),
            given => given.to_owned(),
        };
        let endpoint: Uri = url
            .parse()
            .map_err(|_| UpstreamError::Endpoint(url.clone()))?;
        let host = endpoint
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            .ok_or_else(|| UpstreamError::Endpoint(url.clone()))?;
        let https = endpoint.scheme_str() == Some("https");
        Ok(Upstream {
            client: Client::builder(TokioExecutor::new()).build(connector(https, &url)?),
            endpoint,
            host,
            region,
            credentials,
            timeout: config.operation_timeout(),
        })
    }

    /// Sends `body` as `target` and returns DynamoDB's answer, whatever its status.
    pub async fn forward(
        &self,
        target: &HeaderValue,
        content_type: Option<&HeaderValue>,
        body: Bytes,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let mut request = Request::post(self.endpoint.clone())
            .header(http::header::HOST, self.host.clone())
            .header(
                http::header::CONTENT_TYPE,
                content_type
                    .cloned()
                    .unwrap_or(HeaderValue::from_static(JSON_1_0)),
            )
            .header("x-amz-target", target.clone())
            .body(Full::new(body.clone()))
            .map_err(|e| ApiError::Validation(format!("the request cannot be forwarded: {e}")))?;
        self.sign(&mut request, &body).await?;
        let exchange = async {
            let response =
                self.client.request(request).await.map_err(|e| {
                    ApiError::Upstream(format!("DynamoDB could not be reached: {e}"))
                })?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| {
                    ApiError::Upstream(format!("DynamoDB's answer could not be read: {e}"))
                })?
                .to_bytes();
            Ok::<_, ApiError>((parts, body))
        };
        let (parts, body) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| {
                ApiError::Upstream(format!(
                    "DynamoDB did not answer within {} ms (dynamodb.operation_timeout_ms); a write may or may not have been applied",
                    self.timeout.as_millis()
                ))
            })??;
        let mut relayed = Response::new(Full::new(body));
        *relayed.status_mut() = parts.status;
        for name in RELAYED {
            if let Some(value) = parts.headers.get(name) {
                relayed.headers_mut().insert(name, value.clone());
            }
        }
        Ok(relayed)
    }

    /// Signs `request` for DynamoDB with the daemon's current credentials.
    async fn sign(&self, request: &mut Request<Full<Bytes>>, body: &[u8]) -> Result<(), ApiError> {
        let unsigned = |e: &dyn std::fmt::Display| {
            ApiError::Upstream(format!("the request could not be signed: {e}"))
        };
        let credentials = self
            .credentials
            .provide_credentials()
            .await
            .map_err(|e| unsigned(&e))?;
        let identity: Identity = credentials.into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("dynamodb")
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| unsigned(&e))?
            .into();
        let uri = request.uri().to_string();
        let headers = request
            .headers()
            .iter()
            .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?)));
        let signable = SignableRequest::new("POST", uri, headers, SignableBody::Bytes(body))
            .map_err(|e| unsigned(&e))?;
        let (instructions, _signature) = sign(signable, &params)
            .map_err(|e| unsigned(&e))?
            .into_parts();
        instructions.apply_to_request_http1x(request);
        Ok(())
    }
}

/// A connector for plain HTTP and, trusting the system's roots, TLS. Roots are required
/// only when the endpoint itself is `https`.
fn connector(https: bool, url: &str) -> Result<HttpsConnector<HttpConnector>, UpstreamError> {
    let mut roots = rustls::RootCertStore::empty();
    // Read the system's certificates only when they are needed: a plain-HTTP endpoint
    // (DynamoDB Local) never uses them.
    if https {
        let (added, _ignored) =
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        if added == 0 {
            return Err(UpstreamError::NoRoots(url.to_owned()));
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    // Requests are written whole: waiting to coalesce them only adds latency.
    http.set_nodelay(true);
    http.enforce_http(false);
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http))
}
