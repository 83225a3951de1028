//! Home Assistant MQTT discovery (`[homeassistant] enabled = true`).
//!
//! Sans-IO: builds the retained discovery configs; the MQTT task publishes them. Where it stands:
//! after connecting (and again whenever Home Assistant announces itself with `online` on
//! [`birth_topic`]) the gateway publishes [`discovery_messages`]; when the windowing stage sees
//! a new sensor id it publishes [`sensor_discovery`] for it. Home Assistant then reads the
//! gateway's own topics directly; nothing is published twice.
//!
//! Single-component discovery, `<prefix>/<component>/<object_id>/config`, one config per
//! entity, following <https://www.home-assistant.io/integrations/mqtt/#mqtt-discovery>:
//!
//! | device | entity | component | source topic | value |
//! |---|---|---|---|---|
//! | gateway | Connectivity | `binary_sensor`, `connectivity` | `diredi/v1/{gw}/status` | `state` (`online`/`offline`) |
//! | gateway | Windows inferred, Inputs rejected, Windows dropped, Latency p99, Memory (RSS) | `sensor`, diagnostic | `diredi/v1/{gw}/metrics` | the metric's key |
//! | one per sensor, `via_device` the gateway | Class | `sensor`, `enum` over the model's classes | `diredi/v1/{gw}/inference/{id}` | `label` |
//! | same | Confidence | `sensor`, `%` (0–100) | same | `confidence` × 100 |
//!
//! Every entity but Connectivity is available while the status topic says `online`;
//! Connectivity itself stays available and turns `off`, which is what it is for.
//!
//! Object ids and device identifiers may only use `[a-zA-Z0-9_-]`, while gateway and sensor
//! ids may hold almost anything. [`object_id_part`] escapes them injectively (`_` starts an
//! escape), and parts are joined with `__`, which an escaped part never contains; two
//! different (gateway, sensor, entity) triples therefore never share a discovery topic.

use serde_json::{json, Map, Value};

use diredi_protocol::topics::{TopicError, Topics};

/// Home Assistant's default discovery prefix.
pub const DEFAULT_PREFIX: &str = "homeassistant";

/// Every identifier this module makes starts with this, so ours never clash with others'.
const ID_ROOT: &str = "diredi";

/// One discovery config to publish: retained, so Home Assistant finds it after a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovery {
    /// `<prefix>/<component>/<object_id>/config`.
    pub topic: String,
    /// The config as a JSON object; empty to remove the entity.
    pub payload: String,
    /// Whether to publish retained (always `true` for configs and removals).
    pub retain: bool,
}

/// Why discovery configs cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiscoveryError {
    /// The discovery prefix cannot be used as an MQTT topic prefix.
    #[error(
        "discovery prefix {prefix:?} is not usable: expected a non-empty topic prefix without \
         '+', '#', NUL or a leading/trailing '/', found {problem}"
    )]
    BadPrefix {
        /// The prefix as configured.
        prefix: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// The gateway id is not a valid topic level.
    #[error("gateway id {id:?} is not usable in topics: {source}")]
    GatewayId {
        /// The id as configured.
        id: String,
        /// Why it is invalid.
        source: TopicError,
    },
    /// The sensor id is not a valid topic level.
    #[error("sensor id {id:?} is not usable in topics: {source}")]
    SensorId {
        /// The id as received.
        id: String,
        /// Why it is invalid.
        source: TopicError,
    },
}

/// Topic on which Home Assistant announces itself (`online`) after it starts; republish
/// [`discovery_messages`] when that arrives.
pub fn birth_topic(prefix: &str) -> String {
    format!("{prefix}/status")
}

/// Escapes `id` into the object-id alphabet `[a-zA-Z0-9_-]`: ASCII letters, digits and `-`
/// stay, every other byte of its UTF-8 form becomes `_` and two lower-case hex digits
/// (`imu_0` → `imu_5f0`, `küche` → `k_c3_bcche`). Injective, and the result never contains
/// `__`.
pub fn object_id_part(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            out.push(char::from(b));
        } else {
            out.push('_');
            out.push(hex_digit(b >> 4));
            out.push(hex_digit(b & 0x0f));
        }
    }
    out
}

fn hex_digit(n: u8) -> char {
    char::from_digit(u32::from(n), 16).unwrap_or('0')
}

/// Every discovery config of a gateway: its own entities, then those of each sensor in
/// `sensors`. `classes` are the active model's class names (the options of each Class
/// entity; empty for a free-text entity); `version` is the gateway software version.
pub fn discovery_messages(
    prefix: &str,
    gateway_id: &str,
    sensors: &[String],
    classes: &[String],
    version: &str,
) -> Result<Vec<Discovery>, DiscoveryError> {
    let ctx = Context::new(prefix, gateway_id, version)?;
    let mut out = ctx.gateway_entities();
    for sensor in sensors {
        out.extend(ctx.sensor_entities(sensor, classes)?);
    }
    Ok(out)
}

/// Discovery configs for the entities of one sensor, published when the gateway first sees
/// `sensor_id` (and again with the new classes after a model with other classes is installed).
pub fn sensor_discovery(
    prefix: &str,
    gateway_id: &str,
    sensor_id: &str,
    classes: &[String],
    version: &str,
) -> Result<Vec<Discovery>, DiscoveryError> {
    Context::new(prefix, gateway_id, version)?.sensor_entities(sensor_id, classes)
}

/// Empty retained payloads on the config topics of one sensor's entities, which makes Home
/// Assistant remove them (for example after the sensor was retired).
pub fn sensor_removal(
    prefix: &str,
    gateway_id: &str,
    sensor_id: &str,
) -> Result<Vec<Discovery>, DiscoveryError> {
    let ctx = Context::new(prefix, gateway_id, "")?;
    check_sensor(sensor_id)?;
    Ok(SENSOR_ENTITIES
        .iter()
        .map(|(component, key)| Discovery {
            topic: ctx.config_topic(component, &ctx.sensor_object_id(sensor_id, key)),
            payload: String::new(),
            retain: true,
        })
        .collect())
}

/// (component, entity key) of every per-sensor entity.
const SENSOR_ENTITIES: [(&str, &str); 2] = [("sensor", "label"), ("sensor", "confidence")];

/// A diagnostic metric of the gateway: `MetricsMsg` key, entity name, unit, device class,
/// state class, icon.
struct Metric {
    key: &'static str,
    name: &'static str,
    unit: Option<&'static str>,
    device_class: Option<&'static str>,
    state_class: &'static str,
    icon: Option<&'static str>,
}

const METRICS: [Metric; 5] = [
    Metric {
        key: "windows_inferred",
        name: "Windows inferred",
        unit: None,
        device_class: None,
        state_class: "total_increasing",
        icon: Some("mdi:counter"),
    },
    Metric {
        key: "inputs_rejected",
        name: "Inputs rejected",
        unit: None,
        device_class: None,
        state_class: "total_increasing",
        icon: Some("mdi:alert-circle-outline"),
    },
    Metric {
        key: "windows_dropped",
        name: "Windows dropped",
        unit: None,
        device_class: None,
        state_class: "total_increasing",
        icon: Some("mdi:tray-remove"),
    },
    Metric {
        key: "latency_ms_p99",
        name: "Latency p99",
        unit: Some("ms"),
        device_class: Some("duration"),
        state_class: "measurement",
        icon: None,
    },
    Metric {
        key: "rss_bytes",
        name: "Memory (RSS)",
        unit: Some("B"),
        device_class: Some("data_size"),
        state_class: "measurement",
        icon: None,
    },
];

struct Context<'a> {
    prefix: &'a str,
    topics: Topics,
    gateway_part: String,
    version: &'a str,
}

impl<'a> Context<'a> {
    fn new(prefix: &'a str, gateway_id: &str, version: &'a str) -> Result<Self, DiscoveryError> {
        check_prefix(prefix)?;
        let topics = Topics::new(gateway_id).map_err(|source| DiscoveryError::GatewayId {
            id: gateway_id.to_owned(),
            source,
        })?;
        Ok(Context {
            prefix,
            topics,
            gateway_part: object_id_part(gateway_id),
            version,
        })
    }

    fn gateway_identifier(&self) -> String {
        format!("{ID_ROOT}__{}", self.gateway_part)
    }

    fn gateway_object_id(&self, key: &str) -> String {
        format!("{}__{key}", self.gateway_identifier())
    }

    fn sensor_identifier(&self, sensor_id: &str) -> String {
        format!(
            "{}__{}",
            self.gateway_identifier(),
            object_id_part(sensor_id)
        )
    }

    fn sensor_object_id(&self, sensor_id: &str, key: &str) -> String {
        format!("{}__{key}", self.sensor_identifier(sensor_id))
    }

    fn config_topic(&self, component: &str, object_id: &str) -> String {
        format!("{}/{component}/{object_id}/config", self.prefix)
    }

    fn origin(&self) -> Value {
        let mut origin = object(json!({
            "name": env!("CARGO_PKG_NAME"),
            "sw_version": self.version,
        }));
        // Home Assistant rejects the whole config when support_url is not a URL, and Cargo
        // gives "" when the package has no `repository`.
        let repository = env!("CARGO_PKG_REPOSITORY");
        if repository.starts_with("https://") || repository.starts_with("http://") {
            origin.insert("support_url".into(), repository.into());
        }
        Value::Object(origin)
    }

    fn availability(&self) -> Value {
        json!([{
            "topic": self.topics.status(),
            "value_template": "{{ value_json.state }}",
            "payload_available": "online",
            "payload_not_available": "offline",
        }])
    }

    fn gateway_device(&self) -> Value {
        let gw = self.topics.gateway_id();
        json!({
            "identifiers": [self.gateway_identifier()],
            "name": format!("DiReDi gateway {gw}"),
            "manufacturer": "DiReDi",
            "model": "diredi-gateway",
            "sw_version": self.version,
        })
    }

    fn message(
        &self,
        component: &str,
        object_id: String,
        mut config: Map<String, Value>,
    ) -> Discovery {
        config.insert("unique_id".into(), Value::String(object_id.clone()));
        config.insert("origin".into(), self.origin());
        Discovery {
            topic: self.config_topic(component, &object_id),
            payload: Value::Object(config).to_string(),
            retain: true,
        }
    }

    fn gateway_entities(&self) -> Vec<Discovery> {
        let status = self.topics.status();
        let mut out = Vec::with_capacity(1 + METRICS.len());

        // No availability here: when the gateway goes away this entity must read `off`, not
        // become unavailable.
        let connectivity = object(json!({
            "name": "Connectivity",
            "device_class": "connectivity",
            "entity_category": "diagnostic",
            "state_topic": status,
            "value_template": "{{ value_json.state }}",
            "payload_on": "online",
            "payload_off": "offline",
            "json_attributes_topic": status,
            "device": self.gateway_device(),
        }));
        out.push(self.message(
            "binary_sensor",
            self.gateway_object_id("connectivity"),
            connectivity,
        ));

        let metrics = self.topics.metrics();
        for m in &METRICS {
            let mut config = object(json!({
                "name": m.name,
                "entity_category": "diagnostic",
                "state_class": m.state_class,
                "state_topic": metrics,
                // A JSON null (no window in the period, no RSS on this platform) renders
                // "None", which Home Assistant shows as unknown.
                "value_template": format!("{{{{ value_json.{} }}}}", m.key),
                "availability": self.availability(),
                "device": self.gateway_device(),
            }));
            if let Some(unit) = m.unit {
                config.insert("unit_of_measurement".into(), unit.into());
            }
            if let Some(class) = m.device_class {
                config.insert("device_class".into(), class.into());
            }
            if m.device_class == Some("data_size") {
                config.insert("suggested_unit_of_measurement".into(), "MiB".into());
            }
            if let Some(icon) = m.icon {
                config.insert("icon".into(), icon.into());
            }
            out.push(self.message("sensor", self.gateway_object_id(m.key), config));
        }
        out
    }

    fn sensor_entities(
        &self,
        sensor_id: &str,
        classes: &[String],
    ) -> Result<Vec<Discovery>, DiscoveryError> {
        check_sensor(sensor_id)?;
        let inference = self.topics.inference(sensor_id);
        let device = json!({
            "identifiers": [self.sensor_identifier(sensor_id)],
            "name": sensor_id,
            "manufacturer": "DiReDi",
            "model": "Sensor classified by diredi-gateway",
            "via_device": self.gateway_identifier(),
        });

        let mut label = object(json!({
            "name": "Class",
            "icon": "mdi:tag-outline",
            "state_topic": inference,
            "value_template": "{{ value_json.label }}",
            "json_attributes_topic": inference,
            "availability": self.availability(),
            "device": device,
        }));
        if !classes.is_empty() {
            label.insert("device_class".into(), "enum".into());
            label.insert("options".into(), json!(classes));
        }

        let confidence = object(json!({
            "name": "Confidence",
            "icon": "mdi:percent",
            "unit_of_measurement": "%",
            "state_class": "measurement",
            "suggested_display_precision": 1,
            "state_topic": inference,
            "value_template": "{{ (value_json.confidence * 100) | round(1) }}",
            "availability": self.availability(),
            "device": device,
        }));

        let [(label_component, label_key), (confidence_component, confidence_key)] =
            SENSOR_ENTITIES;
        Ok(vec![
            self.message(
                label_component,
                self.sensor_object_id(sensor_id, label_key),
                label,
            ),
            self.message(
                confidence_component,
                self.sensor_object_id(sensor_id, confidence_key),
                confidence,
            ),
        ])
    }
}

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

fn check_prefix(prefix: &str) -> Result<(), DiscoveryError> {
    let problem = if prefix.is_empty() {
        Some("an empty string")
    } else if prefix.contains(['+', '#', '\0']) {
        Some("a wildcard or NUL character")
    } else if prefix.starts_with('/') || prefix.ends_with('/') {
        Some("a leading or trailing '/'")
    } else if prefix.split('/').any(str::is_empty) {
        Some("an empty topic level")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(DiscoveryError::BadPrefix {
            prefix: prefix.to_owned(),
            problem,
        }),
        None => Ok(()),
    }
}

fn check_sensor(sensor_id: &str) -> Result<(), DiscoveryError> {
    diredi_protocol::topics::validate_id(sensor_id).map_err(|source| DiscoveryError::SensorId {
        id: sensor_id.to_owned(),
        source,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn classes() -> Vec<String> {
        ["walk", "sit", "lie"].map(String::from).to_vec()
    }

    fn parse(d: &Discovery) -> Map<String, Value> {
        match serde_json::from_str::<Value>(&d.payload) {
            Ok(Value::Object(m)) => m,
            other => panic!("payload of {} is not a JSON object: {other:?}", d.topic),
        }
    }

    fn object_id_of(topic: &str) -> &str {
        let levels: Vec<&str> = topic.split('/').collect();
        assert_eq!(
            levels.len(),
            4,
            "topic {topic} is not prefix/component/object_id/config"
        );
        assert_eq!(levels[3], "config");
        levels[2]
    }

    fn is_ha_id(s: &str) -> bool {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    }

    #[test]
    fn every_config_is_a_retained_json_object_with_the_required_keys() {
        let sensors = vec!["imu0".to_owned(), "wrist".to_owned()];
        let msgs =
            discovery_messages("homeassistant", "gw-1", &sensors, &classes(), "0.1.0").unwrap();
        assert_eq!(msgs.len(), 1 + METRICS.len() + 2 * SENSOR_ENTITIES.len());
        for d in &msgs {
            assert!(d.retain, "{} not retained", d.topic);
            assert!(d.topic.starts_with("homeassistant/"), "{}", d.topic);
            let c = parse(d);
            for key in [
                "name",
                "unique_id",
                "state_topic",
                "value_template",
                "device",
                "origin",
            ] {
                assert!(
                    c.contains_key(key),
                    "{} lacks {key}: {}",
                    d.topic,
                    d.payload
                );
            }
            assert_eq!(c["unique_id"], object_id_of(&d.topic));
            let ids = c["device"]["identifiers"].as_array().unwrap();
            assert!(!ids.is_empty());
            assert_eq!(c["origin"]["name"], "diredi-gateway");
            assert_eq!(c["origin"]["sw_version"], "0.1.0");
            if let Some(url) = c["origin"].get("support_url") {
                assert!(url.as_str().unwrap().starts_with("http"), "{url}");
            }
            let state_topic = c["state_topic"].as_str().unwrap();
            assert!(state_topic.starts_with("diredi/v1/gw-1/"), "{state_topic}");
        }
    }

    #[test]
    fn connectivity_follows_the_status_topic_without_availability() {
        let msgs = discovery_messages("homeassistant", "gw-1", &[], &[], "0.1.0").unwrap();
        let conn: Vec<_> = msgs
            .iter()
            .filter(|d| d.topic.starts_with("homeassistant/binary_sensor/"))
            .collect();
        assert_eq!(conn.len(), 1);
        let c = parse(conn[0]);
        assert_eq!(c["device_class"], "connectivity");
        assert_eq!(c["state_topic"], "diredi/v1/gw-1/status");
        assert_eq!(c["value_template"], "{{ value_json.state }}");
        assert_eq!(c["payload_on"], "online");
        assert_eq!(c["payload_off"], "offline");
        assert!(!c.contains_key("availability"));
    }

    #[test]
    fn metrics_are_diagnostic_sensors_on_the_metrics_topic() {
        let msgs = discovery_messages("homeassistant", "gw-1", &[], &[], "0.1.0").unwrap();
        let mut keys = HashSet::new();
        for d in msgs
            .iter()
            .filter(|d| d.topic.starts_with("homeassistant/sensor/"))
        {
            let c = parse(d);
            assert_eq!(c["entity_category"], "diagnostic");
            assert_eq!(c["state_topic"], "diredi/v1/gw-1/metrics");
            let avail = &c["availability"][0];
            assert_eq!(avail["topic"], "diredi/v1/gw-1/status");
            assert_eq!(avail["value_template"], "{{ value_json.state }}");
            assert_eq!(avail["payload_available"], "online");
            assert_eq!(avail["payload_not_available"], "offline");
            let template = c["value_template"].as_str().unwrap();
            let key = template
                .strip_prefix("{{ value_json.")
                .and_then(|t| t.strip_suffix(" }}"))
                .unwrap();
            keys.insert(key.to_owned());
        }
        // Each template must name a real field of the metrics message.
        let sample = serde_json::to_value(diredi_protocol::messages::MetricsMsg {
            ts: 0,
            uptime_s: 0,
            messages_in: 0,
            samples_in: 0,
            windows_inferred: 0,
            inputs_rejected: 0,
            rejected_by_reason: Default::default(),
            windows_dropped: 0,
            latency_ms_p50: None,
            latency_ms_p99: None,
            queue_depth: 0,
            queue_capacity: 0,
            sensors: 0,
            rss_bytes: None,
        })
        .unwrap();
        for key in &keys {
            assert!(
                sample.get(key.as_str()).is_some(),
                "MetricsMsg has no field {key}"
            );
        }
        for key in [
            "windows_inferred",
            "inputs_rejected",
            "latency_ms_p99",
            "rss_bytes",
        ] {
            assert!(keys.contains(key), "no entity for {key}");
        }
    }

    #[test]
    fn sensor_entities_read_label_and_confidence_of_their_inference_topic() {
        let msgs = sensor_discovery("ha", "gw-1", "imu0", &classes(), "0.1.0").unwrap();
        assert_eq!(msgs.len(), 2);
        let label = parse(&msgs[0]);
        assert_eq!(label["state_topic"], "diredi/v1/gw-1/inference/imu0");
        assert_eq!(label["value_template"], "{{ value_json.label }}");
        assert_eq!(label["device_class"], "enum");
        assert_eq!(label["options"], json!(["walk", "sit", "lie"]));
        let conf = parse(&msgs[1]);
        assert_eq!(conf["unit_of_measurement"], "%");
        assert_eq!(
            conf["value_template"],
            "{{ (value_json.confidence * 100) | round(1) }}"
        );
        assert_eq!(label["device"], conf["device"]);
        assert_eq!(label["device"]["name"], "imu0");
        assert_eq!(label["device"]["via_device"], "diredi__gw-1");
        assert!(msgs[0].topic.starts_with("ha/sensor/"));

        let free = sensor_discovery("ha", "gw-1", "imu0", &[], "0.1.0").unwrap();
        let free_label = parse(&free[0]);
        assert!(!free_label.contains_key("device_class"));
        assert!(!free_label.contains_key("options"));
    }

    #[test]
    fn odd_ids_give_ha_safe_object_ids_and_valid_json() {
        let weird = ["küche/\"x\"", "a b", "imu_0", "imu.0", "$x", "{{ boom }}"];
        let gw = "gw \"quoted\" \\ ü";
        let sensors: Vec<String> = weird
            .iter()
            .filter(|s| !s.contains('/') && !s.starts_with('$'))
            .map(|s| s.to_string())
            .collect();
        let msgs = discovery_messages("homeassistant", gw, &sensors, &classes(), "1").unwrap();
        for d in &msgs {
            let id = object_id_of(&d.topic);
            assert!(is_ha_id(id), "object id {id:?} outside [a-zA-Z0-9_-]");
            let c = parse(d);
            for ident in c["device"]["identifiers"].as_array().unwrap() {
                assert!(is_ha_id(ident.as_str().unwrap()), "{ident}");
            }
        }
        let label = parse(&msgs[1 + METRICS.len()]);
        assert_eq!(label["device"]["name"], sensors[0]);
        assert_eq!(
            label["state_topic"],
            format!("diredi/v1/{gw}/inference/{}", sensors[0])
        );
    }

    #[test]
    fn escaping_is_injective_so_similar_ids_do_not_collide() {
        let ids = [
            "imu_0", "imu.0", "imu 0", "imu-0", "imu0", "imu_5f0", "IMU0", "_", "__",
        ];
        let parts: HashSet<String> = ids.iter().map(|i| object_id_part(i)).collect();
        assert_eq!(parts.len(), ids.len());
        for p in &parts {
            assert!(!p.contains("__"), "{p}");
        }
        assert_eq!(object_id_part("imu-0"), "imu-0");
        assert_eq!(object_id_part("imu_0"), "imu_5f0");
        assert_eq!(object_id_part("ü"), "_c3_bc");

        // Gateway "a" with sensor "b__c" must not meet gateway "a__b" with sensor "c".
        let one = sensor_discovery("ha", "a", "b__c", &[], "1").unwrap();
        let two = sensor_discovery("ha", "a__b", "c", &[], "1").unwrap();
        let topics: HashSet<&str> = one.iter().chain(&two).map(|d| d.topic.as_str()).collect();
        assert_eq!(topics.len(), 4);
    }

    #[test]
    fn removal_clears_the_same_topics_that_discovery_filled() {
        let added = sensor_discovery("homeassistant", "gw-1", "imu_0", &classes(), "1").unwrap();
        let removed = sensor_removal("homeassistant", "gw-1", "imu_0").unwrap();
        let a: Vec<&str> = added.iter().map(|d| d.topic.as_str()).collect();
        let r: Vec<&str> = removed.iter().map(|d| d.topic.as_str()).collect();
        assert_eq!(a, r);
        assert!(removed.iter().all(|d| d.payload.is_empty() && d.retain));
    }

    #[test]
    fn bad_prefix_and_ids_are_rejected_with_a_reason() {
        for bad in ["", "home/#", "a/+/b", "/ha", "ha/", "a//b"] {
            let err = discovery_messages(bad, "gw", &[], &[], "1").unwrap_err();
            assert!(
                matches!(err, DiscoveryError::BadPrefix { .. }),
                "{bad}: {err}"
            );
        }
        assert!(discovery_messages("home/assistant", "gw", &[], &[], "1").is_ok());
        assert!(matches!(
            discovery_messages("ha", "fleet", &[], &[], "1"),
            Err(DiscoveryError::GatewayId { .. })
        ));
        let err = sensor_discovery("ha", "gw", "a/b", &[], "1").unwrap_err();
        assert!(matches!(err, DiscoveryError::SensorId { .. }));
        assert!(err.to_string().contains("a/b"), "{err}");
        assert_eq!(birth_topic("homeassistant"), "homeassistant/status");
    }
}
