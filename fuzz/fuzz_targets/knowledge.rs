//! Knowledge packages (`learn::knowledge`, what the cloud worker reads from
//! `diredi/v1/{gw}/knowledge`). The first byte picks a mode:
//!
//! - `0`: the rest as received bytes;
//! - `1`: the rest as a package body, framed with header and a correct digest, so mutations
//!   reach the body parser instead of stopping at the digest check;
//! - `2`: the rest drives a real adaptation of a tiny student (parameter changes, new classes,
//!   bits, sparsity); its knowledge is extracted, encoded, parsed and applied to the base.
//!
//! Parsing never panics, accepted packages are well formed (one histogram entry per class,
//! one value per kept entry, bounded tensors) and re-encode to a package that parses the same.
//! Applying a package to the base never panics either; an extracted one round-trips exactly and
//! rebuilds the adapted parameters within half a quantisation step.
#![no_main]

use candle_core::Tensor;
use diredi_learn::knowledge::{
    extract, Knowledge, KnowledgeMeta, QuantConfig, KNOWLEDGE_MAGIC, KNOWLEDGE_VERSION,
};
use diredi_learn::model::{Arch, ConvSpec, ModelConfig, Net};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

/// Bound of `from_bytes` on one tensor's values.
const MAX_TENSOR_VALUES: usize = 1 << 22;
const BASE_CLASSES: usize = 3;

thread_local! {
    /// A student small enough to adapt thousands of times a second: 2 channels, window 8,
    /// one conv block of 4, no batch norm.
    static BASE: Net = Net::new(
        ModelConfig {
            arch: Arch::Student,
            in_channels: 2,
            window: 8,
            num_classes: BASE_CLASSES,
            convs: vec![ConvSpec::new(4, 3, 1)],
            hidden: Vec::new(),
            batch_norm: false,
            dropout: 0.0,
        },
        1,
    )
    .expect("the fuzzing student builds");
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 42);
    out.extend_from_slice(KNOWLEDGE_MAGIC);
    out.extend_from_slice(&KNOWLEDGE_VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    let digest = Sha256::digest(&out);
    out.extend_from_slice(&digest);
    out
}

fn without_id(k: &Knowledge) -> Knowledge {
    Knowledge {
        package_id: String::new(),
        ..k.clone()
    }
}

fn check_parsed(bytes: &[u8]) {
    let k = match Knowledge::from_bytes(bytes) {
        Ok(k) => k,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    assert_eq!(k.package_id.len(), 64);
    assert_eq!(k.histogram.len(), k.classes.len());
    assert!(k.base_classes <= k.classes.len());
    for d in &k.deltas {
        let numel: usize = d.shape.iter().product();
        assert!((1..=4).contains(&d.shape.len()));
        assert!(numel > 0 && numel <= MAX_TENSOR_VALUES);
        assert!(d.bits == 4 || d.bits == 8);
        assert!(d.scales.iter().all(|s| s.is_finite()));
        let kept = d.mask.as_ref().map_or(numel, |m| {
            assert_eq!(m.len(), numel.div_ceil(8));
            m.iter().map(|b| b.count_ones() as usize).sum()
        });
        assert_eq!(d.values.len(), kept);
        assert_eq!(d.dequantise().len(), numel);
    }
    let again = k.to_bytes().expect("a parsed package encodes");
    // Same layout; only the unused half of a last 4-bit byte (and so the digest) may differ.
    assert_eq!(again.len(), bytes.len());
    let back = Knowledge::from_bytes(&again).expect("a re-encoded package parses");
    assert_eq!(without_id(&back), without_id(&k));
    if again == bytes {
        assert_eq!(back.package_id, k.package_id);
    }
    BASE.with(|base| {
        if let Ok(net) = k.apply(base) {
            assert_eq!(net.config().num_classes, k.classes.len());
        }
    });
}

/// Mode 2: adapt, extract, encode, parse, apply.
fn check_extracted(data: &[u8]) {
    let Some((&knobs, deltas)) = data.split_first() else {
        return;
    };
    let new_classes = usize::from(knobs & 3);
    let bits = if knobs & 4 == 0 { 8 } else { 4 };
    let keep = if knobs & 8 == 0 {
        1.0
    } else {
        f32::from((knobs >> 4) + 1) / 16.0
    };
    BASE.with(|base| {
        let mut adapted = base.try_clone().expect("clones");
        let k = BASE_CLASSES + new_classes;
        adapted.extend_head(k, 2).expect("the head grows");
        let mut bytes = deltas.iter().cycle();
        for (_, var) in adapted.named_vars() {
            let t = var.as_tensor();
            let n = t.elem_count();
            let step: Vec<f32> = (0..n)
                .map(|_| bytes.next().map_or(0.0, |&b| f32::from(b as i8) / 32.0))
                .collect();
            let step = Tensor::from_vec(step, t.shape(), t.device()).expect("shape");
            var.set(&(t + step).expect("adds")).expect("sets");
        }
        let meta = KnowledgeMeta {
            model_id: "fuzz-student".into(),
            base_version: 1,
            base_sha256: "0".repeat(64),
            classes: (0..k).map(|c| format!("class{c}")).collect(),
            base_classes: BASE_CLASSES,
            histogram: (0..k as u32).collect(),
            quant: QuantConfig { bits, keep },
        };
        let kn = extract(base, &adapted, meta).expect("knowledge of a real adaptation");
        let bytes = kn.to_bytes().expect("encodes");
        let back = Knowledge::from_bytes(&bytes).expect("parses");
        assert_eq!(back, kn);
        let rebuilt = back.apply(base).expect("applies to its base");
        assert_eq!(rebuilt.config(), adapted.config());
        let want = adapted.snapshot().expect("snapshot");
        let got = rebuilt.snapshot().expect("snapshot");
        assert_eq!(want.len(), got.len());
        for ((name, w), (name2, g)) in want.iter().zip(&got) {
            assert_eq!(name, name2);
            let w = w.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("w");
            let g = g.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("g");
            assert_eq!(w.len(), g.len());
            assert!(g.iter().all(|v| v.is_finite()), "{name}");
            if keep < 1.0 {
                continue;
            }
            let d = kn.deltas.iter().find(|d| d.name == *name).expect("delta");
            let per_row = w.len() / d.scales.len();
            for (i, (w, g)) in w.iter().zip(&g).enumerate() {
                let s = d.scales[i / per_row];
                let tol = 0.5 * s * 1.001 + 1e-5 * (1.0 + w.abs());
                assert!((w - g).abs() <= tol, "{name}[{i}]: {w} vs {g}, scale {s}");
            }
        }
    });
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => check_parsed(rest),
        1 => check_parsed(&framed(rest)),
        _ => check_extracted(rest),
    }
});
