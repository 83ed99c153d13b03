//! `init-tables` and the start-up check of the tables' layout, on DynamoDB Local.

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
};
use ddbcached::{aws, tables};

use rand::distr::{Alphanumeric, SampleString};

use crate::harness::{dynamo_config, endpoint};

fn suffix() -> String {
    Alphanumeric.sample_string(&mut rand::rng(), 12)
}

#[tokio::test(flavor = "multi_thread")]
async fn init_tables_creates_then_changes_nothing() {
    let mut config = dynamo_config(endpoint());
    config.dynamodb.kv_table = format!("kv_{}", suffix());
    config.dynamodb.log_table = format!("log_{}", suffix());
    let client = aws::dynamodb_client(&config.dynamodb, Default::default()).await;
    assert!(
        tables::check_tables(&client, &config.dynamodb, true, true)
            .await
            .is_err(),
        "missing at first"
    );
    tables::init_tables(&client, &config.dynamodb)
        .await
        .unwrap();
    tables::init_tables(&client, &config.dynamodb)
        .await
        .unwrap();
    tables::check_tables(&client, &config.dynamodb, true, true)
        .await
        .unwrap();

    let kv = client
        .describe_table()
        .table_name(&config.dynamodb.kv_table)
        .send()
        .await
        .unwrap()
        .table
        .unwrap();
    let stream = kv.stream_specification().unwrap();
    assert!(stream.stream_enabled());
    assert_eq!(
        stream.stream_view_type().unwrap().as_str(),
        "NEW_AND_OLD_IMAGES"
    );
    assert_eq!(
        kv.billing_mode_summary()
            .and_then(|b| b.billing_mode())
            .map(|m| m.as_str()),
        Some("PAY_PER_REQUEST")
    );
    let index = &kv.global_secondary_indexes()[0];
    assert_eq!(index.index_name(), Some("namespace_index"));
    assert_eq!(index.key_schema()[0].attribute_name(), "zflow_kv_namespace");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_with_another_key_type_is_a_clear_error() {
    let mut config = dynamo_config(endpoint());
    config.dynamodb.kv_table = format!("wrong_{}", suffix());
    let client = aws::dynamodb_client(&config.dynamodb, Default::default()).await;
    // The partition key as a string instead of binary.
    client
        .create_table()
        .table_name(&config.dynamodb.kv_table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("zflow_kv_key")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .unwrap(),
        )
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("zflow_kv_timestamp")
                .attribute_type(ScalarAttributeType::N)
                .build()
                .unwrap(),
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("zflow_kv_key")
                .key_type(KeyType::Hash)
                .build()
                .unwrap(),
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("zflow_kv_timestamp")
                .key_type(KeyType::Range)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    let err = tables::init_tables(&client, &config.dynamodb)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&config.dynamodb.kv_table)
            && err.contains("partition key zflow_kv_key has type S, ddbcached needs B"),
        "{err}"
    );
}
