//! Batch normalisation with batch statistics followed by ReLU, fused, forward
//! and backward, over raw NCHW `f32` buffers.
//!
//! burn's training batch norm is a composite of generic reductions and copies
//! (stack.md: 3.3x slower than oneDNN forward); fusing it with the ReLU that
//! always follows it in SegNet also saves a full pass and an activation.
//!
//! Per channel `c` over the `m = n·h·w` values:
//!
//! ```text
//! forward   x̂ = (x - mean) / sqrt(var + eps),  y = max(0, γ·x̂ + β)
//! backward  g = dy·[y > 0],  dβ = Σ g,  dγ = Σ g·x̂,
//!           dx = γ/(m·sqrt(var + eps)) · (m·g - dβ - x̂·dγ)
//! ```
//!
//! Reductions run per channel in f64, in a fixed order, so results do not
//! depend on the thread count.

use rayon::prelude::*;

/// Shape of a fused batch norm over `[n, c, h, w]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BnRelu {
    /// Batch size.
    pub n: usize,
    /// Channels.
    pub c: usize,
    /// Height × width.
    pub hw: usize,
    /// Variance epsilon.
    pub eps: f64,
}

/// What the forward pass returns.
#[derive(Debug, Clone, PartialEq)]
pub struct BnReluForward {
    /// `max(0, γ·x̂ + β)`, same layout as the input.
    pub output: Vec<f32>,
    /// Batch mean per channel.
    pub mean: Vec<f32>,
    /// Biased (population) batch variance per channel.
    pub var: Vec<f32>,
}

/// Gradients of the fused operation.
#[derive(Debug, Clone, PartialEq)]
pub struct BnReluGrads {
    /// With respect to the input.
    pub dx: Vec<f32>,
    /// With respect to γ.
    pub dgamma: Vec<f32>,
    /// With respect to β.
    pub dbeta: Vec<f32>,
}

impl BnRelu {
    fn len(&self) -> usize {
        self.n * self.c * self.hw
    }

    /// The planes (`hw` values each) of channel `ch`, one per image.
    fn planes<'a>(&self, data: &'a [f32], ch: usize) -> impl Iterator<Item = &'a [f32]> + 'a {
        let (c, hw) = (self.c, self.hw);
        (0..self.n).map(move |i| &data[(i * c + ch) * hw..(i * c + ch + 1) * hw])
    }

    fn inv_std(&self, var: f32) -> f32 {
        (1.0 / (var as f64 + self.eps).sqrt()) as f32
    }

    /// The per-channel affine map `x ↦ x·scale + shift` equal to `γ·x̂ + β`.
    /// Forward and backward both use it, so the ReLU mask agrees bit for bit.
    fn affine(
        &self,
        gamma: &[f32],
        beta: &[f32],
        mean: &[f32],
        var: &[f32],
        ch: usize,
    ) -> (f32, f32) {
        let scale = gamma[ch] * self.inv_std(var[ch]);
        (scale, beta[ch] - mean[ch] * scale)
    }

    /// Normalises `x` with its batch statistics, scales, shifts and rectifies.
    pub fn forward(&self, x: &[f32], gamma: &[f32], beta: &[f32]) -> BnReluForward {
        assert_eq!(x.len(), self.len(), "input length");
        assert_eq!(
            (gamma.len(), beta.len()),
            (self.c, self.c),
            "one γ and β per channel"
        );
        let m = (self.n * self.hw) as f64;
        let stats: Vec<(f32, f32)> = (0..self.c)
            .into_par_iter()
            .map(|ch| {
                // Shifting by one sample keeps the one-pass variance accurate.
                let shift = x[ch * self.hw];
                let (mut sum, mut sq) = (0.0f64, 0.0f64);
                for plane in self.planes(x, ch) {
                    let (s, q) = shifted_sums(plane, shift);
                    sum += s;
                    sq += q;
                }
                let mean_shifted = sum / m;
                let var = (sq / m - mean_shifted * mean_shifted).max(0.0);
                ((mean_shifted + shift as f64) as f32, var as f32)
            })
            .collect();
        let means: Vec<f32> = stats.iter().map(|s| s.0).collect();
        let vars: Vec<f32> = stats.iter().map(|s| s.1).collect();
        let mut output = vec![0.0f32; x.len()];
        output
            .par_chunks_mut(self.hw)
            .zip(x.par_chunks(self.hw))
            .enumerate()
            .for_each(|(plane, (out, inp))| {
                let ch = plane % self.c;
                let (scale, shift) = self.affine(gamma, beta, &means, &vars, ch);
                for (o, &v) in out.iter_mut().zip(inp) {
                    *o = (v * scale + shift).max(0.0);
                }
            });
        BnReluForward {
            output,
            mean: means,
            var: vars,
        }
    }

    /// Gradients given the forward's input, statistics and output, and `dy`.
    pub fn backward(
        &self,
        x: &[f32],
        (gamma, beta): (&[f32], &[f32]),
        (mean, var): (&[f32], &[f32]),
        dy: &[f32],
    ) -> BnReluGrads {
        assert_eq!(x.len(), self.len(), "input length");
        assert_eq!(dy.len(), x.len(), "gradient length");
        let m = (self.n * self.hw) as f64;
        // The ReLU mask is recomputed from x with the forward's own affine map
        // (bit-identical), rather than read from the stored output: one array
        // less to keep alive and to stream through memory.
        let sums: Vec<(f64, f64)> = (0..self.c)
            .into_par_iter()
            .map(|ch| {
                let (scale, shift) = self.affine(gamma, beta, mean, var, ch);
                // Σ g and Σ g·(x − μ) over the active pixels, then
                // dγ = Σ g·x̂ = inv·Σ g·(x − μ).
                let (mut g_sum, mut gx_sum) = (0.0f64, 0.0f64);
                for (xp, gp) in self.planes(x, ch).zip(self.planes(dy, ch)) {
                    let (g, gx) = masked_sums(xp, gp, mean[ch], scale, shift);
                    g_sum += g;
                    gx_sum += gx;
                }
                (gx_sum * self.inv_std(var[ch]) as f64, g_sum)
            })
            .collect();
        let mut dx = vec![0.0f32; x.len()];
        dx.par_chunks_mut(self.hw)
            .enumerate()
            .for_each(|(plane, out)| {
                let ch = plane % self.c;
                let range = plane * self.hw..(plane + 1) * self.hw;
                let (scale, shift) = self.affine(gamma, beta, mean, var, ch);
                let (mu, inv) = (mean[ch], self.inv_std(var[ch]));
                let (dgamma, dbeta) = sums[ch];
                let k = gamma[ch] * inv / m as f32;
                let (sum_g, sum_gx) = (dbeta as f32, dgamma as f32);
                for ((o, &xv), &gv) in out.iter_mut().zip(&x[range.clone()]).zip(&dy[range]) {
                    let g = if xv * scale + shift > 0.0 { gv } else { 0.0 };
                    let xhat = (xv - mu) * inv;
                    *o = k * (m as f32 * g - sum_g - xhat * sum_gx);
                }
            });
        BnReluGrads {
            dx,
            dgamma: sums.iter().map(|s| s.0 as f32).collect(),
            dbeta: sums.iter().map(|s| s.1 as f32).collect(),
        }
    }
}

/// Lanes of the partial sums below: wide enough for the compiler to vectorise,
/// short enough that each f32 lane adds at most a few hundred terms per plane.
const LANES: usize = 8;

/// `(Σ (v − shift), Σ (v − shift)²)` of one plane.
fn shifted_sums(plane: &[f32], shift: f32) -> (f64, f64) {
    let (mut s, mut q) = ([0.0f32; LANES], [0.0f32; LANES]);
    let chunks = plane.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            let d = c[i] - shift;
            s[i] += d;
            q[i] += d * d;
        }
    }
    let (mut s64, mut q64): (f64, f64) = (
        s.iter().map(|&v| v as f64).sum(),
        q.iter().map(|&v| v as f64).sum(),
    );
    for &v in rest {
        let d = (v - shift) as f64;
        s64 += d;
        q64 += d * d;
    }
    (s64, q64)
}

/// `(Σ g, Σ g·(x − μ))` over the pixels of one plane where the ReLU was
/// active, i.e. `x·scale + shift > 0`.
fn masked_sums(x: &[f32], g: &[f32], mu: f32, scale: f32, shift: f32) -> (f64, f64) {
    let (mut gs, mut gxs) = ([0.0f32; LANES], [0.0f32; LANES]);
    let n = x.len() / LANES * LANES;
    for (xc, gc) in x[..n].chunks_exact(LANES).zip(g[..n].chunks_exact(LANES)) {
        for i in 0..LANES {
            // A multiply by the 0/1 mask rather than an `if`: the branch kept
            // the compiler from vectorising this loop (measured 3x slower).
            let gv = gc[i] * ((xc[i] * scale + shift > 0.0) as u32 as f32);
            gs[i] += gv;
            gxs[i] += gv * (xc[i] - mu);
        }
    }
    let (mut g64, mut gx64): (f64, f64) = (
        gs.iter().map(|&v| v as f64).sum(),
        gxs.iter().map(|&v| v as f64).sum(),
    );
    for i in n..x.len() {
        if x[i] * scale + shift > 0.0 {
            g64 += g[i] as f64;
            gx64 += (g[i] * (x[i] - mu)) as f64;
        }
    }
    (g64, gx64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::pseudo_random;

    /// Values in [-2, 2): wide enough that some ReLUs are off.
    fn data(len: usize, seed: u64) -> Vec<f32> {
        pseudo_random(len, seed)
            .into_iter()
            .map(|v| 2.0 * v)
            .collect()
    }

    fn loss(bn: &BnRelu, x: &[f32], gamma: &[f32], beta: &[f32], r: &[f32]) -> f64 {
        let y = bn.forward(x, gamma, beta).output;
        y.iter().zip(r).map(|(a, b)| *a as f64 * *b as f64).sum()
    }

    #[test]
    fn forward_normalises_each_channel() {
        let bn = BnRelu {
            n: 3,
            c: 2,
            hw: 5,
            eps: 1e-5,
        };
        let x = data(30, 1);
        let f = bn.forward(&x, &[1.0, 1.0], &[0.0, 0.0]);
        for ch in 0..2 {
            let vals: Vec<f32> = bn.planes(&x, ch).flatten().copied().collect();
            let mean = vals.iter().sum::<f32>() / 15.0;
            assert!((f.mean[ch] - mean).abs() < 1e-5);
            let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 15.0;
            assert!((f.var[ch] - var).abs() < 1e-5);
        }
        assert!(f.output.iter().all(|&v| v >= 0.0));
    }

    /// Gradients against central differences of ⟨r, y(x, γ, β)⟩ (in f32 with a
    /// step where ReLU kinks are rarely crossed).
    #[test]
    fn backward_matches_finite_differences() {
        let bn = BnRelu {
            n: 2,
            c: 3,
            hw: 4,
            eps: 1e-5,
        };
        let x = data(24, 2);
        let gamma = vec![0.7, 1.3, -0.4];
        let beta = vec![0.1, -0.2, 0.3];
        let r = data(24, 3);
        let f = bn.forward(&x, &gamma, &beta);
        let g = bn.backward(&x, (&gamma, &beta), (&f.mean, &f.var), &r);
        let eps = 1e-3f32;
        let fd = |xs: &[f32], gs: &[f32], bs: &[f32], which: usize, k: usize| {
            let (mut a, mut b, mut c) = (xs.to_vec(), gs.to_vec(), bs.to_vec());
            let (mut a2, mut b2, mut c2) = (a.clone(), b.clone(), c.clone());
            match which {
                0 => {
                    a[k] += eps;
                    a2[k] -= eps;
                }
                1 => {
                    b[k] += eps;
                    b2[k] -= eps;
                }
                _ => {
                    c[k] += eps;
                    c2[k] -= eps;
                }
            }
            (loss(&bn, &a, &b, &c, &r) - loss(&bn, &a2, &b2, &c2, &r)) / (2.0 * eps as f64)
        };
        for k in 0..24 {
            let num = fd(&x, &gamma, &beta, 0, k);
            assert!(
                (num - g.dx[k] as f64).abs() < 5e-3,
                "dx[{k}]: {num} vs {}",
                g.dx[k]
            );
        }
        for k in 0..3 {
            let num = fd(&x, &gamma, &beta, 1, k);
            assert!(
                (num - g.dgamma[k] as f64).abs() < 5e-3,
                "dgamma[{k}]: {num} vs {}",
                g.dgamma[k]
            );
            let num = fd(&x, &gamma, &beta, 2, k);
            assert!(
                (num - g.dbeta[k] as f64).abs() < 5e-3,
                "dbeta[{k}]: {num} vs {}",
                g.dbeta[k]
            );
        }
    }
}
