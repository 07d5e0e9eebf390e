//! Defaults of the spec. Where the trainer has the same knob, its default is
//! the one source of truth, so a manifest and a trainer config file that omit
//! a field train the same way.

use trainyard_trainer::config as tc;

use super::spec::*;

pub(crate) fn lora_rank() -> u32 {
    u32::try_from(tc::PeftConfig::default().r).expect("the default rank is small")
}

pub(crate) fn lora_alpha() -> f64 {
    tc::PeftConfig::default().lora_alpha
}

pub(crate) fn lora_targets() -> Vec<String> {
    tc::PeftConfig::default().target_modules
}

pub(crate) fn one() -> u32 {
    1
}

/// Steps when neither `training.steps` nor `training.epochs` is given.
pub(crate) fn steps() -> u64 {
    tc::TrainConfig::default().steps
}

fn count(x: usize) -> u32 {
    u32::try_from(x).expect("trainer defaults are small")
}

impl Default for ModelSpec {
    fn default() -> Self {
        let m = tc::ModelConfig::default();
        Self {
            architecture: Architecture::SegNet,
            widths: m.widths.into_iter().map(count).collect(),
            convs_per_stage: count(m.convs_per_stage),
            decoder: match m.decoder {
                tc::DecoderKind::Unpool => Decoder::Unpool,
                tc::DecoderKind::Nearest => Decoder::Nearest,
            },
            classes: count(m.classes),
            in_channels: count(m.in_channels),
            boundary_head: m.boundary_head,
            boundary_loss_weight: m.boundary_loss_weight,
            task_weighting: match m.task_weighting {
                tc::TaskWeighting::Fixed => TaskWeighting::Fixed,
                tc::TaskWeighting::Uncertainty => TaskWeighting::Uncertainty,
            },
            squeeze_excitation: m.squeeze_excitation,
        }
    }
}

impl Default for DataSpec {
    fn default() -> Self {
        let d = tc::DataConfig::default();
        Self {
            shapes: Some(ShapesData::default()),
            folder: None,
            validation_fraction: d.validation_fraction,
            seed: d.seed,
            noise: None,
        }
    }
}

impl Default for ShapesData {
    fn default() -> Self {
        let s = tc::ShapesConfig::default();
        Self {
            samples: s.samples as u64,
            image_size: count(s.image_size),
            max_shapes: count(s.max_shapes),
            seed: s.seed,
            invert: s.invert,
            sensor_noise: s.sensor_noise,
        }
    }
}

impl Default for NoiseSpec {
    fn default() -> Self {
        let n = tc::NoiseConfig::default();
        Self {
            sigma: n.sigma,
            probability: n.probability,
        }
    }
}

impl Default for TrainingSpec {
    fn default() -> Self {
        let t = tc::TrainConfig::default();
        Self {
            steps: None,
            epochs: None,
            batch_size: count(t.batch_size),
            optimizer: OptimizerSpec::default(),
            schedule: ScheduleSpec::default(),
            seed: t.seed,
            grad_clip_norm: t.grad_clip_norm.unwrap_or(0.0),
            class_weights: None,
            validate_every: t.validate_every,
            log_every: t.log_every,
            threads: None,
            device: super::ComputeDevice::Auto,
            weight_noise: None,
            validation_noise: None,
        }
    }
}

impl Default for EvalNoiseSpec {
    fn default() -> Self {
        let n = tc::EvalNoise::default();
        Self {
            input_sigma: n.input_sigma,
            weight_sigma: n.weight_sigma,
            seed: n.seed,
        }
    }
}

impl Default for OptimizerSpec {
    fn default() -> Self {
        Self {
            kind: OptimizerKind::AdamW,
            lr: tc::TrainConfig::default().lr,
            weight_decay: None,
            momentum: None,
            nesterov: None,
            beta1: None,
            beta2: None,
            eps: None,
        }
    }
}

impl Default for ScheduleSpec {
    fn default() -> Self {
        Self {
            warmup_steps: tc::TrainConfig::default().warmup_steps,
            decay: Decay::Cosine,
            final_factor: tc::CosineDecay::default().final_factor,
            step_every: None,
            gamma: None,
        }
    }
}

impl Default for DistributedSpec {
    fn default() -> Self {
        let t = tc::TrainConfig::default();
        Self {
            workers: 1,
            gpus_per_worker: 0,
            backend: CollectiveBackend::Auto,
            accumulate_steps: t.accumulate_steps,
            local_sgd: None,
            compression: CompressionSpec::default(),
            bucket_mib: t.bucket_mib,
            port: trainyard_trainer::env::DEFAULT_MASTER_PORT,
            join_timeout_seconds: trainyard_trainer::env::DEFAULT_JOIN_TIMEOUT_SECONDS,
            collective_timeout_seconds: trainyard_trainer::env::DEFAULT_COLLECTIVE_TIMEOUT_SECONDS,
        }
    }
}

impl Default for OuterOptimizerSpec {
    fn default() -> Self {
        let o = tc::OuterConfig::default();
        Self {
            lr: o.lr,
            momentum: o.momentum,
            nesterov: o.nesterov,
        }
    }
}

impl Default for CompressionSpec {
    fn default() -> Self {
        Self {
            kind: CompressionKind::None,
            ratio: None,
        }
    }
}

impl Default for FederatedSpec {
    fn default() -> Self {
        let f = tc::FederatedConfig::default();
        Self {
            clients: f.clients as u32,
            min_clients: f.min_clients as u32,
            rounds: f.rounds,
            port: 29600,
            local_steps: f.local_steps,
            fraction: f.fraction,
            min_available: None,
            sampling_timeout_seconds: f.sampling_timeout_seconds,
            round_timeout_seconds: f.round_timeout_seconds,
            round_attempts: f.round_attempts,
            aggregation: AggregationSpec::default(),
            server_optimizer: ServerOptimizerSpec::default(),
            proximal_mu: f.proximal_mu,
            max_update_norm: None,
            max_update_mib: f.max_update_mib,
            privacy: None,
            partition: PartitionSpec::default(),
            eval_every: f.eval_every,
            tls: None,
        }
    }
}

impl Default for AggregationSpec {
    fn default() -> Self {
        Self {
            kind: AggregationKind::Mean,
            beta: None,
            byzantine: None,
            keep: None,
        }
    }
}

impl Default for ServerOptimizerSpec {
    fn default() -> Self {
        Self {
            kind: ServerOptimizerKind::Sgd,
            lr: None,
            momentum: None,
            beta1: None,
            beta2: None,
            tau: None,
            bias_correction: None,
        }
    }
}

impl Default for PrivacySpec {
    fn default() -> Self {
        let p = tc::PrivacyConfig::default();
        Self {
            clip_norm: p.clip_norm,
            noise_multiplier: p.noise_multiplier,
            delta: p.delta,
            adaptive_clipping: None,
        }
    }
}

impl Default for AdaptiveClippingSpec {
    fn default() -> Self {
        let a = tc::AdaptiveClipping::default();
        Self {
            target_quantile: a.target_quantile,
            lr: a.lr,
        }
    }
}

impl Default for PartitionSpec {
    fn default() -> Self {
        Self {
            kind: PartitionKind::Iid,
            alpha: None,
            classes_per_client: None,
            seed: 0,
        }
    }
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        let c = tc::CheckpointConfig::default();
        Self {
            interval_steps: c.every,
            keep: count(c.keep_last),
            location: "/var/lib/trainyard/run".into(),
        }
    }
}

impl Default for RunPolicy {
    fn default() -> Self {
        Self {
            backoff_limit: 3,
            active_deadline_seconds: None,
            ttl_seconds_after_finished: None,
            clean_pod_policy: CleanPodPolicy::Running,
            suspend: false,
            startup_timeout_seconds: 600,
            stall_timeout_seconds: None,
            failure_rules: Vec::new(),
        }
    }
}
