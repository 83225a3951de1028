//! Inference speed of a packaged model in ONNX Runtime, in-process and without MQTT: the
//! "inference limit" against which the gateway is compared. Batch 1 and batch 64, one thread.

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

/// `batch` windows of `c` × `t` deterministic pseudo-random values in [-1, 1] (xorshift32):
/// the same input on every run, so speeds compare.
pub fn pseudo_random_batch(batch: usize, c: usize, t: usize) -> Array3<f32> {
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
    diredi_infer::init_runtime(None)?;
    let cfg = SessionConfig {
        intra_threads,
        ..SessionConfig::default()
    };
    let clf = OrtClassifier::from_bytes(&model.onnx, &cfg)?;
    let (c, t) = (clf.channels(), clf.window());
    let mut out = Vec::new();
    for &batch in batches {
        let x = pseudo_random_batch(batch, c, t);
        for _ in 0..20 {
            clf.classify(x.view())?;
        }
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
