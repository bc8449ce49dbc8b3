//! Scraping `/metrics`: the text exposition parsed by `prometheus-parse`, read back by sample
//! name and labels.

use std::net::SocketAddr;
use std::time::Duration;

use prometheus_parse::{HistogramCount, LineInfo, Value};

use super::{RECV_TIMEOUT, http};

/// One sample of a scrape (a histogram's buckets are in [`Histogram`] instead).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    /// Sorted by name, so two scrapes compare equal whatever order the parser keeps.
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// One histogram of a scrape: its `_bucket` samples, by upper bound. Its `_sum` and `_count`
/// are ordinary [`Sample`]s.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    /// The family's name, without `_bucket`.
    pub name: String,
    /// Sorted by name; `le` is not among them.
    pub labels: Vec<(String, String)>,
    /// In exposition order.
    pub buckets: Vec<HistogramCount>,
}

/// A parsed `/metrics` scrape.
#[derive(Debug, Clone)]
pub struct Scrape {
    /// Every sample but histogram buckets, in exposition order.
    pub samples: Vec<Sample>,
    pub histograms: Vec<Histogram>,
    /// `# TYPE` lines: metric family → type.
    types: Vec<(String, String)>,
}

impl Scrape {
    /// Parses the Prometheus or OpenMetrics text exposition; panics on a line that is neither
    /// a comment, blank, nor a sample with a number (the parser would skip it silently).
    pub fn parse(text: &str) -> Scrape {
        let mut bucket_lines = 0;
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            match LineInfo::parse(line) {
                LineInfo::Sample {
                    metric_name, value, ..
                } if value.parse::<f64>().is_ok() => {
                    bucket_lines += usize::from(metric_name.ends_with("_bucket"));
                }
                _ => panic!("malformed metrics line {line:?}"),
            }
        }
        let parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
            .expect("reading a string cannot fail");
        let mut samples = Vec::new();
        let mut histograms = Vec::new();
        for sample in parsed.samples {
            let mut labels: Vec<(String, String)> = sample
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            labels.sort();
            match sample.value {
                Value::Counter(value) | Value::Gauge(value) | Value::Untyped(value) => samples
                    .push(Sample {
                        name: sample.metric,
                        labels,
                        value,
                    }),
                Value::Histogram(buckets) => histograms.push(Histogram {
                    name: sample.metric,
                    labels,
                    buckets,
                }),
                Value::Summary(_) => panic!("jssocket exports no summary: {}", sample.metric),
            }
        }
        // The parser skips a bucket whose `le` is not a number: none may be missing.
        let buckets: usize = histograms.iter().map(|h| h.buckets.len()).sum();
        assert_eq!(
            buckets, bucket_lines,
            "malformed histogram buckets in {text}"
        );
        // The parser gathers histograms in a hash map: put them in a stable order.
        histograms.sort_by(|a, b| (&a.name, &a.labels).cmp(&(&b.name, &b.labels)));
        // The parser keys a type by sample name; OpenMetrics declares a counter by family
        // name (without `_total`), which is what [`Scrape::type_of`] is asked about.
        let types = text
            .lines()
            .filter_map(|line| {
                let mut words = line.strip_prefix("# TYPE ")?.split_whitespace();
                Some((words.next()?.to_string(), words.next()?.to_string()))
            })
            .collect();
        Scrape {
            samples,
            histograms,
            types,
        }
    }

    /// The value of the sample `name` whose labels are exactly `labels` (in any order).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| s.name == name && same_labels(&s.labels, labels))
            .map(|s| s.value)
    }

    /// Like [`Scrape::get`], panicking (with the scrape) when the sample is missing.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or_else(|| {
            let names: Vec<String> = self
                .samples
                .iter()
                .map(|s| format!("{}{:?}", s.name, s.labels))
                .collect();
            panic!("no metric {name}{labels:?} in scrape: {names:#?}")
        })
    }

    /// The buckets of histogram `name` (without `_bucket`) whose other labels are exactly
    /// `labels`; panics when there is no such histogram.
    pub fn buckets(&self, name: &str, labels: &[(&str, &str)]) -> &[HistogramCount] {
        self.histograms
            .iter()
            .find(|h| h.name == name && same_labels(&h.labels, labels))
            .map(|h| h.buckets.as_slice())
            .unwrap_or_else(|| panic!("no histogram {name}{labels:?} in scrape"))
    }

    /// The declared type of family `name` (`counter`, `gauge`, `histogram`, …).
    pub fn type_of(&self, name: &str) -> Option<&str> {
        self.types
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.as_str())
    }
}

fn same_labels(have: &[(String, String)], want: &[(&str, &str)]) -> bool {
    have.len() == want.len()
        && want
            .iter()
            .all(|(k, v)| have.iter().any(|(hk, hv)| hk == k && hv == v))
}

/// `GET /metrics`, checked (200, OpenMetrics/Prometheus text) and parsed.
pub async fn scrape(addr: SocketAddr) -> Scrape {
    let response = http(addr, "GET", "/metrics", &[], b"").await;
    assert_eq!(response.status, 200, "GET /metrics: {}", response.text());
    Scrape::parse(&response.text())
}

/// Scrapes until the sample `name{labels}` equals `expected` (metrics are updated by other
/// tasks a moment after the frames they count), panicking with the last value after
/// [`RECV_TIMEOUT`].
pub async fn wait_metric(addr: SocketAddr, name: &str, labels: &[(&str, &str)], expected: f64) {
    let deadline = tokio::time::Instant::now() + RECV_TIMEOUT;
    loop {
        let got = scrape(addr).await.get(name, labels);
        if got == Some(expected) {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!(
                "metric {name}{labels:?}: expected {expected}, still {got:?} after {RECV_TIMEOUT:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One expected sample: name, labels, value.
pub type Expect<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);

/// Scrapes until every sample in `expected` has its value at once (see [`wait_metric`]);
/// returns that scrape, or panics listing the mismatches after [`RECV_TIMEOUT`].
pub async fn wait_metrics(addr: SocketAddr, expected: &[Expect<'_>]) -> Scrape {
    let deadline = tokio::time::Instant::now() + RECV_TIMEOUT;
    loop {
        let scrape = scrape(addr).await;
        let wrong: Vec<String> = expected
            .iter()
            .filter_map(|(name, labels, value)| {
                let got = scrape.get(name, labels);
                (got != Some(*value))
                    .then(|| format!("{name}{labels:?}: expected {value}, got {got:?}"))
            })
            .collect();
        if wrong.is_empty() {
            return scrape;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("metrics after {RECV_TIMEOUT:?}:\n{}", wrong.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
