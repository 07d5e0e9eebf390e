//! Applying a trained checkpoint: a [`Predictor`], and `predict`, which
//! writes masks and overlays for a folder of images. Scoring lives in
//! [`crate::eval`].

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, activation};

use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::config::{IGNORE_INDEX, TrainerConfig};
use crate::data::folder::{FolderError, load_image};
use crate::data::{self, Batch};
use crate::eval::instances;
use crate::eval::metrics::argmax_classes;
use crate::model::params::{self, LoadError};
use crate::model::{SegNet, noise};

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
    Dataset(#[from] data::DatasetMismatch),
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

    /// This predictor with its weights under multiplicative Gaussian noise of
    /// σ = `sigma`, one draw from `seed` (one noisy device).
    pub fn with_weight_noise(&self, sigma: f64, seed: u64) -> Self {
        Self {
            config: self.config.clone(),
            model: noise::perturb_weights(self.model.clone(), sigma, seed, 0),
            device: self.device.clone(),
        }
    }

    /// Predicts a batch.
    pub fn predict(&self, batch: &Batch) -> Vec<Prediction> {
        let [_, h, w] = batch.image_shape;
        let out = self.model.forward(batch.images_tensor(&self.device));
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
