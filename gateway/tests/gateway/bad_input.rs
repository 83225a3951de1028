//! Bad input never crashes the gateway: every kind is reported on the error topic and counted
//! in the metrics while a good sensor keeps getting results.

use std::time::Duration;

use diredi_protocol::sensor::{encode_binary, encode_json};

use super::support::*;

const T0: i64 = 1_700_000_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_is_reported_while_a_good_sensor_keeps_being_served() {
    let spec = Spec::small();
    let c = spec.channels.len();
    let port = free_port();
    let mut table = config_table(port, true, None);
    set(&mut table, "pipeline", "max_sensors", 2);
    set(&mut table, "pipeline", "max_payload_bytes", 2048);
    let gw = Running::start(compile(&table), Some(fake_model(&spec)));
    gw.ready().await;
    let mut obs = Observer::connect(port, &format!("diredi/v1/{GW}/#")).await;

    let mut nan = rows(0, 2, &spec);
    nan[4] = f32::NAN;
    let bad: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "bad-json",
            br#"{"values": [[1, 2, 3], "#.to_vec(),
            "malformed_json",
        ),
        (
            "bad-count",
            br#"{"values": [[1, 2]]}"#.to_vec(),
            "channel_count",
        ),
        ("bad-nan", encode_binary(None, &nan, c), "non_finite"),
        (
            "bad-big",
            encode_json(None, &vec![1.0; 3 * 200], c),
            "too_large",
        ),
        (
            "bad-garbage",
            vec![0xde, 0xad, 0xbe, 0xef, 0x00, 0xff],
            "unknown_format",
        ),
        ("bad-header", b"DRB1\x03\x00\x00".to_vec(), "bad_binary"),
        ("second", encode_json(None, &rows(0, 1, &spec), c), ""),
        (
            "third",
            encode_json(None, &rows(0, 1, &spec), c),
            "too_many_sensors",
        ),
    ];
    let long_id = "x".repeat(65);

    // The good sensor sends one window (8 samples) before each bad message.
    let mut good_sent = 0;
    for (sensor, payload, _) in &bad {
        let ts = T0 + good_sent as i64 * 20;
        obs.sensor("good", encode_json(Some(ts), &rows(good_sent, 8, &spec), c))
            .await;
        good_sent += 8;
        obs.sensor(sensor, payload.clone()).await;
    }
    obs.sensor(&long_id, b"{}".to_vec()).await;
    obs.sensor(
        "good",
        encode_json(
            Some(T0 + good_sent as i64 * 20),
            &rows(good_sent, 8, &spec),
            c,
        ),
    )
    .await;

    let mut expected: Vec<&str> = bad.iter().map(|b| b.2).filter(|k| !k.is_empty()).collect();
    expected.push("invalid_sensor_id");
    // The good sensor: windows at samples 8, 12, ..., (8 messages + 1) × 8 samples. Its
    // results and the error messages interleave: keep both while waiting for either.
    let want = (good_sent + 8 - 8) / 4 + 1;
    let mut good = Vec::new();
    let mut seen = Vec::new();
    while seen.len() < expected.len() || good.len() < want {
        let m = obs.next_on("", WAIT).await.unwrap_or_else(|| {
            panic!(
                "missing messages; errors {seen:?} of {expected:?}, good results {} of {want}",
                good.len()
            )
        });
        if m.topic.ends_with("/inference/good") {
            good.push(m);
            continue;
        }
        if !m.topic.ends_with("/error") {
            continue;
        }
        let v = m.json();
        assert!(v["reason"].as_str().is_some_and(|r| r.len() > 10), "{v}");
        assert!(v["ts"].as_i64().unwrap() > T0);
        let kind = v["kind"].as_str().unwrap().to_owned();
        let sensor = v["sensor"].as_str().unwrap().to_owned();
        assert_eq!(v["topic"], format!("diredi/v1/{GW}/sensor/{sensor}"));
        if let Some((name, _, _)) = bad.iter().find(|b| b.2 == kind) {
            assert_eq!(&sensor, name, "{kind}");
        } else {
            assert_eq!(
                (kind.as_str(), sensor.as_str()),
                ("invalid_sensor_id", long_id.as_str())
            );
        }
        seen.push(kind);
    }
    seen.sort();
    expected.sort();
    assert_eq!(seen, expected);

    assert_eq!(good.len(), want, "good sensor served throughout");
    let m = obs
        .next_json("/metrics", WAIT, |v| {
            v["inputs_rejected"] == expected.len() as u64
        })
        .await
        .expect("metrics count every rejection");
    for kind in &expected {
        assert_eq!(m["rejected_by_reason"][kind], 1, "{kind} in {m}");
    }
    assert_eq!(m["sensors"], 2);
    gw.stop().await.expect("gateway still healthy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_messages_are_rate_limited_per_sensor_and_suppressions_counted() {
    let spec = Spec::small();
    let port = free_port();
    let gw = Running::start(
        compile(&config_table(port, true, None)),
        Some(fake_model(&spec)),
    );
    gw.ready().await;
    let mut obs = Observer::connect(port, &format!("diredi/v1/{GW}/#")).await;
    for _ in 0..20 {
        obs.sensor("noisy", b"nonsense".to_vec()).await;
    }
    obs.sensor("other", b"nonsense".to_vec()).await;
    let mut errors = Vec::new();
    let metrics = loop {
        let m = obs
            .next_on("", WAIT)
            .await
            .expect("metrics count all 21 rejections");
        if m.topic.ends_with("/error") {
            errors.push(m.json());
        } else if m.topic.ends_with("/metrics") && m.json()["inputs_rejected"] == 21 {
            break m.json();
        }
    };
    // An error counted just before the snapshot may be published just after it.
    for m in obs.collect("/error", 21, Duration::from_millis(300)).await {
        errors.push(m.json());
    }
    let from = |s: &str| errors.iter().filter(|e| e["sensor"] == s).count();
    // 20 errors sent within well under two seconds: one per one-second window gets through.
    assert!((1..=2).contains(&from("noisy")), "{errors:?}");
    assert_eq!(from("other"), 1, "another sensor has its own budget");
    assert_eq!(
        metrics["errors_suppressed"].as_u64().unwrap(),
        21 - errors.len() as u64
    );
    assert_eq!(metrics["rejected_by_reason"]["unknown_format"], 21);
    gw.stop().await.unwrap();
}
