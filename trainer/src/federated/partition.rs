//! Splitting the training samples across clients, deterministically by seed.
//!
//! A sample's class, for the non-IID splits, is the most frequent object
//! class in its mask (background when it has none): segmentation samples hold
//! several classes, and the dominant one is what skews a client's data.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};

use crate::config::{FederatedConfig, IGNORE_INDEX, Partition};
use crate::data::Dataset;

/// Why a split is impossible.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PartitionError {
    /// Fewer samples than clients, or a draw left a client empty.
    #[error("federated.partition: {0}")]
    Empty(String),
}

/// The dominant object class of a mask (0 when only background or ignored).
pub fn dominant_class(mask: &[u8], classes: usize) -> usize {
    let mut counts = vec![0usize; classes];
    for &c in mask {
        if c != IGNORE_INDEX && (c as usize) < classes {
            counts[c as usize] += 1;
        }
    }
    (1..classes)
        .filter(|&k| counts[k] > 0)
        .max_by_key(|&k| (counts[k], std::cmp::Reverse(k)))
        .unwrap_or(0)
}

/// The dominant class of every sample in `indices`.
pub fn labels_of(dataset: &dyn Dataset, indices: &[usize], classes: usize) -> Vec<usize> {
    indices
        .iter()
        .map(|&i| dominant_class(&dataset.get(i).mask, classes))
        .collect()
}

/// Every client's share of the training split `train` of `dataset`, as every
/// client computes it from the shared config (the data stays where it is;
/// only indices are decided by the seed); `None` for `own`, where each client
/// brings its own data.
pub fn client_parts(
    fed: &FederatedConfig,
    dataset: &dyn Dataset,
    train: &[usize],
    classes: usize,
) -> Result<Option<Vec<Vec<usize>>>, PartitionError> {
    if matches!(fed.partition, Partition::Own) {
        return Ok(None);
    }
    let labels = labels_of(dataset, train, classes);
    split(&fed.partition, train, &labels, fed.clients, classes).map(Some)
}

/// Splits `indices` (with their `labels`) into `clients` disjoint parts whose
/// union is `indices`. `Partition::Own` keeps everything for every client.
pub fn split(
    partition: &Partition,
    indices: &[usize],
    labels: &[usize],
    clients: usize,
    classes: usize,
) -> Result<Vec<Vec<usize>>, PartitionError> {
    assert_eq!(indices.len(), labels.len());
    if indices.len() < clients && !matches!(partition, Partition::Own) {
        return Err(PartitionError::Empty(format!(
            "{} training samples cannot be split across {clients} clients; use more samples or fewer clients",
            indices.len()
        )));
    }
    let parts = match partition {
        Partition::Own => vec![indices.to_vec(); clients],
        Partition::Iid { seed } => {
            let mut order = indices.to_vec();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(*seed));
            (0..clients)
                .map(|c| order.iter().skip(c).step_by(clients).copied().collect())
                .collect()
        }
        Partition::Dirichlet { alpha, seed } => {
            dirichlet(indices, labels, clients, classes, *alpha, *seed)?
        }
        Partition::Classes {
            classes_per_client,
            seed,
        } => by_classes(
            indices,
            labels,
            clients,
            classes,
            *classes_per_client,
            *seed,
        ),
    };
    if let Some(c) = parts.iter().position(Vec::is_empty) {
        return Err(PartitionError::Empty(format!(
            "client {c} gets no samples; raise alpha or classes_per_client, or use fewer clients"
        )));
    }
    Ok(parts)
}

fn by_class(indices: &[usize], labels: &[usize], classes: usize) -> Vec<Vec<usize>> {
    let mut by = vec![Vec::new(); classes];
    for (&i, &k) in indices.iter().zip(labels) {
        by[k].push(i);
    }
    by
}

/// Per class, proportions over clients from Dirichlet(α) (normalised Gamma
/// draws), as Flower Datasets' DirichletPartitioner does; redrawn (a bounded
/// number of times) until no client is empty.
fn dirichlet(
    indices: &[usize],
    labels: &[usize],
    clients: usize,
    classes: usize,
    alpha: f64,
    seed: u64,
) -> Result<Vec<Vec<usize>>, PartitionError> {
    let gamma = Gamma::new(alpha, 1.0).map_err(|e| PartitionError::Empty(e.to_string()))?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let by = by_class(indices, labels, classes);
    for _ in 0..100 {
        let mut parts = vec![Vec::new(); clients];
        for members in &by {
            let mut members = members.clone();
            members.shuffle(&mut rng);
            let draws: Vec<f64> = (0..clients)
                .map(|_| gamma.sample(&mut rng).max(1e-300))
                .collect();
            let total: f64 = draws.iter().sum();
            let mut start = 0usize;
            let mut cumulative = 0.0;
            for (c, d) in draws.iter().enumerate() {
                cumulative += d / total;
                let end = if c + 1 == clients {
                    members.len()
                } else {
                    ((cumulative * members.len() as f64).round() as usize).min(members.len())
                };
                parts[c].extend_from_slice(&members[start..end.max(start)]);
                start = end.max(start);
            }
        }
        if parts.iter().all(|p| !p.is_empty()) {
            for p in &mut parts {
                p.sort_unstable();
            }
            return Ok(parts);
        }
    }
    Err(PartitionError::Empty(format!(
        "100 Dirichlet(alpha = {alpha}) draws all left a client without samples; raise alpha or use fewer clients"
    )))
}

/// Client c holds `per_client` classes, assigned round-robin from a seeded
/// class order; each class's samples are dealt evenly among its holders.
fn by_classes(
    indices: &[usize],
    labels: &[usize],
    clients: usize,
    classes: usize,
    per_client: usize,
    seed: u64,
) -> Vec<Vec<usize>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..classes).collect();
    order.shuffle(&mut rng);
    let offset = rng.random_range(0..classes);
    let holders: Vec<Vec<usize>> = (0..classes)
        .map(|k| {
            (0..clients)
                .filter(|&c| {
                    (0..per_client).any(|j| order[(c * per_client + j + offset) % classes] == k)
                })
                .collect()
        })
        .collect();
    let mut parts = vec![Vec::new(); clients];
    for (k, mut members) in by_class(indices, labels, classes).into_iter().enumerate() {
        members.shuffle(&mut rng);
        let who = &holders[k];
        // A class nobody was dealt is dropped rather than leaked to a client
        // that should not see it.
        if who.is_empty() {
            continue;
        }
        for (j, i) in members.into_iter().enumerate() {
            parts[who[j % who.len()]].push(i);
        }
    }
    for p in &mut parts {
        p.sort_unstable();
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy(n: usize, classes: usize) -> (Vec<usize>, Vec<usize>) {
        let indices: Vec<usize> = (0..n).map(|i| i * 3 + 1).collect();
        let labels = (0..n).map(|i| (i * 7) % classes).collect();
        (indices, labels)
    }

    fn assert_disjoint_cover(parts: &[Vec<usize>], indices: &[usize]) {
        let mut all: Vec<usize> = parts.iter().flatten().copied().collect();
        all.sort_unstable();
        let mut want = indices.to_vec();
        want.sort_unstable();
        assert_eq!(all, want);
    }

    #[test]
    fn iid_and_dirichlet_are_disjoint_covers_and_deterministic() {
        let (indices, labels) = toy(1000, 4);
        for p in [
            Partition::Iid { seed: 3 },
            Partition::Dirichlet {
                alpha: 0.5,
                seed: 3,
            },
        ] {
            let parts = split(&p, &indices, &labels, 5, 4).unwrap();
            assert_eq!(parts.len(), 5);
            assert_disjoint_cover(&parts, &indices);
            assert_eq!(parts, split(&p, &indices, &labels, 5, 4).unwrap(), "{p:?}");
        }
    }

    #[test]
    fn small_alpha_skews_class_mixes_and_large_alpha_does_not() {
        let (indices, labels) = toy(4000, 4);
        let skew = |alpha: f64| {
            let parts = split(
                &Partition::Dirichlet { alpha, seed: 1 },
                &indices,
                &labels,
                5,
                4,
            )
            .unwrap();
            // Mean over clients of the largest class share.
            parts
                .iter()
                .map(|p| {
                    let mut counts = [0usize; 4];
                    for i in p {
                        counts[labels[indices.iter().position(|x| x == i).unwrap()]] += 1;
                    }
                    *counts.iter().max().unwrap() as f64 / p.len() as f64
                })
                .sum::<f64>()
                / 5.0
        };
        let (skewed, even) = (skew(0.1), skew(100.0));
        assert!(skewed > 0.6, "alpha 0.1: {skewed}");
        assert!(even < 0.35, "alpha 100: {even}");
    }

    #[test]
    fn class_subsets_hold_only_their_classes() {
        let (indices, labels) = toy(400, 4);
        let parts = split(
            &Partition::Classes {
                classes_per_client: 2,
                seed: 9,
            },
            &indices,
            &labels,
            4,
            4,
        )
        .unwrap();
        for p in &parts {
            let mut seen: Vec<usize> = p
                .iter()
                .map(|i| labels[indices.iter().position(|x| x == i).unwrap()])
                .collect();
            seen.sort_unstable();
            seen.dedup();
            assert!(seen.len() <= 2, "{seen:?}");
        }
        assert_disjoint_cover(&parts, &indices);
    }

    #[test]
    fn too_few_samples_is_an_error_naming_the_fix() {
        let (indices, labels) = toy(3, 4);
        let e = split(&Partition::Iid { seed: 0 }, &indices, &labels, 5, 4).unwrap_err();
        assert!(e.to_string().contains("fewer clients"), "{e}");
    }

    #[test]
    fn dominant_class_ignores_background_and_ignored_pixels() {
        assert_eq!(
            dominant_class(
                &[0, 0, 0, 2, 2, 1, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],
                4
            ),
            2
        );
        assert_eq!(dominant_class(&[0, 0, IGNORE_INDEX], 4), 0);
    }
}
