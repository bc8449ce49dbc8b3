//! Replays the fuzzer's saved inputs through the fuzz harness (`fuzz/src/harness.rs`, the
//! same code the `cargo fuzz` target runs), without libFuzzer: the hand-written seeds in
//! `fuzz/seeds/` and every input that once crashed, saved in `fuzz/regressions/`.

#[path = "../fuzz/src/harness.rs"]
mod harness;

use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

fn inputs(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join(dir);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| {
            path.is_file()
                && !path
                    .file_name()
                    .is_some_and(|name| name.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    files
}

fn replay(files: &[PathBuf]) {
    let mut failed = Vec::new();
    for file in files {
        let data = fs::read(file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        if catch_unwind(AssertUnwindSafe(|| harness::run(&data))).is_err() {
            failed.push(file.display().to_string());
        }
    }
    assert!(failed.is_empty(), "inputs that fail: {failed:?}");
}

#[test]
fn fuzz_seeds_replay_cleanly() {
    let seeds = inputs("seeds");
    assert!(!seeds.is_empty(), "fuzz/seeds is empty");
    replay(&seeds);
}

#[test]
fn fuzz_regressions_replay_cleanly() {
    replay(&inputs("regressions"));
}

/// The harness itself notices what it is meant to: a message from each kind of connection,
/// ids substituted, and an input that closes connections midway.
#[test]
fn harness_runs_scripts_that_close_connections() {
    let script: &[&[u8]] = &[
        b"\x00{\"type\":\"notify_client\",\"data\":{\"target\":\"@2\",\"data\":{\"a\":1}}}",
        b"\x04{\"type\":\"server_connect\",\"data\":{}}",
        b"\x03{\"type\":\"client_disconnect\"}",
        b"\x00{\"type\":\"client_disconnect\"}",
        b"\x02{\"type\":\"client_connect\",\"data\":{}}",
    ];
    harness::run(&script.join(&0xFF));
}
