"""The item workloads of ddbcached-bench (item-get, item-query) with boto3, one caller,
against the daemon's DynamoDB API front or DynamoDB directly: one JSON row in the load
generator's format. The items are those `ddbcached-bench run --workload item-*` preloads.

    python3 benches/api_boto3.py --endpoint URL --target api-boto3 --workload item-get \
        --seconds 5 --keys 1000 --server-pid PID
"""

import argparse
import json
import random
import time

import boto3

TABLE = "ddbcached-bench-items"


def cpu_seconds(pid):
    """User and system CPU time of a process (USER_HZ is 100 on Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--endpoint", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--workload", choices=["item-get", "item-query"], required=True)
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--keys", type=int, default=1000)
    p.add_argument("--value-bytes", type=int, default=64)
    p.add_argument("--server-pid", type=int)
    a = p.parse_args()
    # DynamoDB Local keeps a database per access key: the daemon's dummy one.
    client = boto3.client(
        "dynamodb",
        endpoint_url=a.endpoint,
        region_name="us-east-1",
        aws_access_key_id="ANOTREAL",
        aws_secret_access_key="any",
    )
    rng = random.Random(1)

    def once(k=None):
        pk = {"S": f"item-{rng.randrange(a.keys) if k is None else k:08}"}
        if a.workload == "item-get":
            found = "Item" in client.get_item(TableName=TABLE, Key={"pk": pk, "sk": {"N": "1"}})
        else:
            found = client.query(
                TableName=TABLE,
                KeyConditionExpression="pk = :pk",
                ExpressionAttributeValues={":pk": pk},
            )["Count"] > 0
        assert found, pk

    # Every key read once before the clock starts, as ddbcached-bench's preload does.
    for k in range(a.keys):
        once(k)
    warm_until = time.monotonic() + 1
    while time.monotonic() < warm_until:
        once()
    cpu_before = cpu_seconds(a.server_pid) if a.server_pid else None
    stop_at = time.monotonic() + a.seconds
    latencies = []
    while True:
        start = time.monotonic()
        if start >= stop_at:
            break
        once()
        latencies.append(time.monotonic() - start)
    cpu = cpu_seconds(a.server_pid) - cpu_before if a.server_pid else None
    latencies.sort()

    def pct(q):
        return latencies[min(int(len(latencies) * q), len(latencies) - 1)] * 1e6

    print(json.dumps({
        "target": a.target, "workload": a.workload, "connections": 1, "depth": 1,
        "value_bytes": a.value_bytes, "seconds": a.seconds, "requests": len(latencies),
        "ops_per_sec": len(latencies) / a.seconds,
        "p50_us": pct(0.5), "p99_us": pct(0.99), "p999_us": pct(0.999),
        "server_cpu_s_per_mop": cpu * 1e6 / len(latencies) if cpu is not None else None,
    }))


if __name__ == "__main__":
    main()
