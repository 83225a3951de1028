//! Labels → adapt → knowledge → cloud update → new model → install, over the gateway's
//! embedded broker, with the shipped HAPT model and a real HAPT user.

use std::collections::HashSet;

use diredi_cloud_worker::cycle_demo::{self, CycleArgs};
use diredi_cloud_worker::serve::{self, ServeArgs};
use half::f16;
use tokio_util::sync::CancellationToken;

use crate::{available, free_port, repo_root};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cycle_installs_a_better_model_and_no_exclusive_window_leaves_the_gateway() {
    let root = repo_root();
    let model = root.join("onnx-models/hapt-student-v1.json");
    let data = root.join("data/hapt");
    let ort = diredi_infer::init_runtime(None).is_ok();
    if !available("ONNX Runtime", ort)
        || !available("data/hapt", data.join("dataset.json").is_file())
        || !available("the shipped model", model.is_file())
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("worker.key");
    let key = diredi_cloud_worker::keys::load_or_generate(&key_path).unwrap();
    let shipped_key = std::fs::read_to_string(root.join("onnx-models/publisher.pub")).unwrap();
    let port = free_port();
    let gw_toml = format!(
        r#"
[gateway]
id = "e2e"
log_level = "warn"
[mqtt]
port = {port}
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
        model.display(),
        shipped_key.trim(),
        key.public().to_base64(),
        dir.path().join("gateway-state").display(),
    );
    let config = diredi_gateway::config::from_toml(&gw_toml, dir.path()).unwrap();
    let stop = CancellationToken::new();
    let gateway = tokio::spawn(diredi_gateway::run(config, stop.clone()));

    // A quick update: the full settings are the benchmark's business.
    let serve_args = ServeArgs {
        host: "127.0.0.1".into(),
        port,
        group: "e2e".into(),
        dataset: data.clone(),
        split: root.join("cloud-worker/splits/hapt.toml"),
        teacher: root.join("onnx-models/hapt-teacher-v1.safetensors"),
        model: model.clone(),
        key: key_path,
        state_dir: dir.path().join("cloud-state"),
        chunk_size: 16 * 1024,
        update_json: Some(
            r#"{"teacher_epochs": 1, "student_epochs": 2, "teacher_presumed_windows": 600,
                "teacher_agree_windows": 600, "student_pool_windows": 1500}"#
                .into(),
        ),
        max_packages: Some(1),
    };
    let worker = tokio::spawn(serve::run(serve_args, stop.clone()));

    let report = cycle_demo::run(
        &CycleArgs {
            dataset: data,
            split: root.join("cloud-worker/splits/hapt.toml"),
            subject: "2".into(),
            gateway: "e2e".into(),
            host: "127.0.0.1".into(),
            port,
            wait_s: 400,
        },
        stop.clone(),
    )
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
    assert!(report
        .gateway_messages
        .iter()
        .any(|(t, _)| t.ends_with("/knowledge")));
    for (topic, payload) in &report.gateway_messages {
        assert_eq!(
            leaks(payload, &needles),
            None,
            "{topic} carries exclusive window values"
        );
    }
    // The check itself finds a window when one is there.
    let (raw, _) = &report.exclusive[0];
    let planted: Vec<u8> = raw[10..14].iter().flat_map(|x| x.to_le_bytes()).collect();
    assert!(leaks(&planted, &needles).is_some());
}
