//! `publish-fanout` (issue 12's benchmark) run small against the real server, once per wire:
//! the benchmark's own checks (loss, duplicates, order, connects) must all come out clean, so
//! the suite gates the code that produces BENCHMARKS.md's figures.

mod support;

use support::{run_bench, start_server};

/// Runs `publish-fanout --wire <wire>` with 20 clients and 50 messages; returns the exit
/// status's success and the final JSON line.
fn publish_fanout(wire: &str) -> (bool, serde_json::Value, String) {
    let server = start_server(&[]);
    let pid = server.child.id().to_string();
    let args = [
        "--server-pid",
        &pid,
        "--timeout",
        "60",
        "publish-fanout",
        "--wire",
        wire,
        "--clients",
        "20",
        "--messages",
        "50",
        "--size",
        "128",
    ];
    run_bench(&server, &args)
}

fn assert_clean(wire: &str) {
    let (ok, json, stdout) = publish_fanout(wire);
    let n = |key: &str| json[key].as_u64();
    assert!(ok, "publish-fanout --wire {wire} failed:\n{stdout}");
    assert_eq!(json["scenario"], "publish-fanout", "{stdout}");
    assert_eq!(json["wire"], wire, "{stdout}");
    assert_eq!(json["connect"]["acknowledged"], 20, "{stdout}");
    assert_eq!(n("sent"), Some(50), "{stdout}");
    assert_eq!(n("expected_deliveries"), Some(1000), "{stdout}");
    assert_eq!(n("deliveries"), Some(1000), "{stdout}");
    for error in [
        "lost",
        "duplicated",
        "reordered",
        "misdelivered",
        "unparsable",
    ] {
        assert_eq!(n(error), Some(0), "{error} in:\n{stdout}");
    }
    assert!(
        json["deliveries_per_server_cpu_s"].as_f64().is_some(),
        "no deliveries per server-CPU-second in:\n{stdout}"
    );
}

#[test]
fn jssocket_subscribers_get_every_publish_once_in_order() {
    assert_clean("jssocket");
}

#[test]
fn signalr_clients_get_every_publish_once_in_order() {
    assert_clean("signalr");
}
