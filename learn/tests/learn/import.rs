//! `onnx::import` rebuilds the network an exported file computes: parity with ONNX Runtime on
//! real HAPT windows for the shipped student, and byte-exact round trips.

use candle_core::{Device, Tensor};
use diredi_infer::{Classifier, OrtClassifier, SessionConfig};
use diredi_learn::metrics::argmax_rows;
use diredi_learn::model::{ModelConfig, Net};
use diredi_learn::onnx::{export, import, OnnxError};
use ndarray::ArrayView3;

use crate::{fixture, onnx_runtime, repo_root, synthetic};

fn probabilities(net: &Net, x: &[f32], n: usize) -> anyhow::Result<Vec<f32>> {
    let cfg = net.config();
    let input = Tensor::from_slice(x, (n, cfg.in_channels, cfg.window), &Device::Cpu)?;
    Ok(
        candle_nn::ops::softmax_last_dim(&net.forward_t(&input, false)?)?
            .flatten_all()?
            .to_vec1::<f32>()?,
    )
}

#[test]
fn imported_shipped_student_matches_onnx_runtime_on_hapt_windows() -> anyhow::Result<()> {
    if !onnx_runtime() {
        return Ok(());
    }
    let Some(fx) = fixture() else {
        return Ok(());
    };
    let bytes = std::fs::read(repo_root().join("onnx-models/hapt-student-v1.onnx"))?;
    let net = import(&bytes)?;
    assert_eq!(net.param_count(), fx.installed.param_count());
    let clf = OrtClassifier::from_bytes(&bytes, &SessionConfig::default())?;
    let (c, t, k) = (6, 128, 5);
    let test = &fx.split.presumed_test;
    let n = 256.min(test.n());
    let xs = &test.x[..n * c * t];
    let want: Vec<f32> = clf
        .classify(ArrayView3::from_shape((n, c, t), xs)?)?
        .iter()
        .copied()
        .collect();
    let got = probabilities(&net, xs, n)?;
    let max = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(max <= 1e-4, "max |Δ| = {max}");
    assert_eq!(argmax_rows(&got, k), argmax_rows(&want, k));
    // The imported net exports to exactly the shipped bytes.
    assert_eq!(export(&net)?, bytes);
    Ok(())
}

#[test]
fn import_of_an_export_computes_the_same_function_and_is_trainable() -> anyhow::Result<()> {
    let (c, t, k) = (3, 40, 4);
    let mut cfg = ModelConfig::student(c, t, k);
    cfg.hidden = vec![8];
    let net = Net::new(cfg, 5)?;
    let (x, _) = synthetic(12, c, t, k, 2);
    let input = Tensor::from_slice(&x, (12, c, t), &Device::Cpu)?;
    for _ in 0..3 {
        net.forward_t(&input, true)?; // batch-norm statistics away from their defaults
    }
    let bytes = export(&net)?;
    let back = import(&bytes)?;
    assert!(!back.config().batch_norm);
    assert_eq!(back.config().hidden, vec![8]);
    let (a, b) = (probabilities(&net, &x, 12)?, probabilities(&back, &x, 12)?);
    let max = a
        .iter()
        .zip(&b)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0f32, f32::max);
    assert!(max <= 1e-5, "max |Δ| = {max}");
    assert_eq!(export(&back)?, bytes);
    let (decay, plain) = back.trainable_vars();
    assert!(!decay.is_empty() && !plain.is_empty());
    Ok(())
}

#[test]
fn garbage_and_foreign_graphs_are_refused() {
    assert!(matches!(
        import(b"not onnx at all"),
        Err(OnnxError::Decode(_))
    ));
    assert!(import(&[]).is_err());
    let net = Net::new(ModelConfig::student(2, 16, 3), 1).unwrap_or_else(|e| panic!("{e}"));
    let bytes = export(&net).unwrap_or_else(|e| panic!("{e}"));
    for cut in [10, bytes.len() / 2, bytes.len() - 3] {
        assert!(import(&bytes[..cut]).is_err(), "cut at {cut}");
    }
}

#[test]
fn shipped_probe_set_matches_its_manifest_and_the_model_classes() -> anyhow::Result<()> {
    let dir = repo_root().join("onnx-models");
    let manifest = diredi_protocol::manifest::Manifest::from_slice(&std::fs::read(
        dir.join("hapt-student-v1.json"),
    )?)?;
    let probe_ref = manifest
        .probe
        .expect("the shipped manifest references a probe set");
    let bytes = std::fs::read(dir.join(&probe_ref.file))?;
    assert_eq!(
        diredi_protocol::manifest::sha256_hex(&bytes),
        probe_ref.sha256
    );
    let probe = diredi_learn::probe::ProbeSet::from_bytes(&bytes)?;
    assert_eq!(probe.classes, manifest.classes);
    assert_eq!((probe.channels, probe.window), (6, 128));
    assert!(probe.n() >= 200, "{} probe windows", probe.n());
    // The installed model classifies its own probe set well (it is presumed data).
    let net = import(&std::fs::read(dir.join(&manifest.onnx_file))?)?;
    let logits = diredi_learn::train::predict(&net, &probe.windows()?, 256)?;
    let pred = argmax_rows(&logits, probe.classes.len());
    let acc = pred.iter().zip(&probe.y).filter(|(a, b)| a == b).count() as f64 / probe.n() as f64;
    assert!(acc >= 0.8, "probe accuracy {acc}");
    Ok(())
}
