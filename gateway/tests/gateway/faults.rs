//! Fault injection (issue 6 §2) on a running gateway: the broker restarts mid-stream, the state
//! directory's disk fills up, and a sensor's clock jumps backwards and forwards.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use diredi_protocol::sensor::encode_json;

use super::support::*;

const T0: i64 = 1_700_000_000_000;

/// Publishes windows of `sensor` from sample `from` until an inference for a window that ends
/// after sample `from` arrives; returns how long that took.
async fn until_served(obs: &mut Observer, spec: &Spec, sensor: &str, from: usize) -> Duration {
    let c = spec.channels.len();
    let started = Instant::now();
    let mut at = from;
    loop {
        let ts = T0 + at as i64 * spec.period_ms();
        obs.sensor(
            sensor,
            encode_json(Some(ts), &rows(at, spec.window, spec), c),
        )
        .await;
        at += spec.window;
        let suffix = format!("/inference/{sensor}");
        if let Some(m) = obs.next_on(&suffix, Duration::from_millis(100)).await {
            if m.json()["ts"].as_i64().unwrap() >= T0 + from as i64 * spec.period_ms() {
                return started.elapsed();
            }
        }
        assert!(started.elapsed() < WAIT, "{sensor} not served again");
    }
}

/// Mosquitto stops for long enough that the gateway's reconnection delay reaches its cap (the
/// defaults, 0.25 s doubling to 4 s), then returns on the same port: inference resumes within
/// 5 s of its return, with no configuration of the reconnection delays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inference_resumes_within_5_s_of_the_broker_returning() {
    let spec = Spec::small();
    let port = free_port();
    let mut table = config_table(port, false, None);
    for key in ["reconnect_min_ms", "reconnect_max_ms"] {
        table["mqtt"].as_table_mut().unwrap().remove(key);
    }
    let broker = Mosquitto::start_on(port);
    let gw = Running::start(compile(&table), Some(fake_model(&spec)));
    gw.ready().await;
    {
        let mut obs = Observer::connect(port, &format!("diredi/v1/{GW}/inference/#")).await;
        until_served(&mut obs, &spec, "s", 0).await;
    }
    drop(broker);
    // Attempts at 0.25, 0.5, 1, 2, 4, 4 … s: 9 s down covers the cap.
    tokio::time::sleep(Duration::from_secs(9)).await;
    let back = Instant::now();
    let _broker = Mosquitto::start_on(port);
    let mut obs = Observer::connect(port, &format!("diredi/v1/{GW}/inference/#")).await;
    until_served(&mut obs, &spec, "s", 10_000).await;
    let resumed = back.elapsed();
    eprintln!(
        "inference resumed {:.2} s after the broker returned",
        resumed.as_secs_f64()
    );
    assert!(resumed < Duration::from_secs(5), "{resumed:?}");
    gw.stop().await.unwrap();
}

/// A tmpfs of `size` mounted on `dir` until dropped (needs root; tests skip without it).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system of `dir` with one file until it reports no space.
fn fill(dir: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("filler")).unwrap();
    let block = vec![0xA5u8; 64 * 1024];
    loop {
        if f.write_all(&block).and_then(|_| f.sync_data()).is_err() {
            break;
        }
    }
    let mut byte = 1;
    while byte > 0 {
        byte = f.write(&[0]).unwrap_or(0);
    }
}

/// The state directory's file system fills up: labels are refused with a clear error on the
/// `error` topic, and inference goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_labels_clearly_and_inference_goes_on() {
    let spec = Spec::small();
    let base = tempfile::tempdir().unwrap();
    let Some(_fs) = Tmpfs::mount(base.path(), "4m") else {
        if skip("mounting a tmpfs (root)") {
            return;
        }
        unreachable!();
    };
    let state = base.path().join("state");
    let port = free_port();
    let mut table = config_table(port, true, None);
    set(
        &mut table,
        "learning",
        "state_dir",
        state.display().to_string(),
    );
    let gw = Running::start(compile(&table), Some(fake_model(&spec)));
    gw.ready().await;
    let mut obs = Observer::connect(port, &format!("diredi/v1/{GW}/#")).await;
    let c = spec.channels.len();
    let period = spec.period_ms();

    // With space, a label is stored.
    until_served(&mut obs, &spec, "s", 0).await;
    let label = |from: usize, to: usize| {
        serde_json::json!({
            "from_ts": T0 + from as i64 * period,
            "to_ts": T0 + to as i64 * period,
            "class": "class-0"
        })
        .to_string()
        .into_bytes()
    };
    obs.publish(
        &format!("diredi/v1/{GW}/label/s"),
        label(0, spec.window - 1),
    )
    .await;
    obs.next_json("/metrics", WAIT, |v| {
        v["labelled_windows"].as_u64() >= Some(1)
    })
    .await
    .expect("a label stored while there is space");

    // Disk full: more labels until the store needs space (redb may still have free pages).
    fill(base.path());
    let mut at = 1000;
    let mut refused = None;
    for _ in 0..60 {
        let ts = T0 + at as i64 * period;
        obs.sensor(
            "s",
            encode_json(Some(ts), &rows(at, 4 * spec.window, &spec), c),
        )
        .await;
        obs.publish(
            &format!("diredi/v1/{GW}/label/s"),
            label(at, at + 4 * spec.window - 1),
        )
        .await;
        at += 4 * spec.window;
        if let Some(e) = obs
            .next_json("/error", Duration::from_millis(300), |v| {
                v["kind"] == "bad_label"
            })
            .await
        {
            refused = Some(e);
            break;
        }
    }
    let e = refused.expect("a label refused once the disk is full");
    let reason = e["reason"].as_str().unwrap().to_lowercase();
    assert!(reason.contains("space"), "a clear reason: {e}");
    // Inference goes on for this sensor and a new one.
    until_served(&mut obs, &spec, "s", at + 100).await;
    until_served(&mut obs, &spec, "t", 0).await;
    gw.stop().await.unwrap();
}

/// A sensor's clock jumps back an hour, then forward a day: each jump restarts its window
/// (counted in `resets_backwards` and `resets_gap`), results carry the sensor's new time,
/// and serving never stops. (The gateway's own timers use the monotonic clock, so a jump of
/// the host's clock only changes the wall-clock times it reports.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sensor_clock_jumping_backwards_and_forwards_restarts_its_window_and_is_served() {
    let spec = Spec::small();
    let port = free_port();
    let gw = Running::start(
        compile(&config_table(port, true, None)),
        Some(fake_model(&spec)),
    );
    gw.ready().await;
    let mut obs = Observer::connect(port, &format!("diredi/v1/{GW}/#")).await;
    let c = spec.channels.len();
    for (i, ts) in [T0, T0 - 3_600_000, T0 + 86_400_000]
        .into_iter()
        .enumerate()
    {
        obs.sensor("s", encode_json(Some(ts), &rows(0, spec.window, &spec), c))
            .await;
        let m = obs
            .next_on("/inference/s", WAIT)
            .await
            .unwrap_or_else(|| panic!("served after jump {i}"));
        let end = ts + (spec.window as i64 - 1) * spec.period_ms();
        assert_eq!(m.json()["ts"].as_i64(), Some(end), "jump {i}");
    }
    obs.next_json("/metrics", WAIT, |v| {
        v["resets_backwards"] == 1 && v["resets_gap"] == 1
    })
    .await
    .expect("both jumps counted");
    gw.stop().await.unwrap();
}
