//! The raw-frame baseline of issue 16 (`raw-server`) run small through the bench's own
//! scenarios: every check (loss, duplicates, order, routing, connects) must come out clean, so
//! the ratios `compare` reports stand on a server known to do the whole job; and `compare`
//! itself, tiny, against the built jssocket.

mod support;

use std::process::{Command, Stdio};

use serde_json::Value;
use support::{BENCH, run_bench, server_bin, start_raw_server};

fn assert_zero(json: &Value, keys: &[&str], stdout: &str) {
    for key in keys {
        assert_eq!(json[*key].as_u64(), Some(0), "{key} in:\n{stdout}");
    }
}

#[test]
fn fanout_through_the_raw_server_loses_nothing() {
    let server = start_raw_server();
    let pid = server.child.id().to_string();
    let (ok, json, stdout) = run_bench(
        &server,
        &[
            "--server-pid",
            &pid,
            "--timeout",
            "60",
            "fanout",
            "--clients",
            "50",
            "--messages",
            "300",
            "--size",
            "100",
            "--window",
            "10",
        ],
    );
    assert!(ok, "fanout against the raw server failed:\n{stdout}");
    assert_eq!(json["connect"]["acknowledged"], 50, "{stdout}");
    assert_eq!(json["deliveries"].as_u64(), Some(15_000), "{stdout}");
    assert_zero(
        &json,
        &[
            "lost",
            "duplicated",
            "reordered",
            "misdelivered",
            "unparsable",
        ],
        &stdout,
    );
}

#[test]
fn p2p_and_groups_through_the_raw_server_lose_nothing() {
    let server = start_raw_server();
    let (ok, json, stdout) = run_bench(
        &server,
        &[
            "--timeout",
            "60",
            "p2p",
            "--clients",
            "50",
            "--rate",
            "500",
            "--duration",
            "1",
            "--size",
            "100",
        ],
    );
    assert!(ok, "p2p against the raw server failed:\n{stdout}");
    assert!(json["delivered"].as_u64() >= Some(400), "{stdout}");
    assert_eq!(json["delivered"], json["sent"], "{stdout}");
    assert_zero(&json, &["lost", "duplicated", "misrouted"], &stdout);

    let (ok, json, stdout) = run_bench(
        &server,
        &[
            "--timeout",
            "60",
            "group",
            "--clients",
            "40",
            "--groups",
            "4",
            "--messages",
            "200",
            "--size",
            "100",
        ],
    );
    assert!(ok, "group against the raw server failed:\n{stdout}");
    assert_eq!(json["deliveries"].as_u64(), Some(2_000), "{stdout}");
    assert_zero(&json, &["lost", "duplicated", "misdelivered"], &stdout);
}

#[test]
fn compare_runs_each_scenario_against_both_servers() {
    let log_dir = std::env::temp_dir().join(format!("raw-server-test-{}", std::process::id()));
    let out = Command::new(BENCH)
        .args([
            "--timeout",
            "60",
            "--progress",
            "0",
            "compare",
            "--server-bin",
        ])
        .arg(server_bin())
        .args([
            "--rounds",
            "2",
            "--scale",
            "0.01",
            "--scenarios",
            "fanout-1k,p2p-5k,rss-10k",
            "--p2p-duration",
            "1",
            "--hold",
            "0",
            "--log-dir",
        ])
        .arg(&log_dir)
        .env_remove("BENCH_URL")
        .env_remove("BENCH_AUTH")
        .env_remove("JSSOCKET_BIN")
        .stdin(Stdio::null())
        .output()
        .expect("running jssocket-bench compare");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let _ = std::fs::remove_dir_all(&log_dir);
    assert!(out.status.success(), "compare failed:\n{stdout}");
    let json: Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(Value::Null);
    assert_eq!(json["ok"], true, "{stdout}");
    let results = json["results"].as_array().expect("results");
    assert_eq!(results.len(), 3, "{stdout}");
    for r in results {
        let runs = r["runs"].as_array().expect("runs");
        // Two rounds, each one run per server, in alternating order.
        let order: Vec<&str> = runs.iter().filter_map(|x| x["server"].as_str()).collect();
        assert_eq!(order, ["raw", "jssocket", "jssocket", "raw"], "{stdout}");
        assert!(runs.iter().all(|x| x["ok"] == true), "{stdout}");
    }
    // Memory needs no CPU to measure: both servers give a figure, and so a ratio.
    assert_eq!(
        results[2]["ratios"].as_array().map(Vec::len),
        Some(2),
        "{stdout}"
    );
}
