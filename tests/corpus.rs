//! Replays the fuzzers' committed corpus (`fuzz/corpus/<target>/`, which also holds every
//! input a fuzzer crashed on) through the checks the fuzz targets run.

#[path = "../fuzz/checks.rs"]
mod checks;

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut inputs = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        if std::panic::catch_unwind(|| check(&data)).is_err() {
            panic!("{} fails its check (the message is above)", path.display());
        }
        inputs += 1;
    }
    // An empty or missing corpus would make this test pass without checking anything.
    assert!(inputs >= 10, "{}: only {inputs} inputs", dir.display());
}

#[test]
fn frames_corpus() {
    replay("frames", checks::frames);
}

#[test]
fn request_corpus() {
    replay("request", checks::request);
}

#[test]
fn response_corpus() {
    replay("response", checks::response);
}
