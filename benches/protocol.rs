//! Frame bodies on the hot path: encoding and decoding a `kv.get` request (owned, as a
//! miss is read, and borrowed, as the connection reads a hit) and its reply, with 64-byte
//! and 4 KiB values. Run with `cargo bench --bench protocol`.

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use ddbcached_protocol::codec::{
    decode_request, decode_request_ref, decode_response, encode_reply, encode_request, write_reply,
};
use ddbcached_protocol::{Reply, Request, Versioned};

fn request() -> Request {
    Request::KvGet {
        ns: "flow-7f3a9c".into(),
        key: Bytes::from_static(b"variable/counter"),
        before: Some(1_700_000_000),
        consistent: false,
    }
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("request");
    let req = request();
    let body = encode_request(42, &req);
    g.bench_function("encode kv.get", |b| {
        b.iter(|| encode_request(black_box(42), black_box(&req)))
    });
    g.bench_function("decode kv.get", |b| {
        b.iter(|| decode_request(black_box(&body)).unwrap())
    });
    g.bench_function("decode kv.get borrowed", |b| {
        b.iter(|| decode_request_ref(black_box(&body)).unwrap())
    });
    g.finish();

    let mut g = c.benchmark_group("reply");
    for size in [64usize, 4096] {
        let reply = Reply::Value(Some(Versioned {
            ts: 1_700_000_000,
            value: Bytes::from(vec![0xab; size]),
        }));
        let body = encode_reply(Some(42), &reply);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(format!("encode value {size} B"), |b| {
            b.iter(|| encode_reply(black_box(Some(42)), black_box(&reply)))
        });
        let mut out = Vec::with_capacity(2 * size + 64);
        g.bench_function(format!("write value {size} B into a buffer"), |b| {
            b.iter(|| {
                out.clear();
                write_reply(&mut out, black_box(Some(42)), black_box(&reply));
            })
        });
        g.bench_function(format!("decode value {size} B"), |b| {
            b.iter(|| decode_response(black_box(&body)).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
