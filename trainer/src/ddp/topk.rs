//! Top-k gradient sparsification with error feedback.
//!
//! Each rank sends only the `k` largest-magnitude entries of its gradient plus
//! what it left out before (the residual), and keeps the rest as the new
//! residual, so nothing is lost, only delayed (Stich et al., 2018; Lin et al.,
//! Deep Gradient Compression, 2018). Ranks exchange their sparse vectors by
//! broadcasting each in turn and sum them in rank order, so every rank gets
//! the same dense average.

use crate::collective::{Collective, CollectiveError};

/// Per-rank top-k state.
#[derive(Debug, Clone, PartialEq)]
pub struct TopK {
    ratio: f64,
    residual: Vec<f32>,
}

impl TopK {
    /// Keeps `ratio` of the entries (at least one) of `n`-element gradients.
    pub fn new(ratio: f64, n: usize) -> Self {
        Self {
            ratio,
            residual: vec![0.0; n],
        }
    }

    /// Entries sent per step.
    pub fn k(&self) -> usize {
        ((self.residual.len() as f64 * self.ratio).ceil() as usize)
            .clamp(1, self.residual.len().max(1))
    }

    /// What is still owed from earlier steps.
    pub fn residual(&self) -> &[f32] {
        &self.residual
    }

    /// Adds the residual to `grads`, picks the `k` largest magnitudes (ties by
    /// lower index, so the choice is deterministic), keeps the rest as the new
    /// residual and returns the picked `(indices ascending, values)`.
    pub fn compress(&mut self, grads: &[f32]) -> (Vec<u32>, Vec<f32>) {
        assert_eq!(
            grads.len(),
            self.residual.len(),
            "one gradient per parameter"
        );
        for (r, g) in self.residual.iter_mut().zip(grads) {
            *r += g;
        }
        let k = self.k();
        let mut order: Vec<u32> = (0..self.residual.len() as u32).collect();
        let by_magnitude = |a: &u32, b: &u32| {
            let (x, y) = (
                self.residual[*a as usize].abs(),
                self.residual[*b as usize].abs(),
            );
            y.total_cmp(&x).then(a.cmp(b))
        };
        if k < order.len() {
            order.select_nth_unstable_by(k, by_magnitude);
            order.truncate(k);
        }
        order.sort_unstable();
        let values: Vec<f32> = order
            .iter()
            .map(|&i| std::mem::take(&mut self.residual[i as usize]))
            .collect();
        (order, values)
    }

    /// Compresses this rank's `grads` and replaces them with the group's mean
    /// of everyone's sparse gradients. Returns the bytes received.
    pub fn all_reduce_mean(
        &mut self,
        c: &mut dyn Collective,
        grads: &mut [f32],
    ) -> Result<u64, CollectiveError> {
        let (indices, values) = self.compress(grads);
        let k = indices.len();
        let world = c.world_size();
        grads.fill(0.0);
        let mut message = vec![0.0f32; 2 * k];
        for root in 0..world {
            if root == c.rank() {
                for (slot, &i) in message[..k].iter_mut().zip(&indices) {
                    *slot = f32::from_bits(i);
                }
                message[k..].copy_from_slice(&values);
            }
            c.broadcast(&mut message, root)?;
            let n = grads.len();
            for (i, v) in message[..k].iter().zip(&message[k..]) {
                let at = i.to_bits() as usize;
                let slot = grads.get_mut(at).ok_or_else(|| CollectiveError::Protocol {
                    peer: root,
                    message: format!("top-k index {at} is outside {n} parameters"),
                })?;
                *slot += v;
            }
        }
        let inv = 1.0 / world as f32;
        grads.iter_mut().for_each(|g| *g *= inv);
        Ok((world * 2 * k * 4) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_largest_and_keeps_the_rest_as_residual() {
        let mut t = TopK::new(0.4, 5);
        assert_eq!(t.k(), 2);
        let (idx, val) = t.compress(&[0.1, -3.0, 0.5, 2.0, -0.2]);
        assert_eq!(idx, vec![1, 3]);
        assert_eq!(val, vec![-3.0, 2.0]);
        assert_eq!(t.residual(), &[0.1, 0.0, 0.5, 0.0, -0.2]);
        // Next step the residual competes with the new gradient.
        let (idx, _) = t.compress(&[0.0, 0.0, 0.6, 0.0, 0.0]);
        assert_eq!(idx, vec![2, 4]);
    }

    /// Error feedback loses nothing: everything sent plus what is still owed
    /// equals the sum of all gradients.
    #[test]
    fn sent_plus_residual_equals_the_sum_of_gradients() {
        let mut t = TopK::new(0.1, 50);
        let mut sent = vec![0.0f64; 50];
        let mut total = vec![0.0f64; 50];
        for step in 0..20 {
            let g: Vec<f32> = (0..50)
                .map(|i| (((i * 7 + step * 3) % 11) as f32 - 5.0) * 0.25)
                .collect();
            for (t, v) in total.iter_mut().zip(&g) {
                *t += *v as f64;
            }
            let (idx, val) = t.compress(&g);
            for (i, v) in idx.iter().zip(val) {
                sent[*i as usize] += v as f64;
            }
        }
        for i in 0..50 {
            let owed = t.residual()[i] as f64;
            assert!((sent[i] + owed - total[i]).abs() < 1e-4, "entry {i}");
        }
    }
}
