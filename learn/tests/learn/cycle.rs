//! The gateway's half of the DiReDi loop on real HAPT users: guarded adaptation and the
//! knowledge package (round trip, bounds, damage, reconstruction, and no sample inside).

#![allow(clippy::unwrap_used)] // helpers of the tests below; a failure is a test failure

use std::collections::HashSet;

use candle_core::{Device, Tensor};
use diredi_learn::adapt::{adapt, adapt_cancellable, AdaptConfig, AdaptError, Adapted, Exclusive};
use diredi_learn::knowledge::{
    extract, Knowledge, KnowledgeError, KnowledgeMeta, QuantConfig, MAX_KNOWLEDGE_BYTES,
};
use diredi_learn::metrics::argmax_rows;
use diredi_learn::model::{ModelConfig, Net};
use diredi_learn::onnx::{export, import};
use diredi_learn::train::{predict, Windows};
use diredi_learn::window::WindowSet;
use half::f16;

use crate::{fixture, synthetic, Fixture};

fn user<'a>(fx: &'a Fixture, id: &str) -> &'a diredi_learn::split::UserSplit {
    fx.split
        .users
        .iter()
        .find(|u| u.subject == id)
        .unwrap_or_else(|| panic!("no user {id}"))
}

fn labels(fx: &Fixture, set: &WindowSet) -> Vec<String> {
    set.y
        .iter()
        .map(|&y| fx.split.classes[y as usize].clone())
        .collect()
}

/// Accuracy of `net` (outputs `classes`) on `set`, whose labels index the split's classes.
fn accuracy(fx: &Fixture, net: &Net, classes: &[String], set: &WindowSet) -> f64 {
    let logits = predict(net, &Windows::of(set).unwrap(), 512).unwrap();
    let pred = argmax_rows(&logits, classes.len());
    let ok = pred
        .iter()
        .zip(&set.y)
        .filter(|(p, y)| classes[**p as usize] == fx.split.classes[**y as usize])
        .count();
    ok as f64 / set.n() as f64
}

fn adapt_user(fx: &Fixture, id: &str, cfg: &AdaptConfig) -> Result<Adapted, AdaptError> {
    let u = user(fx, id);
    let names = labels(fx, &u.exclusive);
    let ex = Exclusive {
        x: Windows::of(&u.exclusive).unwrap(),
        labels: &names,
    };
    adapt(&fx.installed, &fx.classes, ex, &fx.probe, cfg)
}

fn meta(fx: &Fixture, a: &Adapted, quant: QuantConfig) -> KnowledgeMeta {
    KnowledgeMeta {
        model_id: "hapt-student".into(),
        base_version: 1,
        base_sha256: "00".repeat(32),
        classes: a.classes.clone(),
        base_classes: fx.classes.len(),
        histogram: a.histogram.clone(),
        quant,
    }
}

#[test]
fn adaptation_raises_user_accuracy_and_keeps_the_probe() {
    let Some(fx) = fixture() else {
        return;
    };
    for id in ["2", "9"] {
        let u = user(fx, id);
        let before = accuracy(fx, &fx.installed, &fx.classes, &u.test);
        let a = adapt_user(fx, id, &AdaptConfig::default()).unwrap();
        let after = accuracy(fx, &a.net, &a.classes, &u.test);
        assert_eq!(a.classes.last().map(String::as_str), Some("downstairs"));
        assert!(
            after >= before + 0.05,
            "user {id}: test accuracy {before:.3} → {after:.3}"
        );
        assert!(
            a.probe_accuracy_after >= a.probe_accuracy_before - 0.05,
            "user {id}: probe {:.3} → {:.3}",
            a.probe_accuracy_before,
            a.probe_accuracy_after
        );
        assert_eq!(a.histogram.iter().sum::<u32>() as usize, u.exclusive.n());
    }
}

/// A cancellation is seen within a step: set before the start, nothing is trained; set from
/// another thread mid-way through a long adaptation, it stops early and returns no model.
#[test]
fn adaptation_stops_when_cancelled() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let Some(fx) = fixture() else {
        return;
    };
    let u = user(fx, "2");
    let names = labels(fx, &u.exclusive);
    let run = |cfg: &AdaptConfig, cancel: &AtomicBool| {
        let ex = Exclusive {
            x: Windows::of(&u.exclusive).unwrap(),
            labels: &names,
        };
        adapt_cancellable(&fx.installed, &fx.classes, ex, &fx.probe, cfg, cancel)
    };
    let already = AtomicBool::new(true);
    match run(&AdaptConfig::default(), &already) {
        Err(AdaptError::Cancelled { steps, total }) => assert_eq!((steps, total > 0), (0, true)),
        other => panic!("expected a cancellation, got {:?}", other.map(|a| a.steps)),
    }
    // Long enough (1,000 epochs) that it cannot finish before the flag is set.
    let long = AdaptConfig {
        epochs: 1000,
        ..AdaptConfig::default()
    };
    let cancel = AtomicBool::new(false);
    let started = std::time::Instant::now();
    let outcome = std::thread::scope(|s| {
        let worker = s.spawn(|| run(&long, &cancel));
        std::thread::sleep(std::time::Duration::from_millis(300));
        cancel.store(true, Ordering::Release);
        worker.join().unwrap()
    });
    match outcome {
        Err(AdaptError::Cancelled { steps, total }) => {
            assert!(steps > 0 && steps < total, "{steps} of {total} steps")
        }
        other => panic!("expected a cancellation, got {:?}", other.map(|a| a.steps)),
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "the cancellation took {:?}",
        started.elapsed()
    );
}

#[test]
fn guard_refuses_an_aggressive_adaptation_with_no_margin() {
    let Some(fx) = fixture() else {
        return;
    };
    let cfg = AdaptConfig {
        probe_weight: 0.0,
        lr: 2e-2,
        epochs: 25,
        guard_margin: 0.0,
        ..AdaptConfig::default()
    };
    match adapt_user(fx, "10", &cfg) {
        Err(AdaptError::Guard { before, after, .. }) => assert!(after < before),
        Err(e) => panic!("unexpected error {e}"),
        Ok(a) => panic!(
            "accepted: probe {:.3} → {:.3}",
            a.probe_accuracy_before, a.probe_accuracy_after
        ),
    }
    // The same user, regularised and with the default margin, is accepted.
    assert!(adapt_user(fx, "10", &AdaptConfig::default()).is_ok());
}

/// DP adaptation: it reports the ρ it spent, and its noise does not come from the configured seed (two
/// runs with the same seed differ).
#[test]
fn dp_adaptation_accounts_freezes_batch_norm_and_draws_fresh_noise() {
    let Some(fx) = fixture() else {
        return;
    };
    let mut cfg = AdaptConfig {
        epochs: 2,
        ..AdaptConfig::default()
    };
    cfg.dp.enabled = true;
    let a = adapt_user(fx, "2", &cfg).unwrap();
    let b = adapt_user(fx, "2", &cfg).unwrap();
    assert_eq!(a.dp_rho, Some(cfg.dp.rho(2)));
    let (va, vb, vbase) = (
        a.net.snapshot().unwrap(),
        b.net.snapshot().unwrap(),
        fx.installed.snapshot().unwrap(),
    );
    let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut running = 0;
    let mut differ = false;
    for ((name, ta), ((_, tb), (_, t0))) in va.iter().zip(vb.iter().zip(&vbase)) {
        if name.contains("running") {
            running += 1;
            assert_eq!(values(ta), values(t0), "{name} changed under DP");
        } else if values(ta) != values(tb) {
            differ = true;
        }
    }
    // The student rebuilt from ONNX has its batch norm folded into the convolutions: no
    // running statistics to leak. Any model that has them must keep them as they were.
    assert_eq!(
        running, 0,
        "the imported student has no batch-norm statistics"
    );
    assert!(differ, "two DP runs with one seed gave the same weights");
    // Without DP the same seed gives the same weights.
    cfg.dp.enabled = false;
    let (c, d) = (
        adapt_user(fx, "2", &cfg).unwrap(),
        adapt_user(fx, "2", &cfg).unwrap(),
    );
    assert!(c.dp_rho.is_none());
    for ((_, tc), (_, td)) in c
        .net
        .snapshot()
        .unwrap()
        .iter()
        .zip(&d.net.snapshot().unwrap())
    {
        assert_eq!(values(tc), values(td));
    }
}

/// 8-byte patterns of consecutive values (2 × f32, 4 × f16), along time and across channels.
fn patterns(values: &[f32], channels: usize, len: usize, out: &mut HashSet<[u8; 8]>) {
    let mut add_run = |run: &[f32]| {
        for w in run.windows(2) {
            let mut p = [0u8; 8];
            p[..4].copy_from_slice(&w[0].to_le_bytes());
            p[4..].copy_from_slice(&w[1].to_le_bytes());
            out.insert(p);
        }
        for w in run.windows(4) {
            let mut p = [0u8; 8];
            for (j, v) in w.iter().enumerate() {
                p[2 * j..2 * j + 2].copy_from_slice(&f16::from_f32(*v).to_le_bytes());
            }
            out.insert(p);
        }
    };
    for win in values.chunks_exact(channels * len) {
        // NCT: channel-major runs; and the frame order (all channels of one time step).
        for ch in win.chunks_exact(len) {
            add_run(ch);
        }
        for t in 0..len {
            let frame: Vec<f32> = (0..channels).map(|c| win[c * len + t]).collect();
            add_run(&frame);
        }
    }
}

#[test]
fn knowledge_of_a_real_user_round_trips_and_holds_no_exclusive_value() {
    let Some(fx) = fixture() else {
        return;
    };
    let a = adapt_user(fx, "2", &AdaptConfig::default()).unwrap();
    let kn = extract(&fx.installed, &a.net, meta(fx, &a, QuantConfig::default())).unwrap();
    let bytes = kn.to_bytes().unwrap();
    assert!(bytes.len() <= MAX_KNOWLEDGE_BYTES, "{} bytes", bytes.len());
    let back = Knowledge::from_bytes(&bytes).unwrap();
    assert_eq!(back, kn);
    assert_eq!(back.histogram, a.histogram);

    // The rebuilt model answers like the adapted one on the user's test windows.
    let rebuilt = back.apply(&fx.installed).unwrap();
    let u = user(fx, "2");
    let x = Windows::of(&u.test).unwrap();
    let k = a.classes.len();
    let pa = argmax_rows(&predict(&a.net, &x, 512).unwrap(), k);
    let pr = argmax_rows(&predict(&rebuilt, &x, 512).unwrap(), k);
    let same = pa.iter().zip(&pr).filter(|(p, q)| p == q).count() as f64 / pa.len() as f64;
    assert!(
        same >= 0.95,
        "rebuilt agrees on {same:.3} of the test windows"
    );

    // Same data, same seed → the same package.
    let again = adapt_user(fx, "2", &AdaptConfig::default()).unwrap();
    let kn2 = extract(
        &fx.installed,
        &again.net,
        meta(fx, &again, QuantConfig::default()),
    )
    .unwrap();
    assert_eq!(kn2.package_id, kn.package_id);

    // No run of exclusive values, standardised or raw, f32 or f16, appears in the bytes.
    let mut pats = HashSet::new();
    let (c, t) = (u.exclusive.channels, u.exclusive.len);
    patterns(&u.exclusive.x, c, t, &mut pats);
    let mut raw = Vec::with_capacity(u.exclusive.x.len());
    for r in &u.exclusive.refs {
        let rows = fx.dataset.recordings[r.recording].rows_slice(r.start, t);
        // rows are [T, C] frames; transpose to NCT.
        for ch in 0..c {
            raw.extend((0..t).map(|s| rows[s * c + ch]));
        }
    }
    patterns(&raw, c, t, &mut pats);
    assert!(pats.len() > 10_000, "{} patterns", pats.len());
    let hits = bytes
        .windows(8)
        .filter(|w| {
            let mut p = [0u8; 8];
            p.copy_from_slice(w);
            pats.contains(&p)
        })
        .count();
    assert_eq!(hits, 0, "exclusive values found in the knowledge bytes");
}

/// A small BN-free base, and an "adapted" copy: perturbed weights and one new class.
fn small_pair() -> (Net, Net) {
    let (c, t, k) = (3, 32, 4);
    let base =
        import(&export(&Net::new(ModelConfig::student(c, t, k), 3).unwrap()).unwrap()).unwrap();
    let mut adapted = base.try_clone().unwrap();
    adapted.extend_head(k + 1, 9).unwrap();
    for (i, (_, var)) in adapted.named_vars().into_iter().enumerate() {
        let noise = var
            .as_tensor()
            .randn_like(0.0, 0.01 * (i + 1) as f64)
            .unwrap();
        var.set(&(var.as_tensor() + noise).unwrap()).unwrap();
    }
    (base, adapted)
}

fn small_meta(quant: QuantConfig) -> KnowledgeMeta {
    KnowledgeMeta {
        model_id: "m".into(),
        base_version: 3,
        base_sha256: "ab".repeat(32),
        classes: ["a", "b", "c", "d", "new"].map(String::from).to_vec(),
        base_classes: 4,
        histogram: vec![3, 0, 2, 1, 5],
        quant,
    }
}

#[test]
fn apply_of_extract_reproduces_the_adapted_net_within_quantisation_error() {
    let (base, adapted) = small_pair();
    for quant in [
        QuantConfig { bits: 8, keep: 1.0 },
        QuantConfig { bits: 4, keep: 1.0 },
    ] {
        let kn = extract(&base, &adapted, small_meta(quant.clone())).unwrap();
        let rebuilt = kn.apply(&base).unwrap();
        assert_eq!(rebuilt.config(), adapted.config());
        let got: std::collections::HashMap<_, _> = rebuilt.named_vars().into_iter().collect();
        for (d, (name, var)) in kn.deltas.iter().zip(adapted.named_vars()) {
            assert_eq!(d.name, name);
            let want = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let have = got[&name]
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let rows = d.scales.len();
            let per = want.len() / rows;
            for (i, (w, h)) in want.iter().zip(&have).enumerate() {
                // Half a quantisation step of the row (f32 rounding aside).
                let step = d.scales[i / per];
                assert!(
                    (w - h).abs() <= 0.5 * step * 1.001 + 1e-6,
                    "{name}[{i}] with {quant:?}: {w} vs {h}"
                );
            }
        }
    }
}

#[test]
fn knowledge_bytes_round_trip_and_damage_is_an_error() {
    let (base, adapted) = small_pair();
    let kn = extract(
        &base,
        &adapted,
        small_meta(QuantConfig { bits: 4, keep: 0.3 }),
    )
    .unwrap();
    let bytes = kn.to_bytes().unwrap();
    assert_eq!(Knowledge::from_bytes(&bytes).unwrap(), kn);
    assert_eq!(kn.package_id.len(), 64);
    for cut in 0..bytes.len() {
        assert!(
            Knowledge::from_bytes(&bytes[..cut]).is_err(),
            "cut at {cut}"
        );
    }
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 0x10;
    assert!(matches!(
        Knowledge::from_bytes(&flipped),
        Err(KnowledgeError::Digest)
    ));
    let mut long = bytes.clone();
    long.push(0);
    assert!(Knowledge::from_bytes(&long).is_err());
    let (x, _) = synthetic(1, 8, 512, 2, 4);
    let garbage: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert!(Knowledge::from_bytes(&garbage).is_err());
    let mut fake = b"DRKN\x01\x00\xff\xff\xff\x7f".to_vec();
    fake.extend_from_slice(&garbage[..100]);
    assert!(matches!(
        Knowledge::from_bytes(&fake),
        Err(KnowledgeError::Truncated(_))
    ));
    assert!(matches!(
        Knowledge::from_bytes(&vec![0u8; MAX_KNOWLEDGE_BYTES + 1]),
        Err(KnowledgeError::TooLarge { .. })
    ));
    // A base of another size does not take the package.
    let other = Net::new(ModelConfig::student(3, 32, 6), 1).unwrap();
    assert!(kn.apply(&other).is_err());
    // A finite scale so large that its deltas overflow (found by fuzzing) is refused when
    // read, and a package built in memory with it does not apply.
    let mut huge = kn.clone();
    huge.deltas[0].scales[0] = f32::MAX / 2.0;
    assert!(huge.deltas[0].values.iter().any(|&v| v.abs() > 2));
    let err = Knowledge::from_bytes(&huge.to_bytes().unwrap()).unwrap_err();
    assert!(err.to_string().contains("scale"), "{err}");
    assert!(huge.apply(&base).is_err());
}

#[test]
fn knowledge_larger_than_the_bound_is_refused_when_written() {
    // A teacher-sized delta, dense int8, is far above 64 KiB.
    let base =
        import(&export(&Net::new(ModelConfig::teacher(6, 64, 4), 1).unwrap()).unwrap()).unwrap();
    let mut adapted = base.try_clone().unwrap();
    adapted.extend_head(5, 2).unwrap();
    let x = Tensor::zeros((1, 6, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert_eq!(adapted.forward_t(&x, false).unwrap().dims(), &[1, 5]);
    let err = extract(
        &base,
        &adapted,
        small_meta(QuantConfig { bits: 8, keep: 1.0 }),
    )
    .unwrap_err();
    assert!(matches!(err, KnowledgeError::TooLarge { .. }), "{err}");
}
