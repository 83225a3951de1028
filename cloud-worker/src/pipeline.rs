//! The manufacturer's side of DiReDi, step by step: load a dataset and split, train the
//! teacher (the large model) on the presumed data, distil the student (the edge model) from
//! it on the presumed data plus the unlabelled pool, evaluate, export to ONNX and sign.
//!
//! Every step is a function the CLI calls on its own or all together (`pipeline`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use diredi_learn::dataset::Dataset;
use diredi_learn::metrics::{evaluate, Evaluation};
use diredi_learn::model::{ModelConfig, Net};
use diredi_learn::probe::ProbeSet;
use diredi_learn::split::{Split, SplitConfig};
use diredi_learn::train::{
    predict, predict_classes, train_distill, train_supervised, DistillPart, Labelled, TrainConfig,
    TrainReport, Windows,
};
use diredi_learn::window::WindowSet;
use diredi_protocol::manifest::{sha256_hex, sign_manifest, SigningKey, MANIFEST_FORMAT};
use serde::Serialize;
use serde_json::json;

/// A dataset with a split materialised over it.
pub struct Prepared {
    pub dataset: Dataset,
    pub split: Split,
}

/// Loads the dataset and builds the split, reporting every split problem at once.
pub fn prepare(dataset_dir: &Path, split_file: &Path) -> Result<Prepared> {
    let dataset = Dataset::load(dataset_dir)
        .with_context(|| format!("loading dataset {}", dataset_dir.display()))?;
    let cfg = SplitConfig::from_file(split_file)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("reading split {}", split_file.display()))?;
    let split = Split::build(&cfg, &dataset)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("building split {}", split_file.display()))?;
    Ok(Prepared { dataset, split })
}

/// Which windows of a split to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Part {
    PresumedTrain,
    PresumedVal,
    PresumedTest,
    UserExclusive,
    UserTest,
}

/// The windows of `part`; for user parts, of `user` or of every user together.
pub fn part_windows(split: &Split, part: Part, user: Option<&str>) -> Result<WindowSet> {
    let set = match part {
        Part::PresumedTrain => split.presumed_train.clone(),
        Part::PresumedVal => split.presumed_val.clone(),
        Part::PresumedTest => split.presumed_test.clone(),
        Part::UserExclusive | Part::UserTest => {
            let users: Vec<_> = split
                .users
                .iter()
                .filter(|u| user.is_none_or(|s| s == u.subject))
                .collect();
            if users.is_empty() {
                bail!(
                    "no user {} in split {} (users: {})",
                    user.unwrap_or("?"),
                    split.name,
                    split
                        .users
                        .iter()
                        .map(|u| u.subject.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            let sets: Vec<&WindowSet> = users
                .iter()
                .map(|u| {
                    if part == Part::UserExclusive {
                        &u.exclusive
                    } else {
                        &u.test
                    }
                })
                .collect();
            WindowSet::concat(&sets)?
        }
    };
    if user.is_some() && !matches!(part, Part::UserExclusive | Part::UserTest) {
        bail!("--user only applies to the user parts");
    }
    Ok(set)
}

/// Trains the teacher on the presumed training windows, stopping early on the validation ones.
pub fn train_teacher(split: &Split, cfg: &TrainConfig) -> Result<(Net, TrainReport)> {
    let mc = ModelConfig::teacher(split.channels.len(), split.window.len(), split.num_presumed);
    let net = Net::new(mc, cfg.seed)?;
    tracing::info!(
        params = net.param_count(),
        windows = split.presumed_train.n(),
        "Training the teacher."
    );
    let train = Labelled::of(&split.presumed_train)?;
    let val = Labelled::of(&split.presumed_val)?;
    let report = train_supervised(&net, &train, Some(&val), cfg)?;
    Ok((net, report))
}

/// Distils a student from `teacher` on the presumed training windows (KL + CE) and the pool
/// (KL only), stopping early on the validation windows.
pub fn distill_student(
    teacher: &Net,
    split: &Split,
    cfg: &TrainConfig,
) -> Result<(Net, TrainReport)> {
    let k = teacher.config().num_classes;
    let mc = ModelConfig::student(split.channels.len(), split.window.len(), k);
    let student = Net::new(mc, cfg.seed)?;
    let train_x = Windows::of(&split.presumed_train)?;
    let pool_x = Windows::of(&split.pool)?;
    let t0 = Instant::now();
    let train_logits = predict(teacher, &train_x, cfg.eval_batch)?;
    let pool_logits = predict(teacher, &pool_x, cfg.eval_batch)?;
    tracing::info!(
        params = student.param_count(),
        labelled = train_x.n(),
        pool = pool_x.n(),
        seconds = t0.elapsed().as_secs_f64(),
        "Distilling the student from the teacher's outputs."
    );
    let parts = [
        DistillPart {
            x: train_x,
            teacher_logits: &train_logits,
            labels: Some(&split.presumed_train.y),
        },
        DistillPart {
            x: pool_x,
            teacher_logits: &pool_logits,
            labels: None,
        },
    ];
    let val = Labelled::of(&split.presumed_val)?;
    let report = train_distill(&student, &parts, Some(&val), cfg)?;
    Ok((student, report))
}

/// Evaluates a candle model on labelled windows; its outputs are the split's first classes.
pub fn evaluate_net(net: &Net, split: &Split, set: &WindowSet) -> Result<Evaluation> {
    let k = net.config().num_classes;
    if k > split.classes.len() {
        bail!(
            "model has {k} outputs, the split only {} classes",
            split.classes.len()
        );
    }
    let pred = predict_classes(net, &Windows::of(set)?, 256)?;
    Ok(evaluate(&pred, &set.y, &split.classes)?)
}

/// Saves a checkpoint with the split's classes and standardiser beside the weights.
pub fn save_checkpoint(
    net: &Net,
    split: &Split,
    path: &Path,
    report: &TrainReport,
) -> Result<PathBuf> {
    let extra = json!({
        "classes": split.classes[..net.config().num_classes],
        "channels": split.channels,
        "sample_rate_hz": split.sample_rate_hz,
        "window": split.window.len(),
        "stride": split.window.stride(),
        "mean": split.standardizer.mean,
        "std": split.standardizer.std,
        "split": split.name,
        "train": report,
    });
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    Ok(net.save(path, &extra)?)
}

/// Loads a checkpoint written by [`save_checkpoint`] and checks it matches `split`.
pub fn load_checkpoint(path: &Path, split: &Split) -> Result<Net> {
    let (net, extra) = Net::load(path).with_context(|| format!("loading {}", path.display()))?;
    let classes: Vec<String> = serde_json::from_value(extra["classes"].clone()).unwrap_or_default();
    let k = net.config().num_classes;
    if classes.len() != k || split.classes.get(..k) != Some(&classes[..]) {
        bail!(
            "checkpoint {} was trained for classes {:?}, the split's first {k} are {:?}",
            path.display(),
            classes,
            split.classes.get(..k.min(split.classes.len()))
        );
    }
    Ok(net)
}

/// What to write into a new edge-model package.
pub struct ExportSpec<'a> {
    pub model_id: &'a str,
    pub version: u64,
    pub parent_version: Option<u64>,
    pub out_dir: &'a Path,
    pub metrics: serde_json::Value,
}

/// Windows of the probe set shipped beside every exported model (see
/// [`diredi_learn::probe`]): balanced over the model's classes, from the presumed validation
/// subjects (manufacturer data, never user data).
pub const PROBE_WINDOWS: usize = 256;

/// Exports `student` to `<out>/<model_id>-v<version>.onnx` with its probe set
/// (`<model_id>-v<version>.probe`) and a signed manifest beside it that references both;
/// returns the manifest path.
pub fn export_signed(
    student: &Net,
    split: &Split,
    spec: &ExportSpec<'_>,
    key: &SigningKey,
) -> Result<PathBuf> {
    let onnx = diredi_learn::onnx::export(student)?;
    let k = student.config().num_classes;
    let stem = format!("{}-v{}", spec.model_id, spec.version);
    let onnx_file = format!("{stem}.onnx");
    let probe_file = format!("{stem}.probe");
    let probe = ProbeSet::select(&split.presumed_val, &split.classes[..k], PROBE_WINDOWS)?;
    let probe_bytes = probe.to_bytes()?;
    let manifest_path = spec.out_dir.join(format!("{stem}.json"));
    let metrics = keep_training_record(&manifest_path, &sha256_hex(&onnx), &spec.metrics);
    let manifest = json!({
        "format": MANIFEST_FORMAT,
        "model_id": spec.model_id,
        "version": spec.version,
        "parent_version": spec.parent_version,
        "created_at": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        "onnx_file": onnx_file,
        "sha256": sha256_hex(&onnx),
        "input": {
            "name": "input",
            "layout": "NCT",
            "channels": split.channels,
            "window": split.window.len(),
            "stride": split.window.stride(),
            "sample_rate_hz": split.sample_rate_hz,
            "mean": split.standardizer.mean,
            "std": split.standardizer.std,
        },
        "output": {"name": "probabilities", "kind": "probabilities"},
        "classes": split.classes[..k],
        "params": student.param_count(),
        "metrics": metrics,
        "probe": {"file": probe_file, "sha256": sha256_hex(&probe_bytes)},
        "split": split.name,
    });
    let signed = sign_manifest(&manifest, &onnx, key)?;
    std::fs::create_dir_all(spec.out_dir)
        .with_context(|| format!("creating {}", spec.out_dir.display()))?;
    let onnx_path = spec.out_dir.join(&onnx_file);
    write_atomic(&onnx_path, &onnx)?;
    write_atomic(&spec.out_dir.join(&probe_file), &probe_bytes)?;
    write_atomic(&manifest_path, &serde_json::to_vec_pretty(&signed)?)?;
    Ok(manifest_path)
}

/// `metrics`, plus the `training` record of the manifest already at `path` when that manifest
/// describes the same ONNX bytes and `metrics` has none: re-exporting the same weights (for
/// example to add a probe set) keeps how they were trained.
fn keep_training_record(
    path: &Path,
    sha256: &str,
    metrics: &serde_json::Value,
) -> serde_json::Value {
    let mut out = metrics.clone();
    let old: Option<serde_json::Value> = std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if let (Some(old), serde_json::Value::Object(m)) = (old, &mut out) {
        if old["sha256"] == sha256 && !m.contains_key("training") {
            if let Some(t) = old["metrics"].get("training") {
                m.insert("training".to_owned(), t.clone());
            }
        }
    }
    out
}

/// Writes through a temporary file and a rename, so a reader never sees half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}
