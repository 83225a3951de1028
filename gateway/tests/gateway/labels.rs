//! Labels on `label/{sensor}` put the windows they name into the exclusive store; bad labels
//! go to the error topic while the sensor keeps being served.

use diredi_gateway::store::ExclusiveStore;
use diredi_protocol::sensor::encode_json;

use super::support::*;

const T0: i64 = 1_700_000_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_store_the_windows_they_name_and_bad_labels_are_reported() {
    let spec = Spec::small(); // window 8, stride 4, 20 ms
    let classes = spec.classes();
    let port = free_port();
    let mut table = config_table(port, true, None);
    let state = state_dir();
    set(
        &mut table,
        "learning",
        "state_dir",
        state.display().to_string(),
    );
    set(&mut table, "learning", "max_new_classes", 1);
    set(&mut table, "errors", "per_sensor_per_second", 100);
    let gw = Running::start(compile(&table), Some(fake_model(&spec)));
    gw.ready().await;
    let mut obs = Observer::connect(port, &format!("diredi/v1/{GW}/#")).await;
    let label = |s: &str| format!("diredi/v1/{GW}/label/{s}");
    let c = spec.channels.len();
    let p = spec.period_ms();

    // A label for a sensor that has sent nothing is an error.
    obs.publish(
        &label("s9"),
        br#"{"from_ts":0,"to_ts":10,"class":"c0"}"#.to_vec(),
    )
    .await;
    let e = obs
        .next_json("/error", WAIT, |v| v["sensor"] == "s9")
        .await
        .expect("error for the unknown sensor");
    assert_eq!(e["kind"], "bad_label");

    // 24 samples: windows 0..4 (samples 4k .. 4k+7).
    obs.sensor("s1", encode_json(Some(T0), &rows(0, 24, &spec), c))
        .await;
    assert_eq!(obs.collect("/inference/s1", 5, WAIT).await.len(), 5);

    // Samples 0..11 are the first class: windows 0 and 1, sent as two joined ranges.
    for (from, to) in [(0, 5), (6, 11)] {
        let body = serde_json::json!({"from_ts": T0 + from * p, "to_ts": T0 + to * p, "class": classes[0]});
        obs.publish(&label("s1"), body.to_string().into_bytes())
            .await;
    }
    // Window 4 by its id, with a class the model does not have (the one new class allowed).
    obs.publish(
        &label("s1"),
        br#"{"window_id":"s1:4","class":"downstairs"}"#.to_vec(),
    )
    .await;
    // A second new class is over the limit; garbage is not a label; neither stops serving.
    for (body, why) in [
        (
            &br#"{"window_id":"s1:3","class":"jump"}"#[..],
            "new classes",
        ),
        (&b"\xff\x00garbage"[..], "not a label"),
        (
            &br#"{"window_id":"s2:3","class":"c0"}"#[..],
            "not one of sensor",
        ),
    ] {
        obs.publish(&label("s1"), body.to_vec()).await;
        let e = obs
            .next_json("/error", WAIT, |v| v["sensor"] == "s1")
            .await
            .unwrap_or_else(|| panic!("error for {why}"));
        assert_eq!(e["kind"], "bad_label");
        assert!(e["reason"].as_str().unwrap().contains(why), "{e}");
    }
    obs.sensor("s1", encode_json(Some(T0 + 24 * p), &rows(24, 4, &spec), c))
        .await;
    assert_eq!(
        obs.collect("/inference/s1", 1, WAIT).await.len(),
        1,
        "still served"
    );
    let m = obs
        .next_json("/metrics", WAIT, |v| v["labelled_windows"] == 3)
        .await
        .expect("metrics count the stored windows");
    assert_eq!(m["rejected_by_reason"]["bad_label"], 4);
    gw.stop().await.unwrap();

    // Threads that outlive a slow drain may hold the store for a moment.
    let path = state.join("exclusive.redb");
    let mut store = ExclusiveStore::open(&path, 100, 1);
    for _ in 0..50 {
        if store.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        store = ExclusiveStore::open(&path, 100, 1);
    }
    let store = store.unwrap();
    let stored = store.all().unwrap();
    let got: Vec<(i64, &str)> = stored
        .iter()
        .map(|w| ((w.end_ts - T0) / p, w.class.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (7, classes[0].as_str()),
            (11, classes[0].as_str()),
            (23, "downstairs")
        ]
    );
    // The stored values are the standardised window, as the model saw it.
    let all = rows(0, 24, &spec);
    let w0 = &stored[0].data;
    for ch in 0..c {
        for t in 0..spec.window {
            let want = (all[t * c + ch] - spec.mean[ch]) / spec.std[ch];
            assert!((w0[ch * spec.window + t] - want).abs() < 1e-5);
        }
    }
}

/// `diredi-gateway label` and `adapt` reach a running gateway through its broker; with
/// `adapt_after_labels` the gateway adapts by itself. (The test model has no ONNX source, so
/// each adaptation reports that it cannot run: the point is that it was asked.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_and_the_label_policy_start_adaptations() {
    let spec = Spec::small();
    let port = free_port();
    let mut table = config_table(port, true, None);
    set(&mut table, "learning", "adapt_after_labels", 2);
    let gw = Running::start(compile(&table), Some(fake_model(&spec)));
    gw.ready().await;
    let mut obs = Observer::connect(port, &format!("diredi/v1/{GW}/#")).await;
    let c = spec.channels.len();
    obs.sensor("s1", encode_json(Some(T0), &rows(0, 24, &spec), c))
        .await;
    assert_eq!(obs.collect("/inference/s1", 5, WAIT).await.len(), 5);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gw.toml");
    std::fs::write(&file, toml::to_string(&table).unwrap()).unwrap();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_diredi-gateway"))
            .arg("--config")
            .arg(&file)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    cli(&[
        "label",
        "--sensor",
        "s1",
        "--window-id",
        "s1:0",
        "--class",
        "c0",
    ]);
    let p = spec.period_ms();
    let (from, to) = (T0 + 4 * p, T0 + 11 * p);
    cli(&[
        "label",
        "--sensor",
        "s1",
        "--class",
        "c1",
        "--from-ts",
        &from.to_string(),
        "--to-ts",
        &to.to_string(),
    ]);
    let a = obs
        .next_json("/adaptation", WAIT, |_| true)
        .await
        .expect("the policy starts an adaptation after 2 labelled windows");
    assert_eq!(a["state"], "failed");
    assert!(a["reason"].as_str().unwrap().contains("ONNX"), "{a}");

    cli(&["adapt"]);
    let a = obs
        .next_json("/adaptation", WAIT, |_| true)
        .await
        .expect("`diredi-gateway adapt` starts one");
    assert_eq!(a["state"], "failed");
    gw.stop().await.unwrap();
}
