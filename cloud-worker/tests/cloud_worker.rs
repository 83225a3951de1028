//! Integration tests of the cloud worker: the whole DiReDi cycle over a real broker, with the
//! gateway, the cloud worker service and the user's side in one process.
//!
//! They need ONNX Runtime (`scripts/fetch-onnxruntime.sh`), the HAPT data
//! (`scripts/fetch-hapt.sh`) and the shipped model; without them they skip with a message,
//! unless `DIREDI_REQUIRE_DATA` is set, in which case they fail.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "cloud_worker/e2e.rs"]
mod e2e;
#[path = "cloud_worker/perf.rs"]
mod perf;

use std::path::{Path, PathBuf};

/// The workspace root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// Skips (returns false) or, with `DIREDI_REQUIRE_DATA`, fails when `what` is missing.
pub fn available(what: &str, found: bool) -> bool {
    if found {
        return true;
    }
    assert!(
        std::env::var_os("DIREDI_REQUIRE_DATA").is_none(),
        "DIREDI_REQUIRE_DATA is set but {what} is missing"
    );
    eprintln!("skipping: {what} is missing");
    false
}

/// The heavy tests of this binary (the two full cycles and the performance harness) take
/// turns: run side by side on a 2-core machine they starve the gateways they test, whose
/// bounded queues then drop windows by design.
pub fn heavy_turn() -> std::sync::MutexGuard<'static, ()> {
    static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());
    HEAVY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Mosquitto broker on a free port that logs every PUBLISH it receives with the client id
/// that sent it (`log_type debug`), so a test can tell who published what. Killed on drop.
pub struct Mosquitto {
    child: std::process::Child,
    /// Its port.
    pub port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts one and waits until it accepts connections.
    pub fn start() -> Self {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("mosquitto.log");
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 log_type debug\nlog_dest file {}\nuser root\n",
                log.display()
            ),
        )
        .unwrap();
        let child = std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mosquitto must be installed (apt-get install -y mosquitto)");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "mosquitto did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Mosquitto {
            child,
            port,
            log,
            _dir: dir,
        }
    }

    /// `(client id, topic)` of every PUBLISH received so far, from the log.
    pub fn publishes(&self) -> Vec<(String, String)> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let rest = l.split_once("Received PUBLISH from ")?.1;
                let (client, rest) = rest.split_once(" (")?;
                let topic = rest.split_once(", '")?.1.rsplit_once("', ...")?.0;
                Some((client.to_owned(), topic.to_owned()))
            })
            .collect()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
