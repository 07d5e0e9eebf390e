//! Learning-rate schedules: linear warm-up, then constant, cosine or step decay.

use crate::config::{DecayConfig, TrainConfig};

/// The learning rate for the update at 0-based `step` of `config.steps`.
pub fn learning_rate(config: &TrainConfig, step: u64) -> f64 {
    let peak = config.lr;
    let warmup = config.warmup_steps;
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let since = step - warmup;
    match &config.decay {
        DecayConfig::Constant => peak,
        DecayConfig::Cosine(c) => {
            let span = config.steps.saturating_sub(warmup).saturating_sub(1).max(1);
            let progress = (since as f64 / span as f64).min(1.0);
            let floor = peak * c.final_factor;
            floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
        DecayConfig::Step(s) => peak * s.gamma.powi((since / s.every) as i32),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CosineDecay, StepDecay};

    fn cfg(decay: DecayConfig) -> TrainConfig {
        TrainConfig {
            steps: 11,
            lr: 1.0,
            warmup_steps: 2,
            decay,
            ..TrainConfig::default()
        }
    }

    #[test]
    fn warmup_then_cosine_reaches_the_floor_on_the_last_step() {
        let c = cfg(DecayConfig::Cosine(CosineDecay { final_factor: 0.1 }));
        assert_eq!(learning_rate(&c, 0), 0.5);
        assert_eq!(learning_rate(&c, 1), 1.0);
        assert_eq!(learning_rate(&c, 2), 1.0);
        assert!((learning_rate(&c, 10) - 0.1).abs() < 1e-12);
        let mid = learning_rate(&c, 6);
        assert!((mid - 0.55).abs() < 1e-12, "{mid}");
    }

    #[test]
    fn step_decay_multiplies_every_period() {
        let c = cfg(DecayConfig::Step(StepDecay {
            every: 3,
            gamma: 0.5,
        }));
        assert_eq!(learning_rate(&c, 2), 1.0);
        assert_eq!(learning_rate(&c, 5), 0.5);
        assert_eq!(learning_rate(&c, 8), 0.25);
        assert_eq!(learning_rate(&cfg(DecayConfig::Constant), 10), 1.0);
    }
}
