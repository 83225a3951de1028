//! `diredi-gateway`: arguments → configuration → logging → [`diredi_gateway::run`] → exit code.
//!
//! `diredi-gateway [run] [--config FILE]` serves until SIGTERM or SIGINT (exit 0 after a clean
//! drain, 1 on a startup or pipeline failure); `validate --config FILE` prints every problem
//! of the configuration and the model it points to (exit 1 if any), for `ExecStartPre`;
//! `print-default-config` prints the compiled-in defaults.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use diredi_gateway::config;
use diredi_protocol::messages::{CommandMsg, LabelMsg};
use tokio_util::sync::CancellationToken;

/// Hard limit after a stop signal; systemd expects the process gone within 5 s.
const STOP_DEADLINE: Duration = Duration::from_millis(4800);

#[derive(Debug, Parser)]
#[command(
    name = "diredi-gateway",
    version,
    about = "DiReDi edge gateway: MQTT sensor data in, ONNX Runtime inference, results out"
)]
struct Cli {
    /// Configuration file (TOML). Environment variables DIREDI_<SECTION>__<KEY> override it.
    #[arg(long, short, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Check the configuration and the model it names; print every problem.
    Validate {
        /// Also load the model into ONNX Runtime on this machine and run it on its probe
        /// windows (the install smoke run): checks the library, the CPU and the model
        /// together, for example on a new board or under an emulator.
        #[arg(long)]
        smoke: bool,
    },
    /// Print the compiled-in default configuration.
    PrintDefaultConfig,
    /// Label a sensor's samples (a time range) or one window (an id from an inference
    /// message); the labelled windows stay in the gateway's exclusive store.
    Label {
        /// The sensor id.
        #[arg(long)]
        sensor: String,
        /// The class (a name the model lacks is a new class).
        #[arg(long)]
        class: String,
        /// First labelled sample, unix ms.
        #[arg(long, requires = "to_ts", conflicts_with = "window_id")]
        from_ts: Option<i64>,
        /// Last labelled sample, unix ms.
        #[arg(long, requires = "from_ts")]
        to_ts: Option<i64>,
        /// A window id from an inference message.
        #[arg(long)]
        window_id: Option<String>,
    },
    /// Ask the gateway to adapt on the labels collected so far and send the knowledge.
    Adapt,
    /// Ask the gateway to stop its running adaptation (no knowledge is sent).
    CancelAdapt,
    /// Ask the gateway to return to its previous model.
    Rollback,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::PrintDefaultConfig => {
            print!("{}", config::default_toml());
            ExitCode::SUCCESS
        }
        Command::Validate { smoke } => validate(cli.config, smoke),
        Command::Run => run(cli.config),
        Command::Label {
            sensor,
            class,
            from_ts,
            to_ts,
            window_id,
        } => {
            let label = match (from_ts, to_ts, window_id) {
                (Some(from_ts), Some(to_ts), None) => LabelMsg::Range {
                    from_ts,
                    to_ts,
                    class,
                },
                (None, None, Some(window_id)) => LabelMsg::Window { window_id, class },
                _ => {
                    eprintln!("diredi-gateway label: give --from-ts and --to-ts, or --window-id");
                    return ExitCode::from(2);
                }
            };
            send(cli.config, |cfg| async move {
                diredi_gateway::remote::label(&cfg, &sensor, &label).await
            })
        }
        Command::Adapt => send(cli.config, |cfg| async move {
            diredi_gateway::remote::command(&cfg, &CommandMsg::Adapt).await
        }),
        Command::CancelAdapt => send(cli.config, |cfg| async move {
            diredi_gateway::remote::command(&cfg, &CommandMsg::CancelAdapt).await
        }),
        Command::Rollback => send(cli.config, |cfg| async move {
            diredi_gateway::remote::command(&cfg, &CommandMsg::Rollback { to_version: None }).await
        }),
    }
}

/// Loads the configuration and runs one client request against the gateway it describes.
fn send<F, Fut>(file: Option<PathBuf>, request: F) -> ExitCode
where
    F: FnOnce(config::Config) -> Fut,
    Fut: std::future::Future<Output = Result<(), diredi_gateway::remote::RemoteError>>,
{
    let cfg = match config::load(file.as_deref()) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("diredi-gateway: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("diredi-gateway: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(request(cfg)) {
        Ok(()) => {
            println!("sent");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("diredi-gateway: {e}");
            ExitCode::FAILURE
        }
    }
}

fn validate(file: Option<PathBuf>, smoke: bool) -> ExitCode {
    let cfg = match config::load(file.as_deref()) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let problems = config::preflight(&cfg);
    if problems.is_empty() {
        println!(
            "Configuration is valid (gateway id {:?}, broker {}).",
            cfg.gateway_id,
            match &cfg.broker {
                Some(b) => format!("embedded on {}", b.listen),
                None => format!("external at {}:{}", cfg.mqtt.host, cfg.mqtt.port),
            }
        );
        if !smoke {
            return ExitCode::SUCCESS;
        }
        match smoke_run(&cfg) {
            Ok(report) => {
                println!("{report}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("diredi-gateway validate --smoke: {e}");
                ExitCode::FAILURE
            }
        }
    } else {
        eprintln!("{}", config::ConfigError::Invalid(problems));
        ExitCode::FAILURE
    }
}

/// Loads the configured model into ONNX Runtime, runs the install smoke run on its probe
/// windows and classifies every probe window; returns a one-paragraph report.
fn smoke_run(cfg: &config::Config) -> Result<String, String> {
    use diredi_gateway::{install, model};
    let loaded = model::load(&cfg.model, &cfg.runtime).map_err(|e| e.to_string())?;
    let library =
        diredi_infer::init_runtime(cfg.runtime.library.as_deref()).map_err(|e| e.to_string())?;
    let spec = loaded.spec();
    let probe = loaded.source().and_then(|s| s.probe.clone());
    let started = std::time::Instant::now();
    install::smoke(
        loaded.classifier(),
        probe.as_deref(),
        spec.output == diredi_protocol::manifest::OutputKind::Probabilities,
    )
    .map_err(|e| e.to_string())?;
    let smoke_ms = started.elapsed().as_secs_f64() * 1e3;
    let mut report = format!(
        "Model {} v{} runs in ONNX Runtime ({}, {} on {}): smoke run passed in {smoke_ms:.1} ms",
        spec.model_id,
        spec.version,
        library.display(),
        loaded.execution_provider(),
        std::env::consts::ARCH,
    );
    if let Some(bytes) = probe.as_deref() {
        let p = diredi_learn::probe::ProbeSet::from_bytes(bytes).map_err(|e| e.to_string())?;
        let n = p.y.len();
        let x = ndarray::Array3::from_shape_vec((n, p.channels, p.window), p.x)
            .map_err(|e| e.to_string())?;
        let out = loaded
            .classifier()
            .classify(x.view())
            .map_err(|e| e.to_string())?;
        let out = out.as_standard_layout();
        let predicted =
            diredi_learn::metrics::argmax_rows(out.as_slice().unwrap_or_default(), out.ncols());
        let right = predicted.iter().zip(&p.y).filter(|(a, b)| a == b).count();
        report.push_str(&format!(
            "; {right} of {n} probe windows classified as labelled ({:.1}%)",
            100.0 * right as f64 / n.max(1) as f64
        ));
    }
    Ok(report)
}

fn run(file: Option<PathBuf>) -> ExitCode {
    let cfg = match config::load(file.as_deref()) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("diredi-gateway: {e}");
            return ExitCode::FAILURE;
        }
    };
    diredi_gateway::logging::init(&cfg.log_level, cfg.log_format);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if cfg.runtime.async_threads > 0 {
        builder.worker_threads(cfg.runtime.async_threads);
    }
    let runtime = match builder.enable_all().thread_name("diredi-async").build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "Cannot start the async runtime.");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        diredi_gateway::run(cfg, shutdown).await
    });
    runtime.shutdown_timeout(Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "Gateway stopped with an error.");
            ExitCode::FAILURE
        }
    }
}

/// Cancels `shutdown` on SIGTERM or SIGINT; exits at once on a second signal or when the
/// graceful stop overruns [`STOP_DEADLINE`].
async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "Cannot install signal handlers; stop with SIGKILL only.");
            return;
        }
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "Stop requested.");
    shutdown.cancel();
    std::thread::spawn(|| {
        std::thread::sleep(STOP_DEADLINE);
        tracing::error!("Graceful stop took too long; exiting.");
        std::process::exit(1);
    });
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::warn!("Second stop signal; exiting at once.");
    std::process::exit(1);
}
