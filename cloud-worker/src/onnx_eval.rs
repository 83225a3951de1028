//! Evaluating a packaged ONNX model (manifest + `.onnx`) on windows of a split, through ONNX
//! Runtime — the same runtime the gateways use, so the figure is the one users get.
//!
//! Where it stands: `evaluate` and `export` call it; the split's windows arrive standardised
//! with the split's statistics and are re-standardised with the manifest's if they differ.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use diredi_infer::{Classifier, OrtClassifier, SessionConfig};
use diredi_learn::metrics::{argmax_rows, evaluate, Evaluation};
use diredi_learn::window::{Standardizer, WindowSet};
use diredi_protocol::manifest::{sha256_hex, Manifest, ReceivedModel, TrustedKeys, VerifiedModel};
use ndarray::ArrayView3;

/// A manifest and its ONNX bytes read from disk, hash-checked but not signature-checked.
pub struct PackagedModel {
    pub manifest_path: PathBuf,
    pub manifest: Manifest,
    pub manifest_json: Vec<u8>,
    pub onnx: Vec<u8>,
}

impl PackagedModel {
    /// Reads `<model>.json` and the `.onnx` it names (relative to the manifest).
    pub fn read(manifest_path: &Path) -> Result<Self> {
        let manifest_json = std::fs::read(manifest_path)
            .with_context(|| format!("reading manifest {}", manifest_path.display()))?;
        let manifest = Manifest::from_slice(&manifest_json)
            .with_context(|| format!("parsing manifest {}", manifest_path.display()))?;
        let dir = manifest_path.parent().unwrap_or(Path::new("."));
        let onnx_path = dir.join(&manifest.onnx_file);
        let onnx = std::fs::read(&onnx_path)
            .with_context(|| format!("reading model {}", onnx_path.display()))?;
        let found = sha256_hex(&onnx);
        if found != manifest.sha256 {
            bail!(
                "{}: sha256 {found} does not match the manifest's {}",
                onnx_path.display(),
                manifest.sha256
            );
        }
        Ok(PackagedModel {
            manifest_path: manifest_path.to_path_buf(),
            manifest,
            manifest_json,
            onnx,
        })
    }

    /// Verifies the signature against `keys`.
    pub fn verify(&self, keys: &TrustedKeys) -> Result<VerifiedModel> {
        ReceivedModel::new(self.manifest_json.clone(), self.onnx.clone())
            .verify(keys)
            .with_context(|| format!("verifying {}", self.manifest_path.display()))
    }
}

/// Predicted class indices (into `split_classes`) of every window of `set`. A model class the
/// split does not know maps to `u32::MAX`, which never matches a label.
pub fn predict(
    model: &PackagedModel,
    clf: &dyn Classifier,
    set: &WindowSet,
    split_std: &Standardizer,
    split_classes: &[String],
    batch: usize,
) -> Result<Vec<u32>> {
    let spec = &model.manifest.input;
    if spec.channels.len() != set.channels || spec.window != set.len {
        bail!(
            "model input is {} channels × {} samples, the split's windows are {} × {}",
            spec.channels.len(),
            spec.window,
            set.channels,
            set.len
        );
    }
    let same_std = spec.mean == split_std.mean && spec.std == split_std.std;
    let map: Vec<u32> = model
        .manifest
        .classes
        .iter()
        .map(|c| {
            split_classes
                .iter()
                .position(|s| s == c)
                .map_or(u32::MAX, |i| i as u32)
        })
        .collect();
    let (c, t) = (set.channels, set.len);
    let mut out = Vec::with_capacity(set.n());
    let mut buf = Vec::new();
    for start in (0..set.n()).step_by(batch.max(1)) {
        let end = (start + batch.max(1)).min(set.n());
        buf.clear();
        buf.extend_from_slice(&set.x[start * c * t..end * c * t]);
        if !same_std {
            for (i, v) in buf.iter_mut().enumerate() {
                let ch = (i / t) % c;
                let raw = *v * split_std.std[ch] + split_std.mean[ch];
                *v = (raw - spec.mean[ch]) / spec.std[ch];
            }
        }
        let view = ArrayView3::from_shape((end - start, c, t), &buf[..])?;
        let scores = clf.classify(view)?;
        let flat = scores.as_standard_layout();
        let k = scores.ncols();
        for row in argmax_rows(flat.as_slice().unwrap_or(&[]), k) {
            out.push(map.get(row as usize).copied().unwrap_or(u32::MAX));
        }
    }
    Ok(out)
}

/// Loads `model` in ONNX Runtime (one thread, CPU) and evaluates it on the labelled `set`.
pub fn evaluate_packaged(
    model: &PackagedModel,
    set: &WindowSet,
    split_std: &Standardizer,
    split_classes: &[String],
) -> Result<Evaluation> {
    if !set.is_labelled() {
        bail!("cannot evaluate on unlabelled windows");
    }
    diredi_infer::init_runtime(None)?;
    let clf = OrtClassifier::from_bytes(&model.onnx, &SessionConfig::default())?;
    let pred = predict(model, &clf, set, split_std, split_classes, 256)?;
    Ok(evaluate(&pred, &set.y, split_classes)?)
}
