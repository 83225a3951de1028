//! Integration tests of `diredi-learn`: the exported student in ONNX Runtime on real HAPT
//! windows, and checkpoints. The full teacher → student run and its targets are a benchmark
//! (`diredi-cloud-worker pipeline --json`), not a test.
//!
//! Tests that need the ONNX Runtime library (`scripts/fetch-onnxruntime.sh`) or the HAPT data
//! (`scripts/fetch-hapt.sh`) print a skip message when it is missing, unless
//! `DIREDI_REQUIRE_DATA` is set, in which case they fail.

// Submodules live in `tests/learn/`.
mod learn {
    mod onnx_parity;
}

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The workspace root (parent of this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

fn required() -> bool {
    std::env::var_os("DIREDI_REQUIRE_DATA").is_some()
}

/// Skips (returns false) or, with `DIREDI_REQUIRE_DATA`, fails when `what` is missing.
pub fn available(what: &str, found: Result<(), String>) -> bool {
    match found {
        Ok(()) => true,
        Err(why) => {
            assert!(
                !required(),
                "DIREDI_REQUIRE_DATA is set but {what} is missing: {why}"
            );
            eprintln!(
                "skipping: {what} is missing ({why}); set DIREDI_REQUIRE_DATA to fail instead"
            );
            false
        }
    }
}

/// Loads ONNX Runtime, or says why the test is skipped.
pub fn onnx_runtime() -> bool {
    available(
        "ONNX Runtime",
        diredi_infer::init_runtime(None)
            .map(|_| ())
            .map_err(|e| e.to_string()),
    )
}

/// `$DIREDI_DATA_DIR/hapt`, else `<repo>/data/hapt`, if it holds a dataset.
pub fn hapt_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("DIREDI_DATA_DIR") {
        Some(d) => PathBuf::from(d).join("hapt"),
        None => repo_root().join("data/hapt"),
    };
    let found = if dir.join("dataset.json").is_file() {
        Ok(())
    } else {
        Err(format!(
            "{} has no dataset.json; run scripts/fetch-hapt.sh",
            dir.display()
        ))
    };
    available("the HAPT dataset", found).then_some(dir)
}

/// `n` windows `[C, T]` of `k` classes: class `c` is a sine of `c + 1` periods per window in
/// channel `c % C`, random phase, on uniform noise elsewhere.
pub fn synthetic(n: usize, c: usize, t: usize, k: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut x = Vec::with_capacity(n * c * t);
    let mut y = Vec::with_capacity(n);
    for i in 0..n {
        let class = i % k;
        let phase: f32 = rng.gen_range(0.0..std::f32::consts::TAU);
        for ch in 0..c {
            for s in 0..t {
                let noise = rng.gen_range(-0.5..0.5);
                let signal = if ch == class % c {
                    let a = std::f32::consts::TAU * (class + 1) as f32 * s as f32 / t as f32;
                    (a + phase).sin() * 1.5
                } else {
                    0.0
                };
                x.push(signal + noise);
            }
        }
        y.push(class as u32);
    }
    (x, y)
}
