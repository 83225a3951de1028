//! The DiReDi wire contract, shared by the gateway and the cloud worker so they cannot drift
//! apart. Pure code: no I/O, no async; callers pass bytes and strings.
//!
//! | module | what it holds |
//! |---|---|
//! | [`topics`] | MQTT topic names under `diredi/v1/{gateway_id}/` and routing of received topics |
//! | [`sensor`] | sensor payload decoding (binary `DRB1`, JSON, SenML) into a reused [`SensorBatch`], and encoders for simulators and benchmarks |
//! | [`messages`] | JSON messages: inference, status, metrics, error, label, command |
//! | [`manifest`] | the model manifest, ed25519 keys, signing, and the `ReceivedModel → VerifiedModel` check |
//!
//! Data flow on the gateway: MQTT in → [`Topics::route`] → [`decode_sensor`] → window → infer
//! → [`InferenceMsg`] out. Model flow: [`sign_manifest`] in the cloud → [`ReceivedModel::verify`]
//! on the gateway → load → swap. The formats themselves are specified in
//! `docs/ARCHITECTURE.md`.

pub mod dispatch;
pub mod manifest;
pub mod messages;
pub mod sensor;
pub mod topics;

pub use manifest::{
    sha256_hex, sign_manifest, InputSpec, InputSpecError, KeyError, KeyListError, Layout, Manifest,
    ManifestError, OutputKind, OutputSpec, ProbeRef, PublicKey, ReceivedModel, Signature,
    SigningKey, TrustedKeys, VerifiedModel, MANIFEST_FORMAT,
};
pub use messages::{
    CommandMsg, ErrorMsg, GatewayState, InferenceMsg, InstallStatus, KnowledgeAckMsg, LabelMsg,
    MessageError, MetricsMsg, StatusMsg,
};
pub use sensor::{
    decode_sensor, detect_format, encode_binary, encode_json, encode_senml, DecodeError,
    DecodeLimits, Format, SensorBatch,
};
pub use topics::{validate_id, Route, TopicError, Topics, FLEET_MODEL};
