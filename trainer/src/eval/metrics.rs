//! Segmentation quality: confusion matrix, pixel accuracy, per-class and mean IoU.

use crate::config::IGNORE_INDEX;

/// A `classes × classes` confusion matrix of pixel counts (rows: truth, columns: prediction).
#[derive(Debug, Clone, PartialEq)]
pub struct Confusion {
    classes: usize,
    counts: Vec<u64>,
}

/// What a validation pass reports.
pub use crate::run_dir::SegmentationScores;

impl Confusion {
    /// An empty matrix.
    pub fn new(classes: usize) -> Self {
        Self {
            classes,
            counts: vec![0; classes * classes],
        }
    }

    /// Counts `pred` against `truth` pixel by pixel, skipping ignored truth pixels.
    pub fn add(&mut self, truth: &[u8], pred: &[u8]) {
        for (&t, &p) in truth.iter().zip(pred) {
            if t == IGNORE_INDEX {
                continue;
            }
            self.counts[t as usize * self.classes + p as usize] += 1;
        }
    }

    /// The counts, row-major (truth × prediction).
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// Adds counts (e.g. another rank's, from [`Confusion::counts`]).
    pub fn add_counts(&mut self, counts: &[u64]) {
        for (a, b) in self.counts.iter_mut().zip(counts) {
            *a += b;
        }
    }

    /// Accuracy and IoU.
    pub fn scores(&self) -> SegmentationScores {
        let k = self.classes;
        let total: u64 = self.counts.iter().sum();
        let correct: u64 = (0..k).map(|i| self.counts[i * k + i]).sum();
        let iou: Vec<Option<f64>> = (0..k)
            .map(|c| {
                let tp = self.counts[c * k + c];
                let truth: u64 = (0..k).map(|p| self.counts[c * k + p]).sum();
                let pred: u64 = (0..k).map(|t| self.counts[t * k + c]).sum();
                let union = truth + pred - tp;
                (union > 0).then(|| tp as f64 / union as f64)
            })
            .collect();
        let present: Vec<f64> = iou.iter().flatten().copied().collect();
        SegmentationScores {
            pixel_accuracy: if total == 0 {
                0.0
            } else {
                correct as f64 / total as f64
            },
            miou: if present.is_empty() {
                0.0
            } else {
                present.iter().sum::<f64>() / present.len() as f64
            },
            iou,
        }
    }
}

/// Per-pixel argmax over classes of `logits` `[b, k, h, w]` (flat, row-major),
/// returned as `[b, h, w]` class indices.
pub fn argmax_classes(logits: &[f32], shape: [usize; 4]) -> Vec<u8> {
    let [b, k, h, w] = shape;
    let plane = h * w;
    let mut out = vec![0u8; b * plane];
    for n in 0..b {
        let base = n * k * plane;
        for p in 0..plane {
            let mut best = (f32::NEG_INFINITY, 0usize);
            for c in 0..k {
                let v = logits[base + c * plane + p];
                if v > best.0 {
                    best = (v, c);
                }
            }
            out[n * plane + p] = best.1 as u8;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_from_a_small_confusion() {
        let mut c = Confusion::new(3);
        let truth = [0, 0, 1, 1, 255, 2];
        let pred = [0, 1, 1, 1, 2, 0];
        c.add(&truth, &pred);
        let s = c.scores();
        assert!((s.pixel_accuracy - 3.0 / 5.0).abs() < 1e-12);
        // class 0: tp 1, truth 2, pred 2 → 1/3; class 1: tp 2, truth 2, pred 3 → 2/3; class 2: tp 0 → 0
        assert_eq!(s.iou, vec![Some(1.0 / 3.0), Some(2.0 / 3.0), Some(0.0)]);
        assert!((s.miou - 1.0 / 3.0).abs() < 1e-12);
        let mut absent = Confusion::new(3);
        absent.add(&[0, 0], &[0, 0]);
        assert_eq!(absent.scores().iou, vec![Some(1.0), None, None]);
        assert_eq!(absent.scores().miou, 1.0);
    }

    #[test]
    fn argmax_picks_the_largest_channel_per_pixel() {
        // b=1, k=2, h=1, w=2
        assert_eq!(
            argmax_classes(&[0.1, 0.9, 0.2, 0.3], [1, 2, 1, 2]),
            vec![1, 0]
        );
    }
}
