//! Guarded local adaptation: fine-tunes a copy of the installed student on the user's
//! exclusive (labelled) windows, on the gateway, without losing the presumed behaviour.
//!
//! Where it stands: labels → exclusive store → **adapt** → [`crate::knowledge::extract`] →
//! uplink. The base is the installed student as rebuilt from its ONNX file
//! ([`crate::onnx::import`]), so the knowledge delta is relative to exactly those weights; the
//! cloud reconstructs the adapted model the same way.
//!
//! Loss per step: cross-entropy on a mini-batch of the user's windows (augmented) plus
//! `probe_weight · T² · KL(base ‖ adapted)` on a mini-batch of the manufacturer's probe
//! windows ([`crate::probe`]). Regularising on presumed inputs (not on the user's own ones)
//! lets the model change its mind where the user says it is wrong, while it keeps answering
//! like the installed model on presumed data. Class names the base lacks are new classes: the
//! head grows (at most `max_new_classes`), and on probe windows the base's target gives them
//! (almost) zero probability, so presumed windows are not relabelled as a new class.
//!
//! Guard: probe accuracy before and after; a drop of more than `guard_margin` refuses the
//! result ([`AdaptError::Guard`]). Seeded (ChaCha8): same inputs and seed → same weights.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::{ChaCha20Rng, ChaCha8Rng};
use serde::{Deserialize, Serialize};

use crate::kd::{self, KdError};
use crate::metrics::argmax_rows;
use crate::model::{ModelError, Net};
use crate::privacy::DpConfig;
use crate::probe::ProbeSet;
use crate::train::{self, predict, Augment, TrainError, Windows};

/// Errors of [`adapt`].
#[derive(Debug, thiserror::Error)]
pub enum AdaptError {
    /// The inputs are inconsistent (shapes, counts, class names).
    #[error("invalid adaptation data: {0}")]
    Data(String),
    /// A configuration value is out of range.
    #[error("invalid adaptation config: {0}")]
    Config(String),
    /// The user brings more new classes than allowed.
    #[error("{found} new classes ({names}), at most {max} are accepted")]
    TooManyNewClasses {
        /// How many.
        found: usize,
        /// Their names.
        names: String,
        /// The limit.
        max: usize,
    },
    /// The guard refused the adapted model.
    #[error(
        "probe accuracy fell from {before:.4} to {after:.4}, more than the margin {margin:.4}; \
         the adapted model is refused"
    )]
    Guard {
        /// Probe accuracy of the base model.
        before: f64,
        /// Probe accuracy of the adapted model.
        after: f64,
        /// The configured margin.
        margin: f64,
    },
    /// The caller cancelled the adaptation (see [`adapt_cancellable`]); nothing was produced.
    #[error("adaptation cancelled after {steps} of {total} steps")]
    Cancelled {
        /// Optimiser steps done before the cancellation was seen.
        steps: usize,
        /// Steps the adaptation would have taken.
        total: usize,
    },
    /// The loss became NaN or infinite.
    #[error("adaptation diverged (loss {0}); lower the learning rate")]
    Diverged(f32),
    /// The network failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A loss failed.
    #[error(transparent)]
    Loss(#[from] KdError),
    /// Prediction failed.
    #[error(transparent)]
    Train(#[from] TrainError),
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Hyper-parameters of the local adaptation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdaptConfig {
    /// Passes over the user's exclusive windows.
    pub epochs: usize,
    /// User windows per step.
    pub batch_size: usize,
    /// Probe windows per step (regulariser).
    pub probe_batch: usize,
    /// Peak learning rate (cosine decay to a tenth of it).
    pub lr: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Weight of the KD term towards the base model on probe windows (0 = plain fine-tuning).
    pub probe_weight: f64,
    /// Temperature of that KD term.
    pub temperature: f64,
    /// Most class names the base lacks that are accepted (as new classes).
    pub max_new_classes: usize,
    /// Largest allowed drop of probe accuracy (a fraction, 0.05 = 5 points).
    pub guard_margin: f64,
    /// Augmentation of the user's windows.
    pub augment: Augment,
    /// Seed of shuffling, augmentation, probe sampling and new head rows (never of the
    /// privacy noise, which comes from the operating system).
    pub seed: u64,
    /// Differential privacy (off by default).
    pub dp: DpConfig,
}

impl Default for AdaptConfig {
    fn default() -> Self {
        Self {
            epochs: 15,
            batch_size: 16,
            probe_batch: 32,
            lr: 2e-3,
            weight_decay: 0.0,
            probe_weight: 1.0,
            temperature: 2.0,
            max_new_classes: 4,
            guard_margin: 0.05,
            augment: Augment {
                scale: 0.1,
                noise: 0.05,
                shift: 8,
            },
            seed: 7,
            dp: DpConfig::default(),
        }
    }
}

impl AdaptConfig {
    /// Checks every field; lists all problems at once.
    pub fn validate(&self) -> Result<(), AdaptError> {
        let mut p = Vec::new();
        if self.epochs == 0 || self.batch_size == 0 {
            p.push("epochs and batch_size must be at least 1".to_owned());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            p.push(format!("lr must be positive, found {}", self.lr));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            p.push(format!(
                "weight_decay must be >= 0, found {}",
                self.weight_decay
            ));
        }
        if !(self.probe_weight >= 0.0 && self.probe_weight.is_finite()) {
            p.push(format!(
                "probe_weight must be >= 0, found {}",
                self.probe_weight
            ));
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            p.push(format!(
                "temperature must be positive, found {}",
                self.temperature
            ));
        }
        if !(0.0..=1.0).contains(&self.guard_margin) {
            p.push(format!(
                "guard_margin must be in [0, 1], found {}",
                self.guard_margin
            ));
        }
        let noise_ok = self.augment.noise.is_finite() && self.augment.noise >= 0.0;
        if !((0.0..1.0).contains(&self.augment.scale) && noise_ok) {
            p.push("augment.scale must be in [0, 1) and augment.noise >= 0".to_owned());
        }
        if self.dp.enabled {
            p.extend(self.dp.problems());
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(AdaptError::Config(p.join("; ")))
        }
    }
}

/// The user's exclusive windows: standardised, NCT, with a class name each.
#[derive(Debug, Clone, Copy)]
pub struct Exclusive<'a> {
    /// The windows.
    pub x: Windows<'a>,
    /// One class name per window (names the base lacks are new classes).
    pub labels: &'a [String],
}

/// The result of [`adapt`].
#[derive(Debug)]
pub struct Adapted {
    /// The adapted student (head grown by the new classes).
    pub net: Net,
    /// Its classes: the base's, then the new ones in order of first appearance.
    pub classes: Vec<String>,
    /// How many of `classes` are new.
    pub new_classes: usize,
    /// Windows per class of the user's labels, in `classes` order (with noise under DP).
    pub histogram: Vec<u32>,
    /// ρ (zCDP) this adaptation spent, when it ran with differential privacy.
    pub dp_rho: Option<f64>,
    /// Probe accuracy of the base model.
    pub probe_accuracy_before: f64,
    /// Probe accuracy of the adapted model.
    pub probe_accuracy_after: f64,
    /// Accuracy of the adapted model on the exclusive windows it was trained on.
    pub exclusive_accuracy: f64,
    /// Optimisation steps run.
    pub steps: usize,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// The class list after adaptation and the class index of every exclusive window.
pub fn class_space(
    base_classes: &[String],
    labels: &[String],
    max_new: usize,
) -> Result<(Vec<String>, Vec<u32>), AdaptError> {
    let mut classes = base_classes.to_vec();
    let mut y = Vec::with_capacity(labels.len());
    for l in labels {
        if l.is_empty() {
            return Err(AdaptError::Data("an empty class name".to_owned()));
        }
        let idx = match classes.iter().position(|c| c == l) {
            Some(i) => i,
            None => {
                classes.push(l.clone());
                classes.len() - 1
            }
        };
        y.push(idx as u32);
    }
    let new = classes.len() - base_classes.len();
    if new > max_new {
        return Err(AdaptError::TooManyNewClasses {
            found: new,
            names: classes[base_classes.len()..].join(", "),
            max: max_new,
        });
    }
    Ok((classes, y))
}

fn accuracy(logits: &[f32], k: usize, y: &[u32]) -> f64 {
    let pred = argmax_rows(logits, k);
    let ok = pred.iter().zip(y).filter(|(a, b)| a == b).count();
    ok as f64 / y.len().max(1) as f64
}

/// One standard normal draw (Box–Muller).
fn gaussian(rng: &mut ChaCha20Rng) -> f64 {
    let u1: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// The DP-SGD gradient of the user's part of a step: each window's cross-entropy gradient
/// clipped to `clip_norm` on its own, summed, Gaussian noise of `noise_multiplier ·
/// clip_norm` added per coordinate, divided by the batch size. Batch norm frozen, no dropout:
/// the forward pass of one window depends on that window alone.
fn dp_user_gradients(
    net: &Net,
    vars: &[Var],
    x: &[f32],
    y: &[u32],
    dp: &DpConfig,
    noise: &mut ChaCha20Rng,
) -> Result<GradStore, AdaptError> {
    let m = y.len();
    let per = x.len() / m.max(1);
    let (c, t) = (net.config().in_channels, net.config().window);
    let mut sums: Vec<Tensor> = vars
        .iter()
        .map(|v| v.as_tensor().zeros_like())
        .collect::<Result<_, _>>()?;
    for (i, &label) in y.iter().enumerate() {
        let xi = Tensor::from_slice(&x[i * per..(i + 1) * per], (1, c, t), &Device::Cpu)?;
        let yi = Tensor::from_vec(vec![label], 1, &Device::Cpu)?;
        let loss = kd::cross_entropy(&net.forward_t(&xi, false)?, &yi)?;
        let value = loss.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(AdaptError::Diverged(value));
        }
        let grads = loss.backward()?;
        let per_var: Vec<Option<&Tensor>> = vars.iter().map(|v| grads.get(v)).collect();
        let mut sq = 0f64;
        for g in per_var.iter().flatten() {
            sq += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
        }
        let scale = (dp.clip_norm / (sq.sqrt() + 1e-12)).min(1.0);
        for (sum, g) in sums.iter_mut().zip(&per_var) {
            if let Some(g) = g {
                *sum = (&*sum + (*g * scale)?)?;
            }
        }
    }
    let std = dp.noise_multiplier * dp.clip_norm;
    let mut out = GradStore::default();
    for (v, sum) in vars.iter().zip(sums) {
        let draws: Vec<f32> = (0..sum.elem_count())
            .map(|_| (std * gaussian(noise)) as f32)
            .collect();
        let noisy = (sum + Tensor::from_vec(draws, v.as_tensor().shape(), &Device::Cpu)?)?;
        out.insert(v.as_tensor(), (noisy / m as f64)?);
    }
    Ok(out)
}

/// Fine-tunes a copy of `base` on the user's exclusive windows, regularised on the probe set,
/// and checks the probe guard. See the module documentation.
pub fn adapt(
    base: &Net,
    base_classes: &[String],
    exclusive: Exclusive<'_>,
    probe: &ProbeSet,
    cfg: &AdaptConfig,
) -> Result<Adapted, AdaptError> {
    adapt_cancellable(
        base,
        base_classes,
        exclusive,
        probe,
        cfg,
        &AtomicBool::new(false),
    )
}

/// [`adapt`], stopped by `cancel`: the flag is read before every optimiser step and before
/// the final evaluation, so a cancellation takes effect within one mini-batch. A cancelled
/// adaptation returns [`AdaptError::Cancelled`] and no model; `base` is never modified.
pub fn adapt_cancellable(
    base: &Net,
    base_classes: &[String],
    exclusive: Exclusive<'_>,
    probe: &ProbeSet,
    cfg: &AdaptConfig,
    cancel: &AtomicBool,
) -> Result<Adapted, AdaptError> {
    cfg.validate()?;
    let started = Instant::now();
    let bc = base.config();
    let kb = bc.num_classes;
    if base_classes.len() != kb {
        return Err(AdaptError::Data(format!(
            "{} base class names for a model with {kb} outputs",
            base_classes.len()
        )));
    }
    let (c, t) = (bc.in_channels, bc.window);
    if exclusive.x.channels() != c || exclusive.x.len() != t {
        return Err(AdaptError::Data(format!(
            "exclusive windows are {}×{}, the model takes {c}×{t}",
            exclusive.x.channels(),
            exclusive.x.len()
        )));
    }
    if exclusive.x.n() != exclusive.labels.len() || exclusive.x.is_empty() {
        return Err(AdaptError::Data(format!(
            "{} exclusive windows and {} labels (at least one of each is needed)",
            exclusive.x.n(),
            exclusive.labels.len()
        )));
    }
    if probe.channels != c || probe.window != t || probe.n() == 0 {
        return Err(AdaptError::Data(format!(
            "probe set of {} windows of {}×{}, the model takes {c}×{t}",
            probe.n(),
            probe.channels,
            probe.window
        )));
    }
    if probe.classes.len() > kb || probe.classes[..] != base_classes[..probe.classes.len()] {
        return Err(AdaptError::Data(format!(
            "probe classes {:?} are not the base model's {:?}",
            probe.classes, base_classes
        )));
    }
    let (classes, y) = class_space(base_classes, exclusive.labels, cfg.max_new_classes)?;
    let k = classes.len();
    let mut histogram = vec![0u32; k];
    for &c in &y {
        histogram[c as usize] += 1;
    }

    let probe_x = probe.windows()?;
    let base_logits = predict(base, &probe_x, 256)?;
    let probe_accuracy_before = accuracy(&base_logits, kb, &probe.y);
    // Base targets over the grown class list: new classes get a logit far below the row's
    // minimum (finite, so the KL stays finite), i.e. ~0 probability on presumed inputs.
    let mut targets = Vec::with_capacity(probe.n() * k);
    for row in base_logits.chunks_exact(kb) {
        let min = row.iter().copied().fold(f32::INFINITY, f32::min);
        targets.extend_from_slice(row);
        targets.extend(std::iter::repeat_n(min - 30.0, k - kb));
    }

    let mut net = base.try_clone()?;
    net.extend_head(k, cfg.seed ^ 0x00AD_A970)?;
    let (decay, no_decay) = net.trainable_vars();
    let all_vars: Vec<Var> = decay.iter().chain(&no_decay).cloned().collect();
    let params = |wd| ParamsAdamW {
        lr: cfg.lr,
        weight_decay: wd,
        ..ParamsAdamW::default()
    };
    let mut opt_decay = AdamW::new(decay, params(cfg.weight_decay))?;
    let mut opt_plain = AdamW::new(no_decay, params(0.0))?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    // Privacy noise must not be predictable from the configuration: the OS seeds it.
    let mut dp_noise = cfg.dp.enabled.then(ChaCha20Rng::from_entropy);
    let n = exclusive.x.n();
    let per = c * t;
    let steps_per_epoch = n.div_ceil(cfg.batch_size);
    let total = cfg.epochs * steps_per_epoch;
    let mut order: Vec<usize> = (0..n).collect();
    let mut step = 0;
    let use_probe = cfg.probe_weight > 0.0 && cfg.probe_batch > 0;
    let cancelled = |steps| {
        cancel
            .load(Ordering::Acquire)
            .then_some(AdaptError::Cancelled { steps, total })
    };
    for _ in 0..cfg.epochs {
        order.shuffle(&mut rng);
        for chunk in order.chunks(cfg.batch_size) {
            if let Some(e) = cancelled(step) {
                return Err(e);
            }
            let progress = step as f64 / total.max(1) as f64;
            let lr = cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()));
            opt_decay.set_learning_rate(lr);
            opt_plain.set_learning_rate(lr);
            let m = chunk.len();
            let pb = if use_probe { cfg.probe_batch } else { 0 };
            let mut xb = Vec::with_capacity((m + pb) * per);
            let mut yb = Vec::with_capacity(m);
            for &i in chunk {
                let start = xb.len();
                xb.extend_from_slice(exclusive.x.window(i));
                train::augment(&mut xb[start..], c, t, &cfg.augment, &mut rng);
                yb.push(y[i]);
            }
            let mut tb = Vec::with_capacity(pb * k);
            for _ in 0..pb {
                let j = rng.gen_range(0..probe.n());
                xb.extend_from_slice(probe_x.window(j));
                tb.extend_from_slice(&targets[j * k..(j + 1) * k]);
            }
            let grads = match dp_noise.as_mut() {
                Some(noise) => {
                    let (user, probe_part) = xb.split_at(m * per);
                    let mut grads = dp_user_gradients(&net, &all_vars, user, &yb, &cfg.dp, noise)?;
                    if pb > 0 {
                        // The manufacturer's windows: an ordinary gradient, no privacy cost.
                        let x = Tensor::from_slice(probe_part, (pb, c, t), &Device::Cpu)?;
                        let tt = Tensor::from_vec(tb, (pb, k), &Device::Cpu)?;
                        let kl =
                            kd::soft_kl_rows(&net.forward_t(&x, false)?, &tt, cfg.temperature)?
                                .mean_all()?;
                        let probe_grads = (kl * cfg.probe_weight)?.backward()?;
                        for v in &all_vars {
                            if let (Some(g), Some(p)) = (grads.remove(v), probe_grads.get(v)) {
                                grads.insert(v, (g + p)?);
                            }
                        }
                    }
                    grads
                }
                None => {
                    let x = Tensor::from_vec(xb, (m + pb, c, t), &Device::Cpu)?;
                    let logits = net.forward_t(&x, true)?;
                    let yt = Tensor::from_vec(yb, m, &Device::Cpu)?;
                    let mut loss = kd::cross_entropy(&logits.narrow(0, 0, m)?, &yt)?;
                    if pb > 0 {
                        let tt = Tensor::from_vec(tb, (pb, k), &Device::Cpu)?;
                        let kl = kd::soft_kl_rows(&logits.narrow(0, m, pb)?, &tt, cfg.temperature)?
                            .mean_all()?;
                        loss = (loss + (kl * cfg.probe_weight)?)?;
                    }
                    let value = loss.to_scalar::<f32>()?;
                    if !value.is_finite() {
                        return Err(AdaptError::Diverged(value));
                    }
                    loss.backward()?
                }
            };
            opt_decay.step(&grads)?;
            opt_plain.step(&grads)?;
            step += 1;
        }
    }
    if let Some(e) = cancelled(step) {
        return Err(e);
    }
    let dp_rho = match dp_noise.as_mut() {
        Some(noise) => {
            for h in &mut histogram {
                let noisy = f64::from(*h) + cfg.dp.histogram_noise * gaussian(noise);
                *h = noisy.round().clamp(0.0, f64::from(u32::MAX)) as u32;
            }
            Some(cfg.dp.rho(cfg.epochs))
        }
        None => None,
    };

    let after_logits = predict(&net, &probe_x, 256)?;
    let probe_accuracy_after = accuracy(&after_logits, k, &probe.y);
    let exclusive_logits = predict(&net, &exclusive.x, 256)?;
    let exclusive_accuracy = accuracy(&exclusive_logits, k, &y);
    if probe_accuracy_before - probe_accuracy_after > cfg.guard_margin {
        return Err(AdaptError::Guard {
            before: probe_accuracy_before,
            after: probe_accuracy_after,
            margin: cfg.guard_margin,
        });
    }
    Ok(Adapted {
        net,
        new_classes: k - kb,
        classes,
        histogram,
        dp_rho,
        probe_accuracy_before,
        probe_accuracy_after,
        exclusive_accuracy,
        steps: step,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn class_space_appends_new_classes_in_order_and_enforces_the_limit() {
        let base = names(&["a", "b"]);
        let (classes, y) = class_space(&base, &names(&["b", "z", "a", "y", "z"]), 2).unwrap();
        assert_eq!(classes, names(&["a", "b", "z", "y"]));
        assert_eq!(y, vec![1, 2, 0, 3, 2]);
        let err = class_space(&base, &names(&["z", "y", "x"]), 2).unwrap_err();
        assert!(matches!(
            err,
            AdaptError::TooManyNewClasses { found: 3, .. }
        ));
        assert!(class_space(&base, &names(&[""]), 2).is_err());
    }

    #[test]
    fn config_problems_are_listed_together() {
        let cfg = AdaptConfig {
            lr: 0.0,
            guard_margin: 2.0,
            ..AdaptConfig::default()
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("lr") && err.contains("guard_margin"), "{err}");
    }
}
