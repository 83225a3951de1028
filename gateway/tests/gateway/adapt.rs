//! Local adaptation with the shipped model on real HAPT windows: it runs at a lower CPU
//! priority than inference, `cancel_adapt` stops it, and the installed model keeps serving.

use std::time::{Duration, Instant};

use diredi_protocol::sensor::encode_json;

use super::support::*;

const T0: i64 = 1_700_000_000_000;

/// With `adapt_nice = 12`: the `adapt` thread and its training pool run at nice 12 while the
/// inference threads do not; `cancel_adapt` stops a long adaptation within
/// seconds, reports `cancelled`, queues no knowledge, and windows keep being classified. A
/// `cancel_adapt` with nothing running is a bad command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptation_runs_at_low_priority_and_cancel_adapt_stops_it() {
    let Some(shipped) = shipped_model() else {
        return;
    };
    let input = &shipped.signed["input"];
    let window = input["window"].as_u64().unwrap() as usize;
    let stride = input["stride"].as_u64().unwrap() as usize;
    let period = (1000.0 / input["sample_rate_hz"].as_f64().unwrap()) as i64;
    let class = shipped.signed["classes"][0].as_str().unwrap().to_owned();
    let c = shipped.channels.len();
    // Rows up to the end of window k (counted from 1); the stream goes out in three parts.
    let upto = |k: usize| window + stride * (k - 1);
    let Some(data) = hapt_rows(&shipped.channels, upto(24)) else {
        return;
    };

    let port = free_port();
    let mut table = config_table(port, true, Some(&shipped.manifest));
    set(&mut table, "learning", "adapt_nice", 12);
    // Far longer than the test: only a cancellation ends it.
    let mut adapt = toml::Table::new();
    adapt.insert("epochs".into(), 1_000_000.into());
    set(&mut table, "learning", "adapt", adapt);
    let gw = Running::start(compile(&table), None);
    gw.ready().await;
    let mut obs = Observer::connect(port, &format!("diredi/v1/{GW}/#")).await;
    // Rows `from..to` as JSON messages of 32 rows each.
    let rows = |from: usize, to: usize| {
        (from..to)
            .step_by(32)
            .map(|k| {
                let end = (k + 32).min(to);
                encode_json(Some(T0 + k as i64 * period), &data[k * c..end * c], c)
            })
            .collect::<Vec<_>>()
    };
    for m in rows(0, upto(8)) {
        obs.sensor("hapt", m).await;
    }
    let first = obs.collect("/inference/hapt", 8, WAIT).await;
    assert_eq!(first.len(), 8);

    let command = format!("diredi/v1/{GW}/command");
    obs.publish(&command, br#"{"cmd":"cancel_adapt"}"#.to_vec())
        .await;
    let e = obs
        .next_json("/error", WAIT, |v| v["kind"] == "bad_command")
        .await
        .expect("cancel_adapt with no adaptation running is reported");
    assert!(
        e["reason"].as_str().unwrap().contains("no adaptation"),
        "{e}"
    );

    for m in &first {
        let id = m.json()["window_id"].as_str().unwrap().to_owned();
        let label = serde_json::json!({"window_id": id, "class": class});
        obs.publish(
            &format!("diredi/v1/{GW}/label/hapt"),
            label.to_string().into_bytes(),
        )
        .await;
    }
    obs.next_json("/metrics", WAIT, |v| {
        v["labelled_windows"].as_u64() == Some(first.len() as u64)
    })
    .await
    .expect("the labelled windows are stored");

    obs.publish(&command, br#"{"cmd":"adapt"}"#.to_vec()).await;
    // The adapt thread and its pool appear, niced; the inference threads are not.
    let deadline = Instant::now() + WAIT;
    let (adapt, pool) = loop {
        let (adapt, pool) = (thread_nices("adapt", "\0"), thread_nices("\0", "adapt-"));
        if (adapt.contains(&12) && pool.contains(&12)) || Instant::now() > deadline {
            break (adapt, pool);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(adapt.contains(&12), "adapt thread nice values {adapt:?}");
    assert!(pool.contains(&12), "adapt pool nice values {pool:?}");
    let inference = thread_nices("\0", "inference-");
    assert!(
        !inference.is_empty() && !inference.contains(&12),
        "inference thread nice values {inference:?}"
    );

    // Still serving while it adapts.
    for m in rows(upto(8), upto(16)) {
        obs.sensor("hapt", m).await;
    }
    let during = obs.collect("/inference/hapt", 8, WAIT).await;
    assert_eq!(during.len(), 8, "inference goes on during the adaptation");

    let cancelled_at = Instant::now();
    obs.publish(&command, br#"{"cmd":"cancel_adapt"}"#.to_vec())
        .await;
    let a = obs
        .next_json("/adaptation", WAIT, |_| true)
        .await
        .expect("the adaptation reports its end");
    assert_eq!(a["state"], "cancelled", "{a}");
    assert!(
        cancelled_at.elapsed() < WAIT,
        "cancelled after {:?}",
        cancelled_at.elapsed()
    );
    let m = obs
        .next_json("/metrics", WAIT, |v| v["adaptations_cancelled"] == 1)
        .await
        .expect("counted in the metrics");
    // No knowledge from a cancelled adaptation.
    for key in [
        "adaptations",
        "adaptations_failed",
        "outbox_pending",
        "knowledge_sent",
    ] {
        assert_eq!(m[key], 0, "{key} in {m}");
    }

    // Served after it, too; a new adaptation can start (and be cancelled again).
    for m in rows(upto(16), upto(24)) {
        obs.sensor("hapt", m).await;
    }
    let after = obs.collect("/inference/hapt", 8, WAIT).await;
    assert_eq!(after.len(), 8, "inference goes on after the cancellation");
    obs.publish(&command, br#"{"cmd":"adapt"}"#.to_vec()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    obs.publish(&command, br#"{"cmd":"cancel_adapt"}"#.to_vec())
        .await;
    let a = obs
        .next_json("/adaptation", WAIT, |_| true)
        .await
        .expect("the second adaptation ends too");
    assert_eq!(a["state"], "cancelled", "{a}");
    gw.stop().await.unwrap();
}
