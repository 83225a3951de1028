//! Training loops: supervised cross-entropy and knowledge distillation, on the CPU.
//!
//! Where it stands: the cloud worker hands standardised `[N, C, T]` windows (from
//! [`crate::window`] / [`crate::split`]) to [`train_supervised`] to fit the teacher, computes the
//! teacher's logits once with [`predict`], and hands them to [`train_distill`] to fit the
//! student on the labelled presumed data plus the unlabelled pool. The trained student then
//! goes to [`crate::metrics`] and [`crate::onnx`].
//!
//! Both loops use AdamW (weight decay on conv and linear weights only), a cosine learning-rate
//! schedule, seeded shuffling and augmentation (ChaCha8), mini-batches, and early stopping on a
//! labelled validation set that restores the best weights. Same seed, same data, same thread
//! count → same weights.

use std::f64::consts::PI;
use std::io::IsTerminal;
use std::time::Instant;

use candle_core::{Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::kd::{self, KdError};
use crate::metrics::argmax_rows;
use crate::model::{ModelError, Net};
use crate::window::WindowSet;

/// Errors of the training loops.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The data handed in is inconsistent (lengths, shapes, labels).
    #[error("invalid training data: {0}")]
    Data(String),
    /// A training hyper-parameter is out of range.
    #[error("invalid training config: {0}")]
    Config(String),
    /// The loss became NaN or infinite.
    #[error("loss diverged to {loss} at epoch {epoch}; lower the learning rate")]
    Diverged {
        /// Epoch (1-based).
        epoch: usize,
        /// The non-finite value.
        loss: f32,
    },
    /// The network failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The loss failed.
    #[error(transparent)]
    Loss(#[from] KdError),
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Data augmentation applied to training windows (never to validation or teacher inputs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Augment {
    /// Each channel of a window is multiplied by a factor drawn from `1 ± scale`.
    pub scale: f32,
    /// Gaussian noise of this standard deviation (in standardised units) is added.
    pub noise: f32,
    /// The window is shifted in time by up to this many samples, edges repeated.
    pub shift: usize,
}

impl Default for Augment {
    fn default() -> Self {
        Self {
            scale: 0.1,
            noise: 0.02,
            shift: 0,
        }
    }
}

/// Hyper-parameters of a training run. Defaults are the ones used for the published HAPT numbers
/// (see the crate's README) and work for both teacher and student.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Maximum passes over the training data.
    pub epochs: usize,
    /// Windows per optimisation step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Learning rate at the end of the cosine schedule.
    pub min_lr: f64,
    /// Epochs of linear warm-up before the cosine decay.
    pub warmup_epochs: usize,
    /// AdamW decoupled weight decay (conv and linear weights only).
    pub weight_decay: f64,
    /// Epochs without a better validation score before stopping (0 = never stop early).
    pub patience: usize,
    /// First epoch (1-based) whose weights may be kept and from which patience counts (like
    /// Keras' `start_from_epoch`). Early epochs at a high learning rate score erratically on a
    /// small validation set; picking one of them by luck costs accuracy on unseen subjects.
    pub start_from_epoch: usize,
    /// Seed of shuffling, augmentation and dropout.
    pub seed: u64,
    /// Distillation temperature `T`.
    pub temperature: f64,
    /// Weight of the soft (teacher) term in distillation; `1 − alpha` weighs the labels.
    pub alpha: f64,
    /// Training-time augmentation.
    pub augment: Augment,
    /// Windows per forward pass when predicting.
    pub eval_batch: usize,
    /// No progress bar (it is also hidden when stderr is not a terminal).
    pub quiet: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 20,
            batch_size: 64,
            lr: 2e-3,
            min_lr: 2e-5,
            warmup_epochs: 1,
            weight_decay: 1e-2,
            patience: 5,
            start_from_epoch: 10,
            seed: 17,
            temperature: 4.0,
            alpha: 0.7,
            augment: Augment::default(),
            eval_batch: 512,
            quiet: false,
        }
    }
}

impl TrainConfig {
    /// Checks every field; lists all problems at once.
    pub fn validate(&self) -> Result<(), TrainError> {
        let mut p = Vec::new();
        if self.epochs == 0 {
            p.push("epochs must be at least 1".to_owned());
        }
        if self.batch_size == 0 || self.eval_batch == 0 {
            p.push("batch_size and eval_batch must be at least 1".to_owned());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            p.push(format!("lr must be positive, found {}", self.lr));
        }
        if !(self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            p.push(format!("min_lr must be in [0, lr], found {}", self.min_lr));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            p.push(format!(
                "weight_decay must be >= 0, found {}",
                self.weight_decay
            ));
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            p.push(format!(
                "temperature must be positive, found {}",
                self.temperature
            ));
        }
        if !(0.0..=1.0).contains(&self.alpha) {
            p.push(format!("alpha must be in [0, 1], found {}", self.alpha));
        }
        if !(self.augment.scale >= 0.0 && self.augment.scale < 1.0) {
            p.push(format!(
                "augment.scale must be in [0, 1), found {}",
                self.augment.scale
            ));
        }
        if !(self.augment.noise >= 0.0 && self.augment.noise.is_finite()) {
            p.push(format!(
                "augment.noise must be >= 0, found {}",
                self.augment.noise
            ));
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(TrainError::Config(p.join("; ")))
        }
    }

    fn lr_at(&self, step: usize, steps_per_epoch: usize) -> f64 {
        let warmup = self.warmup_epochs * steps_per_epoch;
        let total = self.epochs * steps_per_epoch;
        if step < warmup {
            return self.lr * (step + 1) as f64 / warmup as f64;
        }
        let span = total.saturating_sub(warmup).max(1);
        let progress = ((step - warmup) as f64 / span as f64).min(1.0);
        self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + (PI * progress).cos())
    }
}

/// A borrowed block of `n` standardised windows, `[n, channels, len]` row-major.
#[derive(Debug, Clone, Copy)]
pub struct Windows<'a> {
    x: &'a [f32],
    channels: usize,
    len: usize,
}

impl<'a> Windows<'a> {
    /// Wraps `x`, whose length must be a multiple of `channels · len`.
    pub fn new(x: &'a [f32], channels: usize, len: usize) -> Result<Self, TrainError> {
        let per = channels * len;
        if per == 0 || !x.len().is_multiple_of(per) {
            return Err(TrainError::Data(format!(
                "{} values are not a whole number of {channels}×{len} windows",
                x.len()
            )));
        }
        Ok(Self { x, channels, len })
    }

    /// Number of windows.
    pub fn n(&self) -> usize {
        self.x.len() / (self.channels * self.len)
    }

    /// Channels per window.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Samples per channel.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there are no windows.
    pub fn is_empty(&self) -> bool {
        self.x.is_empty()
    }

    /// The values of window `i`.
    pub fn window(&self, i: usize) -> &'a [f32] {
        let per = self.channels * self.len;
        &self.x[i * per..(i + 1) * per]
    }

    /// All values.
    pub fn as_slice(&self) -> &'a [f32] {
        self.x
    }

    /// The windows of a [`WindowSet`] (labels ignored).
    pub fn of(set: &'a WindowSet) -> Result<Self, TrainError> {
        Self::new(&set.x, set.channels, set.len)
    }
}

/// Windows with one class index each.
#[derive(Debug, Clone, Copy)]
pub struct Labelled<'a> {
    /// The windows.
    pub x: Windows<'a>,
    /// One class index per window.
    pub y: &'a [u32],
}

impl<'a> Labelled<'a> {
    /// Pairs windows and labels; their counts must agree.
    pub fn new(x: Windows<'a>, y: &'a [u32]) -> Result<Self, TrainError> {
        if x.n() != y.len() {
            return Err(TrainError::Data(format!(
                "{} windows but {} labels",
                x.n(),
                y.len()
            )));
        }
        Ok(Self { x, y })
    }

    /// The windows and labels of a labelled [`WindowSet`].
    pub fn of(set: &'a WindowSet) -> Result<Self, TrainError> {
        if !set.is_labelled() && !set.is_empty() {
            return Err(TrainError::Data(format!(
                "a labelled set is needed, but these {} windows carry no labels",
                set.n()
            )));
        }
        Self::new(Windows::of(set)?, &set.y)
    }
}

/// A block of distillation data: windows, the teacher's logits on them (`[n, K]`), and labels
/// where known.
#[derive(Debug, Clone, Copy)]
pub struct DistillPart<'a> {
    /// The windows.
    pub x: Windows<'a>,
    /// Teacher logits, `[n, K]` row-major.
    pub teacher_logits: &'a [f32],
    /// One class index per window, or `None` for unlabelled data (soft term only).
    pub labels: Option<&'a [u32]>,
}

/// One epoch of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochStats {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Mean training loss over the epoch's batches.
    pub train_loss: f64,
    /// Mean cross-entropy on the validation set.
    pub val_loss: Option<f64>,
    /// Accuracy on the validation set.
    pub val_accuracy: Option<f64>,
    /// Learning rate at the end of the epoch.
    pub lr: f64,
    /// Wall-clock seconds of the epoch, validation included.
    pub seconds: f64,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    /// Epochs actually run.
    pub epochs_run: usize,
    /// The epoch whose weights were kept (the last one without validation data).
    pub best_epoch: usize,
    /// Validation accuracy of the kept weights.
    pub best_val_accuracy: Option<f64>,
    /// True when early stopping ended the run.
    pub stopped_early: bool,
    /// Per-epoch statistics.
    pub history: Vec<EpochStats>,
    /// Wall-clock seconds of the run.
    pub seconds: f64,
}

/// Called after every epoch with the network in its current state (not the best one) and the
/// epoch's statistics, e.g. to log extra metrics or draw curves.
pub type EpochHook<'h> = dyn FnMut(&Net, &EpochStats) + 'h;

/// Fits `net` to labelled windows with cross-entropy.
pub fn train_supervised(
    net: &Net,
    train: &Labelled<'_>,
    val: Option<&Labelled<'_>>,
    cfg: &TrainConfig,
) -> Result<TrainReport, TrainError> {
    train_supervised_with(net, train, val, cfg, &mut |_, _| {})
}

/// [`train_supervised`] with an [`EpochHook`].
pub fn train_supervised_with(
    net: &Net,
    train: &Labelled<'_>,
    val: Option<&Labelled<'_>>,
    cfg: &TrainConfig,
    on_epoch: &mut EpochHook<'_>,
) -> Result<TrainReport, TrainError> {
    let k = net.config().num_classes;
    check_windows(net, &train.x, "training")?;
    check_labels(train.y, k, "training")?;
    let parts = [Part {
        x: train.x,
        labels: Some(train.y),
        teacher: None,
    }];
    run(net, &parts, val, cfg, Objective::CrossEntropy, on_epoch)
}

/// Fits a student to a teacher's logits (and to labels where given) with [`kd::kd_loss_masked`].
pub fn train_distill(
    student: &Net,
    parts: &[DistillPart<'_>],
    val: Option<&Labelled<'_>>,
    cfg: &TrainConfig,
) -> Result<TrainReport, TrainError> {
    train_distill_with(student, parts, val, cfg, &mut |_, _| {})
}

/// [`train_distill`] with an [`EpochHook`].
pub fn train_distill_with(
    student: &Net,
    parts: &[DistillPart<'_>],
    val: Option<&Labelled<'_>>,
    cfg: &TrainConfig,
    on_epoch: &mut EpochHook<'_>,
) -> Result<TrainReport, TrainError> {
    let k = student.config().num_classes;
    let mut inner = Vec::with_capacity(parts.len());
    for (i, p) in parts.iter().enumerate() {
        let what = format!("distillation part {i}");
        check_windows(student, &p.x, &what)?;
        if p.teacher_logits.len() != p.x.n() * k {
            return Err(TrainError::Data(format!(
                "{what}: {} teacher logits for {} windows of {k} classes (expected {})",
                p.teacher_logits.len(),
                p.x.n(),
                p.x.n() * k
            )));
        }
        if let Some(y) = p.labels {
            if y.len() != p.x.n() {
                return Err(TrainError::Data(format!(
                    "{what}: {} windows but {} labels",
                    p.x.n(),
                    y.len()
                )));
            }
            check_labels(y, k, &what)?;
        }
        inner.push(Part {
            x: p.x,
            labels: p.labels,
            teacher: Some(p.teacher_logits),
        });
    }
    run(student, &inner, val, cfg, Objective::Distill, on_epoch)
}

/// Logits `[n, K]` (row-major) of `net` in inference mode, `batch` windows per forward pass.
pub fn predict(net: &Net, x: &Windows<'_>, batch: usize) -> Result<Vec<f32>, TrainError> {
    check_windows(net, x, "prediction")?;
    let batch = batch.max(1);
    let (c, t) = (x.channels(), x.len());
    let mut out = Vec::with_capacity(x.n() * net.config().num_classes);
    let mut start = 0;
    while start < x.n() {
        let end = (start + batch).min(x.n());
        let data = &x.as_slice()[start * c * t..end * c * t];
        let input = Tensor::from_slice(data, (end - start, c, t), &Device::Cpu)?;
        let logits = net.forward_t(&input, false)?;
        out.extend(logits.flatten_all()?.to_vec1::<f32>()?);
        start = end;
    }
    Ok(out)
}

/// Class probabilities `[n, K]` (softmax of [`predict`]).
pub fn predict_proba(net: &Net, x: &Windows<'_>, batch: usize) -> Result<Vec<f32>, TrainError> {
    let k = net.config().num_classes;
    let mut logits = predict(net, x, batch)?;
    softmax_rows(&mut logits, k);
    Ok(logits)
}

/// Softmax of each row of a row-major `[n, k]` matrix, in place.
pub fn softmax_rows(values: &mut [f32], k: usize) {
    if k == 0 {
        return;
    }
    for row in values.chunks_exact_mut(k) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        for v in row.iter_mut() {
            *v /= sum;
        }
    }
}

/// Predicted class of each window.
pub fn predict_classes(net: &Net, x: &Windows<'_>, batch: usize) -> Result<Vec<u32>, TrainError> {
    let logits = predict(net, x, batch)?;
    Ok(argmax_rows(&logits, net.config().num_classes))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Objective {
    CrossEntropy,
    Distill,
}

#[derive(Debug, Clone, Copy)]
struct Part<'a> {
    x: Windows<'a>,
    labels: Option<&'a [u32]>,
    teacher: Option<&'a [f32]>,
}

fn check_windows(net: &Net, x: &Windows<'_>, what: &str) -> Result<(), TrainError> {
    let cfg = net.config();
    if x.channels() != cfg.in_channels || x.len() != cfg.window {
        return Err(TrainError::Data(format!(
            "{what} windows are {}×{} but the model takes {}×{}",
            x.channels(),
            x.len(),
            cfg.in_channels,
            cfg.window
        )));
    }
    Ok(())
}

fn check_labels(y: &[u32], k: usize, what: &str) -> Result<(), TrainError> {
    if let Some((i, c)) = y.iter().enumerate().find(|(_, &c)| c as usize >= k) {
        return Err(TrainError::Data(format!(
            "{what} label at position {i} is class {c}, but the model has {k} classes"
        )));
    }
    Ok(())
}

struct Batch {
    x: Vec<f32>,
    y: Vec<u32>,
    labelled: Vec<f32>,
    teacher: Vec<f32>,
}

fn gather_batch(
    parts: &[Part<'_>],
    rows: &[(usize, usize)],
    k: usize,
    aug: &Augment,
    rng: &mut ChaCha8Rng,
) -> Batch {
    let (c, t) = (parts[0].x.channels(), parts[0].x.len());
    let mut b = Batch {
        x: Vec::with_capacity(rows.len() * c * t),
        y: Vec::with_capacity(rows.len()),
        labelled: Vec::with_capacity(rows.len()),
        teacher: Vec::with_capacity(rows.len() * k),
    };
    for &(p, i) in rows {
        let part = &parts[p];
        let start = b.x.len();
        b.x.extend_from_slice(part.x.window(i));
        augment(&mut b.x[start..], c, t, aug, rng);
        match part.labels {
            Some(y) => {
                b.y.push(y[i]);
                b.labelled.push(1.0);
            }
            None => {
                b.y.push(0);
                b.labelled.push(0.0);
            }
        }
        if let Some(tl) = part.teacher {
            b.teacher.extend_from_slice(&tl[i * k..(i + 1) * k]);
        }
    }
    b
}

/// Applies `aug` to one window `[c, t]` in place (shift, per-channel scale, noise).
pub(crate) fn augment(w: &mut [f32], c: usize, t: usize, aug: &Augment, rng: &mut ChaCha8Rng) {
    if aug.shift > 0 && t > 1 {
        let max = aug.shift.min(t - 1) as i64;
        let s = rng.gen_range(-max..=max);
        if s != 0 {
            for ch in w.chunks_exact_mut(t) {
                let orig = ch.to_vec();
                for (j, v) in ch.iter_mut().enumerate() {
                    let src = (j as i64 - s).clamp(0, t as i64 - 1) as usize;
                    *v = orig[src];
                }
            }
        }
    }
    if aug.scale > 0.0 {
        for ch in w.chunks_exact_mut(t).take(c) {
            let f = rng.gen_range(1.0 - aug.scale..=1.0 + aug.scale);
            ch.iter_mut().for_each(|v| *v *= f);
        }
    }
    if aug.noise > 0.0 {
        for v in w.iter_mut() {
            // Box–Muller; u1 in (0, 1] keeps the logarithm finite.
            let u1: f32 = 1.0 - rng.gen::<f32>();
            let u2: f32 = rng.gen();
            let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos();
            *v += aug.noise * z;
        }
    }
}

fn progress_bar(total: u64, quiet: bool) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix} [{bar:30}] {pos}/{len} steps {elapsed_precise} eta {eta} {msg}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Accuracy and mean cross-entropy of `net` on `val`.
fn validate(net: &Net, val: &Labelled<'_>, batch: usize) -> Result<(f64, f64), TrainError> {
    let k = net.config().num_classes;
    let logits = predict(net, &val.x, batch)?;
    let pred = argmax_rows(&logits, k);
    let correct = pred.iter().zip(val.y).filter(|(p, y)| p == y).count();
    let mut ce = 0.0f64;
    for (row, &y) in logits.chunks_exact(k).zip(val.y) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = row
            .iter()
            .map(|v| f64::from(v - max).exp())
            .sum::<f64>()
            .ln()
            + f64::from(max);
        ce += lse - f64::from(row[y as usize]);
    }
    let n = val.y.len().max(1) as f64;
    Ok((correct as f64 / n, ce / n))
}

fn run(
    net: &Net,
    parts: &[Part<'_>],
    val: Option<&Labelled<'_>>,
    cfg: &TrainConfig,
    objective: Objective,
    on_epoch: &mut EpochHook<'_>,
) -> Result<TrainReport, TrainError> {
    cfg.validate()?;
    let k = net.config().num_classes;
    if let Some(v) = val {
        check_windows(net, &v.x, "validation")?;
        check_labels(v.y, k, "validation")?;
        if v.y.len() != v.x.n() {
            return Err(TrainError::Data(format!(
                "validation: {} windows but {} labels",
                v.x.n(),
                v.y.len()
            )));
        }
        if v.y.is_empty() {
            return Err(TrainError::Data("the validation set is empty".to_owned()));
        }
    }
    let mut rows: Vec<(usize, usize)> = parts
        .iter()
        .enumerate()
        .flat_map(|(p, part)| (0..part.x.n()).map(move |i| (p, i)))
        .collect();
    if rows.is_empty() {
        return Err(TrainError::Data("the training set is empty".to_owned()));
    }
    let (c, t) = (net.config().in_channels, net.config().window);
    let steps_per_epoch = rows.len().div_ceil(cfg.batch_size);

    let (decay, no_decay) = net.trainable_vars();
    let params = |wd| ParamsAdamW {
        lr: cfg.lr,
        weight_decay: wd,
        ..ParamsAdamW::default()
    };
    let mut opt_decay = AdamW::new(decay, params(cfg.weight_decay))?;
    let mut opt_plain = AdamW::new(no_decay, params(0.0))?;

    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    net.reseed_dropout(cfg.seed.wrapping_add(1));
    let bar = progress_bar((cfg.epochs * steps_per_epoch) as u64, cfg.quiet);
    bar.set_prefix(format!("{:?}", net.config().arch).to_lowercase());

    let started = Instant::now();
    let mut history = Vec::new();
    let mut best: Option<(usize, f64, f64)> = None;
    let mut best_weights = None;
    let mut since_best = 0;
    let mut stopped_early = false;
    let mut step = 0;
    for epoch in 1..=cfg.epochs {
        let epoch_start = Instant::now();
        rows.shuffle(&mut rng);
        let mut loss_sum = 0.0f64;
        let mut lr = cfg.lr;
        for chunk in rows.chunks(cfg.batch_size) {
            lr = cfg.lr_at(step, steps_per_epoch);
            opt_decay.set_learning_rate(lr);
            opt_plain.set_learning_rate(lr);
            let b = gather_batch(parts, chunk, k, &cfg.augment, &mut rng);
            let n = chunk.len();
            let x = Tensor::from_vec(b.x, (n, c, t), &Device::Cpu)?;
            let y = Tensor::from_vec(b.y, n, &Device::Cpu)?;
            let logits = net.forward_t(&x, true)?;
            let loss = match objective {
                Objective::CrossEntropy => kd::cross_entropy(&logits, &y)?,
                Objective::Distill => {
                    let teacher = Tensor::from_vec(b.teacher, (n, k), &Device::Cpu)?;
                    let mask = Tensor::from_vec(b.labelled, n, &Device::Cpu)?;
                    kd::kd_loss_masked(&logits, &teacher, &y, &mask, cfg.temperature, cfg.alpha)?
                }
            };
            let value = loss.to_scalar::<f32>()?;
            if !value.is_finite() {
                bar.abandon();
                return Err(TrainError::Diverged { epoch, loss: value });
            }
            loss_sum += f64::from(value);
            let grads = loss.backward()?;
            opt_decay.step(&grads)?;
            opt_plain.step(&grads)?;
            step += 1;
            bar.inc(1);
        }
        let train_loss = loss_sum / steps_per_epoch as f64;
        let (val_accuracy, val_loss) = match val {
            Some(v) => {
                let (acc, loss) = validate(net, v, cfg.eval_batch)?;
                (Some(acc), Some(loss))
            }
            None => (None, None),
        };
        let seconds = epoch_start.elapsed().as_secs_f64();
        info!(
            epoch,
            train_loss = format!("{train_loss:.4}"),
            val_loss = val_loss.map(|v| format!("{v:.4}")),
            val_accuracy = val_accuracy.map(|v| format!("{v:.4}")),
            lr = format!("{lr:.2e}"),
            seconds = format!("{seconds:.1}"),
            "Epoch finished."
        );
        bar.set_message(match val_accuracy {
            Some(a) => format!("epoch {epoch} loss {train_loss:.4} val acc {a:.4}"),
            None => format!("epoch {epoch} loss {train_loss:.4}"),
        });
        let stats = EpochStats {
            epoch,
            train_loss,
            val_loss,
            val_accuracy,
            lr,
            seconds,
        };
        on_epoch(net, &stats);
        history.push(stats);
        let eligible = epoch >= cfg.start_from_epoch.min(cfg.epochs);
        if let (true, Some(acc), Some(loss)) = (eligible, val_accuracy, val_loss) {
            let better = match best {
                None => true,
                Some((_, best_acc, best_loss)) => {
                    acc > best_acc || (acc == best_acc && loss < best_loss)
                }
            };
            if better {
                best = Some((epoch, acc, loss));
                best_weights = Some(net.snapshot()?);
                since_best = 0;
            } else {
                since_best += 1;
                if cfg.patience > 0 && since_best >= cfg.patience {
                    stopped_early = true;
                    break;
                }
            }
        }
    }
    bar.finish_and_clear();
    if let Some(w) = &best_weights {
        net.restore(w)?;
    }
    let epochs_run = history.len();
    let report = TrainReport {
        epochs_run,
        best_epoch: best.map_or(epochs_run, |b| b.0),
        best_val_accuracy: best.map(|b| b.1),
        stopped_early,
        history,
        seconds: started.elapsed().as_secs_f64(),
    };
    info!(
        epochs_run = report.epochs_run,
        best_epoch = report.best_epoch,
        best_val_accuracy = report.best_val_accuracy.map(|v| format!("{v:.4}")),
        seconds = format!("{:.1}", report.seconds),
        "Training finished."
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;

    const C: usize = 2;
    const T: usize = 32;

    /// Three classes told apart by the frequency of a sine in channel 0 (1, 3 or 6 periods per
    /// window, random phase) and by the sign of a constant offset in channel 1 (class 2 only),
    /// plus Gaussian-ish noise.
    fn synthetic(n: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut x = Vec::with_capacity(n * C * T);
        let mut y = Vec::with_capacity(n);
        for i in 0..n {
            let class = (i % 3) as u32;
            let periods = [1.0, 3.0, 6.0][class as usize];
            let phase: f32 = rng.gen_range(0.0..std::f32::consts::TAU);
            for t in 0..T {
                let a = std::f32::consts::TAU * periods * t as f32 / T as f32 + phase;
                x.push(a.sin() + rng.gen_range(-0.3..0.3));
            }
            let offset = if class == 2 { 0.5 } else { -0.5 };
            x.extend((0..T).map(|_| offset + rng.gen_range(-0.3..0.3)));
            y.push(class);
        }
        (x, y)
    }

    fn small_student() -> Net {
        let mut cfg = ModelConfig::student(C, T, 3);
        cfg.convs = vec![
            crate::model::ConvSpec::new(8, 5, 1),
            crate::model::ConvSpec::new(16, 5, 2),
        ];
        Net::new(cfg, 11).unwrap()
    }

    fn quick_config() -> TrainConfig {
        TrainConfig {
            epochs: 6,
            batch_size: 32,
            lr: 1e-2,
            min_lr: 1e-3,
            patience: 0,
            quiet: true,
            ..TrainConfig::default()
        }
    }

    fn accuracy(net: &Net, x: &[f32], y: &[u32]) -> f64 {
        let pred = predict_classes(net, &Windows::new(x, C, T).unwrap(), 64).unwrap();
        pred.iter().zip(y).filter(|(a, b)| a == b).count() as f64 / y.len() as f64
    }

    #[test]
    fn supervised_training_learns_a_separable_task_and_is_reproducible() {
        let (x, y) = synthetic(240, 1);
        let (vx, vy) = synthetic(90, 2);
        let train = Labelled::new(Windows::new(&x, C, T).unwrap(), &y).unwrap();
        let val = Labelled::new(Windows::new(&vx, C, T).unwrap(), &vy).unwrap();
        let net = small_student();
        let before = accuracy(&net, &vx, &vy);
        let report = train_supervised(&net, &train, Some(&val), &quick_config()).unwrap();
        let after = accuracy(&net, &vx, &vy);
        assert!(
            after >= 0.9 && after > before,
            "accuracy {before} → {after}"
        );
        assert_eq!(report.epochs_run, 6);
        assert_eq!(report.history.len(), 6);
        assert_eq!(
            report.best_val_accuracy,
            Some(report.history[report.best_epoch - 1].val_accuracy.unwrap())
        );
        assert!(
            (report.best_val_accuracy.unwrap() - after).abs() < 1e-12,
            "best weights restored"
        );

        let again = small_student();
        let report2 = train_supervised(&again, &train, Some(&val), &quick_config()).unwrap();
        assert_eq!(
            report
                .history
                .iter()
                .map(|e| e.train_loss)
                .collect::<Vec<_>>(),
            report2
                .history
                .iter()
                .map(|e| e.train_loss)
                .collect::<Vec<_>>()
        );
        let w = Windows::new(&vx, C, T).unwrap();
        assert_eq!(
            predict(&net, &w, 7).unwrap(),
            predict(&again, &w, 64).unwrap()
        );
    }

    #[test]
    fn distillation_on_unlabelled_windows_transfers_the_teacher() {
        let (x, y) = synthetic(240, 3);
        let (vx, vy) = synthetic(90, 4);
        let teacher = small_student();
        let train = Labelled::new(Windows::new(&x, C, T).unwrap(), &y).unwrap();
        train_supervised(&teacher, &train, None, &quick_config()).unwrap();
        let teacher_acc = accuracy(&teacher, &vx, &vy);
        assert!(teacher_acc >= 0.9, "{teacher_acc}");

        let w = Windows::new(&x, C, T).unwrap();
        let logits = predict(&teacher, &w, 100).unwrap();
        let student = Net::new(small_student().config().clone(), 99).unwrap();
        let parts = [DistillPart {
            x: w,
            teacher_logits: &logits,
            labels: None,
        }];
        let cfg = TrainConfig {
            alpha: 1.0,
            ..quick_config()
        };
        let report = train_distill(&student, &parts, None, &cfg).unwrap();
        assert_eq!(report.best_val_accuracy, None);
        let student_acc = accuracy(&student, &vx, &vy);
        assert!(
            student_acc >= 0.85,
            "student {student_acc}, teacher {teacher_acc}"
        );
    }

    #[test]
    fn early_stopping_keeps_the_best_eligible_epoch() {
        // Validation labels are shifted by one class, so the better the net learns the task,
        // the worse it scores: validation stops improving and patience ends the run.
        let (x, y) = synthetic(240, 5);
        let (vx, vy) = synthetic(90, 6);
        let wrong: Vec<u32> = vy.iter().map(|c| (c + 1) % 3).collect();
        let train = Labelled::new(Windows::new(&x, C, T).unwrap(), &y).unwrap();
        let val = Labelled::new(Windows::new(&vx, C, T).unwrap(), &wrong).unwrap();
        let cfg = TrainConfig {
            epochs: 12,
            patience: 2,
            start_from_epoch: 2,
            ..quick_config()
        };
        let net = small_student();
        let report = train_supervised(&net, &train, Some(&val), &cfg).unwrap();
        assert!(report.stopped_early, "{report:?}");
        assert!(report.best_epoch >= 2, "epoch 1 is not eligible");
        assert_eq!(report.epochs_run, report.best_epoch + 2);
        let kept = report.history[report.best_epoch - 1].val_accuracy.unwrap();
        let w = Windows::new(&vx, C, T).unwrap();
        let pred = predict_classes(&net, &w, 64).unwrap();
        let acc = pred.iter().zip(&wrong).filter(|(a, b)| a == b).count() as f64 / 90.0;
        assert!(
            (acc - kept).abs() < 1e-12,
            "restored weights score {acc}, kept epoch {kept}"
        );
    }

    #[test]
    fn inconsistent_inputs_are_rejected_before_training() {
        assert!(Windows::new(&[0.0; 10], 3, 3).is_err());
        let (x, y) = synthetic(6, 1);
        let w = Windows::new(&x, C, T).unwrap();
        assert!(Labelled::new(w, &y[..5]).is_err());
        let net = small_student();
        let short = [0.0f32; 5];
        let parts = [DistillPart {
            x: w,
            teacher_logits: &short,
            labels: None,
        }];
        let err = train_distill(&net, &parts, None, &quick_config())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("5 teacher logits for 6 windows of 3 classes (expected 18)"),
            "{err}"
        );
        let bad = [0u32, 1, 2, 3, 0, 1];
        let train = Labelled::new(w, &bad).unwrap();
        let err = train_supervised(&net, &train, None, &quick_config())
            .unwrap_err()
            .to_string();
        assert!(err.contains("position 3 is class 3"), "{err}");
        let wrong = Windows::new(&x, 4, T / 2).unwrap();
        assert!(predict(&net, &wrong, 8).is_err());
        let cfg = TrainConfig {
            alpha: 2.0,
            epochs: 0,
            ..quick_config()
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("alpha") && err.contains("epochs"), "{err}");
    }

    #[test]
    fn learning_rate_warms_up_then_follows_a_cosine() {
        let cfg = TrainConfig {
            epochs: 10,
            warmup_epochs: 1,
            lr: 1.0,
            min_lr: 0.0,
            ..TrainConfig::default()
        };
        // 4 steps per epoch: warm-up over steps 0..4, cosine over the 36 others.
        assert!((cfg.lr_at(0, 4) - 0.25).abs() < 1e-12);
        assert!((cfg.lr_at(3, 4) - 1.0).abs() < 1e-12);
        assert!((cfg.lr_at(4, 4) - 1.0).abs() < 1e-12);
        assert!((cfg.lr_at(22, 4) - 0.5).abs() < 1e-12);
        assert!(cfg.lr_at(39, 4) < 0.01);
    }

    #[test]
    fn augmentation_scales_channels_and_shifts_with_repeated_edges() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let none = Augment {
            scale: 0.0,
            noise: 0.0,
            shift: 0,
        };
        let mut w = vec![1.0, 2.0, 3.0, 4.0];
        augment(&mut w, 1, 4, &none, &mut rng);
        assert_eq!(w, vec![1.0, 2.0, 3.0, 4.0]);
        let scale = Augment {
            scale: 0.2,
            noise: 0.0,
            shift: 0,
        };
        let mut w = vec![1.0, 2.0, 10.0, 20.0];
        augment(&mut w, 2, 2, &scale, &mut rng);
        assert!((w[1] / w[0] - 2.0).abs() < 1e-6 && (w[3] / w[2] - 2.0).abs() < 1e-6);
        assert!(w
            .iter()
            .zip([1.0, 2.0, 10.0, 20.0])
            .all(|(a, b)| (a / b - 1.0).abs() <= 0.2 + 1e-6));
        let shift = Augment {
            scale: 0.0,
            noise: 0.0,
            shift: 1,
        };
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..50 {
            let mut w = vec![1.0, 2.0, 3.0];
            augment(&mut w, 1, 3, &shift, &mut rng);
            seen.insert(w.iter().map(|v| *v as i32).collect::<Vec<_>>());
        }
        let want: std::collections::BTreeSet<Vec<i32>> =
            [vec![1, 1, 2], vec![1, 2, 3], vec![2, 3, 3]]
                .into_iter()
                .collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn softmax_rows_sum_to_one_and_keep_the_order() {
        let mut v = vec![0.0, 3f32.ln(), 1000.0, 1000.0];
        softmax_rows(&mut v, 2);
        assert!((v[0] - 0.25).abs() < 1e-6 && (v[1] - 0.75).abs() < 1e-6);
        assert!((v[2] - 0.5).abs() < 1e-6 && (v[3] - 0.5).abs() < 1e-6);
    }
}
