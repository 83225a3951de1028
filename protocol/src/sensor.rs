//! Sensor payload codecs.
//!
//! Data flow: MQTT in → route → **decode** → per-sensor window → infer → publish. The gateway
//! calls [`decode_sensor`] on the payload of every `diredi/v1/{gw}/sensor/{id}` message with the
//! channel names of the active model and a reused [`SensorBatch`], so the hot path allocates
//! nothing once the batch has grown to its working size.
//!
//! Three formats, detected from the first bytes (see `docs/ARCHITECTURE.md`):
//!
//! - **binary** (`DRB1` magic): 16-byte header `b"DRB1"`, `u16 LE channels`, `u16 LE flags`
//!   (bit 0: timestamp present; other bits must be 0), `i64 LE ts_ms`; then one frame of
//!   `channels` × `f32 LE` per sample.
//! - **JSON** (first non-whitespace byte `{`): `{"ts": <unix ms, optional>, "values": [[c0, ..,
//!   cN], ..]}`, one inner array per sample, in the model's channel order. Unknown keys are
//!   ignored.
//! - **SenML** (first non-whitespace byte `[`, RFC 8428): numeric records (`v`, plus `bv`). A
//!   record belongs to channel `c` when its `n` equals `c`, or when the resolved name `bn + n`
//!   equals `c`. Records with the same resolved time `bt + t` (seconds) form one sample, which
//!   must carry every channel exactly once; samples must come in increasing time order. Fields
//!   ending in `_` (must-understand) and non-numeric values (`vs`, `vb`, `vd`) are rejected.
//!
//! `ts_ms` is the time of the first sample; later samples follow at `1 / sample_rate_hz`. A SenML
//! time below 2^28 s is relative to "now" (RFC 8428 §4.5.3) and gives `ts_ms = None`, as does a
//! binary payload without the timestamp flag or a JSON payload without `ts`.
//!
//! Every value must be finite as an `f32` (numbers beyond `f32::MAX` are rejected, not turned
//! into infinities). Sample and channel indices in errors are 0-based.

use std::borrow::Cow;
use std::fmt::{self, Write as _};

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

/// Magic bytes that open a binary payload.
pub const BINARY_MAGIC: &[u8; 4] = b"DRB1";
/// Length of the binary header in bytes.
pub const BINARY_HEADER_LEN: usize = 16;
/// Binary header flag: the `ts_ms` field holds the time of the first sample.
pub const BINARY_FLAG_TS: u16 = 1;

/// SenML times below this many seconds are relative to the receiver's clock (RFC 8428 §4.5.3).
const SENML_RELATIVE_TIME_LIMIT: f64 = 268_435_456.0;

/// Bounds applied while decoding, so a hostile payload cannot make the gateway allocate without
/// limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest accepted payload, in bytes; checked before any parsing.
    pub max_payload_bytes: usize,
    /// Largest number of samples (rows) in one payload.
    pub max_samples: usize,
}

impl Default for DecodeLimits {
    /// 256 KiB and 4096 samples.
    fn default() -> Self {
        DecodeLimits {
            max_payload_bytes: 256 * 1024,
            max_samples: 4096,
        }
    }
}

/// Decoded samples of one payload.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SensorBatch {
    /// Unix time of the first sample in milliseconds, when the payload carries an absolute one.
    pub ts_ms: Option<i64>,
    /// Number of channels per sample (the length of the channel list passed to the decoder).
    pub channels: usize,
    /// Values, row-major: `samples × channels`, in the channel order given to the decoder.
    pub values: Vec<f32>,
}

impl SensorBatch {
    /// An empty batch; reuse it across calls to [`decode_sensor`].
    pub fn new() -> Self {
        SensorBatch::default()
    }

    /// Number of samples (rows).
    pub fn samples(&self) -> usize {
        self.values.len().checked_div(self.channels).unwrap_or(0)
    }

    /// Iterator over the samples, each a slice of `channels` values.
    pub fn rows(&self) -> impl Iterator<Item = &[f32]> {
        self.values.chunks_exact(self.channels.max(1))
    }
}

/// Payload format, as detected by [`detect_format`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `DRB1` binary frames.
    Binary,
    /// `{"ts", "values"}` JSON object.
    Json,
    /// SenML JSON pack (RFC 8428).
    Senml,
}

impl Format {
    /// Lowercase name: `binary`, `json` or `senml`.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Binary => "binary",
            Format::Json => "json",
            Format::Senml => "senml",
        }
    }
}

/// Detects the payload format from its first bytes; `None` for anything else.
pub fn detect_format(payload: &[u8]) -> Option<Format> {
    if payload.starts_with(BINARY_MAGIC) {
        return Some(Format::Binary);
    }
    match payload.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => Some(Format::Json),
        Some(b'[') => Some(Format::Senml),
        _ => None,
    }
}

/// Why a sensor payload was rejected. [`DecodeError::kind`] gives a short stable code for
/// metrics and the error topic; `Display` gives the human reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// The decoder was given an empty channel list (a configuration bug, not a payload problem).
    #[error("no channels configured; expected the model's channel list")]
    NoChannels,
    /// The payload exceeds [`DecodeLimits::max_payload_bytes`].
    #[error("payload is {size} bytes; expected at most {max}")]
    TooLarge {
        /// Payload size in bytes.
        size: usize,
        /// Configured maximum.
        max: usize,
    },
    /// The payload holds more than [`DecodeLimits::max_samples`] samples.
    #[error("payload holds more than {max} samples")]
    TooManySamples {
        /// Configured maximum.
        max: usize,
    },
    /// The payload is well formed but holds no sample.
    #[error("payload holds no sample")]
    Empty,
    /// The payload starts with neither `DRB1`, `{` nor `[`.
    #[error("unknown payload format (first byte {}); expected DRB1 binary, a JSON object or a SenML array", fmt_first_byte(.first_byte))]
    UnknownFormat {
        /// First byte of the payload, `None` if the payload is empty or only whitespace.
        first_byte: Option<u8>,
    },
    /// The JSON format payload is not valid JSON or not the expected shape.
    #[error("malformed JSON payload: {detail}")]
    MalformedJson {
        /// Parser message, with line and column.
        detail: String,
    },
    /// The SenML payload is not valid JSON, not a SenML pack, or uses unsupported features.
    #[error("malformed SenML payload: {detail}")]
    MalformedSenml {
        /// What is wrong, with the record or line and column.
        detail: String,
    },
    /// The binary header is shorter than 16 bytes.
    #[error(
        "binary payload is {len} bytes; expected at least the {BINARY_HEADER_LEN}-byte header"
    )]
    BinaryTruncated {
        /// Payload length in bytes.
        len: usize,
    },
    /// The binary header sets flag bits this version does not know.
    #[error("binary header flags are {flags:#06x}; expected only bit 0 (timestamp present)")]
    BinaryFlags {
        /// The flags field.
        flags: u16,
    },
    /// The binary body is not a whole number of frames.
    #[error(
        "binary body is {body_len} bytes; expected a multiple of the {frame_bytes}-byte frame"
    )]
    BinaryLength {
        /// Body length (after the header) in bytes.
        body_len: usize,
        /// Frame size: channels × 4 bytes.
        frame_bytes: usize,
    },
    /// A sample (JSON row) or the binary header has the wrong number of channels.
    #[error("{}expected {expected} values (one per channel), found {found}", fmt_sample(.sample))]
    ChannelCount {
        /// Sample (row) index; `None` for the binary header's channel count.
        sample: Option<usize>,
        /// Channels of the model.
        expected: usize,
        /// Values found.
        found: usize,
    },
    /// A value is NaN, infinite, or too large for an `f32`.
    #[error("sample {sample}, channel {channel}: value is not a finite f32")]
    NonFinite {
        /// Sample (row) index.
        sample: usize,
        /// Channel name.
        channel: String,
    },
    /// A SenML record names no configured channel.
    #[error("SenML record {record}: name {name:?} is not one of the model's channels")]
    UnknownChannel {
        /// Record index in the pack.
        record: usize,
        /// Resolved name (`bn` + `n`).
        name: String,
    },
    /// A SenML sample lacks a channel.
    #[error("SenML sample {sample}: channel {channel:?} is missing")]
    MissingChannel {
        /// Sample index.
        sample: usize,
        /// Name of the missing channel.
        channel: String,
    },
    /// A SenML sample carries a channel twice.
    #[error("SenML record {record}: channel {channel:?} appears twice at the same time")]
    DuplicateChannel {
        /// Record index in the pack.
        record: usize,
        /// Channel name.
        channel: String,
    },
    /// A SenML record goes back in time or returns to an earlier sample.
    #[error(
        "SenML record {record}: time goes backwards; expected samples in increasing time order"
    )]
    TimeOrder {
        /// Record index in the pack.
        record: usize,
    },
}

fn fmt_first_byte(b: &Option<u8>) -> String {
    match b {
        None => "none, payload empty".to_owned(),
        Some(b) if b.is_ascii_graphic() => format!("{:?}", *b as char),
        Some(b) => format!("{b:#04x}"),
    }
}

fn fmt_sample(s: &Option<usize>) -> String {
    match s {
        Some(s) => format!("sample {s}: "),
        None => "binary header: ".to_owned(),
    }
}

impl DecodeError {
    /// Every code [`DecodeError::kind`] can return, for pre-registering counters.
    pub const ALL_KINDS: &'static [&'static str] = &[
        "no_channels",
        "too_large",
        "too_many_samples",
        "empty",
        "unknown_format",
        "malformed_json",
        "malformed_senml",
        "bad_binary",
        "channel_count",
        "non_finite",
        "unknown_channel",
        "missing_channel",
        "duplicate_channel",
        "time_order",
    ];

    /// Short stable code for metrics and the error topic (one of [`DecodeError::ALL_KINDS`]).
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::NoChannels => "no_channels",
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::TooManySamples { .. } => "too_many_samples",
            DecodeError::Empty => "empty",
            DecodeError::UnknownFormat { .. } => "unknown_format",
            DecodeError::MalformedJson { .. } => "malformed_json",
            DecodeError::MalformedSenml { .. } => "malformed_senml",
            DecodeError::BinaryTruncated { .. }
            | DecodeError::BinaryFlags { .. }
            | DecodeError::BinaryLength { .. } => "bad_binary",
            DecodeError::ChannelCount { .. } => "channel_count",
            DecodeError::NonFinite { .. } => "non_finite",
            DecodeError::UnknownChannel { .. } => "unknown_channel",
            DecodeError::MissingChannel { .. } => "missing_channel",
            DecodeError::DuplicateChannel { .. } => "duplicate_channel",
            DecodeError::TimeOrder { .. } => "time_order",
        }
    }
}

/// Decodes one sensor payload into `out`, whose previous content is replaced (its allocation is
/// kept). `channels` are the model's channel names, in model order. On error `out` is left
/// empty (`values` cleared, `ts_ms = None`).
pub fn decode_sensor(
    payload: &[u8],
    channels: &[String],
    limits: &DecodeLimits,
    out: &mut SensorBatch,
) -> Result<(), DecodeError> {
    out.values.clear();
    out.ts_ms = None;
    out.channels = channels.len();
    let result = decode_inner(payload, channels, limits, out);
    match result {
        Ok(()) if out.values.is_empty() => {
            out.ts_ms = None;
            Err(DecodeError::Empty)
        }
        Ok(()) => Ok(()),
        Err(e) => {
            out.values.clear();
            out.ts_ms = None;
            Err(e)
        }
    }
}

fn decode_inner(
    payload: &[u8],
    channels: &[String],
    limits: &DecodeLimits,
    out: &mut SensorBatch,
) -> Result<(), DecodeError> {
    if channels.is_empty() {
        return Err(DecodeError::NoChannels);
    }
    if payload.len() > limits.max_payload_bytes {
        return Err(DecodeError::TooLarge {
            size: payload.len(),
            max: limits.max_payload_bytes,
        });
    }
    match detect_format(payload) {
        Some(Format::Binary) => decode_binary(payload, channels, limits, out),
        Some(Format::Json) => decode_json(payload, channels, limits, out),
        Some(Format::Senml) => decode_senml(payload, channels, limits, out),
        None => Err(DecodeError::UnknownFormat {
            first_byte: payload.iter().copied().find(|b| !b.is_ascii_whitespace()),
        }),
    }
}

// ---------------------------------------------------------------- binary

fn decode_binary(
    payload: &[u8],
    channels: &[String],
    limits: &DecodeLimits,
    out: &mut SensorBatch,
) -> Result<(), DecodeError> {
    let (header, body) = match payload.split_at_checked(BINARY_HEADER_LEN) {
        Some(parts) => parts,
        None => return Err(DecodeError::BinaryTruncated { len: payload.len() }),
    };
    let n_channels = usize::from(u16::from_le_bytes([header[4], header[5]]));
    let flags = u16::from_le_bytes([header[6], header[7]]);
    let mut ts = [0u8; 8];
    ts.copy_from_slice(&header[8..16]);
    let ts = i64::from_le_bytes(ts);

    if flags & !BINARY_FLAG_TS != 0 {
        return Err(DecodeError::BinaryFlags { flags });
    }
    if n_channels != channels.len() {
        return Err(DecodeError::ChannelCount {
            sample: None,
            expected: channels.len(),
            found: n_channels,
        });
    }
    let frame_bytes = n_channels * 4;
    if !body.len().is_multiple_of(frame_bytes) {
        return Err(DecodeError::BinaryLength {
            body_len: body.len(),
            frame_bytes,
        });
    }
    if body.len() / frame_bytes > limits.max_samples {
        return Err(DecodeError::TooManySamples {
            max: limits.max_samples,
        });
    }
    out.values.reserve(body.len() / 4);
    for (i, b) in body.chunks_exact(4).enumerate() {
        let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        if !v.is_finite() {
            return Err(DecodeError::NonFinite {
                sample: i / n_channels,
                channel: channels[i % n_channels].clone(),
            });
        }
        out.values.push(v);
    }
    out.ts_ms = (flags & BINARY_FLAG_TS != 0).then_some(ts);
    Ok(())
}

/// Encodes `rows` (row-major, `channels` values per sample) as a `DRB1` binary payload.
///
/// # Panics
/// If `channels` is 0 or above `u16::MAX`, or `rows.len()` is not a multiple of `channels`.
pub fn encode_binary(ts_ms: Option<i64>, rows: &[f32], channels: usize) -> Vec<u8> {
    assert_rows(rows, channels);
    let n_channels = u16::try_from(channels).unwrap_or(u16::MAX);
    let mut buf = Vec::with_capacity(BINARY_HEADER_LEN + rows.len() * 4);
    buf.extend_from_slice(BINARY_MAGIC);
    buf.extend_from_slice(&n_channels.to_le_bytes());
    let flags = if ts_ms.is_some() { BINARY_FLAG_TS } else { 0 };
    buf.extend_from_slice(&flags.to_le_bytes());
    buf.extend_from_slice(&ts_ms.unwrap_or(0).to_le_bytes());
    for v in rows {
        buf.extend_from_slice(&v.to_le_bytes());
    }
    buf
}

fn assert_rows(rows: &[f32], channels: usize) {
    assert!(
        (1..=usize::from(u16::MAX)).contains(&channels),
        "channels must be in 1..=65535, got {channels}"
    );
    assert!(
        rows.len().is_multiple_of(channels),
        "rows.len() = {} is not a multiple of channels = {channels}",
        rows.len()
    );
}

// ---------------------------------------------------------------- JSON

/// Decoder state shared by the serde visitors. Visitors can only return `serde_json::Error`,
/// so a structured error is parked in `err` and takes precedence over the serde error.
struct JsonCtx<'a> {
    values: &'a mut Vec<f32>,
    channels: &'a [String],
    max_samples: usize,
    err: Option<DecodeError>,
}

impl JsonCtx<'_> {
    fn fail<E: de::Error>(&mut self, e: DecodeError) -> E {
        let msg = e.to_string();
        self.err = Some(e);
        E::custom(msg)
    }
}

fn decode_json(
    payload: &[u8],
    channels: &[String],
    limits: &DecodeLimits,
    out: &mut SensorBatch,
) -> Result<(), DecodeError> {
    let mut ctx = JsonCtx {
        values: &mut out.values,
        channels,
        max_samples: limits.max_samples,
        err: None,
    };
    let mut de = serde_json::Deserializer::from_slice(payload);
    let result = JsonPayload(&mut ctx)
        .deserialize(&mut de)
        .and_then(|ts| de.end().map(|()| ts));
    match result {
        Ok(ts) => {
            out.ts_ms = ts;
            Ok(())
        }
        Err(e) => Err(ctx.err.take().unwrap_or(DecodeError::MalformedJson {
            detail: e.to_string(),
        })),
    }
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum JsonKey {
    Ts,
    Values,
    #[serde(other)]
    Other,
}

struct JsonPayload<'c, 'a>(&'c mut JsonCtx<'a>);

impl<'de> DeserializeSeed<'de> for JsonPayload<'_, '_> {
    type Value = Option<i64>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<i64>, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for JsonPayload<'_, '_> {
    type Value = Option<i64>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(r#"an object {"ts": <unix ms>, "values": [[..], ..]}"#)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<i64>, A::Error> {
        let mut ts: Option<Option<i64>> = None;
        let mut seen_values = false;
        while let Some(key) = map.next_key::<JsonKey>()? {
            match key {
                JsonKey::Ts => {
                    if ts.is_some() {
                        return Err(de::Error::duplicate_field("ts"));
                    }
                    ts = Some(map.next_value()?);
                }
                JsonKey::Values => {
                    if seen_values {
                        return Err(de::Error::duplicate_field("values"));
                    }
                    map.next_value_seed(JsonRows(&mut *self.0))?;
                    seen_values = true;
                }
                JsonKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if !seen_values {
            return Err(de::Error::missing_field("values"));
        }
        Ok(ts.flatten())
    }
}

struct JsonRows<'c, 'a>(&'c mut JsonCtx<'a>);

impl<'de> DeserializeSeed<'de> for JsonRows<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for JsonRows<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of samples, each an array of numbers")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let ctx = self.0;
        if let Some(n) = seq.size_hint() {
            ctx.values
                .reserve(n.min(ctx.max_samples) * ctx.channels.len());
        }
        let mut sample = 0;
        loop {
            if sample == ctx.max_samples {
                if seq.next_element::<IgnoredAny>()?.is_some() {
                    let max = ctx.max_samples;
                    return Err(ctx.fail(DecodeError::TooManySamples { max }));
                }
                return Ok(());
            }
            match seq.next_element_seed(JsonRow {
                ctx: &mut *ctx,
                sample,
            })? {
                Some(()) => sample += 1,
                None => return Ok(()),
            }
        }
    }
}

struct JsonRow<'c, 'a> {
    ctx: &'c mut JsonCtx<'a>,
    sample: usize,
}

impl<'de> DeserializeSeed<'de> for JsonRow<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for JsonRow<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a sample: an array with one number per channel")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let ctx = self.ctx;
        let expected = ctx.channels.len();
        let mut found = 0;
        while let Some(v) = seq.next_element::<f64>()? {
            if found < expected {
                let v = v as f32;
                if !v.is_finite() {
                    let channel = ctx.channels[found].clone();
                    return Err(ctx.fail(DecodeError::NonFinite {
                        sample: self.sample,
                        channel,
                    }));
                }
                ctx.values.push(v);
            }
            found += 1;
        }
        if found != expected {
            return Err(ctx.fail(DecodeError::ChannelCount {
                sample: Some(self.sample),
                expected,
                found,
            }));
        }
        Ok(())
    }
}

/// Encodes `rows` (row-major, `channels` values per sample) as a JSON payload
/// `{"ts": .., "values": [[..], ..]}`. Values are written in shortest round-trip form;
/// non-finite values are written as `null` (which the decoder rejects).
///
/// # Panics
/// If `channels` is 0 or above `u16::MAX`, or `rows.len()` is not a multiple of `channels`.
pub fn encode_json(ts_ms: Option<i64>, rows: &[f32], channels: usize) -> Vec<u8> {
    assert_rows(rows, channels);
    let mut s = String::with_capacity(32 + rows.len() * 12);
    s.push('{');
    if let Some(ts) = ts_ms {
        let _ = write!(s, "\"ts\":{ts},");
    }
    s.push_str("\"values\":[");
    for (i, row) in rows.chunks_exact(channels).enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push('[');
        for (j, v) in row.iter().enumerate() {
            if j > 0 {
                s.push(',');
            }
            write_f32(&mut s, *v);
        }
        s.push(']');
    }
    s.push_str("]}");
    s.into_bytes()
}

fn write_f32(s: &mut String, v: f32) {
    if v.is_finite() {
        let _ = write!(s, "{v:?}");
    } else {
        s.push_str("null");
    }
}

// ---------------------------------------------------------------- SenML

/// A JSON string that borrows from the payload unless it contains escapes.
struct CowStr<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for CowStr<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CowStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<CowStr<'de>, E> {
                Ok(CowStr(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<CowStr<'de>, E> {
                Ok(CowStr(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// SenML record labels (RFC 8428 §4.1, JSON representation).
enum SenmlKey {
    Bn,
    Bt,
    Bv,
    N,
    T,
    V,
    /// `vs`, `vb`, `vd`: string, boolean and data values, which are not sensor samples.
    NonNumeric,
    /// A label ending in `_`, which a receiver must understand or reject (RFC 8428 §4.4).
    MustUnderstand(String),
    /// Units, sums, versions, update time and unknown labels: ignored.
    Ignored,
}

impl<'de> Deserialize<'de> for SenmlKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = SenmlKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a SenML label")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SenmlKey, E> {
                Ok(match v {
                    "bn" => SenmlKey::Bn,
                    "bt" => SenmlKey::Bt,
                    "bv" => SenmlKey::Bv,
                    "n" => SenmlKey::N,
                    "t" => SenmlKey::T,
                    "v" => SenmlKey::V,
                    "vs" | "vb" | "vd" => SenmlKey::NonNumeric,
                    _ if v.ends_with('_') => SenmlKey::MustUnderstand(v.to_owned()),
                    _ => SenmlKey::Ignored,
                })
            }
        }
        d.deserialize_identifier(V)
    }
}

struct SenmlCtx<'a, 'de> {
    values: &'a mut Vec<f32>,
    channels: &'a [String],
    max_samples: usize,
    err: Option<DecodeError>,
    base_name: Cow<'de, str>,
    base_time: f64,
    base_value: f64,
    record: usize,
    /// Time of the sample being filled, and its index.
    current: Option<(f64, usize)>,
    first_time: Option<f64>,
}

impl SenmlCtx<'_, '_> {
    fn fail<E: de::Error>(&mut self, e: DecodeError) -> E {
        let msg = e.to_string();
        self.err = Some(e);
        E::custom(msg)
    }

    fn malformed<E: de::Error>(&mut self, detail: String) -> E {
        self.fail(DecodeError::MalformedSenml { detail })
    }

    fn channel_index(&self, name: &str) -> Option<usize> {
        let bn = self.base_name.as_ref();
        self.channels.iter().position(|c| {
            c == name
                || (c.len() == bn.len() + name.len() && c.starts_with(bn) && c.ends_with(name))
        })
    }

    /// Checks that the sample being filled (the last `channels` values) is complete.
    fn finish_sample(&mut self) -> Result<(), DecodeError> {
        let Some((_, sample)) = self.current else {
            return Ok(());
        };
        let c = self.channels.len();
        let row = &self.values[sample * c..(sample + 1) * c];
        // Values are finite once stored, so NaN marks a channel not seen yet.
        match row.iter().position(|v| v.is_nan()) {
            Some(missing) => Err(DecodeError::MissingChannel {
                sample,
                channel: self.channels[missing].clone(),
            }),
            None => Ok(()),
        }
    }

    fn store(&mut self, time: f64, channel: usize, value: f32) -> Result<(), DecodeError> {
        let c = self.channels.len();
        let sample = match self.current {
            Some((t, sample)) if t == time => sample,
            Some((t, sample)) if time > t => {
                self.finish_sample()?;
                sample + 1
            }
            Some(_) => {
                return Err(DecodeError::TimeOrder {
                    record: self.record,
                })
            }
            None => 0,
        };
        if self.current.map(|(_, s)| s) != Some(sample) {
            if sample == self.max_samples {
                return Err(DecodeError::TooManySamples {
                    max: self.max_samples,
                });
            }
            self.values.extend(std::iter::repeat_n(f32::NAN, c));
            self.current = Some((time, sample));
            self.first_time.get_or_insert(time);
        }
        let slot = &mut self.values[sample * c + channel];
        if !slot.is_nan() {
            return Err(DecodeError::DuplicateChannel {
                record: self.record,
                channel: self.channels[channel].clone(),
            });
        }
        *slot = value;
        Ok(())
    }
}

fn decode_senml(
    payload: &[u8],
    channels: &[String],
    limits: &DecodeLimits,
    out: &mut SensorBatch,
) -> Result<(), DecodeError> {
    let mut ctx = SenmlCtx {
        values: &mut out.values,
        channels,
        max_samples: limits.max_samples,
        err: None,
        base_name: Cow::Borrowed(""),
        base_time: 0.0,
        base_value: 0.0,
        record: 0,
        current: None,
        first_time: None,
    };
    let mut de = serde_json::Deserializer::from_slice(payload);
    let result = SenmlPack(&mut ctx)
        .deserialize(&mut de)
        .and_then(|()| de.end());
    if let Err(e) = result {
        return Err(ctx.err.take().unwrap_or(DecodeError::MalformedSenml {
            detail: e.to_string(),
        }));
    }
    ctx.finish_sample()?;
    out.ts_ms = ctx
        .first_time
        .filter(|t| *t >= SENML_RELATIVE_TIME_LIMIT)
        .map(|t| (t * 1000.0).round() as i64);
    Ok(())
}

struct SenmlPack<'c, 'a, 'de>(&'c mut SenmlCtx<'a, 'de>);

impl<'de> DeserializeSeed<'de> for SenmlPack<'_, '_, 'de> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for SenmlPack<'_, '_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a SenML pack: an array of records")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(SenmlRecord(&mut *self.0))?.is_some() {
            self.0.record += 1;
        }
        Ok(())
    }
}

struct SenmlRecord<'c, 'a, 'de>(&'c mut SenmlCtx<'a, 'de>);

impl<'de> DeserializeSeed<'de> for SenmlRecord<'_, '_, 'de> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for SenmlRecord<'_, '_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a SenML record object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let ctx = self.0;
        let mut name: Option<CowStr<'de>> = None;
        let mut time = 0.0;
        let mut value: Option<f64> = None;
        let mut non_numeric = false;
        while let Some(key) = map.next_key::<SenmlKey>()? {
            match key {
                SenmlKey::Bn => ctx.base_name = map.next_value::<CowStr<'de>>()?.0,
                SenmlKey::Bt => ctx.base_time = map.next_value()?,
                SenmlKey::Bv => ctx.base_value = map.next_value()?,
                SenmlKey::N => name = Some(map.next_value()?),
                SenmlKey::T => time = map.next_value()?,
                SenmlKey::V => value = Some(map.next_value()?),
                SenmlKey::NonNumeric => {
                    non_numeric = true;
                    map.next_value::<IgnoredAny>()?;
                }
                SenmlKey::MustUnderstand(label) => {
                    let record = ctx.record;
                    return Err(ctx.malformed(format!(
                        "record {record}: must-understand label {label:?} is not supported"
                    )));
                }
                SenmlKey::Ignored => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let record = ctx.record;
        let Some(value) = value else {
            let what = if non_numeric {
                "has a non-numeric value (vs/vb/vd); expected a number in v"
            } else {
                "has no value; expected a number in v"
            };
            return Err(ctx.malformed(format!("record {record} {what}")));
        };
        let time = ctx.base_time + time;
        if !time.is_finite() {
            return Err(ctx.malformed(format!("record {record}: time is not finite")));
        }
        let name = name.map(|n| n.0).unwrap_or(Cow::Borrowed(""));
        let Some(channel) = ctx.channel_index(&name) else {
            let name = format!("{}{}", ctx.base_name, name);
            return Err(ctx.fail(DecodeError::UnknownChannel { record, name }));
        };
        let v = (ctx.base_value + value) as f32;
        if !v.is_finite() {
            let sample = ctx
                .current
                .map_or(0, |(t, s)| if t == time { s } else { s + 1 });
            let channel = ctx.channels[channel].clone();
            return Err(ctx.fail(DecodeError::NonFinite { sample, channel }));
        }
        ctx.store(time, channel, v).map_err(|e| ctx.fail(e))
    }
}

/// Encodes `rows` (row-major, one value per channel name) as a SenML pack. The first record
/// carries `bn = base_name` and `bt = ts_ms / 1000`; sample `i` has `t = i / sample_rate_hz`.
/// Non-finite values are written as `null` (which the decoder rejects).
///
/// # Panics
/// If `channel_names` is empty or longer than `u16::MAX`, or `rows.len()` is not a multiple of
/// its length.
pub fn encode_senml(
    base_name: &str,
    ts_ms: i64,
    sample_rate_hz: f64,
    rows: &[f32],
    channel_names: &[String],
) -> Vec<u8> {
    let c = channel_names.len();
    assert_rows(rows, c);
    let names: Vec<String> = channel_names.iter().map(|n| json_string(n)).collect();
    let mut s = String::with_capacity(32 + rows.len() * 32);
    s.push('[');
    for (i, row) in rows.chunks_exact(c).enumerate() {
        for (j, v) in row.iter().enumerate() {
            if i > 0 || j > 0 {
                s.push(',');
            }
            s.push('{');
            if i == 0 && j == 0 {
                let bt = ts_ms as f64 / 1000.0;
                let _ = write!(s, "\"bn\":{},\"bt\":{bt:?},", json_string(base_name));
            }
            let _ = write!(s, "\"n\":{},", names[j]);
            if i > 0 {
                let t = i as f64 / sample_rate_hz;
                let _ = write!(s, "\"t\":{t:?},");
            }
            s.push_str("\"v\":");
            write_f32(&mut s, *v);
            s.push('}');
        }
    }
    s.push(']');
    s.into_bytes()
}

fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("ch{i}")).collect()
    }

    fn decode(payload: &[u8], channels: usize) -> Result<SensorBatch, DecodeError> {
        let mut out = SensorBatch::new();
        decode_sensor(
            payload,
            &names(channels),
            &DecodeLimits::default(),
            &mut out,
        )?;
        Ok(out)
    }

    #[test]
    fn json_payload_decodes_rows_in_order() {
        let b = decode(
            br#" {"ts": 1700000000123, "values": [[1, 2.5, -3], [4e2, 5, 6]]}"#,
            3,
        )
        .unwrap();
        assert_eq!(b.ts_ms, Some(1_700_000_000_123));
        assert_eq!(b.samples(), 2);
        assert_eq!(b.values, vec![1.0, 2.5, -3.0, 400.0, 5.0, 6.0]);
        assert_eq!(b.rows().nth(1), Some(&[400.0, 5.0, 6.0][..]));
    }

    #[test]
    fn json_without_ts_and_with_unknown_keys_is_accepted() {
        let b = decode(br#"{"values": [[1, 2]], "unit": "g", "ts": null}"#, 2).unwrap();
        assert_eq!(b.ts_ms, None);
        assert_eq!(b.values, vec![1.0, 2.0]);
    }

    #[test]
    fn json_row_with_wrong_channel_count_names_row_and_counts() {
        let err = decode(br#"{"values": [[1, 2, 3], [1, 2], [1, 2, 3]]}"#, 3).unwrap_err();
        assert_eq!(
            err,
            DecodeError::ChannelCount {
                sample: Some(1),
                expected: 3,
                found: 2
            }
        );
        assert_eq!(err.kind(), "channel_count");
        assert_eq!(
            err.to_string(),
            "sample 1: expected 3 values (one per channel), found 2"
        );
        let err = decode(br#"{"values": [[1, 2, 3, 4, 5]]}"#, 3).unwrap_err();
        assert_eq!(
            err,
            DecodeError::ChannelCount {
                sample: Some(0),
                expected: 3,
                found: 5
            }
        );
    }

    #[test]
    fn json_number_overflowing_f32_is_non_finite() {
        let err = decode(br#"{"values": [[1, 2], [3, 1e39]]}"#, 2).unwrap_err();
        assert_eq!(
            err,
            DecodeError::NonFinite {
                sample: 1,
                channel: "ch1".into()
            }
        );
    }

    #[test]
    fn malformed_json_is_rejected_with_parser_detail() {
        for bad in [
            &br#"{"values": [[1, 2]"#[..],
            br#"{"values": [["a", 2]]}"#,
            br#"{"values": [[1, 2]]} trailing"#,
            br#"{"ts": 1.5, "values": [[1, 2]]}"#,
            br#"{"ts": 1}"#,
            br#"{"values": [[1, 2]], "values": [[1, 2]]}"#,
            br#"{"values": [1, 2]}"#,
        ] {
            let err = decode(bad, 2).unwrap_err();
            assert_eq!(
                err.kind(),
                "malformed_json",
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let err = decode(br#"{"ts": 1}"#, 2).unwrap_err();
        assert!(err.to_string().contains("missing field `values`"), "{err}");
    }

    #[test]
    fn limits_are_enforced() {
        let limits = DecodeLimits {
            max_payload_bytes: 64,
            max_samples: 2,
        };
        let mut out = SensorBatch::new();
        let ch = names(1);
        let big = encode_json(None, &[0.0; 40], 1);
        assert!(matches!(
            decode_sensor(&big, &ch, &limits, &mut out),
            Err(DecodeError::TooLarge { max: 64, .. })
        ));
        for payload in [
            encode_json(None, &[1.0, 2.0, 3.0], 1),
            encode_binary(None, &[1.0, 2.0, 3.0], 1),
            encode_senml("d/", 1_700_000_000_000, 10.0, &[1.0, 2.0, 3.0], &ch),
        ] {
            let limits = DecodeLimits {
                max_payload_bytes: 4096,
                ..limits
            };
            assert_eq!(
                decode_sensor(&payload, &ch, &limits, &mut out),
                Err(DecodeError::TooManySamples { max: 2 })
            );
            assert!(out.values.is_empty());
        }
    }

    #[test]
    fn empty_batches_and_unknown_formats_are_rejected() {
        assert_eq!(decode(br#"{"values": []}"#, 2), Err(DecodeError::Empty));
        assert_eq!(decode(b"[]", 2), Err(DecodeError::Empty));
        assert_eq!(
            decode(&encode_binary(Some(1), &[], 2), 2),
            Err(DecodeError::Empty)
        );
        assert_eq!(
            decode(b"hello", 2),
            Err(DecodeError::UnknownFormat {
                first_byte: Some(b'h')
            })
        );
        assert_eq!(decode(b"  ", 2).unwrap_err().kind(), "unknown_format");
        let mut out = SensorBatch::new();
        assert_eq!(
            decode_sensor(b"{}", &[], &DecodeLimits::default(), &mut out),
            Err(DecodeError::NoChannels)
        );
    }

    #[test]
    fn binary_payload_round_trips_and_checks_header() {
        let rows = [1.0, -2.0, 3.5, 4.0, 5.0, 6.0];
        let b = decode(&encode_binary(Some(-42), &rows, 3), 3).unwrap();
        assert_eq!((b.ts_ms, b.values.as_slice()), (Some(-42), &rows[..]));
        assert_eq!(
            decode(&encode_binary(None, &rows, 3), 3).unwrap().ts_ms,
            None
        );

        assert_eq!(
            decode(&encode_binary(None, &rows, 2), 3),
            Err(DecodeError::ChannelCount {
                sample: None,
                expected: 3,
                found: 2
            })
        );
        let mut p = encode_binary(None, &rows, 3);
        p.pop();
        assert_eq!(
            decode(&p, 3),
            Err(DecodeError::BinaryLength {
                body_len: 23,
                frame_bytes: 12
            })
        );
        assert_eq!(
            decode(b"DRB1\x03\x00", 3),
            Err(DecodeError::BinaryTruncated { len: 6 })
        );
        let mut p = encode_binary(None, &rows, 3);
        p[6] = 0x02;
        assert_eq!(decode(&p, 3), Err(DecodeError::BinaryFlags { flags: 2 }));
        let p = encode_binary(None, &[1.0, f32::NAN, 3.0, 4.0, 5.0, f32::INFINITY], 3);
        assert_eq!(
            decode(&p, 3),
            Err(DecodeError::NonFinite {
                sample: 0,
                channel: "ch1".into()
            })
        );
    }

    #[test]
    fn senml_pack_groups_records_by_time() {
        let p = br#"[
            {"bn": "urn:dev:imu0:", "bt": 1.7e9, "n": "ch1", "u": "m/s2", "v": 2},
            {"n": "ch0", "v": 1},
            {"n": "ch1", "t": 0.02, "v": 4},
            {"n": "ch0", "t": 0.02, "v": 3, "bver": 10}
        ]"#;
        let b = decode(p, 2).unwrap();
        assert_eq!(b.ts_ms, Some(1_700_000_000_000));
        assert_eq!(b.values, vec![1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn senml_matches_full_resolved_names_and_applies_base_value() {
        let ch = vec!["imu0/ax".to_string(), "imu0/ay".to_string()];
        let p = br#"[{"bn": "imu0/", "bv": 10, "n": "ax", "v": 1}, {"n": "ay", "v": 2}]"#;
        let mut out = SensorBatch::new();
        decode_sensor(p, &ch, &DecodeLimits::default(), &mut out).unwrap();
        assert_eq!(out.values, vec![11.0, 12.0]);
        assert_eq!(out.ts_ms, None, "time 0 is relative, not absolute");
    }

    #[test]
    fn senml_structural_errors_have_specific_kinds() {
        let cases: [(&[u8], &str); 9] = [
            (
                br#"[{"n": "ch0", "v": 1}, {"n": "zz", "v": 2}]"#,
                "unknown_channel",
            ),
            (
                br#"[{"n": "ch0", "v": 1}, {"n": "ch0", "v": 2}]"#,
                "duplicate_channel",
            ),
            (
                br#"[{"n": "ch0", "v": 1}, {"n": "ch1", "t": 1, "v": 2}]"#,
                "missing_channel",
            ),
            (
                br#"[{"n": "ch0", "v": 1}, {"n": "ch1", "v": 2}, {"n": "ch0", "t": -1, "v": 1}]"#,
                "time_order",
            ),
            (br#"[{"n": "ch0", "vs": "x"}]"#, "malformed_senml"),
            (br#"[{"n": "ch0", "v": 1, "foo_": 1}]"#, "malformed_senml"),
            (br#"[{"n": "ch0"}]"#, "malformed_senml"),
            (br#"[1, 2]"#, "malformed_senml"),
            (
                br#"[{"n": "ch0", "v": 1e300}, {"n": "ch1", "v": 1}]"#,
                "non_finite",
            ),
        ];
        for (p, kind) in cases {
            let err = decode(p, 2).unwrap_err();
            assert_eq!(err.kind(), kind, "{} -> {err}", String::from_utf8_lossy(p));
        }
        assert_eq!(
            decode(
                br#"[{"n": "ch0", "v": 1}, {"n": "ch1", "t": 1, "v": 2}]"#,
                2
            ),
            Err(DecodeError::MissingChannel {
                sample: 0,
                channel: "ch1".into()
            })
        );
        assert_eq!(
            decode(br#"[{"bn": "d/", "n": "ch9", "v": 1}]"#, 2),
            Err(DecodeError::UnknownChannel {
                record: 0,
                name: "d/ch9".into()
            })
        );
    }

    #[test]
    fn decoder_reuses_and_clears_the_batch() {
        let mut out = SensorBatch::new();
        let ch = names(2);
        let lim = DecodeLimits::default();
        decode_sensor(&encode_json(Some(5), &[1.0; 8], 2), &ch, &lim, &mut out).unwrap();
        let cap = out.values.capacity();
        decode_sensor(&encode_json(None, &[2.0; 4], 2), &ch, &lim, &mut out).unwrap();
        assert_eq!((out.ts_ms, out.values.as_slice()), (None, &[2.0; 4][..]));
        assert_eq!(out.values.capacity(), cap);
        assert!(decode_sensor(b"{", &ch, &lim, &mut out).is_err());
        assert!(out.values.is_empty());
    }

    #[test]
    fn every_error_kind_is_listed() {
        let errors = [
            decode(b"x", 1),
            decode(br#"{"values": [[1, 2]]}"#, 1),
            decode(b"[{}]", 1),
            decode(b"DRB1", 1),
        ];
        for e in errors {
            let e = e.unwrap_err();
            assert!(DecodeError::ALL_KINDS.contains(&e.kind()), "{}", e.kind());
        }
    }

    fn rows_strategy() -> impl Strategy<Value = (usize, Vec<f32>)> {
        (1usize..8, 1usize..20).prop_flat_map(|(c, n)| {
            (
                Just(c),
                proptest::collection::vec(
                    prop_oneof![
                        -1e6f32..1e6,
                        proptest::num::f32::NORMAL | proptest::num::f32::ZERO
                    ],
                    c * n,
                ),
            )
        })
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes, 3);
        }

        #[test]
        fn json_like_input_never_panics(s in r#"[\[\]{}"tsvalue:,0-9.eE+\- n]{0,200}"#) {
            let _ = decode(s.as_bytes(), 2);
            let _ = decode(format!("{{\"values\":{s}}}").as_bytes(), 2);
            let _ = decode(format!("[{{\"n\":\"ch0\",{s}").as_bytes(), 2);
        }

        #[test]
        fn binary_prefix_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut p = b"DRB1".to_vec();
            p.extend(tail);
            let _ = decode(&p, 2);
        }

        #[test]
        fn json_round_trips((c, rows) in rows_strategy(), ts in proptest::option::of(any::<i64>())) {
            let b = decode(&encode_json(ts, &rows, c), c).unwrap();
            prop_assert_eq!(b.ts_ms, ts);
            prop_assert_eq!(b.values, rows);
        }

        #[test]
        fn binary_round_trips((c, rows) in rows_strategy(), ts in proptest::option::of(any::<i64>())) {
            let b = decode(&encode_binary(ts, &rows, c), c).unwrap();
            prop_assert_eq!(b.ts_ms, ts);
            prop_assert_eq!(b.values, rows);
        }

        #[test]
        fn senml_round_trips(
            (c, rows) in rows_strategy(),
            ts in 1_000_000_000_000i64..4_000_000_000_000,
            rate in 1.0f64..1000.0,
        ) {
            let ch = names(c);
            let p = encode_senml("urn:dev:x:", ts, rate, &rows, &ch);
            let b = decode(&p, c).unwrap();
            prop_assert_eq!(b.ts_ms, Some(ts));
            prop_assert_eq!(b.values, rows);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod proptests {
    //! Properties of the three codecs beyond the round trips in `tests`: typed errors that
    //! leave the batch empty, the formats agreeing, truncation, the sample limit, and SenML
    //! record order within a sample.

    use super::*;
    use proptest::prelude::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("ch{i}")).collect()
    }

    fn bits(values: &[f32]) -> Vec<u32> {
        values.iter().map(|v| v.to_bits()).collect()
    }

    /// Channel count and finite rows (any finite f32, subnormals and -0.0 included).
    fn rows() -> impl Strategy<Value = (usize, Vec<f32>)> {
        (1usize..6, 1usize..12).prop_flat_map(|(c, n)| {
            let finite = any::<f32>().prop_filter("finite", |v| v.is_finite());
            (Just(c), proptest::collection::vec(finite, c * n))
        })
    }

    proptest! {
        #[test]
        fn any_input_gives_a_whole_batch_or_a_typed_error_and_an_empty_batch(
            prefix in prop_oneof![Just(&b""[..]), Just(&b"DRB1"[..]), Just(&b"{"[..]), Just(&b"["[..])],
            tail in proptest::collection::vec(any::<u8>(), 0..128),
            c in 1usize..4,
        ) {
            let payload = [prefix, &tail[..]].concat();
            let mut out = SensorBatch { ts_ms: Some(1), channels: 9, values: vec![1.0; 9] };
            match decode_sensor(&payload, &names(c), &DecodeLimits::default(), &mut out) {
                Ok(()) => {
                    prop_assert_eq!(out.channels, c);
                    prop_assert!(!out.values.is_empty() && out.values.len().is_multiple_of(c));
                    prop_assert!(out.values.iter().all(|v| v.is_finite()));
                }
                Err(e) => {
                    prop_assert!(DecodeError::ALL_KINDS.contains(&e.kind()));
                    prop_assert!(!e.to_string().is_empty());
                    prop_assert!(out.values.is_empty());
                    prop_assert_eq!(out.ts_ms, None);
                }
            }
        }

        #[test]
        fn the_three_formats_decode_to_the_same_bits((c, rows) in rows()) {
            let ch = names(c);
            let lim = DecodeLimits::default();
            let mut decoded = Vec::new();
            for payload in [
                encode_json(Some(1_700_000_000_000), &rows, c),
                encode_binary(Some(1_700_000_000_000), &rows, c),
                encode_senml("d/", 1_700_000_000_000, 50.0, &rows, &ch),
            ] {
                let mut out = SensorBatch::new();
                decode_sensor(&payload, &ch, &lim, &mut out).unwrap();
                prop_assert_eq!(out.ts_ms, Some(1_700_000_000_000));
                decoded.push(out.values);
            }
            prop_assert_eq!(bits(&decoded[0]), bits(&rows));
            prop_assert_eq!(bits(&decoded[1]), bits(&rows));
            // SenML adds the base value (0 here), which turns -0.0 into 0.0: equal as numbers.
            prop_assert_eq!(&decoded[2], &rows);
        }

        #[test]
        fn a_cut_binary_payload_holds_whole_frames_or_is_refused(
            (c, rows) in rows(),
            cut in any::<proptest::sample::Index>(),
        ) {
            let full = encode_binary(None, &rows, c);
            let len = cut.index(full.len());
            let mut out = SensorBatch::new();
            let got = decode_sensor(&full[..len], &names(c), &DecodeLimits::default(), &mut out);
            let body = len.saturating_sub(BINARY_HEADER_LEN);
            if len < BINARY_HEADER_LEN {
                prop_assert!(got.is_err());
            } else if body % (4 * c) != 0 {
                prop_assert_eq!(got, Err(DecodeError::BinaryLength { body_len: body, frame_bytes: 4 * c }));
            } else if body == 0 {
                prop_assert_eq!(got, Err(DecodeError::Empty));
            } else {
                prop_assert_eq!(got, Ok(()));
                prop_assert_eq!(bits(&out.values), bits(&rows[..body / 4]));
            }
        }

        #[test]
        fn the_sample_limit_holds_in_every_format(
            (c, rows) in rows(),
            max_samples in 1usize..12,
        ) {
            let ch = names(c);
            let limits = DecodeLimits { max_samples, ..DecodeLimits::default() };
            let n = rows.len() / c;
            for payload in [
                encode_json(None, &rows, c),
                encode_binary(None, &rows, c),
                encode_senml("d/", 1_700_000_000_000, 10.0, &rows, &ch),
            ] {
                let mut out = SensorBatch::new();
                let got = decode_sensor(&payload, &ch, &limits, &mut out);
                if n <= max_samples {
                    prop_assert_eq!(got, Ok(()));
                } else {
                    prop_assert_eq!(got, Err(DecodeError::TooManySamples { max: max_samples }));
                }
            }
        }

        #[test]
        fn senml_records_of_one_sample_may_come_in_any_order(
            (c, rows) in rows(),
            order in Just((0..6).collect::<Vec<usize>>()).prop_shuffle(),
        ) {
            let order: Vec<usize> = order.into_iter().filter(|&j| j < c).collect();
            let mut records = Vec::new();
            for (i, row) in rows.chunks_exact(c).enumerate() {
                for &j in &order {
                    let base = if records.is_empty() { r#""bt":1700000000,"# } else { "" };
                    records.push(format!(r#"{{{base}"n":"ch{j}","t":{}, "v":{:?}}}"#, i as f64 * 0.5, row[j]));
                }
            }
            let payload = format!("[{}]", records.join(","));
            let mut out = SensorBatch::new();
            decode_sensor(payload.as_bytes(), &names(c), &DecodeLimits::default(), &mut out).unwrap();
            prop_assert_eq!(out.values, rows);
            prop_assert_eq!(out.ts_ms, Some(1_700_000_000_000));
        }

        #[test]
        fn senml_must_understand_labels_are_refused(label in "[a-z]{0,6}_") {
            let payload = format!(r#"[{{"n":"ch0","v":1,"{label}":0}}]"#);
            let mut out = SensorBatch::new();
            let err = decode_sensor(payload.as_bytes(), &names(1), &DecodeLimits::default(), &mut out)
                .unwrap_err();
            prop_assert_eq!(err.kind(), "malformed_senml");
        }
    }
}
