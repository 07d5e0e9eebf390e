//! Losses: pixel-wise cross-entropy with class weights and an ignore index, and
//! binary cross-entropy for the instance-boundary head.

use burn::tensor::{Device, Int, Tensor, TensorData, activation};

use crate::config::IGNORE_INDEX;

/// Per-pixel targets prepared on the host for [`cross_entropy`].
#[derive(Debug, Clone)]
pub struct PixelTargets {
    /// `[b, 1, h, w]` class indices, ignored pixels mapped to 0.
    pub classes: Tensor<4, Int>,
    /// `[b, 1, h, w]` weight of each pixel: its class weight, 0 when ignored.
    pub weights: Tensor<4>,
    /// Sum of `weights`, the normaliser (PyTorch's weighted mean).
    pub weight_sum: f64,
}

impl PixelTargets {
    /// Builds targets for `masks` `[b, h, w]`.
    pub fn new(
        masks: &[u8],
        shape: [usize; 3],
        class_weights: Option<&[f64]>,
        device: &Device,
    ) -> Self {
        let [b, h, w] = shape;
        let mut classes = Vec::with_capacity(masks.len());
        let mut weights = Vec::with_capacity(masks.len());
        let mut weight_sum = 0.0f64;
        for &m in masks {
            if m == IGNORE_INDEX {
                classes.push(0i64);
                weights.push(0.0f32);
            } else {
                let wgt = class_weights.map_or(1.0, |cw| cw[m as usize]);
                classes.push(m as i64);
                weights.push(wgt as f32);
                weight_sum += wgt;
            }
        }
        Self {
            classes: Tensor::from_data(TensorData::new(classes, [b, 1, h, w]), device),
            weights: Tensor::from_data(TensorData::new(weights, [b, 1, h, w]), device),
            weight_sum,
        }
    }
}

/// Weighted mean cross-entropy of `logits` `[b, k, h, w]`; PyTorch's
/// `F.cross_entropy(logits, target, weight=w, ignore_index=255)`.
/// A batch with no counted pixel has zero loss.
pub fn cross_entropy(logits: Tensor<4>, targets: &PixelTargets) -> Tensor<1> {
    let log_p = activation::log_softmax(logits, 1).gather(1, targets.classes.clone());
    let total = log_p.mul(targets.weights.clone()).sum().neg();
    total.div_scalar(targets.weight_sum.max(f64::MIN_POSITIVE))
}

/// Mean binary cross-entropy with logits, in the numerically stable form
/// `max(z, 0) - z·t + log(1 + e^{-|z|})`.
///
/// # Shapes
/// - `logits`, `targets` `[b, 1, h, w]`
pub fn binary_cross_entropy_with_logits(logits: Tensor<4>, targets: Tensor<4>) -> Tensor<1> {
    let stable = logits.clone().abs().neg().exp().log1p();
    activation::relu(logits.clone())
        .sub(logits.mul(targets))
        .add(stable)
        .mean()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(t: Tensor<1>) -> f64 {
        t.into_data()
            .convert::<f64>()
            .try_into_vec::<f64>()
            .unwrap()[0]
    }

    #[test]
    fn cross_entropy_matches_a_hand_computation_with_weights_and_ignore() {
        let device = Device::flex();
        // b=1, k=2, h=1, w=3
        let logits = Tensor::<4>::from_data(
            TensorData::new(vec![0.0f32, 1.0, 2.0, 0.0, 0.0, 0.0], [1, 2, 1, 3]),
            &device,
        );
        let t = PixelTargets::new(&[0, 1, IGNORE_INDEX], [1, 1, 3], Some(&[1.0, 3.0]), &device);
        let lse = |a: f64, b: f64| (a.exp() + b.exp()).ln();
        let l0 = lse(0.0, 0.0) - 0.0; // pixel 0, class 0
        let l1 = lse(1.0, 0.0) - 0.0; // pixel 1, class 1
        let expect = (1.0 * l0 + 3.0 * l1) / 4.0;
        assert!((value(cross_entropy(logits, &t)) - expect).abs() < 1e-6);
    }

    #[test]
    fn bce_matches_the_definition() {
        let device = Device::flex();
        let z = [-30.0f32, -1.0, 0.5, 40.0];
        let y = [0.0f32, 1.0, 0.0, 1.0];
        let logits = Tensor::<4>::from_data(TensorData::new(z.to_vec(), [1, 1, 2, 2]), &device);
        let targets = Tensor::<4>::from_data(TensorData::new(y.to_vec(), [1, 1, 2, 2]), &device);
        let expect: f64 = z
            .iter()
            .zip(&y)
            .map(|(&z, &y)| {
                let (z, y) = (z as f64, y as f64);
                let p = 1.0 / (1.0 + (-z).exp());
                -(y * p.max(1e-300).ln() + (1.0 - y) * (1.0 - p).max(1e-300).ln())
            })
            .sum::<f64>()
            / 4.0;
        assert!((value(binary_cross_entropy_with_logits(logits, targets)) - expect).abs() < 1e-5);
    }
}
