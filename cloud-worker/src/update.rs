//! The cloud's half of the DiReDi loop: knowledge in → teacher update → re-distillation →
//! deploy gate → (signing and dispatch, elsewhere).
//!
//! Where it stands: a gateway's [`Knowledge`] package arrives; [`update`] rebuilds the user's
//! adapted student from it and the installed student (imported from the shipped ONNX, exactly
//! as on the device), then
//!
//! 1. **teacher update**, on the manufacturer's own data only: presumed training windows (their
//!    labels, and the old teacher's outputs) and the unlabelled pool. On pool windows where the
//!    adapted student disagrees with the installed one the targets come from the adapted
//!    student (that is the user's knowledge); elsewhere from the old teacher. New classes
//!    extend the teacher's head.
//! 2. **re-distillation** of a student for that gateway from the updated teacher on presumed +
//!    pool windows, the pool sampled with weights towards the classes the user labelled (the
//!    package's histogram). Warm start from the adapted (default) or the installed student;
//!    the result is then averaged, weight by weight, with the adapted student
//!    (`adapted_blend`, default 0.5), so the user's knowledge survives where the pool has no
//!    inputs like the user's.
//! 3. **deploy gate**, on manufacturer data only (presumed validation subjects, never user
//!    data): accuracy ≥ installed − `gate_margin`, and agreement with the adapted student on
//!    the pool windows where it differs from the installed one ≥ `gate_agreement`.
//!
//! [`update_with_raw`] is the UPLOAD baseline of the benchmark: the same steps, but the teacher
//! and the student see the user's raw labelled windows instead of knowledge. It breaks the
//! privacy DiReDi exists for and is only a comparison.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use diredi_learn::knowledge::Knowledge;
use diredi_learn::metrics::argmax_rows;
use diredi_learn::model::Net;
use diredi_learn::split::Split;
use diredi_learn::train::{predict, train_distill, Augment, DistillPart, TrainConfig, Windows};
use diredi_learn::window::WindowSet;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Which student the re-distillation starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WarmStart {
    /// The user's adapted student, rebuilt from the knowledge.
    Adapted,
    /// The installed student, head grown by the new classes.
    Installed,
}

/// Settings of the cloud update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpdateConfig {
    /// Epochs of teacher fine-tuning.
    pub teacher_epochs: usize,
    /// Peak learning rate of the teacher fine-tuning.
    pub teacher_lr: f64,
    /// Presumed training windows sampled for the teacher update (labels + old outputs).
    pub teacher_presumed_windows: usize,
    /// Pool windows where adapted and installed agree, sampled for the teacher (old targets).
    pub teacher_agree_windows: usize,
    /// Most pool windows where they disagree used for the teacher (adapted targets).
    pub teacher_disagree_windows: usize,
    /// Epochs of re-distillation.
    pub student_epochs: usize,
    /// Peak learning rate of the re-distillation.
    pub student_lr: f64,
    /// Pool windows sampled (with replacement, weighted by class) for the re-distillation.
    pub student_pool_windows: usize,
    /// How much the user's classes are favoured: pool windows the updated teacher assigns to
    /// class `c` weigh `(1 − w) + w · K · share_c` (share from the histogram), floored at 0.2.
    pub user_class_weight: f64,
    /// Mini-batch size of both steps.
    pub batch_size: usize,
    /// Distillation temperature.
    pub temperature: f64,
    /// Weight of the soft term (1 − alpha weighs labels).
    pub alpha: f64,
    /// Re-distillation start.
    pub warm_start: WarmStart,
    /// With an adapted warm start: after re-distillation the weights are interpolated
    /// `(1 − b) · distilled + b · adapted`, which keeps the user's knowledge in the input region
    /// the pool does not cover (0 = the distilled weights as they are). The default 0.5: with 0,
    /// users whose data lies outside the pool (HAPT user 10 wears the phone differently) got
    /// a student that learnt little of their knowledge and failed the gate.
    pub adapted_blend: f64,
    /// UPLOAD only: re-distillation learning rate (its student starts from the installed one).
    pub upload_student_lr: f64,
    /// UPLOAD only: how often each raw user window is repeated in the training data.
    pub upload_repeat: usize,
    /// Gate: largest allowed drop of presumed-validation accuracy (fraction).
    pub gate_margin: f64,
    /// Gate: smallest agreement with the adapted student where it differs from the installed
    /// (0.5: the new student follows the user's adapted model on a majority of the windows
    /// where it changed its mind).
    pub gate_agreement: f64,
    /// Seed of sampling and training.
    pub seed: u64,
}

impl Default for UpdateConfig {
    fn default() -> Self {
        Self {
            teacher_epochs: 2,
            teacher_lr: 1e-3,
            teacher_presumed_windows: 1000,
            teacher_agree_windows: 1000,
            teacher_disagree_windows: 1200,
            student_epochs: 3,
            student_lr: 1.5e-4,
            student_pool_windows: 3000,
            user_class_weight: 0.5,
            batch_size: 64,
            temperature: 4.0,
            alpha: 0.7,
            warm_start: WarmStart::Adapted,
            adapted_blend: 0.5,
            upload_student_lr: 1e-3,
            upload_repeat: 25,
            gate_margin: 0.025,
            gate_agreement: 0.5,
            seed: 23,
        }
    }
}

impl UpdateConfig {
    fn train(&self, epochs: usize, lr: f64, seed_offset: u64) -> TrainConfig {
        TrainConfig {
            epochs,
            batch_size: self.batch_size,
            lr,
            min_lr: lr * 0.05,
            warmup_epochs: 0,
            patience: 0,
            start_from_epoch: 1,
            seed: self.seed.wrapping_add(seed_offset),
            temperature: self.temperature,
            alpha: self.alpha,
            augment: Augment::default(),
            quiet: true,
            ..TrainConfig::default()
        }
    }
}

/// What the update needs of the installed models on the manufacturer's data; the same for
/// every package against one installed model, so it is computed once and reused.
pub struct Baseline {
    /// Old teacher logits on `presumed_train`, `[n, K0]`.
    pub teacher_train_logits: Vec<f32>,
    /// Old teacher logits on the pool, `[n, K0]`.
    pub teacher_pool_logits: Vec<f32>,
    /// The installed student's class on every pool window.
    pub installed_pool_pred: Vec<u32>,
    /// The installed student's accuracy on `presumed_val`.
    pub installed_val_accuracy: f64,
    /// Seconds it took.
    pub seconds: f64,
}

impl Baseline {
    /// Runs the old teacher and the installed student over the manufacturer's data.
    pub fn compute(teacher: &Net, installed: &Net, split: &Split) -> Result<Self> {
        let t0 = Instant::now();
        let train_x = Windows::of(&split.presumed_train)?;
        let pool_x = Windows::of(&split.pool)?;
        let teacher_train_logits = predict(teacher, &train_x, 256)?;
        let teacher_pool_logits = predict(teacher, &pool_x, 256)?;
        let k = installed.config().num_classes;
        let installed_pool_pred = argmax_rows(&predict(installed, &pool_x, 512)?, k);
        let installed_val_accuracy = accuracy_on(installed, &split.presumed_val)?;
        Ok(Self {
            teacher_train_logits,
            teacher_pool_logits,
            installed_pool_pred,
            installed_val_accuracy,
            seconds: t0.elapsed().as_secs_f64(),
        })
    }
}

/// Each outcome of the deploy gate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gate {
    /// Installed student's accuracy on the presumed validation windows.
    pub installed_val_accuracy: f64,
    /// New student's accuracy there.
    pub new_val_accuracy: f64,
    /// The allowed drop.
    pub margin: f64,
    /// `new ≥ installed − margin`.
    pub accuracy_ok: bool,
    /// Pool windows where the adapted student differs from the installed one.
    pub disagreements: usize,
    /// Fraction of them where the new student answers like the adapted one (1 when none).
    pub agreement: f64,
    /// The required agreement.
    pub agreement_threshold: f64,
    /// `agreement ≥ threshold`.
    pub agreement_ok: bool,
    /// Both checks passed: the new student may be signed and dispatched.
    pub passed: bool,
}

/// Wall-clock seconds of the update's steps.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UpdateTimes {
    /// Rebuilding the adapted student and predicting on the pool.
    pub apply: f64,
    /// Teacher update.
    pub teacher: f64,
    /// Re-distillation (teacher outputs included).
    pub student: f64,
    /// Deploy gate.
    pub gate: f64,
}

/// What [`update`] produced.
pub struct UpdateOutcome {
    /// The updated teacher (head grown by the new classes).
    pub teacher: Net,
    /// The new student for the gateway.
    pub student: Net,
    /// Class names of both, in output order.
    pub classes: Vec<String>,
    /// The deploy gate's outcomes.
    pub gate: Gate,
    /// Step timings.
    pub times: UpdateTimes,
}

/// Accuracy of `net` on a labelled set whose labels index the first classes of the split
/// (outputs beyond the set's classes count as wrong answers).
pub fn accuracy_on(net: &Net, set: &WindowSet) -> Result<f64> {
    if set.is_empty() {
        return Ok(0.0);
    }
    let pred = argmax_rows(
        &predict(net, &Windows::of(set)?, 512)?,
        net.config().num_classes,
    );
    let ok = pred.iter().zip(&set.y).filter(|(a, b)| a == b).count();
    Ok(ok as f64 / set.n() as f64)
}

/// Logits of a `K0`-class model padded to `k` classes with a value far below each row's
/// minimum (a finite "impossible").
fn pad_logits(logits: &[f32], k0: usize, k: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(logits.len() / k0.max(1) * k);
    for row in logits.chunks_exact(k0) {
        let min = row.iter().copied().fold(f32::INFINITY, f32::min);
        out.extend_from_slice(row);
        out.extend(std::iter::repeat_n(min - 30.0, k - k0));
    }
    out
}

/// The windows of `set` at `idx` (with repeats), as a new unlabelled buffer.
fn gather(set: &WindowSet, idx: &[usize]) -> Vec<f32> {
    let per = set.channels * set.len;
    let mut x = Vec::with_capacity(idx.len() * per);
    for &i in idx {
        x.extend_from_slice(set.window(i));
    }
    x
}

fn rows(logits: &[f32], k: usize, idx: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(idx.len() * k);
    for &i in idx {
        out.extend_from_slice(&logits[i * k..(i + 1) * k]);
    }
    out
}

/// What the user contributes to the update: knowledge (DIREDI) or raw windows (UPLOAD).
enum Contribution<'a> {
    Knowledge(&'a Knowledge),
    Raw {
        set: &'a WindowSet,
        classes: &'a [String],
    },
}

/// DIREDI's cloud update from a knowledge package; see the module documentation.
pub fn update(
    teacher: &Net,
    installed: &Net,
    knowledge: &Knowledge,
    split: &Split,
    baseline: &Baseline,
    cfg: &UpdateConfig,
) -> Result<UpdateOutcome> {
    run(
        teacher,
        installed,
        Contribution::Knowledge(knowledge),
        split,
        baseline,
        cfg,
    )
}

/// UPLOAD baseline: the cloud gets the user's raw labelled windows (`set.y` indexing
/// `classes`). Breaks privacy; for comparison only.
pub fn update_with_raw(
    teacher: &Net,
    installed: &Net,
    set: &WindowSet,
    classes: &[String],
    split: &Split,
    baseline: &Baseline,
    cfg: &UpdateConfig,
) -> Result<UpdateOutcome> {
    run(
        teacher,
        installed,
        Contribution::Raw { set, classes },
        split,
        baseline,
        cfg,
    )
}

fn run(
    teacher: &Net,
    installed: &Net,
    contribution: Contribution<'_>,
    split: &Split,
    baseline: &Baseline,
    cfg: &UpdateConfig,
) -> Result<UpdateOutcome> {
    let k0 = installed.config().num_classes;
    if teacher.config().num_classes != k0 {
        bail!(
            "teacher has {} classes, the installed student {k0}",
            teacher.config().num_classes
        );
    }
    if split.num_presumed != k0 {
        bail!(
            "the split presumes {} classes, the installed student has {k0}",
            split.num_presumed
        );
    }
    let mut times = UpdateTimes::default();
    let t0 = Instant::now();
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let pool = &split.pool;
    let pool_x = Windows::of(pool)?;

    // The user's side: the adapted student (DIREDI) or the raw windows (UPLOAD).
    let (classes, adapted, histogram) = match &contribution {
        Contribution::Knowledge(kn) => {
            if kn.classes.get(..k0) != Some(&split.classes[..k0]) {
                bail!(
                    "the knowledge's base classes {:?} are not the installed model's {:?}",
                    &kn.classes[..kn.base_classes.min(kn.classes.len())],
                    &split.classes[..k0]
                );
            }
            let adapted = kn.apply(installed).context("applying the knowledge")?;
            (kn.classes.clone(), Some(adapted), kn.histogram.clone())
        }
        Contribution::Raw { set, classes } => {
            let mut hist = vec![0u32; classes.len()];
            for &y in &set.y {
                if let Some(h) = hist.get_mut(y as usize) {
                    *h += 1;
                }
            }
            (classes.to_vec(), None, hist)
        }
    };
    let k = classes.len();
    if k < k0 || classes[..k0] != split.classes[..k0] {
        bail!("the user's classes must start with the installed model's");
    }
    let (adapted_logits, disagree): (Vec<f32>, Vec<usize>) = match &adapted {
        Some(a) => {
            let logits = predict(a, &pool_x, 512)?;
            let pred = argmax_rows(&logits, k);
            let d = pred
                .iter()
                .zip(&baseline.installed_pool_pred)
                .enumerate()
                .filter(|(_, (a, b))| a != b)
                .map(|(i, _)| i)
                .collect();
            (logits, d)
        }
        None => (Vec::new(), Vec::new()),
    };
    times.apply = t0.elapsed().as_secs_f64();

    // 1. Teacher update.
    let t1 = Instant::now();
    let mut new_teacher = teacher.try_clone()?;
    new_teacher.extend_head(k, cfg.seed ^ 0x7EAC)?;
    let (c, t) = (pool.channels, pool.len);
    let mut train_idx: Vec<usize> = (0..split.presumed_train.n()).collect();
    partial_shuffle(&mut train_idx, cfg.teacher_presumed_windows, &mut rng);
    train_idx.truncate(cfg.teacher_presumed_windows);
    train_idx.sort_unstable();
    let train_x = gather(&split.presumed_train, &train_idx);
    let train_y: Vec<u32> = train_idx
        .iter()
        .map(|&i| split.presumed_train.y[i])
        .collect();
    let train_t = rows(
        &pad_logits(&baseline.teacher_train_logits, k0, k),
        k,
        &train_idx,
    );
    let mut parts = vec![DistillPart {
        x: Windows::new(&train_x, c, t)?,
        teacher_logits: &train_t,
        labels: Some(&train_y),
    }];
    // DIREDI: pool windows. Where the adapted student disagrees with the installed one, its
    // outputs are the targets; elsewhere the old teacher's, with the new classes' logits set
    // to the adapted student's belief relative to its top class (the teacher has none).
    let mut is_disagree = vec![false; pool.n()];
    for &i in &disagree {
        is_disagree[i] = true;
    }
    let mut agree: Vec<usize> = (0..pool.n()).filter(|&i| !is_disagree[i]).collect();
    let mut dis = disagree.clone();
    let (agree_x, agree_t, dis_x, dis_t, dis_y);
    if adapted.is_some() {
        partial_shuffle(&mut agree, cfg.teacher_agree_windows, &mut rng);
        agree.truncate(cfg.teacher_agree_windows);
        agree.sort_unstable();
        partial_shuffle(&mut dis, cfg.teacher_disagree_windows, &mut rng);
        dis.truncate(cfg.teacher_disagree_windows);
        dis.sort_unstable();
        agree_x = gather(pool, &agree);
        let mut at = Vec::with_capacity(agree.len() * k);
        for &i in &agree {
            let old = &baseline.teacher_pool_logits[i * k0..(i + 1) * k0];
            let new = &adapted_logits[i * k..(i + 1) * k];
            let old_max = old.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let new_max = new[..k0].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            at.extend_from_slice(old);
            at.extend(new[k0..].iter().map(|v| old_max + (v - new_max)));
        }
        agree_t = at;
        dis_x = gather(pool, &dis);
        dis_t = rows(&adapted_logits, k, &dis);
        dis_y = argmax_rows(&dis_t, k);
        parts.push(DistillPart {
            x: Windows::new(&agree_x, c, t)?,
            teacher_logits: &agree_t,
            labels: None,
        });
        if !dis.is_empty() {
            parts.push(DistillPart {
                x: Windows::new(&dis_x, c, t)?,
                teacher_logits: &dis_t,
                labels: Some(&dis_y),
            });
        }
    }
    // UPLOAD: the raw labelled windows, repeated, with their labels as confident targets.
    let (raw_x, raw_y, raw_t) = match &contribution {
        Contribution::Raw { set, .. } => {
            let idx: Vec<usize> = (0..cfg.upload_repeat.max(1))
                .flat_map(|_| 0..set.n())
                .collect();
            let y: Vec<u32> = idx.iter().map(|&i| set.y[i]).collect();
            let mut tl = vec![0.0f32; idx.len() * k];
            for (r, &yy) in y.iter().enumerate() {
                tl[r * k + yy as usize] = 8.0;
            }
            (gather(set, &idx), y, tl)
        }
        Contribution::Knowledge(_) => (Vec::new(), Vec::new(), Vec::new()),
    };
    if !raw_y.is_empty() {
        parts.push(DistillPart {
            x: Windows::new(&raw_x, c, t)?,
            teacher_logits: &raw_t,
            labels: Some(&raw_y),
        });
    }
    train_distill(
        &new_teacher,
        &parts,
        None,
        &cfg.train(cfg.teacher_epochs, cfg.teacher_lr, 1),
    )?;
    times.teacher = t1.elapsed().as_secs_f64();

    // 2. Re-distillation, the pool weighted towards the user's classes.
    let t2 = Instant::now();
    let teacher_pool = predict(&new_teacher, &pool_x, 256)?;
    let teacher_train = predict(&new_teacher, &Windows::of(&split.presumed_train)?, 256)?;
    let pool_class = argmax_rows(&teacher_pool, k);
    let total: u32 = histogram.iter().sum();
    let weight_of = |c: u32| -> f64 {
        let share = if total > 0 {
            f64::from(histogram.get(c as usize).copied().unwrap_or(0)) / f64::from(total)
        } else {
            1.0 / k as f64
        };
        ((1.0 - cfg.user_class_weight) + cfg.user_class_weight * k as f64 * share).max(0.2)
    };
    let weights: Vec<f64> = pool_class.iter().map(|&c| weight_of(c)).collect();
    let sampled = weighted_sample(&weights, cfg.student_pool_windows, &mut rng);
    let spool_x = gather(pool, &sampled);
    let spool_t = rows(&teacher_pool, k, &sampled);
    let student = match (cfg.warm_start, &adapted) {
        (WarmStart::Adapted, Some(a)) => a.try_clone()?,
        _ => {
            let mut s = installed.try_clone()?;
            s.extend_head(k, cfg.seed ^ 0x57D)?;
            s
        }
    };
    let mut sparts = vec![
        DistillPart {
            x: Windows::of(&split.presumed_train)?,
            teacher_logits: &teacher_train,
            labels: Some(&split.presumed_train.y),
        },
        DistillPart {
            x: Windows::new(&spool_x, c, t)?,
            teacher_logits: &spool_t,
            labels: None,
        },
    ];
    if !raw_y.is_empty() {
        // The labels are known here: they are the best teacher for these windows.
        sparts.push(DistillPart {
            x: Windows::new(&raw_x, c, t)?,
            teacher_logits: &raw_t,
            labels: Some(&raw_y),
        });
    }
    let lr = if adapted.is_some() {
        cfg.student_lr
    } else {
        cfg.upload_student_lr
    };
    train_distill(
        &student,
        &sparts,
        None,
        &cfg.train(cfg.student_epochs, lr, 2),
    )?;
    if let (WarmStart::Adapted, Some(a)) = (cfg.warm_start, &adapted) {
        blend(&student, a, cfg.adapted_blend)?;
    }
    times.student = t2.elapsed().as_secs_f64();

    // 3. Deploy gate, manufacturer data only.
    let t3 = Instant::now();
    let new_val_accuracy = accuracy_on(&student, &split.presumed_val)?;
    let agreement = if disagree.is_empty() {
        1.0
    } else {
        let all_x = gather(pool, &disagree);
        let want = argmax_rows(&rows(&adapted_logits, k, &disagree), k);
        let s_pred = argmax_rows(&predict(&student, &Windows::new(&all_x, c, t)?, 512)?, k);
        let same = s_pred.iter().zip(&want).filter(|(a, b)| a == b).count();
        same as f64 / disagree.len() as f64
    };
    let accuracy_ok = new_val_accuracy >= baseline.installed_val_accuracy - cfg.gate_margin;
    let agreement_ok = agreement >= cfg.gate_agreement;
    let gate = Gate {
        installed_val_accuracy: baseline.installed_val_accuracy,
        new_val_accuracy,
        margin: cfg.gate_margin,
        accuracy_ok,
        disagreements: disagree.len(),
        agreement,
        agreement_threshold: cfg.gate_agreement,
        agreement_ok,
        passed: accuracy_ok && agreement_ok,
    };
    times.gate = t3.elapsed().as_secs_f64();
    Ok(UpdateOutcome {
        teacher: new_teacher,
        student,
        classes,
        gate,
        times,
    })
}

/// `net ← (1 − b) · net + b · other`, variable by variable (same architecture).
fn blend(net: &Net, other: &Net, b: f64) -> Result<()> {
    if b <= 0.0 {
        return Ok(());
    }
    let others: std::collections::HashMap<_, _> = other.named_vars().into_iter().collect();
    for (name, var) in net.named_vars() {
        let o = others
            .get(&name)
            .with_context(|| format!("blending: `{name}` missing"))?;
        let mixed = ((var.as_tensor() * (1.0 - b))? + (o.as_tensor() * b)?)?;
        var.set(&mixed)?;
    }
    Ok(())
}

/// Moves `m` random elements to the front (Fisher–Yates prefix).
fn partial_shuffle(v: &mut [usize], m: usize, rng: &mut ChaCha8Rng) {
    let n = v.len();
    for i in 0..m.min(n) {
        let j = rng.gen_range(i..n);
        v.swap(i, j);
    }
}

/// `m` indices drawn with replacement, with probability proportional to `weights`.
fn weighted_sample(weights: &[f64], m: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
    let mut cum = Vec::with_capacity(weights.len());
    let mut acc = 0.0;
    for w in weights {
        acc += w.max(0.0);
        cum.push(acc);
    }
    if acc <= 0.0 {
        return Vec::new();
    }
    let mut out: Vec<usize> = (0..m)
        .map(|_| {
            let r = rng.gen::<f64>() * acc;
            cum.partition_point(|&c| c <= r).min(weights.len() - 1)
        })
        .collect();
    out.sort_unstable();
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn weighted_sampling_follows_the_weights() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let s = weighted_sample(&[1.0, 0.0, 3.0], 4000, &mut rng);
        let twos = s.iter().filter(|&&i| i == 2).count() as f64 / 4000.0;
        assert!(s.iter().all(|&i| i != 1));
        assert!((twos - 0.75).abs() < 0.03, "{twos}");
    }

    #[test]
    fn padded_logits_make_new_classes_improbable() {
        let p = pad_logits(&[1.0, 2.0, -1.0, 0.0], 2, 3);
        assert_eq!(p.len(), 6);
        assert_eq!(p[2], 1.0 - 30.0);
        assert_eq!(p[5], -1.0 - 30.0);
    }
}
