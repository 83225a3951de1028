//! The gateway as a process: last will on kill -9, SIGTERM drain, systemd notifications,
//! startup failure on a bad model. These run the real binary with the tiny ONNX model, so they
//! need ONNX Runtime (except the bad-model test, which fails before loading it).

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use diredi_protocol::sensor::encode_json;

use super::support::*;

const T0: i64 = 1_700_000_000_000;

/// A configuration and model on disk for the binary.
struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    port: u16,
}

impl Setup {
    /// Writes the tiny ONNX model and a config; the broker settings (external Mosquitto on
    /// `port`) are passed through the environment, to exercise the overrides.
    fn new(port: u16, table_edit: impl FnOnce(&mut toml::Table)) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let manifest = write_onnx_model(dir.path(), &Spec::small());
        let mut table = config_table(1, true, Some(&manifest));
        set(&mut table, "gateway", "log_level", "info");
        table_edit(&mut table);
        let config = dir.path().join("gateway.toml");
        std::fs::write(&config, toml::to_string(&table).unwrap()).unwrap();
        Setup { dir, config, port }
    }

    /// `program` with a clean environment plus the broker overrides.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("DIREDI_") && k.contains("__"))
        {
            cmd.env_remove(k);
        }
        cmd.env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("JOURNAL_STREAM")
            .env("DIREDI_BROKER__ENABLED", "false")
            .env("DIREDI_MQTT__HOST", "127.0.0.1")
            .env("DIREDI_MQTT__PORT", self.port.to_string())
            .stdout(Stdio::null());
        cmd
    }

    /// The gateway in its bare form: `diredi-gateway --config FILE`.
    fn gateway(&self) -> Command {
        let mut cmd = self.command(env!("CARGO_BIN_EXE_diredi-gateway"));
        cmd.arg("--config").arg(&self.config);
        cmd
    }

    fn start(&self, mut cmd: Command) -> Gateway {
        let log = self.dir.path().join("stderr.log");
        let child = cmd
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Gateway { child, log }
    }
}

struct Gateway {
    child: Child,
    log: PathBuf,
}

impl Gateway {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }

    fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn online(port: u16) -> Observer {
    let mut obs = Observer::connect(port, &format!("diredi/v1/{GW}/#")).await;
    let status = obs
        .next_json("/status", WAIT, |v| v["state"] == "online")
        .await;
    assert!(status.is_some(), "gateway came online");
    obs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_leaves_the_retained_offline_status_through_the_last_will() {
    if !ort_available() && skip("ONNX Runtime") {
        return;
    }
    let mosquitto = Mosquitto::start();
    let setup = Setup::new(mosquitto.port, |_| {});
    let mut gw = setup.start(setup.gateway());
    let obs = online(mosquitto.port).await;
    drop(obs);
    gw.child.kill().unwrap(); // SIGKILL: no chance to say goodbye.
    gw.child.wait().unwrap();
    let mut late = Observer::connect(mosquitto.port, &format!("diredi/v1/{GW}/status")).await;
    let v = late
        .next_json("/status", WAIT, |v| v["state"] == "offline")
        .await
        .expect("last will sets the retained status to offline");
    assert_eq!(v["gateway_id"], GW);
    assert_eq!(v["execution_provider"], "cpu");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_publishes_in_flight_windows_then_offline_and_exits_0_within_5_s() {
    if !ort_available() && skip("ONNX Runtime") {
        return;
    }
    let spec = Spec::small();
    let mosquitto = Mosquitto::start();
    // Batches wait up to 1 s to fill, so the windows are still queued when SIGTERM arrives.
    let setup = Setup::new(mosquitto.port, |t| {
        set(t, "runtime", "max_batch", 1000);
        set(t, "runtime", "max_wait_ms", 1000);
    });
    let mut gw = setup.start(setup.gateway());
    let mut obs = online(mosquitto.port).await;
    // 44 samples: windows end at samples 7, 11, ..., 43 → 10 windows.
    obs.sensor("s1", encode_json(Some(T0), &rows(0, 44, &spec), 3))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        obs.collect("/inference/s1", 1, Duration::from_millis(50))
            .await
            .is_empty(),
        "windows are still in flight"
    );
    let t0 = Instant::now();
    gw.signal("-TERM");
    let status = tokio::task::block_in_place(|| gw.wait(Duration::from_secs(6)));
    let took = t0.elapsed();
    let status = status.unwrap_or_else(|| panic!("did not exit; log:\n{}", gw.log()));
    assert!(status.success(), "exit status {status}; log:\n{}", gw.log());
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let results = obs.collect("/inference/s1", 10, WAIT).await;
    assert_eq!(
        results.len(),
        10,
        "every queued window was published; log:\n{}",
        gw.log()
    );
    let mut late = Observer::connect(mosquitto.port, &format!("diredi/v1/{GW}/status")).await;
    let v = late
        .next_on("/status", WAIT)
        .await
        .expect("retained status");
    assert_eq!(v.json()["state"], "offline");
    let log = gw.log();
    assert!(log.contains("Stop requested"), "{log}");
}

fn notifications(sock: &UnixDatagram, want: &str, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            let done = text.lines().any(|l| l == want);
            got.push(text);
            if done {
                break;
            }
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_watchdog_and_stopping_are_sent_to_systemd() {
    if !ort_available() && skip("ONNX Runtime") {
        return;
    }
    let mosquitto = Mosquitto::start();
    let setup = Setup::new(mosquitto.port, |_| {});
    let path = setup.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    // sd_notify honours WATCHDOG_USEC only when WATCHDOG_PID is the process's own pid, so the
    // gateway is exec'd from a shell that knows it.
    let mut cmd = setup.command("sh");
    cmd.arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" --config \"$1\"")
        .arg(env!("CARGO_BIN_EXE_diredi-gateway"))
        .arg(&setup.config)
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "200000");
    let gw = setup.start(cmd);

    let got = notifications(&sock, "READY=1", WAIT);
    assert!(
        got.iter().any(|m| m.contains("READY=1")),
        "{got:?}\n{}",
        gw.log()
    );
    let connecting_first = got
        .iter()
        .take_while(|m| !m.contains("READY=1"))
        .any(|m| m.contains("STATUS=Connecting"));
    assert!(connecting_first, "READY only after connecting: {got:?}");
    let got = notifications(&sock, "WATCHDOG=1", WAIT);
    assert!(got.iter().any(|m| m.contains("WATCHDOG=1")), "{got:?}");
    gw.signal("-TERM");
    let got = notifications(&sock, "STOPPING=1", WAIT);
    assert!(got.iter().any(|m| m.contains("STOPPING=1")), "{got:?}");
}

#[test]
fn a_tampered_model_stops_startup_with_a_clear_error_and_exit_1() {
    let setup = Setup::new(free_port(), |_| {});
    std::fs::write(setup.dir.path().join("model.onnx"), b"tampered").unwrap();
    let mut cmd = setup.command(env!("CARGO_BIN_EXE_diredi-gateway"));
    cmd.arg("run").arg("--config").arg(&setup.config);
    let mut gw = setup.start(cmd);
    let status = gw.wait(Duration::from_secs(10)).expect("exits");
    assert_eq!(status.code(), Some(1));
    let log = gw.log();
    assert!(log.contains("sha256 mismatch"), "{log}");
    assert!(log.contains("model.json"), "names the model: {log}");
}

/// kill -9 at every step of a model install (issue 6 §2): the gateway binary dies at each
/// step of staging v8 (`DIREDI_FAULT_INSTALL`, an abort: nothing more is written). Restarted,
/// it serves v7 intact if it died before `current` moved and v8 if after, never a half-written
/// file; the retained announcement then installs v8 over the debris.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_every_install_step_leaves_an_intact_model_and_the_install_completes() {
    if !ort_available() && skip("ONNX Runtime") {
        return;
    }
    let spec = Spec::small();
    let onnx = super::onnx::mean_argmax(spec.channels.len(), spec.window);
    let steps = [
        ("staging", 7),
        ("staged", 7),
        ("renamed", 7),
        ("previous-tmp", 7),
        ("previous", 7),
        ("current-tmp", 7),
        ("current", 8),
    ];
    for (step, served_after) in steps {
        let mosquitto = Mosquitto::start();
        let setup = Setup::new(mosquitto.port, |_| {});
        let mut doomed = setup.gateway();
        doomed.env("DIREDI_FAULT_INSTALL", step);
        let mut gw = setup.start(doomed);
        let obs = online(mosquitto.port).await;
        let m = versioned_manifest(&spec, &onnx, "model-v8.onnx", 8, &signing_key());
        super::install::dispatch(&obs, m, 8, &[("model-v8.onnx".into(), onnx.clone())], false)
            .await;
        let died = tokio::task::block_in_place(|| gw.wait(WAIT));
        let died = died.unwrap_or_else(|| panic!("{step}: still running; log:\n{}", gw.log()));
        assert!(!died.success(), "{step}: {died}");
        let line = format!("the process dies at install step {step}\n");
        assert!(gw.log().contains(&line), "{step}: {}", gw.log());
        drop(obs);

        let restarted = setup.start(setup.gateway());
        let mut obs = Observer::connect(mosquitto.port, &format!("diredi/v1/{GW}/#")).await;
        let first = obs
            .next_json("/status", WAIT, |v| v["state"] == "online")
            .await
            .expect("restarted");
        assert_eq!(
            first["model_version"],
            served_after,
            "{step}: served at restart; log:\n{}",
            restarted.log()
        );
        if served_after == 7 {
            obs.next_json("/status", WAIT, |v| {
                v["install"]["state"] == "committed" && v["model_version"] == 8
            })
            .await
            .unwrap_or_else(|| {
                panic!(
                    "{step}: v8 installed after the crash; log:\n{}",
                    restarted.log()
                )
            });
        }
        drop(restarted);
    }
}

/// The host's wall clock jumps back an hour, then forward a day, under the running gateway
/// binary (libfaketime, monotonic clock left alone): it keeps serving throughout, and its own
/// reports follow the new wall clock (the jumps did reach it). Needs libfaketime
/// (`apt-get install libfaketime`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_clock_jumps_backwards_and_forwards_do_not_stop_serving() {
    if !ort_available() && skip("ONNX Runtime") {
        return;
    }
    let lib = ["x86_64-linux-gnu", "aarch64-linux-gnu"]
        .iter()
        .map(|a| PathBuf::from(format!("/usr/lib/{a}/faketime/libfaketimeMT.so.1")))
        .find(|p| p.is_file());
    let Some(lib) = lib else {
        if skip("libfaketime (apt-get install libfaketime)") {
            return;
        }
        unreachable!();
    };
    let spec = Spec::small();
    let mosquitto = Mosquitto::start();
    let setup = Setup::new(mosquitto.port, |_| {});
    let offset = setup.dir.path().join("faketime");
    std::fs::write(&offset, "+0\n").unwrap();
    let mut cmd = setup.gateway();
    cmd.env("LD_PRELOAD", &lib)
        .env("FAKETIME_TIMESTAMP_FILE", &offset)
        .env("FAKETIME_CACHE_DURATION", "1")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    let gw = setup.start(cmd);
    let mut obs = online(mosquitto.port).await;
    let c = spec.channels.len();
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    let hour = 3_600_000i64;
    for (i, (spec_line, shift)) in [("+0", 0), ("-1h", -hour), ("+1d", 24 * hour)]
        .into_iter()
        .enumerate()
    {
        std::fs::write(&offset, format!("{spec_line}\n")).unwrap();
        // The gateway's metrics carry its wall clock: wait until they show the jump.
        let want = now_ms() + shift;
        obs.next_json("/metrics", WAIT, |v| {
            v["ts"]
                .as_i64()
                .is_some_and(|ts| (ts - want).abs() < 60_000)
        })
        .await
        .unwrap_or_else(|| panic!("clock {spec_line} reached the gateway; log:\n{}", gw.log()));
        // And it serves: a new window gets its result.
        let from = 1000 * (i + 1);
        let ts = T0 + from as i64 * spec.period_ms();
        obs.sensor(
            "s",
            encode_json(Some(ts), &rows(from, spec.window, &spec), c),
        )
        .await;
        let got = obs.collect("/inference/s", 1, WAIT).await;
        assert_eq!(
            got.len(),
            1,
            "served at clock {spec_line}; log:\n{}",
            gw.log()
        );
    }
    drop(gw);
}
