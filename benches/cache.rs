//! A cache hit, without the socket: the moka lookup plus answering `get_latest(before)`
//! from a key holding 1, 10 or 100 versions; and moka's `future` cache against its `sync`
//! cache for the same hit, the measurement behind choosing between them on the hit path.
//! Run with `cargo bench --bench cache`.

use std::sync::Arc;

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use ddbcached::cache::{Cache, CacheKey, Cached, KeyBuf, KeyVersions};
use ddbcached::config::CacheConfig;

fn hits(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    let cache = Cache::new(&CacheConfig::default());
    let mut group = c.benchmark_group("cache hit");
    for versions in [1i64, 10, 100] {
        let name = format!("variable-{versions}");
        let key = CacheKey::kv("flow-7f3a9c", name.as_bytes());
        let newest_first = (0..versions)
            .rev()
            .map(|ts| (ts * 10, Bytes::from(vec![7u8; 64])))
            .collect();
        let entry = Cached::Kv(Arc::new(KeyVersions::from_fill(newest_first, true)));
        rt.block_on(async {
            let ticket = cache.ticket(&key);
            cache
                .commit_fill(key.clone(), ticket, |_| Some(entry))
                .await;
        });
        // As the executor asks: the newest version at or before a clock in the middle.
        let before = Some(versions * 5);
        // As the connection looks it up: by its flat form, as written into a `KeyBuf`.
        let flat = KeyBuf::default()
            .kv("flow-7f3a9c", name.as_bytes())
            .to_vec();
        group.bench_with_input(BenchmarkId::new("versions", versions), &flat, |b, flat| {
            b.to_async(&rt).iter(|| async {
                match cache.get(black_box(&flat[..])).await {
                    Some(Cached::Kv(v)) => v.latest(black_box(before)),
                    _ => unreachable!("the key was cached above"),
                }
            })
        });
    }
    group.finish();
}

/// The same lookup of a cached key in moka's `future` and `sync` caches, each built as
/// the daemon builds its cache (weigher, bounded size).
fn moka_flavours(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    let key = CacheKey::kv("flow-7f3a9c", b"variable");
    let entry = Cached::Kv(Arc::new(KeyVersions::from_fill(
        vec![(10, Bytes::from(vec![7u8; 64]))],
        true,
    )));
    let weigher = |_: &CacheKey, _: &Cached| 256u32;
    let future = moka::future::Cache::builder()
        .max_capacity(1 << 28)
        .weigher(weigher)
        .build();
    let sync = moka::sync::Cache::builder()
        .max_capacity(1 << 28)
        .weigher(weigher)
        .build();
    rt.block_on(future.insert(key.clone(), entry.clone()));
    sync.insert(key.clone(), entry);
    let mut group = c.benchmark_group("moka hit");
    group.bench_function("future", |b| {
        b.to_async(&rt)
            .iter(|| async { future.get(black_box(&key)).await })
    });
    group.bench_function("sync", |b| b.iter(|| sync.get(black_box(&key))));
    group.finish();
}

criterion_group!(benches, hits, moka_flavours);
criterion_main!(benches);
