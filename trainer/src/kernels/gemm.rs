//! A bounds-checked, safe front for the `gemm` crate's strided matrix product.
//!
//! `gemm` (already compiled for burn's CPU backend) takes raw pointers and
//! strides. The views here carry their slice, so every index the product can
//! touch is checked against the slice once, before the call.
#![allow(unsafe_code)]

/// A read-only strided matrix view.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: isize,
    col_stride: isize,
}

/// A writable matrix view with contiguous rows (`row_stride` apart).
#[derive(Debug)]
pub struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
}

fn last_index(rows: usize, cols: usize, rs: isize, cs: isize) -> usize {
    assert!(rs >= 0 && cs >= 0, "negative strides are not supported");
    if rows == 0 || cols == 0 {
        return 0;
    }
    (rows - 1) * rs as usize + (cols - 1) * cs as usize
}

impl<'a> MatRef<'a> {
    /// A view with explicit strides (elements between consecutive rows and columns).
    pub fn new(
        data: &'a [f32],
        rows: usize,
        cols: usize,
        row_stride: isize,
        col_stride: isize,
    ) -> Self {
        assert!(
            rows == 0 || cols == 0 || last_index(rows, cols, row_stride, col_stride) < data.len(),
            "matrix view exceeds its slice"
        );
        Self {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }

    /// A contiguous row-major view.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, rows, cols, cols as isize, 1)
    }
}

impl<'a> MatMut<'a> {
    /// A contiguous row-major view of exactly `rows × cols` elements.
    pub fn row_major(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "destination size");
        Self::strided(data, rows, cols, cols)
    }

    /// `rows × cols` elements whose rows start `row_stride` apart (a block of
    /// columns of a wider row-major matrix, starting at `data[0]`).
    pub fn strided(data: &'a mut [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        assert!(cols <= row_stride, "rows must not overlap");
        assert!(
            rows == 0 || cols == 0 || last_index(rows, cols, row_stride as isize, 1) < data.len(),
            "matrix view exceeds its slice"
        );
        Self {
            data,
            rows,
            cols,
            row_stride,
        }
    }
}

/// `dst = a · b`, or `dst += a · b` with `accumulate`. Single-threaded: callers
/// parallelise over independent products.
pub fn matmul(dst: MatMut<'_>, accumulate: bool, a: MatRef<'_>, b: MatRef<'_>) {
    assert_eq!(a.cols, b.rows, "inner dimensions");
    assert_eq!((dst.rows, dst.cols), (a.rows, b.cols), "output dimensions");
    let (m, n, k) = (a.rows, b.cols, a.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst.data[r * dst.row_stride..r * dst.row_stride + n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: the views were checked to lie inside their slices (`MatRef::new`,
    // `MatMut::row_major`/`strided`), the shapes agree (asserted above), `dst`
    // is borrowed mutably and so does not alias `a` or `b`, and gemm only reads
    // `dst` when `read_dst` is true.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            1,
            dst.row_stride as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride,
            a.row_stride,
            b.data.as_ptr(),
            b.col_stride,
            b.row_stride,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_with_transposed_views_and_accumulation() {
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]; // 2x3
        let b = [7.0, 8.0, 9.0, 10.0, 11.0, 12.0]; // 3x2
        let mut c = [0.0f32; 4];
        matmul(
            MatMut::row_major(&mut c, 2, 2),
            false,
            MatRef::row_major(&a, 2, 3),
            MatRef::row_major(&b, 3, 2),
        );
        assert_eq!(c, [58.0, 64.0, 139.0, 154.0]);
        // aᵀ·a through a strided view: 3x3
        let mut d = [1.0f32; 9];
        let at = MatRef::new(&a, 3, 2, 1, 3);
        matmul(
            MatMut::row_major(&mut d, 3, 3),
            true,
            at,
            MatRef::row_major(&a, 2, 3),
        );
        assert_eq!(d, [18.0, 23.0, 28.0, 23.0, 30.0, 37.0, 28.0, 37.0, 46.0]);
    }

    #[test]
    fn strided_destination_writes_only_its_block() {
        let a = [1.0, 2.0, 3.0, 4.0]; // 2x2
        let id = [1.0, 0.0, 0.0, 1.0];
        let mut wide = [9.0f32; 8]; // 2x4, block = columns 1..3
        matmul(
            MatMut::strided(&mut wide[1..], 2, 2, 4),
            false,
            MatRef::row_major(&a, 2, 2),
            MatRef::row_major(&id, 2, 2),
        );
        assert_eq!(wide, [9.0, 1.0, 2.0, 9.0, 9.0, 3.0, 4.0, 9.0]);
    }

    #[test]
    #[should_panic(expected = "exceeds its slice")]
    fn out_of_bounds_views_are_refused() {
        let a = [0.0f32; 5];
        let _ = MatRef::row_major(&a, 2, 3);
    }
}
