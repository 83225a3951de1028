//! Losses: cross-entropy and the knowledge-distillation loss of Hinton et al.
//!
//! Where it stands: [`crate::train`] calls these on every mini-batch. For distillation the
//! teacher's logits are computed once beforehand; the student learns to match the teacher's
//! softened distribution on every window (labelled or not) and, where a label exists, the label.
//!
//! `kd = alpha · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 − alpha) · CE(s, y)`, both terms
//! averaged over the rows they apply to (KL over all rows, CE over labelled rows). The `T²`
//! keeps the gradient scale of the soft term independent of the temperature.

use candle_core::{DType, Tensor, D};
use candle_nn::ops::log_softmax;

/// Errors of the loss functions.
#[derive(Debug, thiserror::Error)]
pub enum KdError {
    /// The inputs do not have the shapes the loss needs.
    #[error("loss inputs disagree: {0}")]
    Shape(String),
    /// A hyper-parameter is outside its range.
    #[error("invalid loss parameter: {0}")]
    Param(String),
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

fn check_logits(student: &Tensor, teacher: Option<&Tensor>) -> Result<(usize, usize), KdError> {
    let (n, k) = student.dims2().map_err(|_| {
        KdError::Shape(format!(
            "student logits must be [N, K], found {:?}",
            student.dims()
        ))
    })?;
    if let Some(t) = teacher {
        if t.dims() != [n, k] {
            return Err(KdError::Shape(format!(
                "teacher logits are {:?}, student logits [{n}, {k}]",
                t.dims()
            )));
        }
    }
    Ok((n, k))
}

fn check_rows(what: &str, t: &Tensor, n: usize) -> Result<(), KdError> {
    if t.dims() != [n] {
        return Err(KdError::Shape(format!(
            "{what} must be [{n}] (one per row), found {:?}",
            t.dims()
        )));
    }
    Ok(())
}

/// Per-row cross-entropy `−log softmax(logits)[y]`, shape `[N]`. `labels` are u32 class
/// indices, `[N]`.
pub fn cross_entropy_rows(logits: &Tensor, labels: &Tensor) -> Result<Tensor, KdError> {
    let (n, _) = check_logits(logits, None)?;
    check_rows("labels", labels, n)?;
    let logp = log_softmax(logits, D::Minus1)?;
    let picked = logp.gather(&labels.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?;
    Ok(picked.squeeze(1)?.neg()?)
}

/// Mean cross-entropy over the batch, a scalar.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor, KdError> {
    Ok(cross_entropy_rows(logits, labels)?.mean_all()?)
}

/// `T² · KL(softmax(teacher/T) ‖ softmax(student/T))` per row, shape `[N]`. No gradient flows
/// into the teacher.
pub fn soft_kl_rows(
    student: &Tensor,
    teacher: &Tensor,
    temperature: f64,
) -> Result<Tensor, KdError> {
    check_logits(student, Some(teacher))?;
    if !(temperature > 0.0 && temperature.is_finite()) {
        return Err(KdError::Param(format!(
            "temperature must be a positive number, found {temperature}"
        )));
    }
    let log_pt = log_softmax(&(teacher.detach() / temperature)?, D::Minus1)?;
    let log_ps = log_softmax(&(student / temperature)?, D::Minus1)?;
    let kl = (log_pt.exp()? * (&log_pt - &log_ps)?)?.sum(D::Minus1)?;
    Ok((kl * (temperature * temperature))?)
}

/// The distillation loss over a batch where every row has a label, or none has.
///
/// `labels = None` gives the soft term alone, scaled by `alpha`.
pub fn kd_loss(
    student: &Tensor,
    teacher: &Tensor,
    labels: Option<&Tensor>,
    temperature: f64,
    alpha: f64,
) -> Result<Tensor, KdError> {
    check_alpha(alpha)?;
    let soft = (soft_kl_rows(student, teacher, temperature)?.mean_all()? * alpha)?;
    match labels {
        None => Ok(soft),
        Some(y) => Ok((soft + (cross_entropy(student, y)? * (1.0 - alpha))?)?),
    }
}

/// The distillation loss over a batch mixing labelled and unlabelled rows.
///
/// `labelled` is `[N]` f32, 1 for rows whose `labels` entry is a real label and 0 otherwise
/// (the label of such a row must still be a valid class index, e.g. 0, and is ignored). The
/// soft term is averaged over all rows, the cross-entropy over the labelled ones; a batch
/// without labelled rows gives the soft term alone.
pub fn kd_loss_masked(
    student: &Tensor,
    teacher: &Tensor,
    labels: &Tensor,
    labelled: &Tensor,
    temperature: f64,
    alpha: f64,
) -> Result<Tensor, KdError> {
    check_alpha(alpha)?;
    let (n, _) = check_logits(student, Some(teacher))?;
    check_rows("the labelled mask", labelled, n)?;
    let mask = labelled.to_dtype(DType::F32)?;
    let soft = (soft_kl_rows(student, teacher, temperature)?.mean_all()? * alpha)?;
    let count = mask.sum_all()?.to_scalar::<f32>()?;
    if count <= 0.0 {
        return Ok(soft);
    }
    let ce = ((cross_entropy_rows(student, labels)? * &mask)?.sum_all()? / f64::from(count))?;
    Ok((soft + (ce * (1.0 - alpha))?)?)
}

fn check_alpha(alpha: f64) -> Result<(), KdError> {
    if (0.0..=1.0).contains(&alpha) {
        Ok(())
    } else {
        Err(KdError::Param(format!(
            "alpha must be in [0, 1], found {alpha}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    // Hand example, tolerance 1e-5 (f32 arithmetic on values of order 1):
    //   student logits s = [0, 0]       → softmax = [1/2, 1/2]
    //   teacher logits t = [ln 3, 0]    → softmax = [3/4, 1/4]
    //   T = 1: KL = 3/4·ln((3/4)/(1/2)) + 1/4·ln((1/4)/(1/2)) = 0.75·ln 1.5 − 0.25·ln 2
    //             = 0.75·0.4054651 − 0.25·0.6931472 = 0.1308120
    //   T = 2: t/T = [ln √3, 0] → softmax = [√3/(1+√3), 1/(1+√3)] = [0.6339746, 0.3660254]
    //          KL = 0.6339746·ln(2·0.6339746) + 0.3660254·ln(2·0.3660254)
    //             = 0.6339746·0.2374008 + 0.3660254·(−0.3119054) = 0.0363408; ·T² = 0.1453631
    //   CE(s, y = 0) = −ln(1/2) = 0.6931472
    const KL_T1: f32 = 0.130_812;
    const KL_T2_SCALED: f32 = 0.145_363_1;
    const LN2: f32 = std::f32::consts::LN_2;

    fn row(s: [f32; 2]) -> Tensor {
        Tensor::new(&[s], &Device::Cpu).unwrap()
    }

    fn scalar(t: &Tensor) -> f32 {
        t.to_scalar::<f32>().unwrap()
    }

    #[test]
    fn soft_term_matches_hand_computed_kl_at_two_temperatures() {
        let s = row([0.0, 0.0]);
        let t = row([3f32.ln(), 0.0]);
        let t1 = kd_loss(&s, &t, None, 1.0, 1.0).unwrap();
        assert!((scalar(&t1) - KL_T1).abs() < 1e-5, "{}", scalar(&t1));
        let t2 = kd_loss(&s, &t, None, 2.0, 1.0).unwrap();
        assert!((scalar(&t2) - KL_T2_SCALED).abs() < 1e-5, "{}", scalar(&t2));
    }

    #[test]
    fn alpha_mixes_soft_and_hard_terms() {
        let s = row([0.0, 0.0]);
        let t = row([3f32.ln(), 0.0]);
        let y = Tensor::new(&[0u32], &Device::Cpu).unwrap();
        // 0.25·0.1308120 + 0.75·0.6931472 = 0.0327030 + 0.5198604 = 0.5525634
        let l = kd_loss(&s, &t, Some(&y), 1.0, 0.25).unwrap();
        assert!((scalar(&l) - (0.25 * KL_T1 + 0.75 * LN2)).abs() < 1e-5);
        assert!((scalar(&l) - 0.552_563_4).abs() < 1e-5);
    }

    #[test]
    fn identical_logits_give_zero_kl() {
        let s = Tensor::new(&[[1.0f32, -2.0, 0.5], [0.0, 3.0, 1.0]], &Device::Cpu).unwrap();
        let l = kd_loss(&s, &s, None, 3.0, 1.0).unwrap();
        assert!(scalar(&l).abs() < 1e-6);
    }

    #[test]
    fn masked_loss_averages_cross_entropy_over_labelled_rows_only() {
        // Row 0: s = [0, 0], t = [ln 3, 0], label 0 → KL 0.1308120, CE ln 2.
        // Row 1: s = [ln 3, 0], t = [ln 3, 0], unlabelled → KL 0 (its CE, ln(4/3), is ignored).
        // alpha = 0.5: 0.5·(0.1308120 + 0)/2 + 0.5·ln 2 = 0.0327030 + 0.3465736 = 0.3792766
        let s = Tensor::new(&[[0.0f32, 0.0], [3f32.ln(), 0.0]], &Device::Cpu).unwrap();
        let t = Tensor::new(&[[3f32.ln(), 0.0], [3f32.ln(), 0.0]], &Device::Cpu).unwrap();
        let y = Tensor::new(&[0u32, 0], &Device::Cpu).unwrap();
        let m = Tensor::new(&[1f32, 0.0], &Device::Cpu).unwrap();
        let l = kd_loss_masked(&s, &t, &y, &m, 1.0, 0.5).unwrap();
        assert!((scalar(&l) - 0.379_276_6).abs() < 1e-5, "{}", scalar(&l));
        let none = Tensor::new(&[0f32, 0.0], &Device::Cpu).unwrap();
        let soft_only = kd_loss_masked(&s, &t, &y, &none, 1.0, 0.5).unwrap();
        assert!((scalar(&soft_only) - 0.5 * KL_T1 / 2.0).abs() < 1e-5);
    }

    #[test]
    fn gradient_reaches_student_but_not_teacher() {
        let s = Var::from_tensor(&row([0.0, 0.0])).unwrap();
        let t = Var::from_tensor(&row([3f32.ln(), 0.0])).unwrap();
        let l = kd_loss(s.as_tensor(), t.as_tensor(), None, 1.0, 1.0).unwrap();
        let grads = l.backward().unwrap();
        // d KL / d s = (softmax(s) − softmax(t)) / T · T² = [0.5 − 0.75, 0.5 − 0.25] at T = 1.
        let gs = grads.get(s.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        assert!(
            (gs[0][0] + 0.25).abs() < 1e-5 && (gs[0][1] - 0.25).abs() < 1e-5,
            "{gs:?}"
        );
        assert!(grads.get(t.as_tensor()).is_none());
    }

    #[test]
    fn mismatched_shapes_and_bad_parameters_are_rejected() {
        let s = row([0.0, 0.0]);
        let t3 = Tensor::new(&[[0f32, 0.0, 0.0]], &Device::Cpu).unwrap();
        assert!(matches!(
            kd_loss(&s, &t3, None, 1.0, 0.5),
            Err(KdError::Shape(_))
        ));
        assert!(matches!(
            kd_loss(&s, &s, None, 0.0, 0.5),
            Err(KdError::Param(_))
        ));
        assert!(matches!(
            kd_loss(&s, &s, None, 1.0, 1.5),
            Err(KdError::Param(_))
        ));
        let y2 = Tensor::new(&[0u32, 1], &Device::Cpu).unwrap();
        assert!(matches!(cross_entropy(&s, &y2), Err(KdError::Shape(_))));
    }
}
