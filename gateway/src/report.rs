//! Outgoing messages and the error topic.
//!
//! Data flow: any stage → [`Publisher`] → MQTT client queue → broker. Rejected inputs (route or
//! decode → **report**) become one [`ErrorReport`] on `diredi/v1/{gw}/error`, counted by kind in
//! the metrics and logged at DEBUG, subject to the per-sensor budget of [`crate::ratelimit`].
//!
//! [`Publisher`] is the only thing the pipeline knows about MQTT: `try_publish` never blocks
//! (the rumqttc client queue is bounded), and a full queue drops the message and counts it.

use std::sync::Arc;

use diredi_protocol::messages::ErrorMsg;
use rumqttc::{AsyncClient, QoS};
use serde::Serialize;

use crate::metrics::Metrics;
use crate::ratelimit::Verdict;

/// Why a message could not be handed to the MQTT client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The client's request queue is full (broker slow or unreachable).
    #[error("MQTT client queue is full")]
    Full,
    /// The MQTT client has stopped.
    #[error("MQTT client is closed")]
    Closed,
}

/// Hands messages to an MQTT connection without blocking.
pub trait Publisher: Send + Sync + 'static {
    /// Queues one message; fails at once if the queue is full.
    fn try_publish(
        &self,
        topic: String,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
    ) -> Result<(), PublishError>;

    /// Queues messages made together (the results of one inference batch), not retained;
    /// returns how many were dropped. One by one unless the publisher can do better.
    fn try_publish_batch(&self, qos: QoS, batch: Vec<(String, Vec<u8>)>) -> usize {
        batch
            .into_iter()
            .map(|(topic, payload)| self.try_publish(topic, qos, false, payload))
            .filter(Result::is_err)
            .count()
    }
}

impl Publisher for AsyncClient {
    fn try_publish(
        &self,
        topic: String,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
    ) -> Result<(), PublishError> {
        AsyncClient::try_publish(self, topic, qos, retain, payload).map_err(|e| match e {
            rumqttc::ClientError::TryRequest(_) | rumqttc::ClientError::Request(_) => {
                PublishError::Full
            }
        })
    }
}

/// QoS from its number (validated config: 0 or 1; anything else is QoS 1).
pub fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        _ => QoS::AtLeastOnce,
    }
}

/// Payload of the error topic: the contract's [`ErrorMsg`] plus the number of errors of the
/// same sensor suppressed since the previous report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorReport {
    /// The contract fields.
    #[serde(flatten)]
    pub base: ErrorMsg,
    /// Errors of this sensor (or topic) suppressed by the rate limit since the previous report.
    pub suppressed: u64,
}

/// Publishes rejected inputs on the error topic.
#[derive(Clone)]
pub struct Reporter {
    publisher: Arc<dyn Publisher>,
    topic: String,
    qos: QoS,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reporter")
            .field("topic", &self.topic)
            .finish()
    }
}

impl Reporter {
    /// A reporter publishing on `topic` (the gateway's error topic).
    pub fn new(
        publisher: Arc<dyn Publisher>,
        topic: String,
        qos: QoS,
        metrics: Arc<Metrics>,
    ) -> Self {
        Reporter {
            publisher,
            topic,
            qos,
            metrics,
        }
    }

    /// The publisher behind this reporter.
    pub fn publisher(&self) -> &dyn Publisher {
        self.publisher.as_ref()
    }

    /// Counts the rejection under `msg.kind`, logs it at DEBUG and publishes it if `verdict`
    /// allows; a suppressed one is counted in `errors_suppressed`.
    pub fn reject(&self, verdict: Verdict, msg: ErrorMsg) {
        self.metrics.reject(&msg.kind);
        tracing::debug!(topic = %msg.topic, sensor = ?msg.sensor, kind = %msg.kind, reason = %msg.reason, "Rejected input.");
        match verdict {
            Verdict::Suppress => Metrics::add(&self.metrics.errors_suppressed, 1),
            Verdict::Send { suppressed_before } => {
                let report = ErrorReport {
                    base: msg,
                    suppressed: suppressed_before,
                };
                match serde_json::to_vec(&report) {
                    Ok(payload) => {
                        if self
                            .publisher
                            .try_publish(self.topic.clone(), self.qos, false, payload)
                            .is_err()
                        {
                            Metrics::add(&self.metrics.publish_dropped, 1);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "Cannot serialise an error report."),
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records published messages; `capacity` simulates a full client queue.
    #[derive(Debug, Default)]
    pub(crate) struct Recorder {
        pub messages: Mutex<Vec<(String, bool, Vec<u8>)>>,
        pub capacity: Option<usize>,
    }

    impl Recorder {
        pub(crate) fn on(&self, topic_suffix: &str) -> Vec<serde_json::Value> {
            self.messages
                .lock()
                .unwrap()
                .iter()
                .filter(|(t, _, _)| t.ends_with(topic_suffix))
                .map(|(_, _, p)| serde_json::from_slice(p).unwrap())
                .collect()
        }
    }

    impl Publisher for Recorder {
        fn try_publish(
            &self,
            topic: String,
            _qos: QoS,
            retain: bool,
            payload: Vec<u8>,
        ) -> Result<(), PublishError> {
            let mut m = self.messages.lock().unwrap();
            if self.capacity.is_some_and(|c| m.len() >= c) {
                return Err(PublishError::Full);
            }
            m.push((topic, retain, payload));
            Ok(())
        }
    }

    fn msg(kind: &str) -> ErrorMsg {
        ErrorMsg {
            topic: "diredi/v1/gw/sensor/s".into(),
            sensor: Some("s".into()),
            reason: "bad".into(),
            kind: kind.into(),
            ts: 1,
        }
    }

    #[test]
    fn rejections_are_counted_and_published_with_the_suppressed_count() {
        let rec = Arc::new(Recorder::default());
        let metrics = Arc::new(Metrics::new());
        let r = Reporter::new(
            rec.clone(),
            "diredi/v1/gw/error".into(),
            QoS::AtMostOnce,
            metrics.clone(),
        );
        r.reject(
            Verdict::Send {
                suppressed_before: 0,
            },
            msg("empty"),
        );
        r.reject(Verdict::Suppress, msg("empty"));
        r.reject(
            Verdict::Send {
                suppressed_before: 1,
            },
            msg("non_finite"),
        );
        let sent = rec.on("/error");
        assert_eq!(sent.len(), 2);
        assert_eq!(sent[0]["kind"], "empty");
        assert_eq!(sent[0]["sensor"], "s");
        assert_eq!(sent[1]["suppressed"], 1);
        assert_eq!(metrics.rejected("empty"), 2);
        assert_eq!(metrics.rejected("non_finite"), 1);
        assert_eq!(
            metrics
                .errors_suppressed
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn a_full_client_queue_is_counted_not_fatal() {
        let rec = Arc::new(Recorder {
            capacity: Some(0),
            ..Recorder::default()
        });
        let metrics = Arc::new(Metrics::new());
        let r = Reporter::new(rec, "e".into(), QoS::AtMostOnce, metrics.clone());
        r.reject(
            Verdict::Send {
                suppressed_before: 0,
            },
            msg("empty"),
        );
        assert_eq!(
            metrics
                .publish_dropped
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }
}
