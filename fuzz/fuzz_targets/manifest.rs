//! Model manifests: parsing (`Manifest::from_slice`), validation, signing and verification
//! (`ReceivedModel::verify`, as the gateway runs it on every received model).
//!
//! - Verification never panics; when it accepts, signing the same manifest again with the
//!   trusted key gives the same signature (signer and verifier agree on the signed bytes).
//! - Parsing the bytes directly and parsing them through a `serde_json::Value` (the verifier's
//!   path) agree.
//! - A parsed manifest survives a JSON round trip, and once valid, signed with the fuzzing key
//!   for the fuzzing ONNX bytes, it verifies, written compact or pretty.
//!
//! Seeds in `corpus/manifest/` are signed by [`FUZZ_SEED`] for [`ONNX`], so mutations reach
//! the signature check and beyond.
#![no_main]

use std::sync::LazyLock;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use diredi_protocol::manifest::{
    sha256_hex, sign_manifest, Manifest, ReceivedModel, SigningKey, TrustedKeys,
};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// The "ONNX file" every input is checked against.
const ONNX: &[u8] = b"\x08\x07diredi fuzz onnx";
/// Seed of the fuzzing signing key (never used outside fuzzing).
const FUZZ_SEED: [u8; 32] = [7; 32];

static KEY: LazyLock<SigningKey> = LazyLock::new(|| SigningKey::from_seed(&FUZZ_SEED));
static TRUSTED: LazyLock<TrustedKeys> = LazyLock::new(|| {
    let mut keys = TrustedKeys::new();
    keys.insert(KEY.public());
    keys
});

fn signature_bytes(manifest: &Value) -> Option<Vec<u8>> {
    let text = manifest.get("signature")?.get("value")?.as_str()?;
    BASE64.decode(text.trim()).ok()
}

fn verify(bytes: Vec<u8>) -> Result<Manifest, String> {
    ReceivedModel::new(bytes, ONNX.to_vec())
        .verify(&TRUSTED)
        .map(|v| v.manifest().clone())
        .map_err(|e| e.to_string())
}

fuzz_target!(|data: &[u8]| {
    match ReceivedModel::new(data.to_vec(), ONNX.to_vec()).verify(&TRUSTED) {
        Ok(verified) => {
            let raw = verified.raw_manifest();
            let again = sign_manifest(raw, ONNX, &KEY).expect("a verified manifest signs again");
            assert_eq!(signature_bytes(&again), signature_bytes(raw));
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }

    let direct = Manifest::from_slice(data);
    let via_value = serde_json::from_slice::<Value>(data).and_then(serde_json::from_value);
    let m: Manifest = match (direct, via_value) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a, b, "bytes and Value parse to different manifests");
            a
        }
        (Ok(a), Err(_)) => a,
        (Err(_), _) => return,
    };
    let value = m.to_value().expect("a parsed manifest serialises");
    let back: Manifest = serde_json::from_value(value.clone()).expect("and parses back");
    assert_eq!(back, m);

    let mut unsigned = value;
    unsigned["sha256"] = Value::String(sha256_hex(ONNX));
    let valid = serde_json::from_value::<Manifest>(unsigned.clone())
        .expect("still a manifest")
        .validate();
    match sign_manifest(&unsigned, ONNX, &KEY) {
        Ok(signed) => {
            assert!(valid.is_ok());
            let compact = serde_json::to_vec(&signed).expect("serialises");
            let pretty = serde_json::to_vec_pretty(&signed).expect("serialises");
            for text in [compact, pretty] {
                let got = verify(text).expect("a freshly signed manifest verifies");
                let mut want = back.clone();
                want.sha256 = sha256_hex(ONNX);
                want.signature = got.signature.clone();
                assert_eq!(got, want);
            }
        }
        Err(e) => assert!(valid.is_err(), "a valid manifest does not sign: {e}"),
    }
});
