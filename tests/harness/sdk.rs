//! The Rust AWS SDK as the DynamoDB API tests use it: a client of DynamoDB Local or of a
//! daemon's API front, and the builders every test needs.

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, KeySchemaElement, KeyType, ScalarAttributeType,
};
use aws_sdk_dynamodb::Client;

use super::daemon::Daemon;
use super::dynamodb::dynamo_config;

/// An SDK client of DynamoDB at `url`.
pub async fn sdk_client(url: &str) -> Client {
    ddbcached::aws::dynamodb_client(&dynamo_config(url).dynamodb, Default::default()).await
}

/// The daemon's DynamoDB API front, as a URL.
pub fn api_url(d: &Daemon) -> String {
    format!("http://{}", d.api.expect("the API listens"))
}

pub fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.into())
}

pub fn n(v: &str) -> AttributeValue {
    AttributeValue::N(v.into())
}

pub fn attribute(name: &str, kind: ScalarAttributeType) -> AttributeDefinition {
    AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(kind)
        .build()
        .unwrap()
}

pub fn key_part(name: &str, kind: KeyType) -> KeySchemaElement {
    KeySchemaElement::builder()
        .attribute_name(name)
        .key_type(kind)
        .build()
        .unwrap()
}
