//! Applying a trained checkpoint: `predict` writes masks and overlays for a
//! folder of images, `eval` scores a dataset.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, activation};
use serde::Serialize;

use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::config::{IGNORE_INDEX, TrainerConfig};
use crate::data::folder::{FolderError, load_image};
use crate::data::{self, Batch, Dataset, Split};
use crate::instances::{self, PanopticQuality, PanopticScores};
use crate::model::SegNet;
use crate::model::params::{self, LoadError};
use crate::train::metrics::{Confusion, SegmentationScores, argmax_classes};
use crate::train::{TrainError, batch_images, check_dataset};

/// Why inference failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InferError {
    /// The checkpoint could not be read.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The checkpoint does not fit the model its own config describes.
    #[error("checkpoint {path} is inconsistent: {source}")]
    Load {
        /// The checkpoint.
        path: PathBuf,
        /// What is wrong.
        source: LoadError,
    },
    /// An input could not be read.
    #[error(transparent)]
    Input(#[from] FolderError),
    /// The dataset does not fit the model.
    #[error(transparent)]
    Dataset(#[from] TrainError),
    /// An input image has a size the network cannot take.
    #[error("{path} is {w}x{h}; this model needs both sides divisible by {factor}")]
    Size {
        /// The image.
        path: PathBuf,
        /// Width.
        w: usize,
        /// Height.
        h: usize,
        /// Required divisor.
        factor: usize,
    },
    /// An output could not be written.
    #[error("failed to write {path}: {message}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
}

/// A model restored from a checkpoint, ready for inference.
pub struct Predictor {
    /// The config the model was trained with.
    pub config: TrainerConfig,
    model: SegNet,
    device: Device,
}

/// One image's prediction.
pub struct Prediction {
    /// `[h, w]` class indices.
    pub classes: Vec<u8>,
    /// `[h, w]` instance ids, when the model has a boundary head.
    pub instances: Option<Vec<u16>>,
}

impl Predictor {
    /// Wraps a model (on a non-autodiff `device`, e.g. from `Module::valid`).
    pub fn from_model(config: TrainerConfig, model: SegNet, device: Device) -> Self {
        Self {
            config,
            model,
            device,
        }
    }

    /// Loads `path`.
    pub fn load(path: &Path) -> Result<Self, InferError> {
        let checkpoint = Checkpoint::load(path)?;
        let device = Device::flex();
        let model = SegNet::new(&checkpoint.config.model, 0, &device);
        let model =
            params::load_named(model, |n| checkpoint.tensor(n), &device).map_err(|source| {
                InferError::Load {
                    path: path.to_owned(),
                    source,
                }
            })?;
        Ok(Self {
            config: checkpoint.config,
            model,
            device,
        })
    }

    /// Predicts a batch.
    pub fn predict(&self, batch: &Batch) -> Vec<Prediction> {
        let [_, h, w] = batch.image_shape;
        let out = self.model.forward(batch_images(batch, &self.device));
        let dims = out.logits.dims();
        let values = to_vec(out.logits);
        let classes = argmax_classes(&values, dims);
        let boundaries = out.boundary_logits.map(|b| to_vec(activation::sigmoid(b)));
        (0..batch.len)
            .map(|i| {
                let classes = classes[i * h * w..(i + 1) * h * w].to_vec();
                let instances = boundaries.as_ref().map(|b| {
                    let edge: Vec<bool> = b[i * h * w..(i + 1) * h * w]
                        .iter()
                        .map(|&p| p > 0.5)
                        .collect();
                    instances::from_semantics(&classes, &edge, w, IGNORE_INDEX)
                });
                Prediction { classes, instances }
            })
            .collect()
    }
}

fn to_vec(t: Tensor<4>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 after convert")
}

/// Colours of the first classes in overlays (then a hash of the index).
fn colour(class: u8) -> [u8; 3] {
    const PALETTE: [[u8; 3]; 8] = [
        [0, 0, 0],
        [230, 25, 75],
        [60, 180, 75],
        [0, 130, 200],
        [255, 225, 25],
        [145, 30, 180],
        [70, 240, 240],
        [245, 130, 48],
    ];
    PALETTE.get(class as usize).copied().unwrap_or_else(|| {
        let h = (class as u32).wrapping_mul(2654435761);
        [(h >> 24) as u8, (h >> 16) as u8, (h >> 8) as u8]
    })
}

fn save(path: &Path, result: image::ImageResult<()>) -> Result<(), InferError> {
    result.map_err(|e| InferError::Write {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// Writes `<stem>_mask.png` (class indices), `<stem>_overlay.png` (image with
/// class colours) and, with a boundary head, `<stem>_instances.png` (16-bit ids)
/// for every image in `input` (or `input/images`). Returns the files written.
pub fn predict_dir(
    predictor: &Predictor,
    input: &Path,
    out: &Path,
) -> Result<Vec<PathBuf>, InferError> {
    let dir = if input.join("images").is_dir() {
        input.join("images")
    } else {
        input.to_owned()
    };
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|source| FolderError::List {
            path: dir.clone(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        })
        .collect();
    inputs.sort();
    if inputs.is_empty() {
        return Err(FolderError::Empty { path: dir }.into());
    }
    std::fs::create_dir_all(out).map_err(|e| InferError::Write {
        path: out.to_owned(),
        message: e.to_string(),
    })?;
    let channels = predictor.config.model.in_channels;
    let factor = 1usize << predictor.config.model.widths.len();
    let mut written = Vec::new();
    for path in inputs {
        let (image, [h, w]) = load_image(&path, channels)?;
        if h % factor != 0 || w % factor != 0 {
            return Err(InferError::Size { path, w, h, factor });
        }
        let sample = data::Sample {
            image: image.clone(),
            mask: vec![0; h * w],
            instances: None,
        };
        let batch = Batch::collate(&[sample], channels, [h, w]);
        let prediction = predictor
            .predict(&batch)
            .pop()
            .expect("one image in, one out");
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("image");

        let mask_path = out.join(format!("{stem}_mask.png"));
        let mask = image::GrayImage::from_raw(w as u32, h as u32, prediction.classes.clone())
            .expect("buffer matches size");
        save(&mask_path, mask.save(&mask_path))?;

        let overlay_path = out.join(format!("{stem}_overlay.png"));
        let overlay = image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
            let p = y as usize * w + x as usize;
            let rgb: [u8; 3] = std::array::from_fn(|c| image[(c.min(channels - 1)) * h * w + p]);
            let class = prediction.classes[p];
            if class == 0 {
                image::Rgb(rgb)
            } else {
                let col = colour(class);
                image::Rgb(std::array::from_fn(|c| {
                    ((rgb[c] as u16 + col[c] as u16) / 2) as u8
                }))
            }
        });
        save(&overlay_path, overlay.save(&overlay_path))?;
        written.extend([mask_path, overlay_path]);

        if let Some(instances) = prediction.instances {
            let inst_path = out.join(format!("{stem}_instances.png"));
            let img = image::ImageBuffer::<image::Luma<u16>, Vec<u16>>::from_raw(
                w as u32, h as u32, instances,
            )
            .expect("buffer matches size");
            save(&inst_path, img.save(&inst_path))?;
            written.push(inst_path);
        }
    }
    Ok(written)
}

/// What `eval` reports.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Samples scored.
    pub samples: usize,
    /// Semantic scores.
    #[serde(flatten)]
    pub scores: SegmentationScores,
    /// Instance scores, when the model has a boundary head and the data has instances.
    pub panoptic: Option<PanopticScores>,
}

/// Raw validation statistics of some samples, mergeable across ranks.
#[derive(Debug, Clone)]
pub struct EvalCounts {
    /// Samples scored.
    pub samples: usize,
    /// Semantic confusion matrix.
    pub confusion: Confusion,
    /// Instance statistics, when scored.
    pub panoptic: Option<PanopticQuality>,
}

impl EvalCounts {
    /// The scores these statistics give.
    pub fn report(&self) -> EvalReport {
        EvalReport {
            samples: self.samples,
            scores: self.confusion.scores(),
            panoptic: self.panoptic.as_ref().map(|p| p.scores()),
        }
    }

    /// Everything as integers, for exchange between ranks (same length on
    /// every rank of a run).
    pub fn to_words(&self) -> Vec<u64> {
        let mut words = vec![self.samples as u64];
        words.extend_from_slice(self.confusion.counts());
        if let Some(p) = &self.panoptic {
            words.extend(p.to_words());
        }
        words
    }

    /// Adds statistics produced by [`EvalCounts::to_words`].
    pub fn add_words(&mut self, words: &[u64]) {
        let k = self.confusion.counts().len();
        self.samples += words[0] as usize;
        self.confusion.add_counts(&words[1..1 + k]);
        if let Some(p) = self.panoptic.as_mut() {
            p.add_words(&words[1 + k..]);
        }
    }
}

/// Whether instance quality can be scored: the model predicts boundaries and
/// the dataset has instance masks (decided from one sample, identically on
/// every rank).
pub fn scores_instances(
    predictor: &Predictor,
    dataset: &dyn Dataset,
    any_index: Option<usize>,
) -> bool {
    predictor.config.model.boundary_head
        && any_index.is_some_and(|i| dataset.get(i).instances.is_some())
}

/// Accumulates the statistics of `predictor` on `indices` of `dataset`.
pub fn accumulate(
    predictor: &Predictor,
    dataset: &dyn Dataset,
    indices: &[usize],
    batch_size: usize,
    with_instances: bool,
) -> EvalCounts {
    let classes = predictor.config.model.classes;
    let mut counts = EvalCounts {
        samples: indices.len(),
        confusion: Confusion::new(classes),
        panoptic: with_instances.then(|| PanopticQuality::new(classes)),
    };
    let [h, w] = dataset.size();
    for chunk in indices.chunks(batch_size.max(1)) {
        let samples: Vec<_> = chunk.iter().map(|&i| dataset.get(i)).collect();
        let batch = Batch::collate(&samples, dataset.channels(), [h, w]);
        for (pred, sample) in predictor.predict(&batch).into_iter().zip(&samples) {
            counts.confusion.add(&sample.mask, &pred.classes);
            if let (Some(pq), Some(pi), Some(ti)) = (
                counts.panoptic.as_mut(),
                pred.instances.as_ref(),
                sample.instances.as_ref(),
            ) {
                pq.add(&pred.classes, pi, &sample.mask, ti);
            }
        }
    }
    counts
}

/// Scores `predictor` on `indices` of `dataset`.
pub fn evaluate(
    predictor: &Predictor,
    dataset: &dyn Dataset,
    indices: &[usize],
    batch_size: usize,
) -> EvalReport {
    let with_instances = scores_instances(predictor, dataset, indices.first().copied());
    accumulate(predictor, dataset, indices, batch_size, with_instances).report()
}

/// `eval`: scores a checkpoint on an image folder (every sample), or on the
/// validation split of the dataset it was trained on.
pub fn eval_checkpoint(checkpoint: &Path, folder: Option<&Path>) -> Result<EvalReport, InferError> {
    let predictor = Predictor::load(checkpoint)?;
    let mut config = predictor.config.clone();
    let batch_size = config.train.batch_size;
    if let Some(dir) = folder {
        config.data.shapes = None;
        config.data.folder = Some(crate::config::FolderConfig {
            path: dir.to_owned(),
        });
        let dataset = data::open(&config.data, config.model.in_channels, config.model.classes)?;
        check_dataset(&config, dataset.as_ref())?;
        let all: Vec<usize> = (0..dataset.len()).collect();
        return Ok(evaluate(&predictor, dataset.as_ref(), &all, batch_size));
    }
    let dataset = data::open(&config.data, config.model.in_channels, config.model.classes)?;
    check_dataset(&config, dataset.as_ref())?;
    let split = Split::new(
        dataset.len(),
        config.data.validation_fraction,
        config.data.seed,
    );
    let indices = if split.val.is_empty() {
        split.train
    } else {
        split.val
    };
    Ok(evaluate(&predictor, dataset.as_ref(), &indices, batch_size))
}

/// Writes `count` shapes samples as a folder dataset (`images/`, `masks/`),
/// for trying the folder loader, `predict` and `eval`.
pub fn write_shapes(config: &crate::config::ShapesConfig, out: &Path) -> Result<(), InferError> {
    let ds = data::shapes::Shapes::new(config.clone());
    let [h, w] = ds.size();
    for sub in ["images", "masks"] {
        std::fs::create_dir_all(out.join(sub)).map_err(|e| InferError::Write {
            path: out.join(sub),
            message: e.to_string(),
        })?;
    }
    for i in 0..ds.len() {
        let s = ds.get(i);
        let img = image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
            let p = y as usize * w + x as usize;
            image::Rgb(std::array::from_fn(|c| s.image[c * h * w + p]))
        });
        let ip = out.join("images").join(format!("{i:05}.png"));
        save(&ip, img.save(&ip))?;
        let mp = out.join("masks").join(format!("{i:05}.png"));
        let mask =
            image::GrayImage::from_raw(w as u32, h as u32, s.mask).expect("buffer matches size");
        save(&mp, mask.save(&mp))?;
    }
    Ok(())
}
