//! Synthetic shapes: textured, noisy backgrounds with overlapping circles,
//! rectangles and triangles, a class mask and an instance mask.
//!
//! Every sample is a pure function of `(seed, index)`, computed with integer
//! arithmetic only and a portable generator (ChaCha8), so the same seed gives
//! byte-identical samples on every machine and nothing has to be stored.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{Dataset, Sample};
use crate::config::ShapesConfig;

/// Classes of the shapes dataset: background and three shape kinds.
pub const CLASSES: usize = crate::config::SHAPES_CLASSES;

/// The synthetic dataset.
#[derive(Debug, Clone)]
pub struct Shapes {
    config: ShapesConfig,
}

impl Shapes {
    /// A dataset of `config.samples` samples.
    pub fn new(config: ShapesConfig) -> Self {
        Self { config }
    }
}

/// A shape to draw, in pixel coordinates.
enum Shape {
    Circle { cx: i64, cy: i64, r: i64 },
    Rect { x0: i64, y0: i64, x1: i64, y1: i64 },
    Triangle { v: [(i64, i64); 3] },
}

impl Shape {
    fn class(&self) -> u8 {
        match self {
            Shape::Circle { .. } => 1,
            Shape::Rect { .. } => 2,
            Shape::Triangle { .. } => 3,
        }
    }

    fn contains(&self, x: i64, y: i64) -> bool {
        match *self {
            Shape::Circle { cx, cy, r } => (x - cx).pow(2) + (y - cy).pow(2) <= r * r,
            Shape::Rect { x0, y0, x1, y1 } => x >= x0 && x <= x1 && y >= y0 && y <= y1,
            Shape::Triangle { v } => {
                // Same sign of all three edge functions (either winding).
                let edge = |(ax, ay): (i64, i64), (bx, by): (i64, i64)| {
                    (bx - ax) * (y - ay) - (by - ay) * (x - ax)
                };
                let e = [edge(v[0], v[1]), edge(v[1], v[2]), edge(v[2], v[0])];
                e.iter().all(|&d| d >= 0) || e.iter().all(|&d| d <= 0)
            }
        }
    }
}

fn random_shape(rng: &mut ChaCha8Rng, size: i64) -> Shape {
    let r_min = (size / 10).max(2);
    let r_max = (size / 4).max(r_min + 1);
    let r = rng.random_range(r_min..=r_max);
    let cx = rng.random_range(0..size);
    let cy = rng.random_range(0..size);
    match rng.random_range(0..3u8) {
        0 => Shape::Circle { cx, cy, r },
        1 => {
            let hw = rng.random_range(r / 2..=r);
            let hh = rng.random_range(r / 2..=r);
            Shape::Rect {
                x0: cx - hw,
                y0: cy - hh,
                x1: cx + hw,
                y1: cy + hh,
            }
        }
        _ => {
            // A roughly upright triangle with jittered corners.
            let j = (r / 3).max(1);
            let mut jitter = || rng.random_range(-j..=j);
            let v = [
                (cx + jitter(), cy - r + jitter()),
                (cx - r + jitter(), cy + r + jitter()),
                (cx + r + jitter(), cy + r + jitter()),
            ];
            Shape::Triangle { v }
        }
    }
}

fn clamp_u8(v: i64) -> u8 {
    v.clamp(0, 255) as u8
}

impl Dataset for Shapes {
    fn len(&self) -> usize {
        self.config.samples
    }

    fn channels(&self) -> usize {
        3
    }

    fn size(&self) -> [usize; 2] {
        [self.config.image_size; 2]
    }

    fn get(&self, index: usize) -> Sample {
        let size = self.config.image_size;
        let s = size as i64;
        let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed);
        rng.set_stream(index as u64);

        // Background: a random base colour, a linear ramp and per-pixel noise.
        let base: [i64; 3] = std::array::from_fn(|_| rng.random_range(30..=225));
        let ramp: [(i64, i64); 3] =
            std::array::from_fn(|_| (rng.random_range(-40..=40), rng.random_range(-40..=40)));
        let mut image = vec![0u8; 3 * size * size];
        for c in 0..3 {
            let (gx, gy) = ramp[c];
            for y in 0..s {
                for x in 0..s {
                    let v = base[c] + (gx * x + gy * y) / s + rng.random_range(-24..=24);
                    image[c * size * size + (y * s + x) as usize] = clamp_u8(v);
                }
            }
        }

        let mut mask = vec![0u8; size * size];
        let mut instances = vec![0u16; size * size];
        let count = rng.random_range(1..=self.config.max_shapes);
        for id in 1..=count {
            let shape = random_shape(&mut rng, s);
            let colour: [i64; 3] = std::array::from_fn(|_| rng.random_range(0..=255));
            let class = shape.class();
            for y in 0..s {
                for x in 0..s {
                    // Noise is drawn for every pixel so the stream does not depend on coverage.
                    let n = rng.random_range(-12..=12);
                    if shape.contains(x, y) {
                        let p = (y * s + x) as usize;
                        for (c, &col) in colour.iter().enumerate() {
                            image[c * size * size + p] = clamp_u8(col + n);
                        }
                        mask[p] = class;
                        instances[p] = id as u16;
                    }
                }
            }
        }
        if self.config.sensor_noise > 0.0 {
            let normal =
                rand_distr::Normal::new(0.0, self.config.sensor_noise).expect("a finite σ");
            for v in image.iter_mut() {
                let n: f64 = rand_distr::Distribution::sample(&normal, &mut rng);
                *v = clamp_u8(*v as i64 + n.round() as i64);
            }
        }
        if self.config.invert {
            image.iter_mut().for_each(|v| *v = 255 - *v);
        }
        Sample {
            image,
            mask,
            instances: Some(instances),
        }
    }
}

/// Writes `count` shapes samples as a folder dataset (`images/`, `masks/`),
/// for trying the folder loader, `predict` and `eval`.
pub fn write_folder(config: &ShapesConfig, out: &std::path::Path) -> Result<(), image::ImageError> {
    let ds = Shapes::new(config.clone());
    let [h, w] = ds.size();
    for sub in ["images", "masks"] {
        std::fs::create_dir_all(out.join(sub))?;
    }
    for i in 0..ds.len() {
        let s = ds.get(i);
        let img = image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
            let p = y as usize * w + x as usize;
            image::Rgb(std::array::from_fn(|c| s.image[c * h * w + p]))
        });
        let ip = out.join("images").join(format!("{i:05}.png"));
        img.save(&ip)?;
        let mp = out.join("masks").join(format!("{i:05}.png"));
        let mask =
            image::GrayImage::from_raw(w as u32, h as u32, s.mask).expect("buffer matches size");
        mask.save(&mp)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes(seed: u64) -> Shapes {
        Shapes::new(ShapesConfig {
            samples: 16,
            image_size: 32,
            max_shapes: 4,
            seed,
            invert: false,
            sensor_noise: 0.0,
        })
    }

    #[test]
    fn inverted_samples_are_negatives_of_the_same_scenes() {
        let plain = shapes(3).get(5);
        let negative = Shapes::new(ShapesConfig {
            invert: true,
            ..shapes(3).config
        })
        .get(5);
        assert_eq!(negative.mask, plain.mask);
        assert!(
            negative
                .image
                .iter()
                .zip(&plain.image)
                .all(|(n, p)| *n == 255 - *p)
        );
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_bytes() {
        let a = shapes(3).get(5);
        let b = shapes(3).get(5);
        assert_eq!(a.image, b.image);
        assert_eq!(a.mask, b.mask);
        assert_ne!(shapes(4).get(5).image, a.image);
        assert_ne!(shapes(3).get(6).image, a.image);
    }

    /// Pins the generator: a change here changes every dataset users have
    /// trained on, so it must be deliberate.
    #[test]
    fn generator_output_is_pinned() {
        let s = shapes(7).get(0);
        let digest = |bytes: &[u8]| {
            bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| {
                (h ^ b as u64).wrapping_mul(0x100000001b3)
            })
        };
        let got = (digest(&s.image), digest(&s.mask));
        assert_eq!(got, PINNED, "shapes generator output changed");
    }
    const PINNED: (u64, u64) = (9424663375160005261, 4924800605194738481);

    #[test]
    fn masks_cover_every_class_over_a_few_samples() {
        let ds = shapes(11);
        let mut seen = [false; CLASSES];
        for i in 0..ds.len() {
            let s = ds.get(i);
            for &m in &s.mask {
                seen[m as usize] = true;
            }
            let inst = s.instances.unwrap();
            for (m, i) in s.mask.iter().zip(&inst) {
                assert_eq!(
                    *m == 0,
                    *i == 0,
                    "instance ids exactly cover the foreground"
                );
            }
        }
        assert_eq!(seen, [true; CLASSES]);
    }
}
