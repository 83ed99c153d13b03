//! Random names, keys and values, like the shared backend suite's.

use bytes::Bytes;
use rand::distr::{Alphanumeric, SampleString};
use rand::Rng;

/// A random alphanumeric name of 3 to 255 characters, like the shared backend suite's.
pub fn name() -> String {
    let len = rand::rng().random_range(3..=255);
    Alphanumeric.sample_string(&mut rand::rng(), len)
}

/// 1 to 100 random bytes (a key).
pub fn key() -> Bytes {
    let len = rand::rng().random_range(1..=100);
    random_bytes(len)
}

/// 0 to 100 random bytes (a value).
pub fn value() -> Bytes {
    let len = rand::rng().random_range(0..=100);
    random_bytes(len)
}

fn random_bytes(len: usize) -> Bytes {
    let mut v = vec![0u8; len];
    rand::rng().fill(&mut v[..]);
    Bytes::from(v)
}
