//! The processes a perf run starts: Mosquitto on a free port with a temporary configuration,
//! the Rust gateway (embedded rumqttd or an external broker), the Python gateway, and the load
//! generator. Each is stopped when its guard is dropped (SIGTERM, then SIGKILL after 5 s).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A child process that is terminated when dropped.
pub struct Guard {
    child: Option<Child>,
    pid: u32,
    what: String,
    /// Where its stderr goes, quoted when it dies early.
    log: Option<PathBuf>,
}

impl Guard {
    pub fn spawn(mut cmd: Command, what: &str) -> Result<Guard> {
        let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        Ok(Guard {
            pid: child.id(),
            child: Some(child),
            what: what.to_owned(),
            log: None,
        })
    }

    /// Like [`Guard::spawn`], with stderr appended to `log`.
    pub fn spawn_logged(mut cmd: Command, what: &str, log: &Path) -> Result<Guard> {
        let file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stderr(file);
        let mut g = Guard::spawn(cmd, what)?;
        g.log = Some(log.to_path_buf());
        Ok(g)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Fails if the process has already exited.
    pub fn check_alive(&mut self) -> Result<()> {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(status))) => {
                let tail = self
                    .log
                    .as_ref()
                    .and_then(|l| std::fs::read_to_string(l).ok())
                    .map(|t| {
                        let lines: Vec<&str> = t.lines().collect();
                        lines[lines.len().saturating_sub(20)..].join("\n")
                    })
                    .unwrap_or_default();
                bail!(
                    "{} exited early ({status}); its last log lines:\n{tail}",
                    self.what
                )
            }
            _ => Ok(()),
        }
    }

    /// Waits for the process to end by itself and returns its stdout (the caller must have
    /// piped it).
    pub fn wait_output(mut self) -> Result<Vec<u8>> {
        let child = self
            .child
            .take()
            .with_context(|| format!("{} was already waited for", self.what))?;
        let out = child
            .wait_with_output()
            .with_context(|| format!("waiting for {}", self.what))?;
        if !out.status.success() {
            bail!("{} failed ({})", self.what, out.status);
        }
        Ok(out.stdout)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        let pid = self.pid.to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        for _ in 0..50 {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A temporary directory removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<TempDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("diredi-{tag}-{}-{nanos:08x}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(TempDir(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// Waits until something accepts TCP connections on `port`.
pub fn wait_port(port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    while Instant::now() < deadline {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nothing listens on port {port} after {timeout:?}")
}

/// The Mosquitto binary: `configured`, else `mosquitto` on PATH, else `/usr/sbin/mosquitto`.
pub fn find_mosquitto(configured: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = configured {
        return Ok(p.to_path_buf());
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("mosquitto"))
        .find(|p| p.is_file());
    on_path
        .context("mosquitto not found: install it (apt-get install mosquitto) or pass --mosquitto")
}

/// Starts Mosquitto on a free port of 127.0.0.1 with a configuration written to `dir`: no
/// persistence, no logging, anonymous access, no Nagle delay on its sockets (like the
/// harness's own clients), Mosquitto's default queue limits.
pub fn start_mosquitto(bin: &Path, dir: &Path) -> Result<(Guard, u16)> {
    let port = free_port()?;
    let conf = dir.join(format!("mosquitto-{port}.conf"));
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest none\n\
             set_tcp_nodelay true\n"
        ),
    )
    .with_context(|| format!("writing {}", conf.display()))?;
    let mut cmd = Command::new(bin);
    cmd.arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let mut guard = Guard::spawn(cmd, &format!("mosquitto ({})", bin.display()))?;
    if let Err(e) = wait_port(port, Duration::from_secs(10)) {
        guard.check_alive()?;
        return Err(e);
    }
    Ok((guard, port))
}
