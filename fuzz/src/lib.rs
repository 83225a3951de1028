//! Helpers shared by the fuzz targets in `fuzz_targets/`.
//!
//! The sensor targets prefix every input with one configuration byte, so one corpus explores
//! channel counts, base-name matching and the sample limit along with the payload itself.

use diredi_protocol::sensor::{
    decode_sensor, encode_binary, encode_json, encode_senml, DecodeError, DecodeLimits, SensorBatch,
};

/// SenML times from here on are absolute (RFC 8428 §4.5.3), in ms.
const SENML_ABSOLUTE_MS: i64 = 268_435_456_000;
/// Up to here `bt = ts_ms / 1000` in f64 reads back to the same millisecond.
const SENML_EXACT_MS: i64 = 1 << 43;

/// Channels and limits chosen by the configuration byte: bits 0-2 give 1 to 8 channels, bit 6
/// names them `dev/ch{i}` instead of `ch{i}` (so SenML base names matter), bit 7 lowers the
/// sample limit to 4.
pub fn sensor_setup(cfg: u8) -> (Vec<String>, DecodeLimits) {
    let n = usize::from(cfg & 7) + 1;
    let prefix = if cfg & 0x40 != 0 { "dev/" } else { "" };
    let channels = (0..n).map(|i| format!("{prefix}ch{i}")).collect();
    let limits = if cfg & 0x80 != 0 {
        DecodeLimits {
            max_payload_bytes: 4096,
            max_samples: 4,
        }
    } else {
        DecodeLimits::default()
    };
    (channels, limits)
}

/// Decodes `payload` and checks the decoder's contract:
///
/// - no panic;
/// - on error the batch is empty, the kind is one of [`DecodeError::ALL_KINDS`] and the message
///   is non-empty and bounded by the payload size;
/// - on success the batch holds whole samples of finite values, within the sample limit, and
///   re-encoding it as JSON, binary and SenML decodes to the same batch.
pub fn check_sensor(payload: &[u8], cfg: u8) {
    let (channels, limits) = sensor_setup(cfg);
    let mut out = SensorBatch::new();
    // Left over from an earlier message: must not leak into this one.
    out.values.extend_from_slice(&[7.0; 3]);
    out.ts_ms = Some(7);
    match decode_sensor(payload, &channels, &limits, &mut out) {
        Err(e) => {
            assert!(out.values.is_empty(), "error {e:?} left values behind");
            assert_eq!(out.ts_ms, None);
            assert!(DecodeError::ALL_KINDS.contains(&e.kind()), "{e:?}");
            let msg = e.to_string();
            assert!(!msg.is_empty());
            assert!(
                msg.len() <= 8 * payload.len() + 512,
                "message of {} bytes",
                msg.len()
            );
        }
        Ok(()) => {
            let c = channels.len();
            assert_eq!(out.channels, c);
            assert!(!out.values.is_empty());
            assert_eq!(out.values.len() % c, 0);
            assert!(out.samples() <= limits.max_samples);
            assert!(out.values.iter().all(|v| v.is_finite()));
            assert_eq!(out.rows().count(), out.samples());
            reencode_round_trips(&out, &channels, &limits);
        }
    }
}

fn reencode_round_trips(batch: &SensorBatch, channels: &[String], limits: &DecodeLimits) {
    let c = channels.len();
    let limits = DecodeLimits {
        max_payload_bytes: usize::MAX,
        ..*limits
    };
    let decode = |payload: &[u8]| {
        let mut again = SensorBatch::new();
        match decode_sensor(payload, channels, &limits, &mut again) {
            Ok(()) => again,
            Err(e) => panic!(
                "re-encoded batch is rejected: {e}\n{}",
                String::from_utf8_lossy(payload)
            ),
        }
    };
    for payload in [
        encode_json(batch.ts_ms, &batch.values, c),
        encode_binary(batch.ts_ms, &batch.values, c),
    ] {
        let again = decode(&payload);
        assert_eq!(again.ts_ms, batch.ts_ms);
        assert_eq!(bits(&again.values), bits(&batch.values));
    }
    // SenML carries time as f64 seconds: beyond the exact range, consecutive samples at 50 Hz
    // would share a time, so such batches go out with time 0 (relative) instead.
    let ts = batch
        .ts_ms
        .filter(|t| t.unsigned_abs() < SENML_EXACT_MS.unsigned_abs())
        .unwrap_or(0);
    let again = decode(&encode_senml("dev/", ts, 50.0, &batch.values, channels));
    // SenML adds the base value (0 here), which turns -0.0 into 0.0: equal as numbers.
    assert_eq!(again.values, batch.values);
    if (SENML_ABSOLUTE_MS..SENML_EXACT_MS).contains(&ts) {
        assert_eq!(again.ts_ms, Some(ts));
    } else if (0..SENML_ABSOLUTE_MS).contains(&ts) {
        assert_eq!(again.ts_ms, None);
    }
}

/// Bit patterns, so `-0.0` and `0.0` count as different.
fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}
