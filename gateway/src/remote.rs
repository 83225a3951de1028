//! `diredi-gateway label | adapt | rollback`: the user's commands, sent over MQTT to the gateway
//! a configuration describes (its broker, its id), as any other client would send them.
//!
//! Data flow: CLI → **publish** (QoS 1, acknowledged) → `label/{sensor}` or `command` → the
//! running gateway. Nothing here touches the gateway's state directly, so the CLI works the
//! same against a local or a remote gateway.

use std::time::Duration;

use diredi_protocol::messages::{CommandMsg, LabelMsg};
use rumqttc::{Event, MqttOptions, Outgoing, Packet, QoS};

use crate::config::Config;

/// Why a command could not be delivered.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The broker did not take the message in time.
    #[error("the broker at {broker} did not acknowledge the message within {secs} s: {detail}")]
    Delivery {
        /// `host:port`.
        broker: String,
        /// Timeout.
        secs: u64,
        /// Last connection error, if any.
        detail: String,
    },
    /// The message is not valid.
    #[error("{0}")]
    Invalid(String),
}

const TIMEOUT: Duration = Duration::from_secs(10);

/// Publishes `payload` on `topic` with QoS 1 and waits for the broker's acknowledgement.
pub async fn publish(cfg: &Config, topic: String, payload: Vec<u8>) -> Result<(), RemoteError> {
    let m = &cfg.mqtt;
    let mut o = MqttOptions::new(
        format!("diredi-gateway-cli-{}", std::process::id()),
        &m.host,
        m.port,
    );
    o.set_keep_alive(Duration::from_secs(10));
    o.set_max_packet_size(m.max_packet_bytes, m.max_packet_bytes);
    if let Some((u, p)) = &m.credentials {
        o.set_credentials(u, p);
    }
    m.tls
        .apply(&mut o)
        .map_err(|e| RemoteError::Invalid(format!("TLS: {e}")))?;
    let (client, mut events) = diredi_mqtt::client(o, 8);
    let broker = format!("{}:{}", m.host, m.port);
    client
        .publish(topic, QoS::AtLeastOnce, false, payload)
        .await
        .map_err(|e| RemoteError::Invalid(e.to_string()))?;
    let mut detail = String::from("no answer");
    let acked = tokio::time::timeout(TIMEOUT, async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return true,
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return false,
                Ok(_) => {}
                Err(e) => {
                    detail = e.to_string();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    })
    .await
    .unwrap_or(false);
    if !acked {
        return Err(RemoteError::Delivery {
            broker,
            secs: TIMEOUT.as_secs(),
            detail,
        });
    }
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), events.poll()).await;
    Ok(())
}

/// Sends a label for `sensor`.
pub async fn label(cfg: &Config, sensor: &str, label: &LabelMsg) -> Result<(), RemoteError> {
    diredi_protocol::validate_id(sensor)
        .map_err(|e| RemoteError::Invalid(format!("sensor id {sensor:?}: {e}")))?;
    let body = serde_json::to_vec(label).map_err(|e| RemoteError::Invalid(e.to_string()))?;
    publish(cfg, cfg.topics.label(sensor), body).await
}

/// Sends a command.
pub async fn command(cfg: &Config, cmd: &CommandMsg) -> Result<(), RemoteError> {
    let body = serde_json::to_vec(cmd).map_err(|e| RemoteError::Invalid(e.to_string()))?;
    publish(cfg, cfg.topics.command(), body).await
}
