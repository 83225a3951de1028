//! Model dispatch over MQTT into a running gateway: a newer signed model is received in
//! chunks, verified, smoke-run, staged and swapped in; bad ones are rejected while the
//! installed model keeps serving; rollback returns to the previous model.

use diredi_protocol::dispatch::{chunk_topic, DispatchMsg};
use diredi_protocol::manifest::SigningKey;
use diredi_protocol::sensor::encode_json;

use super::onnx::{mean_argmax, mean_model};
use super::support::*;

const T0: i64 = 1_700_000_000_000;

type Files = Vec<(String, Vec<u8>)>;

/// Publishes `files` of `manifest` (retained chunks first, then the retained announcement).
pub async fn dispatch(
    obs: &Observer,
    manifest: serde_json::Value,
    version: u64,
    files: &[(String, Vec<u8>)],
    corrupt_chunk: bool,
) {
    let model_topic = format!("diredi/v1/{GW}/model");
    // Small chunks: even the tiny test model spans several.
    let (msg, chunks) = DispatchMsg::build(manifest, version, files, 128);
    for (f, parts) in chunks.iter().enumerate() {
        for (i, c) in parts.iter().enumerate() {
            let mut c = c.clone();
            if corrupt_chunk && f == 0 && i == 0 {
                c.truncate(c.len() - 1);
            }
            obs.publish_retained(&chunk_topic(&model_topic, version, f, i), c)
                .await;
        }
    }
    obs.publish_retained(&model_topic, serde_json::to_vec(&msg).unwrap())
        .await;
}

/// The next status whose install part has `state` for `version`.
async fn install_state(obs: &mut Observer, state: &str, version: u64) -> serde_json::Value {
    obs.next_json("/status", WAIT, |v| {
        v["install"]["state"] == state && v["install"]["version"] == version
    })
    .await
    .unwrap_or_else(|| panic!("install state {state} for v{version}"))
}

/// The model version in the next inference result of a fresh sensor.
async fn served_version(obs: &mut Observer, spec: &Spec, sensor: &str) -> u64 {
    let c = spec.channels.len();
    obs.sensor(
        sensor,
        encode_json(Some(T0), &rows(0, spec.window, spec), c),
    )
    .await;
    let got = obs.collect(&format!("/inference/{sensor}"), 1, WAIT).await;
    assert_eq!(got.len(), 1, "sensor {sensor} served");
    got[0].json()["model_version"].as_u64().unwrap()
}

/// A gateway serving the tiny ONNX model as v7, with a state directory of its own, and an
/// observer of every topic of it. The folder holds the model files.
async fn v7_gateway(spec: &Spec) -> (tempfile::TempDir, std::path::PathBuf, Running, Observer) {
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_onnx_model(dir.path(), spec); // v7
    let port = free_port();
    let mut table = config_table(port, true, Some(&manifest));
    let state = state_dir();
    set(
        &mut table,
        "learning",
        "state_dir",
        state.display().to_string(),
    );
    let gw = Running::start(compile(&table), None);
    gw.ready().await;
    let obs = Observer::connect(port, &format!("diredi/v1/{GW}/#")).await;
    (dir, state, gw, obs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatched_models_are_verified_smoke_run_installed_or_rejected_and_rolled_back() {
    if !ort_available() && skip("ONNX Runtime") {
        return;
    }
    let spec = Spec::small();
    let (_dir, state, gw, mut obs) = v7_gateway(&spec).await;
    let onnx = mean_argmax(spec.channels.len(), spec.window);
    let file = |v: u64, bytes: &[u8]| vec![(format!("model-v{v}.onnx"), bytes.to_vec())];
    let signed = |v: u64, bytes: &[u8], key: &SigningKey| {
        versioned_manifest(&spec, bytes, &format!("model-v{v}.onnx"), v, key)
    };

    // v8, in chunks: installed and serving.
    dispatch(
        &obs,
        signed(8, &onnx, &signing_key()),
        8,
        &file(8, &onnx),
        false,
    )
    .await;
    install_state(&mut obs, "committed", 8).await;
    assert_eq!(served_version(&mut obs, &spec, "a").await, 8);
    assert!(
        state.join("models/test-model-v8/model-v8.onnx").is_file(),
        "staged on disk"
    );

    // Each bad model is rejected and v8 keeps serving.
    let other_key = SigningKey::from_seed(&[3; 32]);
    // The file sent is not the one signed (same name, other bytes).
    let mut swapped = onnx.clone();
    swapped.extend_from_slice(b"trailing bytes");
    let mut narrow = Spec::small();
    narrow.channels = vec!["x".into(), "y".into(), "z".into()];
    let narrow_manifest = versioned_manifest(&narrow, &onnx, "model-v13.onnx", 13, &signing_key());
    // (version, manifest, files, corrupt a chunk, expected words in the detail)
    type Case<'a> = (u64, serde_json::Value, Files, bool, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            9,
            signed(9, &onnx, &other_key),
            file(9, &onnx),
            false,
            "key",
        ),
        (
            10,
            signed(10, &onnx, &signing_key()),
            file(10, &swapped),
            false,
            "sha256",
        ),
        (
            5,
            signed(5, &onnx, &signing_key()),
            file(5, &onnx),
            false,
            "not newer",
        ),
        (
            11,
            signed(11, &onnx, &signing_key()),
            file(11, &onnx),
            true,
            "truncated",
        ),
        (13, narrow_manifest, file(13, &onnx), false, "channels"),
        // A second file the signature does not cover, named to overwrite the staged manifest.
        (
            14,
            signed(14, &onnx, &signing_key()),
            vec![
                ("model-v14.onnx".to_string(), onnx.clone()),
                ("manifest.json".to_string(), b"{}".to_vec()),
            ],
            false,
            "not named by the signed manifest",
        ),
    ];
    for (v, m, files, corrupt, why) in cases {
        dispatch(&obs, m, v, &files, corrupt).await;
        let s = install_state(&mut obs, "rejected", v).await;
        let detail = s["install"]["detail"].as_str().unwrap().to_lowercase();
        assert!(detail.contains(why), "v{v}: {detail}");
        assert_eq!(
            s["model_version"], 8,
            "v{v}: the installed model keeps serving"
        );
    }

    // A model that fails its smoke run (outputs that are not probabilities) is rolled back
    // before it serves.
    let bad = mean_model(spec.channels.len(), spec.window, false);
    dispatch(
        &obs,
        signed(12, &bad, &signing_key()),
        12,
        &file(12, &bad),
        false,
    )
    .await;
    let s = install_state(&mut obs, "rejected", 12).await;
    assert!(
        s["install"]["detail"].as_str().unwrap().contains("smoke"),
        "{s}"
    );
    assert_eq!(served_version(&mut obs, &spec, "b").await, 8);

    // Rollback on command: back to v7.
    obs.publish(
        &format!("diredi/v1/{GW}/command"),
        br#"{"cmd":"rollback"}"#.to_vec(),
    )
    .await;
    install_state(&mut obs, "rolled_back", 7).await;
    assert_eq!(served_version(&mut obs, &spec, "c").await, 7);
    gw.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_installed_update_is_served_again_after_a_restart() {
    if !ort_available() && skip("ONNX Runtime") {
        return;
    }
    let spec = Spec::small();
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_onnx_model(dir.path(), &spec);
    let state = state_dir();
    let onnx = mean_argmax(spec.channels.len(), spec.window);
    for round in 0..2 {
        let port = free_port();
        let mut table = config_table(port, true, Some(&manifest));
        set(
            &mut table,
            "learning",
            "state_dir",
            state.display().to_string(),
        );
        let gw = Running::start(compile(&table), None);
        gw.ready().await;
        let mut obs = Observer::connect(port, &format!("diredi/v1/{GW}/#")).await;
        if round == 0 {
            let m = versioned_manifest(&spec, &onnx, "model-v8.onnx", 8, &signing_key());
            dispatch(&obs, m, 8, &[("model-v8.onnx".into(), onnx.clone())], false).await;
            install_state(&mut obs, "committed", 8).await;
        }
        assert_eq!(
            served_version(&mut obs, &spec, "s").await,
            8,
            "round {round}"
        );
        gw.stop().await.unwrap();
    }
}

/// Transfer faults (issue 6 §2): chunks that arrive out of order and repeated still build the
/// signed model; an oversized file, a chunk longer than announced or a chunk of a file never
/// announced is refused, and the old model keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_out_of_order_duplicated_oversized_or_overlong_are_handled() {
    if !ort_available() && skip("ONNX Runtime") {
        return;
    }
    let spec = Spec::small();
    let (_dir, _state, gw, mut obs) = v7_gateway(&spec).await;
    let model_topic = format!("diredi/v1/{GW}/model");
    let onnx = mean_argmax(spec.channels.len(), spec.window);
    let build = |v: u64| {
        let name = format!("model-v{v}.onnx");
        let m = versioned_manifest(&spec, &onnx, &name, v, &signing_key());
        DispatchMsg::build(m, v, &[(name, onnx.clone())], 64)
    };

    // v8: announced first, then every chunk twice, last chunk first (live, not retained).
    let (msg, chunks) = build(8);
    assert!(chunks[0].len() >= 3, "several chunks");
    obs.publish(&model_topic, serde_json::to_vec(&msg).unwrap())
        .await;
    install_state(&mut obs, "receiving", 8).await;
    for _ in 0..2 {
        for (i, c) in chunks[0].iter().enumerate().rev() {
            obs.publish(&chunk_topic(&model_topic, 8, 0, i), c.clone())
                .await;
        }
    }
    install_state(&mut obs, "committed", 8).await;
    assert_eq!(served_version(&mut obs, &spec, "a").await, 8);

    // v9: a file announced larger than any model may be (64 MiB): refused at announcement.
    let (msg, _) = build(9);
    let mut big = serde_json::to_value(&msg).unwrap();
    big["files"][0]["size"] = serde_json::json!(1u64 << 40);
    obs.publish(&model_topic, serde_json::to_vec(&big).unwrap())
        .await;
    let s = obs
        .next_json("/status", WAIT, |v| v["install"]["state"] == "rejected")
        .await
        .expect("oversized announcement rejected");
    assert!(
        s["install"]["detail"]
            .as_str()
            .unwrap()
            .contains("out of range"),
        "{s}"
    );

    // v10: a chunk with bytes appended (longer than announced), and v11: a chunk of a file the
    // announcement does not have. Each is refused and v8 keeps serving.
    for (v, file, extra) in [(10u64, 0usize, true), (11, 3, false)] {
        let (msg, chunks) = build(v);
        obs.publish(&model_topic, serde_json::to_vec(&msg).unwrap())
            .await;
        install_state(&mut obs, "receiving", v).await;
        let mut c = chunks[0][0].clone();
        if extra {
            c.extend_from_slice(&[0u8; 16]);
        }
        obs.publish(&chunk_topic(&model_topic, v, file, 0), c).await;
        let s = install_state(&mut obs, "rejected", v).await;
        assert_eq!(s["model_version"], 8, "v{v}: {s}");
    }
    assert_eq!(served_version(&mut obs, &spec, "b").await, 8);
    gw.stop().await.unwrap();
}
