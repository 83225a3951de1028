//! Integration tests of `diredi-learn`: the exported student in ONNX Runtime on real HAPT
//! windows, and checkpoints. The full teacher → student run and its targets are a benchmark
//! (`diredi-cloud-worker pipeline --json`), not a test.
//!
//! Tests that need the ONNX Runtime library (`scripts/fetch-onnxruntime.sh`) or the HAPT data
//! (`scripts/fetch-hapt.sh`) print a skip message when it is missing, unless
//! `DIREDI_REQUIRE_DATA` is set, in which case they fail.

// Submodules live in `tests/learn/`.
mod learn {
    mod cycle;
    mod import;
    mod onnx_parity;
}

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use diredi_learn::dataset::Dataset;
use diredi_learn::model::Net;
use diredi_learn::probe::ProbeSet;
use diredi_learn::split::{Split, SplitConfig};

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

/// The HAPT split, the shipped student imported from its ONNX file (the base of adaptation),
/// its classes and a 256-window probe set from the presumed validation windows; loaded once.
pub struct Fixture {
    pub dataset: Dataset,
    pub split: Split,
    pub installed: Net,
    pub classes: Vec<String>,
    pub probe: ProbeSet,
}

/// The shared [`Fixture`], or `None` (skip) when the HAPT data is missing.
pub fn fixture() -> Option<&'static Fixture> {
    static FIXTURE: OnceLock<Option<Fixture>> = OnceLock::new();
    FIXTURE
        .get_or_init(|| {
            let dir = hapt_dir()?;
            let dataset = Dataset::load(&dir).expect("HAPT loads");
            let cfg = SplitConfig::from_file(&repo_root().join("cloud-worker/splits/hapt.toml"))
                .expect("split file parses");
            let split = Split::build(&cfg, &dataset).expect("split builds");
            let bytes = std::fs::read(repo_root().join("onnx-models/hapt-student-v1.onnx"))
                .expect("shipped student");
            let installed = diredi_learn::onnx::import(&bytes).expect("shipped student imports");
            let classes = split.classes[..split.num_presumed].to_vec();
            let probe = ProbeSet::select(&split.presumed_val, &classes, 256).expect("probe");
            Some(Fixture {
                dataset,
                split,
                installed,
                classes,
                probe,
            })
        })
        .as_ref()
}
