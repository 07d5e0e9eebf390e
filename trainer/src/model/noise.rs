//! Weight noise: a model as low-precision or analog hardware computes it.
//! Every conv and linear weight `w` (a parameter of rank two or more) becomes
//! `w · (1 + σ·ε)`, `ε ~ N(0, 1)` per element; biases, normalisation and the
//! running statistics stay clean.
//!
//! A draw is a pure function of `(seed, stream)`: training uses the step as
//! the stream, so a resumed run and every rank of a data-parallel group see the
//! same noise; an evaluation uses one draw for the whole scoring (one device).
//! The perturbed tensors stay on the autodiff graph of the clean ones, so a
//! backward pass through the noisy model yields the clean weights' gradients
//! (`∂L/∂w = (1 + σ·ε) · ∂L/∂w̃`), which is what the optimiser updates.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// Streams of weight noise live in the upper half of ChaCha's stream space,
/// apart from the input-noise streams that share a seed with them.
const WEIGHT_STREAMS: u64 = 1 << 63;

/// Whether a parameter of rank `rank` is a weight that noise perturbs.
fn is_weight(rank: usize) -> bool {
    rank >= 2
}

/// One draw of the factors `1 + σ·ε` for every weight of a module, flat in
/// visiting order, on the module's device. Apply it to as many forward passes
/// as share the draw (the micro-batches of a step): each application builds
/// its own graph, so each can have its own backward pass.
pub struct WeightNoise {
    factors: Tensor<1>,
}

impl WeightNoise {
    /// Draws the factors for `module`'s weights with σ = `sigma` from
    /// `(seed, stream)`. σ = 0 still multiplies (by exactly one), so it goes
    /// through the same graph as any σ: the test that training with σ = 0 is
    /// bit-identical to training without noise checks that gradients reach
    /// the clean weights.
    pub fn draw<M: Module>(module: &M, sigma: f64, seed: u64, stream: u64) -> Self {
        struct Count {
            len: usize,
            device: Option<Device>,
        }
        impl ModuleVisitor for Count {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                if is_weight(D) {
                    let value = param.val();
                    self.len += value.shape().num_elements();
                    self.device.get_or_insert_with(|| value.device());
                }
            }
        }
        let mut count = Count {
            len: 0,
            device: None,
        };
        module.visit(&mut count);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(WEIGHT_STREAMS | stream);
        let sigma = sigma as f32;
        let factors: Vec<f32> = (0..count.len)
            .map(|_| {
                let e: f32 = StandardNormal.sample(&mut rng);
                1.0 + sigma * e
            })
            .collect();
        let device = count.device.unwrap_or_else(Device::flex);
        Self {
            factors: Tensor::from_data(TensorData::new(factors, [count.len]), &device),
        }
    }

    /// `module` with every weight multiplied by its factors.
    ///
    /// # Panics
    /// When `module` is not laid out as the module the draw was made for.
    pub fn apply<M: Module>(&self, module: M) -> M {
        struct Perturb<'a> {
            factors: &'a Tensor<1>,
            offset: usize,
        }
        impl ModuleMapper for Perturb<'_> {
            fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
                if !is_weight(D) {
                    return param;
                }
                param.map(|w| {
                    let shape = w.shape();
                    let n = shape.num_elements();
                    let f: Tensor<D> = self
                        .factors
                        .clone()
                        .narrow(0, self.offset, n)
                        .reshape(shape);
                    self.offset += n;
                    w.mul(f)
                })
            }
        }
        let mut perturb = Perturb {
            factors: &self.factors,
            offset: 0,
        };
        let module = module.map(&mut perturb);
        assert_eq!(
            perturb.offset,
            self.factors.dims()[0],
            "a weight-noise draw applies to the module it was drawn for"
        );
        module
    }
}

/// `module` with its weights perturbed by one draw of multiplicative Gaussian
/// noise of σ = `sigma` from `(seed, stream)`.
pub fn perturb_weights<M: Module>(module: M, sigma: f64, seed: u64, stream: u64) -> M {
    WeightNoise::draw(&module, sigma, seed, stream).apply(module)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::model::SegNet;
    use crate::model::params::{self, Entry};

    fn small() -> SegNet {
        let config = ModelConfig {
            widths: vec![4, 8],
            ..ModelConfig::default()
        };
        SegNet::new(&config, 3, &Device::flex())
    }

    fn values(model: &SegNet) -> Vec<(Entry, Vec<f32>)> {
        params::named_values(model)
    }

    #[test]
    fn only_weights_of_rank_two_or_more_move_and_by_the_stated_scale() {
        let model = small();
        let clean = values(&model);
        let noisy = values(&perturb_weights(model, 0.1, 7, 3));
        let mut ratios = Vec::new();
        for ((entry, c), (_, n)) in clean.iter().zip(&noisy) {
            if entry.shape.len() < 2 {
                assert_eq!(c, n, "{} must stay clean", entry.name);
                continue;
            }
            ratios.extend(
                c.iter()
                    .zip(n)
                    .filter(|(c, _)| c.abs() > 1e-6)
                    .map(|(c, n)| (n / c - 1.0) as f64),
            );
        }
        let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
        let sd =
            (ratios.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / ratios.len() as f64).sqrt();
        assert!(ratios.len() > 1000, "{} weights", ratios.len());
        assert!(mean.abs() < 0.01, "mean of ε·σ is {mean}");
        assert!((sd - 0.1).abs() < 0.01, "σ is {sd}, expected 0.1");
    }

    #[test]
    fn a_draw_is_a_function_of_seed_and_stream_alone() {
        let model = small();
        let draw = |seed, stream| values(&perturb_weights(model.clone(), 0.2, seed, stream));
        assert_eq!(draw(1, 5), draw(1, 5));
        assert_ne!(draw(1, 5), draw(1, 6));
        assert_ne!(draw(1, 5), draw(2, 5));
        let once = WeightNoise::draw(&model, 0.2, 1, 5);
        assert_eq!(values(&once.apply(model.clone())), draw(1, 5));
        assert_eq!(values(&once.apply(model.clone())), draw(1, 5), "reusable");
        assert_eq!(
            values(&perturb_weights(model.clone(), 0.0, 1, 5)),
            values(&model),
            "σ = 0 is the clean model"
        );
    }
}
