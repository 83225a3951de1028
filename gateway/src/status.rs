//! The retained status message and what is announced on every (re)connection.
//!
//! Where it stands: beside the data flow. On each CONNACK a link publishes its
//! [`announcements`] (the retained `online` [`StatusMsg`] first); the `offline` status is
//! registered as the MQTT last will, so a crash or power loss flips the retained status to
//! `offline`, and a clean shutdown publishes it explicitly before disconnecting.

use diredi_protocol::messages::{GatewayState, StatusMsg};
use rumqttc::QoS;

use crate::model::LoadedModel;

/// Version of this gateway build.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutMessage {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// QoS.
    pub qos: QoS,
    /// Retain flag.
    pub retain: bool,
}

/// Facts about this gateway process that go into every status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Gateway id.
    pub gateway_id: String,
    /// Unix ms of process start.
    pub started_at: i64,
}

/// The status message for `state` with `model` active (if any).
pub fn status(identity: &Identity, state: GatewayState, model: Option<&LoadedModel>) -> StatusMsg {
    StatusMsg {
        state,
        gateway_id: identity.gateway_id.clone(),
        model_id: model.map(|m| m.spec().model_id.clone()),
        model_version: model.map(|m| m.spec().version),
        execution_provider: model.map(|m| m.execution_provider().to_owned()),
        version: VERSION.to_owned(),
        started_at: identity.started_at,
        install: None,
        model_adapted_locally: model.is_some_and(|m| m.spec().adapted_locally),
    }
}

/// The status as a retained QoS 1 message on `topic`.
pub fn status_message(
    topic: &str,
    identity: &Identity,
    state: GatewayState,
    model: Option<&LoadedModel>,
) -> OutMessage {
    OutMessage {
        topic: topic.to_owned(),
        payload: serde_json::to_vec(&status(identity, state, model)).unwrap_or_default(),
        qos: QoS::AtLeastOnce,
        retain: true,
    }
}

/// Home Assistant discovery settings for [`announcements`].
#[derive(Debug, Clone, Copy)]
pub struct Discovery<'a> {
    /// Discovery prefix.
    pub prefix: &'a str,
    /// Sensors known so far.
    pub sensors: &'a [String],
}

/// What a link publishes after each connection: the `online` status, then the Home Assistant
/// discovery configs of the gateway and its known sensors when discovery is on.
pub fn announcements(
    status_topic: &str,
    identity: &Identity,
    model: &LoadedModel,
    discovery: Option<Discovery<'_>>,
) -> Vec<OutMessage> {
    let mut out = vec![status_message(
        status_topic,
        identity,
        GatewayState::Online,
        Some(model),
    )];
    if let Some(d) = discovery {
        match crate::homeassistant::discovery_messages(
            d.prefix,
            &identity.gateway_id,
            d.sensors,
            &model.spec().classes,
            VERSION,
        ) {
            Ok(configs) => out.extend(configs.into_iter().map(|c| OutMessage {
                topic: c.topic,
                payload: c.payload.into_bytes(),
                qos: QoS::AtLeastOnce,
                retain: c.retain,
            })),
            Err(e) => tracing::warn!(error = %e, "Cannot build Home Assistant discovery."),
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::tests::fake_model;

    #[test]
    fn status_carries_model_provider_and_identity() {
        let id = Identity {
            gateway_id: "gw".into(),
            started_at: 42,
        };
        let model = fake_model(1, 2, 1);
        let m = status_message(
            "diredi/v1/gw/status",
            &id,
            GatewayState::Online,
            Some(&model),
        );
        assert!(m.retain);
        assert_eq!(m.qos, QoS::AtLeastOnce);
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(v["state"], "online");
        assert_eq!(v["gateway_id"], "gw");
        assert_eq!(v["model_id"], "test");
        assert_eq!(v["model_version"], 3);
        assert_eq!(v["execution_provider"], "fake");
        assert_eq!(v["version"], VERSION);
        assert_eq!(v["started_at"], 42);
        let off = status(&id, GatewayState::Offline, None);
        assert_eq!(off.model_id, None);
    }

    #[test]
    fn announcements_start_with_the_status_and_add_discovery_when_enabled() {
        let id = Identity {
            gateway_id: "gw".into(),
            started_at: 1,
        };
        let model = fake_model(1, 2, 1);
        let plain = announcements("diredi/v1/gw/status", &id, &model, None);
        assert_eq!(plain.len(), 1);
        let sensors = vec!["imu".to_string()];
        let with = announcements(
            "diredi/v1/gw/status",
            &id,
            &model,
            Some(Discovery {
                prefix: "ha",
                sensors: &sensors,
            }),
        );
        assert_eq!(with[0], plain[0]);
        assert!(with.len() > 3, "gateway and sensor entities");
        assert!(with[1..]
            .iter()
            .all(|m| m.topic.starts_with("ha/") && m.retain));
        assert!(with.iter().any(|m| m.topic.contains("imu")));
    }
}
