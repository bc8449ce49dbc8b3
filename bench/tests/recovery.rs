//! `recovery` (issue 14's benchmark) run small against the real server: 20 subscribers of a
//! history channel drop their connections, miss 10 publications and reconnect with `since`;
//! every one must be recovered with exactly the 10 in order, so the suite gates the code that
//! produces BENCHMARKS.md's figures.

mod support;

use support::{run_bench, start_server};

const HISTORY: [&str; 2] = ["--history", "bench.*=100/10m"];

#[test]
fn every_client_recovers_exactly_the_missed_publications_in_order() {
    let server = start_server(&HISTORY);
    let args = [
        "--timeout",
        "60",
        "recovery",
        "--clients",
        "20",
        "--missed",
        "10",
    ];
    let (ok, json, stdout) = run_bench(&server, &args);
    assert!(ok, "recovery failed:\n{stdout}");
    assert_eq!(json["scenario"], "recovery", "{stdout}");
    assert_eq!(json["recovered"], 20, "{stdout}");
    assert_eq!(json["exact"], 20, "{stdout}");
    assert_eq!(json["publications_received"], 200, "{stdout}");
    assert_eq!(json["failures"]["total"], 0, "{stdout}");
    assert!(
        json["seconds_to_last_recovery"]
            .as_f64()
            .is_some_and(|s| s > 0.0),
        "no time to the last recovery in:\n{stdout}"
    );
}

#[test]
fn without_history_the_bench_fails_and_says_so() {
    // A channel the server keeps no history of: `since` cannot be honoured (no offsets), so
    // the bench must exit 1 rather than report figures.
    let server = start_server(&HISTORY);
    let args = [
        "--timeout",
        "30",
        "--ack-timeout",
        "3",
        "recovery",
        "--clients",
        "5",
        "--channel",
        "nohistory",
    ];
    let (ok, _, stdout) = run_bench(&server, &args);
    assert!(!ok, "recovery without history succeeded:\n{stdout}");
}
