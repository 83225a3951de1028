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
    Validate,
    /// Print the compiled-in default configuration.
    PrintDefaultConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::PrintDefaultConfig => {
            print!("{}", config::default_toml());
            ExitCode::SUCCESS
        }
        Command::Validate => validate(cli.config),
        Command::Run => run(cli.config),
    }
}

fn validate(file: Option<PathBuf>) -> ExitCode {
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
        ExitCode::SUCCESS
    } else {
        eprintln!("{}", config::ConfigError::Invalid(problems));
        ExitCode::FAILURE
    }
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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("diredi-async")
        .build()
    {
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
