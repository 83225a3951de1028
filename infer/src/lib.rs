//! ONNX Runtime behind a small trait.
//!
//! Where it stands: the gateway's inference threads and the cloud worker's evaluator hand a
//! standardised `[N, C, T]` batch to a [`Classifier`] and get `[N, K]` scores back. ort is a
//! release candidate whose API changes between versions, so nothing outside this crate
//! touches it; tests can use any other `Classifier`.
//!
//! The ONNX Runtime shared library is never downloaded at build time (`load-dynamic`): it is
//! found at run time by [`init_runtime`], from the configured path, `ORT_DYLIB_PATH`, or the
//! folder `scripts/fetch-onnxruntime.sh` fills.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ndarray::{Array2, ArrayView3};
use ort::ep::{self, ExecutionProviderDispatch};
use ort::session::{builder::GraphOptimizationLevel, Session};
use ort::value::TensorRef;

/// The ONNX Runtime release this project is built and tested against.
pub const ORT_VERSION: &str = "1.31.1";
/// File name of the shared library inside the official wheel.
pub const ORT_LIBRARY_FILE: &str = "libonnxruntime.so.1.31.1";
/// What to tell a person whose machine lacks the library.
pub const ORT_FETCH_HINT: &str = "run `scripts/fetch-onnxruntime.sh` (fetches onnxruntime==1.31.1 from PyPI and checks its sha256), \
     or set ORT_DYLIB_PATH (or the `library` setting in the [runtime] config section) to a libonnxruntime.so of version 1.31 or newer";

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    /// No library file at any of the places looked at.
    #[error("ONNX Runtime library not found (looked at: {}); {}", list_paths(.tried), ORT_FETCH_HINT)]
    LibraryMissing {
        /// Every path that was tried, in order.
        tried: Vec<PathBuf>,
    },
    /// The file exists but could not be loaded (wrong architecture, too old, not a library).
    #[error("cannot load ONNX Runtime from {path}: {reason}; {}", ORT_FETCH_HINT)]
    LibraryLoad {
        /// The file that failed to load.
        path: PathBuf,
        /// What the loader said.
        reason: String,
    },
    /// The runtime was already initialised from another file in this process.
    #[error("ONNX Runtime is already loaded from {loaded}; cannot switch to {requested} in the same process")]
    AlreadyLoaded {
        /// The library in use.
        loaded: PathBuf,
        /// The library asked for now.
        requested: PathBuf,
    },
    /// An execution provider name this build does not know.
    #[error("unknown execution provider `{0}` (known: {known})", known = KNOWN_PROVIDERS.join(", "))]
    UnknownProvider(String),
    /// ONNX Runtime refused the model (corrupted, truncated, unsupported operator, ...).
    #[error("ONNX Runtime cannot load the model: {0}")]
    Model(String),
    /// The model's input or output is not the `[batch, C, T]` → `[batch, K]` float shape expected.
    #[error("model interface mismatch: {0}")]
    Interface(String),
    /// A batch had the wrong shape for this model.
    #[error("input shape {found:?} does not match the model's [batch, {channels}, {window}]")]
    InputShape {
        /// Shape that was passed.
        found: Vec<usize>,
        /// Channels the model expects.
        channels: usize,
        /// Window length the model expects.
        window: usize,
    },
    /// ONNX Runtime failed during a run.
    #[error("inference failed: {0}")]
    Run(String),
}

fn list_paths(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return "nothing".to_owned();
    }
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Execution provider names understood in configuration, in no particular order.
pub const KNOWN_PROVIDERS: &[&str] = &[
    "cpu", "xnnpack", "qnn", "rknpu", "acl", "openvino", "nnapi", "onednn",
];

struct Runtime {
    library: PathBuf,
    _env: ort::environment::Environment,
}

static RUNTIME: OnceLock<Runtime> = OnceLock::new();
static INIT_LOCK: Mutex<()> = Mutex::new(());

/// The places the library is looked for, in order: the configured path, `ORT_DYLIB_PATH`,
/// then the fetch script's folder next to the executable's ancestors and the working
/// directory, then the Debian package's `/usr/lib/diredi`.
pub fn library_candidates(configured: Option<&Path>) -> Vec<PathBuf> {
    if let Some(p) = configured {
        return vec![p.to_path_buf()];
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return vec![PathBuf::from(p)];
    }
    let rel = Path::new("third_party/onnxruntime")
        .join(format!("linux-{}", std::env::consts::ARCH))
        .join(ORT_LIBRARY_FILE);
    let mut out = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        out.push(cwd.join(&rel));
    }
    if let Ok(exe) = std::env::current_exe() {
        // target/{debug,release}[/deps]/binary → the repository root is up to 4 levels up.
        for dir in exe.ancestors().skip(1).take(4) {
            let candidate = dir.join(&rel);
            if !out.contains(&candidate) {
                out.push(candidate);
            }
        }
    }
    out.push(Path::new("/usr/lib/diredi").join(ORT_LIBRARY_FILE));
    out
}

/// Loads ONNX Runtime once per process and returns the library path in use.
///
/// Calling it again with the same (or no) path is cheap; asking for a different file once one
/// is loaded is an error, since a process can hold only one ONNX Runtime.
pub fn init_runtime(configured: Option<&Path>) -> Result<PathBuf, InferError> {
    let _guard = INIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = configured.filter(|p| !p.is_file()) {
        return Err(InferError::LibraryMissing {
            tried: vec![p.to_path_buf()],
        });
    }
    if let Some(rt) = RUNTIME.get() {
        if let Some(req) = configured {
            if req != rt.library {
                return Err(InferError::AlreadyLoaded {
                    loaded: rt.library.clone(),
                    requested: req.to_path_buf(),
                });
            }
        }
        return Ok(rt.library.clone());
    }
    let tried = library_candidates(configured);
    let Some(library) = tried.iter().find(|p| p.is_file()).cloned() else {
        return Err(InferError::LibraryMissing { tried });
    };
    let load_err = |reason: String| InferError::LibraryLoad {
        path: library.clone(),
        reason,
    };
    let builder = ort::init_from(&library).map_err(|e| load_err(e.to_string()))?;
    let env = builder
        .with_name("diredi")
        .with_telemetry(false)
        .build()
        .map_err(|e| load_err(e.to_string()))?;
    let _ = RUNTIME.set(Runtime {
        library: library.clone(),
        _env: env,
    });
    tracing::debug!(library = %library.display(), "Loaded ONNX Runtime.");
    Ok(library)
}

fn environment() -> Result<&'static ort::environment::Environment, InferError> {
    match RUNTIME.get() {
        Some(rt) => Ok(&rt._env),
        None => init_runtime(None).and_then(|_| {
            RUNTIME
                .get()
                .map(|rt| &rt._env)
                .ok_or_else(|| InferError::LibraryMissing { tried: Vec::new() })
        }),
    }
}

/// How sessions are built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    /// Threads inside one operator (ONNX Runtime's intra-op pool). 1 suits a gateway that runs
    /// several inference workers.
    pub intra_threads: usize,
    /// Threads across operators (inter-op pool).
    pub inter_threads: usize,
    /// Execution providers in priority order. The first that registers and loads the model
    /// wins; `cpu` is always the last resort even when not listed.
    pub providers: Vec<String>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            intra_threads: 1,
            inter_threads: 1,
            providers: vec!["cpu".to_owned()],
        }
    }
}

/// Checks provider names without loading anything; used by configuration validation.
pub fn validate_providers(names: &[String]) -> Result<(), InferError> {
    for n in names {
        provider_dispatch(n)?;
    }
    Ok(())
}

fn provider_dispatch(name: &str) -> Result<Option<ExecutionProviderDispatch>, InferError> {
    let d = match name.to_ascii_lowercase().as_str() {
        "cpu" => return Ok(None),
        "xnnpack" => ep::XNNPACK::default().build(),
        "qnn" => ep::QNN::default().build(),
        "rknpu" => ep::RKNPU::default().build(),
        "acl" => ep::ACL::default().build(),
        "openvino" => ep::OpenVINO::default().build(),
        "nnapi" => ep::NNAPI::default().build(),
        "onednn" => ep::OneDNN::default().build(),
        other => return Err(InferError::UnknownProvider(other.to_owned())),
    };
    Ok(Some(d.error_on_failure()))
}

/// A model that maps a standardised `[N, C, T]` batch to `[N, K]` scores.
pub trait Classifier: Send + Sync {
    /// Runs one batch. The output holds what the model outputs (probabilities or logits).
    fn classify(&self, batch: ArrayView3<'_, f32>) -> Result<Array2<f32>, InferError>;
    /// Channels `C` the model expects.
    fn channels(&self) -> usize;
    /// Window length `T` the model expects.
    fn window(&self) -> usize;
    /// Number of outputs `K`.
    fn num_outputs(&self) -> usize;
    /// The execution provider actually in use (`cpu`, `xnnpack`, ...).
    fn execution_provider(&self) -> &str;
}

/// A [`Classifier`] running in ONNX Runtime.
pub struct OrtClassifier {
    session: Mutex<Session>,
    input_name: String,
    output_name: String,
    channels: usize,
    window: usize,
    num_outputs: usize,
    provider: String,
}

impl std::fmt::Debug for OrtClassifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtClassifier")
            .field("input", &self.input_name)
            .field("output", &self.output_name)
            .field("channels", &self.channels)
            .field("window", &self.window)
            .field("num_outputs", &self.num_outputs)
            .field("provider", &self.provider)
            .finish()
    }
}

fn model_err(e: impl std::fmt::Display) -> InferError {
    InferError::Model(e.to_string())
}

impl OrtClassifier {
    /// Loads an ONNX model from memory, trying the configured execution providers in order.
    /// A provider that fails falls back to the next with a warning.
    pub fn from_bytes(model: &[u8], config: &SessionConfig) -> Result<Self, InferError> {
        let env = environment()?;
        let mut names: Vec<&str> = config.providers.iter().map(String::as_str).collect();
        if !names.iter().any(|n| n.eq_ignore_ascii_case("cpu")) {
            names.push("cpu");
        }
        let mut last_err = None;
        for name in names {
            let dispatch = provider_dispatch(name)?;
            match Self::build_session(env, model, config, dispatch) {
                Ok(session) => return Self::from_session(session, name.to_ascii_lowercase()),
                Err(e) => {
                    if !name.eq_ignore_ascii_case("cpu") {
                        tracing::warn!(provider = name, error = %e, "Execution provider unavailable, falling back.");
                    }
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| InferError::Model("no execution provider".into())))
    }

    fn build_session(
        env: &ort::environment::Environment,
        model: &[u8],
        config: &SessionConfig,
        dispatch: Option<ExecutionProviderDispatch>,
    ) -> Result<Session, InferError> {
        let mut builder = Session::builder(env)
            .map_err(model_err)?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(model_err)?
            .with_intra_threads(config.intra_threads.max(1))
            .map_err(model_err)?
            .with_inter_threads(config.inter_threads.max(1))
            .map_err(model_err)?
            .with_intra_op_spinning(false)
            .map_err(model_err)?;
        if let Some(d) = dispatch {
            builder = builder.with_execution_providers([d]).map_err(model_err)?;
        }
        builder.commit_from_memory(model).map_err(model_err)
    }

    fn from_session(session: Session, provider: String) -> Result<Self, InferError> {
        let (input, output) = match (session.inputs(), session.outputs()) {
            ([i], [o, ..]) => (i, o),
            (i, o) => {
                return Err(InferError::Interface(format!(
                    "expected 1 input and at least 1 output, found {} and {}",
                    i.len(),
                    o.len()
                )))
            }
        };
        let dims = |outlet: &ort::value::Outlet| -> Result<Vec<i64>, InferError> {
            outlet
                .dtype()
                .tensor_shape()
                .map(|s| s.iter().copied().collect())
                .ok_or_else(|| {
                    InferError::Interface(format!("`{}` is not a tensor", outlet.name()))
                })
        };
        let in_dims = dims(input)?;
        let out_dims = dims(output)?;
        let (channels, window) = match in_dims.as_slice() {
            [_, c, t] if *c > 0 && *t > 0 => (*c as usize, *t as usize),
            other => {
                return Err(InferError::Interface(format!(
                    "input `{}` has shape {other:?}, expected [batch, C, T] with fixed C and T",
                    input.name()
                )))
            }
        };
        let num_outputs = match out_dims.as_slice() {
            [_, k] if *k > 0 => *k as usize,
            other => {
                return Err(InferError::Interface(format!(
                    "output `{}` has shape {other:?}, expected [batch, K]",
                    output.name()
                )))
            }
        };
        Ok(OrtClassifier {
            input_name: input.name().to_owned(),
            output_name: output.name().to_owned(),
            session: Mutex::new(session),
            channels,
            window,
            num_outputs,
            provider,
        })
    }

    /// Name of the model's input tensor.
    pub fn input_name(&self) -> &str {
        &self.input_name
    }

    /// Name of the model's output tensor.
    pub fn output_name(&self) -> &str {
        &self.output_name
    }
}

impl Classifier for OrtClassifier {
    fn classify(&self, batch: ArrayView3<'_, f32>) -> Result<Array2<f32>, InferError> {
        let (n, c, t) = batch.dim();
        if c != self.channels || t != self.window {
            return Err(InferError::InputShape {
                found: vec![n, c, t],
                channels: self.channels,
                window: self.window,
            });
        }
        if n == 0 {
            return Ok(Array2::zeros((0, self.num_outputs)));
        }
        let owned;
        let data: &[f32] = match batch.as_slice() {
            Some(s) => s,
            None => {
                owned = batch.as_standard_layout().to_owned();
                owned.as_slice().unwrap_or(&[])
            }
        };
        let input = TensorRef::from_array_view(([n, c, t], data))
            .map_err(|e| InferError::Run(e.to_string()))?;
        let mut session = self.session.lock().unwrap_or_else(|e| e.into_inner());
        let outputs = session
            .run(ort::inputs![self.input_name.as_str() => input])
            .map_err(|e| InferError::Run(e.to_string()))?;
        let (shape, values) = outputs[self.output_name.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(|e| InferError::Run(e.to_string()))?;
        let k = self.num_outputs;
        if shape.len() != 2 || shape[0] as usize != n || shape[1] as usize != k {
            return Err(InferError::Run(format!(
                "output shape {:?}, expected [{n}, {k}]",
                &shape[..]
            )));
        }
        Array2::from_shape_vec((n, k), values.to_vec()).map_err(|e| InferError::Run(e.to_string()))
    }

    fn channels(&self) -> usize {
        self.channels
    }

    fn window(&self) -> usize {
        self.window
    }

    fn num_outputs(&self) -> usize {
        self.num_outputs
    }

    fn execution_provider(&self) -> &str {
        &self.provider
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads the library the fetch script installs, or skips (unless CI requires it).
    fn runtime_or_skip() -> bool {
        match init_runtime(None) {
            Ok(_) => true,
            Err(e) if std::env::var_os("DIREDI_REQUIRE_DATA").is_none() => {
                eprintln!("skipping: {e}");
                false
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn missing_library_error_says_how_to_get_it() {
        let err = init_runtime(Some(Path::new("no/such/dir/libonnxruntime.so.1.31.1")))
            .expect_err("a missing file cannot load");
        let msg = err.to_string();
        assert!(msg.contains("no/such/dir"), "{msg}");
        assert!(msg.contains("scripts/fetch-onnxruntime.sh"), "{msg}");
        assert!(msg.contains("ORT_DYLIB_PATH"), "{msg}");
    }

    #[test]
    fn unknown_provider_is_rejected_by_validation() {
        assert!(validate_providers(&["cpu".into(), "xnnpack".into()]).is_ok());
        let err = validate_providers(&["tpu9000".into()]).expect_err("unknown");
        assert!(err.to_string().contains("tpu9000"));
    }

    #[test]
    fn corrupted_and_truncated_models_are_rejected() {
        if !runtime_or_skip() {
            return;
        }
        let garbage = b"\x08\x07this is not an onnx model".to_vec();
        let err = OrtClassifier::from_bytes(&garbage, &SessionConfig::default())
            .expect_err("garbage must not load");
        assert!(matches!(err, InferError::Model(_)), "{err}");
        assert!(OrtClassifier::from_bytes(&[], &SessionConfig::default()).is_err());
    }
}
