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
//!
//! Once rumqttd listens, the gateway turns off Nagle's algorithm on its listener
//! ([`set_listener_nodelay`]), so every connection it accepts has `TCP_NODELAY`, as the
//! gateway's own client connections do.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{OwnedFd, RawFd};
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::net::sockopt;
use rustix::process::{PidfdFlags, PidfdGetfdFlags};

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

/// How long [`start`] waits for rumqttd's listener.
const LISTEN_WAIT: Duration = Duration::from_secs(2);

/// Turns off Nagle's algorithm on this process's listening TCP socket on `port`, so that every
/// connection it accepts from then on has `TCP_NODELAY` (Linux copies the option from a
/// listening socket to the sockets `accept` returns). Connections it accepted before get the
/// option as well. Returns whether such a listener exists.
///
/// Why: rumqttd 0.20 leaves Nagle's algorithm on for the connections it accepts and has no
/// option for it. A small message it forwards (a result to a subscriber) then waits until its
/// previous segment is acknowledged, and receivers delay their acknowledgements. Measured with
/// the embedded broker at 14,000 windows/s, the median latency from a sensor message to its
/// result at a subscriber was 10.47 ms before this and 2.40 ms after (BENCHMARKS.md).
///
/// How, without unsafe code: rumqttd owns the listener, so it is found among this process's
/// descriptors in `/proc/self/fd` and duplicated with `pidfd_getfd(2)` (Linux 5.6); the option
/// is set on the duplicate, which shares the socket, and the duplicate is closed. Only a
/// TCP socket whose local port is `port` is changed; in the gateway those are the broker's,
/// since [`start`] checked that its address was free and the gateway listens nowhere else.
/// The systemd unit allows `pidfd_getfd`, which its `@system-service` filter leaves out.
pub fn set_listener_nodelay(port: u16) -> std::io::Result<bool> {
    let mut found = false;
    // Connections accepted before the listener had the option get it too.
    for fd in own_tcp_sockets(port)? {
        sockopt::set_tcp_nodelay(&fd, true)?;
        found |= sockopt::socket_acceptconn(&fd)?;
    }
    Ok(found)
}

/// Duplicates of this process's TCP sockets whose local port is `port` (listening or
/// accepted).
fn own_tcp_sockets(port: u16) -> std::io::Result<Vec<OwnedFd>> {
    let me = rustix::process::pidfd_open(rustix::process::getpid(), PidfdFlags::empty())?;
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd")?.flatten() {
        let Some(n) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<RawFd>().ok())
        else {
            continue;
        };
        match std::fs::read_link(entry.path()) {
            Ok(target) if target.as_os_str().as_bytes().starts_with(b"socket:") => {}
            _ => continue,
        }
        // The number may have been closed (EBADF), or closed and reused, since it was listed:
        // what the duplicate is gets checked here, not assumed. Any other error (a seccomp
        // filter's EPERM, ENOSYS before Linux 5.6) would repeat for every descriptor.
        let fd = match rustix::process::pidfd_getfd(&me, n, PidfdGetfdFlags::empty()) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::BADF) => continue,
            Err(e) => return Err(e.into()),
        };
        if sockopt::socket_type(&fd).ok() != Some(rustix::net::SocketType::STREAM) {
            continue;
        }
        let local = rustix::net::getsockname(&fd)
            .ok()
            .and_then(|a| SocketAddr::try_from(a).ok());
        if local.is_some_and(|a| a.port() == port) {
            out.push(fd);
        }
    }
    Ok(out)
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
    // rumqttd binds its listener in its own thread. Wait for it, then turn off Nagle's
    // algorithm on it before any client connects. A broker that cannot serve exits at once.
    let exited = || BrokerError::Start("rumqttd exited right away; see the log above".into());
    let deadline = Instant::now() + LISTEN_WAIT;
    loop {
        if thread.is_finished() {
            return Err(exited());
        }
        match set_listener_nodelay(cfg.listen.port()) {
            Ok(true) => break,
            Ok(false) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Ok(false) => {
                tracing::warn!(listen = %cfg.listen, "The embedded broker is not listening yet after {LISTEN_WAIT:?}; the gateway's client keeps retrying. Its connections may keep Nagle's algorithm.");
                break;
            }
            Err(e) => {
                // The listener cannot be found this way here (no pidfd_getfd, no /proc):
                // give rumqttd the moment it needs to fail, as before.
                tracing::warn!(listen = %cfg.listen, error = %e, "Could not turn off Nagle's algorithm on the embedded broker's connections; messages it forwards may wait for acknowledgements (up to tens of milliseconds).");
                std::thread::sleep(Duration::from_millis(20));
                if thread.is_finished() {
                    return Err(exited());
                }
                break;
            }
        }
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

    /// `TCP_NODELAY` of this process's accepted connections on `port`, once there is one
    /// (waits up to 5 s for it).
    fn accepted_nodelay(port: u16) -> Vec<bool> {
        let t0 = Instant::now();
        loop {
            let accepted: Vec<bool> = own_tcp_sockets(port)
                .unwrap()
                .iter()
                .filter(|fd| !sockopt::socket_acceptconn(fd).unwrap())
                .map(|fd| sockopt::tcp_nodelay(fd).unwrap())
                .collect();
            if !accepted.is_empty() || t0.elapsed() > Duration::from_secs(5) {
                return accepted;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether this environment lets a process duplicate its own descriptors (not under some
    /// container seccomp profiles, nor before Linux 5.6); the production code then only warns.
    fn pidfd_getfd_works() -> bool {
        // One socket at least, so that the probe duplicates something.
        let _probe = TcpListener::bind("127.0.0.1:0").unwrap();
        match own_tcp_sockets(1) {
            Ok(_) => true,
            Err(e) => {
                eprintln!("skipped: pidfd_getfd is not available here ({e})");
                false
            }
        }
    }

    #[test]
    fn a_listener_with_nodelay_passes_it_to_the_connections_it_accepts() {
        if !pidfd_getfd_works() {
            return;
        }
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let _first = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert_eq!(
            accepted_nodelay(port),
            vec![false],
            "Nagle is on by default"
        );
        drop(accepted);
        assert!(
            set_listener_nodelay(port).unwrap(),
            "the listener was found"
        );
        let second = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _accepted = listener.accept().unwrap();
        assert_eq!(accepted_nodelay(port), vec![true]);
        // Nothing listens on a port of a client socket.
        assert!(!set_listener_nodelay(second.local_addr().unwrap().port()).unwrap());
    }

    #[test]
    fn the_embedded_broker_accepts_connections_with_nagle_off() {
        if !pidfd_getfd_works() {
            return;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let broker = start(&cfg(None, &format!("127.0.0.1:{port}"))).unwrap();
        let _client = std::net::TcpStream::connect(broker.listen).unwrap();
        assert_eq!(accepted_nodelay(port), vec![true]);
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
