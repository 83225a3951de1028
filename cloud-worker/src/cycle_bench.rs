//! `diredi-cloud-worker bench`: the whole DiReDi cycle for every user of a split, in process,
//! with the evidence (JSON + a Markdown report with an SVG plot).
//!
//! Per user, four methods are compared on the user's test windows and the presumed test set:
//! - **S0**: the installed student (imported from the shipped ONNX), no update;
//! - **LOCAL**: the student adapted on the device ([`diredi_learn::adapt`]), reported as is;
//! - **DIREDI**: adapt → knowledge bytes → `from_bytes` → cloud [`update`] → new student;
//! - **UPLOAD**: the cloud retrains with the user's raw exclusive windows (breaks privacy;
//!   the upper bound, for comparison only).
//!
//! Also: bytes of the knowledge, of the raw exclusive windows (f32) and of the full model; the
//! time of each step; and a membership-inference attack (loss threshold, ROC AUC) on the
//! model rebuilt from the knowledge (members = the user's exclusive windows, non-members =
//! the user's test windows), with the same attack on S0 as the control. Nothing here is
//! specific to HAPT: any dataset in the generic format with a split works.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use diredi_learn::adapt::{adapt, AdaptConfig, AdaptError, Exclusive};
use diredi_learn::knowledge::{extract, Knowledge, KnowledgeMeta, QuantConfig};
use diredi_learn::metrics::{argmax_rows, evaluate, Evaluation};
use diredi_learn::model::Net;
use diredi_learn::probe::ProbeSet;
use diredi_learn::train::{predict, Windows};
use diredi_learn::window::WindowSet;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::onnx_eval::PackagedModel;
use crate::pipeline;
use crate::update::{update, update_with_raw, Baseline, UpdateConfig};

/// Arguments of `diredi-cloud-worker bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Dataset folder in the generic format.
    #[arg(long, default_value = "data/hapt")]
    pub dataset: PathBuf,
    /// Split configuration (TOML).
    #[arg(long, default_value = "cloud-worker/splits/hapt.toml")]
    pub split: PathBuf,
    /// Where to write the JSON results.
    #[arg(long)]
    pub json: PathBuf,
    /// Only these users (comma-separated subject ids); default: every user of the split.
    #[arg(long, value_delimiter = ',')]
    pub users: Vec<String>,
    /// Markdown report (an SVG plot is written beside it).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Manifest of the installed student (its ONNX file is the base of adaptation).
    #[arg(long, default_value = "onnx-models/hapt-student-v1.json")]
    pub student: PathBuf,
    /// Teacher checkpoint (safetensors with its JSON sidecar).
    #[arg(long, default_value = "onnx-models/hapt-teacher-v1.safetensors")]
    pub teacher: PathBuf,
    /// Settings (TOML with optional `[adapt]` (and `[adapt.dp]`), `[quant]`, `[update]`
    /// tables).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Adapt with differential privacy (`[adapt.dp]` settings, enabled).
    #[arg(long)]
    pub dp: bool,
    /// The device's side only: S0, LOCAL, the knowledge and the attack; no cloud update, so
    /// DIREDI and UPLOAD are null. For tuning the adaptation quickly.
    #[arg(long)]
    pub device_only: bool,
}

/// Every setting of the benchmark.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BenchConfig {
    /// On-device adaptation.
    pub adapt: AdaptConfig,
    /// Knowledge quantisation.
    pub quant: QuantConfig,
    /// Cloud update.
    pub update: UpdateConfig,
    /// Probe windows taken from `presumed_val` when the manifest names no probe file.
    pub probe_windows: Option<usize>,
}

/// Accuracy and macro-F1 of one method on one set.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Score {
    acc: f64,
    f1: f64,
}

/// Predictions of `net` (whose outputs are `classes`) on `set`, scored against `split_classes`.
fn score(
    net: &Net,
    classes: &[String],
    set: &WindowSet,
    split_classes: &[String],
) -> Result<Score> {
    let e = eval(net, classes, set, split_classes)?;
    Ok(Score {
        acc: e.accuracy,
        f1: e.macro_f1,
    })
}

fn eval(
    net: &Net,
    classes: &[String],
    set: &WindowSet,
    split_classes: &[String],
) -> Result<Evaluation> {
    let mut names = split_classes.to_vec();
    let map: Vec<u32> = classes
        .iter()
        .map(|c| match names.iter().position(|n| n == c) {
            Some(i) => i as u32,
            None => {
                names.push(c.clone());
                (names.len() - 1) as u32
            }
        })
        .collect();
    let logits = predict(net, &Windows::of(set)?, 512)?;
    let pred: Vec<u32> = argmax_rows(&logits, classes.len())
        .into_iter()
        .map(|p| map[p as usize])
        .collect();
    Ok(evaluate(&pred, &set.y, &names)?)
}

/// Per-window cross-entropy of `net` on `set` (labels index `split_classes`); a label the
/// model does not have gets an infinite loss (it can never be "remembered").
fn losses(
    net: &Net,
    classes: &[String],
    set: &WindowSet,
    split_classes: &[String],
) -> Result<Vec<f64>> {
    let k = classes.len();
    let logits = predict(net, &Windows::of(set)?, 512)?;
    let mut out = Vec::with_capacity(set.n());
    for (row, &y) in logits.chunks_exact(k).zip(&set.y) {
        let name = &split_classes[y as usize];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = row
            .iter()
            .map(|v| f64::from(v - max).exp())
            .sum::<f64>()
            .ln()
            + f64::from(max);
        out.push(match classes.iter().position(|c| c == name) {
            Some(i) => lse - f64::from(row[i]),
            None => f64::INFINITY,
        });
    }
    Ok(out)
}

/// ROC AUC of the loss-threshold attack: the probability that a member has a lower loss than
/// a non-member (ties count one half).
pub fn mia_auc(members: &[f64], non_members: &[f64]) -> f64 {
    if members.is_empty() || non_members.is_empty() {
        return 0.5;
    }
    let mut wins = 0.0;
    for &m in members {
        for &n in non_members {
            if m < n {
                wins += 1.0;
            } else if m == n {
                wins += 0.5;
            }
        }
    }
    wins / (members.len() * non_members.len()) as f64
}

#[derive(Debug, Clone, Serialize)]
struct UserResult {
    user: String,
    s0_user_acc: f64,
    local_user_acc: f64,
    diredi_user_acc: f64,
    upload_user_acc: f64,
    s0_presumed_acc: f64,
    local_presumed_acc: f64,
    diredi_presumed_acc: f64,
    upload_presumed_acc: f64,
    knowledge_bytes: f64,
    exclusive_raw_bytes: f64,
    mia_auc: f64,
    mia_auc_control: f64,
    /// ε (at `[adapt.dp] delta`) of this adaptation, when it ran with differential privacy.
    dp_epsilon: Option<f64>,
    s0_user_f1: f64,
    local_user_f1: f64,
    diredi_user_f1: f64,
    upload_user_f1: f64,
    exclusive_windows: usize,
    test_windows: usize,
    new_classes: Vec<String>,
    probe_acc_before: f64,
    probe_acc_after: f64,
    guard_refused: bool,
    package_id: String,
    gate: serde_json::Value,
    upload_gate: serde_json::Value,
    /// Updated teachers' accuracy (user-test, presumed-test): diagnostics.
    teachers: serde_json::Value,
    seconds: serde_json::Value,
}

const KEYS: [&str; 17] = [
    "s0_user_acc",
    "local_user_acc",
    "diredi_user_acc",
    "upload_user_acc",
    "s0_presumed_acc",
    "local_presumed_acc",
    "diredi_presumed_acc",
    "upload_presumed_acc",
    "knowledge_bytes",
    "exclusive_raw_bytes",
    "mia_auc",
    "mia_auc_control",
    "s0_user_f1",
    "local_user_f1",
    "diredi_user_f1",
    "upload_user_f1",
    "probe_acc_after",
];

fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len().max(1) as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// Runs the benchmark; `machine` is recorded in the JSON.
pub fn run(args: &BenchArgs, machine: serde_json::Value) -> Result<()> {
    let mut cfg: BenchConfig = match &args.config {
        Some(p) => toml::from_str(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("parsing {}", p.display()))?,
        None => BenchConfig::default(),
    };
    cfg.adapt.dp.enabled |= args.dp;
    let dp_epsilon =
        |rho: Option<f64>| rho.map(|r| diredi_learn::privacy::epsilon(r, cfg.adapt.dp.delta));
    let started = Instant::now();
    let prepared = pipeline::prepare(&args.dataset, &args.split)?;
    let split = &prepared.split;
    let pkg = PackagedModel::read(&args.student)?;
    let k0 = pkg.manifest.classes.len();
    if pkg.manifest.classes[..] != split.classes[..k0.min(split.classes.len())]
        || split.num_presumed != k0
    {
        bail!(
            "the model's classes {:?} are not the split's presumed classes {:?}",
            pkg.manifest.classes,
            &split.classes[..split.num_presumed]
        );
    }
    let base_classes = pkg.manifest.classes.clone();
    let installed = diredi_learn::onnx::import(&pkg.onnx).context("importing the student")?;
    let teacher = pipeline::load_checkpoint(&args.teacher, split)?;
    let probe = match (&pkg.manifest.probe, cfg.probe_windows) {
        (Some(r), None) => {
            let dir = args.student.parent().unwrap_or(Path::new("."));
            ProbeSet::read(&dir.join(&r.file))?
        }
        (_, n) => ProbeSet::select(&split.presumed_val, &base_classes, n.unwrap_or(256))?,
    };
    tracing::info!(
        probe = probe.n(),
        "Computing the baseline of the installed models."
    );
    let baseline = Baseline::compute(&teacher, &installed, split)?;
    let s0_presumed = score(
        &installed,
        &base_classes,
        &split.presumed_test,
        &split.classes,
    )?;
    let model_bytes = pkg.onnx.len();

    let users: Vec<_> = split
        .users
        .iter()
        .filter(|u| args.users.is_empty() || args.users.contains(&u.subject))
        .collect();
    if users.is_empty() {
        bail!("no user of the split matches {:?}", args.users);
    }
    let mut results = Vec::new();
    for u in users {
        let labels: Vec<String> = u
            .exclusive
            .y
            .iter()
            .map(|&y| split.classes[y as usize].clone())
            .collect();
        let ex = Exclusive {
            x: Windows::of(&u.exclusive)?,
            labels: &labels,
        };
        let s0_user = score(&installed, &base_classes, &u.test, &split.classes)?;
        let s0_losses = (
            losses(&installed, &base_classes, &u.exclusive, &split.classes)?,
            losses(&installed, &base_classes, &u.test, &split.classes)?,
        );
        let mia_auc_control = mia_auc(&s0_losses.0, &s0_losses.1);

        let t = Instant::now();
        let adapted = adapt(&installed, &base_classes, ex, &probe, &cfg.adapt);
        let t_adapt = t.elapsed().as_secs_f64();
        let adapted = match adapted {
            Ok(a) => a,
            Err(AdaptError::Guard { before, after, .. }) => {
                tracing::warn!(user = %u.subject, before, after, "The probe guard refused the adaptation.");
                results.push(refused(
                    u,
                    s0_user,
                    s0_presumed,
                    mia_auc_control,
                    before,
                    after,
                ));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let local_user = score(&adapted.net, &adapted.classes, &u.test, &split.classes)?;
        let local_presumed = score(
            &adapted.net,
            &adapted.classes,
            &split.presumed_test,
            &split.classes,
        )?;

        let t = Instant::now();
        let kn = extract(
            &installed,
            &adapted.net,
            KnowledgeMeta {
                model_id: pkg.manifest.model_id.clone(),
                base_version: pkg.manifest.version,
                base_sha256: pkg.manifest.sha256.clone(),
                classes: adapted.classes.clone(),
                base_classes: k0,
                histogram: adapted.histogram.clone(),
                quant: cfg.quant.clone(),
            },
        )?;
        let bytes = kn.to_bytes()?;
        let t_extract = t.elapsed().as_secs_f64();
        // The cloud's side starts from the bytes alone.
        let received = Knowledge::from_bytes(&bytes)?;
        let rebuilt = received.apply(&installed)?;
        let mia = mia_auc(
            &losses(&rebuilt, &received.classes, &u.exclusive, &split.classes)?,
            &losses(&rebuilt, &received.classes, &u.test, &split.classes)?,
        );

        if args.device_only {
            let nan = Score {
                acc: f64::NAN,
                f1: f64::NAN,
            };
            let r = UserResult {
                local_user_acc: local_user.acc,
                local_presumed_acc: local_presumed.acc,
                local_user_f1: local_user.f1,
                knowledge_bytes: bytes.len() as f64,
                mia_auc: mia,
                dp_epsilon: dp_epsilon(adapted.dp_rho),
                new_classes: adapted.classes[k0..].to_vec(),
                probe_acc_after: adapted.probe_accuracy_after,
                guard_refused: false,
                package_id: received.package_id.clone(),
                seconds: json!({ "adapt": t_adapt, "extract_and_encode": t_extract }),
                ..refused(
                    u,
                    nan,
                    nan,
                    mia_auc_control,
                    adapted.probe_accuracy_before,
                    adapted.probe_accuracy_after,
                )
            };
            let r = UserResult {
                s0_user_acc: s0_user.acc,
                s0_presumed_acc: s0_presumed.acc,
                s0_user_f1: s0_user.f1,
                ..r
            };
            tracing::info!(
                user = %r.user,
                s0 = format!("{:.3}/{:.3}", r.s0_user_acc, r.s0_presumed_acc),
                local = format!("{:.3}/{:.3}", r.local_user_acc, r.local_presumed_acc),
                mia = format!("{:.3} (control {:.3})", r.mia_auc, r.mia_auc_control),
                epsilon = ?r.dp_epsilon,
                adapt_s = format!("{t_adapt:.2}"),
                "User done, device side only (user-test/presumed-test accuracy)."
            );
            results.push(r);
            continue;
        }
        let out = update(
            &teacher,
            &installed,
            &received,
            split,
            &baseline,
            &cfg.update,
        )?;
        let diredi_user = score(&out.student, &out.classes, &u.test, &split.classes)?;
        let diredi_presumed = score(
            &out.student,
            &out.classes,
            &split.presumed_test,
            &split.classes,
        )?;

        let t = Instant::now();
        let up = update_with_raw(
            &teacher,
            &installed,
            &u.exclusive,
            &split.classes,
            split,
            &baseline,
            &cfg.update,
        )?;
        let t_upload = t.elapsed().as_secs_f64();
        let upload_user = score(&up.student, &up.classes, &u.test, &split.classes)?;
        let upload_presumed = score(
            &up.student,
            &up.classes,
            &split.presumed_test,
            &split.classes,
        )?;

        let r = UserResult {
            user: u.subject.clone(),
            s0_user_acc: s0_user.acc,
            local_user_acc: local_user.acc,
            diredi_user_acc: diredi_user.acc,
            upload_user_acc: upload_user.acc,
            s0_presumed_acc: s0_presumed.acc,
            local_presumed_acc: local_presumed.acc,
            diredi_presumed_acc: diredi_presumed.acc,
            upload_presumed_acc: upload_presumed.acc,
            knowledge_bytes: bytes.len() as f64,
            exclusive_raw_bytes: (u.exclusive.x.len() * 4) as f64,
            mia_auc: mia,
            mia_auc_control,
            dp_epsilon: dp_epsilon(adapted.dp_rho),
            s0_user_f1: s0_user.f1,
            local_user_f1: local_user.f1,
            diredi_user_f1: diredi_user.f1,
            upload_user_f1: upload_user.f1,
            exclusive_windows: u.exclusive.n(),
            test_windows: u.test.n(),
            new_classes: adapted.classes[k0..].to_vec(),
            probe_acc_before: adapted.probe_accuracy_before,
            probe_acc_after: adapted.probe_accuracy_after,
            guard_refused: false,
            package_id: received.package_id.clone(),
            gate: serde_json::to_value(&out.gate)?,
            upload_gate: serde_json::to_value(&up.gate)?,
            teachers: json!({
                "diredi_user_acc": score(&out.teacher, &out.classes, &u.test, &split.classes)?.acc,
                "diredi_presumed_acc": score(&out.teacher, &out.classes, &split.presumed_test, &split.classes)?.acc,
                "upload_user_acc": score(&up.teacher, &up.classes, &u.test, &split.classes)?.acc,
                "upload_presumed_acc": score(&up.teacher, &up.classes, &split.presumed_test, &split.classes)?.acc,
                "old_user_acc": score(&teacher, &base_classes, &u.test, &split.classes)?.acc,
                "rebuilt_student_user_acc": score(&rebuilt, &received.classes, &u.test, &split.classes)?.acc,
            }),
            seconds: json!({
                "adapt": t_adapt,
                "extract_and_encode": t_extract,
                "cloud_apply": out.times.apply,
                "cloud_teacher": out.times.teacher,
                "cloud_student": out.times.student,
                "cloud_gate": out.times.gate,
                "cloud_total": out.times.apply + out.times.teacher + out.times.student + out.times.gate,
                "upload_total": t_upload,
            }),
        };
        tracing::info!(
            user = %r.user,
            s0 = format!("{:.3}/{:.3}", r.s0_user_acc, r.s0_presumed_acc),
            local = format!("{:.3}/{:.3}", r.local_user_acc, r.local_presumed_acc),
            diredi = format!("{:.3}/{:.3}", r.diredi_user_acc, r.diredi_presumed_acc),
            upload = format!("{:.3}/{:.3}", r.upload_user_acc, r.upload_presumed_acc),
            knowledge_bytes = bytes.len(),
            mia = format!("{:.3} (control {:.3})", r.mia_auc, r.mia_auc_control),
            adapt_s = format!("{t_adapt:.2}"),
            cloud_s = format!("{:.1}", out.times.apply + out.times.teacher + out.times.student + out.times.gate),
            gate = out.gate.passed,
            "User done (user-test/presumed-test accuracy)."
        );
        results.push(r);
    }

    let table: Vec<serde_json::Value> = results
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<_, _>>()?;
    let mut mean = serde_json::Map::new();
    let mut std = serde_json::Map::new();
    for key in KEYS {
        let v: Vec<f64> = table.iter().filter_map(|r| r[key].as_f64()).collect();
        if v.is_empty() {
            // A method this run skipped (`--device-only`).
            mean.insert(key.to_owned(), serde_json::Value::Null);
            std.insert(key.to_owned(), serde_json::Value::Null);
            continue;
        }
        let (m, s) = mean_std(&v);
        mean.insert(key.to_owned(), json!(m));
        std.insert(key.to_owned(), json!(s));
    }
    mean.insert("user".to_owned(), json!("mean"));
    let secs = |k: &str| -> f64 {
        mean_std(
            &table
                .iter()
                .filter_map(|r| r["seconds"][k].as_f64())
                .collect::<Vec<_>>(),
        )
        .0
    };
    let doc = json!({
        "benchmark": "diredi_cycle",
        "dataset": args.dataset,
        "split": split.name,
        "student": args.student,
        "teacher": args.teacher,
        "machine": machine,
        "config": cfg,
        "full_model_bytes": model_bytes,
        "model_params": installed.param_count(),
        "probe_windows": probe.n(),
        "baseline_seconds": baseline.seconds,
        "mean_seconds": {
            "adapt": secs("adapt"), "extract_and_encode": secs("extract_and_encode"),
            "cloud_total": secs("cloud_total"), "cloud_teacher": secs("cloud_teacher"),
            "cloud_student": secs("cloud_student"), "upload_total": secs("upload_total"),
        },
        "total_seconds": started.elapsed().as_secs_f64(),
        "users": table,
        "mean": mean,
        "std": std,
    });
    if let Some(dir) = args.json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.json, serde_json::to_vec_pretty(&doc)?)
        .with_context(|| format!("writing {}", args.json.display()))?;
    if let Some(report) = &args.report {
        write_report(report, &doc)?;
    }
    println!(
        "mean user-test accuracy: S0 {:.3}, LOCAL {:.3}, DIREDI {:.3}, UPLOAD {:.3}; presumed-test: S0 {:.3}, LOCAL {:.3}, DIREDI {:.3}, UPLOAD {:.3}; knowledge {:.0} B; MIA AUC {:.3} (control {:.3})",
        doc["mean"]["s0_user_acc"].as_f64().unwrap_or(f64::NAN),
        doc["mean"]["local_user_acc"].as_f64().unwrap_or(f64::NAN),
        doc["mean"]["diredi_user_acc"].as_f64().unwrap_or(f64::NAN),
        doc["mean"]["upload_user_acc"].as_f64().unwrap_or(f64::NAN),
        doc["mean"]["s0_presumed_acc"].as_f64().unwrap_or(f64::NAN),
        doc["mean"]["local_presumed_acc"].as_f64().unwrap_or(f64::NAN),
        doc["mean"]["diredi_presumed_acc"].as_f64().unwrap_or(f64::NAN),
        doc["mean"]["upload_presumed_acc"].as_f64().unwrap_or(f64::NAN),
        doc["mean"]["knowledge_bytes"].as_f64().unwrap_or(f64::NAN),
        doc["mean"]["mia_auc"].as_f64().unwrap_or(f64::NAN),
        doc["mean"]["mia_auc_control"].as_f64().unwrap_or(f64::NAN),
    );
    Ok(())
}

fn refused(
    u: &diredi_learn::split::UserSplit,
    s0_user: Score,
    s0_presumed: Score,
    control: f64,
    before: f64,
    after: f64,
) -> UserResult {
    // Nothing leaves the gateway: LOCAL, DIREDI and UPLOAD fall back to S0 for this user.
    UserResult {
        user: u.subject.clone(),
        s0_user_acc: s0_user.acc,
        local_user_acc: s0_user.acc,
        diredi_user_acc: s0_user.acc,
        upload_user_acc: s0_user.acc,
        s0_presumed_acc: s0_presumed.acc,
        local_presumed_acc: s0_presumed.acc,
        diredi_presumed_acc: s0_presumed.acc,
        upload_presumed_acc: s0_presumed.acc,
        knowledge_bytes: 0.0,
        exclusive_raw_bytes: (u.exclusive.x.len() * 4) as f64,
        mia_auc: control,
        mia_auc_control: control,
        dp_epsilon: None,
        s0_user_f1: s0_user.f1,
        local_user_f1: s0_user.f1,
        diredi_user_f1: s0_user.f1,
        upload_user_f1: s0_user.f1,
        exclusive_windows: u.exclusive.n(),
        test_windows: u.test.n(),
        new_classes: Vec::new(),
        probe_acc_before: before,
        probe_acc_after: after,
        guard_refused: true,
        package_id: String::new(),
        gate: serde_json::Value::Null,
        upload_gate: serde_json::Value::Null,
        teachers: serde_json::Value::Null,
        seconds: json!({}),
    }
}

fn f(doc: &serde_json::Value, a: &str, key: &str) -> f64 {
    doc[a][key].as_f64().unwrap_or(f64::NAN)
}

/// The Markdown report and its SVG plot (beside it, same stem).
fn write_report(path: &Path, doc: &serde_json::Value) -> Result<()> {
    let svg = path.with_extension("svg");
    plot(&svg, doc)?;
    let pct = |v: f64| format!("{:.1}", 100.0 * v);
    let ms = |key: &str| format!("{} ± {}", pct(f(doc, "mean", key)), pct(f(doc, "std", key)));
    let mut md = String::new();
    md.push_str("# DiReDi cycle benchmark\n\n");
    md.push_str(&format!(
        "Split `{}`, installed student `{}` ({} parameters, {} bytes of ONNX), teacher `{}`, \
         probe set of {} windows. Machine: {}.\n\n",
        doc["split"].as_str().unwrap_or("?"),
        doc["student"].as_str().unwrap_or("?"),
        doc["model_params"],
        doc["full_model_bytes"],
        doc["teacher"].as_str().unwrap_or("?"),
        doc["probe_windows"],
        doc["machine"],
    ));
    md.push_str(&format!(
        "![user-test and presumed-test accuracy per user]({})\n\n",
        svg.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("bench.svg")
    ));
    md.push_str("## Means over users (± standard deviation), accuracy in %\n\n");
    md.push_str("| method | user-test accuracy | user-test macro-F1 | presumed-test accuracy |\n|---|---|---|---|\n");
    for (name, p) in [
        ("S0", "s0"),
        ("LOCAL", "local"),
        ("DIREDI", "diredi"),
        ("UPLOAD", "upload"),
    ] {
        md.push_str(&format!(
            "| {name} | {} | {} | {} |\n",
            ms(&format!("{p}_user_acc")),
            ms(&format!("{p}_user_f1")),
            ms(&format!("{p}_presumed_acc")),
        ));
    }
    let kb = f(doc, "mean", "knowledge_bytes");
    let raw = f(doc, "mean", "exclusive_raw_bytes");
    md.push_str(&format!(
        "\nKnowledge package: {:.0} bytes on average ({:.1} KiB), {:.2}× the raw exclusive \
         windows ({:.0} bytes as f32) and {:.2}× the full model ({} bytes).\n\n",
        kb,
        kb / 1024.0,
        kb / raw,
        raw,
        kb / doc["full_model_bytes"].as_f64().unwrap_or(f64::NAN),
        doc["full_model_bytes"],
    ));
    md.push_str(&format!(
        "Membership inference (loss threshold, ROC AUC; members = exclusive windows, \
         non-members = user-test windows): {:.3} on the model rebuilt from the knowledge, \
         {:.3} on S0 (control, never saw the data); leakage {:+.3}. No differential privacy.\n\n",
        f(doc, "mean", "mia_auc"),
        f(doc, "mean", "mia_auc_control"),
        f(doc, "mean", "mia_auc") - f(doc, "mean", "mia_auc_control"),
    ));
    let s = &doc["mean_seconds"];
    md.push_str(&format!(
        "Mean time per user: device adaptation {:.2} s, knowledge extraction and encoding \
         {:.3} s; cloud update {:.1} s (teacher {:.1} s, re-distillation {:.1} s); UPLOAD \
         {:.1} s. Baseline of the installed models (once): {:.1} s. Whole run: {:.0} s.\n\n",
        s["adapt"].as_f64().unwrap_or(f64::NAN),
        s["extract_and_encode"].as_f64().unwrap_or(f64::NAN),
        s["cloud_total"].as_f64().unwrap_or(f64::NAN),
        s["cloud_teacher"].as_f64().unwrap_or(f64::NAN),
        s["cloud_student"].as_f64().unwrap_or(f64::NAN),
        s["upload_total"].as_f64().unwrap_or(f64::NAN),
        doc["baseline_seconds"].as_f64().unwrap_or(f64::NAN),
        doc["total_seconds"].as_f64().unwrap_or(f64::NAN),
    ));
    md.push_str("## Per user (accuracy in %, user-test / presumed-test)\n\n");
    md.push_str("| user | S0 | LOCAL | DIREDI | UPLOAD | knowledge B | MIA AUC (control) | gate |\n|---|---|---|---|---|---|---|---|\n");
    if let Some(users) = doc["users"].as_array() {
        for u in users {
            let pair = |p: &str| {
                format!(
                    "{} / {}",
                    pct(u[format!("{p}_user_acc")].as_f64().unwrap_or(f64::NAN)),
                    pct(u[format!("{p}_presumed_acc")].as_f64().unwrap_or(f64::NAN))
                )
            };
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} | {:.0} | {:.3} ({:.3}) | {} |\n",
                u["user"].as_str().unwrap_or("?"),
                pair("s0"),
                pair("local"),
                pair("diredi"),
                pair("upload"),
                u["knowledge_bytes"].as_f64().unwrap_or(f64::NAN),
                u["mia_auc"].as_f64().unwrap_or(f64::NAN),
                u["mia_auc_control"].as_f64().unwrap_or(f64::NAN),
                if u["guard_refused"].as_bool() == Some(true) {
                    "refused on device".to_owned()
                } else if u["gate"]["passed"].as_bool() == Some(true) {
                    "passed".to_owned()
                } else {
                    format!(
                        "failed (val {:.3}, agreement {:.3})",
                        u["gate"]["new_val_accuracy"].as_f64().unwrap_or(f64::NAN),
                        u["gate"]["agreement"].as_f64().unwrap_or(f64::NAN)
                    )
                }
            ));
        }
    }
    md.push_str(&format!(
        "\nSettings: `{}`\n",
        serde_json::to_string(&doc["config"])?
    ));
    std::fs::write(path, md).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Two grouped bar charts (user-test and presumed-test accuracy per user and method).
fn plot(path: &Path, doc: &serde_json::Value) -> Result<()> {
    use plotters::prelude::*;
    let users: Vec<&serde_json::Value> = doc["users"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let methods = [
        ("S0", "s0", RGBColor(150, 150, 150)),
        ("LOCAL", "local", RGBColor(230, 159, 0)),
        ("DIREDI", "diredi", RGBColor(0, 114, 178)),
        ("UPLOAD", "upload", RGBColor(0, 158, 115)),
    ];
    let root = SVGBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let halves = root.split_evenly((2, 1));
    for (area, (title, suffix)) in halves.iter().zip([
        ("user-test accuracy", "user_acc"),
        ("presumed-test accuracy", "presumed_acc"),
    ]) {
        let n = users.len() + 1; // + the mean
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(40)
            .build_cartesian_2d(0f64..n as f64, 0f64..1.35f64)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let labels: Vec<String> = users
            .iter()
            .map(|u| u["user"].as_str().unwrap_or("?").to_owned())
            .chain(std::iter::once("mean".to_owned()))
            .collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .light_line_style(WHITE)
            .x_labels(n * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - x.floor() - 0.5).abs() < 1e-6 {
                    labels.get(i).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_desc("accuracy")
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let w = 0.8 / methods.len() as f64;
        for (m, (name, p, color)) in methods.iter().enumerate() {
            let key = format!("{p}_{suffix}");
            let values: Vec<f64> = users
                .iter()
                .map(|u| u[&key].as_f64().unwrap_or(0.0))
                .chain(std::iter::once(f(doc, "mean", &key)))
                .collect();
            chart
                .draw_series(values.iter().enumerate().map(|(i, v)| {
                    let x0 = i as f64 + 0.1 + m as f64 * w;
                    Rectangle::new([(x0, 0.0), (x0 + w * 0.9, *v)], color.filled())
                }))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label(*name)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled())
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mia_auc_counts_ties_as_half() {
        assert_eq!(mia_auc(&[0.1, 0.2], &[0.3, 0.4]), 1.0);
        assert_eq!(mia_auc(&[0.3, 0.4], &[0.1, 0.2]), 0.0);
        assert_eq!(mia_auc(&[f64::INFINITY], &[f64::INFINITY]), 0.5);
        assert_eq!(mia_auc(&[], &[1.0]), 0.5);
    }
}
