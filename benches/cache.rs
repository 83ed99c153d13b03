//! A cache hit, without the socket: the moka lookup plus answering `get_latest(before)`
//! from a key holding 1, 10 or 100 versions. Run with `cargo bench --bench cache`.

use std::sync::Arc;

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use ddbcached::cache::{Cache, CacheKey, Cached, KeyVersions};
use ddbcached::config::CacheConfig;

fn hits(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    let cache = Cache::new(&CacheConfig::default());
    let mut group = c.benchmark_group("cache hit");
    for versions in [1i64, 10, 100] {
        let key = CacheKey::Kv(
            "flow-7f3a9c".into(),
            Bytes::from(format!("variable-{versions}")),
        );
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
        group.bench_with_input(BenchmarkId::new("versions", versions), &key, |b, key| {
            b.to_async(&rt).iter(|| async {
                match cache.get(black_box(key)).await {
                    Some(Cached::Kv(v)) => v.latest(black_box(before)),
                    _ => unreachable!("the key was cached above"),
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, hits);
criterion_main!(benches);
