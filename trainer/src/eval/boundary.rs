//! Boundary F1: how well predicted class boundaries lie on the true ones,
//! within a tolerance of a few pixels (the boundary F-measure of Csurka et
//! al., BMVC 2013, micro-averaged over a dataset). It is what mIoU hardly
//! sees: a mask one pixel too fat or thin at every edge loses little IoU and
//! much boundary F1, which is where argmax unpooling and nearest-neighbour
//! upsampling are expected to differ.

use crate::config::IGNORE_INDEX;
use crate::data::neighbours4;

/// Pixels a boundary may be off and still count as found.
pub const TOLERANCE: usize = 1;

/// Boundary pixel counts, mergeable across samples and ranks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BoundaryCounts {
    /// Predicted boundary pixels.
    predicted: u64,
    /// Predicted boundary pixels within [`TOLERANCE`] of a true boundary.
    predicted_matched: u64,
    /// True boundary pixels.
    truth: u64,
    /// True boundary pixels within [`TOLERANCE`] of a predicted boundary.
    truth_matched: u64,
}

/// Pixels of a `width × height` label map that have a 4-neighbour of another
/// label. Pixels whose truth is ignored are never boundaries, and an ignored
/// neighbour does not make one.
fn boundaries(labels: &[u8], truth: &[u8], width: usize, height: usize) -> Vec<bool> {
    (0..labels.len())
        .map(|p| {
            truth[p] != IGNORE_INDEX
                && neighbours4(p, width, height)
                    .any(|q| truth[q] != IGNORE_INDEX && labels[q] != labels[p])
        })
        .collect()
}

/// Whether each pixel lies within `r` pixels (Chebyshev) of a set pixel.
fn dilate(set: &[bool], width: usize, height: usize, r: usize) -> Vec<bool> {
    // Separable: a row pass, then a column pass, each O(pixels · r).
    let mut rows = vec![false; set.len()];
    for y in 0..height {
        for x in 0..width {
            let (lo, hi) = (x.saturating_sub(r), (x + r).min(width - 1));
            rows[y * width + x] = (lo..=hi).any(|i| set[y * width + i]);
        }
    }
    let mut out = vec![false; set.len()];
    for y in 0..height {
        for x in 0..width {
            let (lo, hi) = (y.saturating_sub(r), (y + r).min(height - 1));
            out[y * width + x] = (lo..=hi).any(|j| rows[j * width + x]);
        }
    }
    out
}

impl BoundaryCounts {
    /// Length of [`BoundaryCounts::to_words`].
    pub const WORDS: usize = 4;

    /// Counts the boundaries of one `width × height` prediction against its truth.
    pub fn add(&mut self, truth: &[u8], pred: &[u8], width: usize, height: usize) {
        let t = boundaries(truth, truth, width, height);
        let p = boundaries(pred, truth, width, height);
        let (near_t, near_p) = (
            dilate(&t, width, height, TOLERANCE),
            dilate(&p, width, height, TOLERANCE),
        );
        for i in 0..t.len() {
            self.truth += t[i] as u64;
            self.truth_matched += (t[i] && near_p[i]) as u64;
            self.predicted += p[i] as u64;
            self.predicted_matched += (p[i] && near_t[i]) as u64;
        }
    }

    /// The counts as four integers, for exchange between ranks.
    pub fn to_words(&self) -> [u64; Self::WORDS] {
        [
            self.predicted,
            self.predicted_matched,
            self.truth,
            self.truth_matched,
        ]
    }

    /// Adds counts produced by [`BoundaryCounts::to_words`].
    pub fn add_words(&mut self, w: &[u64]) {
        self.predicted += w[0];
        self.predicted_matched += w[1];
        self.truth += w[2];
        self.truth_matched += w[3];
    }

    /// F1 of boundary precision and recall; 1 when neither side has a
    /// boundary (nothing to find, nothing found), 0 when only one has.
    pub fn f1(&self) -> f64 {
        if self.predicted == 0 && self.truth == 0 {
            return 1.0;
        }
        let precision = ratio(self.predicted_matched, self.predicted);
        let recall = ratio(self.truth_matched, self.truth);
        if precision + recall == 0.0 {
            0.0
        } else {
            2.0 * precision * recall / (precision + recall)
        }
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `size × size` map with a square of class 1 at `[x0, x1) × [y0, y1)`.
    fn square(size: usize, x0: usize, x1: usize, y0: usize, y1: usize) -> Vec<u8> {
        (0..size * size)
            .map(|p| {
                let (x, y) = (p % size, p / size);
                (x0 <= x && x < x1 && y0 <= y && y < y1) as u8
            })
            .collect()
    }

    fn f1(truth: &[u8], pred: &[u8], size: usize) -> f64 {
        let mut c = BoundaryCounts::default();
        c.add(truth, pred, size, size);
        c.f1()
    }

    #[test]
    fn a_perfect_prediction_scores_one_and_shifts_within_the_tolerance_too() {
        let truth = square(32, 8, 20, 8, 20);
        assert_eq!(f1(&truth, &truth, 32), 1.0);
        assert_eq!(f1(&truth, &square(32, 9, 21, 8, 20), 32), 1.0, "1 px off");
        // Beyond the tolerance the vertical edges fall out of reach (the
        // horizontal ones still match), more of them the further off.
        let two = f1(&truth, &square(32, 10, 22, 8, 20), 32);
        let four = f1(&truth, &square(32, 12, 24, 8, 20), 32);
        assert!(two < 0.9 && four < two, "2 px off {two}, 4 px off {four}");
    }

    #[test]
    fn missing_or_invented_boundaries_score_zero_and_nothing_everywhere_scores_one() {
        let truth = square(16, 4, 12, 4, 12);
        let empty = vec![0u8; 256];
        assert_eq!(f1(&truth, &empty, 16), 0.0, "nothing found");
        assert_eq!(f1(&empty, &truth, 16), 0.0, "only invented");
        assert_eq!(f1(&empty, &empty, 16), 1.0);
    }

    #[test]
    fn counts_are_pixels_and_merge_across_shards() {
        // An 8×8 square in 16×16 has 8·4 − 4 = 28 inner edge pixels and 32 outer
        // ones, each of which has a 4-neighbour across the edge.
        let truth = square(16, 4, 12, 4, 12);
        let mut whole = BoundaryCounts::default();
        whole.add(&truth, &truth, 16, 16);
        assert_eq!(whole.truth, 28 + 32);
        let pred = square(16, 5, 12, 4, 12);
        let mut a = BoundaryCounts::default();
        a.add(&truth, &pred, 16, 16);
        let mut merged = whole.clone();
        merged.add_words(&a.to_words());
        let mut both = BoundaryCounts::default();
        both.add(&truth, &truth, 16, 16);
        both.add(&truth, &pred, 16, 16);
        assert_eq!(merged, both);
    }

    #[test]
    fn ignored_truth_pixels_make_no_boundaries() {
        // The top row is ignored; the prediction puts another class there.
        let mut truth = vec![0u8; 256];
        truth[..16].fill(IGNORE_INDEX);
        let mut pred = vec![0u8; 256];
        pred[..16].fill(1);
        let mut c = BoundaryCounts::default();
        c.add(&truth, &pred, 16, 16);
        assert_eq!((c.truth, c.predicted), (0, 0));
        assert_eq!(c.f1(), 1.0);
    }
}
