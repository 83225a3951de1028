#![allow(clippy::unwrap_used)]
use diredi_learn::adapt::{adapt, AdaptConfig, Exclusive};
use diredi_learn::knowledge::{extract, KnowledgeMeta, QuantConfig};
use diredi_learn::train::Windows;
use crate::fixture;
#[test]
fn zz_time() {
    let Some(fx) = fixture() else { return };
    let mut total = 0.0; let mut max = 0.0f64;
    for u in &fx.split.users {
        let names: Vec<String> = u.exclusive.y.iter().map(|&y| fx.split.classes[y as usize].clone()).collect();
        let t = std::time::Instant::now();
        let a = adapt(&fx.installed, &fx.classes, Exclusive { x: Windows::of(&u.exclusive).unwrap(), labels: &names }, &fx.probe, &AdaptConfig::default()).unwrap();
        let kn = extract(&fx.installed, &a.net, KnowledgeMeta { model_id: "m".into(), base_version: 1, base_sha256: String::new(), classes: a.classes.clone(), base_classes: 5, histogram: a.histogram.clone(), quant: QuantConfig::default() }).unwrap();
        let b = kn.to_bytes().unwrap();
        let s = t.elapsed().as_secs_f64();
        total += s; max = max.max(s);
        eprintln!("user {} ({} windows): adapt+RD {s:.2} s, {} B", u.subject, u.exclusive.n(), b.len());
    }
    eprintln!("MEAN {:.2} s MAX {max:.2} s", total / fx.split.users.len() as f64);
}
