//! Instances from semantics: connected components of each class once the
//! predicted instance boundaries are removed, and panoptic quality (PQ) to
//! score them against ground-truth instance masks.

use std::collections::{HashMap, VecDeque};

use crate::data::neighbours4;

/// Splits a class map into instances. Pixels of class 0 (background) or
/// `ignore` belong to no instance. Non-boundary pixels of one class that touch
/// (4-connectivity) form an instance; boundary pixels then join the nearest
/// instance of their class (breadth-first), so instances cover their objects.
/// Returns `[h, w]` instance ids, 0 for none.
pub fn from_semantics(classes: &[u8], boundary: &[bool], width: usize, ignore: u8) -> Vec<u16> {
    let n = classes.len();
    let height = n / width;
    let mut ids = vec![0u16; n];
    let mut next = 0u16;
    let mut queue = VecDeque::new();
    let neighbours = |p: usize| neighbours4(p, width, height);
    let object = |p: usize| classes[p] != 0 && classes[p] != ignore;
    // Labels every pixel reachable from `start` through pixels of its class
    // that `admit` accepts with the next instance id.
    let mut flood = |ids: &mut Vec<u16>, start: usize, admit: &dyn Fn(usize) -> bool| {
        next = next.saturating_add(1);
        ids[start] = next;
        queue.push_back(start);
        while let Some(p) = queue.pop_front() {
            for q in neighbours(p) {
                if ids[q] == 0 && admit(q) && classes[q] == classes[p] {
                    ids[q] = next;
                    queue.push_back(q);
                }
            }
        }
    };
    for start in 0..n {
        if ids[start] == 0 && object(start) && !boundary[start] {
            flood(&mut ids, start, &|q| !boundary[q]);
        }
    }
    // Grow instances into the boundary pixels of their own class.
    let mut frontier: VecDeque<usize> = (0..n).filter(|&p| ids[p] != 0).collect();
    while let Some(p) = frontier.pop_front() {
        for q in neighbours(p) {
            if ids[q] == 0 && object(q) && classes[q] == classes[p] {
                ids[q] = ids[p];
                frontier.push_back(q);
            }
        }
    }
    // Boundary-only blobs (no interior) become instances of their own.
    for start in 0..n {
        if ids[start] == 0 && object(start) {
            flood(&mut ids, start, &|_| true);
        }
    }
    ids
}

/// A segment of one image: (class, instance id).
type Segment = (u8, u16);

/// Accumulates panoptic-quality statistics over images.
#[derive(Debug, Clone)]
pub struct PanopticQuality {
    /// Per class: (sum of matched IoU, TP, FP, FN).
    per_class: Vec<(f64, u64, u64, u64)>,
}

/// Panoptic quality and its factors.
pub use crate::run_dir::PanopticScores;

impl PanopticQuality {
    /// Statistics for `classes` classes (class 0 is background and not scored).
    pub fn new(classes: usize) -> Self {
        Self {
            per_class: vec![(0.0, 0, 0, 0); classes],
        }
    }

    /// Adds one image: predicted and true class maps and instance ids.
    pub fn add(
        &mut self,
        pred_class: &[u8],
        pred_inst: &[u16],
        true_class: &[u8],
        true_inst: &[u16],
    ) {
        let mut pred_area: HashMap<Segment, u64> = HashMap::new();
        let mut true_area: HashMap<Segment, u64> = HashMap::new();
        let mut inter: HashMap<(Segment, Segment), u64> = HashMap::new();
        for p in 0..pred_class.len() {
            let ps = (pred_inst[p] != 0).then_some((pred_class[p], pred_inst[p]));
            let ts = (true_inst[p] != 0).then_some((true_class[p], true_inst[p]));
            if let Some(ps) = ps {
                *pred_area.entry(ps).or_default() += 1;
            }
            if let Some(ts) = ts {
                *true_area.entry(ts).or_default() += 1;
            }
            if let (Some(ps), Some(ts)) = (ps, ts)
                && ps.0 == ts.0
            {
                *inter.entry((ps, ts)).or_default() += 1;
            }
        }
        let mut matched_pred = std::collections::HashSet::new();
        let mut matched_true = std::collections::HashSet::new();
        for (&(ps, ts), &i) in &inter {
            let union = pred_area[&ps] + true_area[&ts] - i;
            let iou = i as f64 / union as f64;
            // IoU > 0.5 makes a match unique (the PQ paper's theorem).
            if iou > 0.5 {
                let c = &mut self.per_class[ps.0 as usize];
                c.0 += iou;
                c.1 += 1;
                matched_pred.insert(ps);
                matched_true.insert(ts);
            }
        }
        for ps in pred_area.keys().filter(|s| !matched_pred.contains(*s)) {
            if let Some(c) = self.per_class.get_mut(ps.0 as usize) {
                c.2 += 1;
            }
        }
        for ts in true_area.keys().filter(|s| !matched_true.contains(*s)) {
            if let Some(c) = self.per_class.get_mut(ts.0 as usize) {
                c.3 += 1;
            }
        }
    }

    /// The statistics as integers (IoU sums as f64 bits), for exchange
    /// between ranks: per class `iou_bits, tp, fp, fn`.
    pub fn to_words(&self) -> Vec<u64> {
        self.per_class
            .iter()
            .flat_map(|&(iou, tp, fp, fn_)| [iou.to_bits(), tp, fp, fn_])
            .collect()
    }

    /// Adds statistics produced by [`PanopticQuality::to_words`].
    pub fn add_words(&mut self, words: &[u64]) {
        for (c, w) in self.per_class.iter_mut().zip(words.chunks_exact(4)) {
            *c = (
                c.0 + f64::from_bits(w[0]),
                c.1 + w[1],
                c.2 + w[2],
                c.3 + w[3],
            );
        }
    }

    /// PQ, SQ and RQ averaged over the object classes seen.
    pub fn scores(&self) -> PanopticScores {
        let mut sums = (0.0, 0.0, 0.0, 0usize);
        for &(iou, tp, fp, fn_) in self.per_class.iter().skip(1) {
            if tp + fp + fn_ == 0 {
                continue;
            }
            let sq = if tp > 0 { iou / tp as f64 } else { 0.0 };
            let rq = tp as f64 / (tp as f64 + 0.5 * fp as f64 + 0.5 * fn_ as f64);
            sums = (sums.0 + sq * rq, sums.1 + sq, sums.2 + rq, sums.3 + 1);
        }
        let n = sums.3.max(1) as f64;
        PanopticScores {
            pq: sums.0 / n,
            sq: sums.1 / n,
            rq: sums.2 / n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries_split_touching_objects_of_one_class() {
        // Two class-1 squares side by side, separated by a boundary column.
        #[rustfmt::skip]
        let classes = [
            1, 1, 1, 1, 1,
            1, 1, 1, 1, 1,
        ];
        let boundary = [
            false, false, true, false, false, false, false, true, false, false,
        ];
        let ids = from_semantics(&classes, &boundary, 5, 255);
        assert_eq!(ids[0], ids[6]);
        assert_ne!(ids[0], ids[4]);
        assert!(
            ids.iter().all(|&i| i != 0),
            "boundary pixels join an instance"
        );
        let none = from_semantics(&classes, &[false; 10], 5, 255);
        assert!(none.iter().all(|&i| i == none[0]));
    }

    #[test]
    fn perfect_prediction_has_pq_one_and_a_missed_object_lowers_rq() {
        let classes = [0, 1, 1, 0, 2, 2];
        let inst = [0, 1, 1, 0, 2, 2];
        let mut pq = PanopticQuality::new(3);
        pq.add(&classes, &inst, &classes, &inst);
        assert_eq!(
            pq.scores(),
            PanopticScores {
                pq: 1.0,
                sq: 1.0,
                rq: 1.0
            }
        );
        let mut miss = PanopticQuality::new(3);
        miss.add(&[0, 1, 1, 0, 0, 0], &[0, 1, 1, 0, 0, 0], &classes, &inst);
        // class 1: perfect; class 2: one FN → RQ 0, PQ 0 → mean PQ 0.5
        assert_eq!(miss.scores().pq, 0.5);
    }
}
