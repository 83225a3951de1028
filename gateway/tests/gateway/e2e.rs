//! Sensor data in, one inference message per window out: embedded rumqttd and Mosquitto, the
//! fake classifier, a real ONNX model in ONNX Runtime, the shipped HAPT model on real data, and
//! broker outages.

use std::time::Duration;

use diredi_infer::{Classifier, OrtClassifier, SessionConfig};
use diredi_protocol::sensor::{encode_binary, encode_json, encode_senml};
use ndarray::ArrayView3;

use super::support::*;

const T0: i64 = 1_700_000_000_000;

/// Streams 24 samples of `spec` as JSON (timed), binary (untimed, contiguous) and SenML (timed)
/// and checks the 5 resulting inference messages of sensor `s1` against `spec.expected`.
async fn stream_and_check(obs: &mut Observer, spec: &Spec) -> Vec<serde_json::Value> {
    let c = spec.channels.len();
    let p = spec.period_ms();
    obs.sensor("s1", encode_json(Some(T0), &rows(0, 10, spec), c))
        .await;
    obs.sensor("s1", encode_binary(None, &rows(10, 6, spec), c))
        .await;
    obs.sensor(
        "s1",
        encode_senml(
            "",
            T0 + 16 * p,
            spec.rate,
            &rows(16, 8, spec),
            &spec.channels,
        ),
    )
    .await;
    let all = rows(0, 24, spec);
    let got = obs.collect("/inference/s1", 5, WAIT).await;
    assert_eq!(
        got.len(),
        5,
        "one message per window (samples 0..24, window 8, stride 4)"
    );
    let mut labels = Vec::new();
    let mut out = Vec::new();
    for (k, m) in got.iter().enumerate() {
        let v = m.json();
        let end = 7 + 4 * k;
        let (label, probs) = spec.expected(&all[(end + 1 - spec.window) * c..(end + 1) * c]);
        assert_eq!(v["sensor"], "s1");
        assert_eq!(v["window_id"], format!("s1:{k}"));
        assert_eq!(v["label"], label.as_str(), "window {k}: {v}");
        let ts = v["ts"].as_i64().unwrap();
        assert!(
            (ts - (T0 + end as i64 * p)).abs() <= 1,
            "window {k} ends at sample {end}: {ts}"
        );
        assert_eq!(v["model_version"], 7);
        for (class, p) in spec.classes().iter().zip(&probs) {
            let got = v["probabilities"][class].as_f64().unwrap();
            assert!((got - f64::from(*p)).abs() < 1e-4, "{class}: {got} vs {p}");
        }
        let conf = v["confidence"].as_f64().unwrap();
        assert!((conf - v["probabilities"][label.as_str()].as_f64().unwrap()).abs() < 1e-9);
        assert!(v["latency_ms"].as_f64().unwrap() >= 0.0);
        labels.push(label);
        out.push(v);
    }
    labels.dedup();
    assert!(labels.len() > 1, "the stream changes class: {labels:?}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_in_results_out_through_embedded_rumqttd() {
    let spec = Spec::small();
    let port = free_port();
    let gw = Running::start(
        compile(&config_table(port, true, None)),
        Some(fake_model(&spec)),
    );
    gw.ready().await;
    let mut obs = Observer::connect(port, &format!("diredi/v1/{GW}/#")).await;
    let status = obs
        .next_json("/status", WAIT, |v| v["state"] == "online")
        .await
        .expect("online status");
    assert_eq!(status["gateway_id"], GW);
    assert_eq!(status["model_id"], "test-model");
    assert_eq!(status["model_version"], 7);
    assert_eq!(status["execution_provider"], "fake");
    assert!(status["started_at"].as_i64().unwrap() > T0);
    stream_and_check(&mut obs, &spec).await;
    let metrics = obs
        .next_json("/metrics", WAIT, |v| v["windows_inferred"] == 5)
        .await
        .expect("metrics count the windows");
    assert_eq!(metrics["messages_in"], 3);
    assert_eq!(metrics["samples_in"], 24);
    assert_eq!(metrics["sensors"], 1);
    assert_eq!(metrics["inputs_rejected"], 0);
    assert!(metrics["rss_bytes"].as_u64().unwrap() > 1 << 20);
    assert_eq!(metrics["queue_capacity"], 1024);
    assert_inference_threads_at_default_priority();
    gw.stop().await.unwrap();
}

/// The inference threads of this test process (every gateway here runs the default
/// `runtime.inference_nice`, −10) run at −10 where the process may raise a priority, and at
/// the process's own priority where it may not.
fn assert_inference_threads_at_default_priority() {
    use diredi_gateway::priority::{current_thread_nice, set_current_thread_nice};
    let (allowed, own) = std::thread::spawn(|| {
        let own = current_thread_nice().unwrap();
        (set_current_thread_nice(-10).is_ok(), own)
    })
    .join()
    .unwrap();
    let expected = if allowed { -10 } else { own };
    let nices = thread_nices("\0", "inference-");
    assert!(!nices.is_empty(), "no inference thread found");
    assert!(
        nices.iter().all(|&n| n == expected),
        "inference thread nice values {nices:?}, expected {expected}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_in_results_out_through_mosquitto() {
    let spec = Spec::small();
    let mosquitto = Mosquitto::start();
    let cfg = compile(&config_table(mosquitto.port, false, None));
    let gw = Running::start(cfg, Some(fake_model(&spec)));
    gw.ready().await;
    let mut obs = Observer::connect(mosquitto.port, &format!("diredi/v1/{GW}/#")).await;
    let status = obs.next_on("/status", WAIT).await.expect("retained status");
    assert!(status.retain, "status is retained");
    assert_eq!(status.json()["state"], "online");
    stream_and_check(&mut obs, &spec).await;
    gw.stop().await.unwrap();
    let mut late = Observer::connect(mosquitto.port, &format!("diredi/v1/{GW}/status")).await;
    let v = late
        .next_on("/status", WAIT)
        .await
        .expect("retained status after stop");
    assert_eq!(v.json()["state"], "offline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onnx_model_in_onnx_runtime_matches_direct_inference() {
    if !ort_available() && skip("ONNX Runtime") {
        return;
    }
    let spec = Spec::small();
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_onnx_model(dir.path(), &spec);
    let port = free_port();
    let gw = Running::start(compile(&config_table(port, true, Some(&manifest))), None);
    gw.ready().await;
    let mut obs = Observer::connect(port, &format!("diredi/v1/{GW}/#")).await;
    let status = obs
        .next_json("/status", WAIT, |v| v["state"] == "online")
        .await
        .unwrap();
    assert_eq!(status["execution_provider"], "cpu");
    let results = stream_and_check(&mut obs, &spec).await;

    // The same windows through diredi-infer directly.
    let onnx = std::fs::read(dir.path().join("model.onnx")).unwrap();
    let direct = OrtClassifier::from_bytes(&onnx, &SessionConfig::default()).unwrap();
    let (c, t) = (spec.channels.len(), spec.window);
    let all = rows(0, 24, &spec);
    for (k, v) in results.iter().enumerate() {
        let start = 4 * k;
        let mut nct = vec![0.0f32; c * t];
        for ti in 0..t {
            for ch in 0..c {
                nct[ch * t + ti] = (all[(start + ti) * c + ch] - spec.mean[ch]) / spec.std[ch];
            }
        }
        let out = direct
            .classify(ArrayView3::from_shape((1, c, t), &nct).unwrap())
            .unwrap();
        for (i, class) in spec.classes().iter().enumerate() {
            let got = v["probabilities"][class].as_f64().unwrap();
            assert!(
                (got - f64::from(out[[0, i]])).abs() < 1e-5,
                "window {k} {class}"
            );
        }
    }
    gw.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_execution_provider_falls_back_to_cpu_in_status() {
    if !ort_available() && skip("ONNX Runtime") {
        return;
    }
    let spec = Spec::small();
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_onnx_model(dir.path(), &spec);
    let mosquitto = Mosquitto::start();
    let mut table = config_table(mosquitto.port, false, Some(&manifest));
    set(&mut table, "runtime", "providers", vec!["qnn", "cpu"]);
    let gw = Running::start(compile(&table), None);
    gw.ready().await;
    let mut obs = Observer::connect(mosquitto.port, &format!("diredi/v1/{GW}/status")).await;
    let status = obs
        .next_json("/status", WAIT, |v| v["state"] == "online")
        .await
        .unwrap();
    assert_eq!(
        status["execution_provider"], "cpu",
        "qnn is not in this ONNX Runtime build"
    );
    gw.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_at_start_and_restarted_later_is_survived() {
    let spec = Spec::small();
    let c = spec.channels.len();
    let port = free_port();
    let gw = Running::start(
        compile(&config_table(port, false, None)),
        Some(fake_model(&spec)),
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        !gw.notes.names().contains(&"READY".to_string()),
        "not ready without a broker"
    );

    let first = Mosquitto::start_on(port);
    gw.ready().await;
    let mut obs = Observer::connect(port, &format!("diredi/v1/{GW}/#")).await;
    obs.next_json("/status", WAIT, |v| v["state"] == "online")
        .await
        .unwrap();
    obs.sensor("s1", encode_json(Some(T0), &rows(0, 8, &spec), c))
        .await;
    assert_eq!(obs.collect("/inference/s1", 1, WAIT).await.len(), 1);
    drop(obs);
    drop(first);

    tokio::time::sleep(Duration::from_millis(300)).await;
    let _second = Mosquitto::start_on(port);
    let mut obs = Observer::connect(port, &format!("diredi/v1/{GW}/#")).await;
    // The gateway re-subscribes, then re-announces itself on the new broker.
    obs.next_json("/status", WAIT, |v| v["state"] == "online")
        .await
        .expect("re-announced");
    obs.sensor("s1", encode_json(Some(T0 + 60_000), &rows(0, 8, &spec), c))
        .await;
    let got = obs.collect("/inference/s1", 1, WAIT).await;
    assert_eq!(got.len(), 1, "served again after reconnection");
    assert_eq!(got[0].json()["window_id"], "s1:1");
    gw.stop().await.unwrap();
}

/// The shipped HAPT student model on real HAPT rows: every window the gateway classifies gets
/// the probabilities diredi-infer gives the same standardised window (tolerance 1e-4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_model_on_real_data_matches_direct_inference() {
    let Some(shipped) = shipped_model() else {
        return;
    };
    let (signed, onnx, c) = (&shipped.signed, &shipped.onnx, shipped.channels.len());
    let input = &signed["input"];
    let mean: Vec<f32> = serde_json::from_value(input["mean"].clone()).unwrap();
    let std: Vec<f32> = serde_json::from_value(input["std"].clone()).unwrap();
    let classes: Vec<String> = serde_json::from_value(signed["classes"].clone()).unwrap();
    let window = input["window"].as_u64().unwrap() as usize;
    let stride = input["stride"].as_u64().unwrap() as usize;
    let rate = input["sample_rate_hz"].as_f64().unwrap();
    let n_windows = 12;
    let Some(data) = hapt_rows(&shipped.channels, window + stride * (n_windows - 1)) else {
        return;
    };
    let local_manifest = &shipped.manifest;

    let port = free_port();
    let gw = Running::start(
        compile(&config_table(port, true, Some(local_manifest))),
        None,
    );
    gw.ready().await;
    let mut obs = Observer::connect(port, &format!("diredi/v1/{GW}/inference/#")).await;
    let period = (1000.0 / rate) as i64;
    for (k, chunk) in data.chunks(32 * c).enumerate() {
        obs.sensor(
            "hapt",
            encode_json(Some(T0 + (k * 32) as i64 * period), chunk, c),
        )
        .await;
    }
    let got = obs.collect("/inference/hapt", n_windows, WAIT).await;
    assert_eq!(got.len(), n_windows);

    let direct = OrtClassifier::from_bytes(onnx, &SessionConfig::default()).unwrap();
    for (k, m) in got.iter().enumerate() {
        let v = m.json();
        let mut nct = vec![0.0f32; c * window];
        for t in 0..window {
            for ch in 0..c {
                nct[ch * window + t] = (data[(k * stride + t) * c + ch] - mean[ch]) / std[ch];
            }
        }
        let mut out = direct
            .classify(ArrayView3::from_shape((1, c, window), &nct).unwrap())
            .unwrap();
        if signed["output"]["kind"] == "logits" {
            diredi_gateway::model::softmax(out.as_slice_mut().unwrap());
        }
        let best = (0..classes.len())
            .max_by(|a, b| out[[0, *a]].total_cmp(&out[[0, *b]]))
            .unwrap();
        assert_eq!(v["label"], classes[best].as_str(), "window {k}");
        for (i, class) in classes.iter().enumerate() {
            let p = v["probabilities"][class].as_f64().unwrap();
            assert!(
                (p - f64::from(out[[0, i]])).abs() < 1e-4,
                "window {k} {class}"
            );
        }
    }
    gw.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn home_assistant_discovery_is_announced_for_the_gateway_and_each_new_sensor() {
    let spec = Spec::small();
    let port = free_port();
    let mut table = config_table(port, true, None);
    set(&mut table, "homeassistant", "enabled", true);
    let gw = Running::start(compile(&table), Some(fake_model(&spec)));
    gw.ready().await;
    let mut ha = Observer::connect(port, "homeassistant/#").await;
    let gateway_configs = ha.collect("/config", 6, WAIT).await;
    assert_eq!(gateway_configs.len(), 6, "connectivity and five metrics");
    assert!(gateway_configs
        .iter()
        .all(|m| m.retain && !m.topic.contains("s1")));
    let connectivity = gateway_configs
        .iter()
        .find(|m| m.topic.starts_with("homeassistant/binary_sensor/"))
        .expect("connectivity entity")
        .json();
    assert_eq!(
        connectivity["state_topic"],
        format!("diredi/v1/{GW}/status")
    );

    let data = Observer::connect(port, &format!("diredi/v1/{GW}/status")).await;
    data.sensor("s1", encode_json(None, &rows(0, 1, &spec), 3))
        .await;
    let sensor_configs = ha.collect("/config", 2, WAIT).await;
    assert_eq!(
        sensor_configs.len(),
        2,
        "class and confidence of the new sensor"
    );
    assert!(sensor_configs.iter().all(|m| m.topic.contains("s1")));
    let class = sensor_configs
        .iter()
        .map(Msg::json)
        .find(|v| v["device_class"] == "enum")
        .expect("class entity");
    assert_eq!(class["state_topic"], format!("diredi/v1/{GW}/inference/s1"));
    assert_eq!(class["options"], serde_json::json!(spec.classes()));

    // Home Assistant restarted: everything is announced again, the known sensor included.
    data.publish("homeassistant/status", b"online".to_vec())
        .await;
    let again = ha.collect("/config", 8, WAIT).await;
    assert_eq!(again.len(), 8);
    assert_eq!(again.iter().filter(|m| m.topic.contains("s1")).count(), 2);
    gw.stop().await.unwrap();
}
