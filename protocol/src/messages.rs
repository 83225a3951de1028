//! JSON messages exchanged over MQTT, other than sensor samples and models.
//!
//! Out of the gateway: [`InferenceMsg`] (after infer → **publish**), [`StatusMsg`] (retained,
//! also the last will), [`MetricsMsg`] (periodic) and [`ErrorMsg`] (one per rejected input).
//! Into the gateway: [`LabelMsg`] (labels → store → adapt) and [`CommandMsg`].
//!
//! Every struct is a public contract: field names are the JSON keys. Times are Unix
//! milliseconds (`i64`) throughout.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::sensor::DecodeError;

/// One classified window, published on `diredi/v1/{gw}/inference/{sensor_id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferenceMsg {
    /// Sensor id (the last topic level of the sensor topic).
    pub sensor: String,
    /// Unix ms of the end of the window (time of its last sample).
    pub ts: i64,
    /// Most probable class name.
    pub label: String,
    /// Probability of `label`, in `[0, 1]`.
    pub confidence: f32,
    /// Probability of every class of the model, keyed by class name.
    pub probabilities: BTreeMap<String, f32>,
    /// Manifest `version` of the model that produced this result.
    pub model_version: u64,
    /// Time from the window being complete to the result being ready, in milliseconds
    /// (queueing plus inference).
    pub latency_ms: f64,
    /// Opaque identifier of the window chosen by the gateway, unique at least per gateway run.
    /// Labels may refer to it ([`LabelMsg::Window`]).
    pub window_id: String,
}

/// Whether the gateway is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GatewayState {
    /// Running; published at start-up and whenever the model changes.
    Online,
    /// Stopped; published on clean shutdown and set as the MQTT last will.
    Offline,
}

/// Gateway status, published retained on `diredi/v1/{gw}/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusMsg {
    /// `online` or `offline`.
    pub state: GatewayState,
    /// The gateway id.
    pub gateway_id: String,
    /// `model_id` of the active model; `None` when no model is loaded.
    pub model_id: Option<String>,
    /// `version` of the active model; `None` when no model is loaded.
    pub model_version: Option<u64>,
    /// ONNX Runtime execution provider in use (for example `cpu`, `xnnpack`).
    pub execution_provider: Option<String>,
    /// Version of the gateway software (its crate version).
    pub version: String,
    /// Unix ms at which the gateway process started.
    pub started_at: i64,
    /// Progress of the latest model installation, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install: Option<InstallStatus>,
    /// The active model was adapted on the gateway (`[learning] serve_adapted`) and is not the
    /// installed signed model of `model_version`. Absent when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub model_adapted_locally: bool,
}

/// Progress of a model installation (placeholder; the states are not fixed yet).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallStatus {
    /// Installation state, for example `verifying`, `installed`, `rejected`.
    pub state: String,
    /// Manifest version being installed.
    pub version: Option<u64>,
    /// Human-readable detail, for example why a model was rejected.
    pub detail: Option<String>,
}

/// Counters and gauges, published periodically on `diredi/v1/{gw}/metrics`. Counters are
/// totals since start-up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsMsg {
    /// Unix ms when the snapshot was taken.
    pub ts: i64,
    /// Seconds since start-up.
    pub uptime_s: u64,
    /// Sensor messages received.
    pub messages_in: u64,
    /// Samples decoded from accepted sensor messages.
    pub samples_in: u64,
    /// Windows classified.
    pub windows_inferred: u64,
    /// Sensor messages rejected (sum of `rejected_by_reason`).
    pub inputs_rejected: u64,
    /// Rejected sensor messages by error kind (for example [`DecodeError::kind`]).
    pub rejected_by_reason: BTreeMap<String, u64>,
    /// Complete windows dropped because the inference queue was full.
    pub windows_dropped: u64,
    /// Median window latency over the last period, in ms; `None` if no window was inferred.
    pub latency_ms_p50: Option<f64>,
    /// 99th percentile window latency over the last period, in ms; `None` if no window was
    /// inferred.
    pub latency_ms_p99: Option<f64>,
    /// Windows waiting in the inference queue at snapshot time.
    pub queue_depth: u64,
    /// Capacity of the inference queue.
    pub queue_capacity: u64,
    /// Sensors with a window buffer at snapshot time.
    pub sensors: u64,
    /// Resident set size of the process in bytes, where the platform reports it.
    pub rss_bytes: Option<u64>,
}

/// A rejected input, published on `diredi/v1/{gw}/error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMsg {
    /// Topic on which the rejected message arrived.
    pub topic: String,
    /// Sensor id, when the topic names one.
    pub sensor: Option<String>,
    /// Human-readable reason, saying what was expected and what was found.
    pub reason: String,
    /// Short stable code, such as [`DecodeError::kind`].
    pub kind: String,
    /// Unix ms at which the message was rejected.
    pub ts: i64,
}

impl ErrorMsg {
    /// Error message for a sensor payload that failed to decode.
    pub fn from_decode(topic: &str, sensor: Option<&str>, err: &DecodeError, ts: i64) -> Self {
        ErrorMsg {
            topic: topic.to_owned(),
            sensor: sensor.map(str::to_owned),
            reason: err.to_string(),
            kind: err.kind().to_owned(),
            ts,
        }
    }
}

/// A label sent by the user on `diredi/v1/{gw}/label/{sensor_id}`: either a time range or
/// one window. Parse with [`LabelMsg::parse`], which also checks the range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged, try_from = "RawLabel")]
pub enum LabelMsg {
    /// `{"from_ts", "to_ts", "class"}`: every sample in `[from_ts, to_ts]` belongs to `class`.
    Range {
        /// Unix ms of the first labelled sample (inclusive).
        from_ts: i64,
        /// Unix ms of the last labelled sample (inclusive).
        to_ts: i64,
        /// Class name; must be one of the model's classes.
        class: String,
    },
    /// `{"window_id", "class"}`: the window with this id (from [`InferenceMsg::window_id`])
    /// belongs to `class`.
    Window {
        /// Id of a window published in an [`InferenceMsg`].
        window_id: String,
        /// Class name; must be one of the model's classes.
        class: String,
    },
}

/// Every key a label may carry; [`LabelMsg`] accepts exactly one of the two combinations.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLabel {
    from_ts: Option<i64>,
    to_ts: Option<i64>,
    window_id: Option<String>,
    class: String,
}

impl TryFrom<RawLabel> for LabelMsg {
    type Error = String;

    fn try_from(raw: RawLabel) -> Result<LabelMsg, String> {
        match (raw.from_ts, raw.to_ts, raw.window_id) {
            (Some(from_ts), Some(to_ts), None) => Ok(LabelMsg::Range {
                from_ts,
                to_ts,
                class: raw.class,
            }),
            (None, None, Some(window_id)) => Ok(LabelMsg::Window {
                window_id,
                class: raw.class,
            }),
            (from, to, window) => Err(format!(
                "found keys{}{}{} besides class; expected from_ts and to_ts, or window_id alone",
                if from.is_some() { " from_ts" } else { "" },
                if to.is_some() { " to_ts" } else { "" },
                if window.is_some() { " window_id" } else { "" },
            )),
        }
    }
}

/// Why a label or command message was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// The JSON does not match any accepted shape.
    #[error("malformed {what}: expected {expected}; {detail}")]
    Malformed {
        /// Message type (`label`, `command`).
        what: &'static str,
        /// Accepted shapes.
        expected: &'static str,
        /// Parser message.
        detail: String,
    },
    /// A label range ends before it starts.
    #[error("label range ends before it starts: from_ts {from_ts} > to_ts {to_ts}")]
    EmptyRange {
        /// Start of the range.
        from_ts: i64,
        /// End of the range.
        to_ts: i64,
    },
}

impl MessageError {
    /// Short stable code for the error topic: `malformed_label`, `malformed_command` or
    /// `empty_range`.
    pub fn kind(&self) -> &'static str {
        match self {
            MessageError::Malformed { what: "label", .. } => "malformed_label",
            MessageError::Malformed { .. } => "malformed_command",
            MessageError::EmptyRange { .. } => "empty_range",
        }
    }
}

impl LabelMsg {
    const SHAPES: &'static str = r#"{"from_ts": <ms>, "to_ts": <ms>, "class": <name>} or {"window_id": <id>, "class": <name>}"#;

    /// Parses and checks a label payload (`from_ts <= to_ts`).
    pub fn parse(payload: &[u8]) -> Result<LabelMsg, MessageError> {
        let msg: LabelMsg =
            serde_json::from_slice(payload).map_err(|e| MessageError::Malformed {
                what: "label",
                expected: Self::SHAPES,
                detail: e.to_string(),
            })?;
        if let LabelMsg::Range { from_ts, to_ts, .. } = msg {
            if from_ts > to_ts {
                return Err(MessageError::EmptyRange { from_ts, to_ts });
            }
        }
        Ok(msg)
    }

    /// The class name.
    pub fn class(&self) -> &str {
        match self {
            LabelMsg::Range { class, .. } | LabelMsg::Window { class, .. } => class,
        }
    }
}

/// A command on `diredi/v1/{gw}/command`, tagged by `cmd`. Unknown commands fail to parse
/// (an error, never a panic or a silent no-op).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum CommandMsg {
    /// `{"cmd": "adapt"}`: adapt the model on the labels collected so far.
    Adapt,
    /// `{"cmd": "cancel_adapt"}`: stop the running adaptation (within one training step); it
    /// produces no knowledge and reports `{"state": "cancelled"}` on `adaptation`.
    CancelAdapt,
    /// `{"cmd": "rollback", "to_version": <u64, optional>}`: return to an earlier model,
    /// by default the previous one.
    Rollback {
        /// Manifest version to return to; `None` for the previous one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to_version: Option<u64>,
    },
}

/// `diredi/v1/{gw}/knowledge/ack`: the cloud worker received a knowledge package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnowledgeAckMsg {
    /// The package's id.
    pub package_id: String,
    /// `true` when the worker took the package (now or before: acks are idempotent);
    /// `false` when it refused it for good (for example an unknown base model).
    pub accepted: bool,
    /// Why it was refused, or what happens next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// A lease, not yet the receipt: the worker is working on the package, and the gateway
    /// holds it back this many seconds before sending it again. The final receipt (without
    /// `lease_s`) takes it out of the outbox; if none comes (the worker died), the package goes
    /// out again when the lease ends, to whichever worker of the shared subscription.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_s: Option<u64>,
}

impl CommandMsg {
    /// Parses a command payload.
    pub fn parse(payload: &[u8]) -> Result<CommandMsg, MessageError> {
        serde_json::from_slice(payload).map_err(|e| MessageError::Malformed {
            what: "command",
            expected: r#"{"cmd": "adapt"}, {"cmd": "cancel_adapt"} or {"cmd": "rollback", "to_version": <optional u64>}"#,
            detail: e.to_string(),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn status_serialises_state_lowercase_and_omits_absent_install() {
        let s = StatusMsg {
            state: GatewayState::Offline,
            gateway_id: "gw".into(),
            model_id: None,
            model_version: None,
            execution_provider: None,
            version: "0.1.0".into(),
            started_at: 5,
            install: None,
            model_adapted_locally: false,
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["state"], "offline");
        assert!(v.get("install").is_none());
        assert!(v.get("model_adapted_locally").is_none());
        assert_eq!(serde_json::from_value::<StatusMsg>(v).unwrap(), s);
    }

    #[test]
    fn inference_message_round_trips_through_json() {
        let m = InferenceMsg {
            sensor: "imu0".into(),
            ts: 1_700_000_000_000,
            label: "walk".into(),
            confidence: 0.75,
            probabilities: [("walk".to_string(), 0.75), ("sit".to_string(), 0.25)].into(),
            model_version: 3,
            latency_ms: 1.5,
            window_id: "imu0:7".into(),
        };
        let text = serde_json::to_string(&m).unwrap();
        assert!(
            text.contains(r#""probabilities":{"sit":0.25,"walk":0.75}"#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<InferenceMsg>(&text).unwrap(), m);
    }

    #[test]
    fn error_message_carries_decode_kind_and_reason() {
        let e = DecodeError::Empty;
        let m = ErrorMsg::from_decode("t/s", Some("s"), &e, 9);
        assert_eq!(m.kind, "empty");
        assert_eq!(m.reason, "payload holds no sample");
        assert_eq!(m.sensor.as_deref(), Some("s"));
    }

    #[test]
    fn labels_parse_as_range_or_window() {
        assert_eq!(
            LabelMsg::parse(br#"{"from_ts": 1, "to_ts": 2, "class": "walk"}"#).unwrap(),
            LabelMsg::Range {
                from_ts: 1,
                to_ts: 2,
                class: "walk".into()
            }
        );
        let w = LabelMsg::parse(br#"{"window_id": "imu0:3", "class": "sit"}"#).unwrap();
        assert_eq!(w.class(), "sit");
        assert!(matches!(w, LabelMsg::Window { .. }));
        assert_eq!(
            LabelMsg::parse(br#"{"from_ts": 3, "to_ts": 2, "class": "walk"}"#),
            Err(MessageError::EmptyRange {
                from_ts: 3,
                to_ts: 2
            })
        );
        for bad in [
            &br#"{"class": "walk"}"#[..],
            br#"{"window_id": "a", "from_ts": 1, "to_ts": 2, "class": "x"}"#,
            br#"{"from_ts": 1, "class": "x"}"#,
            br#"{"window_id": "a", "class": "x", "note": 1}"#,
            b"[]",
        ] {
            assert_eq!(LabelMsg::parse(bad).unwrap_err().kind(), "malformed_label");
        }
        let err = LabelMsg::parse(br#"{"window_id": "a", "to_ts": 2, "class": "x"}"#).unwrap_err();
        assert!(
            err.to_string().contains("found keys to_ts window_id"),
            "{err}"
        );
        let range = LabelMsg::Range {
            from_ts: 5,
            to_ts: 9,
            class: "sit".into(),
        };
        let text = serde_json::to_string(&range).unwrap();
        assert_eq!(text, r#"{"from_ts":5,"to_ts":9,"class":"sit"}"#);
        assert_eq!(LabelMsg::parse(text.as_bytes()).unwrap(), range);
    }

    #[test]
    fn unknown_commands_are_errors() {
        assert_eq!(
            CommandMsg::parse(br#"{"cmd": "adapt"}"#),
            Ok(CommandMsg::Adapt)
        );
        assert_eq!(
            CommandMsg::parse(br#"{"cmd": "cancel_adapt"}"#),
            Ok(CommandMsg::CancelAdapt)
        );
        assert_eq!(
            CommandMsg::parse(br#"{"cmd": "rollback", "to_version": 4}"#),
            Ok(CommandMsg::Rollback {
                to_version: Some(4)
            })
        );
        assert_eq!(
            serde_json::to_value(CommandMsg::Rollback { to_version: None }).unwrap(),
            json!({"cmd": "rollback"})
        );
        let err = CommandMsg::parse(br#"{"cmd": "format_disk"}"#).unwrap_err();
        assert_eq!(err.kind(), "malformed_command");
        assert!(err.to_string().contains("format_disk"), "{err}");
        assert!(CommandMsg::parse(br#"{"no": "cmd"}"#).is_err());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod proptests {
    //! Label and command parsing of arbitrary JSON: never a panic, always a typed error or a
    //! message that survives a JSON round trip; a range label parses exactly when it is ordered.

    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    /// JSON values whose objects mostly use the keys labels and commands know.
    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1e6f64..1e6).prop_map(Value::from),
            prop_oneof![Just("adapt"), Just("rollback"), Just("walk"), Just("")]
                .prop_map(Value::from),
            ".{0,8}".prop_map(Value::from),
        ];
        let key = prop_oneof![
            Just("from_ts".to_owned()),
            Just("to_ts".to_owned()),
            Just("window_id".to_owned()),
            Just("class".to_owned()),
            Just("cmd".to_owned()),
            Just("to_version".to_owned()),
            "[a-z_]{0,6}",
        ];
        leaf.prop_recursive(3, 24, 6, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map(key.clone(), inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_json_label_parses_to_a_checked_label_or_a_typed_error(v in json()) {
            match LabelMsg::parse(&serde_json::to_vec(&v).unwrap()) {
                Ok(label) => {
                    if let LabelMsg::Range { from_ts, to_ts, .. } = &label {
                        prop_assert!(from_ts <= to_ts);
                    }
                    let text = serde_json::to_vec(&label).unwrap();
                    prop_assert_eq!(LabelMsg::parse(&text), Ok(label));
                }
                Err(e) => prop_assert!(matches!(e.kind(), "malformed_label" | "empty_range")),
            }
        }

        #[test]
        fn any_json_command_parses_to_a_command_or_a_typed_error(v in json()) {
            match CommandMsg::parse(&serde_json::to_vec(&v).unwrap()) {
                Ok(cmd) => {
                    let text = serde_json::to_vec(&cmd).unwrap();
                    prop_assert_eq!(CommandMsg::parse(&text), Ok(cmd));
                }
                Err(e) => prop_assert_eq!(e.kind(), "malformed_command"),
            }
        }

        #[test]
        fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = LabelMsg::parse(&bytes);
            let _ = CommandMsg::parse(&bytes);
        }

        #[test]
        fn a_range_label_parses_exactly_when_ordered(
            from_ts in any::<i64>(),
            to_ts in any::<i64>(),
            class in ".{0,12}",
        ) {
            let text = serde_json::to_vec(&LabelMsg::Range { from_ts, to_ts, class: class.clone() })
                .unwrap();
            let got = LabelMsg::parse(&text);
            if from_ts <= to_ts {
                prop_assert_eq!(got, Ok(LabelMsg::Range { from_ts, to_ts, class }));
            } else {
                prop_assert_eq!(got, Err(MessageError::EmptyRange { from_ts, to_ts }));
            }
        }

        #[test]
        fn window_labels_and_rollbacks_round_trip(
            window_id in ".{0,12}",
            class in ".{0,12}",
            to_version in proptest::option::of(any::<u64>()),
        ) {
            let label = LabelMsg::Window { window_id, class };
            prop_assert_eq!(LabelMsg::parse(&serde_json::to_vec(&label).unwrap()), Ok(label));
            let cmd = CommandMsg::Rollback { to_version };
            prop_assert_eq!(CommandMsg::parse(&serde_json::to_vec(&cmd).unwrap()), Ok(cmd));
        }
    }
}
