//! The embedded MQTT broker (rumqttd).
//!
//! Where it stands: before the data flow. With `[broker] enabled = true` (the default) the
//! gateway starts rumqttd in its own threads and then connects to it over TCP with the same
//! client code it uses for an external broker, so behaviour is the same either way.
//!
//! The rumqttd configuration comes from `[broker] config` or the built-in copy of
//! `broker-config/rumqttd.toml`; it must define exactly one MQTT 3.1.1 (`[v4.*]`) listener,
//! whose address is replaced by `[broker] listen`. rumqttd cannot be stopped: the broker lives
//! as long as the process.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::config::BrokerConfig;

/// The built-in broker configuration.
pub const BUILTIN_CONFIG: &str = include_str!("../../broker-config/rumqttd.toml");

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The configuration file could not be read.
    #[error("cannot read broker configuration {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The configuration is not a valid rumqttd configuration.
    #[error("broker configuration {origin} is invalid: {reason}")]
    Parse {
        /// File or `built-in`.
        origin: String,
        /// Parser message.
        reason: String,
    },
    /// The listener address is taken or not available.
    #[error("embedded broker cannot listen on {addr}: {source}; stop the other broker or set [broker] enabled = false to use it")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The bind error.
        source: std::io::Error,
    },
    /// The broker thread could not be started or stopped right away.
    #[error("embedded broker failed to start: {0}")]
    Start(String),
}

/// Reads the rumqttd configuration and sets the listener address.
pub fn load_config(cfg: &BrokerConfig) -> Result<rumqttd::Config, BrokerError> {
    let (text, origin) = match &cfg.config_file {
        Some(path) => (
            std::fs::read_to_string(path).map_err(|source| BrokerError::Read {
                path: path.clone(),
                source,
            })?,
            path.display().to_string(),
        ),
        None => (BUILTIN_CONFIG.to_owned(), "built-in".to_owned()),
    };
    let parse_err = |reason: String| BrokerError::Parse {
        origin: origin.clone(),
        reason,
    };
    let mut config: rumqttd::Config =
        toml::from_str(&text).map_err(|e| parse_err(e.to_string()))?;
    let v4 = config.v4.as_mut().filter(|s| s.len() == 1).ok_or_else(|| {
        parse_err(
            "expected exactly one [v4.*] (MQTT 3.1.1) listener, whose address the gateway sets"
                .into(),
        )
    })?;
    for server in v4.values_mut() {
        server.listen = cfg.listen;
        // rumqttd would only log a TLS listener whose files are missing; refuse it here.
        if let Some(tls) = &server.tls {
            let ok = matches!(
                tls,
                rumqttd::TlsConfig::Rustls {
                    capath: Some(_),
                    ..
                }
            ) && tls.validate_paths();
            if !ok {
                return Err(parse_err(
                    "the listener's tls needs capath, certpath and keypath of existing PEM files \
                     (mutual TLS: clients must present a certificate signed by capath)"
                        .into(),
                ));
            }
        }
    }
    if config.console.is_some() || config.prometheus.is_some() {
        tracing::warn!(
            origin,
            "Broker configuration enables console or prometheus endpoints."
        );
    }
    Ok(config)
}

/// A running embedded broker.
#[derive(Debug)]
pub struct EmbeddedBroker {
    /// Address of the MQTT 3.1.1 listener.
    pub listen: SocketAddr,
    _thread: JoinHandle<()>,
}

/// Starts the embedded broker. Fails if the configuration is invalid or the listen address is
/// already taken. Clients may need a moment before the listener accepts connections; the
/// gateway's client retries.
pub fn start(cfg: &BrokerConfig) -> Result<EmbeddedBroker, BrokerError> {
    let config = load_config(cfg)?;
    // rumqttd only logs a bind failure from its own thread; check first for a clear error.
    drop(
        TcpListener::bind(cfg.listen).map_err(|source| BrokerError::Listen {
            addr: cfg.listen,
            source,
        })?,
    );
    let thread = std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "Embedded broker stopped.");
            }
        })
        .map_err(|e| BrokerError::Start(e.to_string()))?;
    // A broker that cannot serve exits at once; one that runs never returns.
    std::thread::sleep(Duration::from_millis(20));
    if thread.is_finished() {
        return Err(BrokerError::Start(
            "rumqttd exited right away; see the log above".into(),
        ));
    }
    tracing::info!(listen = %cfg.listen, "Embedded broker started.");
    Ok(EmbeddedBroker {
        listen: cfg.listen,
        _thread: thread,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cfg(file: Option<PathBuf>, listen: &str) -> BrokerConfig {
        BrokerConfig {
            config_file: file,
            listen: listen.parse().unwrap(),
        }
    }

    #[test]
    fn built_in_config_loads_with_the_configured_listen_address() {
        let c = load_config(&cfg(None, "0.0.0.0:1999")).unwrap();
        let v4 = c.v4.unwrap();
        assert_eq!(v4.len(), 1);
        assert_eq!(
            v4.values().next().unwrap().listen,
            "0.0.0.0:1999".parse().unwrap()
        );
        assert!(v4.values().next().unwrap().connections.dynamic_filters);
        assert!(c.console.is_none());
    }

    #[test]
    fn config_without_a_single_v4_listener_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.toml");
        let text = BUILTIN_CONFIG
            .replace("[v4.1]", "[v5.1]")
            .replace("[v4.1.connections]", "[v5.1.connections]");
        std::fs::write(&p, text).unwrap();
        let err = load_config(&cfg(Some(p.clone()), "127.0.0.1:1")).unwrap_err();
        assert!(err.to_string().contains("exactly one [v4.*]"), "{err}");
        std::fs::write(&p, "id = 0\n[router]\n").unwrap();
        assert!(matches!(
            load_config(&cfg(Some(p), "127.0.0.1:1")),
            Err(BrokerError::Parse { .. })
        ));
        let err = load_config(&cfg(Some(dir.path().join("none.toml")), "127.0.0.1:1")).unwrap_err();
        assert!(matches!(err, BrokerError::Read { .. }));
    }

    #[test]
    fn a_taken_port_is_a_clear_error() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = start(&cfg(None, &addr.to_string())).unwrap_err();
        assert!(matches!(err, BrokerError::Listen { .. }), "{err}");
        assert!(err.to_string().contains("enabled = false"), "{err}");
    }
}
