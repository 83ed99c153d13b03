//! A cache hit allocates nothing of its own: the request is decoded borrowing from its
//! frame, the key is looked up in its flat form written into a reused buffer, the cached
//! value is shared, and the reply is encoded into the connection's reused output buffer.
//! This test runs that path (the service's own `answer_from_cache`) under an allocator
//! that counts the calls made on its thread. It is a binary of its own, so that its
//! allocator counts nothing else.
//!
//! moka itself allocates now and then: every 64 reads, a read runs the cache's
//! housekeeping (about 0.5 allocations each time in moka 0.12's `sync` cache, which the
//! daemon uses; 5.5 in its `future` one). So the path is compared with the bare lookups
//! of the same key.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use bytes::Bytes;
use ddbcached::cache::{CacheKey, Cached, KeyBuf, KeyVersions, TopicTail};
use ddbcached::config::Config;
use ddbcached::daemon::Daemon;
use ddbcached::store::StoreTable;
use ddbcached_protocol::codec::{decode_request_ref, encode_request, write_reply};
use ddbcached_protocol::Request;

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    // `try_with`: the thread's slot may already be gone while the thread exits.
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

const HITS: u64 = 100_000;

#[tokio::test]
async fn a_hit_allocates_nothing() {
    // Nothing here calls DynamoDB: the endpoint is never reached.
    let mut config = Config::default();
    config.dynamodb.endpoint = "http://127.0.0.1:9".into();
    config.dynamodb.region = "us-east-1".into();
    config.dynamodb.use_dummy_credentials = true;
    let dir = tempfile::tempdir().unwrap();
    config.server.socket_path = dir.path().join("ddbcached.sock");
    config.metrics.listen = String::new();
    let daemon = Daemon::start_without_tailers(&config).await.unwrap();
    let service = daemon.service();
    let cache = service.cache();
    let kv = CacheKey::kv("flows", b"flow-1/variable");
    let versions = vec![
        (20, Bytes::from(vec![7u8; 64])),
        (10, Bytes::from(vec![6u8; 64])),
    ];
    let entry = Cached::Kv(Arc::new(KeyVersions::from_fill(versions, true)));
    assert!(
        cache
            .commit_fill(kv.clone(), cache.ticket(&kv), |_| Some(entry))
            .await
    );
    let topic = CacheKey::log("flow-1");
    let tail = Cached::Log(Arc::new(TopicTail::at(3, 16)));
    assert!(
        cache
            .commit_fill(topic.clone(), cache.ticket(&topic), |_| Some(tail))
            .await
    );
    let now = tokio::time::Instant::now();
    for table in StoreTable::ALL {
        service.coherence().fresh_as_of(table, Some(now));
    }
    let frames = [
        Request::KvGet {
            ns: "flows".into(),
            key: Bytes::from_static(b"flow-1/variable"),
            before: Some(15),
            consistent: false,
        },
        Request::KvLatestTs {
            ns: "flows".into(),
            key: Bytes::from_static(b"flow-1/variable"),
        },
        Request::LogPosition {
            topic: "flow-1".into(),
        },
    ]
    .map(|r| encode_request(1, &r));

    let mut keys = KeyBuf::default();
    let mut output = Vec::with_capacity(64 * 1024);
    let mut hit = async |i: u64| {
        let (id, request) = decode_request_ref(&frames[(i % 3) as usize]).expect("decodes");
        match service.answer_from_cache(request, &mut keys, now).await {
            Ok(reply) => write_reply(&mut output, Some(id), &reply),
            Err(_) => panic!("request {i} was not a hit"),
        }
        if output.len() > 32 * 1024 {
            output.clear();
        }
    };
    // The first hits size the reused buffers and moka's internal queues.
    for i in 0..1000 {
        hit(i).await;
    }
    let before = allocations();
    for i in 0..HITS {
        hit(i).await;
    }
    let made = allocations() - before;
    let flat = KeyBuf::default().kv("flows", b"flow-1/variable").to_vec();
    let before = allocations();
    for _ in 0..HITS {
        assert!(cache.get(&flat[..]).await.is_some());
    }
    let by_moka = allocations() - before;
    println!("{made} allocations in {HITS} hits; {by_moka} in as many bare lookups");
    assert!(
        made <= by_moka + HITS / 1000,
        "{made} allocations in {HITS} hits, {by_moka} in the lookups alone: a hit allocates"
    );
    // And moka's share stays what it is (about one in a hundred reads).
    assert!(
        by_moka * 50 < HITS,
        "{by_moka} allocations in {HITS} lookups"
    );
}
