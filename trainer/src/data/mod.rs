//! Samples, datasets, splits, sharding, batching and augmentation.
//!
//! See [`Dataset`] for the sample sources ([`shapes::Shapes`],
//! [`folder::Folder`]), [`Split`] for the train/validation split, [`Sampler`]
//! for the deterministic, resumable, rank-sharded order of training samples and
//! [`Batch`] for what the model consumes.

pub mod folder;
pub mod shapes;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use burn::tensor::{Device, Tensor, TensorData};

use crate::config::{DataConfig, ModelConfig, NoiseConfig};

/// One image with its labels. Pixels are stored planar (`[c][y][x]`), 8 bits.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// `[channels, h, w]` intensities.
    pub image: Vec<u8>,
    /// `[h, w]` class indices; [`crate::config::IGNORE_INDEX`] marks ignored pixels.
    pub mask: Vec<u8>,
    /// `[h, w]` instance ids (0 = no instance), where the source has them.
    pub instances: Option<Vec<u16>>,
}

/// A source of samples, all of one size.
pub trait Dataset: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;
    /// Whether the dataset is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Image channels.
    fn channels(&self) -> usize;
    /// `[height, width]` of every sample.
    fn size(&self) -> [usize; 2];
    /// Sample `index` (< `len`).
    fn get(&self, index: usize) -> Sample;
}

/// Opens the dataset a config names.
pub fn open(
    config: &DataConfig,
    in_channels: usize,
    classes: usize,
) -> Result<Box<dyn Dataset>, folder::FolderError> {
    match (&config.shapes, &config.folder) {
        (Some(s), _) => Ok(Box::new(shapes::Shapes::new(s.clone()))),
        (None, Some(f)) => Ok(Box::new(folder::Folder::open(
            &f.path,
            in_channels,
            classes,
        )?)),
        (None, None) => unreachable!("validated: exactly one data source"),
    }
}

/// A seeded split of `0..n` into training and validation indices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// Training sample indices.
    pub train: Vec<usize>,
    /// Validation sample indices, ascending.
    pub val: Vec<usize>,
}

impl Split {
    /// Holds out `round(n * validation_fraction)` samples (at least one when the
    /// fraction is positive and `n > 1`), chosen by `seed`.
    pub fn new(n: usize, validation_fraction: f64, seed: u64) -> Self {
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        let n_val = crate::config::validation_count(n, validation_fraction);
        let mut val = order[..n_val].to_vec();
        val.sort_unstable();
        Self {
            train: order[n_val..].to_vec(),
            val,
        }
    }
}

/// The order in which training samples are consumed: the training indices,
/// reshuffled every epoch by `(seed, epoch)`, concatenated epoch after epoch.
///
/// Data-parallel ranks draw disjoint slices of one global stream: at step `s`
/// with per-rank batch `b`, rank `r` of `w` takes global positions
/// `s·b·w + r·b .. s·b·w + (r+1)·b`. The union over ranks is exactly the batch
/// of one process with batch `b·w`, which is what makes N-worker training equal
/// one-worker training with an N-times batch. A position is all the state there
/// is, so resuming is exact.
#[derive(Debug, Clone)]
pub struct Sampler {
    train: Vec<usize>,
    seed: u64,
    cached_epoch: Option<(u64, Vec<usize>)>,
}

impl Sampler {
    /// A sampler over `train` indices.
    pub fn new(train: Vec<usize>, seed: u64) -> Self {
        assert!(
            !train.is_empty(),
            "a sampler needs at least one training sample"
        );
        Self {
            train,
            seed,
            cached_epoch: None,
        }
    }

    /// The sample index at global stream position `pos`.
    pub fn at(&mut self, pos: u64) -> usize {
        let n = self.train.len() as u64;
        let (epoch, offset) = (pos / n, (pos % n) as usize);
        if self.cached_epoch.as_ref().map(|(e, _)| *e) != Some(epoch) {
            let mut order = self.train.clone();
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
            rng.set_stream(epoch + 1);
            order.shuffle(&mut rng);
            self.cached_epoch = Some((epoch, order));
        }
        self.cached_epoch.as_ref().expect("filled above").1[offset]
    }

    /// The sample indices rank `rank` of `world` trains on at `step`.
    pub fn batch_indices(
        &mut self,
        step: u64,
        batch_size: usize,
        rank: usize,
        world: usize,
    ) -> Vec<usize> {
        let b = batch_size as u64;
        let start = step * b * world as u64 + rank as u64 * b;
        (start..start + b).map(|p| self.at(p)).collect()
    }
}

/// A batch in the layout the model consumes, still on the host.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Batch size.
    pub len: usize,
    /// `[channels, h, w]` of one image.
    pub image_shape: [usize; 3],
    /// `[len, c, h, w]` intensities in 0..1.
    pub images: Vec<f32>,
    /// `[len, h, w]` class indices (255 = ignore).
    pub masks: Vec<u8>,
    /// `[len, h, w]` instance-boundary targets (0/1), where instances are known.
    pub boundaries: Option<Vec<f32>>,
}

impl Batch {
    /// Stacks samples, normalising intensities to 0..1.
    pub fn collate(samples: &[Sample], channels: usize, size: [usize; 2]) -> Self {
        let [h, w] = size;
        let mut images = Vec::with_capacity(samples.len() * channels * h * w);
        let mut masks = Vec::with_capacity(samples.len() * h * w);
        let with_instances = samples.iter().all(|s| s.instances.is_some());
        let mut boundaries = with_instances.then(|| Vec::with_capacity(samples.len() * h * w));
        for s in samples {
            images.extend(s.image.iter().map(|&v| v as f32 / 255.0));
            masks.extend_from_slice(&s.mask);
            if let (Some(out), Some(inst)) = (boundaries.as_mut(), s.instances.as_ref()) {
                out.extend(instance_boundaries(inst, w).into_iter().map(f32::from));
            }
        }
        Self {
            len: samples.len(),
            image_shape: [channels, h, w],
            images,
            masks,
            boundaries,
        }
    }

    /// Adds Gaussian noise to each image with probability `noise.probability`
    /// (training with noise). Returns how many images got noise.
    pub fn add_noise(&mut self, noise: &NoiseConfig, rng: &mut impl Rng) -> usize {
        let per_image = self.image_shape.iter().product::<usize>();
        let normal =
            Normal::new(0.0f32, noise.sigma as f32).expect("validated: sigma is finite and >= 0");
        let mut noisy = 0;
        for image in self.images.chunks_mut(per_image) {
            if rng.random_bool(noise.probability) {
                noisy += 1;
                for v in image {
                    *v += normal.sample(rng);
                }
            }
        }
        noisy
    }

    /// Adds Gaussian noise of σ = `sigma` to every pixel of every image, the
    /// noise of image `i` drawn from (`seed`, `samples[i]`): scoring under
    /// sensor noise gives the same number however the samples are batched or
    /// sharded.
    pub fn add_sensor_noise(&mut self, sigma: f64, seed: u64, samples: &[usize]) {
        assert_eq!(samples.len(), self.len, "one sample index per image");
        if sigma == 0.0 {
            return;
        }
        let per_image = self.image_shape.iter().product::<usize>();
        let normal =
            Normal::new(0.0f32, sigma as f32).expect("validated: sigma is finite and >= 0");
        for (image, &sample) in self.images.chunks_mut(per_image).zip(samples) {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(sample as u64);
            for v in image {
                *v += normal.sample(&mut rng);
            }
        }
    }
}

/// The 4-neighbours of pixel `p` in a `width × height` image.
pub fn neighbours4(p: usize, width: usize, height: usize) -> impl Iterator<Item = usize> {
    let (x, y) = (p % width, p / width);
    [
        (x > 0).then(|| p - 1),
        (x + 1 < width).then(|| p + 1),
        (y > 0).then(|| p - width),
        (y + 1 < height).then(|| p + width),
    ]
    .into_iter()
    .flatten()
}

/// Boundary map of an instance mask: a foreground pixel is a boundary pixel
/// when a 4-neighbour belongs to another instance (or to the background).
pub fn instance_boundaries(instances: &[u16], width: usize) -> Vec<u8> {
    let height = instances.len() / width;
    (0..instances.len())
        .map(|p| {
            let id = instances[p];
            u8::from(id != 0 && neighbours4(p, width, height).any(|q| instances[q] != id))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_a_seeded_partition() {
        let s = Split::new(100, 0.1, 3);
        assert_eq!(s.val.len(), 10);
        assert_eq!(s.train.len(), 90);
        let mut all: Vec<usize> = s.train.iter().chain(&s.val).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        assert_eq!(s, Split::new(100, 0.1, 3));
        assert_ne!(s, Split::new(100, 0.1, 4));
        assert_eq!(
            Split::new(5, 0.01, 1).val.len(),
            1,
            "a positive fraction holds out at least one"
        );
        assert!(Split::new(5, 0.0, 1).val.is_empty());
    }

    #[test]
    fn epochs_are_permutations_reshuffled_each_epoch() {
        let mut s = Sampler::new((10..20).collect(), 9);
        let e0: Vec<usize> = (0..10).map(|p| s.at(p)).collect();
        let e1: Vec<usize> = (10..20).map(|p| s.at(p)).collect();
        let mut sorted = e0.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (10..20).collect::<Vec<_>>());
        assert_ne!(e0, e1);
    }

    #[test]
    fn ranks_take_disjoint_slices_whose_union_is_the_big_batch() {
        let mut s = Sampler::new((0..50).collect(), 2);
        for step in 0..7 {
            let big = s.batch_indices(step, 8, 0, 1);
            let r0 = s.batch_indices(step, 4, 0, 2);
            let r1 = s.batch_indices(step, 4, 1, 2);
            assert_eq!([r0, r1].concat(), big);
        }
    }

    #[test]
    fn boundaries_mark_instance_edges() {
        #[rustfmt::skip]
        let inst = [
            0, 0, 0, 0,
            0, 1, 1, 0,
            0, 1, 1, 2,
            0, 0, 2, 2,
        ];
        #[rustfmt::skip]
        let expect = [
            0, 0, 0, 0,
            0, 1, 1, 0,
            0, 1, 1, 1,
            0, 0, 1, 0,
        ];
        assert_eq!(instance_boundaries(&inst, 4), expect);
        let solid = [3u16; 9];
        assert_eq!(
            instance_boundaries(&solid, 3),
            [0u8; 9],
            "an image-filling instance has no edge"
        );
    }
}

/// A dataset whose images the model cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("dataset does not fit the model: {0}")]
pub struct DatasetMismatch(pub String);

/// Checks that a dataset's images fit the model: channels and a size divisible
/// by 2^stages.
pub fn check_fits(model: &ModelConfig, dataset: &dyn Dataset) -> Result<(), DatasetMismatch> {
    if dataset.channels() != model.in_channels {
        return Err(DatasetMismatch(format!(
            "images have {} channels but model.in_channels is {}",
            dataset.channels(),
            model.in_channels
        )));
    }
    let factor = 1usize << model.widths.len();
    let [h, w] = dataset.size();
    if h % factor != 0 || w % factor != 0 {
        return Err(DatasetMismatch(format!(
            "images are {w}x{h}, but {} encoder stages need both sides divisible by {factor}; resize the images or change model.widths",
            model.widths.len()
        )));
    }
    Ok(())
}

impl Batch {
    /// The batch's images as one `[batch, channels, h, w]` tensor on `device`.
    pub fn images_tensor(&self, device: &Device) -> Tensor<4> {
        let [c, h, w] = self.image_shape;
        Tensor::from_data(
            TensorData::new(self.images.clone(), [self.len, c, h, w]),
            device,
        )
    }
}
