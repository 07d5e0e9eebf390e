//! Using a model: predictions, evaluation, adapters, datasets, devices.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use trainyard_trainer::config::{EvalNoise, ShapesConfig, TrainerConfig};
use trainyard_trainer::{infer, train};

use super::config_or_defaults;

/// The model a base checkpoint belongs to: `--config FILE` (a trainer
/// config) and/or `--set model.widths=[...]` overrides.
#[derive(clap::Args)]
pub(crate) struct ModelArgs {
    /// Trainer config whose `model` section describes the base.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a config key, e.g. --set 'model.widths=[4, 8]' (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
}

impl ModelArgs {
    fn load(&self) -> anyhow::Result<TrainerConfig> {
        config_or_defaults(self.config.as_deref(), &self.overrides)
    }
}

#[derive(Subcommand)]
pub(crate) enum AdapterCommand {
    /// Write a new adapter for a base: B zero (the adapted model equals the
    /// base), or seeded random B with --random-b (for interoperability checks).
    Init {
        /// Base weights: our checkpoint, or safetensors with our parameter names.
        #[arg(long)]
        base: PathBuf,
        /// The adapter's adapter_config.json (PEFT's LoraConfig fields).
        #[arg(long)]
        peft_config: PathBuf,
        /// Adapter directory to write.
        #[arg(long)]
        out: PathBuf,
        /// Fill B with seeded uniform values instead of zeros.
        #[arg(long)]
        random_b: Option<u64>,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Logits of the base (with an adapter, if given) on the tensor `x` of a
    /// safetensors file, in evaluation mode, written as `logits`.
    Logits {
        /// Base weights.
        #[arg(long)]
        base: PathBuf,
        /// Adapter directory (ours or PEFT's save_pretrained output).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// safetensors file with `x` of shape [batch, channels, h, w].
        #[arg(long)]
        input: PathBuf,
        /// safetensors file to write.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Fold an adapter into its base and write a full checkpoint (usable by
    /// `eval`, `predict` and as a base).
    Merge {
        /// Base weights.
        #[arg(long)]
        base: PathBuf,
        /// Adapter directory.
        #[arg(long)]
        adapter: PathBuf,
        /// Checkpoint file to write.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        model: ModelArgs,
    },
}

pub(crate) fn run_adapter(action: AdapterCommand) -> anyhow::Result<()> {
    use burn::tensor::{Device, Tensor, TensorData};
    use trainyard_trainer::peft::{adapter, base, config::LoraConfig, lora};
    use trainyard_trainer::tensorfile::{self, NamedTensor};
    let device = Device::flex();
    match action {
        AdapterCommand::Init {
            base: b,
            peft_config,
            out,
            random_b,
            model,
        } => {
            let config = model.load()?;
            let text = std::fs::read_to_string(&peft_config)
                .with_context(|| format!("failed to read {}", peft_config.display()))?;
            let lora_config: LoraConfig = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a PEFT LoRA config", peft_config.display()))?;
            let net = base::load_base(&b, &config, &device)?;
            let mut net = lora::attach(net, &lora_config, config.train.seed, &device)?;
            if let Some(seed) = random_b {
                net = lora::randomize_b(net, seed, &device);
            }
            let bytes = adapter::save(&out, &mut net, &lora_config)?;
            let (trainable, all) = lora::parameter_counts(&net);
            tracing::info!(out = %out.display(), bytes, adapter_parameters = trainable, parameters = all, "adapter written");
            Ok(())
        }
        AdapterCommand::Logits {
            base: b,
            adapter: a,
            input,
            out,
            model,
        } => {
            let config = model.load()?;
            let mut net = base::load_base(&b, &config, &device)?;
            if let Some(dir) = a {
                net = adapter::load(&dir, net, &device)?.0;
            }
            let file = tensorfile::read(&input)?;
            let x = file
                .tensors
                .get("x")
                .with_context(|| format!("{} has no tensor `x`", input.display()))?;
            let dims: [usize; 4] = x
                .shape
                .clone()
                .try_into()
                .map_err(|_| anyhow::anyhow!("`x` must be [batch, channels, h, w]"))?;
            let xt = Tensor::<4>::from_data(TensorData::new(x.values.clone(), dims), &device);
            let logits = net.forward(xt).logits;
            let shape = logits.dims().to_vec();
            let values = logits
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("f32");
            tensorfile::write_atomic(
                &out,
                &[("logits".into(), NamedTensor { shape, values })],
                Default::default(),
            )?;
            Ok(())
        }
        AdapterCommand::Merge {
            base: b,
            adapter: a,
            out,
            model,
        } => {
            let config = model.load()?;
            let net = base::load_base(&b, &config, &device)?;
            let (net, _) = adapter::load(&a, net, &device)?;
            let merged = lora::merge(net);
            let ck = trainyard_trainer::checkpoint::Checkpoint {
                step: 0,
                data_position: 0,
                model: train::model_tensors(&merged),
                optimizer: "none".into(),
                optimizer_step: 0,
                optimizer_state: Vec::new(),
                config,
            };
            ck.save(&out)?;
            tracing::info!(out = %out.display(), "merged checkpoint written");
            Ok(())
        }
    }
}

#[derive(clap::Args)]
pub(crate) struct AdapterArgs {
    #[command(subcommand)]
    action: AdapterCommand,
}

impl AdapterArgs {
    pub(crate) fn run(self) -> anyhow::Result<()> {
        let Self { action } = self;
        run_adapter(action)
    }
}

#[derive(clap::Args)]
pub(crate) struct PredictArgs {
    /// A checkpoint written by `train` (checkpoints/step-*.safetensors).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Directory of images (*.png, *.jpg), or a dataset with an images/ folder.
    #[arg(long)]
    input: PathBuf,
    /// Directory for <stem>_mask.png, <stem>_overlay.png, <stem>_instances.png.
    #[arg(long)]
    out: PathBuf,
}

impl PredictArgs {
    pub(crate) fn run(self) -> anyhow::Result<()> {
        let Self {
            checkpoint,
            input,
            out,
        } = self;
        let predictor = infer::Predictor::load(&checkpoint)?;
        let written = infer::predict_dir(&predictor, &input, &out)?;
        tracing::info!(files = written.len(), out = %out.display(), "predictions written");
        Ok(())
    }
}

#[derive(clap::Args)]
pub(crate) struct EvalArgs {
    /// A checkpoint written by `train`.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Score every sample of this image folder (images/, masks/) instead of
    /// the validation split of the dataset the checkpoint was trained on.
    #[arg(long)]
    data: Option<PathBuf>,
    /// σ of Gaussian noise added to every input pixel, in normalised
    /// intensity (0..1): the sensor noise a deployment has.
    #[arg(
        long,
        value_name = "SIGMA",
        default_value_t = 0.0,
        value_parser = non_negative,
        allow_negative_numbers = true
    )]
    input_noise: f64,
    /// σ of multiplicative Gaussian noise on the conv and linear weights: the
    /// noise of low-precision or analog hardware (one draw per evaluation).
    #[arg(
        long,
        value_name = "SIGMA",
        default_value_t = 0.0,
        value_parser = non_negative,
        allow_negative_numbers = true
    )]
    weight_noise: f64,
    /// Seed of both noises: the same seed gives the same scores.
    #[arg(long, default_value_t = 0)]
    noise_seed: u64,
}

impl EvalArgs {
    pub(crate) fn run(self) -> anyhow::Result<()> {
        let Self {
            checkpoint,
            data,
            input_noise,
            weight_noise,
            noise_seed,
        } = self;
        let noise = EvalNoise {
            input_sigma: input_noise,
            weight_sigma: weight_noise,
            seed: noise_seed,
        };
        let report =
            trainyard_trainer::eval::eval_checkpoint(&checkpoint, data.as_deref(), Some(&noise))?;
        println!("{}", serde_json::to_string(&report)?);
        Ok(())
    }
}

fn non_negative(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(format!("must be a non-negative number, got {s}")),
    }
}

#[derive(clap::Args)]
pub(crate) struct ShapesArgs {
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Number of samples.
    #[arg(long, default_value_t = 16)]
    samples: usize,
    /// Image side in pixels.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Generator seed.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

impl ShapesArgs {
    pub(crate) fn run(self) -> anyhow::Result<()> {
        let Self {
            out,
            samples,
            size,
            seed,
        } = self;
        let config = ShapesConfig {
            samples,
            image_size: size,
            seed,
            ..ShapesConfig::default()
        };
        if samples == 0 || size < 8 {
            anyhow::bail!("--samples must be at least 1 and --size at least 8");
        }
        trainyard_trainer::data::shapes::write_folder(&config, &out)
            .with_context(|| format!("failed to write the shapes dataset to {}", out.display()))?;
        tracing::info!(samples, out = %out.display(), "shapes dataset written");
        Ok(())
    }
}

/// `devices`: what this machine offers the trainer, as one JSON line.
pub(crate) fn devices() -> anyhow::Result<()> {
    println!(
        "{}",
        serde_json::to_string(&trainyard_trainer::device::report())?
    );
    Ok(())
}
