//! Inference speed of a packaged model in ONNX Runtime, in-process and without MQTT: the
//! "inference limit" against which the gateway is compared. Batch 1 and batch 64, one thread;
//! and the same model on every CPU at once, the most inference the machine can do.

use std::time::Instant;

use anyhow::Result;
use diredi_infer::{Classifier, OrtClassifier, SessionConfig};
use ndarray::Array3;
use serde::Serialize;

use crate::onnx_eval::PackagedModel;

/// One measured configuration.
#[derive(Debug, Clone, Serialize)]
pub struct SpeedResult {
    pub batch: usize,
    pub intra_threads: usize,
    pub iterations: usize,
    pub windows: usize,
    pub seconds: f64,
    pub ms_per_window: f64,
    pub windows_per_second: f64,
    pub ms_per_batch_p50: f64,
    pub ms_per_batch_p99: f64,
}

/// A session of `model` on `intra_threads` ONNX Runtime threads.
pub fn session(model: &PackagedModel, intra_threads: usize) -> Result<OrtClassifier> {
    diredi_infer::init_runtime(None)?;
    let cfg = SessionConfig {
        intra_threads,
        ..SessionConfig::default()
    };
    Ok(OrtClassifier::from_bytes(&model.onnx, &cfg)?)
}

/// `batch` pseudo-random windows for `clf`, after 20 warm-up calls on them.
pub fn warmed_input(clf: &OrtClassifier, batch: usize) -> Result<Array3<f32>> {
    let x = pseudo_random_batch(batch, clf.channels(), clf.window());
    for _ in 0..20 {
        clf.classify(x.view())?;
    }
    Ok(x)
}

/// `batch` windows of `c` × `t` deterministic pseudo-random values in [-1, 1] (xorshift32):
/// the same input on every run, so speeds compare.
fn pseudo_random_batch(batch: usize, c: usize, t: usize) -> Array3<f32> {
    let mut state = 0x2545_f491_u32;
    Array3::from_shape_fn((batch, c, t), |_| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        (state as f32 / u32::MAX as f32) * 2.0 - 1.0
    })
}

/// Runs `model` on deterministic pseudo-random windows for about `seconds` per batch size.
pub fn model_speed(
    model: &PackagedModel,
    batches: &[usize],
    intra_threads: usize,
    seconds: f64,
) -> Result<Vec<SpeedResult>> {
    let clf = session(model, intra_threads)?;
    let mut out = Vec::new();
    for &batch in batches {
        let x = warmed_input(&clf, batch)?;
        let mut lat = Vec::new();
        let start = Instant::now();
        while start.elapsed().as_secs_f64() < seconds || lat.len() < 50 {
            let t0 = Instant::now();
            clf.classify(x.view())?;
            lat.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        let total = start.elapsed().as_secs_f64();
        lat.sort_by(f64::total_cmp);
        let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
        let windows = lat.len() * batch;
        out.push(SpeedResult {
            batch,
            intra_threads,
            iterations: lat.len(),
            windows,
            seconds: total,
            ms_per_window: total * 1e3 / windows as f64,
            windows_per_second: windows as f64 / total,
            ms_per_batch_p50: pct(0.5),
            ms_per_batch_p99: pct(0.99),
        });
    }
    Ok(out)
}

/// The model on every CPU at once: one single-threaded session per thread, all started
/// together. With nothing else running, this is the most inference the machine can do with
/// ONNX Runtime, so no gateway running the model in ONNX Runtime on it can deliver more.
#[derive(Debug, Clone, Serialize)]
pub struct ParallelSpeed {
    /// Sessions run at once (one thread each).
    pub sessions: usize,
    pub batch: usize,
    /// windows/s of each session.
    pub per_session: Vec<f64>,
    /// Their sum.
    pub windows_per_second: f64,
}

/// Runs `sessions` copies of `model` at once, each on its own thread with a one-thread session
/// and batches of `batch`, for about `seconds` after a common start.
pub fn parallel_model_speed(
    model: &PackagedModel,
    sessions: usize,
    batch: usize,
    seconds: f64,
) -> Result<ParallelSpeed> {
    let sessions = sessions.max(1);
    let start = std::sync::Barrier::new(sessions);
    let per_session = std::thread::scope(|s| {
        let runs: Vec<_> = (0..sessions)
            .map(|_| s.spawn(|| one_session(model, batch, seconds, &start)))
            .collect();
        runs.into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("an inference thread panicked"))?
            })
            .collect::<Result<Vec<f64>>>()
    })?;
    Ok(ParallelSpeed {
        sessions,
        batch,
        windows_per_second: per_session.iter().sum(),
        per_session,
    })
}

/// One session of [`parallel_model_speed`]: set up and warm up, wait for the others, then
/// run for `seconds` and return windows/s.
fn one_session(
    model: &PackagedModel,
    batch: usize,
    seconds: f64,
    start: &std::sync::Barrier,
) -> Result<f64> {
    let setup = session(model, 1).and_then(|clf| Ok((warmed_input(&clf, batch.max(1))?, clf)));
    // Every thread reaches the barrier, also one whose setup failed, so none waits forever.
    start.wait();
    let (x, clf) = setup?;
    let (t0, mut calls) = (Instant::now(), 0usize);
    while t0.elapsed().as_secs_f64() < seconds || calls < 10 {
        clf.classify(x.view())?;
        calls += 1;
    }
    Ok((calls * x.shape()[0]) as f64 / t0.elapsed().as_secs_f64())
}
