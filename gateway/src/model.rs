//! The model: manifest + ONNX bytes → verified → loaded into ONNX Runtime → active behind a
//! swap point.
//!
//! Model flow: read files → [`ReceivedModel`] → `verify` (signature + hash, protocol crate) →
//! [`VerifiedModel`] → [`LoadedModel::new`] (classifier built, interface checked against the
//! manifest) → stored in a [`ModelHandle`] (`Arc<ArcSwap<LoadedModel>>`). A [`LoadedModel`]
//! can only be made from a [`VerifiedModel`], so an unverified file cannot be installed.
//!
//! Readers (decode and inference threads) `load()` the handle per message or batch; a swap
//! never blocks them and running work keeps the model it started with. Each model gets a
//! process-unique generation so windows standardised for an older model are recognised.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use diredi_infer::{Classifier, InferError, OrtClassifier, SessionConfig};
use diredi_protocol::manifest::{
    InputSpec, Layout, Manifest, ManifestError, OutputKind, ReceivedModel, VerifiedModel,
};

use crate::config::{ModelConfig, RuntimeConfig};
use crate::window::WindowParams;

/// The active model, swappable without stopping readers.
pub type ModelHandle = Arc<ArcSwap<LoadedModel>>;

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// `[model] path` is not set.
    #[error("no model configured; set [model] path to the model's manifest (<model>.json)")]
    NotConfigured,
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The manifest names an ONNX file outside its directory.
    #[error("manifest {} names onnx_file {name:?}; expected a plain file name beside the manifest", manifest.display())]
    OnnxFileName {
        /// The manifest.
        manifest: PathBuf,
        /// The `onnx_file` field.
        name: String,
    },
    /// Signature, hash or manifest check failed.
    #[error("model {} rejected: {source}", manifest.display())]
    Verify {
        /// The manifest.
        manifest: PathBuf,
        /// What failed.
        source: ManifestError,
    },
    /// The manifest describes something this gateway cannot feed.
    #[error("model not supported: {0}")]
    Unsupported(String),
    /// ONNX Runtime could not load or run the model.
    #[error(transparent)]
    Runtime(#[from] InferError),
    /// The model's tensors disagree with its manifest.
    #[error("model and manifest disagree: {what} is {found} in the model but {expected} in the manifest")]
    Interface {
        /// Which dimension.
        what: &'static str,
        /// From the manifest.
        expected: usize,
        /// From the model.
        found: usize,
    },
}

/// What the pipeline needs to know about the active model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// Model family.
    pub model_id: String,
    /// Version within the family.
    pub version: u64,
    /// Channels, window, stride, rate and standardisation, as the manifest gives them.
    pub input: InputSpec,
    /// Class names in output order.
    pub classes: Vec<String>,
    /// Whether the output needs a softmax.
    pub output: OutputKind,
    /// Key that signed the manifest.
    pub key_id: String,
    /// Adapted on this gateway from the installed model (`[learning] serve_adapted`), not
    /// signed by anyone; `version` is still the installed model's.
    pub adapted_locally: bool,
}

impl ModelSpec {
    /// Window parameters for this model, with the configured gap tolerance.
    pub fn window_params(&self, max_gap_periods: f64) -> WindowParams {
        let input = &self.input;
        WindowParams {
            channels: input.channels.len(),
            window: input.window,
            stride: input.stride,
            period_ms: 1000.0 / input.sample_rate_hz,
            mean: input.mean.clone(),
            inv_std: input.std.iter().map(|s| 1.0 / s).collect(),
            max_gap_periods,
        }
    }
}

/// The classifier takes `input`'s channels and window and gives `outputs` values.
fn check_interface(
    input: &InputSpec,
    outputs: usize,
    classifier: &dyn Classifier,
) -> Result<(), ModelError> {
    let checks = [
        ("channels", input.channels.len(), classifier.channels()),
        ("window", input.window, classifier.window()),
        ("outputs", outputs, classifier.num_outputs()),
    ];
    for (what, expected, found) in checks {
        if expected != found {
            return Err(ModelError::Interface {
                what,
                expected,
                found,
            });
        }
    }
    Ok(())
}

static GENERATION: AtomicU64 = AtomicU64::new(1);

/// What adaptation needs of the installed model besides its classifier: the verified
/// manifest, the ONNX bytes (the base of the knowledge delta) and the probe file's bytes.
#[derive(Debug, Clone)]
pub struct ModelSource {
    /// The verified manifest.
    pub manifest: Manifest,
    /// The verified ONNX bytes.
    pub onnx: Arc<[u8]>,
    /// The probe file named by the manifest, its sha256 checked; `None` when the manifest
    /// names none.
    pub probe: Option<Arc<[u8]>>,
}

/// A verified model with its classifier, ready to serve.
pub struct LoadedModel {
    generation: u64,
    spec: ModelSpec,
    classifier: Box<dyn Classifier>,
    source: Option<Arc<ModelSource>>,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("generation", &self.generation)
            .field("spec", &self.spec)
            .field("provider", &self.classifier.execution_provider())
            .finish()
    }
}

impl LoadedModel {
    /// Pairs a verified manifest with a classifier built from its ONNX bytes, checking that
    /// the classifier's channels, window and outputs match the manifest.
    pub fn new(
        verified: &VerifiedModel,
        classifier: Box<dyn Classifier>,
    ) -> Result<Self, ModelError> {
        let m = verified.manifest();
        if m.input.layout != Layout::Nct {
            return Err(ModelError::Unsupported(format!(
                "input layout is {:?}; this gateway feeds NCT ([batch, channels, time])",
                m.input.layout
            )));
        }
        check_interface(&m.input, m.classes.len(), classifier.as_ref())?;
        let spec = ModelSpec {
            model_id: m.model_id.clone(),
            version: m.version,
            input: m.input.clone(),
            classes: m.classes.clone(),
            output: m.output.kind,
            key_id: verified.key_id().to_owned(),
            adapted_locally: false,
        };
        Ok(LoadedModel {
            generation: GENERATION.fetch_add(1, Ordering::Relaxed),
            spec,
            classifier,
            source: None,
        })
    }

    /// The model adapted on this gateway from `installed`, serving with `classifier` (whose
    /// outputs are `classes`). It keeps `installed`'s source, so the next adaptation and its
    /// knowledge delta are relative to the manufacturer's signed model again.
    pub fn adapted_locally(
        installed: &LoadedModel,
        classes: Vec<String>,
        classifier: Box<dyn Classifier>,
    ) -> Result<Self, ModelError> {
        let base = &installed.spec;
        check_interface(&base.input, classes.len(), classifier.as_ref())?;
        Ok(LoadedModel {
            generation: GENERATION.fetch_add(1, Ordering::Relaxed),
            spec: ModelSpec {
                classes,
                adapted_locally: true,
                ..base.clone()
            },
            classifier,
            source: installed.source.clone(),
        })
    }

    /// Attaches the model's source (manifest, ONNX bytes, probe), which adaptation needs.
    pub fn with_source(mut self, source: ModelSource) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    /// The model's source, when it was loaded from files (not for test fakes).
    pub fn source(&self) -> Option<&Arc<ModelSource>> {
        self.source.as_ref()
    }

    /// Process-unique number of this model instance.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// What the pipeline needs to know.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The classifier.
    pub fn classifier(&self) -> &dyn Classifier {
        self.classifier.as_ref()
    }

    /// Execution provider in use.
    pub fn execution_provider(&self) -> &str {
        self.classifier.execution_provider()
    }

    /// Turns one output row into probabilities in place (softmax for logits models).
    pub fn to_probabilities(&self, row: &mut [f32]) {
        if self.spec.output == OutputKind::Logits {
            softmax(row);
        }
    }
}

/// Numerically stable softmax in place.
pub fn softmax(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    if sum > 0.0 {
        for v in row.iter_mut() {
            *v /= sum;
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ModelError> {
    std::fs::read(path).map_err(|source| ModelError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads the manifest and its ONNX file and verifies them against the trusted keys.
pub fn read_verified(cfg: &ModelConfig) -> Result<VerifiedModel, ModelError> {
    let manifest_path = cfg.manifest.as_deref().ok_or(ModelError::NotConfigured)?;
    let manifest_json = read(manifest_path)?;
    let onnx_name = serde_json::from_slice::<serde_json::Value>(&manifest_json)
        .ok()
        .and_then(|v| v.get("onnx_file")?.as_str().map(str::to_owned));
    // Without an `onnx_file` the manifest is malformed; verification says so precisely.
    let onnx = match onnx_name {
        Some(name) => {
            let p = Path::new(&name);
            if p.components().count() != 1 || p.file_name().is_none() {
                return Err(ModelError::OnnxFileName {
                    manifest: manifest_path.to_path_buf(),
                    name,
                });
            }
            read(&manifest_path.with_file_name(p))?
        }
        None => Vec::new(),
    };
    ReceivedModel::new(manifest_json, onnx)
        .verify(&cfg.trusted_keys)
        .map_err(|source| ModelError::Verify {
            manifest: manifest_path.to_path_buf(),
            source,
        })
}

/// Reads, verifies and loads the configured model into ONNX Runtime.
pub fn load(model: &ModelConfig, runtime: &RuntimeConfig) -> Result<LoadedModel, ModelError> {
    let verified = read_verified(model)?;
    diredi_infer::init_runtime(runtime.library.as_deref())?;
    let session = SessionConfig {
        intra_threads: runtime.intra_threads,
        inter_threads: runtime.inter_threads,
        providers: runtime.providers.clone(),
    };
    let classifier = OrtClassifier::from_bytes(verified.onnx(), &session)?;
    let manifest_path = model.manifest.as_deref().ok_or(ModelError::NotConfigured)?;
    let probe = read_probe(manifest_path, verified.manifest())?;
    let loaded = LoadedModel::new(&verified, Box::new(classifier))?;
    let (manifest, onnx) = verified.into_parts();
    Ok(loaded.with_source(ModelSource {
        manifest,
        onnx: onnx.into(),
        probe,
    }))
}

/// The probe file the manifest names (beside the manifest), checked against its sha256.
pub fn read_probe(manifest_path: &Path, m: &Manifest) -> Result<Option<Arc<[u8]>>, ModelError> {
    let Some(probe) = &m.probe else {
        return Ok(None);
    };
    let p = Path::new(&probe.file);
    if p.components().count() != 1 || p.file_name().is_none() {
        return Err(ModelError::OnnxFileName {
            manifest: manifest_path.to_path_buf(),
            name: probe.file.clone(),
        });
    }
    let bytes = read(&manifest_path.with_file_name(p))?;
    let found = diredi_protocol::manifest::sha256_hex(&bytes);
    if found != probe.sha256 {
        return Err(ModelError::Unsupported(format!(
            "probe file {} has sha256 {found}, the signed manifest says {}",
            probe.file, probe.sha256
        )));
    }
    Ok(Some(bytes.into()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;
    use diredi_protocol::manifest::{sign_manifest, SigningKey, TrustedKeys};
    use ndarray::{Array2, ArrayView3};

    /// A classifier whose class is decided by the sign of the window's mean.
    #[derive(Debug)]
    pub(crate) struct SignClassifier {
        pub channels: usize,
        pub window: usize,
    }

    impl Classifier for SignClassifier {
        fn classify(&self, batch: ArrayView3<'_, f32>) -> Result<Array2<f32>, InferError> {
            let n = batch.dim().0;
            let mut out = Array2::zeros((n, 2));
            for (i, w) in batch.outer_iter().enumerate() {
                let positive = w.mean().unwrap_or(0.0) > 0.0;
                out[[i, usize::from(positive)]] = 0.9;
                out[[i, usize::from(!positive)]] = 0.1;
            }
            Ok(out)
        }
        fn channels(&self) -> usize {
            self.channels
        }
        fn window(&self) -> usize {
            self.window
        }
        fn num_outputs(&self) -> usize {
            2
        }
        fn execution_provider(&self) -> &str {
            "fake"
        }
    }

    pub(crate) fn test_key() -> SigningKey {
        SigningKey::from_seed(&[3; 32])
    }

    /// A signed two-class manifest (`neg`, `pos`) with the given shape.
    pub(crate) fn signed(channels: usize, window: usize, stride: usize) -> (Vec<u8>, Vec<u8>) {
        let onnx = b"not really onnx".to_vec();
        let names: Vec<String> = (0..channels).map(|i| format!("ch{i}")).collect();
        let manifest = serde_json::json!({
            "format": "diredi-manifest/1",
            "model_id": "test", "version": 3, "parent_version": null,
            "created_at": "2026-01-01T00:00:00Z",
            "onnx_file": "m.onnx", "sha256": diredi_protocol::sha256_hex(&onnx),
            "input": {"name": "input", "layout": "NCT", "channels": names, "window": window,
                      "stride": stride, "sample_rate_hz": 50.0,
                      "mean": vec![0.0; channels], "std": vec![1.0; channels]},
            "output": {"name": "probabilities", "kind": "probabilities"},
            "classes": ["neg", "pos"], "params": 1, "metrics": {}
        });
        let signed = sign_manifest(&manifest, &onnx, &test_key()).unwrap();
        (serde_json::to_vec(&signed).unwrap(), onnx)
    }

    pub(crate) fn trusted() -> TrustedKeys {
        let mut k = TrustedKeys::new();
        k.insert(test_key().public());
        k
    }

    pub(crate) fn fake_model(channels: usize, window: usize, stride: usize) -> LoadedModel {
        let (m, onnx) = signed(channels, window, stride);
        let v = ReceivedModel::new(m, onnx).verify(&trusted()).unwrap();
        LoadedModel::new(&v, Box::new(SignClassifier { channels, window })).unwrap()
    }

    fn config(dir: &Path) -> ModelConfig {
        ModelConfig {
            manifest: Some(dir.join("m.json")),
            trusted_keys: trusted(),
        }
    }

    #[test]
    fn model_files_verify_with_a_trusted_key() {
        let dir = tempfile::tempdir().unwrap();
        let (m, onnx) = signed(2, 4, 2);
        std::fs::write(dir.path().join("m.json"), m).unwrap();
        std::fs::write(dir.path().join("m.onnx"), onnx).unwrap();
        let v = read_verified(&config(dir.path())).unwrap();
        assert_eq!(v.manifest().model_id, "test");
    }

    #[test]
    fn tampered_onnx_or_untrusted_key_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let (m, _) = signed(2, 4, 2);
        std::fs::write(dir.path().join("m.json"), &m).unwrap();
        std::fs::write(dir.path().join("m.onnx"), b"tampered").unwrap();
        let err = read_verified(&config(dir.path())).unwrap_err();
        assert!(err.to_string().contains("sha256 mismatch"), "{err}");

        let (m, onnx) = signed(2, 4, 2);
        std::fs::write(dir.path().join("m.json"), &m).unwrap();
        std::fs::write(dir.path().join("m.onnx"), onnx).unwrap();
        let mut cfg = config(dir.path());
        cfg.trusted_keys = TrustedKeys::new();
        let err = read_verified(&cfg).unwrap_err();
        assert!(err.to_string().contains("not trusted"), "{err}");
    }

    #[test]
    fn missing_files_are_reported_with_their_path() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_verified(&config(dir.path())).unwrap_err();
        assert!(err.to_string().contains("m.json"), "{err}");
        let (m, _) = signed(2, 4, 2);
        std::fs::write(dir.path().join("m.json"), m).unwrap();
        let err = read_verified(&config(dir.path())).unwrap_err();
        assert!(err.to_string().contains("m.onnx"), "{err}");
    }

    #[test]
    fn classifier_disagreeing_with_the_manifest_is_refused() {
        let (m, onnx) = signed(2, 4, 2);
        let v = ReceivedModel::new(m, onnx).verify(&trusted()).unwrap();
        let err = LoadedModel::new(
            &v,
            Box::new(SignClassifier {
                channels: 3,
                window: 4,
            }),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "model and manifest disagree: channels is 3 in the model but 2 in the manifest"
        );
    }

    #[test]
    fn softmax_turns_logits_into_probabilities() {
        let mut row = [1.0, 2.0, 3.0];
        softmax(&mut row);
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((row[2] - 0.665_240_9).abs() < 1e-6, "{row:?}");
    }

    #[test]
    fn each_loaded_model_gets_a_new_generation() {
        let a = fake_model(1, 2, 1);
        let b = fake_model(1, 2, 1);
        assert_ne!(a.generation(), b.generation());
        assert_eq!(a.spec().window_params(3.0).period_ms, 20.0);
    }
}
