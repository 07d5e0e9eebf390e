//! The SegNet encoder–decoder.

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::layers::{Conv2d, ConvBnRelu, SqueezeExcitation};
use super::pool::{max_pool2x2, max_pool2x2_values, max_unpool2d, upsample_nearest};
use super::task_weights::TaskWeights;
use crate::config::{DecoderKind, ModelConfig, TaskWeighting};

/// `k` conv → BN → ReLU blocks.
#[derive(Module, Debug)]
pub struct Stage {
    /// The blocks, in order.
    pub convs: Vec<ConvBnRelu>,
}

impl Stage {
    fn forward(&self, mut x: Tensor<4>) -> Tensor<4> {
        for block in &self.convs {
            x = block.forward(x);
        }
        x
    }
}

/// What the network predicts for a batch.
#[derive(Debug, Clone)]
pub struct SegNetOutput {
    /// Class scores `[batch, classes, h, w]`.
    pub logits: Tensor<4>,
    /// Instance-boundary scores `[batch, 1, h, w]`, when the head exists.
    pub boundary_logits: Option<Tensor<4>>,
}

/// SegNet: an encoder of stages, each followed by a 2x2 max-pool that keeps its
/// argmax indices, and a mirrored decoder that upsamples with those indices
/// (or nearest-neighbour), then a 1x1 classification head; optionally a
/// squeeze-excitation block (two linear layers) re-weights the bottleneck's
/// channels.
///
/// Parameter paths equal those of the PyTorch reference model in
/// `bench/torch_segnet.py`, e.g. `encoder.0.convs.1.conv.weight`,
/// `decoder.2.convs.0.bn.running_var`, `head.weight`, `boundary_head.bias`,
/// `se.fc1.weight`; `task_weights.log_vars` is ours alone (the reference
/// model has no loss parameters).
#[derive(Module, Debug)]
pub struct SegNet {
    /// Encoder stages, shallow to deep.
    pub encoder: Vec<Stage>,
    /// Decoder stages, deep to shallow: `decoder[i]` mirrors `encoder[n-1-i]`.
    pub decoder: Vec<Stage>,
    /// 1x1 conv to class scores.
    pub head: Conv2d,
    /// 1x1 conv to instance-boundary scores.
    pub boundary_head: Option<Conv2d>,
    /// Squeeze-excitation between encoder and decoder, when configured.
    pub se: Option<SqueezeExcitation>,
    /// Learned log-variances of the two losses, under
    /// `model.task_weighting: uncertainty`. Used by the loss only.
    pub task_weights: Option<TaskWeights>,
    #[module(skip)]
    decoder_kind: DecoderKind,
}

impl SegNet {
    /// Builds the network with weights drawn from `seed` (PyTorch's default
    /// initialisation scheme, our own generator: the same seed gives the same
    /// network on every machine).
    pub fn new(config: &ModelConfig, seed: u64, device: &Device) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let widths = &config.widths;
        let k = config.convs_per_stage;
        let mut encoder = Vec::with_capacity(widths.len());
        let mut in_ch = config.in_channels;
        for &w in widths {
            let convs = (0..k)
                .map(|j| ConvBnRelu::new(if j == 0 { in_ch } else { w }, w, &mut rng, device))
                .collect();
            encoder.push(Stage { convs });
            in_ch = w;
        }
        let mut decoder = Vec::with_capacity(widths.len());
        for (i, &w) in widths.iter().enumerate().rev() {
            // The last block of a decoder stage narrows to the next (shallower) width.
            let out = if i == 0 { w } else { widths[i - 1] };
            let convs = (0..k)
                .map(|j| ConvBnRelu::new(w, if j + 1 == k { out } else { w }, &mut rng, device))
                .collect();
            decoder.push(Stage { convs });
        }
        let head = Conv2d::new(widths[0], config.classes, 1, true, &mut rng, device);
        let boundary_head = config
            .boundary_head
            .then(|| Conv2d::new(widths[0], 1, 1, true, &mut rng, device));
        // Drawn last, so that turning it on leaves every other weight as it was.
        let se = config
            .squeeze_excitation
            .then(|| SqueezeExcitation::new(*widths.last().expect("validated"), &mut rng, device));
        let task_weights =
            (config.task_weighting == TaskWeighting::Uncertainty).then(|| TaskWeights::new(device));
        Self {
            encoder,
            decoder,
            head,
            boundary_head,
            se,
            task_weights,
            decoder_kind: config.decoder,
        }
    }

    /// How this network's decoder upsamples.
    pub fn decoder_kind(&self) -> DecoderKind {
        self.decoder_kind
    }

    /// # Shapes
    /// - images `[batch, in_channels, h, w]`, with `h` and `w` divisible by 2^stages
    /// - output: see [`SegNetOutput`]
    pub fn forward(&self, images: Tensor<4>) -> SegNetOutput {
        let mut x = images;
        // What each decoder stage needs from its mirrored encoder stage: the
        // pre-pool size, and the argmax indices when unpooling.
        let mut skips: Vec<(Option<Tensor<4, Int>>, [usize; 2])> =
            Vec::with_capacity(self.encoder.len());
        for stage in &self.encoder {
            x = stage.forward(x);
            let [_, _, h, w] = x.dims();
            match self.decoder_kind {
                DecoderKind::Unpool => {
                    let (pooled, indices) = max_pool2x2(x);
                    skips.push((Some(indices), [h, w]));
                    x = pooled;
                }
                DecoderKind::Nearest => {
                    skips.push((None, [h, w]));
                    x = max_pool2x2_values(x);
                }
            }
        }
        if let Some(se) = &self.se {
            x = se.forward(x);
        }
        for stage in &self.decoder {
            let (indices, hw) = skips.pop().expect("one skip per encoder stage");
            x = match indices {
                Some(indices) => max_unpool2d(x, indices, hw),
                None => upsample_nearest(x, hw),
            };
            x = stage.forward(x);
        }
        SegNetOutput {
            logits: self.head.forward(x.clone()),
            boundary_logits: self.boundary_head.as_ref().map(|h| h.forward(x)),
        }
    }
}
