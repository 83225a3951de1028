//! The knowledge outbox survives gateway restarts and broker outages: a package is published
//! until the cloud acknowledges it, and never again after.

use std::time::Duration;

use diredi_gateway::outbox::{Outbox, Pushed};

use super::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn knowledge_is_resent_across_gateway_and_broker_restarts_until_acknowledged() {
    let spec = Spec::small();
    let state = state_dir();
    let knowledge = format!("diredi/v1/{GW}/knowledge");
    {
        // A package an earlier run queued but could not deliver.
        let o = Outbox::open(&state.join("outbox.redb"), 4).unwrap();
        assert_eq!(
            o.push("pkg-1", &knowledge, b"\x00knowledge\xff").unwrap(),
            Pushed::Queued
        );
    }
    let port = free_port();
    let table = {
        let mut t = config_table(port, false, None);
        set(&mut t, "learning", "state_dir", state.display().to_string());
        set(&mut t, "learning", "knowledge_retry_s", 0.3);
        t
    };
    let broker = Mosquitto::start_on(port);

    // Gateway restart: the package comes out of both runs.
    for run in 0..2 {
        let gw = Running::start(compile(&table), Some(fake_model(&spec)));
        gw.ready().await;
        let mut obs = Observer::connect(port, &knowledge).await;
        let m = obs.next_on("/knowledge", WAIT).await;
        assert_eq!(
            m.map(|m| m.payload),
            Some(b"\x00knowledge\xff".to_vec()),
            "run {run}"
        );
        gw.stop().await.unwrap();
    }

    // Broker restart: the gateway reconnects and sends it again.
    let gw = Running::start(compile(&table), Some(fake_model(&spec)));
    gw.ready().await;
    drop(broker);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _broker = Mosquitto::start_on(port);
    let mut obs = Observer::connect(port, &format!("diredi/v1/{GW}/#")).await;
    assert!(
        obs.next_on("/knowledge", WAIT).await.is_some(),
        "resent after the outage"
    );

    // The receipt ends it: no more publications, and the next run has nothing to send.
    obs.publish(
        &format!("diredi/v1/{GW}/knowledge/ack"),
        br#"{"package_id":"pkg-1","accepted":true}"#.to_vec(),
    )
    .await;
    obs.next_json("/metrics", WAIT, |v| {
        v["knowledge_acked"] == 1 && v["outbox_pending"] == 0
    })
    .await
    .expect("acknowledged in the metrics");
    let late = obs.next_on("/knowledge", Duration::from_millis(1200)).await;
    assert!(late.is_none(), "not sent after its receipt");
    gw.stop().await.unwrap();
    let o = Outbox::open(&state.join("outbox.redb"), 4).unwrap();
    assert!(o.is_empty().unwrap());
    assert_eq!(
        o.push("pkg-1", &knowledge, b"again").unwrap(),
        Pushed::Duplicate
    );
}

/// With an `[uplink]`, the knowledge goes to the cloud's broker and its receipt comes from
/// there; the local broker carries neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_uplink_knowledge_and_receipts_travel_on_the_cloud_broker() {
    let spec = Spec::small();
    let state = state_dir();
    let knowledge = format!("diredi/v1/{GW}/knowledge");
    {
        let o = Outbox::open(&state.join("outbox.redb"), 4).unwrap();
        assert_eq!(
            o.push("pkg-up", &knowledge, b"\x01uplinked\xfe").unwrap(),
            Pushed::Queued
        );
    }
    let (local_port, cloud_port) = (free_port(), free_port());
    let _cloud = Mosquitto::start_on(cloud_port);
    let mut table = config_table(local_port, true, None);
    set(
        &mut table,
        "learning",
        "state_dir",
        state.display().to_string(),
    );
    set(&mut table, "learning", "knowledge_retry_s", 0.3);
    set(&mut table, "uplink", "enabled", true);
    set(&mut table, "uplink", "host", "127.0.0.1");
    set(&mut table, "uplink", "port", i64::from(cloud_port));
    let gw = Running::start(compile(&table), Some(fake_model(&spec)));
    gw.ready().await;
    let mut local = Observer::connect(local_port, &format!("diredi/v1/{GW}/#")).await;
    let mut cloud = Observer::connect(cloud_port, &format!("diredi/v1/{GW}/#")).await;
    let m = cloud.next_on("/knowledge", WAIT).await;
    assert_eq!(
        m.map(|m| m.payload),
        Some(b"\x01uplinked\xfe".to_vec()),
        "the package reaches the cloud broker"
    );
    // A receipt on the local broker is not the cloud's: it changes nothing.
    local
        .publish(
            &format!("diredi/v1/{GW}/knowledge/ack"),
            br#"{"package_id":"pkg-up","accepted":true}"#.to_vec(),
        )
        .await;
    assert!(
        cloud.next_on("/knowledge", WAIT).await.is_some(),
        "still resent after a local receipt"
    );
    cloud
        .publish(
            &format!("diredi/v1/{GW}/knowledge/ack"),
            br#"{"package_id":"pkg-up","accepted":true}"#.to_vec(),
        )
        .await;
    local
        .next_json("/metrics", WAIT, |v| {
            v["knowledge_acked"] == 1 && v["outbox_pending"] == 0
        })
        .await
        .expect("the cloud's receipt acknowledged it");
    let on_local: Vec<_> = local
        .collect("/knowledge", 1, Duration::from_millis(800))
        .await;
    assert!(on_local.is_empty(), "no knowledge on the local broker");
    gw.stop().await.unwrap();
}

/// A cloud worker that takes a package (a receipt with a lease) and dies before its final
/// receipt: the gateway holds the package back during the lease, then sends it again, and
/// another worker of the shared subscription takes it and ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_package_whose_worker_died_goes_to_another_worker_when_the_lease_ends() {
    let spec = Spec::small();
    let state = state_dir();
    let knowledge = format!("diredi/v1/{GW}/knowledge");
    let ack_topic = format!("diredi/v1/{GW}/knowledge/ack");
    Outbox::open(&state.join("outbox.redb"), 4)
        .unwrap()
        .push("pkg-2", &knowledge, b"package")
        .unwrap();
    let port = free_port();
    let mut table = config_table(port, false, None);
    set(
        &mut table,
        "learning",
        "state_dir",
        state.display().to_string(),
    );
    set(&mut table, "learning", "knowledge_retry_s", 0.5);
    let _broker = Mosquitto::start_on(port);
    let shared = "$share/workers/diredi/v1/+/knowledge";

    let mut first = Observer::connect(port, shared).await;
    let gw = Running::start(compile(&table), Some(fake_model(&spec)));
    gw.ready().await;
    assert!(first.next_on("/knowledge", WAIT).await.is_some());
    first
        .publish(
            &ack_topic,
            br#"{"package_id":"pkg-2","accepted":true,"detail":"updating","lease_s":3}"#.to_vec(),
        )
        .await;
    let leased = std::time::Instant::now();
    // Give the receipt time to leave (publish only queues it), then die mid-update.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(first);

    let mut second = Observer::connect(port, shared).await;
    let mut metrics = Observer::connect(port, &format!("diredi/v1/{GW}/metrics")).await;
    let again = second.next_on("/knowledge", WAIT).await;
    let after = leased.elapsed();
    assert!(again.is_some(), "sent again after the lease");
    assert!(
        after >= Duration::from_millis(2500),
        "held back during the 3 s lease, sent again after {after:?}"
    );
    second
        .publish(
            &ack_topic,
            br#"{"package_id":"pkg-2","accepted":true,"detail":"dispatched v2"}"#.to_vec(),
        )
        .await;
    metrics
        .next_json("/metrics", WAIT, |v| {
            v["knowledge_acked"] == 1 && v["outbox_pending"] == 0
        })
        .await
        .expect("the final receipt ends it");
    second
        .assert_silent(
            "/knowledge",
            Duration::from_millis(1500),
            "not sent after the final receipt",
        )
        .await;
    gw.stop().await.unwrap();
}
