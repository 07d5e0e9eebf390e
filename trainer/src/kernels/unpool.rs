//! Max-unpooling over raw buffers: values go back to the positions their
//! argmax indices name; the gradient gathers from the same positions.
//!
//! burn expresses this as `zeros + scatter(Add)` and `gather`, generic ops
//! that re-derive strides per element; here each `(image, channel)` plane is
//! one tight loop, planes in parallel.

use rayon::prelude::*;

/// Shape of an unpooling: `planes` `(image, channel)` pairs, `inner` pooled
/// values per plane, `outer` values per unpooled plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unpool {
    /// Batch × channels.
    pub planes: usize,
    /// Pooled values per plane (`h·w`).
    pub inner: usize,
    /// Unpooled values per plane (`out_h·out_w`).
    pub outer: usize,
}

fn position(index: i64, outer: usize) -> usize {
    usize::try_from(index)
        .ok()
        .filter(|&p| p < outer)
        .unwrap_or_else(|| panic!("unpool index {index} outside a plane of {outer} values"))
}

impl Unpool {
    /// Places `x[p, i]` at `out[p, indices[p, i]]`; everything else is zero.
    pub fn forward(&self, x: &[f32], indices: &[i64]) -> Vec<f32> {
        assert_eq!(x.len(), self.planes * self.inner, "input length");
        assert_eq!(indices.len(), x.len(), "one index per value");
        let mut out = vec![0.0f32; self.planes * self.outer];
        out.par_chunks_mut(self.outer)
            .zip(x.par_chunks(self.inner).zip(indices.par_chunks(self.inner)))
            .for_each(|(o, (xs, is))| {
                for (&v, &i) in xs.iter().zip(is) {
                    o[position(i, self.outer)] += v;
                }
            });
        out
    }

    /// The gradient: `dx[p, i] = dout[p, indices[p, i]]`.
    pub fn backward(&self, dout: &[f32], indices: &[i64]) -> Vec<f32> {
        assert_eq!(
            dout.len(),
            self.planes * self.outer,
            "output-gradient length"
        );
        assert_eq!(indices.len(), self.planes * self.inner, "index length");
        let mut dx = vec![0.0f32; self.planes * self.inner];
        dx.par_chunks_mut(self.inner)
            .zip(
                dout.par_chunks(self.outer)
                    .zip(indices.par_chunks(self.inner)),
            )
            .for_each(|(d, (g, is))| {
                for (dv, &i) in d.iter_mut().zip(is) {
                    *dv = g[position(i, self.outer)];
                }
            });
        dx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_places_and_backward_gathers() {
        let u = Unpool {
            planes: 2,
            inner: 2,
            outer: 4,
        };
        let out = u.forward(&[1.0, 2.0, 3.0, 4.0], &[3, 0, 1, 2]);
        assert_eq!(out, vec![2.0, 0.0, 0.0, 1.0, 0.0, 3.0, 4.0, 0.0]);
        let dx = u.backward(
            &[10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0],
            &[3, 0, 1, 2],
        );
        assert_eq!(dx, vec![40.0, 10.0, 60.0, 70.0]);
    }

    #[test]
    #[should_panic(expected = "outside a plane")]
    fn out_of_range_indices_are_refused() {
        Unpool {
            planes: 1,
            inner: 1,
            outer: 4,
        }
        .forward(&[1.0], &[4]);
    }
}
