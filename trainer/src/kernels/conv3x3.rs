//! 3x3 convolution with stride 1 and zero padding 1 (the SegNet body's only
//! convolution), forward and both gradients, over raw NCHW `f32` buffers.
//!
//! Each image is lowered to columns (`im2col`, `[cin·9, h·w]`) and the three
//! passes become one matrix product per image:
//!
//! ```text
//! forward   y_n [cout, hw]     = W [cout, cin·9] · cols_n
//! input     dcols_n            = Wᵀ · dy_n,  then col2im into dx_n
//! weight    dW                 = Σ_n dy_n · cols_nᵀ
//! ```
//!
//! Each image is lowered a block of rows at a time, sized so the block's
//! columns stay in cache (the whole image's columns are 9x its size, far more
//! than L2 for the wide layers). Images run in parallel (rayon); each thread
//! reuses one column buffer. The weight gradient is reduced over images in
//! index order, so results do not depend on scheduling.

use rayon::prelude::*;

use super::gemm::{MatMut, MatRef, matmul};

/// Column-buffer size per row block: 256 KiB of f32.
const BLOCK_FLOATS: usize = 64 * 1024;

/// Dimensions of a 3x3 convolution over NCHW tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv3x3 {
    /// Batch size.
    pub n: usize,
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
}

impl Conv3x3 {
    fn hw(&self) -> usize {
        self.h * self.w
    }
    fn k(&self) -> usize {
        self.cin * 9
    }
    /// Elements of the input.
    pub fn input_len(&self) -> usize {
        self.n * self.cin * self.hw()
    }
    /// Elements of the output.
    pub fn output_len(&self) -> usize {
        self.n * self.cout * self.hw()
    }
    /// Elements of the weight.
    pub fn weight_len(&self) -> usize {
        self.cout * self.k()
    }

    /// Rows of the image lowered at a time: enough that the block's columns
    /// (`cin·9` rows of `rows·w` values) fill about 256 KiB, so they stay in
    /// cache between im2col, the product and col2im.
    fn block_rows(&self) -> usize {
        (BLOCK_FLOATS / (self.k() * self.w)).clamp(1, self.h)
    }

    /// The row blocks `[y0, y1)` of the image.
    fn blocks(&self) -> impl Iterator<Item = (usize, usize)> {
        let (h, step) = (self.h, self.block_rows());
        (0..h).step_by(step).map(move |y0| (y0, (y0 + step).min(h)))
    }

    /// Writes the columns of output rows `y0..y1` of one image: row
    /// `ci·9 + kh·3 + kw`, column `(y - y0)·w + x` holds `x[ci, y + kh - 1,
    /// x + kw - 1]`, zero outside the image.
    fn im2col(&self, x: &[f32], (y0, y1): (usize, usize), cols: &mut [f32]) {
        let (h, w, hw) = (self.h, self.w, self.hw());
        let width = (y1 - y0) * w;
        for ci in 0..self.cin {
            let plane = &x[ci * hw..(ci + 1) * hw];
            for kh in 0..3 {
                for kw in 0..3 {
                    let row = &mut cols[(ci * 9 + kh * 3 + kw) * width..][..width];
                    for y in y0..y1 {
                        let out = &mut row[(y - y0) * w..(y - y0 + 1) * w];
                        let sy = y as isize + kh as isize - 1;
                        if sy < 0 || sy >= h as isize {
                            out.fill(0.0);
                            continue;
                        }
                        let src = &plane[sy as usize * w..(sy as usize + 1) * w];
                        match kw {
                            0 => {
                                out[0] = 0.0;
                                out[1..].copy_from_slice(&src[..w - 1]);
                            }
                            1 => out.copy_from_slice(src),
                            _ => {
                                out[..w - 1].copy_from_slice(&src[1..]);
                                out[w - 1] = 0.0;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Adds the columns of output rows `y0..y1` back onto one image (the
    /// adjoint of [`Self::im2col`]).
    fn col2im(&self, cols: &[f32], (y0, y1): (usize, usize), dx: &mut [f32]) {
        let (h, w, hw) = (self.h, self.w, self.hw());
        let width = (y1 - y0) * w;
        for ci in 0..self.cin {
            let plane = &mut dx[ci * hw..(ci + 1) * hw];
            for kh in 0..3 {
                for kw in 0..3 {
                    let row = &cols[(ci * 9 + kh * 3 + kw) * width..][..width];
                    for y in y0..y1 {
                        let sy = y as isize + kh as isize - 1;
                        if sy < 0 || sy >= h as isize {
                            continue;
                        }
                        let src = &row[(y - y0) * w..(y - y0 + 1) * w];
                        let dst = &mut plane[sy as usize * w..(sy as usize + 1) * w];
                        let (d, s) = match kw {
                            0 => (&mut dst[..w - 1], &src[1..]),
                            1 => (&mut dst[..], src),
                            _ => (&mut dst[1..], &src[..w - 1]),
                        };
                        for (a, b) in d.iter_mut().zip(s) {
                            *a += b;
                        }
                    }
                }
            }
        }
    }

    fn check(&self, x: &[f32], weight: &[f32]) {
        assert!(self.h >= 1 && self.w >= 2, "conv3x3 needs width >= 2");
        assert_eq!(x.len(), self.input_len(), "input length");
        assert_eq!(weight.len(), self.weight_len(), "weight length");
    }

    /// `y = conv(x, weight)`; `x` `[n, cin, h, w]`, `weight` `[cout, cin, 3, 3]`.
    pub fn forward(&self, x: &[f32], weight: &[f32]) -> Vec<f32> {
        self.check(x, weight);
        let (hw, k, cout, w) = (self.hw(), self.k(), self.cout, self.w);
        let mut y = vec![0.0f32; self.output_len()];
        let wmat = MatRef::row_major(weight, cout, k);
        y.par_chunks_mut(cout * hw)
            .zip(x.par_chunks(self.cin * hw))
            .for_each_init(
                || vec![0.0f32; k * self.block_rows() * w],
                |cols, (y_n, x_n)| {
                    for block in self.blocks() {
                        let width = (block.1 - block.0) * w;
                        let cols = &mut cols[..k * width];
                        self.im2col(x_n, block, cols);
                        let out = MatMut::strided(&mut y_n[block.0 * w..], cout, width, hw);
                        matmul(out, false, wmat, MatRef::row_major(cols, k, width));
                    }
                },
            );
        y
    }

    /// The gradient with respect to the input, given `dy` `[n, cout, h, w]`.
    pub fn backward_input(&self, dy: &[f32], weight: &[f32]) -> Vec<f32> {
        assert_eq!(dy.len(), self.output_len(), "output-gradient length");
        assert_eq!(weight.len(), self.weight_len(), "weight length");
        let (hw, k, cout, w) = (self.hw(), self.k(), self.cout, self.w);
        let mut dx = vec![0.0f32; self.input_len()];
        // Wᵀ as a view: [k, cout] with row stride 1 and column stride k.
        let wt = MatRef::new(weight, k, cout, 1, k as isize);
        dx.par_chunks_mut(self.cin * hw)
            .zip(dy.par_chunks(cout * hw))
            .for_each_init(
                || vec![0.0f32; k * self.block_rows() * w],
                |dcols, (dx_n, dy_n)| {
                    for block in self.blocks() {
                        let width = (block.1 - block.0) * w;
                        let dcols = &mut dcols[..k * width];
                        let dy_block =
                            MatRef::new(&dy_n[block.0 * w..], cout, width, hw as isize, 1);
                        matmul(MatMut::row_major(dcols, k, width), false, wt, dy_block);
                        self.col2im(dcols, block, dx_n);
                    }
                },
            );
        dx
    }

    /// The gradient with respect to the weight, given `x` and `dy`.
    pub fn backward_weight(&self, x: &[f32], dy: &[f32]) -> Vec<f32> {
        assert_eq!(x.len(), self.input_len(), "input length");
        assert_eq!(dy.len(), self.output_len(), "output-gradient length");
        let (hw, k, cout, w) = (self.hw(), self.k(), self.cout, self.w);
        let per_image: Vec<Vec<f32>> = x
            .par_chunks(self.cin * hw)
            .zip(dy.par_chunks(cout * hw))
            .map_init(
                || vec![0.0f32; k * self.block_rows() * w],
                |cols, (x_n, dy_n)| {
                    let mut dw = vec![0.0f32; cout * k];
                    for (i, block) in self.blocks().enumerate() {
                        let width = (block.1 - block.0) * w;
                        let cols = &mut cols[..k * width];
                        self.im2col(x_n, block, cols);
                        // colsᵀ as a view: [width, k] with row stride 1 and column stride width.
                        let cols_t = MatRef::new(cols, width, k, 1, width as isize);
                        let dy_block =
                            MatRef::new(&dy_n[block.0 * w..], cout, width, hw as isize, 1);
                        matmul(MatMut::row_major(&mut dw, cout, k), i > 0, dy_block, cols_t);
                    }
                    dw
                },
            )
            .collect();
        let mut dw = vec![0.0f32; cout * k];
        for part in &per_image {
            for (a, b) in dw.iter_mut().zip(part) {
                *a += b;
            }
        }
        dw
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::pseudo_random;

    /// Direct 7-loop definition, the reference for every pass.
    fn reference_forward(c: &Conv3x3, x: &[f32], wt: &[f32]) -> Vec<f32> {
        let mut y = vec![0.0f32; c.output_len()];
        for n in 0..c.n {
            for co in 0..c.cout {
                for yy in 0..c.h {
                    for xx in 0..c.w {
                        let mut acc = 0.0f64;
                        for ci in 0..c.cin {
                            for kh in 0..3 {
                                for kw in 0..3 {
                                    let (sy, sx) = (yy as isize + kh - 1, xx as isize + kw - 1);
                                    if sy < 0 || sx < 0 || sy >= c.h as isize || sx >= c.w as isize
                                    {
                                        continue;
                                    }
                                    let xi =
                                        ((n * c.cin + ci) * c.h + sy as usize) * c.w + sx as usize;
                                    let wi =
                                        ((co * c.cin + ci) * 3 + kh as usize) * 3 + kw as usize;
                                    acc += x[xi] as f64 * wt[wi] as f64;
                                }
                            }
                        }
                        y[((n * c.cout + co) * c.h + yy) * c.w + xx] = acc as f32;
                    }
                }
            }
        }
        y
    }

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        let worst = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(worst < tol, "max abs difference {worst}");
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    #[test]
    fn forward_matches_the_definition_on_odd_shapes() {
        for c in [
            Conv3x3 {
                n: 2,
                cin: 3,
                cout: 5,
                h: 4,
                w: 7,
            },
            Conv3x3 {
                n: 1,
                cin: 1,
                cout: 1,
                h: 1,
                w: 2,
            },
            Conv3x3 {
                n: 3,
                cin: 4,
                cout: 2,
                h: 6,
                w: 3,
            },
            // Several row blocks per image, the last one short.
            Conv3x3 {
                n: 2,
                cin: 160,
                cout: 3,
                h: 7,
                w: 90,
            },
        ] {
            assert!(c.blocks().count() > 1 || c.cin < 100);
            let x = pseudo_random(c.input_len(), 1);
            let w = pseudo_random(c.weight_len(), 2);
            close(&c.forward(&x, &w), &reference_forward(&c, &x, &w), 1e-3);
        }
    }

    /// The gradients are the adjoints of the forward map: for any `dy`,
    /// ⟨dy, conv(x, w)⟩ = ⟨backward_input(dy), x⟩ = ⟨backward_weight(x, dy), w⟩,
    /// because the convolution is linear in `x` and in `w`.
    #[test]
    fn gradients_are_the_adjoints_of_the_forward_map() {
        for c in [
            Conv3x3 {
                n: 3,
                cin: 4,
                cout: 5,
                h: 5,
                w: 6,
            },
            // Several row blocks per image, the last one short.
            Conv3x3 {
                n: 2,
                cin: 150,
                cout: 4,
                h: 7,
                w: 80,
            },
        ] {
            let x = pseudo_random(c.input_len(), 3);
            let w = pseudo_random(c.weight_len(), 4);
            let dy = pseudo_random(c.output_len(), 5);
            let lhs = dot(&dy, &c.forward(&x, &w));
            let via_input = dot(&c.backward_input(&dy, &w), &x);
            let via_weight = dot(&c.backward_weight(&x, &dy), &w);
            assert!(
                (lhs - via_input).abs() < 1e-3 * lhs.abs().max(1.0),
                "{lhs} vs {via_input}"
            );
            assert!(
                (lhs - via_weight).abs() < 1e-3 * lhs.abs().max(1.0),
                "{lhs} vs {via_weight}"
            );
        }
    }

    #[test]
    fn results_do_not_depend_on_scheduling() {
        let c = Conv3x3 {
            n: 8,
            cin: 3,
            cout: 4,
            h: 8,
            w: 8,
        };
        let x = pseudo_random(c.input_len(), 6);
        let dy = pseudo_random(c.output_len(), 7);
        let first = c.backward_weight(&x, &dy);
        for _ in 0..5 {
            assert_eq!(c.backward_weight(&x, &dy), first);
        }
    }
}
