//! TLS, mutual TLS and access control with the configurations shipped in `broker-config/` and
//! certificates made by `scripts/make-test-ca.sh`:
//!
//! - Mosquitto with `broker-config/mosquitto/diredi.conf` and its `acl`: a client without a
//!   certificate of the CA cannot connect; a gateway cannot publish outside its own prefix, nor
//!   read another gateway's topics or anyone's knowledge; the cloud worker reads knowledge
//!   through its shared subscription; the gateway serves over mutual TLS.
//! - The embedded rumqttd with `broker-config/rumqttd-tls.toml`: only clients with a
//!   certificate connect, and the gateway serves through its own TLS listener.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use diredi_mqtt::Tls;
use diredi_protocol::sensor::encode_json;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet};

use super::support::*;

const T0: i64 = 1_700_000_000_000;
const OTHER_GW: &str = "gw-other";
const WORKER: &str = "diredi-cloud-worker";
const MONITOR: &str = "diredi-monitor";
/// A sensor of [`GW`] publishing on the fleet broker, with its own ACL block.
const SENSOR: &str = "sensor-gw-test";

/// A CA and certificates for `clients`, made by the project's script, in a fresh folder.
fn make_ca(clients: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(repo_root().join("scripts/make-test-ca.sh"))
        .arg(dir.path())
        .args(clients)
        .output()
        .expect("scripts/make-test-ca.sh runs (needs openssl)");
    assert!(
        out.status.success(),
        "make-test-ca: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// TLS towards a broker of the CA in `ca`, as `who` (mutual TLS) or without a certificate.
fn tls(ca: &Path, who: Option<&str>) -> Tls {
    Tls::new(
        ca.join("ca.pem"),
        who.map(|w| ca.join(format!("{w}.pem"))),
        who.map(|w| ca.join(format!("{w}.key"))),
    )
}

fn options(port: u16, tls: &Tls) -> MqttOptions {
    let mut o = observer_options(port);
    tls.apply(&mut o).unwrap();
    o
}

/// Whether a client with `opts` gets a CONNACK that accepts it (one attempt, 5 s).
async fn accepted(opts: MqttOptions) -> bool {
    let (_client, mut el) = AsyncClient::new(opts, 10);
    let first = tokio::time::timeout(Duration::from_secs(5), el.poll()).await;
    matches!(first, Ok(Ok(Event::Incoming(Packet::ConnAck(ref a)))) if a.code == rumqttc::ConnectReturnCode::Success)
}

/// Plain TCP, TLS without a client certificate, and a certificate of the CA in `rogue` are
/// all refused by the broker on `port` (whose CA is in `ca`).
async fn refuses_strangers(port: u16, ca: &Path, rogue: &Path) {
    assert!(!accepted(observer_options(port)).await, "plain TCP refused");
    assert!(
        !accepted(options(port, &tls(ca, None))).await,
        "TLS without a client certificate refused"
    );
    let mut rogue_tls = tls(rogue, Some(GW));
    rogue_tls.ca_file = Some(ca.join("ca.pem"));
    assert!(
        !accepted(options(port, &rogue_tls)).await,
        "a certificate of another CA refused"
    );
}

/// The result of one QoS 1 publish over MQTT 5 (Mosquitto answers a refused one with
/// "not authorized" in the PUBACK; MQTT 3.1.1 has no way to say so and drops it silently).
async fn v5_publish(port: u16, tls: &Tls, topic: &str) -> rumqttc::v5::mqttbytes::v5::PubAckReason {
    use rumqttc::v5::mqttbytes::v5::Packet as P5;
    use rumqttc::v5::{AsyncClient as C5, Event as E5, MqttOptions as O5};
    let mut o = O5::new(format!("v5-{}", free_port()), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    if let Some(config) = tls.client_config().unwrap() {
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(std::sync::Arc::new(config)),
        ));
    }
    let (client, mut el) = C5::new(o, 10);
    client
        .publish(
            topic,
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            b"x".to_vec(),
        )
        .await
        .unwrap();
    let ack = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(E5::Incoming(P5::PubAck(a))) = el.poll().await {
                return a.reason;
            }
        }
    })
    .await
    .expect("a PUBACK");
    let _ = client.disconnect().await;
    ack
}

/// The shipped Mosquitto configuration with its paths in `ca` and its listener on `port`.
fn mosquitto_conf(ca: &Path, port: u16) -> String {
    let root = repo_root().join("broker-config/mosquitto");
    // The shipped ACL, plus the block the ACL's comment says a sensor of the fleet broker gets.
    let acl = std::fs::read_to_string(root.join("acl")).unwrap();
    std::fs::write(
        ca.join("acl"),
        format!("{acl}\nuser {SENSOR}\ntopic write diredi/v1/{GW}/sensor/#\n"),
    )
    .unwrap();
    let text = std::fs::read_to_string(root.join("diredi.conf")).unwrap();
    assert!(
        text.contains("\nlistener 8883\n"),
        "the shipped listener line"
    );
    let mut conf = text
        .replace("/etc/mosquitto/diredi/", &format!("{}/", ca.display()))
        .replace(
            "\nlistener 8883\n",
            &format!("\nlistener {port} 127.0.0.1\n"),
        );
    // Run as whoever runs the tests (as root, Mosquitto would switch to the user mosquitto,
    // who cannot read the test keys).
    conf.push_str("user root\npersistence false\n");
    conf
}

/// Gateway configuration on `port` over TLS as [`GW`], with the fake model.
fn gateway_table(port: u16, embedded: bool, ca: &Path) -> toml::Table {
    let mut t = config_table(port, embedded, None);
    t.remove("learning");
    let file = |f: &str| ca.join(f).display().to_string();
    set(&mut t, "mqtt", "ca_file", file("ca.pem"));
    set(&mut t, "mqtt", "cert_file", file(&format!("{GW}.pem")));
    set(&mut t, "mqtt", "key_file", file(&format!("{GW}.key")));
    t
}

/// A window's worth of samples from `sensor` (sent with the certificate of `sender`) is served:
/// its inference reaches a reader with the certificate of `reader`.
async fn serves(port: u16, ca: &Path, sensor: &str, sender: &str, reader: &str) {
    let spec = Spec::small();
    let mut obs = Observer::connect_with(
        options(port, &tls(ca, Some(reader))),
        &format!("diredi/v1/{GW}/inference/#"),
    )
    .await;
    let sender = Observer::connect_with(
        options(port, &tls(ca, Some(sender))),
        &format!("diredi/v1/{GW}/command"),
    )
    .await;
    let c = spec.channels.len();
    sender
        .sensor(
            sensor,
            encode_json(Some(T0), &rows(0, spec.window, &spec), c),
        )
        .await;
    let got = obs.collect(&format!("/inference/{sensor}"), 1, WAIT).await;
    assert_eq!(got.len(), 1, "inference for {sensor} over TLS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_with_the_shipped_tls_and_acls_admits_only_certified_clients_in_their_lane() {
    let ca = make_ca(&[GW, OTHER_GW, WORKER, MONITOR, SENSOR]);
    let rogue = make_ca(&[GW]);
    let ca_dir = ca.path();
    let port = free_port();
    let _broker = Mosquitto::start_conf(port, &mosquitto_conf(ca_dir, port));

    // Who may connect: only clients with a certificate of this CA.
    refuses_strangers(port, ca_dir, rogue.path()).await;
    assert!(accepted(options(port, &tls(ca_dir, Some(GW)))).await);

    // Reading: the worker gets knowledge through its shared subscription; a gateway and the
    // monitor subscribed to knowledge get none, and a gateway nothing of another gateway.
    let mut worker = Observer::connect_with(
        options(port, &tls(ca_dir, Some(WORKER))),
        "$share/workers/diredi/v1/+/knowledge",
    )
    .await;
    let mut snoop_all = Observer::connect_with(
        options(port, &tls(ca_dir, Some(GW))),
        "diredi/v1/+/knowledge",
    )
    .await;
    let mut snoop_other = Observer::connect_with(
        options(port, &tls(ca_dir, Some(GW))),
        &format!("diredi/v1/{OTHER_GW}/#"),
    )
    .await;
    let mut monitor =
        Observer::connect_with(options(port, &tls(ca_dir, Some(MONITOR))), "diredi/v1/#").await;
    let other = Observer::connect_with(
        options(port, &tls(ca_dir, Some(OTHER_GW))),
        &format!("diredi/v1/{OTHER_GW}/command"),
    )
    .await;
    other
        .publish(
            &format!("diredi/v1/{OTHER_GW}/knowledge"),
            b"package".to_vec(),
        )
        .await;
    other
        .publish(&format!("diredi/v1/{OTHER_GW}/status"), b"{}".to_vec())
        .await;
    let got = worker.next_on("/knowledge", WAIT).await;
    assert_eq!(got.map(|m| m.payload), Some(b"package".to_vec()));
    // The monitor's first message is the status, published after the knowledge: it proves
    // both went through the broker before we look.
    let first = monitor.next_on("", WAIT).await.unwrap();
    assert_eq!(first.topic, format!("diredi/v1/{OTHER_GW}/status"));
    let ms = Duration::from_millis;
    snoop_all
        .assert_silent("", ms(500), "a gateway reads no knowledge")
        .await;
    snoop_other
        .assert_silent("", ms(200), "a gateway reads nothing of another gateway")
        .await;
    monitor
        .assert_silent("/knowledge", ms(200), "monitoring reads no knowledge")
        .await;

    // Writing: a gateway only under its own prefix; the worker writes models.
    use rumqttc::v5::mqttbytes::v5::PubAckReason;
    let gw_tls = tls(ca_dir, Some(GW));
    for topic in [
        format!("diredi/v1/{OTHER_GW}/status"),
        format!("diredi/v1/{OTHER_GW}/model"),
        format!("diredi/v1/{GW}/model"),
        format!("diredi/v1/{GW}/knowledge/ack"),
        format!("diredi/v1/{GW}/sensor/x"),
        "diredi/v1/fleet/model".to_string(),
        "elsewhere".to_string(),
    ] {
        assert_eq!(
            v5_publish(port, &gw_tls, &topic).await,
            PubAckReason::NotAuthorized,
            "{GW} publishing on {topic}"
        );
    }
    assert_eq!(
        v5_publish(port, &gw_tls, &format!("diredi/v1/{GW}/status")).await,
        PubAckReason::Success
    );
    let worker_tls = tls(ca_dir, Some(WORKER));
    assert_eq!(
        v5_publish(port, &worker_tls, &format!("diredi/v1/{OTHER_GW}/model")).await,
        PubAckReason::Success
    );
    assert_eq!(
        v5_publish(port, &worker_tls, &format!("diredi/v1/{OTHER_GW}/command")).await,
        PubAckReason::NotAuthorized
    );
    // None of the refused publishes reached a reader.
    let seen: Vec<String> = std::iter::from_fn(|| monitor.try_next().map(|m| m.topic)).collect();
    assert!(
        seen.iter().all(|t| t == &format!("diredi/v1/{GW}/status")),
        "{seen:?}"
    );
    drop(other);

    // The gateway itself over mutual TLS: it serves, and its status is readable by monitoring.
    let gw = Running::start(
        compile(&gateway_table(port, false, ca_dir)),
        Some(fake_model(&Spec::small())),
    );
    gw.ready().await;
    serves(port, ca_dir, "imu-0", SENSOR, MONITOR).await;
    gw.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_with_mutual_tls_admits_only_certified_clients() {
    let ca = make_ca(&[GW]);
    let rogue = make_ca(&[GW]);
    let ca_dir = ca.path();
    let shipped =
        std::fs::read_to_string(repo_root().join("broker-config/rumqttd-tls.toml")).unwrap();
    assert!(shipped.contains("/etc/diredi/tls/"));
    let conf: PathBuf = ca_dir.join("rumqttd.toml");
    std::fs::write(
        &conf,
        shipped.replace("/etc/diredi/tls/", &format!("{}/", ca_dir.display())),
    )
    .unwrap();
    let port = free_port();
    let mut table = gateway_table(port, true, ca_dir);
    set(&mut table, "broker", "config", conf.display().to_string());
    let gw = Running::start(compile(&table), Some(fake_model(&Spec::small())));
    gw.ready().await;

    refuses_strangers(port, ca_dir, rogue.path()).await;
    serves(port, ca_dir, "imu-1", GW, GW).await;

    // A TLS listener whose files are missing is refused at start, not left half-working.
    let mut broken = table.clone();
    let missing = ca_dir.join("missing.toml");
    std::fs::write(&missing, shipped).unwrap();
    set(
        &mut broken,
        "broker",
        "config",
        missing.display().to_string(),
    );
    let err = diredi_gateway::broker::load_config(&compile(&broken).broker.unwrap()).unwrap_err();
    assert!(err.to_string().contains("capath"), "{err}");
    gw.stop().await.unwrap();
}
