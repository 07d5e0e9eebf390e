//! Combining client updates: weighted mean (FedAvg), coordinate-wise median,
//! trimmed mean and Krum / Multi-Krum, on flat f32 vectors.
//!
//! Each rule works coordinate block by coordinate block on all cores (rayon),
//! reading every update once per block, so aggregation is bound by memory
//! bandwidth rather than by temporaries (numpy's `Σ n_i·w_i` allocates one
//! scaled copy per client).

use rayon::prelude::*;

use crate::config::Aggregation;

/// Coordinates per parallel block: big enough to amortise scheduling, small
/// enough that a block of every update stays in cache.
const BLOCK: usize = 16 * 1024;

/// Why updates cannot be aggregated.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AggregateError {
    /// No updates, or updates of different lengths.
    #[error("cannot aggregate: {0}")]
    Shape(String),
    /// Too few updates for the rule.
    #[error("{rule} needs at least {needed} updates, got {got}")]
    TooFew {
        /// The rule.
        rule: &'static str,
        /// Updates it needs.
        needed: usize,
        /// Updates given.
        got: usize,
    },
}

/// Aggregates `updates` (each a flat vector of equal length) under `rule`;
/// `weights` (examples per client) matter for the mean and Multi-Krum's mean.
/// Returns the aggregate and the indices of the updates it used.
pub fn aggregate(
    rule: &Aggregation,
    updates: &[&[f32]],
    weights: &[f64],
) -> Result<(Vec<f32>, Vec<usize>), AggregateError> {
    let n = updates.len();
    if n == 0 || weights.len() != n {
        return Err(AggregateError::Shape(format!(
            "{n} updates with {} weights",
            weights.len()
        )));
    }
    let len = updates[0].len();
    if let Some(i) = updates.iter().position(|u| u.len() != len) {
        return Err(AggregateError::Shape(format!(
            "update {i} has {} values, update 0 has {len}",
            updates[i].len()
        )));
    }
    let all: Vec<usize> = (0..n).collect();
    Ok(match rule {
        Aggregation::Mean => (weighted_mean(updates, weights)?, all),
        Aggregation::Median => (coordinatewise(updates, median), all),
        Aggregation::TrimmedMean { beta } => {
            let cut = (beta * n as f64) as usize;
            if 2 * cut >= n {
                return Err(AggregateError::TooFew {
                    rule: "trimmed mean",
                    needed: 2 * cut + 1,
                    got: n,
                });
            }
            (coordinatewise(updates, |v| trimmed_mean(v, cut)), all)
        }
        Aggregation::Krum { byzantine, keep } => {
            let chosen = krum(updates, *byzantine, *keep)?;
            let picked: Vec<&[f32]> = chosen.iter().map(|&i| updates[i]).collect();
            let w: Vec<f64> = chosen.iter().map(|&i| weights[i]).collect();
            let agg = if picked.len() == 1 {
                picked[0].to_vec()
            } else {
                weighted_mean(&picked, &w)?
            };
            (agg, chosen)
        }
    })
}

/// `Σ w_i·u_i / Σ w_i`, accumulated in f64 per coordinate.
pub fn weighted_mean(updates: &[&[f32]], weights: &[f64]) -> Result<Vec<f32>, AggregateError> {
    let total: f64 = weights.iter().sum();
    if total.is_nan() || total <= 0.0 || weights.iter().any(|w| !(w.is_finite() && *w >= 0.0)) {
        return Err(AggregateError::Shape(format!(
            "weights must be non-negative with a positive sum, got {weights:?}"
        )));
    }
    let scale: Vec<f64> = weights.iter().map(|w| w / total).collect();
    let len = updates[0].len();
    let mut out = vec![0f32; len];
    out.par_chunks_mut(BLOCK)
        .enumerate()
        .for_each(|(b, chunk)| {
            let (start, n) = (b * BLOCK, chunk.len());
            let mut acc = vec![0f64; n];
            // Four updates per pass over the accumulator: a quarter of the
            // accumulator traffic, so the loop runs at memory speed.
            let mut pairs = updates.iter().zip(&scale);
            loop {
                let group: Vec<(&[f32], f64)> = pairs
                    .by_ref()
                    .take(4)
                    .map(|(u, &s)| (&u[start..start + n], s))
                    .collect();
                match group.as_slice() {
                    [] => break,
                    [(a, sa), (b, sb), (c, sc), (d, sd)] => {
                        for ((((acc, &a), &b), &c), &d) in
                            acc.iter_mut().zip(*a).zip(*b).zip(*c).zip(*d)
                        {
                            *acc += sa * a as f64 + sb * b as f64 + sc * c as f64 + sd * d as f64;
                        }
                    }
                    rest => {
                        for (u, s) in rest {
                            for (acc, &x) in acc.iter_mut().zip(*u) {
                                *acc += s * x as f64;
                            }
                        }
                    }
                }
            }
            for (o, a) in chunk.iter_mut().zip(acc) {
                *o = a as f32;
            }
        });
    Ok(out)
}

/// Applies `f` to the n values of every coordinate.
fn coordinatewise(updates: &[&[f32]], f: impl Fn(&mut [f32]) -> f32 + Sync) -> Vec<f32> {
    let len = updates[0].len();
    let n = updates.len();
    let mut out = vec![0f32; len];
    out.par_chunks_mut(BLOCK)
        .enumerate()
        .for_each(|(b, chunk)| {
            let start = b * BLOCK;
            let mut column = vec![0f32; n];
            for (j, o) in chunk.iter_mut().enumerate() {
                for (c, u) in column.iter_mut().zip(updates) {
                    *c = u[start + j];
                }
                *o = f(&mut column);
            }
        });
    out
}

/// The median (mean of the two middle values for even n), as numpy's.
fn median(v: &mut [f32]) -> f32 {
    let n = v.len();
    let mid = n / 2;
    let m = *v.select_nth_unstable_by(mid, f32::total_cmp).1;
    if n % 2 == 1 {
        m
    } else {
        // The lower middle is the largest value below `mid`.
        let lower = v[..mid].iter().copied().fold(f32::NEG_INFINITY, f32::max);
        ((lower as f64 + m as f64) / 2.0) as f32
    }
}

/// Mean after dropping the `cut` smallest and `cut` largest values.
fn trimmed_mean(v: &mut [f32], cut: usize) -> f32 {
    v.sort_unstable_by(f32::total_cmp);
    let kept = &v[cut..v.len() - cut];
    (kept.iter().map(|&x| x as f64).sum::<f64>() / kept.len() as f64) as f32
}

/// Krum's choice: the `keep` updates with the smallest sum of squared
/// distances to their n − f − 2 nearest neighbours (Blanchard et al. 2017).
pub fn krum(
    updates: &[&[f32]],
    byzantine: usize,
    keep: usize,
) -> Result<Vec<usize>, AggregateError> {
    let n = updates.len();
    if n < byzantine + 3 || keep == 0 || keep > n {
        return Err(AggregateError::TooFew {
            rule: "Krum",
            needed: (byzantine + 3).max(keep),
            got: n,
        });
    }
    let pairs: Vec<(usize, usize)> = (0..n)
        .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
        .collect();
    let d2: Vec<f64> = pairs
        .par_iter()
        .map(|&(i, j)| {
            updates[i]
                .iter()
                .zip(updates[j])
                .map(|(&a, &b)| {
                    let d = a as f64 - b as f64;
                    d * d
                })
                .sum()
        })
        .collect();
    let mut dist = vec![vec![0f64; n]; n];
    for (&(i, j), &d) in pairs.iter().zip(&d2) {
        dist[i][j] = d;
        dist[j][i] = d;
    }
    let neighbours = n - byzantine - 2;
    let mut scores: Vec<(f64, usize)> = (0..n)
        .map(|i| {
            let mut others: Vec<f64> = (0..n).filter(|&j| j != i).map(|j| dist[i][j]).collect();
            others.sort_unstable_by(f64::total_cmp);
            (others[..neighbours].iter().sum(), i)
        })
        .collect();
    scores.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    Ok(scores[..keep].iter().map(|&(_, i)| i).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(v: &[Vec<f32>]) -> Vec<&[f32]> {
        v.iter().map(Vec::as_slice).collect()
    }

    /// Plain per-coordinate references, written the obvious way.
    fn reference(rule: &Aggregation, u: &[Vec<f32>], w: &[f64]) -> Vec<f32> {
        let len = u[0].len();
        (0..len)
            .map(|j| {
                let mut col: Vec<f64> = u.iter().map(|x| x[j] as f64).collect();
                match rule {
                    Aggregation::Mean => {
                        (u.iter().zip(w).map(|(x, w)| x[j] as f64 * w).sum::<f64>()
                            / w.iter().sum::<f64>()) as f32
                    }
                    Aggregation::Median => {
                        col.sort_by(f64::total_cmp);
                        let n = col.len();
                        (if n % 2 == 1 {
                            col[n / 2]
                        } else {
                            (col[n / 2 - 1] + col[n / 2]) / 2.0
                        }) as f32
                    }
                    Aggregation::TrimmedMean { beta } => {
                        col.sort_by(f64::total_cmp);
                        let k = (beta * col.len() as f64) as usize;
                        let kept = &col[k..col.len() - k];
                        (kept.iter().sum::<f64>() / kept.len() as f64) as f32
                    }
                    Aggregation::Krum { .. } => unreachable!(),
                }
            })
            .collect()
    }

    fn inputs(n: usize, len: usize) -> (Vec<Vec<f32>>, Vec<f64>) {
        let u = (0..n)
            .map(|i| {
                (0..len)
                    .map(|j| (((i * 31 + j * 17) % 23) as f32 - 11.0) * 0.25)
                    .collect()
            })
            .collect();
        let w = (0..n).map(|i| (i + 1) as f64 * 10.0).collect();
        (u, w)
    }

    #[test]
    fn mean_median_and_trimmed_mean_equal_plain_references() {
        for n in [1, 2, 5, 6] {
            // Crosses a block boundary.
            let (u, w) = inputs(n, BLOCK + 37);
            for rule in [
                Aggregation::Mean,
                Aggregation::Median,
                Aggregation::TrimmedMean { beta: 0.2 },
            ] {
                let (got, used) = aggregate(&rule, &refs(&u), &w).unwrap();
                let want = reference(&rule, &u, &w);
                assert_eq!(used.len(), n);
                for (j, (g, r)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - r).abs() <= 1e-6 * r.abs().max(1.0),
                        "{rule:?} n={n} [{j}]: {g} vs {r}"
                    );
                }
            }
        }
    }

    #[test]
    fn fedavg_on_fixed_inputs() {
        let u = vec![vec![1.0, 2.0], vec![3.0, 6.0]];
        let (got, _) = aggregate(&Aggregation::Mean, &refs(&u), &[1.0, 3.0]).unwrap();
        assert_eq!(got, vec![2.5, 5.0]);
    }

    #[test]
    fn krum_picks_the_honest_cluster_and_ignores_outliers() {
        // Four honest updates near 1.0, two attackers far away.
        let mut u: Vec<Vec<f32>> = (0..4).map(|i| vec![1.0 + i as f32 * 0.01; 8]).collect();
        u.push(vec![100.0; 8]);
        u.push(vec![-50.0; 8]);
        let w = vec![1.0; 6];
        let (one, used) = aggregate(
            &Aggregation::Krum {
                byzantine: 2,
                keep: 1,
            },
            &refs(&u),
            &w,
        )
        .unwrap();
        assert!(
            used[0] < 4 && (one[0] - 1.0).abs() < 0.05,
            "{used:?} {one:?}"
        );
        let (multi, used) = aggregate(
            &Aggregation::Krum {
                byzantine: 2,
                keep: 3,
            },
            &refs(&u),
            &w,
        )
        .unwrap();
        assert!(used.iter().all(|&i| i < 4), "{used:?}");
        assert!((multi[0] - 1.0).abs() < 0.05);
        // The plain mean is dragged away by the attackers; the median is not.
        let (mean, _) = aggregate(&Aggregation::Mean, &refs(&u), &w).unwrap();
        let (median, _) = aggregate(&Aggregation::Median, &refs(&u), &w).unwrap();
        assert!(mean[0] > 5.0);
        assert!((median[0] - 1.0).abs() < 0.05);
    }

    #[test]
    fn krum_scores_match_a_hand_computation() {
        // 1-D points 0, 1, 3, 10 with f = 1: each scores its n − f − 2 = 1
        // nearest squared distance: 1, 1, 4, 49 → Krum picks index 0 (tie
        // broken by index), Multi-Krum(2) picks 0 and 1.
        let u = vec![vec![0.0], vec![1.0], vec![3.0], vec![10.0]];
        assert_eq!(krum(&refs(&u), 1, 1).unwrap(), vec![0]);
        assert_eq!(krum(&refs(&u), 1, 2).unwrap(), vec![0, 1]);
    }

    #[test]
    fn mismatched_or_too_few_updates_are_errors() {
        let u = vec![vec![1.0, 2.0], vec![1.0]];
        assert!(aggregate(&Aggregation::Mean, &refs(&u), &[1.0, 1.0]).is_err());
        let u = vec![vec![1.0]; 3];
        assert!(matches!(
            aggregate(
                &Aggregation::Krum {
                    byzantine: 1,
                    keep: 1
                },
                &refs(&u),
                &[1.0; 3]
            ),
            Err(AggregateError::TooFew { .. })
        ));
    }
}
