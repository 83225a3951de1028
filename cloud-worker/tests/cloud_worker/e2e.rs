//! Labels → adapt → knowledge → cloud update → new model → install, with the shipped HAPT
//! model and a real HAPT user, the gateway's local broker and the cloud's broker apart (two
//! Mosquittos; knowledge, receipts and models on the gateway's uplink). Then the privacy audit
//! (issue 6 §5): every message the gateway published on either broker, told apart by the
//! brokers' own logs, is checked for exclusive windows, for the user's labels and against the
//! documented topic contract.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diredi_cloud_worker::cycle_demo::{self, CycleArgs};
use diredi_cloud_worker::serve::{self, ServeArgs};
use half::f16;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio_util::sync::CancellationToken;

use crate::{available, heavy_turn, repo_root, Mosquitto};
use diredi_gateway::Config;

type Captured = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// Records every message on `port` (`#`, retained ones included) from now on.
async fn capture(port: u16, name: &str) -> (Captured, tokio::task::JoinHandle<()>) {
    let mut o = MqttOptions::new(format!("audit-{name}"), "127.0.0.1", port);
    o.set_max_packet_size(16 << 20, 16 << 20);
    let (client, mut el) = AsyncClient::new(o, 64);
    let seen: Captured = Arc::default();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let mut tx = Some(tx);
    let sink = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let c = client.clone();
                    tokio::spawn(async move { c.subscribe("#", QoS::AtLeastOnce).await });
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    sink.lock()
                        .unwrap()
                        .push((p.topic.clone(), p.payload.to_vec()));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .expect("audit subscription")
        .unwrap();
    (seen, task)
}

/// The topics the gateway `e2e` may publish on, after `diredi/v1/e2e/` (README, topic
/// contract): on its local broker, and on the cloud's broker through the uplink.
fn documented(broker: &str, topic: &str) -> bool {
    let Some(rest) = topic.strip_prefix("diredi/v1/e2e/") else {
        return false;
    };
    match broker {
        "local" => {
            matches!(rest, "status" | "metrics" | "error" | "adaptation")
                || rest
                    .strip_prefix("inference/")
                    .is_some_and(|s| !s.is_empty() && !s.contains('/'))
        }
        _ => matches!(rest, "status" | "knowledge"),
    }
}
/// Every run of 4 consecutive values of `v` (in the given order), as f32 and f16 bytes.
fn shingles(v: &[f32], out: &mut HashSet<Vec<u8>>) {
    for w in v.windows(4) {
        out.insert(w.iter().flat_map(|x| x.to_le_bytes()).collect());
        out.insert(
            w.iter()
                .flat_map(|x| f16::from_f32(*x).to_le_bytes())
                .collect(),
        );
    }
}

/// `rows × cols` row-major → column-major.
fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..cols)
        .flat_map(|c| (0..rows).map(move |r| v[r * cols + c]))
        .collect()
}

/// Whether any 8- or 16-byte run of `payload` is one of `needles`.
fn leaks(payload: &[u8], needles: &HashSet<Vec<u8>>) -> Option<usize> {
    [8usize, 16]
        .into_iter()
        .find_map(|n| payload.windows(n).position(|w| needles.contains(w)))
}

/// The shipped model, the data, a folder and the cloud worker's key for one cycle test.
struct Setup {
    root: std::path::PathBuf,
    model: std::path::PathBuf,
    data: std::path::PathBuf,
    dir: tempfile::TempDir,
    key_path: std::path::PathBuf,
    key: diredi_protocol::manifest::SigningKey,
}

impl Setup {
    /// `None` (the test skips) when ONNX Runtime, the data or the model is missing.
    fn new() -> Option<Self> {
        let root = repo_root();
        let model = root.join("onnx-models/hapt-student-v1.json");
        let data = root.join("data/hapt");
        let ort = diredi_infer::init_runtime(None).is_ok();
        if !available("ONNX Runtime", ort)
            || !available("data/hapt", data.join("dataset.json").is_file())
            || !available("the shipped model", model.is_file())
        {
            return None;
        }
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("worker.key");
        let key = diredi_cloud_worker::keys::load_or_generate(&key_path).unwrap();
        Some(Setup {
            root,
            model,
            data,
            dir,
            key_path,
            key,
        })
    }

    /// Gateway `id` on the broker at `port` (its embedded one, or an external one), with an
    /// uplink to `uplink` when given; it trusts the shipped key and the worker's.
    fn gateway(&self, id: &str, port: u16, embedded: bool, uplink: Option<u16>) -> Config {
        let shipped_key =
            std::fs::read_to_string(self.root.join("onnx-models/publisher.pub")).unwrap();
        let uplink = uplink.map_or(String::new(), |p| {
            format!("[uplink]\nenabled = true\nhost = \"127.0.0.1\"\nport = {p}\n")
        });
        let toml = format!(
            r#"
[gateway]
id = "{id}"
log_level = "warn"
[broker]
enabled = {embedded}
[mqtt]
port = {port}
{uplink}
[model]
path = "{}"
trusted_keys = ["{}", "{}"]
[runtime]
providers = ["cpu"]
[metrics]
interval_s = 0.5
[learning]
state_dir = "{}"
serve_adapted = true
"#,
            self.model.display(),
            shipped_key.trim(),
            self.key.public().to_base64(),
            self.dir.path().join(format!("{id}-state")).display(),
        );
        diredi_gateway::config::from_toml(&toml, self.dir.path()).unwrap()
    }

    /// A cloud worker on `port` with a quick update (the full settings are the benchmark's
    /// business), its own state folder `state`, and a lease of `lease_s`.
    fn worker(&self, port: u16, state: &str, lease_s: u64) -> ServeArgs {
        ServeArgs {
            host: "127.0.0.1".into(),
            port,
            group: "e2e".into(),
            dataset: self.data.clone(),
            split: self.root.join("cloud-worker/splits/hapt.toml"),
            teacher: self.root.join("onnx-models/hapt-teacher-v1.safetensors"),
            model: self.model.clone(),
            key: self.key_path.clone(),
            state_dir: self.dir.path().join(state),
            chunk_size: 16 * 1024,
            update_json: Some(
                r#"{"teacher_epochs": 1, "student_epochs": 2, "teacher_presumed_windows": 600,
                    "teacher_agree_windows": 600, "student_pool_windows": 1500}"#
                    .into(),
            ),
            max_packages: Some(1),
            ca_file: None,
            cert_file: None,
            key_file: None,
            die_after_lease: false,
            lease_s,
        }
    }

    /// HAPT user 2 on gateway `id`, through the broker at `port`.
    fn cycle(&self, id: &str, port: u16) -> CycleArgs {
        CycleArgs {
            dataset: self.data.clone(),
            split: self.root.join("cloud-worker/splits/hapt.toml"),
            subject: "2".into(),
            gateway: id.into(),
            host: "127.0.0.1".into(),
            port,
            wait_s: 400,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)] // the turn is held for the whole test on purpose
async fn the_cycle_installs_a_better_model_and_nothing_private_leaves_the_gateway() {
    let _turn = heavy_turn();
    let Some(s) = Setup::new() else {
        return;
    };
    let local = Mosquitto::start();
    let cloud = Mosquitto::start();
    let (local_seen, local_task) = capture(local.port, "local").await;
    let (cloud_seen, cloud_task) = capture(cloud.port, "cloud").await;
    let stop = CancellationToken::new();
    let config = s.gateway("e2e", local.port, false, Some(cloud.port));
    let gateway = tokio::spawn(diredi_gateway::run(config, stop.clone()));
    let worker = tokio::spawn(serve::run(s.worker(cloud.port, "cloud", 600), stop.clone()));
    let report = cycle_demo::run(&s.cycle("e2e", local.port), stop.clone())
        .await
        .unwrap();
    let updates = worker.await.unwrap().unwrap();
    stop.cancel();
    gateway.await.unwrap().unwrap();

    assert_eq!(
        report.version_after,
        report.version_before + 1,
        "{report:?}"
    );
    assert!(
        report.accuracy_after > report.accuracy_before,
        "user-test accuracy {:.3} -> {:.3}",
        report.accuracy_before,
        report.accuracy_after
    );
    assert_eq!(updates.len(), 1);
    assert!(updates[0].gate.passed);
    // `serve_adapted`: the adapted model served until the cloud's update replaced it.
    let adaptation = report
        .gateway_messages
        .iter()
        .find(|(t, _)| t.ends_with("/adaptation"))
        .map(|(_, p)| serde_json::from_slice::<serde_json::Value>(p).unwrap())
        .expect("an adaptation report");
    assert_eq!(
        adaptation["report"]["serving_adapted"], true,
        "{adaptation}"
    );
    assert!(report
        .gateway_messages
        .iter()
        .any(|(t, p)| t.ends_with("/status")
            && serde_json::from_slice::<serde_json::Value>(p)
                .is_ok_and(|v| v["model_adapted_locally"] == true)));
    assert!(report.knowledge_bytes > 0 && report.knowledge_bytes <= 64 * 1024);

    // Privacy audit. What the gateway published, on each broker, from the brokers' logs.
    tokio::time::sleep(Duration::from_millis(300)).await;
    local_task.abort();
    cloud_task.abort();
    let gateway_client = "diredi-gateway-e2e";
    let mut audited = Vec::new();
    for (name, broker, seen) in [
        ("local", &local, &local_seen),
        ("cloud", &cloud, &cloud_seen),
    ] {
        let published: BTreeSet<String> = broker
            .publishes()
            .into_iter()
            .filter(|(client, _)| client == gateway_client)
            .map(|(_, topic)| topic)
            .collect();
        assert!(!published.is_empty(), "{name}: the log names the gateway");
        for t in &published {
            assert!(documented(name, t), "{name}: undocumented topic {t}");
        }
        // Every topic the gateway used is its own: nobody else published there.
        for (client, topic) in broker.publishes() {
            if published.contains(&topic) {
                assert_eq!(client, gateway_client, "{name}: {topic}");
            }
        }
        audited.extend(
            seen.lock()
                .unwrap()
                .iter()
                .filter(|(t, _)| published.contains(t))
                .cloned()
                .map(|(t, p)| (format!("{name} {t}"), p)),
        );
    }
    assert!(
        audited
            .iter()
            .any(|(t, _)| t == "cloud diredi/v1/e2e/knowledge"),
        "the knowledge went to the cloud's broker"
    );
    assert!(
        !audited
            .iter()
            .any(|(t, _)| t == "local diredi/v1/e2e/knowledge"),
        "and only there"
    );

    // No message the gateway published holds four consecutive values of an exclusive window,
    // raw or standardised, in either layout, at f32 or f16.
    let mut needles = HashSet::new();
    for (raw, std) in &report.exclusive {
        let (t, c) = (raw.len() / 6, 6);
        shingles(raw, &mut needles);
        shingles(&transpose(raw, t, c), &mut needles);
        shingles(std, &mut needles);
        shingles(&transpose(std, c, t), &mut needles);
    }
    for (topic, payload) in &audited {
        assert_eq!(
            leaks(payload, &needles),
            None,
            "{topic} carries exclusive window values"
        );
    }
    // No label leaves: the user's labels (time range and class, sent on `label/…`) appear in
    // no message of the gateway, as text or as the range's i64 bytes.
    let labels: Vec<serde_json::Value> = local_seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, _)| t.starts_with("diredi/v1/e2e/label/"))
        .map(|(_, p)| serde_json::from_slice(p).unwrap())
        .collect();
    assert!(labels.len() >= 6, "{} labels sent", labels.len());
    for l in &labels {
        let (from, to) = (l["from_ts"].as_i64().unwrap(), l["to_ts"].as_i64().unwrap());
        let bytes: Vec<u8> = [from, to].iter().flat_map(|v| v.to_le_bytes()).collect();
        for (topic, payload) in &audited {
            let text = String::from_utf8_lossy(payload);
            assert!(
                !(text.contains(&from.to_string()) && text.contains(&to.to_string())),
                "{topic} carries the label {l}"
            );
            assert!(
                !payload.windows(16).any(|w| w == bytes.as_slice()),
                "{topic} carries the label range {l}"
            );
        }
    }
    // The check itself finds a window when one is there.
    let (raw, _) = &report.exclusive[0];
    let planted: Vec<u8> = raw[10..14].iter().flat_map(|x| x.to_le_bytes()).collect();
    assert!(leaks(&planted, &needles).is_some());
}

/// A cloud worker killed mid-update (issue 6 §2): worker A takes the package (its lease
/// receipt) and stops at once (`--die-after-lease`, as if killed); worker B, started afterwards
/// in the same shared-subscription group, gets the package once A's lease has ended, and the
/// gateway installs exactly one new model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)] // the turn is held for the whole test on purpose
async fn a_worker_killed_mid_update_leaves_the_package_to_another_and_one_model_is_installed() {
    let _turn = heavy_turn();
    let Some(s) = Setup::new() else {
        return;
    };
    // Mosquitto: the `#` capture below would compete with the gateway for the embedded
    // broker's router, whose bounded logs then drop sensor messages for the slower reader.
    let broker = Mosquitto::start();
    let port = broker.port;
    let stop = CancellationToken::new();
    let gateway = tokio::spawn(diredi_gateway::run(
        s.gateway("kill", port, false, None),
        stop.clone(),
    ));
    let (seen, watch) = capture(port, "watch").await;
    let knowledge_sent = || {
        seen.lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| t == "diredi/v1/kill/knowledge")
            .count()
    };
    let a_args = ServeArgs {
        die_after_lease: true,
        ..s.worker(port, "cloud-a", 40)
    };
    let a = tokio::spawn(serve::run(a_args, CancellationToken::new()));
    let args = s.cycle("kill", port);
    let cycle_stop = stop.clone();
    let cycle = tokio::spawn(async move { cycle_demo::run(&args, cycle_stop).await });

    // Worker A takes the package (its lease receipt) and is gone before any update.
    let mut cycle = cycle;
    let a_end = tokio::select! {
        r = tokio::time::timeout(Duration::from_secs(300), a) => {
            r.expect("worker A took a package").unwrap()
        }
        r = &mut cycle => panic!("the cycle ended before worker A took the package: {r:?}"),
    };
    let leased = std::time::Instant::now();
    let err = a_end.expect_err("worker A died after its lease");
    assert!(err.to_string().contains("die-after-lease"), "{err}");
    let sent_before = knowledge_sent();
    assert!(sent_before >= 1);
    let b = tokio::spawn(serve::run(s.worker(port, "cloud-b", 600), stop.clone()));

    // The package is held back during A's 40 s lease, then sent again (and B takes it).
    let resent = async {
        while knowledge_sent() == sent_before {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        leased.elapsed()
    };
    let after = tokio::time::timeout(Duration::from_secs(120), resent)
        .await
        .expect("sent again after the lease");
    assert!(
        after >= Duration::from_secs(35),
        "resent {after:?} after the lease"
    );

    let report = cycle.await.unwrap().unwrap();
    let updates = tokio::time::timeout(Duration::from_secs(60), b)
        .await
        .expect("worker B ends after its package")
        .unwrap()
        .unwrap();
    stop.cancel();
    gateway.await.unwrap().unwrap();
    watch.abort();
    assert_eq!(
        report.version_after,
        report.version_before + 1,
        "{report:?}"
    );
    assert_eq!(updates.len(), 1, "worker B did the update");
    let seen = seen.lock().unwrap();
    let announcements: Vec<_> = seen
        .iter()
        .filter(|(t, p)| t == "diredi/v1/kill/model" && !p.is_empty())
        .collect();
    assert_eq!(announcements.len(), 1, "exactly one model dispatched");
    let committed: BTreeSet<u64> = seen
        .iter()
        .filter(|(t, _)| t == "diredi/v1/kill/status")
        .filter_map(|(_, p)| serde_json::from_slice::<serde_json::Value>(p).ok())
        .filter(|v| v["install"]["state"] == "committed")
        .filter_map(|v| v["install"]["version"].as_u64())
        .collect();
    assert_eq!(committed, BTreeSet::from([report.version_after]));
}
