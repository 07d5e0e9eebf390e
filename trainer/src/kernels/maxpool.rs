//! 2x2, stride-2 max-pooling that records where each maximum came from, and
//! its gradient, over raw NCHW buffers.
//!
//! Indices follow PyTorch and burn: the flat position `row·w + col` of the
//! maximum within its `(image, channel)` plane of the input; the first
//! maximum in scan order wins a tie. Odd trailing rows and columns are
//! dropped (floor mode), as in both.

use rayon::prelude::*;

/// Shape of a pooling over `planes` `(image, channel)` planes of `h × w`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxPool2x2 {
    /// Batch × channels.
    pub planes: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
}

impl MaxPool2x2 {
    /// Output height.
    pub fn out_h(&self) -> usize {
        self.h / 2
    }
    /// Output width.
    pub fn out_w(&self) -> usize {
        self.w / 2
    }
    fn out_len(&self) -> usize {
        self.out_h() * self.out_w()
    }

    /// Pooled values and argmax indices, both `[planes, h/2, w/2]`.
    pub fn forward(&self, x: &[f32]) -> (Vec<f32>, Vec<i64>) {
        let (h, w, oh, ow) = (self.h, self.w, self.out_h(), self.out_w());
        assert_eq!(x.len(), self.planes * h * w, "input length");
        let mut pooled = vec![0.0f32; self.planes * self.out_len()];
        let mut indices = vec![0i64; self.planes * self.out_len()];
        pooled
            .par_chunks_mut(self.out_len().max(1))
            .zip(indices.par_chunks_mut(self.out_len().max(1)))
            .zip(x.par_chunks(h * w))
            .for_each(|((out, idx), plane)| {
                for oy in 0..oh {
                    let (top, bottom) =
                        (&plane[2 * oy * w..][..w], &plane[(2 * oy + 1) * w..][..w]);
                    for ox in 0..ow {
                        let c = 2 * ox;
                        // Scan order: top-left, top-right, bottom-left, bottom-right.
                        let mut best = (top[c], 2 * oy * w + c);
                        for (v, at) in [
                            (top[c + 1], 2 * oy * w + c + 1),
                            (bottom[c], (2 * oy + 1) * w + c),
                            (bottom[c + 1], (2 * oy + 1) * w + c + 1),
                        ] {
                            if v > best.0 || (v.is_nan() && !best.0.is_nan()) {
                                best = (v, at);
                            }
                        }
                        out[oy * ow + ox] = best.0;
                        idx[oy * ow + ox] = best.1 as i64;
                    }
                }
            });
        (pooled, indices)
    }

    /// The input gradient: each output's gradient goes to its argmax.
    pub fn backward(&self, dpooled: &[f32], indices: &[i64]) -> Vec<f32> {
        let hw = self.h * self.w;
        assert_eq!(
            dpooled.len(),
            self.planes * self.out_len(),
            "gradient length"
        );
        assert_eq!(indices.len(), dpooled.len(), "one index per value");
        let mut dx = vec![0.0f32; self.planes * hw];
        dx.par_chunks_mut(hw.max(1))
            .zip(
                dpooled
                    .par_chunks(self.out_len().max(1))
                    .zip(indices.par_chunks(self.out_len().max(1))),
            )
            .for_each(|(d, (g, is))| {
                for (&gv, &i) in g.iter().zip(is) {
                    let at = usize::try_from(i)
                        .ok()
                        .filter(|&p| p < hw)
                        .expect("argmax inside its plane");
                    d[at] += gv;
                }
            });
        dx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_first_maximum_and_routes_gradients_back() {
        // One 2x4 plane plus an odd trailing row that floor mode drops.
        #[rustfmt::skip]
        let x = [
            1.0, 5.0, 7.0, 7.0,
            3.0, 2.0, 0.0, 6.0,
            9.0, 9.0, 9.0, 9.0,
        ];
        let pool = MaxPool2x2 {
            planes: 1,
            h: 3,
            w: 4,
        };
        let (p, i) = pool.forward(&x);
        assert_eq!(p, vec![5.0, 7.0]);
        assert_eq!(i, vec![1, 2], "the first of two equal maxima wins");
        let dx = pool.backward(&[10.0, 20.0], &i);
        assert_eq!(
            dx,
            vec![0.0, 10.0, 20.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        );
    }
}
