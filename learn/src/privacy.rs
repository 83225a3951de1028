//! Differential privacy of the local adaptation: the settings and the accounting.
//!
//! Mechanism (DP-SGD, Abadi et al. 2016): every exclusive window's gradient is clipped to the
//! L2 norm `clip_norm` (C) on its own, the clipped gradients of a step are summed, Gaussian
//! noise of standard deviation `noise_multiplier · C` (σC) is added to every coordinate, and
//! the sum is divided by the batch size. The probe term (the manufacturer's public windows)
//! is added without noise: it costs no privacy. Batch norm is frozen and dropout is off while
//! the user's windows are seen, so no statistic of them reaches the weights any other way.
//! The class histogram that travels in the knowledge gets Gaussian noise of standard deviation
//! `histogram_noise` per count.
//!
//! Accounting (zero-concentrated DP, Bun & Steinke 2016, which composes by addition):
//! - one pass over the exclusive windows (an epoch) puts each window in exactly one step: a
//!   Gaussian mechanism of sensitivity C and noise σC, i.e. ρ = 1 / (2σ²). No amplification
//!   by sampling or shuffling is claimed, which is the conservative choice;
//! - `epochs` passes: ρ = epochs / (2σ²); the histogram adds 1 / (2σ_h²) (sensitivity 1);
//! - successive adaptations on the same gateway add their ρ ([`Ledger`]);
//! - (ε, δ) from ρ through the Rényi-DP conversion of Balle et al. 2020 (Prop. 1 of
//!   "Hypothesis testing interpretations and Rényi DP"), minimised over the order α.
//!
//! The neighbouring relation is adding or removing one labelled window. The count of windows
//! (visible through the batch sizes and the noisy histogram) and the names of new classes
//! (the user's declared preferences) are not protected.

use serde::{Deserialize, Serialize};

/// Settings of DP adaptation (`[learning.adapt.dp]` on the gateway).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpConfig {
    /// Adapt with per-window clipping and noise. Off by default.
    pub enabled: bool,
    /// L2 bound of one window's gradient (C).
    pub clip_norm: f64,
    /// Noise standard deviation over the clip norm (σ).
    pub noise_multiplier: f64,
    /// Standard deviation of the noise added to each histogram count.
    pub histogram_noise: f64,
    /// δ of the reported (ε, δ).
    pub delta: f64,
    /// Most ε a gateway may spend over its life; an adaptation that would pass it is refused.
    pub epsilon_budget: f64,
}

impl Default for DpConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            clip_norm: 1.0,
            noise_multiplier: 3.0,
            histogram_noise: 8.0,
            delta: 1e-5,
            epsilon_budget: 16.0,
        }
    }
}

impl DpConfig {
    /// Problems with the values, one string each.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let positive = |v: f64| v > 0.0 && v.is_finite();
        if !positive(self.clip_norm) {
            p.push(format!(
                "dp.clip_norm must be positive, found {}",
                self.clip_norm
            ));
        }
        if !positive(self.noise_multiplier) {
            p.push(format!(
                "dp.noise_multiplier must be positive, found {}",
                self.noise_multiplier
            ));
        }
        if !positive(self.histogram_noise) {
            p.push(format!(
                "dp.histogram_noise must be positive, found {}",
                self.histogram_noise
            ));
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            p.push(format!("dp.delta must be in (0, 1), found {}", self.delta));
        }
        if !positive(self.epsilon_budget) {
            p.push(format!(
                "dp.epsilon_budget must be positive, found {}",
                self.epsilon_budget
            ));
        }
        p
    }

    /// ρ (zCDP) of one adaptation of `epochs` passes.
    pub fn rho(&self, epochs: usize) -> f64 {
        let s = self.noise_multiplier;
        let h = self.histogram_noise;
        epochs as f64 / (2.0 * s * s) + 1.0 / (2.0 * h * h)
    }
}

/// ε at `delta` of a mechanism that is ρ-zCDP (so (α, ρα)-RDP for every α > 1).
pub fn epsilon(rho: f64, delta: f64) -> f64 {
    if rho <= 0.0 {
        return 0.0;
    }
    let ln_delta = delta.ln();
    let mut best = f64::INFINITY;
    // α from 1.01 to ~1000 on a geometric grid: fine enough for two decimals.
    let mut alpha: f64 = 1.01;
    while alpha < 1000.0 {
        let e =
            rho * alpha + ((alpha - 1.0) / alpha).ln() - (ln_delta + alpha.ln()) / (alpha - 1.0);
        best = best.min(e);
        alpha *= 1.02;
    }
    best.max(0.0)
}

/// The privacy spent by one gateway: a sum of ρ over its adaptations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    /// ρ spent so far.
    pub rho: f64,
    /// DP adaptations accounted.
    pub adaptations: u64,
}

/// An adaptation the budget cannot pay for.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "privacy budget exhausted: this adaptation would bring ε to {would:.2} (δ = {delta}), \
     over the budget of {budget:.2} ({spent:.2} spent); raise [learning.adapt.dp] \
     epsilon_budget or stop adapting"
)]
pub struct BudgetExceeded {
    /// ε already spent.
    pub spent: f64,
    /// ε after this adaptation.
    pub would: f64,
    /// The budget.
    pub budget: f64,
    /// δ.
    pub delta: f64,
}

impl Ledger {
    /// ε spent so far at `delta`.
    pub fn epsilon(&self, delta: f64) -> f64 {
        epsilon(self.rho, delta)
    }

    /// The ledger after one more adaptation of `epochs`, if the budget allows it.
    pub fn charge(&self, cfg: &DpConfig, epochs: usize) -> Result<Ledger, BudgetExceeded> {
        let next = Ledger {
            rho: self.rho + cfg.rho(epochs),
            adaptations: self.adaptations + 1,
        };
        let would = next.epsilon(cfg.delta);
        if would > cfg.epsilon_budget {
            return Err(BudgetExceeded {
                spent: self.epsilon(cfg.delta),
                would,
                budget: cfg.epsilon_budget,
                delta: cfg.delta,
            });
        }
        Ok(next)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn epsilon_matches_the_zcdp_bound_and_grows_with_rho() {
        // The classic conversion ε = ρ + 2√(ρ ln(1/δ)) is an upper bound of the RDP one.
        for rho in [0.01, 0.1, 0.5, 1.0, 4.0] {
            let e = epsilon(rho, 1e-5);
            let classic = rho + 2.0 * (rho * (1e5f64).ln()).sqrt();
            assert!(e > 0.0 && e <= classic, "rho {rho}: {e} vs {classic}");
            assert!(e > 0.6 * classic, "rho {rho}: {e} far below {classic}");
        }
        assert!(epsilon(0.2, 1e-5) < epsilon(0.4, 1e-5));
        assert!(epsilon(0.2, 1e-3) < epsilon(0.2, 1e-5));
        assert_eq!(epsilon(0.0, 1e-5), 0.0);
    }

    #[test]
    fn rho_of_an_adaptation_adds_epochs_and_the_histogram() {
        let cfg = DpConfig {
            noise_multiplier: 2.0,
            histogram_noise: 10.0,
            ..DpConfig::default()
        };
        assert!((cfg.rho(4) - (4.0 / 8.0 + 1.0 / 200.0)).abs() < 1e-12);
    }

    #[test]
    fn the_ledger_refuses_what_the_budget_cannot_pay() {
        let cfg = DpConfig {
            enabled: true,
            epsilon_budget: 10.0,
            ..DpConfig::default()
        };
        let mut ledger = Ledger::default();
        let mut paid = 0;
        loop {
            match ledger.charge(&cfg, 15) {
                Ok(next) => {
                    assert!(next.epsilon(cfg.delta) <= 10.0);
                    ledger = next;
                    paid += 1;
                }
                Err(e) => {
                    assert!(e.would > 10.0 && e.spent <= 10.0);
                    assert!(e.to_string().contains("epsilon_budget"), "{e}");
                    break;
                }
            }
            assert!(paid < 100);
        }
        assert!(
            paid >= 1,
            "the default settings pay for at least one adaptation"
        );
        assert_eq!(ledger.adaptations, paid);
    }

    #[test]
    fn config_problems_name_the_field() {
        let cfg = DpConfig {
            delta: 1.5,
            noise_multiplier: 0.0,
            ..DpConfig::default()
        };
        let p = cfg.problems().join("; ");
        assert!(
            p.contains("dp.delta") && p.contains("dp.noise_multiplier"),
            "{p}"
        );
    }
}
