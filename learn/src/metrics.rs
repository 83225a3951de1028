//! Classification metrics: accuracy, per-class precision/recall/F1, macro-F1, confusion matrix.
//!
//! Where it stands: after [`crate::train`] predicts on a test split, [`evaluate`] turns the
//! predicted and true class indices into an [`Evaluation`] that the cloud worker prints, stores
//! beside checkpoints and copies into the model manifest's `metrics`.
//!
//! Conventions: `confusion[truth][pred]`; a class never predicted has precision 0; a class with
//! precision and recall 0 has F1 0; **macro-F1 averages over the classes with support > 0**, so
//! a class absent from the evaluated set neither helps nor hurts.

use serde::{Deserialize, Serialize};

/// Errors of [`evaluate`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MetricsError {
    /// Predictions and ground truth differ in length.
    #[error("{pred} predictions but {truth} true labels")]
    LengthMismatch {
        /// Number of predictions.
        pred: usize,
        /// Number of true labels.
        truth: usize,
    },
    /// Nothing to evaluate.
    #[error("cannot evaluate an empty set")]
    Empty,
    /// A class index beyond the class list.
    #[error("{what} at position {index} is class {class}, but only {classes} classes exist")]
    ClassOutOfRange {
        /// `prediction` or `label`.
        what: &'static str,
        /// Position in the input.
        index: usize,
        /// The offending class index.
        class: u32,
        /// Length of the class list.
        classes: usize,
    },
}

/// Metrics of one class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    /// Class name.
    pub class: String,
    /// Windows whose true label is this class.
    pub support: u64,
    /// Correct / predicted as this class (0 when never predicted).
    pub precision: f64,
    /// Correct / support (0 when the support is 0).
    pub recall: f64,
    /// Harmonic mean of precision and recall (0 when both are 0).
    pub f1: f64,
}

/// The evaluation of a set of predictions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Windows evaluated.
    pub n: u64,
    /// Fraction predicted correctly.
    pub accuracy: f64,
    /// Mean F1 over the classes with support > 0.
    pub macro_f1: f64,
    /// One entry per class, in class order.
    pub per_class: Vec<ClassMetrics>,
    /// `confusion[truth][pred]` counts.
    pub confusion: Vec<Vec<u64>>,
}

/// Compares predicted class indices with the true ones.
pub fn evaluate(
    pred: &[u32],
    truth: &[u32],
    classes: &[String],
) -> Result<Evaluation, MetricsError> {
    if pred.len() != truth.len() {
        return Err(MetricsError::LengthMismatch {
            pred: pred.len(),
            truth: truth.len(),
        });
    }
    if pred.is_empty() {
        return Err(MetricsError::Empty);
    }
    let k = classes.len();
    let check = |what, index, class: u32| {
        if (class as usize) < k {
            Ok(class as usize)
        } else {
            Err(MetricsError::ClassOutOfRange {
                what,
                index,
                class,
                classes: k,
            })
        }
    };
    let mut confusion = vec![vec![0u64; k]; k];
    for (i, (&p, &t)) in pred.iter().zip(truth).enumerate() {
        let p = check("prediction", i, p)?;
        let t = check("label", i, t)?;
        confusion[t][p] += 1;
    }
    let correct: u64 = (0..k).map(|c| confusion[c][c]).sum();
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let per_class: Vec<ClassMetrics> = classes
        .iter()
        .enumerate()
        .map(|(c, name)| {
            let tp = confusion[c][c];
            let support: u64 = confusion[c].iter().sum();
            let predicted: u64 = confusion.iter().map(|row| row[c]).sum();
            let precision = ratio(tp, predicted);
            let recall = ratio(tp, support);
            let f1 = if precision + recall > 0.0 {
                2.0 * precision * recall / (precision + recall)
            } else {
                0.0
            };
            ClassMetrics {
                class: name.clone(),
                support,
                precision,
                recall,
                f1,
            }
        })
        .collect();
    let present: Vec<f64> = per_class
        .iter()
        .filter(|m| m.support > 0)
        .map(|m| m.f1)
        .collect();
    let macro_f1 = present.iter().sum::<f64>() / present.len().max(1) as f64;
    Ok(Evaluation {
        n: pred.len() as u64,
        accuracy: ratio(correct, pred.len() as u64),
        macro_f1,
        per_class,
        confusion,
    })
}

/// Index of the largest value of each row of a row-major `[n, k]` matrix (first one on ties).
pub fn argmax_rows(values: &[f32], k: usize) -> Vec<u32> {
    if k == 0 {
        return Vec::new();
    }
    values
        .chunks_exact(k)
        .map(|row| {
            let mut best = 0;
            for (i, v) in row.iter().enumerate() {
                if *v > row[best] {
                    best = i;
                }
            }
            best as u32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("c{i}")).collect()
    }

    #[test]
    fn metrics_match_hand_computed_values() {
        // truth: 0 0 0 1 1 2 ; pred: 0 0 1 1 2 2
        // confusion (truth rows): [2 1 0] [0 1 1] [0 0 1]; accuracy 4/6
        // class 0: P = 2/2 = 1,   R = 2/3,  F1 = 2·1·(2/3)/(5/3) = 0.8
        // class 1: P = 1/2,       R = 1/2,  F1 = 0.5
        // class 2: P = 1/2,       R = 1/1,  F1 = 2·0.5·1/1.5 = 2/3
        // macro-F1 = (0.8 + 0.5 + 2/3) / 3 = 0.6555…
        let truth = [0, 0, 0, 1, 1, 2];
        let pred = [0, 0, 1, 1, 2, 2];
        let e = evaluate(&pred, &truth, &names(3)).unwrap();
        assert_eq!(e.n, 6);
        assert_eq!(
            e.confusion,
            vec![vec![2, 1, 0], vec![0, 1, 1], vec![0, 0, 1]]
        );
        assert!((e.accuracy - 4.0 / 6.0).abs() < 1e-12);
        let f1: Vec<f64> = e.per_class.iter().map(|m| m.f1).collect();
        for (got, want) in f1.iter().zip([0.8, 0.5, 2.0 / 3.0]) {
            assert!((got - want).abs() < 1e-12, "{f1:?}");
        }
        assert!((e.per_class[0].recall - 2.0 / 3.0).abs() < 1e-12);
        assert!((e.per_class[2].precision - 0.5).abs() < 1e-12);
        assert_eq!(e.per_class[0].support, 3);
        assert!((e.macro_f1 - (0.8 + 0.5 + 2.0 / 3.0) / 3.0).abs() < 1e-12);
    }

    #[test]
    fn macro_f1_ignores_classes_without_support() {
        // Class 2 is never true. Class 1 is wrongly predicted once → its precision is 0.
        // truth 0 0 1 ; pred 0 1 1 → class 0: P 1, R 1/2, F1 2/3; class 1: P 1/2, R 1, F1 2/3
        // class 2: support 0, F1 0, excluded → macro-F1 = 2/3 (not 4/9).
        let e = evaluate(&[0, 1, 1], &[0, 0, 1], &names(3)).unwrap();
        assert_eq!(e.per_class[2].support, 0);
        assert_eq!(e.per_class[2].f1, 0.0);
        assert!((e.macro_f1 - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn bad_inputs_are_reported() {
        assert_eq!(
            evaluate(&[0], &[0, 1], &names(2)),
            Err(MetricsError::LengthMismatch { pred: 1, truth: 2 })
        );
        assert_eq!(evaluate(&[], &[], &names(2)), Err(MetricsError::Empty));
        assert!(matches!(
            evaluate(&[0, 5], &[0, 1], &names(2)),
            Err(MetricsError::ClassOutOfRange {
                what: "prediction",
                index: 1,
                class: 5,
                ..
            })
        ));
    }

    #[test]
    fn argmax_takes_the_first_maximum_of_each_row() {
        assert_eq!(argmax_rows(&[0.1, 0.7, 0.2, 0.5, 0.5, 0.0], 3), vec![1, 0]);
    }
}
