//! MQTT topic names and routing.
//!
//! Every topic of one gateway lives under `diredi/v1/{gateway_id}/`. This module builds those
//! names and, on the way in (MQTT in → **route** → decode → window → infer → publish), maps a
//! received topic to a [`Route`] without allocating.
//!
//! | topic | direction | payload |
//! |---|---|---|
//! | `diredi/v1/{gw}/sensor/{sensor_id}` | in | sensor samples ([`crate::sensor`]) |
//! | `diredi/v1/{gw}/label/{sensor_id}` | in | [`crate::messages::LabelMsg`] |
//! | `diredi/v1/{gw}/command` | in | [`crate::messages::CommandMsg`] |
//! | `diredi/v1/{gw}/model` | in | a model for this gateway |
//! | `diredi/v1/fleet/model` | in | a model for every gateway |
//! | `diredi/v1/{gw}/inference/{sensor_id}` | out | [`crate::messages::InferenceMsg`] |
//! | `diredi/v1/{gw}/status` | out (retained) | [`crate::messages::StatusMsg`] |
//! | `diredi/v1/{gw}/metrics` | out | [`crate::messages::MetricsMsg`] |
//! | `diredi/v1/{gw}/error` | out | [`crate::messages::ErrorMsg`] |
//! | `diredi/v1/{gw}/knowledge` | out | knowledge for the cloud worker |

/// Root of every DiReDi topic, including the protocol version.
pub const ROOT: &str = "diredi/v1";

/// Topic on which the cloud publishes a model meant for the whole fleet.
pub const FLEET_MODEL: &str = "diredi/v1/fleet/model";

/// Longest accepted gateway, sensor or group id, in bytes.
pub const MAX_ID_LEN: usize = 64;

/// Why a gateway id, sensor id or share-group name is not a valid topic level.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// The id is the empty string.
    #[error("id is empty; expected 1 to {MAX_ID_LEN} bytes")]
    Empty,
    /// The id is longer than [`MAX_ID_LEN`] bytes.
    #[error("id is {len} bytes long; expected at most {max}")]
    TooLong {
        /// Length found, in bytes.
        len: usize,
        /// Maximum allowed ([`MAX_ID_LEN`]).
        max: usize,
    },
    /// The id contains a character that has a meaning in MQTT topics.
    #[error("id contains {ch:?}; '/', '+', '#' and NUL are not allowed")]
    ForbiddenChar {
        /// The offending character.
        ch: char,
    },
    /// The id starts with `$`, which MQTT reserves for broker topics (`$SYS`, `$share`).
    #[error("id starts with '$', which MQTT reserves for broker topics")]
    LeadingDollar,
    /// The gateway id is `fleet`, which names the fleet-wide namespace `diredi/v1/fleet/`.
    #[error("gateway id \"fleet\" is reserved for fleet-wide topics")]
    ReservedFleet,
}

/// Checks that `id` can be used as one MQTT topic level: non-empty, at most [`MAX_ID_LEN`]
/// bytes, no `/`, `+`, `#` or NUL, and no leading `$`.
pub fn validate_id(id: &str) -> Result<(), TopicError> {
    if id.is_empty() {
        return Err(TopicError::Empty);
    }
    if id.len() > MAX_ID_LEN {
        return Err(TopicError::TooLong {
            len: id.len(),
            max: MAX_ID_LEN,
        });
    }
    if let Some(ch) = id.chars().find(|c| matches!(c, '/' | '+' | '#' | '\0')) {
        return Err(TopicError::ForbiddenChar { ch });
    }
    if id.starts_with('$') {
        return Err(TopicError::LeadingDollar);
    }
    Ok(())
}

/// Shared-subscription filter through which a group of cloud workers shares the knowledge of
/// every gateway: `$share/{group}/diredi/v1/+/knowledge`.
pub fn knowledge_shared(group: &str) -> Result<String, TopicError> {
    validate_id(group)?;
    Ok(format!("$share/{group}/{ROOT}/+/knowledge"))
}

/// Gateway id of a knowledge topic `diredi/v1/{gw}/knowledge`, as received by a cloud worker
/// subscribed with [`knowledge_shared`]. `None` if the topic is not a knowledge topic or the
/// id is invalid.
pub fn knowledge_source(topic: &str) -> Option<&str> {
    let gw = topic
        .strip_prefix(ROOT)?
        .strip_prefix('/')?
        .strip_suffix("/knowledge")?;
    validate_id(gw).ok().map(|()| gw)
}

/// Where a received topic should go. Borrowed from the topic string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<'a> {
    /// Samples from the sensor with this (validated) id.
    Sensor(&'a str),
    /// Labels for the sensor with this (validated) id.
    Label(&'a str),
    /// A command for this gateway.
    Command,
    /// A model for this gateway.
    Model,
    /// A model for the whole fleet.
    FleetModel,
    /// The cloud's receipt of a knowledge package of this gateway.
    KnowledgeAck,
    /// A chunk of a dispatched model (`.../model/chunk/...`, this gateway's or the fleet's).
    ModelChunk,
    /// A sensor or label topic whose id is not valid (for example empty, `sensor/`, or too
    /// long). The caller should reject and count the message rather than ignore it silently.
    InvalidId {
        /// The id as found in the topic.
        id: &'a str,
        /// Why it is invalid.
        error: TopicError,
    },
    /// Any other topic (not ours, or not one this gateway consumes).
    Other,
}

/// Topic names of one gateway. Build once with [`Topics::new`] and reuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    gateway_id: String,
    /// `diredi/v1/{gateway_id}/`, with the trailing slash.
    prefix: String,
}

impl Topics {
    /// Topics for `gateway_id`, which must pass [`validate_id`]. `fleet` is also rejected
    /// because `diredi/v1/fleet/...` is the fleet-wide namespace.
    pub fn new(gateway_id: &str) -> Result<Topics, TopicError> {
        validate_id(gateway_id)?;
        if gateway_id == "fleet" {
            return Err(TopicError::ReservedFleet);
        }
        Ok(Topics {
            gateway_id: gateway_id.to_owned(),
            prefix: format!("{ROOT}/{gateway_id}/"),
        })
    }

    /// The gateway id these topics were built for.
    pub fn gateway_id(&self) -> &str {
        &self.gateway_id
    }

    /// `diredi/v1/{gw}/`, with the trailing slash.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn topic(&self, rest: &str) -> String {
        let mut t = String::with_capacity(self.prefix.len() + rest.len());
        t.push_str(&self.prefix);
        t.push_str(rest);
        t
    }

    /// `diredi/v1/{gw}/sensor/{sensor_id}`.
    pub fn sensor(&self, sensor_id: &str) -> String {
        self.topic(&format!("sensor/{sensor_id}"))
    }

    /// `diredi/v1/{gw}/sensor/+`: subscription filter for every sensor.
    pub fn sensor_filter(&self) -> String {
        self.topic("sensor/+")
    }

    /// `diredi/v1/{gw}/inference/{sensor_id}`.
    pub fn inference(&self, sensor_id: &str) -> String {
        self.topic(&format!("inference/{sensor_id}"))
    }

    /// `diredi/v1/{gw}/status` (retained; also the last-will topic).
    pub fn status(&self) -> String {
        self.topic("status")
    }

    /// `diredi/v1/{gw}/metrics`.
    pub fn metrics(&self) -> String {
        self.topic("metrics")
    }

    /// `diredi/v1/{gw}/error`.
    pub fn error(&self) -> String {
        self.topic("error")
    }

    /// `diredi/v1/{gw}/label/{sensor_id}`.
    pub fn label(&self, sensor_id: &str) -> String {
        self.topic(&format!("label/{sensor_id}"))
    }

    /// `diredi/v1/{gw}/label/+`: subscription filter for labels of every sensor.
    pub fn label_filter(&self) -> String {
        self.topic("label/+")
    }

    /// `diredi/v1/{gw}/command`.
    pub fn command(&self) -> String {
        self.topic("command")
    }

    /// `diredi/v1/{gw}/knowledge`.
    pub fn knowledge(&self) -> String {
        self.topic("knowledge")
    }

    /// `diredi/v1/{gw}/knowledge/ack`: the cloud worker's receipt of a knowledge package; the
    /// gateway keeps a package in its outbox until this names it.
    pub fn knowledge_ack(&self) -> String {
        self.topic("knowledge/ack")
    }

    /// `diredi/v1/{gw}/adaptation`: the outcome of each local adaptation (counts, probe
    /// accuracy, package id and size; never user data).
    pub fn adaptation(&self) -> String {
        self.topic("adaptation")
    }

    /// `diredi/v1/{gw}/model`.
    pub fn model(&self) -> String {
        self.topic("model")
    }

    /// Maps a received topic to its [`Route`]. Sensor and label ids are validated with
    /// [`validate_id`]; an invalid one gives [`Route::InvalidId`]. Topics with extra levels
    /// (`sensor/a/b`) give [`Route::Other`].
    pub fn route<'a>(&self, topic: &'a str) -> Route<'a> {
        if topic == FLEET_MODEL {
            return Route::FleetModel;
        }
        if topic.starts_with(FLEET_MODEL) && topic[FLEET_MODEL.len()..].starts_with("/chunk/") {
            return Route::ModelChunk;
        }
        let Some(rest) = topic.strip_prefix(self.prefix.as_str()) else {
            return Route::Other;
        };
        match rest {
            "command" => Route::Command,
            "knowledge/ack" => Route::KnowledgeAck,
            r if r.starts_with("model/chunk/") => Route::ModelChunk,
            "model" => Route::Model,
            _ => {
                if let Some(id) = rest.strip_prefix("sensor/") {
                    with_id(id, Route::Sensor)
                } else if let Some(id) = rest.strip_prefix("label/") {
                    with_id(id, Route::Label)
                } else {
                    Route::Other
                }
            }
        }
    }
}

fn with_id<'a>(id: &'a str, make: fn(&'a str) -> Route<'a>) -> Route<'a> {
    if id.contains('/') {
        return Route::Other;
    }
    match validate_id(id) {
        Ok(()) => make(id),
        Err(error) => Route::InvalidId { id, error },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn topics() -> Topics {
        Topics::new("gw-1").unwrap()
    }

    #[test]
    fn ids_with_mqtt_special_characters_are_rejected() {
        assert_eq!(validate_id(""), Err(TopicError::Empty));
        assert_eq!(
            validate_id("a/b"),
            Err(TopicError::ForbiddenChar { ch: '/' })
        );
        assert_eq!(
            validate_id("a+"),
            Err(TopicError::ForbiddenChar { ch: '+' })
        );
        assert_eq!(validate_id("#"), Err(TopicError::ForbiddenChar { ch: '#' }));
        assert_eq!(
            validate_id("a\0b"),
            Err(TopicError::ForbiddenChar { ch: '\0' })
        );
        assert_eq!(validate_id("$SYS"), Err(TopicError::LeadingDollar));
        assert_eq!(
            validate_id(&"x".repeat(65)),
            Err(TopicError::TooLong { len: 65, max: 64 })
        );
        assert_eq!(validate_id(&"x".repeat(64)), Ok(()));
        assert_eq!(validate_id("a$b.c-d_é"), Ok(()));
        assert!(Topics::new("bad/gw").is_err());
        assert_eq!(Topics::new("fleet"), Err(TopicError::ReservedFleet));
    }

    #[test]
    fn built_topics_follow_the_documented_layout() {
        let t = topics();
        assert_eq!(t.sensor("imu0"), "diredi/v1/gw-1/sensor/imu0");
        assert_eq!(t.sensor_filter(), "diredi/v1/gw-1/sensor/+");
        assert_eq!(t.inference("imu0"), "diredi/v1/gw-1/inference/imu0");
        assert_eq!(t.status(), "diredi/v1/gw-1/status");
        assert_eq!(t.metrics(), "diredi/v1/gw-1/metrics");
        assert_eq!(t.error(), "diredi/v1/gw-1/error");
        assert_eq!(t.label("imu0"), "diredi/v1/gw-1/label/imu0");
        assert_eq!(t.label_filter(), "diredi/v1/gw-1/label/+");
        assert_eq!(t.command(), "diredi/v1/gw-1/command");
        assert_eq!(t.knowledge(), "diredi/v1/gw-1/knowledge");
        assert_eq!(t.model(), "diredi/v1/gw-1/model");
        assert_eq!(
            knowledge_shared("workers").unwrap(),
            "$share/workers/diredi/v1/+/knowledge"
        );
        assert!(knowledge_shared("a/b").is_err());
    }

    #[test]
    fn built_topics_route_back_to_their_kind() {
        let t = topics();
        assert_eq!(t.route(&t.sensor("imu0")), Route::Sensor("imu0"));
        assert_eq!(t.route(&t.label("imu0")), Route::Label("imu0"));
        assert_eq!(t.route(&t.command()), Route::Command);
        assert_eq!(t.route(&t.knowledge_ack()), Route::KnowledgeAck);
        assert_eq!(
            t.route(&format!("{}/chunk/2/0/1", t.model())),
            Route::ModelChunk
        );
        assert_eq!(
            t.route(&format!("{FLEET_MODEL}/chunk/2/0/1")),
            Route::ModelChunk
        );
        assert_eq!(t.route(&t.model()), Route::Model);
        assert_eq!(t.route(FLEET_MODEL), Route::FleetModel);
        assert_eq!(t.route(&t.status()), Route::Other);
    }

    #[test]
    fn foreign_or_malformed_topics_are_not_routed_to_a_sensor() {
        let t = topics();
        assert_eq!(t.route("diredi/v1/gw-2/sensor/imu0"), Route::Other);
        assert_eq!(t.route("diredi/v1/gw-1/sensor/a/b"), Route::Other);
        assert_eq!(t.route("diredi/v1/gw-1sensor/a"), Route::Other);
        assert_eq!(t.route("diredi/v1/gw-1/sensors/a"), Route::Other);
        assert_eq!(
            t.route("diredi/v1/gw-1/sensor/"),
            Route::InvalidId {
                id: "",
                error: TopicError::Empty
            }
        );
        let long = format!("diredi/v1/gw-1/label/{}", "x".repeat(65));
        assert!(matches!(t.route(&long), Route::InvalidId { .. }));
    }

    #[test]
    fn knowledge_source_extracts_the_gateway_id() {
        assert_eq!(knowledge_source("diredi/v1/gw-7/knowledge"), Some("gw-7"));
        assert_eq!(knowledge_source("diredi/v1/a/b/knowledge"), None);
        assert_eq!(knowledge_source("diredi/v1//knowledge"), None);
        assert_eq!(knowledge_source("diredi/v1/gw-7/status"), None);
    }
}
