//! Safe installation of a dispatched model, and rollback.
//!
//! Data flow: `model` announcement (retained) → subscribe to its chunks → [`Assembly`]
//! (sha256 per chunk) → **received** → **verified** (signature over manifest and ONNX bytes,
//! trusted key, sha256 of every file, a newer version, the same channels and sample rate as
//! the installed model) → **smoke run** (the probe windows, or zeros, through ONNX Runtime:
//! finite outputs that sum to one, latency within bounds) → **staged** (files written to a
//! temporary directory, fsynced, renamed into `models/` of the state directory, then the
//! `current` pointer replaced atomically, the previous model kept) → **committed** (swapped
//! behind the model's `ArcSwap`; windows in flight finish on the old model) and shown in
//! `status`. A failure at any step leaves the installed model serving and is shown in
//! `status` (`install.state = "rejected"`) and on the error topic.
//!
//! At start the gateway serves the model `current` points to when its version is higher
//! than the configured one, so an installed update survives restarts. `{"cmd":"rollback"}`
//! swaps back to the previous model and points `current` at it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use diredi_infer::{Classifier, OrtClassifier, SessionConfig};
use diredi_protocol::dispatch::{chunk_filter, parse_chunk_topic, Assembly, DispatchMsg};
use diredi_protocol::manifest::{Manifest, ReceivedModel};
use diredi_protocol::messages::{GatewayState, InstallStatus};
use diredi_protocol::topics::{Topics, FLEET_MODEL};
use ndarray::Array3;
use rumqttc::{AsyncClient, QoS};

use crate::config::{ModelConfig, RuntimeConfig};
use crate::model::{read_probe, LoadedModel, ModelError, ModelHandle, ModelSource};
use crate::status::{self, Identity};

/// Longest accepted mean inference time per probe window in the smoke run.
const SMOKE_MAX_MS_PER_WINDOW: f64 = 50.0;
/// Probe windows run in the smoke test.
const SMOKE_WINDOWS: usize = 64;

/// Why an installation failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The announcement or a chunk is invalid.
    #[error(transparent)]
    Dispatch(#[from] diredi_protocol::dispatch::DispatchError),
    /// Signature, hash or manifest problem.
    #[error("verification failed: {0}")]
    Verify(String),
    /// Not newer than the installed model.
    #[error("version {new} is not newer than the installed version {installed}")]
    NotNewer {
        /// Announced.
        new: u64,
        /// Installed.
        installed: u64,
    },
    /// The new model reads other sensors than the installed one.
    #[error("incompatible input: {0}")]
    Incompatible(String),
    /// The smoke run failed.
    #[error("smoke run failed: {0}")]
    Smoke(String),
    /// Loading the model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Writing the files failed.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Nothing to roll back to.
    #[error("no previous model to roll back to")]
    NoPrevious,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Checks that `new` reads the same channels at the same rate as `installed`.
pub fn compatible(installed: &Manifest, new: &Manifest) -> Result<(), InstallError> {
    if installed.input.channels != new.input.channels {
        return Err(InstallError::Incompatible(format!(
            "channels {:?}, the installed model reads {:?}",
            new.input.channels, installed.input.channels
        )));
    }
    if (installed.input.sample_rate_hz - new.input.sample_rate_hz).abs() > 1e-9 {
        return Err(InstallError::Incompatible(format!(
            "sample rate {} Hz, the installed model's is {} Hz",
            new.input.sample_rate_hz, installed.input.sample_rate_hz
        )));
    }
    Ok(())
}

/// Runs `classifier` on up to [`SMOKE_WINDOWS`] probe windows (zeros without a probe set):
/// outputs must be finite probabilities and fast enough.
pub fn smoke(
    classifier: &dyn Classifier,
    probe: Option<&[u8]>,
    output_is_probabilities: bool,
) -> Result<(), InstallError> {
    let (c, t) = (classifier.channels(), classifier.window());
    let x: Vec<f32> = match probe {
        Some(bytes) => {
            let p = diredi_learn::probe::ProbeSet::from_bytes(bytes)
                .map_err(|e| InstallError::Smoke(format!("probe set: {e}")))?;
            if p.channels != c || p.window != t {
                return Err(InstallError::Smoke(format!(
                    "probe windows are {}x{}, the model takes {c}x{t}",
                    p.channels, p.window
                )));
            }
            let n = p.y.len().min(SMOKE_WINDOWS);
            p.x[..n * c * t].to_vec()
        }
        None => vec![0.0; 8 * c * t],
    };
    let n = x.len() / (c * t).max(1);
    let batch =
        Array3::from_shape_vec((n, c, t), x).map_err(|e| InstallError::Smoke(e.to_string()))?;
    let started = Instant::now();
    let out = classifier
        .classify(batch.view())
        .map_err(|e| InstallError::Smoke(e.to_string()))?;
    let ms = started.elapsed().as_secs_f64() * 1e3 / n.max(1) as f64;
    if let Some(bad) = out.iter().find(|v| !v.is_finite()) {
        return Err(InstallError::Smoke(format!("non-finite output {bad}")));
    }
    if output_is_probabilities {
        for row in out.rows() {
            let sum: f32 = row.sum();
            if (sum - 1.0).abs() > 1e-3 {
                return Err(InstallError::Smoke(format!(
                    "output rows must sum to 1, one sums to {sum}"
                )));
            }
        }
    }
    if ms > SMOKE_MAX_MS_PER_WINDOW {
        return Err(InstallError::Smoke(format!(
            "{ms:.1} ms per window, more than {SMOKE_MAX_MS_PER_WINDOW} ms"
        )));
    }
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), InstallError> {
    let mut f = std::fs::File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// Fault injection for the crash tests (`gateway/tests/gateway/process.rs`): when the
/// environment variable `DIREDI_FAULT_INSTALL` names `step`, the process dies right here
/// (abort: no destructor runs and nothing more is written, as under kill -9). Steps, in order:
/// `staging`, `staged`, `renamed`, `previous-tmp`, `previous`, `current-tmp`, `current`.
fn crash_point(step: &str) {
    if std::env::var_os("DIREDI_FAULT_INSTALL").is_some_and(|s| s == step) {
        eprintln!("DIREDI_FAULT_INSTALL: the process dies at install step {step}");
        std::process::abort();
    }
}

fn sync_dir(dir: &Path) -> Result<(), InstallError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// The installed models in `{state}/models/`: one directory per version, and the `current`
/// and `previous` pointers (files holding a directory name).
#[derive(Debug, Clone)]
pub struct ModelStore {
    dir: PathBuf,
}

impl ModelStore {
    /// The model store under `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        ModelStore {
            dir: state_dir.join("models"),
        }
    }

    fn pointer(&self, name: &str) -> Option<PathBuf> {
        let text = std::fs::read_to_string(self.dir.join(name)).ok()?;
        let sub = text.trim();
        let p = Path::new(sub);
        (p.components().count() == 1 && !sub.is_empty()).then(|| self.dir.join(sub))
    }

    /// Manifest path of the current installed model, if any.
    pub fn current_manifest(&self) -> Option<PathBuf> {
        self.pointer("current").map(|d| d.join("manifest.json"))
    }

    /// Manifest path of the previous installed model, if any.
    pub fn previous_manifest(&self) -> Option<PathBuf> {
        self.pointer("previous").map(|d| d.join("manifest.json"))
    }

    fn set_pointer(&self, name: &str, target: &str) -> Result<(), InstallError> {
        let tmp = self.dir.join(format!(".{name}.tmp"));
        write_synced(&tmp, target.as_bytes())?;
        crash_point(&format!("{name}-tmp"));
        let path = self.dir.join(name);
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        sync_dir(&self.dir)
    }

    /// Writes the files of `manifest` (manifest.json plus the named files) into
    /// `models/{model_id}-v{version}/` through a temporary directory, then points `current`
    /// at it and `previous` at what `current` was. Returns the new manifest path.
    pub fn stage(
        &self,
        manifest_json: &[u8],
        m: &Manifest,
        files: &[(String, Vec<u8>)],
        previous: Option<&Path>,
    ) -> Result<PathBuf, InstallError> {
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let name = format!("{}-v{}", m.model_id, m.version);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        write_synced(&tmp.join("manifest.json"), manifest_json)?;
        crash_point("staging");
        for (file, bytes) in files {
            write_synced(&tmp.join(file), bytes)?;
        }
        sync_dir(&tmp)?;
        crash_point("staged");
        let fin = self.dir.join(&name);
        if fin.exists() {
            std::fs::remove_dir_all(&fin).map_err(io(&fin))?;
        }
        std::fs::rename(&tmp, &fin).map_err(io(&fin))?;
        sync_dir(&self.dir)?;
        crash_point("renamed");
        if let Some(prev_dir) = previous
            .and_then(Path::parent)
            .and_then(|d| d.file_name())
            .and_then(|d| d.to_str())
        {
            if prev_dir != name {
                self.set_pointer("previous", prev_dir)?;
                crash_point("previous");
            }
        }
        self.set_pointer("current", &name)?;
        crash_point("current");
        Ok(fin.join("manifest.json"))
    }

    /// Points `current` at the directory of `manifest` (a rollback); `previous` is cleared.
    pub fn point_current_at(&self, manifest: &Path) -> Result<(), InstallError> {
        let name = manifest
            .parent()
            .and_then(|d| d.file_name())
            .and_then(|d| d.to_str())
            .ok_or(InstallError::NoPrevious)?;
        if manifest.starts_with(&self.dir) {
            self.set_pointer("current", name)?;
        } else {
            // The previous model is the configured one: no installed model is current.
            let cur = self.dir.join("current");
            if cur.exists() {
                std::fs::remove_file(&cur).map_err(io(&cur))?;
            }
        }
        let prev = self.dir.join("previous");
        if prev.exists() {
            std::fs::remove_file(&prev).map_err(io(&prev))?;
        }
        Ok(())
    }
}

/// Reads, verifies and loads the model at `manifest` (as at start-up), with its source.
pub fn load_manifest(
    manifest: &Path,
    model: &ModelConfig,
    runtime: &RuntimeConfig,
) -> Result<LoadedModel, ModelError> {
    let cfg = ModelConfig {
        manifest: Some(manifest.to_path_buf()),
        trusted_keys: model.trusted_keys.clone(),
    };
    crate::model::load(&cfg, runtime)
}

/// Verifies, smoke-tests and stages an assembled model. Blocking (ONNX Runtime, fsync).
pub fn verify_and_stage(
    files: Vec<(String, Vec<u8>)>,
    msg: &DispatchMsg,
    installed: &LoadedModel,
    installed_manifest: Option<&Path>,
    model_cfg: &ModelConfig,
    runtime: &RuntimeConfig,
    store: &ModelStore,
) -> Result<(LoadedModel, PathBuf), InstallError> {
    let manifest_json = serde_json::to_vec(&msg.manifest)
        .map_err(|e| InstallError::Verify(format!("manifest: {e}")))?;
    let onnx = files
        .first()
        .map(|f| f.1.clone())
        .ok_or_else(|| InstallError::Verify("no ONNX file".into()))?;
    let verified = ReceivedModel::new(manifest_json.clone(), onnx)
        .verify(&model_cfg.trusted_keys)
        .map_err(|e| InstallError::Verify(e.to_string()))?;
    let m = verified.manifest().clone();
    if files[0].0 != m.onnx_file {
        return Err(InstallError::Verify(format!(
            "the first file is {}, the manifest names {}",
            files[0].0, m.onnx_file
        )));
    }
    // Every file is staged under its announced name, but only the manifest's names are signed:
    // any other name (for example a second `manifest.json`) is refused, as is a repeat.
    for (i, (name, _)) in files.iter().enumerate() {
        let signed = *name == m.onnx_file || m.probe.as_ref().is_some_and(|p| p.file == *name);
        if !signed {
            return Err(InstallError::Verify(format!(
                "file {name} is not named by the signed manifest"
            )));
        }
        if files[..i].iter().any(|(n, _)| n == name) {
            return Err(InstallError::Verify(format!("file {name} is sent twice")));
        }
    }
    let spec = installed.spec();
    if m.version <= spec.version {
        return Err(InstallError::NotNewer {
            new: m.version,
            installed: spec.version,
        });
    }
    if let Some(src) = installed.source() {
        compatible(&src.manifest, &m)?;
    } else if spec.input.channels != m.input.channels {
        return Err(InstallError::Incompatible(format!(
            "channels {:?}, the installed model reads {:?}",
            m.input.channels, spec.input.channels
        )));
    }
    let probe: Option<Arc<[u8]>> = match &m.probe {
        Some(p) => {
            let (_, bytes) = files.iter().find(|(n, _)| *n == p.file).ok_or_else(|| {
                InstallError::Verify(format!("the probe file {} was not sent", p.file))
            })?;
            if diredi_protocol::manifest::sha256_hex(bytes) != p.sha256 {
                return Err(InstallError::Verify(format!(
                    "probe file {} does not match the signed sha256",
                    p.file
                )));
            }
            Some(bytes.clone().into())
        }
        None => None,
    };
    diredi_infer::init_runtime(runtime.library.as_deref()).map_err(ModelError::from)?;
    let session = SessionConfig {
        intra_threads: runtime.intra_threads,
        inter_threads: runtime.inter_threads,
        providers: runtime.providers.clone(),
    };
    let classifier =
        OrtClassifier::from_bytes(verified.onnx(), &session).map_err(ModelError::from)?;
    smoke(
        &classifier,
        probe.as_deref(),
        m.output.kind == diredi_protocol::manifest::OutputKind::Probabilities,
    )?;
    let loaded = LoadedModel::new(&verified, Box::new(classifier))?;
    let path = store.stage(&manifest_json, &m, &files, installed_manifest)?;
    let (manifest, onnx) = verified.into_parts();
    // The staged probe is the one just checked; reading it back proves the write.
    let probe = match read_probe(&path, &manifest)? {
        Some(p) => Some(p),
        None => probe,
    };
    Ok((
        loaded.with_source(ModelSource {
            manifest,
            onnx: onnx.into(),
            probe,
        }),
        path,
    ))
}

/// An install status of `state` for `version`.
fn stage(state: &str, version: Option<u64>, detail: Option<String>) -> InstallStatus {
    InstallStatus {
        state: state.to_owned(),
        version,
        detail,
    }
}

/// One model being received.
#[derive(Debug)]
struct Receiving {
    model_topic: String,
    assembly: Assembly,
    started: Instant,
}

/// The install state machine of one gateway.
pub struct Installer {
    topics: Topics,
    identity: Identity,
    client: AsyncClient,
    model: ModelHandle,
    model_cfg: ModelConfig,
    runtime: RuntimeConfig,
    store: ModelStore,
    /// Manifest path of the model serving now, and of the one before it.
    active_path: Option<PathBuf>,
    previous: Option<(Arc<LoadedModel>, Option<PathBuf>)>,
    receiving: Option<Receiving>,
    last: Option<InstallStatus>,
    /// Other links that show the install progress in their retained status (the local broker
    /// when the models come over the uplink).
    status_also: Vec<AsyncClient>,
}

impl std::fmt::Debug for Installer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Installer")
            .field("active_path", &self.active_path)
            .finish()
    }
}

impl Installer {
    /// An installer for the gateway serving `model` (loaded from `active_path`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        topics: Topics,
        identity: Identity,
        client: AsyncClient,
        model: ModelHandle,
        model_cfg: ModelConfig,
        runtime: RuntimeConfig,
        state_dir: &Path,
        active_path: Option<PathBuf>,
    ) -> Self {
        Installer {
            topics,
            identity,
            client,
            model,
            model_cfg,
            runtime,
            store: ModelStore::new(state_dir),
            active_path,
            previous: None,
            receiving: None,
            last: None,
            status_also: Vec::new(),
        }
    }

    /// Topics to subscribe to for announcements.
    pub fn subscriptions(&self) -> Vec<String> {
        vec![self.topics.model(), FLEET_MODEL.to_owned()]
    }

    async fn publish_status(&mut self, install: InstallStatus) {
        self.last = Some(install.clone());
        let mut msg = status::status(
            &self.identity,
            GatewayState::Online,
            Some(&self.model.load()),
        );
        msg.install = Some(install);
        if let Ok(payload) = serde_json::to_vec(&msg) {
            for client in std::iter::once(&self.client).chain(&self.status_also) {
                let _ = client
                    .publish(
                        self.topics.status(),
                        QoS::AtLeastOnce,
                        true,
                        payload.clone(),
                    )
                    .await;
            }
        }
    }

    /// Also publishes the install progress in the status on `client`'s broker.
    pub fn with_status_also_on(mut self, client: AsyncClient) -> Self {
        self.status_also.push(client);
        self
    }

    async fn reject(&mut self, version: Option<u64>, e: &InstallError) {
        tracing::warn!(version, error = %e, "Model installation rejected; the installed model keeps serving.");
        self.publish_status(InstallStatus {
            state: "rejected".into(),
            version,
            detail: Some(e.to_string()),
        })
        .await;
    }

    /// Handles a message on a model topic or a chunk topic.
    pub async fn on_message(&mut self, topic: &str, payload: &[u8]) {
        if topic == self.topics.model() || topic == FLEET_MODEL {
            if payload.is_empty() {
                return; // a cleared retained announcement
            }
            self.on_announcement(topic, payload).await;
            return;
        }
        let Some(r) = self.receiving.as_mut() else {
            return;
        };
        let Some((version, file, index)) = parse_chunk_topic(&r.model_topic, topic) else {
            return;
        };
        if version != r.assembly.announcement().version {
            return;
        }
        if let Err(e) = r.assembly.accept(file, index, payload) {
            let e = InstallError::from(e);
            let _ = self
                .client
                .unsubscribe(chunk_filter(&r.model_topic, version))
                .await;
            self.receiving = None;
            self.reject(Some(version), &e).await;
            return;
        }
        if r.assembly.missing() == 0 {
            self.complete().await;
        }
    }

    async fn on_announcement(&mut self, topic: &str, payload: &[u8]) {
        let msg = match DispatchMsg::parse(payload) {
            Ok(m) => m,
            Err(e) => {
                self.reject(None, &e.into()).await;
                return;
            }
        };
        let installed = self.model.load().spec().version;
        if msg.version == installed {
            // The retained announcement of what is installed arrives at every connection.
            return;
        }
        if msg.version < installed {
            let e = InstallError::NotNewer {
                new: msg.version,
                installed,
            };
            self.reject(Some(msg.version), &e).await;
            return;
        }
        if let Some(r) = &self.receiving {
            if r.assembly.announcement().version == msg.version {
                // Announced again (a reconnection): subscribe again to resume; the retained
                // chunks come back and the ones held already are ignored.
                let _ = self
                    .client
                    .subscribe(chunk_filter(topic, msg.version), QoS::AtLeastOnce)
                    .await;
                return;
            }
            let _ = self
                .client
                .unsubscribe(chunk_filter(
                    &r.model_topic,
                    r.assembly.announcement().version,
                ))
                .await;
        }
        let version = msg.version;
        let assembly = Assembly::new(msg);
        tracing::info!(version, chunks = assembly.total(), "Receiving a model.");
        self.receiving = Some(Receiving {
            model_topic: topic.to_owned(),
            assembly,
            started: Instant::now(),
        });
        self.publish_status(stage("receiving", Some(version), None))
            .await;
        let _ = self
            .client
            .subscribe(chunk_filter(topic, version), QoS::AtLeastOnce)
            .await;
    }

    async fn complete(&mut self) {
        let Some(r) = self.receiving.take() else {
            return;
        };
        let version = r.assembly.announcement().version;
        let _ = self
            .client
            .unsubscribe(chunk_filter(&r.model_topic, version))
            .await;
        let files = match r.assembly.finish() {
            Ok(f) => f,
            Err(e) => {
                self.reject(Some(version), &e.into()).await;
                return;
            }
        };
        self.publish_status(InstallStatus {
            state: "verifying".into(),
            version: Some(version),
            detail: Some(format!(
                "received in {:.1} s",
                r.started.elapsed().as_secs_f64()
            )),
        })
        .await;
        let installed = self.model.load_full();
        let msg = r.assembly.announcement().clone();
        let (model_cfg, runtime, store, active) = (
            self.model_cfg.clone(),
            self.runtime.clone(),
            self.store.clone(),
            self.active_path.clone(),
        );
        let inst = installed.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            verify_and_stage(
                files,
                &msg,
                &inst,
                active.as_deref(),
                &model_cfg,
                &runtime,
                &store,
            )
        })
        .await;
        match outcome {
            Ok(Ok((loaded, path))) => {
                let old_path = self.active_path.replace(path);
                self.previous = Some((installed, old_path));
                self.model.store(Arc::new(loaded));
                tracing::info!(version, "Model installed and serving.");
                self.release_pages("model install");
                self.publish_status(stage("committed", Some(version), None))
                    .await;
            }
            Ok(Err(e)) => self.reject(Some(version), &e).await,
            Err(e) => {
                let e = InstallError::Smoke(format!("install task failed: {e}"));
                self.reject(Some(version), &e).await;
            }
        }
    }

    /// Unmaps the code pages only loading ran, off the async threads ([`crate::memory`]).
    fn release_pages(&self, after: &'static str) {
        if self.runtime.release_startup_pages {
            tokio::task::spawn_blocking(move || crate::memory::release_after(after));
        }
    }

    /// Swaps back to the previous model. Errors when there is none.
    pub async fn rollback(&mut self) -> Result<u64, InstallError> {
        let (prev, prev_path) = match self.previous.take() {
            Some(p) => p,
            None => {
                // After a restart the previous model is only on disk.
                let path = self
                    .store
                    .previous_manifest()
                    .or_else(|| self.model_cfg.manifest.clone())
                    .ok_or(InstallError::NoPrevious)?;
                if Some(&path) == self.active_path.as_ref() {
                    return Err(InstallError::NoPrevious);
                }
                let (cfg, rt, p2) = (self.model_cfg.clone(), self.runtime.clone(), path.clone());
                let loaded = tokio::task::spawn_blocking(move || load_manifest(&p2, &cfg, &rt))
                    .await
                    .map_err(|e| InstallError::Smoke(e.to_string()))??;
                (Arc::new(loaded), Some(path))
            }
        };
        if let Some(p) = &prev_path {
            self.store.point_current_at(p)?;
        }
        let version = prev.spec().version;
        self.active_path = prev_path;
        self.model.store(prev);
        tracing::info!(version, "Rolled back to the previous model.");
        self.release_pages("rollback");
        self.publish_status(stage("rolled_back", Some(version), None))
            .await;
        Ok(version)
    }

    /// The last install status published.
    pub fn last_status(&self) -> Option<&InstallStatus> {
        self.last.as_ref()
    }
}

/// The model to serve at start: the installed one when `current` points to a newer version
/// than the configured model, else the configured one. Returns it with its manifest path.
pub fn startup_model(
    model_cfg: &ModelConfig,
    runtime: &RuntimeConfig,
    state_dir: Option<&Path>,
) -> Result<(LoadedModel, Option<PathBuf>), ModelError> {
    let configured = crate::model::load(model_cfg, runtime)?;
    let Some(installed) = state_dir.and_then(|d| ModelStore::new(d).current_manifest()) else {
        return Ok((configured, model_cfg.manifest.clone()));
    };
    match load_manifest(&installed, model_cfg, runtime) {
        Ok(m) if m.spec().version > configured.spec().version => {
            tracing::info!(
                version = m.spec().version,
                path = %installed.display(),
                "Serving the installed model update."
            );
            Ok((m, Some(installed)))
        }
        Ok(_) => Ok((configured, model_cfg.manifest.clone())),
        Err(e) => {
            tracing::warn!(error = %e, path = %installed.display(), "The installed model update cannot be loaded; serving the configured model.");
            Ok((configured, model_cfg.manifest.clone()))
        }
    }
}
