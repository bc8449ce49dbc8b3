//! Figures: latency histograms (microseconds, 3 significant digits) and the server process's
//! RSS / CPU read from /proc.

use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde_json::{Value, json};

/// Highest latency recorded: one hour, in microseconds (larger values are clamped).
const MAX_US: u64 = 3_600_000_000;

pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("constant histogram bounds are valid")
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where the per-client recorders merge their samples. Each client keeps a small local buffer
/// (a full histogram per client would cost ~100 KiB × clients) and merges it into one of a few
/// shards; `merged()` adds the shards together at the end.
pub struct LatencySink {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl LatencySink {
    pub fn new() -> Arc<LatencySink> {
        Arc::new(LatencySink {
            shards: (0..32).map(|_| Mutex::new(new_hist())).collect(),
        })
    }

    pub fn recorder(self: &Arc<Self>, key: usize) -> LatencyRecorder {
        LatencyRecorder {
            buf: Vec::with_capacity(64),
            key,
            sink: self.clone(),
        }
    }

    pub fn merged(&self) -> Histogram<u64> {
        let mut total = new_hist();
        for shard in &self.shards {
            let _ = total.add(&*lock(shard));
        }
        total
    }
}

/// One client's latency recorder; flushes into the sink when its buffer fills and on drop.
pub struct LatencyRecorder {
    buf: Vec<u64>,
    key: usize,
    sink: Arc<LatencySink>,
}

impl LatencyRecorder {
    /// Records a latency given in nanoseconds.
    pub fn record_ns(&mut self, ns: u64) {
        self.buf.push((ns / 1000).max(1));
        if self.buf.len() >= 256 {
            self.flush();
        }
    }

    pub fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let shard = &self.sink.shards[self.key % self.sink.shards.len()];
        let mut h = lock(shard);
        for v in self.buf.drain(..) {
            h.saturating_record(v);
        }
    }
}

impl Drop for LatencyRecorder {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Percentiles in milliseconds.
pub struct LatSummary {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl LatSummary {
    pub fn of(h: &Histogram<u64>) -> LatSummary {
        let ms = |us: u64| us as f64 / 1000.0;
        if h.is_empty() {
            return LatSummary {
                count: 0,
                p50: 0.0,
                p90: 0.0,
                p99: 0.0,
                p999: 0.0,
                max: 0.0,
                mean: 0.0,
            };
        }
        LatSummary {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }

    pub fn json(&self) -> Value {
        json!({
            "count": self.count,
            "p50": round3(self.p50),
            "p90": round3(self.p90),
            "p99": round3(self.p99),
            "p999": round3(self.p999),
            "max": round3(self.max),
            "mean": round3(self.mean),
        })
    }

    pub fn line(&self) -> String {
        format!(
            "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  (ms, {} samples)",
            self.p50, self.p90, self.p99, self.p999, self.max, self.count
        )
    }
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// One reading of the server process.
#[derive(Clone, Copy, Debug)]
pub struct ProcSample {
    pub rss_kib: u64,
    pub cpu_s: f64,
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Reads VmRSS from /proc/PID/status and utime+stime from /proc/PID/stat.
pub fn proc_sample(pid: u32) -> Result<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status (is --server-pid right?)"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .context("no VmRSS in /proc/PID/status")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count from its end.
    let after = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .context("malformed /proc/PID/stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3, so utime (14) and stime (15) are at indexes 11 and 12.
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .context("malformed /proc/PID/stat")
    };
    let cpu_s = (ticks(11)? + ticks(12)?) as f64 / clk_tck();
    Ok(ProcSample { rss_kib, cpu_s })
}

/// Reads the server's figures if a pid was given, warning (not failing) when it cannot.
pub fn maybe_sample(pid: Option<u32>) -> Option<ProcSample> {
    let pid = pid?;
    match proc_sample(pid) {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("warning: {e:#}");
            None
        }
    }
}

/// `{"rss_before_kib":..,"rss_after_kib":..,"rss_growth_kib":..,"cpu_s":..}` and a human line.
pub fn proc_delta(before: Option<ProcSample>, after: Option<ProcSample>) -> (Value, String) {
    match (before, after) {
        (Some(b), Some(a)) => {
            let growth = a.rss_kib as i64 - b.rss_kib as i64;
            let cpu = a.cpu_s - b.cpu_s;
            (
                json!({
                    "rss_before_kib": b.rss_kib,
                    "rss_after_kib": a.rss_kib,
                    "rss_growth_kib": growth,
                    "cpu_s": round3(cpu),
                }),
                format!(
                    "server: RSS {:.1} MiB -> {:.1} MiB ({:+.1} MiB), CPU {:.2} s",
                    b.rss_kib as f64 / 1024.0,
                    a.rss_kib as f64 / 1024.0,
                    growth as f64 / 1024.0,
                    cpu
                ),
            )
        }
        _ => (Value::Null, String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorder_merges_into_sink() {
        let sink = LatencySink::new();
        {
            let mut r = sink.recorder(3);
            for i in 1..=1000u64 {
                r.record_ns(i * 1_000_000);
            }
        }
        let h = sink.merged();
        assert_eq!(h.len(), 1000);
        let s = LatSummary::of(&h);
        assert!((s.p50 - 500.0).abs() < 1.0, "{}", s.p50);
    }

    #[test]
    fn reads_own_process() {
        let s = proc_sample(std::process::id()).expect("own /proc");
        assert!(s.rss_kib > 0);
    }
}
