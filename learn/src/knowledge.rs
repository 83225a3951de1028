//! Reverse distillation on the device: the *knowledge* package, i.e. what the adapted model
//! learned, as a compact quantised parameter delta plus the user's class histogram.
//!
//! Where it stands: [`crate::adapt`] → **[`extract`]** → [`Knowledge::to_bytes`] → uplink →
//! cloud [`Knowledge::from_bytes`] → **[`Knowledge::apply`]** to the installed student (imported
//! from the same ONNX file) → the cloud's teacher update and re-distillation.
//!
//! Contents: format tag and version, `package_id` (hex SHA-256 of the rest of the package, so
//! the same knowledge always has the same id and duplicates are found), `model_id`,
//! `base_version`, the base model's SHA-256, the full class list (base classes first, then the
//! user's new ones), the histogram of the user's labels per class, and for every parameter
//! tensor the delta `adapted − base` (new head rows: their full value), quantised per row
//! (one row for vectors) with a symmetric f32 scale to 8 or 4 bits, optionally sparse (a bitmap of the kept entries,
//! the largest `keep` fraction by magnitude). Nothing in it is a sample, a per-sample feature
//! or a per-sample output.
//!
//! Byte layout (little-endian): `b"DRKN"`, `u16` version, `u32` body length, body, then the
//! 32-byte SHA-256 of everything before it. Strings are `u16` length + UTF-8. Parsing checks
//! every length against what is left, the total against [`MAX_KNOWLEDGE_BYTES`], and the
//! digest, so truncated or garbage input is an error, never a panic.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::{ModelError, Net};

/// First bytes of a knowledge package.
pub const KNOWLEDGE_MAGIC: &[u8; 4] = b"DRKN";
/// Version of the byte layout written by this module.
pub const KNOWLEDGE_VERSION: u16 = 1;
/// Format tag (for logs and JSON reports).
pub const KNOWLEDGE_FORMAT: &str = "diredi-knowledge/1";
/// Hard bound on a package's size, both when writing and when reading.
pub const MAX_KNOWLEDGE_BYTES: usize = 64 * 1024;
const MAX_TENSOR_VALUES: usize = 1 << 22;
/// Largest accepted quantisation scale: a delta entry is at most 127 of them, so every
/// dequantised value stays finite (real packages have scales far below 1).
pub const MAX_DELTA_SCALE: f32 = 1.0e6;

/// Errors of extraction, coding and application.
#[derive(Debug, thiserror::Error)]
pub enum KnowledgeError {
    /// The bytes are not a knowledge package of this version.
    #[error("not a {KNOWLEDGE_FORMAT} package: {0}")]
    Format(String),
    /// The package ends before a field it announces.
    #[error("truncated knowledge package: {0}")]
    Truncated(String),
    /// The package is larger than [`MAX_KNOWLEDGE_BYTES`].
    #[error("knowledge package of {size} bytes exceeds the bound of {max} bytes")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The bound.
        max: usize,
    },
    /// The digest does not match the contents.
    #[error("knowledge package digest mismatch (corrupted)")]
    Digest,
    /// Base and adapted model (or package and base model) do not fit together.
    #[error("knowledge does not fit the model: {0}")]
    Mismatch(String),
    /// A setting is out of range.
    #[error("invalid knowledge setting: {0}")]
    Config(String),
    /// The network failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// How the delta is quantised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuantConfig {
    /// Bits per kept value: 8 or 4.
    pub bits: u8,
    /// Fraction of each tensor's entries kept, largest magnitudes first (1 = dense).
    pub keep: f32,
}

impl Default for QuantConfig {
    fn default() -> Self {
        Self { bits: 4, keep: 1.0 }
    }
}

/// What [`extract`] needs besides the two networks.
#[derive(Debug, Clone, PartialEq)]
pub struct KnowledgeMeta {
    /// Model family of the base (manifest `model_id`).
    pub model_id: String,
    /// Manifest version of the base model.
    pub base_version: u64,
    /// Hex SHA-256 of the base model's ONNX file (manifest `sha256`).
    pub base_sha256: String,
    /// Every class of the adapted model; the first `base_classes` are the base's.
    pub classes: Vec<String>,
    /// How many of `classes` the base model has.
    pub base_classes: usize,
    /// Windows per class of the user's labels, in `classes` order.
    pub histogram: Vec<u32>,
    /// Quantisation.
    pub quant: QuantConfig,
}

/// One quantised tensor delta.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorDelta {
    /// Parameter name (as in [`Net::named_vars`]).
    pub name: String,
    /// Shape of the adapted tensor.
    pub shape: Vec<usize>,
    /// Bits per value (8 or 4).
    pub bits: u8,
    /// One scale per row (first dimension; a single one for vectors).
    pub scales: Vec<f32>,
    /// Kept entries (`None` = all), one bit per entry, row-major.
    pub mask: Option<Vec<u8>>,
    /// Quantised values of the kept entries, in `[-(2^(bits-1) - 1), 2^(bits-1) - 1]`.
    pub values: Vec<i8>,
}

impl TensorDelta {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The dequantised dense delta.
    pub fn dequantise(&self) -> Vec<f32> {
        let n = self.numel();
        let rows = self.scales.len().max(1);
        let per_row = n / rows;
        let mut out = vec![0.0f32; n];
        let mut vals = self.values.iter();
        for (i, o) in out.iter_mut().enumerate() {
            let kept = match &self.mask {
                None => true,
                Some(m) => m[i / 8] >> (i % 8) & 1 == 1,
            };
            if kept {
                let q = vals.next().copied().unwrap_or(0);
                let s = self.scales.get(i / per_row.max(1)).copied().unwrap_or(0.0);
                *o = f32::from(q) * s;
            }
        }
        out
    }
}

/// A reverse-distillation package: the knowledge of one adaptation.
#[derive(Debug, Clone, PartialEq)]
pub struct Knowledge {
    /// Hex SHA-256 of the package bytes before the digest (content-derived, unique per content).
    pub package_id: String,
    /// Model family.
    pub model_id: String,
    /// Version of the base model the delta applies to.
    pub base_version: u64,
    /// Hex SHA-256 of the base ONNX file.
    pub base_sha256: String,
    /// Every class (base classes first).
    pub classes: Vec<String>,
    /// How many of `classes` the base has.
    pub base_classes: usize,
    /// The user's labelled windows per class.
    pub histogram: Vec<u32>,
    /// Quantised deltas, in parameter-name order.
    pub deltas: Vec<TensorDelta>,
}

fn quantise(name: &str, shape: Vec<usize>, delta: &[f32], q: &QuantConfig) -> TensorDelta {
    let n = delta.len();
    let rows = if shape.len() > 1 { shape[0].max(1) } else { 1 };
    let per_row = (n / rows).max(1);
    let levels = ((1u32 << (q.bits.clamp(2, 8) - 1)) - 1) as f32;
    let kept: Option<Vec<bool>> = if q.keep >= 1.0 {
        None
    } else {
        let keep_n = ((n as f64) * f64::from(q.keep)).ceil() as usize;
        let mut mags: Vec<f32> = delta.iter().map(|v| v.abs()).collect();
        mags.sort_unstable_by(|a, b| b.total_cmp(a));
        let threshold = mags.get(keep_n.saturating_sub(1)).copied().unwrap_or(0.0);
        let mut left = keep_n;
        Some(
            delta
                .iter()
                .map(|v| {
                    let k = left > 0 && v.abs() >= threshold && v.abs() > 0.0;
                    if k {
                        left -= 1;
                    }
                    k
                })
                .collect(),
        )
    };
    let mut scales = Vec::with_capacity(rows);
    for r in 0..rows {
        let row = &delta[r * per_row..((r + 1) * per_row).min(n)];
        let max = row
            .iter()
            .enumerate()
            .filter(|(j, _)| kept.as_ref().is_none_or(|k| k[r * per_row + j]))
            .map(|(_, v)| v.abs())
            .fold(0.0f32, f32::max);
        scales.push(max / levels);
    }
    let mut values = Vec::new();
    let mut mask = kept.as_ref().map(|_| vec![0u8; n.div_ceil(8)]);
    for (i, v) in delta.iter().enumerate() {
        if let (Some(k), Some(m)) = (&kept, &mut mask) {
            if !k[i] {
                continue;
            }
            m[i / 8] |= 1 << (i % 8);
        }
        let s = scales[(i / per_row).min(rows - 1)];
        let qv = if s > 0.0 {
            (v / s).round().clamp(-levels, levels)
        } else {
            0.0
        };
        values.push(qv as i8);
    }
    TensorDelta {
        name: name.to_owned(),
        shape,
        bits: q.bits,
        scales,
        mask,
        values,
    }
}

/// The knowledge of `adapted` relative to `base`: every parameter's quantised delta (new head
/// rows in full), with the metadata of `meta`.
pub fn extract(
    base: &Net,
    adapted: &Net,
    meta: KnowledgeMeta,
) -> Result<Knowledge, KnowledgeError> {
    if !(meta.quant.bits == 8 || meta.quant.bits == 4) {
        return Err(KnowledgeError::Config(format!(
            "bits must be 8 or 4, found {}",
            meta.quant.bits
        )));
    }
    if !(meta.quant.keep > 0.0 && meta.quant.keep <= 1.0) {
        return Err(KnowledgeError::Config(format!(
            "keep must be in (0, 1], found {}",
            meta.quant.keep
        )));
    }
    let k = adapted.config().num_classes;
    if meta.classes.len() != k
        || meta.histogram.len() != k
        || meta.base_classes != base.config().num_classes
    {
        return Err(KnowledgeError::Mismatch(format!(
            "{} classes, {} histogram entries and {} base classes for models of {} and {k} outputs",
            meta.classes.len(),
            meta.histogram.len(),
            meta.base_classes,
            base.config().num_classes
        )));
    }
    let mut base_cfg = base.config().clone();
    base_cfg.num_classes = k;
    if base_cfg != *adapted.config() {
        return Err(KnowledgeError::Mismatch(
            "the adapted model's architecture differs from the base's".to_owned(),
        ));
    }
    let base_vars: HashMap<String, Tensor> = base
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    let mut deltas = Vec::new();
    for (name, var) in adapted.named_vars() {
        let a = var.as_tensor();
        let b = base_vars
            .get(&name)
            .ok_or_else(|| KnowledgeError::Mismatch(format!("base lacks `{name}`")))?;
        let b = grow_rows(b, a.dims())?;
        let d = (a - &b)?.flatten_all()?.to_vec1::<f32>()?;
        deltas.push(quantise(&name, a.dims().to_vec(), &d, &meta.quant));
    }
    let mut kn = Knowledge {
        package_id: String::new(),
        model_id: meta.model_id,
        base_version: meta.base_version,
        base_sha256: meta.base_sha256,
        classes: meta.classes,
        base_classes: meta.base_classes,
        histogram: meta.histogram,
        deltas,
    };
    let bytes = kn.to_bytes()?;
    kn.package_id = Knowledge::from_bytes(&bytes)?.package_id;
    Ok(kn)
}

/// `t` padded with zero rows (first dimension) up to `dims`; other dimensions must agree.
fn grow_rows(t: &Tensor, dims: &[usize]) -> Result<Tensor, KnowledgeError> {
    let have = t.dims();
    if have == dims {
        return Ok(t.clone());
    }
    if have.len() != dims.len() || have.is_empty() || have[1..] != dims[1..] || have[0] > dims[0] {
        return Err(KnowledgeError::Mismatch(format!(
            "a tensor of shape {have:?} cannot become {dims:?}"
        )));
    }
    let mut extra = dims.to_vec();
    extra[0] = dims[0] - have[0];
    let zeros = Tensor::zeros(extra.as_slice(), t.dtype(), t.device())?;
    Ok(Tensor::cat(&[t, &zeros], 0)?)
}

// ---------------------------------------------------------------- bytes

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: usize) -> Result<(), KnowledgeError> {
        let v = u16::try_from(v).map_err(|_| KnowledgeError::Config(format!("{v} > 65535")))?;
        self.0.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }
    fn u32(&mut self, v: usize) -> Result<(), KnowledgeError> {
        let v = u32::try_from(v).map_err(|_| KnowledgeError::Config(format!("{v} > u32")))?;
        self.0.extend_from_slice(&v.to_le_bytes());
        Ok(())
    }
    fn str(&mut self, s: &str) -> Result<(), KnowledgeError> {
        self.u16(s.len())?;
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], KnowledgeError> {
        if self.rest.len() < n {
            return Err(KnowledgeError::Truncated(format!(
                "{what} needs {n} bytes, {} left",
                self.rest.len()
            )));
        }
        let (a, b) = self.rest.split_at(n);
        self.rest = b;
        Ok(a)
    }
    fn u8(&mut self, what: &str) -> Result<u8, KnowledgeError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<usize, KnowledgeError> {
        let b = self.take(2, what)?;
        Ok(usize::from(u16::from_le_bytes([b[0], b[1]])))
    }
    fn u32(&mut self, what: &str) -> Result<usize, KnowledgeError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
    fn u64(&mut self, what: &str) -> Result<u64, KnowledgeError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn str(&mut self, what: &str) -> Result<String, KnowledgeError> {
        let n = self.u16(what)?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| KnowledgeError::Format(format!("{what} is not UTF-8")))
    }
}

fn pack(values: &[i8], bits: u8) -> Vec<u8> {
    if bits == 8 {
        return values.iter().map(|&v| v as u8).collect();
    }
    values
        .chunks(2)
        .map(|p| {
            let lo = (p[0] as u8) & 0x0F;
            let hi = p.get(1).map_or(0, |&v| (v as u8) & 0x0F);
            lo | (hi << 4)
        })
        .collect()
}

fn unpack(bytes: &[u8], count: usize, bits: u8) -> Vec<i8> {
    if bits == 8 {
        return bytes.iter().map(|&b| b as i8).collect();
    }
    let nib = |n: u8| -> i8 { ((n << 4) as i8) >> 4 };
    bytes
        .iter()
        .flat_map(|&b| [nib(b & 0x0F), nib(b >> 4)])
        .take(count)
        .collect()
}

impl Knowledge {
    fn body(&self) -> Result<Vec<u8>, KnowledgeError> {
        let mut w = Writer(Vec::with_capacity(16 * 1024));
        w.str(&self.model_id)?;
        w.0.extend_from_slice(&self.base_version.to_le_bytes());
        w.str(&self.base_sha256)?;
        w.u16(self.classes.len())?;
        for c in &self.classes {
            w.str(c)?;
        }
        w.u16(self.base_classes)?;
        if self.histogram.len() != self.classes.len() {
            return Err(KnowledgeError::Mismatch(
                "histogram and classes differ in length".to_owned(),
            ));
        }
        for &h in &self.histogram {
            w.0.extend_from_slice(&h.to_le_bytes());
        }
        w.u16(self.deltas.len())?;
        for d in &self.deltas {
            w.str(&d.name)?;
            w.u8(u8::try_from(d.shape.len()).map_err(|_| {
                KnowledgeError::Config(format!("`{}` has too many dimensions", d.name))
            })?);
            for &s in &d.shape {
                w.u32(s)?;
            }
            w.u8(d.bits);
            w.u8(u8::from(d.mask.is_some()));
            w.u32(d.scales.len())?;
            for s in &d.scales {
                w.0.extend_from_slice(&s.to_le_bytes());
            }
            if let Some(m) = &d.mask {
                w.0.extend_from_slice(m);
            }
            w.0.extend_from_slice(&pack(&d.values, d.bits));
        }
        Ok(w.0)
    }

    /// The package's bytes; fails when they would exceed [`MAX_KNOWLEDGE_BYTES`].
    pub fn to_bytes(&self) -> Result<Vec<u8>, KnowledgeError> {
        let body = self.body()?;
        let mut out = Vec::with_capacity(body.len() + 42);
        out.extend_from_slice(KNOWLEDGE_MAGIC);
        out.extend_from_slice(&KNOWLEDGE_VERSION.to_le_bytes());
        let len = u32::try_from(body.len()).map_err(|_| KnowledgeError::TooLarge {
            size: body.len(),
            max: MAX_KNOWLEDGE_BYTES,
        })?;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&body);
        let digest = Sha256::digest(&out);
        out.extend_from_slice(&digest);
        if out.len() > MAX_KNOWLEDGE_BYTES {
            return Err(KnowledgeError::TooLarge {
                size: out.len(),
                max: MAX_KNOWLEDGE_BYTES,
            });
        }
        Ok(out)
    }

    /// Parses and checks a package. Truncated, oversized, corrupted or garbage input gives an
    /// error; nothing here panics.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KnowledgeError> {
        if bytes.len() > MAX_KNOWLEDGE_BYTES {
            return Err(KnowledgeError::TooLarge {
                size: bytes.len(),
                max: MAX_KNOWLEDGE_BYTES,
            });
        }
        let mut r = Reader { rest: bytes };
        if r.take(4, "magic")? != KNOWLEDGE_MAGIC {
            return Err(KnowledgeError::Format("missing magic DRKN".to_owned()));
        }
        let version = r.u16("version")?;
        if version != usize::from(KNOWLEDGE_VERSION) {
            return Err(KnowledgeError::Format(format!(
                "version {version}, this reader knows {KNOWLEDGE_VERSION}"
            )));
        }
        let len = r.u32("body length")?;
        let body = r.take(len, "body")?;
        let digest = r.take(32, "digest")?;
        if !r.rest.is_empty() {
            return Err(KnowledgeError::Format(format!(
                "{} bytes after the digest",
                r.rest.len()
            )));
        }
        let signed = &bytes[..10 + len];
        let want = Sha256::digest(signed);
        if want.as_slice() != digest {
            return Err(KnowledgeError::Digest);
        }
        let package_id = hex_lower(&Sha256::digest(signed));

        let mut r = Reader { rest: body };
        let model_id = r.str("model_id")?;
        let base_version = r.u64("base_version")?;
        let base_sha256 = r.str("base_sha256")?;
        let k = r.u16("class count")?;
        let mut classes = Vec::with_capacity(k.min(r.rest.len() / 2));
        for _ in 0..k {
            classes.push(r.str("class name")?);
        }
        let base_classes = r.u16("base class count")?;
        if base_classes > k {
            return Err(KnowledgeError::Format(format!(
                "{base_classes} base classes of {k}"
            )));
        }
        let mut histogram = Vec::with_capacity(k);
        for _ in 0..k {
            histogram.push(r.u32("histogram")? as u32);
        }
        let nt = r.u16("tensor count")?;
        let mut deltas = Vec::with_capacity(nt.min(64));
        for _ in 0..nt {
            let name = r.str("tensor name")?;
            let nd = usize::from(r.u8("rank")?);
            if nd == 0 || nd > 4 {
                return Err(KnowledgeError::Format(format!("`{name}` has rank {nd}")));
            }
            let mut shape = Vec::with_capacity(nd);
            for _ in 0..nd {
                shape.push(r.u32("dimension")?);
            }
            let numel = shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .filter(|&n| n > 0 && n <= MAX_TENSOR_VALUES)
                .ok_or_else(|| {
                    KnowledgeError::Format(format!("`{name}` has a bad shape {shape:?}"))
                })?;
            let bits = r.u8("bits")?;
            if bits != 8 && bits != 4 {
                return Err(KnowledgeError::Format(format!("`{name}`: {bits} bits")));
            }
            let sparse = match r.u8("encoding")? {
                0 => false,
                1 => true,
                e => return Err(KnowledgeError::Format(format!("`{name}`: encoding {e}"))),
            };
            let rows = r.u32("row count")?;
            let want_rows = if nd > 1 { shape[0] } else { 1 };
            if rows != want_rows {
                return Err(KnowledgeError::Format(format!(
                    "`{name}`: {rows} scales, expected {want_rows}"
                )));
            }
            let raw = r.take(4 * rows, "scales")?;
            let scales: Vec<f32> = raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            if scales.iter().any(|s| !s.is_finite()) {
                return Err(KnowledgeError::Format(format!(
                    "`{name}`: non-finite scale"
                )));
            }
            if scales.iter().any(|s| s.abs() > MAX_DELTA_SCALE) {
                return Err(KnowledgeError::Format(format!(
                    "`{name}`: scale beyond {MAX_DELTA_SCALE}"
                )));
            }
            let (mask, count) = if sparse {
                let m = r.take(numel.div_ceil(8), "mask")?.to_vec();
                let count = m.iter().map(|b| b.count_ones() as usize).sum::<usize>();
                if numel % 8 != 0 && m.last().is_some_and(|b| b >> (numel % 8) != 0) {
                    return Err(KnowledgeError::Format(format!("`{name}`: mask overflows")));
                }
                (Some(m), count)
            } else {
                (None, numel)
            };
            let nbytes = if bits == 8 { count } else { count.div_ceil(2) };
            let values = unpack(r.take(nbytes, "values")?, count, bits);
            deltas.push(TensorDelta {
                name,
                shape,
                bits,
                scales,
                mask,
                values,
            });
        }
        if !r.rest.is_empty() {
            return Err(KnowledgeError::Format(format!(
                "{} unexplained bytes at the end of the body",
                r.rest.len()
            )));
        }
        Ok(Self {
            package_id,
            model_id,
            base_version,
            base_sha256,
            classes,
            base_classes,
            histogram,
            deltas,
        })
    }

    /// The adapted student rebuilt from `base` (the installed student, imported from the same
    /// ONNX file as on the device) and the delta.
    pub fn apply(&self, base: &Net) -> Result<Net, KnowledgeError> {
        let bc = base.config();
        if bc.num_classes != self.base_classes {
            return Err(KnowledgeError::Mismatch(format!(
                "the package is for a base of {} classes, this model has {}",
                self.base_classes, bc.num_classes
            )));
        }
        let mut config = bc.clone();
        config.num_classes = self.classes.len();
        let vars: HashMap<String, Tensor> = base
            .named_vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        if vars.len() != self.deltas.len() {
            return Err(KnowledgeError::Mismatch(format!(
                "{} tensor deltas for a model of {} tensors",
                self.deltas.len(),
                vars.len()
            )));
        }
        let mut out = HashMap::new();
        for d in &self.deltas {
            let b = vars
                .get(&d.name)
                .ok_or_else(|| KnowledgeError::Mismatch(format!("no tensor `{}`", d.name)))?;
            let b = grow_rows(b, &d.shape)?;
            let values = d.dequantise();
            if values.iter().any(|v| !v.is_finite()) {
                return Err(KnowledgeError::Format(format!(
                    "`{}`: the delta is not finite",
                    d.name
                )));
            }
            let delta = Tensor::from_vec(values, d.shape.as_slice(), &Device::Cpu)?;
            let sum = (b + delta)?;
            if sum
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .any(|v| !v.is_finite())
            {
                return Err(KnowledgeError::Mismatch(format!(
                    "`{}`: the updated weights are not finite",
                    d.name
                )));
            }
            out.insert(d.name.clone(), sum);
        }
        Ok(Net::from_named(config, out, 0)?)
    }

    /// Size of the encoded package in bytes.
    pub fn encoded_len(&self) -> Result<usize, KnowledgeError> {
        Ok(self.to_bytes()?.len())
    }
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn four_bit_values_pack_and_unpack() {
        let v: Vec<i8> = vec![-7, 7, 0, -1, 3];
        assert_eq!(unpack(&pack(&v, 4), v.len(), 4), v);
        assert_eq!(unpack(&pack(&v, 8), v.len(), 8), v);
    }

    #[test]
    fn quantisation_error_is_within_half_a_step() {
        let d: Vec<f32> = (0..40)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.013)
            .collect();
        for bits in [8u8, 4] {
            let q = quantise("w", vec![4, 10], &d, &QuantConfig { bits, keep: 1.0 });
            let back = q.dequantise();
            for r in 0..4 {
                let s = q.scales[r];
                for j in 0..10 {
                    let i = r * 10 + j;
                    assert!(
                        (back[i] - d[i]).abs() <= 0.5 * s * 1.01 + 1e-6,
                        "{bits}: {i}"
                    );
                }
            }
        }
        let sparse = quantise(
            "w",
            vec![4, 10],
            &d,
            &QuantConfig {
                bits: 8,
                keep: 0.25,
            },
        );
        assert_eq!(sparse.values.len(), 10);
    }
}
