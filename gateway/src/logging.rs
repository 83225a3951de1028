//! Log output: journald when started by systemd, readable lines on a terminal.
//!
//! Where it stands: set up by `main` right after the configuration is loaded, before `run`.
//! The filter is `RUST_LOG` when set, else `[gateway] log_level`; the embedded broker's own
//! chatter (rumqttd logs every client connection) is capped at WARN unless the filter names
//! `rumqttd` explicitly.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Where the logs went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// journald.
    Journald,
    /// stderr.
    Terminal,
}

/// Whether `format` means journald in this environment (`auto`: `JOURNAL_STREAM` is set, as
/// systemd does for services whose output goes to the journal).
pub fn wants_journald(format: LogFormat, journal_stream: Option<&str>) -> bool {
    match format {
        LogFormat::Journald => true,
        LogFormat::Terminal => false,
        LogFormat::Auto => journal_stream.is_some_and(|s| !s.is_empty()),
    }
}

/// The filter directives for `level`, or `RUST_LOG` when given.
pub fn filter_directives(level: &str, rust_log: Option<&str>) -> String {
    let base = rust_log.filter(|s| !s.trim().is_empty()).unwrap_or(level);
    if base.contains("rumqttd") {
        base.to_owned()
    } else {
        format!("{base},rumqttd=warn")
    }
}

/// Installs the global subscriber. Falls back to the terminal when journald is wanted but its
/// socket is missing. Calling it twice keeps the first subscriber.
pub fn init(level: &str, format: LogFormat) -> Output {
    let rust_log = std::env::var("RUST_LOG").ok();
    let directives = filter_directives(level, rust_log.as_deref());
    let filter = EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info"));
    let journal_stream = std::env::var("JOURNAL_STREAM").ok();
    if wants_journald(format, journal_stream.as_deref()) {
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer.with_syslog_identifier("diredi-gateway".into());
                let ok = tracing_subscriber::registry()
                    .with(filter)
                    .with(layer)
                    .try_init()
                    .is_ok();
                if ok {
                    return Output::Journald;
                }
                return Output::Terminal;
            }
            Err(e) => eprintln!("diredi-gateway: journald unavailable ({e}); logging to stderr"),
        }
    }
    let filter = EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false),
        )
        .try_init();
    Output::Terminal
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn journald_is_used_only_under_systemd_in_auto_mode() {
        assert!(wants_journald(LogFormat::Auto, Some("8:1234")));
        assert!(!wants_journald(LogFormat::Auto, None));
        assert!(!wants_journald(LogFormat::Auto, Some("")));
        assert!(wants_journald(LogFormat::Journald, None));
        assert!(!wants_journald(LogFormat::Terminal, Some("8:1")));
    }

    #[test]
    fn rust_log_wins_and_rumqttd_is_capped_unless_named() {
        assert_eq!(filter_directives("info", None), "info,rumqttd=warn");
        assert_eq!(
            filter_directives("info", Some("debug")),
            "debug,rumqttd=warn"
        );
        assert_eq!(
            filter_directives("info", Some("rumqttd=debug")),
            "rumqttd=debug"
        );
        assert_eq!(filter_directives("warn", Some(" ")), "warn,rumqttd=warn");
    }
}
