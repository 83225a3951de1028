//! The model manifest, ed25519 keys and manifest signatures.
//!
//! Model flow: cloud trains → distils → exports ONNX → **signs** ([`sign_manifest`]) → gateway
//! receives ([`ReceivedModel`]) → **verifies** ([`ReceivedModel::verify`] → [`VerifiedModel`])
//! → loads → swaps. A [`VerifiedModel`] can only be obtained through verification, so an
//! unverified file cannot reach the model loader.
//!
//! The signature (see `docs/ARCHITECTURE.md`) is ed25519 over
//! `b"diredi-manifest-v1\0" || canonical(manifest without "signature") || b"\0" || sha256(onnx)`,
//! where `sha256(onnx)` is the raw 32-byte digest and `canonical` is `serde_json::to_vec` of
//! the manifest as a `serde_json::Value` with object keys sorted (sorted explicitly here, so
//! the bytes do not depend on serde_json's `preserve_order` feature). Unknown fields are signed
//! too.
//!
//! Numbers must read back exactly as they were signed. This crate enables serde_json's
//! `float_roundtrip` feature (the default parser is off by one unit in the last place for many
//! 17-digit floats), and [`sign_manifest`] signs the manifest as it reads back from its own
//! JSON text, so the returned `Value`, written with any serde_json serializer (compact or
//! pretty), verifies.

use std::collections::BTreeMap;
use std::fmt;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::{SignatureError, Signer as _};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Value of the manifest's `format` field understood by this version.
pub const MANIFEST_FORMAT: &str = "diredi-manifest/1";
/// Domain-separation prefix of the signed message.
pub const SIGNATURE_DOMAIN: &[u8] = b"diredi-manifest-v1\0";
/// The only supported signature algorithm.
pub const SIGNATURE_ALG: &str = "ed25519";

/// Lower-case hex SHA-256 of `bytes`, as written in the manifest's `sha256` field.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

// ---------------------------------------------------------------- manifest types

/// A model manifest (`<model>.json` beside `<model>.onnx`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format; must be [`MANIFEST_FORMAT`].
    pub format: String,
    /// Model family, for example `hapt-student`. Versions of one family share it.
    pub model_id: String,
    /// Version within the family; increases with every release or adaptation.
    pub version: u64,
    /// Version this model was derived from (adaptation, distillation), if any.
    #[serde(default)]
    pub parent_version: Option<u64>,
    /// Creation time, RFC 3339 (for example `2026-11-27T18:00:00Z`).
    pub created_at: String,
    /// File name of the ONNX model, relative to the manifest.
    pub onnx_file: String,
    /// Lower-case hex SHA-256 of the ONNX bytes.
    pub sha256: String,
    /// What the model expects as input.
    pub input: InputSpec,
    /// What the model produces.
    pub output: OutputSpec,
    /// Class names, in the order of the model's output.
    pub classes: Vec<String>,
    /// Number of trainable parameters (informational).
    #[serde(default)]
    pub params: u64,
    /// Evaluation results, free-form (for example `{"presumed_test": {"accuracy": 0.95}}`).
    #[serde(default = "empty_object")]
    pub metrics: Value,
    /// Probe file: inputs with expected outputs, to check the model after loading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<ProbeRef>,
    /// Signature over the rest of the manifest and the ONNX bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<Signature>,
    /// Fields this version does not know, kept so that a round trip loses nothing.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

fn empty_object() -> Value {
    Value::Object(Map::new())
}

/// Tensor layout of the model input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Layout {
    /// `[batch, channels, time]` (the project default).
    #[serde(rename = "NCT")]
    Nct,
    /// `[batch, time, channels]`.
    #[serde(rename = "NTC")]
    Ntc,
}

/// Model input: the window shape and the per-channel standardisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputSpec {
    /// ONNX input name (usually `input`).
    pub name: String,
    /// Tensor layout.
    pub layout: Layout,
    /// Channel names, in model order; sensor payloads are decoded in this order.
    pub channels: Vec<String>,
    /// Samples per window (`T`).
    pub window: usize,
    /// Samples between the starts of consecutive windows.
    pub stride: usize,
    /// Sampling rate the model was trained at, in Hz.
    pub sample_rate_hz: f64,
    /// Per-channel mean subtracted before inference.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation divided by before inference; finite and > 0.
    pub std: Vec<f32>,
}

/// Model output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputSpec {
    /// ONNX output name (usually `probabilities`).
    pub name: String,
    /// Whether the output is already softmaxed.
    pub kind: OutputKind,
}

/// Meaning of the model output values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputKind {
    /// Softmax applied inside the graph; rows sum to 1.
    Probabilities,
    /// Raw scores; the caller applies softmax.
    Logits,
}

/// Reference to a probe file shipped with the model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeRef {
    /// File name, relative to the manifest.
    pub file: String,
    /// Lower-case hex SHA-256 of the file.
    pub sha256: String,
}

/// The manifest signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    /// Algorithm; must be [`SIGNATURE_ALG`].
    pub alg: String,
    /// Id of the signing key ([`PublicKey::key_id`]).
    pub key_id: String,
    /// Base64 of the 64-byte signature.
    pub value: String,
}

impl Manifest {
    /// Parses a manifest from JSON bytes (no verification).
    pub fn from_slice(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        serde_json::from_slice(bytes).map_err(|e| ManifestError::Malformed(e.to_string()))
    }

    /// The manifest as a JSON value, ready for [`sign_manifest`]. Goes through JSON text so
    /// that `f32` fields are written in their short form (`0.1`, not `0.10000000149011612`).
    pub fn to_value(&self) -> Result<Value, ManifestError> {
        serde_json::to_vec(self)
            .and_then(|bytes| serde_json::from_slice(&bytes))
            .map_err(|e| ManifestError::Malformed(e.to_string()))
    }

    /// Checks everything except hash and signature: format, input spec, output, classes.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.format != MANIFEST_FORMAT {
            return Err(ManifestError::UnknownFormat {
                found: self.format.clone(),
            });
        }
        self.input.validate()?;
        if self.output.name.is_empty() {
            return Err(ManifestError::Malformed(
                "output.name is empty; expected the ONNX output name".into(),
            ));
        }
        if self.classes.is_empty() {
            return Err(ManifestError::NoClasses);
        }
        for (i, c) in self.classes.iter().enumerate() {
            if c.is_empty() || self.classes[..i].contains(c) {
                return Err(ManifestError::BadClass { name: c.clone() });
            }
        }
        Ok(())
    }
}

/// Why an input spec is invalid, or two input specs are incompatible.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InputSpecError {
    /// `name` is empty.
    #[error("input.name is empty; expected the ONNX input name")]
    EmptyName,
    /// `channels` is empty.
    #[error("input.channels is empty; expected at least one channel")]
    NoChannels,
    /// A channel name is empty or repeated.
    #[error("input.channels[{index}] = {name:?} is empty or repeated; expected unique names")]
    BadChannelName {
        /// Index in `channels`.
        index: usize,
        /// The name.
        name: String,
    },
    /// `mean` or `std` does not have one entry per channel.
    #[error("input.{field} has {found} entries; expected {expected} (one per channel)")]
    StatsLength {
        /// `mean` or `std`.
        field: &'static str,
        /// Number of channels.
        expected: usize,
        /// Entries found.
        found: usize,
    },
    /// A mean is not finite, or a std is not finite and positive.
    #[error("input.{field}[{index}] = {value}; expected a finite number{}", if *.field == "std" { " > 0" } else { "" })]
    BadStat {
        /// `mean` or `std`.
        field: &'static str,
        /// Channel index.
        index: usize,
        /// The value.
        value: f32,
    },
    /// `window` is 0.
    #[error("input.window is 0; expected at least 1 sample")]
    ZeroWindow,
    /// `stride` is 0.
    #[error("input.stride is 0; expected at least 1 sample")]
    ZeroStride,
    /// `sample_rate_hz` is not finite and positive.
    #[error("input.sample_rate_hz = {value}; expected a finite number > 0")]
    BadSampleRate {
        /// The value.
        value: f64,
    },
    /// Two specs differ in a field that must match.
    #[error("input.{field} differs: current model has {ours}, new model has {theirs}")]
    Incompatible {
        /// `layout`, `channels`, `window` or `sample_rate_hz`.
        field: &'static str,
        /// Value in `self`.
        ours: String,
        /// Value in the other spec.
        theirs: String,
    },
}

impl InputSpec {
    /// Checks the spec: non-empty name, unique non-empty channels, one finite mean and one
    /// finite positive std per channel, `window >= 1`, `stride >= 1`, finite positive rate.
    pub fn validate(&self) -> Result<(), InputSpecError> {
        if self.name.is_empty() {
            return Err(InputSpecError::EmptyName);
        }
        if self.channels.is_empty() {
            return Err(InputSpecError::NoChannels);
        }
        for (index, name) in self.channels.iter().enumerate() {
            if name.is_empty() || self.channels[..index].contains(name) {
                return Err(InputSpecError::BadChannelName {
                    index,
                    name: name.clone(),
                });
            }
        }
        let c = self.channels.len();
        for (field, stats) in [("mean", &self.mean), ("std", &self.std)] {
            if stats.len() != c {
                return Err(InputSpecError::StatsLength {
                    field,
                    expected: c,
                    found: stats.len(),
                });
            }
            let positive = field == "std";
            if let Some((index, &value)) = stats
                .iter()
                .enumerate()
                .find(|(_, v)| !v.is_finite() || (positive && **v <= 0.0))
            {
                return Err(InputSpecError::BadStat {
                    field,
                    index,
                    value,
                });
            }
        }
        if self.window == 0 {
            return Err(InputSpecError::ZeroWindow);
        }
        if self.stride == 0 {
            return Err(InputSpecError::ZeroStride);
        }
        if !(self.sample_rate_hz.is_finite() && self.sample_rate_hz > 0.0) {
            return Err(InputSpecError::BadSampleRate {
                value: self.sample_rate_hz,
            });
        }
        Ok(())
    }

    /// Whether a model with input `other` can replace one with input `self` without
    /// reconfiguring the sensors: same layout, channels (names and order), window and sample
    /// rate. Name, stride and standardisation may differ (they travel with the model).
    pub fn compatible_with(&self, other: &InputSpec) -> Result<(), InputSpecError> {
        fn differ(
            field: &'static str,
            ours: impl fmt::Debug,
            theirs: impl fmt::Debug,
        ) -> InputSpecError {
            InputSpecError::Incompatible {
                field,
                ours: format!("{ours:?}"),
                theirs: format!("{theirs:?}"),
            }
        }
        if self.layout != other.layout {
            return Err(differ("layout", self.layout, other.layout));
        }
        if self.channels != other.channels {
            return Err(differ("channels", &self.channels, &other.channels));
        }
        if self.window != other.window {
            return Err(differ("window", self.window, other.window));
        }
        if self.sample_rate_hz != other.sample_rate_hz {
            return Err(differ(
                "sample_rate_hz",
                self.sample_rate_hz,
                other.sample_rate_hz,
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- errors

/// Why a manifest could not be signed or a received model could not be verified.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ManifestError {
    /// Not JSON, or not the shape of a manifest.
    #[error("malformed manifest: {0}")]
    Malformed(String),
    /// `format` is not [`MANIFEST_FORMAT`].
    #[error("manifest format is {found:?}; expected {MANIFEST_FORMAT:?}")]
    UnknownFormat {
        /// The `format` field.
        found: String,
    },
    /// The ONNX bytes do not hash to the manifest's `sha256`.
    #[error("ONNX sha256 mismatch: manifest says {expected}, file hashes to {found}")]
    HashMismatch {
        /// The manifest's `sha256` field.
        expected: String,
        /// Hex SHA-256 of the bytes received.
        found: String,
    },
    /// The manifest has no signature.
    #[error("manifest is not signed; expected a \"signature\" field")]
    Unsigned,
    /// The signature uses another algorithm.
    #[error("signature algorithm is {found:?}; expected \"ed25519\"")]
    UnsupportedAlg {
        /// The `signature.alg` field.
        found: String,
    },
    /// The signing key is not among the trusted keys.
    #[error("manifest is signed by key {key_id}, which is not trusted")]
    UnknownKey {
        /// The `signature.key_id` field.
        key_id: String,
    },
    /// The signature does not match the manifest and ONNX bytes.
    #[error("signature does not match the manifest and ONNX bytes")]
    BadSignature,
    /// The input spec is invalid.
    #[error("invalid input spec: {0}")]
    InvalidInput(#[from] InputSpecError),
    /// `classes` is empty.
    #[error("classes is empty; expected at least one class")]
    NoClasses,
    /// A class name is empty or repeated.
    #[error("class {name:?} is empty or repeated; expected unique names")]
    BadClass {
        /// The name.
        name: String,
    },
}

/// Why a key could not be created or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not valid base64.
    #[error("key is not valid base64: {0}")]
    Base64(String),
    /// Decoded to the wrong number of bytes.
    #[error("key is {found} bytes; expected 32")]
    Length {
        /// Bytes found.
        found: usize,
    },
    /// The 32 bytes are not a valid ed25519 public key.
    #[error("bytes are not a valid ed25519 public key")]
    InvalidPublicKey,
    /// The operating system random number generator failed.
    #[error("random number generator failed: {0}")]
    Rng(String),
}

/// A bad entry in a list of trusted keys.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("trusted key {index} (0-based): {source}")]
pub struct KeyListError {
    /// Index of the bad entry.
    pub index: usize,
    /// What is wrong with it.
    pub source: KeyError,
}

// ---------------------------------------------------------------- keys

fn decode_key_bytes(text: &str) -> Result<[u8; 32], KeyError> {
    let bytes = BASE64
        .decode(text.trim())
        .map_err(|e| KeyError::Base64(e.to_string()))?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| KeyError::Length { found: bytes.len() })
}

/// An ed25519 private key (32-byte seed). `Debug` shows only the key id.
#[derive(Clone)]
pub struct SigningKey(ed25519_dalek::SigningKey);

impl SigningKey {
    /// A new key from the operating system's random number generator.
    pub fn generate() -> Result<SigningKey, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).map_err(|e| KeyError::Rng(e.to_string()))?;
        Ok(SigningKey::from_seed(&seed))
    }

    /// The key with this 32-byte seed.
    pub fn from_seed(seed: &[u8; 32]) -> SigningKey {
        SigningKey(ed25519_dalek::SigningKey::from_bytes(seed))
    }

    /// Reads a key file's content: base64 of the 32-byte seed (surrounding whitespace ignored).
    pub fn from_base64(text: &str) -> Result<SigningKey, KeyError> {
        decode_key_bytes(text).map(|seed| SigningKey::from_seed(&seed))
    }

    /// Base64 of the 32-byte seed, for a key file.
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0.to_bytes())
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// Id of the public key ([`PublicKey::key_id`]).
    pub fn key_id(&self) -> String {
        self.public().key_id()
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("key_id", &self.key_id())
            .finish_non_exhaustive()
    }
}

/// An ed25519 public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(ed25519_dalek::VerifyingKey);

impl PublicKey {
    /// The key with these 32 raw bytes.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<PublicKey, KeyError> {
        ed25519_dalek::VerifyingKey::from_bytes(bytes)
            .map(PublicKey)
            .map_err(|_: SignatureError| KeyError::InvalidPublicKey)
    }

    /// Reads base64 of the 32 raw bytes (surrounding whitespace ignored).
    pub fn from_base64(text: &str) -> Result<PublicKey, KeyError> {
        PublicKey::from_bytes(&decode_key_bytes(text)?)
    }

    /// Base64 of the 32 raw bytes.
    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0.as_bytes())
    }

    /// The 32 raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        self.0.as_bytes()
    }

    /// Hex of the first 8 bytes of SHA-256 of the raw key bytes (16 hex digits).
    pub fn key_id(&self) -> String {
        hex::encode(&Sha256::digest(self.0.as_bytes())[..8])
    }
}

/// The public keys a gateway accepts model signatures from, indexed by key id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedKeys {
    keys: BTreeMap<String, PublicKey>,
}

impl TrustedKeys {
    /// No trusted key (every signed model is rejected).
    pub fn new() -> TrustedKeys {
        TrustedKeys::default()
    }

    /// Keys from base64 strings (as in the gateway config); fails on the first bad one,
    /// saying which.
    pub fn from_base64_list(list: &[String]) -> Result<TrustedKeys, KeyListError> {
        let mut keys = TrustedKeys::new();
        for (index, text) in list.iter().enumerate() {
            keys.insert(
                PublicKey::from_base64(text).map_err(|source| KeyListError { index, source })?,
            );
        }
        Ok(keys)
    }

    /// Adds a key.
    pub fn insert(&mut self, key: PublicKey) {
        self.keys.insert(key.key_id(), key);
    }

    /// The key with this id.
    pub fn get(&self, key_id: &str) -> Option<&PublicKey> {
        self.keys.get(key_id)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there is no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Ids of the keys, sorted.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }
}

// ---------------------------------------------------------------- signing

/// `value` with every object's keys sorted.
fn sorted(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k.clone(), sorted(v)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

/// The bytes that are signed: domain, canonical manifest without `signature`, NUL, digest.
fn signed_message(manifest: &Value, onnx_digest: &[u8]) -> Result<Vec<u8>, ManifestError> {
    let mut unsigned = manifest.clone();
    if let Value::Object(map) = &mut unsigned {
        map.remove("signature");
    }
    let canonical = serde_json::to_vec(&sorted(&unsigned))
        .map_err(|e| ManifestError::Malformed(e.to_string()))?;
    let mut msg = Vec::with_capacity(SIGNATURE_DOMAIN.len() + canonical.len() + 1 + 32);
    msg.extend_from_slice(SIGNATURE_DOMAIN);
    msg.extend_from_slice(&canonical);
    msg.push(0);
    msg.extend_from_slice(onnx_digest);
    Ok(msg)
}

/// `value` as it reads back from its JSON text, checked to be stable under a further round
/// trip (with `float_roundtrip` the first re-parse already is).
fn json_fixed_point(mut value: Value) -> Result<Value, ManifestError> {
    for _ in 0..8 {
        let bytes =
            serde_json::to_vec(&value).map_err(|e| ManifestError::Malformed(e.to_string()))?;
        let reparsed: Value =
            serde_json::from_slice(&bytes).map_err(|e| ManifestError::Malformed(e.to_string()))?;
        if reparsed == value {
            return Ok(value);
        }
        value = reparsed;
    }
    Err(ManifestError::Malformed(
        "numbers in the manifest do not survive a JSON round trip".into(),
    ))
}

fn check_hash(manifest: &Manifest, onnx_digest: &[u8]) -> Result<(), ManifestError> {
    let found = hex::encode(onnx_digest);
    if manifest.sha256.eq_ignore_ascii_case(&found) {
        Ok(())
    } else {
        Err(ManifestError::HashMismatch {
            expected: manifest.sha256.clone(),
            found,
        })
    }
}

/// Signs a manifest for `onnx` with `key` and returns it with its `signature` field set
/// (replacing any previous one). Write the result with serde_json as it is (compact or
/// pretty); do not rebuild it from a [`Manifest`].
///
/// The caller sets `sha256` (see [`sha256_hex`]); signing fails with
/// [`ManifestError::HashMismatch`] if it does not match `onnx`, and with the same errors as
/// verification if the manifest is invalid.
pub fn sign_manifest(
    manifest: &Value,
    onnx: &[u8],
    key: &SigningKey,
) -> Result<Value, ManifestError> {
    let mut value = manifest.clone();
    let Value::Object(map) = &mut value else {
        return Err(ManifestError::Malformed(
            "manifest is not a JSON object".into(),
        ));
    };
    map.remove("signature");
    let value = json_fixed_point(value)?;
    let typed: Manifest = serde_json::from_value(value.clone())
        .map_err(|e| ManifestError::Malformed(e.to_string()))?;
    let digest = Sha256::digest(onnx);
    check_hash(&typed, &digest)?;
    typed.validate()?;
    sign_unchecked(value, &digest, key)
}

fn sign_unchecked(
    mut value: Value,
    onnx_digest: &[u8],
    key: &SigningKey,
) -> Result<Value, ManifestError> {
    let msg = signed_message(&value, onnx_digest)?;
    let signature = key.0.sign(&msg);
    let signature = Signature {
        alg: SIGNATURE_ALG.to_owned(),
        key_id: key.key_id(),
        value: BASE64.encode(signature.to_bytes()),
    };
    let signature =
        serde_json::to_value(signature).map_err(|e| ManifestError::Malformed(e.to_string()))?;
    if let Value::Object(map) = &mut value {
        map.insert("signature".to_owned(), signature);
    }
    Ok(value)
}

// ---------------------------------------------------------------- verification

/// A model as received (from disk or MQTT), not yet trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedModel {
    /// The manifest file's bytes (JSON).
    pub manifest_json: Vec<u8>,
    /// The ONNX file's bytes.
    pub onnx: Vec<u8>,
}

/// A model whose manifest is valid and whose signature by a trusted key covers both the
/// manifest and the ONNX bytes. Only [`ReceivedModel::verify`] builds one.
#[derive(Debug, Clone)]
pub struct VerifiedModel {
    manifest: Manifest,
    raw: Value,
    onnx: Vec<u8>,
    key_id: String,
}

impl ReceivedModel {
    /// A received model from its two files.
    pub fn new(manifest_json: Vec<u8>, onnx: Vec<u8>) -> ReceivedModel {
        ReceivedModel {
            manifest_json,
            onnx,
        }
    }

    /// Verifies, in order: the manifest is JSON of the manifest shape, its format is known,
    /// the ONNX bytes match `sha256`, it is signed with ed25519 by a key in `keys`, the
    /// signature is valid, the input spec is valid and the classes are non-empty and unique.
    pub fn verify(self, keys: &TrustedKeys) -> Result<VerifiedModel, ManifestError> {
        let raw: Value = serde_json::from_slice(&self.manifest_json)
            .map_err(|e| ManifestError::Malformed(format!("not valid JSON: {e}")))?;
        if let Some(found) = raw.get("format").and_then(Value::as_str) {
            if found != MANIFEST_FORMAT {
                return Err(ManifestError::UnknownFormat {
                    found: found.to_owned(),
                });
            }
        }
        let manifest: Manifest = serde_json::from_value(raw.clone())
            .map_err(|e| ManifestError::Malformed(e.to_string()))?;
        let digest = Sha256::digest(&self.onnx);
        check_hash(&manifest, &digest)?;

        let sig = manifest.signature.as_ref().ok_or(ManifestError::Unsigned)?;
        if sig.alg != SIGNATURE_ALG {
            return Err(ManifestError::UnsupportedAlg {
                found: sig.alg.clone(),
            });
        }
        let key = keys
            .get(&sig.key_id)
            .ok_or_else(|| ManifestError::UnknownKey {
                key_id: sig.key_id.clone(),
            })?;
        let sig_bytes = BASE64
            .decode(sig.value.trim())
            .map_err(|_| ManifestError::BadSignature)?;
        let sig_bytes =
            <[u8; 64]>::try_from(sig_bytes.as_slice()).map_err(|_| ManifestError::BadSignature)?;
        let msg = signed_message(&raw, &digest)?;
        key.0
            .verify_strict(&msg, &ed25519_dalek::Signature::from_bytes(&sig_bytes))
            .map_err(|_| ManifestError::BadSignature)?;

        manifest.validate()?;
        let key_id = sig.key_id.clone();
        Ok(VerifiedModel {
            manifest,
            raw,
            onnx: self.onnx,
            key_id,
        })
    }
}

impl VerifiedModel {
    /// The parsed manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The manifest exactly as signed (including fields this version does not know).
    pub fn raw_manifest(&self) -> &Value {
        &self.raw
    }

    /// The ONNX bytes.
    pub fn onnx(&self) -> &[u8] {
        &self.onnx
    }

    /// Id of the key that signed the model.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The manifest and ONNX bytes, giving up the verified status.
    pub fn into_parts(self) -> (Manifest, Vec<u8>) {
        (self.manifest, self.onnx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const ONNX: &[u8] = b"\x08\x07fake onnx graph bytes";

    fn key(n: u8) -> SigningKey {
        SigningKey::from_seed(&[n; 32])
    }

    fn trusted(k: &SigningKey) -> TrustedKeys {
        let mut t = TrustedKeys::new();
        t.insert(k.public());
        t
    }

    fn input_spec(mean: Vec<f32>) -> InputSpec {
        let c = mean.len();
        InputSpec {
            name: "input".into(),
            layout: Layout::Nct,
            channels: (0..c).map(|i| format!("ch{i}")).collect(),
            window: 128,
            stride: 64,
            sample_rate_hz: 50.0,
            mean,
            std: vec![0.5; c],
        }
    }

    fn manifest(mean: Vec<f32>) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT.into(),
            model_id: "student".into(),
            version: 1,
            parent_version: None,
            created_at: "2026-11-27T18:00:00Z".into(),
            onnx_file: "student-v1.onnx".into(),
            sha256: sha256_hex(ONNX),
            input: input_spec(mean),
            output: OutputSpec {
                name: "probabilities".into(),
                kind: OutputKind::Probabilities,
            },
            classes: vec!["walk".into(), "sit".into()],
            params: 30_000,
            metrics: json!({"presumed_test": {"accuracy": 0.95}}),
            probe: None,
            signature: None,
            extra: BTreeMap::new(),
        }
    }

    fn signed_file(k: &SigningKey) -> Vec<u8> {
        let mut v = manifest(vec![0.1, -9.81, 1e-3]).to_value().unwrap();
        v["notes"] = json!("unknown field, signed too");
        serde_json::to_vec_pretty(&sign_manifest(&v, ONNX, k).unwrap()).unwrap()
    }

    fn edit(file: &[u8], f: impl FnOnce(&mut Value)) -> Vec<u8> {
        let mut v: Value = serde_json::from_slice(file).unwrap();
        f(&mut v);
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn signed_model_verifies_and_keeps_unknown_fields() {
        let k = key(1);
        let m = ReceivedModel::new(signed_file(&k), ONNX.to_vec())
            .verify(&trusted(&k))
            .unwrap();
        assert_eq!(m.key_id(), k.key_id());
        assert_eq!(m.onnx(), ONNX);
        assert_eq!(m.manifest().input.mean, vec![0.1, -9.81, 1e-3]);
        assert_eq!(m.manifest().extra["notes"], "unknown field, signed too");
        assert_eq!(m.raw_manifest()["signature"]["alg"], "ed25519");
    }

    #[test]
    fn key_order_and_whitespace_do_not_matter() {
        let k = key(1);
        let v: Value = serde_json::from_slice(&signed_file(&k)).unwrap();
        // Write the top-level keys in reverse order with odd spacing; the canonical form sorts
        // them again.
        let entries: Vec<String> = v
            .as_object()
            .unwrap()
            .iter()
            .rev()
            .map(|(key, value)| format!("\n\t{} :  {}", Value::from(key.as_str()), value))
            .collect();
        let text = format!("{{{}\n}}", entries.join(" ,"));
        assert!(text.starts_with("{\n\t\"version\""), "{text}");
        ReceivedModel::new(text.into_bytes(), ONNX.to_vec())
            .verify(&trusted(&k))
            .unwrap();
    }

    #[test]
    fn tampered_model_byte_is_a_hash_mismatch() {
        let k = key(1);
        let mut onnx = ONNX.to_vec();
        onnx[3] ^= 1;
        let err = ReceivedModel::new(signed_file(&k), onnx)
            .verify(&trusted(&k))
            .unwrap_err();
        assert!(matches!(err, ManifestError::HashMismatch { .. }), "{err}");
    }

    #[test]
    fn truncated_model_is_a_hash_mismatch() {
        let k = key(1);
        let err = ReceivedModel::new(signed_file(&k), ONNX[..ONNX.len() - 1].to_vec())
            .verify(&trusted(&k))
            .unwrap_err();
        assert_eq!(
            err,
            ManifestError::HashMismatch {
                expected: sha256_hex(ONNX),
                found: sha256_hex(&ONNX[..ONNX.len() - 1])
            }
        );
    }

    #[test]
    fn tampered_manifest_fields_break_the_signature() {
        let k = key(1);
        let file = signed_file(&k);
        let edits: [fn(&mut Value); 4] = [
            |v| v["version"] = json!(2),
            |v| v["notes"] = json!("changed"),
            |v| v["input"]["std"][0] = json!(0.25),
            |v| v["extra_field"] = json!(true),
        ];
        for f in edits {
            let err = ReceivedModel::new(edit(&file, f), ONNX.to_vec())
                .verify(&trusted(&k))
                .unwrap_err();
            assert_eq!(err, ManifestError::BadSignature);
        }
    }

    #[test]
    fn swapped_model_with_matching_hash_breaks_the_signature() {
        let k = key(1);
        let other = b"another model".to_vec();
        let file = edit(&signed_file(&k), |v| {
            v["sha256"] = json!(sha256_hex(&other))
        });
        let err = ReceivedModel::new(file, other)
            .verify(&trusted(&k))
            .unwrap_err();
        assert_eq!(err, ManifestError::BadSignature);
    }

    #[test]
    fn unknown_key_and_unsigned_manifest_are_rejected() {
        let err = ReceivedModel::new(signed_file(&key(1)), ONNX.to_vec())
            .verify(&trusted(&key(2)))
            .unwrap_err();
        assert_eq!(
            err,
            ManifestError::UnknownKey {
                key_id: key(1).key_id()
            }
        );
        let unsigned = edit(&signed_file(&key(1)), |v| {
            v.as_object_mut().unwrap().remove("signature");
        });
        let err = ReceivedModel::new(unsigned, ONNX.to_vec())
            .verify(&trusted(&key(1)))
            .unwrap_err();
        assert_eq!(err, ManifestError::Unsigned);
        let forged = edit(&signed_file(&key(2)), |v| {
            v["signature"]["key_id"] = json!(key(1).key_id())
        });
        let err = ReceivedModel::new(forged, ONNX.to_vec())
            .verify(&trusted(&key(1)))
            .unwrap_err();
        assert_eq!(err, ManifestError::BadSignature);
    }

    #[test]
    fn malformed_and_foreign_manifests_are_rejected() {
        let k = key(1);
        let t = trusted(&k);
        let verify = |bytes: Vec<u8>| ReceivedModel::new(bytes, ONNX.to_vec()).verify(&t);
        assert!(matches!(
            verify(b"{".to_vec()),
            Err(ManifestError::Malformed(_))
        ));
        let no_input = edit(&signed_file(&k), |v| {
            v.as_object_mut().unwrap().remove("input");
        });
        assert!(matches!(verify(no_input), Err(ManifestError::Malformed(_))));
        let v2 = edit(&signed_file(&k), |v| {
            v["format"] = json!("diredi-manifest/2")
        });
        assert_eq!(
            verify(v2).unwrap_err(),
            ManifestError::UnknownFormat {
                found: "diredi-manifest/2".into()
            }
        );
        let rsa = edit(&signed_file(&k), |v| v["signature"]["alg"] = json!("rsa"));
        assert!(matches!(
            verify(rsa),
            Err(ManifestError::UnsupportedAlg { .. })
        ));
    }

    #[test]
    fn signed_but_invalid_manifest_is_rejected_after_the_signature() {
        let k = key(1);
        let mut m = manifest(vec![0.0, 0.0]);
        m.input.std[1] = 0.0;
        let err = sign_manifest(&m.to_value().unwrap(), ONNX, &k).unwrap_err();
        assert!(matches!(err, ManifestError::InvalidInput(_)), "{err}");
        // A key holder bypassing the checks still cannot get an invalid model installed.
        let signed = sign_unchecked(m.to_value().unwrap(), &Sha256::digest(ONNX), &k).unwrap();
        let err = ReceivedModel::new(serde_json::to_vec(&signed).unwrap(), ONNX.to_vec())
            .verify(&trusted(&k))
            .unwrap_err();
        assert_eq!(
            err,
            ManifestError::InvalidInput(InputSpecError::BadStat {
                field: "std",
                index: 1,
                value: 0.0
            })
        );
        let mut m = manifest(vec![0.0]);
        m.classes.clear();
        let signed = sign_unchecked(m.to_value().unwrap(), &Sha256::digest(ONNX), &k).unwrap();
        let err = ReceivedModel::new(serde_json::to_vec(&signed).unwrap(), ONNX.to_vec())
            .verify(&trusted(&k))
            .unwrap_err();
        assert_eq!(err, ManifestError::NoClasses);
    }

    #[test]
    fn signing_refuses_a_wrong_sha256() {
        let mut m = manifest(vec![0.0]);
        m.sha256 = sha256_hex(b"other");
        let err = sign_manifest(&m.to_value().unwrap(), ONNX, &key(1)).unwrap_err();
        assert!(matches!(err, ManifestError::HashMismatch { .. }));
    }

    #[test]
    fn keys_round_trip_through_base64_and_have_16_hex_ids() {
        let k = SigningKey::generate().unwrap();
        let k2 = SigningKey::from_base64(&format!("{}\n", k.to_base64())).unwrap();
        assert_eq!(k.public(), k2.public());
        assert_ne!(k.public(), SigningKey::generate().unwrap().public());
        let id = k.key_id();
        assert_eq!(id.len(), 16);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(id, hex::encode(&Sha256::digest(k.public().as_bytes())[..8]));
        assert!(!format!("{k:?}").contains(&k.to_base64()));

        let list = vec![k.public().to_base64(), key(3).public().to_base64()];
        let t = TrustedKeys::from_base64_list(&list).unwrap();
        assert_eq!(t.len(), 2);
        assert!(t.get(&id).is_some());
        assert_eq!(
            TrustedKeys::from_base64_list(&[list[0].clone(), "AAAA".into()]),
            Err(KeyListError {
                index: 1,
                source: KeyError::Length { found: 3 }
            })
        );
        assert!(matches!(
            PublicKey::from_base64("%%"),
            Err(KeyError::Base64(_))
        ));
    }

    #[test]
    fn input_spec_validation_reports_the_first_problem() {
        let ok = input_spec(vec![0.0, 1.0]);
        assert_eq!(ok.validate(), Ok(()));
        type Edit = fn(&mut InputSpec);
        let cases: [(Edit, &str); 6] = [
            (
                |s| {
                    s.mean.pop();
                },
                "input.mean has 1 entries; expected 2",
            ),
            (|s| s.std[0] = f32::NAN, "input.std[0] = NaN"),
            (|s| s.mean[1] = f32::INFINITY, "input.mean[1] = inf"),
            (|s| s.window = 0, "input.window is 0"),
            (
                |s| s.channels[1] = "ch0".into(),
                "input.channels[1] = \"ch0\"",
            ),
            (|s| s.sample_rate_hz = -1.0, "input.sample_rate_hz = -1"),
        ];
        for (f, msg) in cases {
            let mut s = ok.clone();
            f(&mut s);
            let err = s.validate().unwrap_err().to_string();
            assert!(err.starts_with(msg), "{err}");
        }
        let mut s = ok.clone();
        s.stride = 0;
        assert_eq!(s.validate(), Err(InputSpecError::ZeroStride));
    }

    #[test]
    fn compatible_specs_share_layout_channels_window_and_rate() {
        let a = input_spec(vec![0.0, 1.0]);
        let mut b = a.clone();
        b.mean = vec![5.0, 6.0];
        b.stride = 32;
        assert_eq!(a.compatible_with(&b), Ok(()));
        b.window = 64;
        assert!(matches!(
            a.compatible_with(&b),
            Err(InputSpecError::Incompatible {
                field: "window",
                ..
            })
        ));
        let mut c = a.clone();
        c.channels.swap(0, 1);
        assert!(matches!(
            a.compatible_with(&c),
            Err(InputSpecError::Incompatible {
                field: "channels",
                ..
            })
        ));
        let mut d = a.clone();
        d.layout = Layout::Ntc;
        assert!(a.compatible_with(&d).is_err());
    }

    #[test]
    fn manifest_json_matches_the_documented_layout() {
        let v = manifest(vec![0.1]).to_value().unwrap();
        assert_eq!(v["input"]["layout"], "NCT");
        assert_eq!(v["output"]["kind"], "probabilities");
        assert_eq!(v["parent_version"], Value::Null);
        assert_eq!(v["input"]["mean"][0].as_f64(), Some(0.1));
        assert!(v.get("signature").is_none() && v.get("probe").is_none());
        let back: Manifest = serde_json::from_value(v).unwrap();
        assert_eq!(back, manifest(vec![0.1]));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn signatures_survive_writing_and_reading_any_f32_stats(
            mean in proptest::collection::vec(proptest::num::f32::NORMAL, 1..6),
            rate in 1e-3f64..1e5,
            pretty in any::<bool>(),
        ) {
            let k = key(7);
            let mut m = manifest(mean);
            m.input.sample_rate_hz = rate;
            let mut v = m.to_value().unwrap();
            // f64 numbers that are not f32 values, the hardest case for float parsing.
            v["metrics"] = json!({"x": rate / 3.0, "y": [1e-300, 2.5e300]});
            let signed = sign_manifest(&v, ONNX, &k).unwrap();
            let file = if pretty {
                serde_json::to_vec_pretty(&signed).unwrap()
            } else {
                serde_json::to_vec(&signed).unwrap()
            };
            let verified = ReceivedModel::new(file, ONNX.to_vec()).verify(&trusted(&k));
            prop_assert!(verified.is_ok(), "{:?}", verified.err());
        }
    }
}
