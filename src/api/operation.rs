//! DynamoDB's operations as the front sorts them: which it forwards, which change tables
//! (refused unless `dynamodb_api.control_plane` is on), and the label each is counted
//! under. An operation not listed here is answered `UnknownOperationException` without
//! being sent anywhere: nothing the daemon does not know is signed with its credentials.

/// The prefix of `X-Amz-Target` for DynamoDB's API of 2012-08-10.
pub const TARGET_PREFIX: &str = "DynamoDB_20120810.";

/// Item and query operations (PartiQL included), each counted under its own name.
const DATA: [&str; 13] = [
    "GetItem",
    "BatchGetItem",
    "Query",
    "Scan",
    "PutItem",
    "UpdateItem",
    "DeleteItem",
    "BatchWriteItem",
    "TransactGetItems",
    "TransactWriteItems",
    "ExecuteStatement",
    "BatchExecuteStatement",
    "ExecuteTransaction",
];

/// Control-plane operations that only read: forwarded.
const DESCRIBE: [&str; 21] = [
    "DescribeTable",
    "ListTables",
    "DescribeTimeToLive",
    "DescribeContinuousBackups",
    "DescribeContributorInsights",
    "DescribeEndpoints",
    "DescribeLimits",
    "DescribeGlobalTable",
    "DescribeGlobalTableSettings",
    "DescribeTableReplicaAutoScaling",
    "DescribeKinesisStreamingDestination",
    "DescribeBackup",
    "DescribeExport",
    "DescribeImport",
    "ListBackups",
    "ListContributorInsights",
    "ListExports",
    "ListGlobalTables",
    "ListImports",
    "ListTagsOfResource",
    "GetResourcePolicy",
];

/// Control-plane operations that change tables, their settings, backups or tags.
const CHANGE: [&str; 23] = [
    "CreateTable",
    "DeleteTable",
    "UpdateTable",
    "UpdateTimeToLive",
    "TagResource",
    "UntagResource",
    "CreateBackup",
    "DeleteBackup",
    "RestoreTableFromBackup",
    "RestoreTableToPointInTime",
    "UpdateContinuousBackups",
    "UpdateContributorInsights",
    "CreateGlobalTable",
    "UpdateGlobalTable",
    "UpdateGlobalTableSettings",
    "UpdateTableReplicaAutoScaling",
    "EnableKinesisStreamingDestination",
    "DisableKinesisStreamingDestination",
    "UpdateKinesisStreamingDestination",
    "ExportTableToPointInTime",
    "ImportTable",
    "PutResourcePolicy",
    "DeleteResourcePolicy",
];

/// What the front does with an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// An item or query operation.
    Data,
    /// A control-plane read.
    Describe,
    /// A control-plane change.
    Change,
}

/// A known operation: its name, what it is, and its label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Operation {
    pub name: &'static str,
    pub kind: Kind,
    /// Index into [`labels`].
    pub label: usize,
}

/// The operation an `X-Amz-Target` header names, if the front knows it.
pub fn from_target(target: &str) -> Option<Operation> {
    let name = target.strip_prefix(TARGET_PREFIX)?;
    let known = |list: &[&'static str], kind, label: fn(usize) -> usize| {
        list.iter().position(|op| *op == name).map(|i| Operation {
            name: list[i],
            kind,
            label: label(i),
        })
    };
    known(&DATA, Kind::Data, |i| i)
        .or_else(|| known(&DESCRIBE, Kind::Describe, |_| DATA.len()))
        .or_else(|| known(&CHANGE, Kind::Change, |_| DATA.len() + 1))
}

/// Labels operations are counted under: each item operation by name, then the two kinds
/// of control-plane operation, then whatever the front did not know. A closed set, so
/// that no request can make a label.
pub const LABELS: usize = DATA.len() + 3;

/// The label of each index below [`LABELS`].
pub fn labels() -> impl Iterator<Item = (usize, &'static str)> {
    DATA.into_iter()
        .chain(["describe", "change", "unknown"])
        .enumerate()
}

/// The label index of a request whose operation is unknown.
pub const UNKNOWN_LABEL: usize = LABELS - 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_sorted_and_labelled() {
        let get = from_target("DynamoDB_20120810.GetItem").unwrap();
        assert_eq!((get.name, get.kind, get.label), ("GetItem", Kind::Data, 0));
        let describe = from_target("DynamoDB_20120810.DescribeTable").unwrap();
        assert_eq!(describe.kind, Kind::Describe);
        let create = from_target("DynamoDB_20120810.CreateTable").unwrap();
        assert_eq!(create.kind, Kind::Change);
        let labels: Vec<_> = labels().map(|(_, l)| l).collect();
        assert_eq!(labels[describe.label], "describe");
        assert_eq!(labels[create.label], "change");
        assert_eq!(labels[UNKNOWN_LABEL], "unknown");
        assert_eq!(labels.len(), LABELS);
        for unknown in [
            "DynamoDB_20120810.Frobnicate",
            "DynamoDB_20111205.GetItem",
            "DynamoDBStreams_20120810.GetRecords",
            "GetItem",
            "",
        ] {
            assert_eq!(from_target(unknown), None, "{unknown}");
        }
    }

    #[test]
    fn no_operation_is_listed_twice() {
        let all: Vec<&str> = DATA
            .iter()
            .chain(&DESCRIBE)
            .chain(&CHANGE)
            .copied()
            .collect();
        let mut unique = all.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), all.len());
    }
}
