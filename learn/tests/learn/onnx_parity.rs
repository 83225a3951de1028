//! The exported student must give ONNX Runtime the probabilities candle computes, on real
//! HAPT windows.

use candle_core::{Device, Tensor};
use diredi_infer::{Classifier, OrtClassifier, SessionConfig};
use diredi_learn::dataset::Dataset;
use diredi_learn::metrics::argmax_rows;
use diredi_learn::model::{ModelConfig, Net};
use diredi_learn::onnx::export;
use diredi_learn::split::{Split, SplitConfig};
use diredi_learn::train::{train_supervised, Labelled, TrainConfig, Windows};
use ndarray::ArrayView3;

use crate::{hapt_dir, onnx_runtime, repo_root, synthetic};

const C: usize = 6;
const T: usize = 128;
const K: usize = 5;

/// Two quiet epochs: enough to move the weights away from their initialisation.
fn brief() -> TrainConfig {
    TrainConfig {
        epochs: 2,
        batch_size: 32,
        quiet: true,
        ..TrainConfig::default()
    }
}

fn trained_student() -> anyhow::Result<(Net, Vec<f32>)> {
    let (x, y) = synthetic(160, C, T, K, 3);
    let net = Net::new(ModelConfig::student(C, T, K), 21)?;
    let cfg = brief();
    train_supervised(
        &net,
        &Labelled::new(Windows::new(&x, C, T)?, &y)?,
        None,
        &cfg,
    )?;
    Ok((net, x))
}

fn candle_probabilities(net: &Net, x: &[f32], n: usize) -> anyhow::Result<Vec<f32>> {
    let input = Tensor::from_slice(x, (n, C, T), &Device::Cpu)?;
    let logits = net.forward_t(&input, false)?;
    Ok(candle_nn::ops::softmax_last_dim(&logits)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// A student trained for two epochs on 256 real presumed-training windows, and 128 real
/// presumed-test windows (standardised as the gateway does).
fn real_student() -> anyhow::Result<Option<(Net, Vec<f32>)>> {
    let Some(dir) = hapt_dir() else {
        return Ok(None);
    };
    let dataset = Dataset::load(&dir)?;
    let cfg = SplitConfig::from_file(&repo_root().join("cloud-worker/splits/hapt.toml"))?;
    let split = Split::build(&cfg, &dataset)?;
    assert_eq!(
        (split.channels.len(), split.window.len(), split.num_presumed),
        (C, T, K)
    );
    let train = &split.presumed_train;
    let n = 256.min(train.n());
    let net = Net::new(ModelConfig::student(C, T, K), 21)?;
    let cfg = brief();
    train_supervised(
        &net,
        &Labelled::new(Windows::new(&train.x[..n * C * T], C, T)?, &train.y[..n])?,
        None,
        &cfg,
    )?;
    let test = &split.presumed_test;
    let m = 128.min(test.n());
    Ok(Some((net, test.x[..m * C * T].to_vec())))
}

#[test]
fn trained_student_gives_the_same_probabilities_in_onnx_runtime() -> anyhow::Result<()> {
    if !onnx_runtime() {
        return Ok(());
    }
    let Some((net, x)) = real_student()? else {
        return Ok(());
    };
    let bytes = export(&net)?;
    let clf = OrtClassifier::from_bytes(&bytes, &SessionConfig::default())?;
    assert_eq!((clf.channels(), clf.window(), clf.num_outputs()), (C, T, K));
    for (start, n) in [(0, 1), (5, 1), (0, 17), (40, 64)] {
        let xs = &x[start * C * T..(start + n) * C * T];
        let want = candle_probabilities(&net, xs, n)?;
        let got = clf.classify(ArrayView3::from_shape((n, C, T), xs)?)?;
        assert_eq!(got.shape(), [n, K]);
        let got: Vec<f32> = got.iter().copied().collect();
        let max = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(max <= 1e-4, "batch {n} from {start}: max |Δ| = {max}");
        assert_eq!(
            argmax_rows(&got, K),
            argmax_rows(&want, K),
            "batch {n} from {start}"
        );
        let sums_ok = got
            .chunks(K)
            .all(|r| (r.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert!(sums_ok, "rows of probabilities sum to 1");
    }
    Ok(())
}

#[test]
fn checkpoint_round_trip_exports_identical_onnx_bytes() -> anyhow::Result<()> {
    let (net, x) = trained_student()?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("student.safetensors");
    net.save(
        &path,
        &serde_json::json!({"classes": ["a", "b", "c", "d", "e"]}),
    )?;
    let (back, extra) = Net::load(&path)?;
    assert_eq!(extra["classes"][4], "e");
    assert_eq!(export(&net)?, export(&back)?);
    let xs = &x[..8 * C * T];
    assert_eq!(
        candle_probabilities(&net, xs, 8)?,
        candle_probabilities(&back, xs, 8)?
    );
    Ok(())
}
