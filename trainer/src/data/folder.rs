//! Images and masks from a directory: `images/<stem>.png|jpg|jpeg` and
//! `masks/<stem>.png` holding class indices (255 = ignore).
//!
//! Everything is decoded and checked when the dataset is opened, so a bad file
//! stops the run before training starts, with its path in the error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{Dataset, Sample};
use crate::config::IGNORE_INDEX;

/// Why a dataset directory cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FolderError {
    /// A directory could not be listed.
    #[error("failed to list {path}: {source}")]
    List {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// No images were found.
    #[error("no images (*.png, *.jpg, *.jpeg) in {path}")]
    Empty {
        /// The images directory.
        path: PathBuf,
    },
    /// An image has no mask with the same stem.
    #[error("image {image} has no mask: expected {expected}")]
    MissingMask {
        /// The image.
        image: PathBuf,
        /// The mask path that does not exist.
        expected: PathBuf,
    },
    /// A file could not be read or decoded.
    #[error("failed to read {path}: {message}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// What the decoder said.
        message: String,
    },
    /// Sizes disagree.
    #[error("{path} is {got_w}x{got_h} but {expect_w}x{expect_h} was expected ({why})")]
    Size {
        /// The file.
        path: PathBuf,
        /// Its width.
        got_w: usize,
        /// Its height.
        got_h: usize,
        /// The expected width.
        expect_w: usize,
        /// The expected height.
        expect_h: usize,
        /// Which size it must match.
        why: &'static str,
    },
    /// A mask holds a class index outside `0..classes` (and not 255).
    #[error(
        "{path} holds class {class} at pixel ({x}, {y}), but model.classes is {classes} (valid: 0..{classes}, or 255 to ignore)"
    )]
    Class {
        /// The mask.
        path: PathBuf,
        /// The offending value.
        class: u8,
        /// Column.
        x: usize,
        /// Row.
        y: usize,
        /// The configured class count.
        classes: usize,
    },
    /// The image channel count is not supported.
    #[error("model.in_channels is {0}; image folders support 1 (grey) or 3 (RGB)")]
    Channels(usize),
}

/// A decoded image folder.
#[derive(Debug)]
pub struct Folder {
    samples: Vec<Sample>,
    stems: Vec<String>,
    channels: usize,
    size: [usize; 2],
}

fn list(dir: &Path, exts: &[&str]) -> Result<BTreeMap<String, PathBuf>, FolderError> {
    let read = std::fs::read_dir(dir).map_err(|source| FolderError::List {
        path: dir.to_owned(),
        source,
    })?;
    let mut out = BTreeMap::new();
    for entry in read {
        let path = entry
            .map_err(|source| FolderError::List {
                path: dir.to_owned(),
                source,
            })?
            .path();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        if let (Some(ext), Some(stem)) = (ext, path.file_stem().and_then(|s| s.to_str()))
            && exts.contains(&ext.as_str())
        {
            out.insert(stem.to_owned(), path);
        }
    }
    Ok(out)
}

fn decode(path: &Path) -> Result<image::DynamicImage, FolderError> {
    image::open(path).map_err(|e| FolderError::Decode {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// Decodes one image to planar `channels` bytes.
pub fn load_image(path: &Path, channels: usize) -> Result<(Vec<u8>, [usize; 2]), FolderError> {
    let img = decode(path)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let planar = match channels {
        1 => img.into_luma8().into_raw(),
        3 => {
            let rgb = img.into_rgb8().into_raw();
            let mut planar = vec![0u8; rgb.len()];
            for (p, px) in rgb.chunks_exact(3).enumerate() {
                for c in 0..3 {
                    planar[c * w * h + p] = px[c];
                }
            }
            planar
        }
        n => return Err(FolderError::Channels(n)),
    };
    Ok((planar, [h, w]))
}

impl Folder {
    /// Lists, decodes and checks `root/images` and `root/masks`.
    pub fn open(root: &Path, channels: usize, classes: usize) -> Result<Self, FolderError> {
        if !matches!(channels, 1 | 3) {
            return Err(FolderError::Channels(channels));
        }
        let images_dir = root.join("images");
        let masks_dir = root.join("masks");
        let images = list(&images_dir, &["png", "jpg", "jpeg"])?;
        if images.is_empty() {
            return Err(FolderError::Empty { path: images_dir });
        }
        let masks = list(&masks_dir, &["png"])?;
        let mut samples = Vec::with_capacity(images.len());
        let mut stems = Vec::with_capacity(images.len());
        let mut size: Option<([usize; 2], PathBuf)> = None;
        for (stem, image_path) in images {
            let mask_path = masks.get(&stem).ok_or_else(|| FolderError::MissingMask {
                image: image_path.clone(),
                expected: masks_dir.join(format!("{stem}.png")),
            })?;
            let (image, [h, w]) = load_image(&image_path, channels)?;
            match &size {
                None => size = Some(([h, w], image_path.clone())),
                Some(([eh, ew], _)) if [*eh, *ew] != [h, w] => {
                    return Err(FolderError::Size {
                        path: image_path,
                        got_w: w,
                        got_h: h,
                        expect_w: *ew,
                        expect_h: *eh,
                        why: "all images of a dataset must have one size",
                    });
                }
                Some(_) => {}
            }
            let mask_img = decode(mask_path)?;
            let (mw, mh) = (mask_img.width() as usize, mask_img.height() as usize);
            if [mh, mw] != [h, w] {
                return Err(FolderError::Size {
                    path: mask_path.clone(),
                    got_w: mw,
                    got_h: mh,
                    expect_w: w,
                    expect_h: h,
                    why: "a mask must match its image",
                });
            }
            let mask = mask_img.into_luma8().into_raw();
            if let Some(p) = mask
                .iter()
                .position(|&m| m != IGNORE_INDEX && m as usize >= classes)
            {
                return Err(FolderError::Class {
                    path: mask_path.clone(),
                    class: mask[p],
                    x: p % w,
                    y: p / w,
                    classes,
                });
            }
            samples.push(Sample {
                image,
                mask,
                instances: None,
            });
            stems.push(stem);
        }
        let size = size.expect("at least one image").0;
        Ok(Self {
            samples,
            stems,
            channels,
            size,
        })
    }

    /// File stem of sample `index`.
    pub fn stem(&self, index: usize) -> &str {
        &self.stems[index]
    }
}

impl Dataset for Folder {
    fn len(&self) -> usize {
        self.samples.len()
    }
    fn channels(&self) -> usize {
        self.channels
    }
    fn size(&self) -> [usize; 2] {
        self.size
    }
    fn get(&self, index: usize) -> Sample {
        self.samples[index].clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, Luma, Rgb, RgbImage};

    fn write_pair(root: &Path, stem: &str, size: (u32, u32), mask_size: (u32, u32), class: u8) {
        std::fs::create_dir_all(root.join("images")).unwrap();
        std::fs::create_dir_all(root.join("masks")).unwrap();
        RgbImage::from_pixel(size.0, size.1, Rgb([10, 20, 30]))
            .save(root.join(format!("images/{stem}.png")))
            .unwrap();
        GrayImage::from_pixel(mask_size.0, mask_size.1, Luma([class]))
            .save(root.join(format!("masks/{stem}.png")))
            .unwrap();
    }

    #[test]
    fn loads_pairs_planar_and_in_stem_order() {
        let dir = tempfile::tempdir().unwrap();
        write_pair(dir.path(), "b", (8, 4), (8, 4), 1);
        write_pair(dir.path(), "a", (8, 4), (8, 4), 255);
        let f = Folder::open(dir.path(), 3, 2).unwrap();
        assert_eq!(f.len(), 2);
        assert_eq!(f.size(), [4, 8]);
        assert_eq!(f.stem(0), "a");
        let s = f.get(0);
        assert_eq!(&s.image[..2], &[10, 10]);
        assert_eq!(s.image[32], 20, "second plane is green");
        assert!(s.mask.iter().all(|&m| m == 255));
    }

    #[test]
    fn bad_folders_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        write_pair(dir.path(), "a", (8, 8), (8, 8), 7);
        let e = Folder::open(dir.path(), 3, 4).unwrap_err().to_string();
        assert!(e.contains("a.png") && e.contains("class 7"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        write_pair(dir.path(), "a", (8, 8), (4, 8), 0);
        let e = Folder::open(dir.path(), 3, 4).unwrap_err().to_string();
        assert!(
            e.contains("masks/a.png") && e.contains("must match its image"),
            "{e}"
        );

        let dir = tempfile::tempdir().unwrap();
        write_pair(dir.path(), "a", (8, 8), (8, 8), 0);
        write_pair(dir.path(), "b", (16, 8), (16, 8), 0);
        let e = Folder::open(dir.path(), 3, 4).unwrap_err().to_string();
        assert!(e.contains("images/b.png") && e.contains("one size"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        write_pair(dir.path(), "a", (8, 8), (8, 8), 0);
        std::fs::remove_file(dir.path().join("masks/a.png")).unwrap();
        let e = Folder::open(dir.path(), 3, 4).unwrap_err().to_string();
        assert!(e.contains("has no mask"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        write_pair(dir.path(), "a", (8, 8), (8, 8), 0);
        std::fs::write(dir.path().join("images/a.png"), b"not a png").unwrap();
        let e = Folder::open(dir.path(), 3, 4).unwrap_err().to_string();
        assert!(e.contains("images/a.png"), "{e}");

        let e = Folder::open(&dir.path().join("nope"), 3, 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("failed to list"), "{e}");
    }
}
