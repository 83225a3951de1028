//! `perf steady`: how steady the machine's own compute speed is, with no gateway, broker or
//! MQTT at all.
//!
//! It runs the shipped model in-process on one thread, one batch size, back to back for
//! `--seconds`, and times the calls in buckets of `--bucket-ms`. On a quiet machine every
//! bucket takes about as long per call as the median; a stretch of slow buckets is the machine
//! (other tenants of a virtual machine's host, frequency changes) slowing the same code down,
//! and it slows a gateway by as much. Run it on an otherwise idle machine: with other work on
//! the same CPUs it measures that work instead.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use diredi_infer::Classifier;
use serde::Serialize;
use serde_json::json;

use super::report;
use crate::onnx_eval::PackagedModel;

/// Arguments of `perf steady`.
#[derive(clap::Args, Debug, Clone)]
pub struct SteadyArgs {
    /// Model manifest to run.
    #[arg(long, default_value = "onnx-models/hapt-student-v1.json")]
    pub model: PathBuf,
    /// Windows per call.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// How long to run.
    #[arg(long, default_value_t = 60.0)]
    pub seconds: f64,
    /// Length of one timing bucket.
    #[arg(long, default_value_t = 100)]
    pub bucket_ms: u64,
    /// A bucket is slow when its time per call is at least this many times the median.
    #[arg(long, default_value_t = 1.2)]
    pub slow: f64,
    /// Write the summary and every bucket here as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One timing bucket: calls that ended in it, and their mean time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Bucket {
    /// Start of the bucket, ms from the start of the run.
    pub at_ms: u64,
    pub calls: u32,
    pub us_per_call: f64,
}

/// A run of consecutive slow buckets.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stretch {
    pub at_ms: u64,
    pub length_ms: u64,
    /// Mean time per call over the stretch, as a multiple of the median bucket.
    pub slowdown: f64,
}

/// What the buckets show.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub buckets: usize,
    pub median_us_per_call: f64,
    pub p90_us_per_call: f64,
    pub p99_us_per_call: f64,
    pub max_us_per_call: f64,
    /// Share of buckets at least `slow` times the median.
    pub slow_share: f64,
    /// Stretches of at least three slow buckets in a row, in time order.
    pub stretches: Vec<Stretch>,
}

/// Summarises `buckets` (buckets with fewer than 3 calls are left out: a bucket that a single
/// call straddles says nothing about speed).
pub fn summarise(buckets: &[Bucket], slow: f64, bucket_ms: u64) -> Summary {
    let kept: Vec<Bucket> = buckets.iter().copied().filter(|b| b.calls >= 3).collect();
    let mut sorted: Vec<f64> = kept.iter().map(|b| b.us_per_call).collect();
    sorted.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        sorted
            .get(((sorted.len().saturating_sub(1)) as f64 * p).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    let median = pct(0.5);
    let is_slow = |b: &Bucket| median > 0.0 && b.us_per_call >= slow * median;
    let mut stretches = Vec::new();
    let mut run: Vec<Bucket> = Vec::new();
    let mut close = |run: &mut Vec<Bucket>| {
        if run.len() >= 3 {
            let mean = run.iter().map(|b| b.us_per_call).sum::<f64>() / run.len() as f64;
            stretches.push(Stretch {
                at_ms: run[0].at_ms,
                length_ms: run.len() as u64 * bucket_ms,
                slowdown: mean / median,
            });
        }
        run.clear();
    };
    for b in &kept {
        // A gap (a left-out bucket) ends a stretch too.
        let follows = run.last().is_none_or(|l| b.at_ms == l.at_ms + bucket_ms);
        if is_slow(b) && follows {
            run.push(*b);
        } else {
            close(&mut run);
            if is_slow(b) {
                run.push(*b);
            }
        }
    }
    close(&mut run);
    Summary {
        buckets: kept.len(),
        median_us_per_call: median,
        p90_us_per_call: pct(0.9),
        p99_us_per_call: pct(0.99),
        max_us_per_call: sorted.last().copied().unwrap_or(0.0),
        slow_share: kept.iter().filter(|b| is_slow(b)).count() as f64 / kept.len().max(1) as f64,
        stretches,
    }
}

/// Runs the model back to back and returns the buckets.
fn measure(args: &SteadyArgs) -> Result<Vec<Bucket>> {
    let pkg = PackagedModel::read(&args.model)?;
    let clf = crate::bench::session(&pkg, 1)?;
    let x = crate::bench::warmed_input(&clf, args.batch.max(1))?;
    let bucket_ms = args.bucket_ms.max(1);
    let bucket = Duration::from_millis(bucket_ms);
    let (mut out, mut calls, mut busy) = (Vec::new(), 0u32, Duration::ZERO);
    let start = Instant::now();
    let mut index = 0u64;
    while start.elapsed().as_secs_f64() < args.seconds {
        let t0 = Instant::now();
        clf.classify(x.view())?;
        let end = t0.elapsed();
        let now = (start.elapsed().as_nanos() / bucket.as_nanos()) as u64;
        if now != index {
            if calls > 0 {
                out.push(Bucket {
                    at_ms: index * bucket_ms,
                    calls,
                    us_per_call: busy.as_secs_f64() * 1e6 / f64::from(calls),
                });
            }
            (index, calls, busy) = (now, 0, Duration::ZERO);
        }
        calls += 1;
        busy += end;
    }
    Ok(out)
}

/// `perf steady`.
pub async fn run(args: SteadyArgs) -> Result<()> {
    eprintln!(
        "perf steady: {} windows per call for {} s, one ONNX Runtime thread, nothing else",
        args.batch, args.seconds
    );
    let a = args.clone();
    let buckets = tokio::task::spawn_blocking(move || measure(&a))
        .await
        .context("probe thread")??;
    let s = summarise(&buckets, args.slow, args.bucket_ms.max(1));
    if s.buckets == 0 {
        anyhow::bail!(
            "no bucket held 3 calls: give --seconds several times --bucket-ms, or a smaller --batch"
        );
    }
    println!(
        "median {:.0} µs per call of {} windows; p90 {:.2}×, p99 {:.2}×, max {:.2}× the median; \
         {:.1}% of {} buckets of {} ms at ≥ {}×; {} stretches of ≥ {} ms",
        s.median_us_per_call,
        args.batch,
        s.p90_us_per_call / s.median_us_per_call,
        s.p99_us_per_call / s.median_us_per_call,
        s.max_us_per_call / s.median_us_per_call,
        s.slow_share * 100.0,
        s.buckets,
        args.bucket_ms,
        args.slow,
        s.stretches.len(),
        3 * args.bucket_ms
    );
    for t in &s.stretches {
        println!(
            "  at {:.1} s: {} ms at {:.2}× the median",
            t.at_ms as f64 / 1e3,
            t.length_ms,
            t.slowdown
        );
    }
    if let Some(path) = &args.json {
        let doc = json!({
            "benchmark": "perf-steady",
            "machine": report::machine(),
            "profile": report::profile(),
            "batch": args.batch,
            "seconds": args.seconds,
            "bucket_ms": args.bucket_ms,
            "slow": args.slow,
            "summary": s,
            "buckets": buckets,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buckets(us: &[f64]) -> Vec<Bucket> {
        us.iter()
            .enumerate()
            .map(|(i, &u)| Bucket {
                at_ms: i as u64 * 100,
                calls: 10,
                us_per_call: u,
            })
            .collect()
    }

    #[test]
    fn a_steady_machine_has_no_slow_bucket() {
        let s = summarise(&buckets(&[1000.0, 1010.0, 990.0, 1005.0, 995.0]), 1.2, 100);
        assert_eq!(s.buckets, 5);
        assert_eq!(s.median_us_per_call, 1000.0);
        assert_eq!(s.slow_share, 0.0);
        assert!(s.stretches.is_empty());
    }

    #[test]
    fn three_slow_buckets_in_a_row_are_a_stretch_and_two_are_not() {
        let us = [
            1000.0, 1000.0, 1500.0, 1500.0, 1000.0, 1000.0, 2000.0, 2500.0, 3000.0, 1000.0, 1000.0,
        ];
        let s = summarise(&buckets(&us), 1.2, 100);
        assert_eq!(s.median_us_per_call, 1000.0);
        assert_eq!(
            s.stretches,
            vec![Stretch {
                at_ms: 600,
                length_ms: 300,
                slowdown: 2.5
            }]
        );
        assert!((s.slow_share - 5.0 / 11.0).abs() < 1e-12);
        assert_eq!(s.max_us_per_call, 3000.0);
    }

    #[test]
    fn buckets_with_too_few_calls_are_left_out_and_break_a_stretch() {
        let mut b = buckets(&[
            1000.0, 1000.0, 1000.0, 2000.0, 2000.0, 2000.0, 2000.0, 1000.0,
        ]);
        // The fifth bucket was straddled by one long call: not counted, and the slow run
        // around it is two buckets, then one.
        b[4].calls = 1;
        let s = summarise(&b, 1.2, 100);
        assert_eq!(s.buckets, 7);
        assert!(s.stretches.is_empty(), "{:?}", s.stretches);
    }

    #[test]
    fn no_bucket_gives_an_empty_summary() {
        let s = summarise(&[], 1.2, 100);
        assert_eq!(s.buckets, 0);
        assert_eq!(s.median_us_per_call, 0.0);
        assert!(s.stretches.is_empty());
    }
}
