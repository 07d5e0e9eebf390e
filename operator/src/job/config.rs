//! The trainer configuration a replica receives, derived from the spec.
//!
//! The spec is the public, versioned API (camelCase, Kubernetes conventions);
//! [`TrainerConfig`] is the trainer's own file format. This is the one place
//! that maps one onto the other.

use trainyard_trainer::config::{self as tc, TrainerConfig};

use crate::api::validate::Problem;
use crate::api::{self, TrainingJobSpec};

/// `train.device` for the job's trainers: with GPUs requested, Auto means the
/// GPUs (a replica that finds none fails loudly instead of training on the
/// CPU beside idle GPUs); without, the CPU.
fn device(spec: &TrainingJobSpec) -> tc::DeviceKind {
    match (spec.training.device, spec.gpus_per_worker()) {
        (api::ComputeDevice::Cpu, _) | (api::ComputeDevice::Auto, 0) => tc::DeviceKind::Cpu,
        (api::ComputeDevice::Cuda, _) | (api::ComputeDevice::Auto, _) => tc::DeviceKind::Cuda,
    }
}

/// Optimiser steps the job runs: `training.steps`, or `training.epochs`
/// turned into steps from the dataset size and the global batch.
///
/// A federated job counts rounds: its progress is the aggregator's round.
pub fn total_steps(spec: &TrainingJobSpec) -> Result<u64, Problem> {
    if let (api::Mode::Federated, Some(f)) = (spec.mode, &spec.federated) {
        return Ok(f.rounds);
    }
    let t = &spec.training;
    match (t.steps, t.epochs) {
        (Some(steps), _) => Ok(steps),
        (None, None) => Ok(api::defaults_steps()),
        (None, Some(epochs)) => {
            let Some(shapes) = &spec.data.shapes else {
                return Err(Problem {
                    path: "spec.training.epochs".into(),
                    message: "needs a dataset whose size is known when the job is planned \
                              (data.shapes); give training.steps for data.folder"
                        .into(),
                });
            };
            let n = usize::try_from(shapes.samples).unwrap_or(usize::MAX);
            let train = n - tc::validation_count(n, spec.data.validation_fraction);
            let accumulate = spec.distributed.as_ref().map_or(1, |d| d.accumulate_steps);
            let per_step =
                u64::from(spec.training.batch_size) * u64::from(spec.world_size()) * accumulate;
            Ok((epochs * train as u64).div_ceil(per_step).max(1))
        }
    }
}

/// The config every training replica of this job gets.
pub fn trainer_config(spec: &TrainingJobSpec) -> Result<TrainerConfig, Problem> {
    let m = &spec.model;
    let model = tc::ModelConfig {
        widths: m.widths.iter().map(|&w| w as usize).collect(),
        convs_per_stage: m.convs_per_stage as usize,
        decoder: match m.decoder {
            api::Decoder::Unpool => tc::DecoderKind::Unpool,
            api::Decoder::Nearest => tc::DecoderKind::Nearest,
        },
        classes: m.classes as usize,
        in_channels: m.in_channels as usize,
        boundary_head: m.boundary_head,
        boundary_loss_weight: m.boundary_loss_weight,
        task_weighting: match m.task_weighting {
            api::TaskWeighting::Fixed => tc::TaskWeighting::Fixed,
            api::TaskWeighting::Uncertainty => tc::TaskWeighting::Uncertainty,
        },
        squeeze_excitation: m.squeeze_excitation,
    };
    let d = &spec.data;
    let data = tc::DataConfig {
        shapes: d.shapes.as_ref().map(|s| tc::ShapesConfig {
            samples: usize::try_from(s.samples).unwrap_or(usize::MAX),
            image_size: s.image_size as usize,
            max_shapes: s.max_shapes as usize,
            seed: s.seed,
            invert: s.invert,
            sensor_noise: s.sensor_noise,
        }),
        folder: d.folder.as_ref().map(|f| tc::FolderConfig {
            path: f.path.clone().into(),
        }),
        validation_fraction: d.validation_fraction,
        seed: d.seed,
        noise: d.noise.as_ref().map(|n| tc::NoiseConfig {
            sigma: n.sigma,
            probability: n.probability,
        }),
    };
    let t = &spec.training;
    let o = &t.optimizer;
    let optimizer = match o.kind {
        api::OptimizerKind::AdamW => {
            let base = tc::AdamWConfig::default();
            tc::OptimizerConfig::AdamW(tc::AdamWConfig {
                beta1: o.beta1.unwrap_or(base.beta1),
                beta2: o.beta2.unwrap_or(base.beta2),
                eps: o.eps.unwrap_or(base.eps),
                weight_decay: o.weight_decay.unwrap_or(base.weight_decay),
            })
        }
        api::OptimizerKind::Sgd => {
            let base = tc::SgdConfig::default();
            tc::OptimizerConfig::Sgd(tc::SgdConfig {
                momentum: o.momentum.unwrap_or(base.momentum),
                nesterov: o.nesterov.unwrap_or(base.nesterov),
                weight_decay: o.weight_decay.unwrap_or(base.weight_decay),
            })
        }
    };
    let s = &t.schedule;
    let decay = match s.decay {
        api::Decay::Constant => tc::DecayConfig::Constant,
        api::Decay::Cosine => tc::DecayConfig::Cosine(tc::CosineDecay {
            final_factor: s.final_factor,
        }),
        api::Decay::Step => tc::DecayConfig::Step(tc::StepDecay {
            every: s.step_every.unwrap_or(0),
            gamma: s.gamma.unwrap_or(0.0),
        }),
    };
    let dist = spec.distributed.clone().unwrap_or_default();
    let (compression, topk) = match dist.compression.kind {
        api::CompressionKind::None => (tc::Compression::None, None),
        api::CompressionKind::Fp16 => (tc::Compression::Fp16, None),
        api::CompressionKind::Bf16 => (tc::Compression::Bf16, None),
        api::CompressionKind::TopK => (
            tc::Compression::None,
            Some(tc::TopKConfig {
                ratio: dist.compression.ratio.unwrap_or(0.0),
            }),
        ),
    };
    let steps = total_steps(spec)?;
    let defaults = tc::TrainConfig::default();
    let train = tc::TrainConfig {
        steps,
        batch_size: t.batch_size as usize,
        accumulate_steps: dist.accumulate_steps,
        lr: o.lr,
        warmup_steps: s.warmup_steps,
        decay,
        optimizer,
        grad_clip_norm: (t.grad_clip_norm > 0.0).then_some(t.grad_clip_norm),
        compression,
        topk,
        bucket_mib: dist.bucket_mib,
        local_sgd: dist.local_sgd.as_ref().map(|l| tc::LocalSgdConfig {
            every: l.every,
            outer: l.outer.as_ref().map(|o| tc::OuterConfig {
                lr: o.lr,
                momentum: o.momentum,
                nesterov: o.nesterov,
            }),
        }),
        class_weights: t.class_weights.clone(),
        weight_noise: t
            .weight_noise
            .as_ref()
            .map(|n| tc::WeightNoiseConfig { sigma: n.sigma }),
        validation_noise: t.validation_noise.as_ref().map(|n| tc::EvalNoise {
            input_sigma: n.input_sigma,
            weight_sigma: n.weight_sigma,
            seed: n.seed,
        }),
        validate_every: t.validate_every,
        log_every: t.log_every,
        seed: t.seed,
        threads: t.threads.map(|n| n as usize),
        throughput_warmup_steps: defaults.throughput_warmup_steps.min(steps / 2),
        device: device(spec),
        backend: match dist.backend {
            api::CollectiveBackend::Auto => tc::CollectiveBackend::Auto,
            api::CollectiveBackend::Nccl => tc::CollectiveBackend::Nccl,
            api::CollectiveBackend::Tcp => tc::CollectiveBackend::Tcp,
        },
    };
    let checkpoint = tc::CheckpointConfig {
        every: spec.checkpoints.interval_steps,
        keep_last: spec.checkpoints.keep as usize,
    };
    let federated = match (spec.mode, &spec.federated) {
        (api::Mode::Federated, Some(f)) => Some(federated_config(f)),
        _ => None,
    };
    let config = TrainerConfig {
        model,
        data,
        train,
        checkpoint,
        federated,
        peft: match (spec.mode, &spec.peft) {
            (api::Mode::Peft, Some(p)) => Some(tc::PeftConfig {
                base: p.base_checkpoint.clone().into(),
                r: p.rank as usize,
                lora_alpha: p.alpha,
                lora_dropout: p.dropout,
                target_modules: p.target_modules.clone(),
                target_regex: None,
                modules_to_save: p.modules_to_save.clone(),
                use_rslora: p.use_rslora,
                use_dora: p.use_dora,
                init: tc::PeftConfig::default().init,
            }),
            _ => None,
        },
    };
    // The trainer's own checks are the last word on what it can run; name
    // the spec field behind the trainer's.
    config.validate().map_err(|e| match e {
        tc::ConfigError::Invalid { field, message }
        | tc::ConfigError::Schema { field, message } => Problem {
            path: spec_path(&field),
            message,
        },
        other => Problem {
            path: "spec".into(),
            message: other.to_string(),
        },
    })?;
    Ok(config)
}

/// The aggregator's and clients' `federated` section.
fn federated_config(f: &api::FederatedSpec) -> tc::FederatedConfig {
    let defaults = tc::AdaptiveServer::default();
    let adaptive = |s: &api::ServerOptimizerSpec| tc::AdaptiveServer {
        lr: s.lr.unwrap_or(defaults.lr),
        beta1: s.beta1.unwrap_or(defaults.beta1),
        beta2: s.beta2.unwrap_or(defaults.beta2),
        tau: s.tau.unwrap_or(defaults.tau),
        bias_correction: s.bias_correction.map(|b| match b {
            api::BiasCorrectionSpec::Flower => tc::BiasCorrection::Flower,
            api::BiasCorrectionSpec::None => tc::BiasCorrection::None,
        }),
    };
    let s = &f.server_optimizer;
    let a = &f.aggregation;
    let p = &f.partition;
    tc::FederatedConfig {
        clients: f.clients as usize,
        rounds: f.rounds,
        local_steps: f.local_steps,
        fraction: f.fraction,
        min_clients: f.min_clients as usize,
        min_available: f.min_available.unwrap_or(f.min_clients) as usize,
        sampling_timeout_seconds: f.sampling_timeout_seconds,
        round_timeout_seconds: f.round_timeout_seconds,
        round_attempts: f.round_attempts,
        aggregation: match a.kind {
            api::AggregationKind::Mean => tc::Aggregation::Mean,
            api::AggregationKind::Median => tc::Aggregation::Median,
            api::AggregationKind::TrimmedMean => tc::Aggregation::TrimmedMean {
                beta: a.beta.unwrap_or(tc::Aggregation::TRIM_BETA),
            },
            api::AggregationKind::Krum => tc::Aggregation::Krum {
                byzantine: a
                    .byzantine
                    .map_or(tc::Aggregation::KRUM_BYZANTINE, |b| b as usize),
                keep: a.keep.map_or(tc::Aggregation::KRUM_KEEP, |k| k as usize),
            },
        },
        server_optimizer: match s.kind {
            api::ServerOptimizerKind::Sgd => tc::ServerOptimizer::Sgd {
                lr: s.lr.unwrap_or(tc::ServerOptimizer::SGD_LR),
                momentum: s.momentum.unwrap_or(tc::ServerOptimizer::SGD_MOMENTUM),
            },
            api::ServerOptimizerKind::Adam => tc::ServerOptimizer::Adam(adaptive(s)),
            api::ServerOptimizerKind::Yogi => tc::ServerOptimizer::Yogi(adaptive(s)),
        },
        proximal_mu: f.proximal_mu,
        max_update_norm: f.max_update_norm,
        max_update_mib: f.max_update_mib,
        privacy: f.privacy.as_ref().map(|p| tc::PrivacyConfig {
            clip_norm: p.clip_norm,
            noise_multiplier: p.noise_multiplier,
            delta: p.delta,
            adaptive_clipping: p.adaptive_clipping.as_ref().map(|a| tc::AdaptiveClipping {
                target_quantile: a.target_quantile,
                lr: a.lr,
            }),
        }),
        partition: match p.kind {
            api::PartitionKind::Iid => tc::Partition::Iid { seed: p.seed },
            api::PartitionKind::Dirichlet => tc::Partition::Dirichlet {
                alpha: p.alpha.unwrap_or(tc::Partition::DIRICHLET_ALPHA),
                seed: p.seed,
            },
            api::PartitionKind::Classes => tc::Partition::Classes {
                classes_per_client: p
                    .classes_per_client
                    .map_or(tc::Partition::CLASSES_PER_CLIENT, |c| c as usize),
                seed: p.seed,
            },
            api::PartitionKind::Own => tc::Partition::Own,
        },
        eval_every: f.eval_every,
    }
}

/// The spec field behind a trainer config field (longest known prefix wins).
fn spec_path(trainer_field: &str) -> String {
    // The federated section mirrors the spec field by field, in snake_case.
    if let Some(rest) = trainer_field.strip_prefix("federated.") {
        let camel: Vec<String> = rest
            .split('.')
            .map(|seg| {
                let mut out = String::new();
                let mut upper = false;
                for c in seg.chars() {
                    if c == '_' {
                        upper = true;
                    } else if upper {
                        out.extend(c.to_uppercase());
                        upper = false;
                    } else {
                        out.push(c);
                    }
                }
                // The trainer's enum tag; the spec calls it `type`.
                if out == "kind" { "type".into() } else { out }
            })
            .collect();
        return format!("spec.federated.{}", camel.join("."));
    }
    const MAP: &[(&str, &str)] = &[
        ("model.convs_per_stage", "spec.model.convsPerStage"),
        ("model.in_channels", "spec.model.inChannels"),
        (
            "model.boundary_loss_weight",
            "spec.model.boundaryLossWeight",
        ),
        ("model.task_weighting", "spec.model.taskWeighting"),
        ("model", "spec.model"),
        ("data.shapes.image_size", "spec.data.shapes.imageSize"),
        ("data.shapes.max_shapes", "spec.data.shapes.maxShapes"),
        ("data.validation_fraction", "spec.data.validationFraction"),
        ("data", "spec.data"),
        ("peft.base", "spec.peft.baseCheckpoint"),
        ("peft.r", "spec.peft.rank"),
        ("peft.lora_alpha", "spec.peft.alpha"),
        ("peft.lora_dropout", "spec.peft.dropout"),
        ("peft.target_modules", "spec.peft.targetModules"),
        ("peft", "spec.peft"),
        ("train.steps", "spec.training.steps"),
        ("train.batch_size", "spec.training.batchSize"),
        ("train.accumulate_steps", "spec.distributed.accumulateSteps"),
        ("train.lr", "spec.training.optimizer.lr"),
        ("train.warmup_steps", "spec.training.schedule.warmupSteps"),
        (
            "train.decay.final_factor",
            "spec.training.schedule.finalFactor",
        ),
        ("train.decay.every", "spec.training.schedule.stepEvery"),
        ("train.decay.gamma", "spec.training.schedule.gamma"),
        (
            "train.optimizer.weight_decay",
            "spec.training.optimizer.weightDecay",
        ),
        ("train.optimizer", "spec.training.optimizer"),
        ("train.grad_clip_norm", "spec.training.gradClipNorm"),
        ("train.class_weights", "spec.training.classWeights"),
        ("train.bucket_mib", "spec.distributed.bucketMib"),
        ("train.topk", "spec.distributed.compression.ratio"),
        ("train.compression", "spec.distributed.compression"),
        ("train.local_sgd", "spec.distributed.localSgd"),
        ("train.validate_every", "spec.training.validateEvery"),
        ("train.weight_noise", "spec.training.weightNoise"),
        ("train.validation_noise", "spec.training.validationNoise"),
        ("train.log_every", "spec.training.logEvery"),
        ("train.threads", "spec.training.threads"),
        ("train", "spec.training"),
        ("checkpoint.every", "spec.checkpoints.intervalSteps"),
        ("checkpoint.keep_last", "spec.checkpoints.keep"),
        ("checkpoint", "spec.checkpoints"),
    ];
    MAP.iter()
        .find(|(prefix, _)| {
            trainer_field == *prefix || trainer_field.starts_with(&format!("{prefix}."))
        })
        .map_or_else(|| "spec".into(), |(_, path)| (*path).into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{DistributedSpec, Mode, TrainingJobSpec};

    fn spec() -> TrainingJobSpec {
        serde_yaml::from_str("mode: Distributed\nimage: trainer:dev\ndistributed: {workers: 2}\n")
            .unwrap()
    }

    /// Whether `path` (`spec.a.b`) names a field of the generated CRD schema.
    fn in_schema(schema: &serde_json::Value, path: &str) -> bool {
        let mut node = schema;
        for seg in path.split('.') {
            match node["properties"].get(seg) {
                Some(next) => node = next,
                None => return false,
            }
        }
        true
    }

    /// Every trainer config key (the leaves of a full config, federated and
    /// PEFT sections included) is named in errors by a spec path that the
    /// CRD really has, so a refusal always points at a field users can set.
    #[test]
    fn every_mapped_spec_path_exists_in_the_crd() {
        fn leaves(prefix: &str, v: &serde_json::Value, out: &mut Vec<String>) {
            match v.as_object() {
                Some(map) if !map.is_empty() => {
                    for (k, child) in map {
                        let key = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        out.push(key.clone());
                        leaves(&key, child, out);
                    }
                }
                _ => {}
            }
        }
        let mut full = TrainerConfig {
            federated: Some(tc::FederatedConfig::default()),
            peft: Some(tc::PeftConfig::default()),
            ..TrainerConfig::default()
        };
        full.data.noise = Some(tc::NoiseConfig::default());
        full.train.weight_noise = Some(tc::WeightNoiseConfig { sigma: 0.1 });
        full.train.validation_noise = Some(tc::EvalNoise::default());
        let mut keys = Vec::new();
        leaves("", &serde_json::to_value(&full).unwrap(), &mut keys);
        let schema = crate::api::crd::schema();
        let missing: Vec<String> = keys
            .iter()
            .map(|k| (k, spec_path(k)))
            .filter(|(_, path)| !in_schema(&schema, path))
            .map(|(k, path)| format!("{k} -> {path}"))
            .collect();
        assert!(missing.is_empty(), "not in the CRD: {missing:#?}");
    }

    /// Every number a CRD description gives as a field's default is what the
    /// trainer really runs with when the field is left out. Each row: the
    /// spec field, the job (its variant selected, the field unset), and
    /// where the trainer config holds the value. A new "(default N)" in a
    /// description without a row here fails too.
    #[test]
    fn the_defaults_kubectl_explain_states_are_the_trainers() {
        const DISTRIBUTED: &str = "mode: Distributed\nimage: t\ndistributed: {workers: 2}\n";
        const FEDERATED: &str =
            "mode: Federated\nimage: t\nfederated: {clients: 4, rounds: 2, minClients: 3}\n";
        let federated = |extra: &str| {
            format!(
                "mode: Federated\nimage: t\nfederated: {{clients: 4, rounds: 2, minClients: 3, {extra}}}\n"
            )
        };
        let adamw = DISTRIBUTED.to_string();
        let sgd = format!("{DISTRIBUTED}training: {{optimizer: {{type: Sgd}}}}\n");
        let trimmed = federated("aggregation: {type: TrimmedMean}");
        let krum = federated("aggregation: {type: Krum}");
        let dirichlet = federated("partition: {type: Dirichlet}");
        let classes = federated("partition: {type: Classes}");
        let adam = federated("serverOptimizer: {type: Adam}");
        let noisy = format!("{DISTRIBUTED}training: {{validationNoise: {{}}}}\n");
        let rows: &[(&str, &str, &str)] = &[
            (
                "spec.training.optimizer.beta1",
                &adamw,
                "/train/optimizer/beta1",
            ),
            (
                "spec.training.optimizer.beta2",
                &adamw,
                "/train/optimizer/beta2",
            ),
            (
                "spec.training.optimizer.eps",
                &adamw,
                "/train/optimizer/eps",
            ),
            (
                "spec.training.optimizer.weightDecay",
                &adamw,
                "/train/optimizer/weight_decay",
            ),
            (
                "spec.training.optimizer.momentum",
                &sgd,
                "/train/optimizer/momentum",
            ),
            (
                "spec.training.optimizer.nesterov",
                &sgd,
                "/train/optimizer/nesterov",
            ),
            (
                "spec.federated.aggregation.beta",
                &trimmed,
                "/federated/aggregation/beta",
            ),
            (
                "spec.federated.aggregation.byzantine",
                &krum,
                "/federated/aggregation/byzantine",
            ),
            (
                "spec.federated.aggregation.keep",
                &krum,
                "/federated/aggregation/keep",
            ),
            (
                "spec.federated.partition.alpha",
                &dirichlet,
                "/federated/partition/alpha",
            ),
            (
                "spec.federated.partition.classesPerClient",
                &classes,
                "/federated/partition/classes_per_client",
            ),
            (
                "spec.federated.serverOptimizer.lr",
                FEDERATED,
                "/federated/server_optimizer/lr",
            ),
            (
                "spec.federated.serverOptimizer.momentum",
                FEDERATED,
                "/federated/server_optimizer/momentum",
            ),
            (
                "spec.federated.serverOptimizer.beta1",
                &adam,
                "/federated/server_optimizer/beta1",
            ),
            (
                "spec.federated.serverOptimizer.beta2",
                &adam,
                "/federated/server_optimizer/beta2",
            ),
            (
                "spec.federated.serverOptimizer.tau",
                &adam,
                "/federated/server_optimizer/tau",
            ),
            (
                "spec.training.validationNoise.inputSigma",
                &noisy,
                "/train/validation_noise/input_sigma",
            ),
            (
                "spec.training.validationNoise.weightSigma",
                &noisy,
                "/train/validation_noise/weight_sigma",
            ),
            (
                "spec.training.validationNoise.seed",
                &noisy,
                "/train/validation_noise/seed",
            ),
        ];
        let schema = crate::api::crd::schema();
        let stated = |path: &str| -> Option<serde_json::Value> {
            let mut node = &schema;
            for seg in path.split('.') {
                node = node["properties"].get(seg)?;
            }
            let description = node["description"].as_str()?;
            let (_, after) = description.split_once("efault ")?;
            let word = after.split([' ', ')', ';', ',', '\n']).next()?;
            serde_json::from_str(word).ok()
        };
        for (path, job, pointer) in rows {
            let spec: TrainingJobSpec = serde_yaml::from_str(job).unwrap();
            let config = serde_json::to_value(trainer_config(&spec).unwrap()).unwrap();
            let ran = &config
                .pointer(pointer)
                .unwrap_or_else(|| panic!("{path}: the trainer config has no {pointer}"));
            let said = stated(path).unwrap_or_else(|| panic!("{path} states no default"));
            let equal = match (said.as_f64(), ran.as_f64()) {
                (Some(a), Some(b)) => a == b,
                _ => said == **ran,
            };
            assert!(
                equal,
                "{path}: described as default {said}, runs with {ran}"
            );
        }
        // Every stated number has its row.
        fn stated_paths(node: &serde_json::Value, path: &str, out: &mut Vec<String>) {
            let d = node["description"].as_str().unwrap_or("");
            if let Some((_, after)) = d.split_once("efault ")
                && after.starts_with(|c: char| {
                    c.is_ascii_digit() || after.starts_with("false") || after.starts_with("true")
                })
            {
                out.push(path.to_string());
            }
            if let Some(props) = node["properties"].as_object() {
                for (k, child) in props {
                    stated_paths(child, &format!("{path}.{k}"), out);
                }
            }
        }
        let mut found = Vec::new();
        stated_paths(&schema["properties"]["spec"], "spec", &mut found);
        let unchecked: Vec<&String> = found
            .iter()
            .filter(|p| !p.starts_with("spec.template") && !rows.iter().any(|(r, _, _)| r == p))
            .collect();
        assert!(
            unchecked.is_empty(),
            "defaults stated but not checked: {unchecked:?}"
        );
    }

    #[test]
    fn defaults_equal_the_trainers_own_defaults() {
        let config = trainer_config(&spec()).unwrap();
        let base = TrainerConfig::default();
        assert_eq!(config.model, base.model);
        assert_eq!(config.data, base.data);
        assert_eq!(config.checkpoint, base.checkpoint);
        // A job without GPUs trains on the CPU whatever the machine has.
        assert_eq!(config.train.device, tc::DeviceKind::Cpu);
        let train = tc::TrainConfig {
            device: base.train.device,
            ..config.train
        };
        assert_eq!(train, base.train);
    }

    #[test]
    fn epochs_become_steps_over_the_global_batch() {
        let mut s = spec();
        s.training.epochs = Some(3);
        s.training.batch_size = 16;
        s.data.shapes.as_mut().unwrap().samples = 1000;
        s.data.validation_fraction = 0.1;
        s.distributed = Some(DistributedSpec {
            workers: 2,
            accumulate_steps: 2,
            ..Default::default()
        });
        // 900 training samples, 64 per step: ceil(2700 / 64) = 43.
        assert_eq!(total_steps(&s).unwrap(), 43);
        s.data.shapes = None;
        s.data.folder = Some(crate::api::FolderData {
            path: "/data".into(),
        });
        let e = total_steps(&s).unwrap_err();
        assert_eq!(e.path, "spec.training.epochs");
    }

    #[test]
    fn trainer_rejections_name_the_spec_field() {
        let mut s = spec();
        s.data.shapes.as_mut().unwrap().image_size = 36;
        let e = trainer_config(&s).unwrap_err();
        assert_eq!(e.path, "spec.data.shapes.imageSize", "{e}");
        let mut s = spec();
        s.model.task_weighting = crate::api::TaskWeighting::Uncertainty;
        let e = trainer_config(&s).unwrap_err();
        assert_eq!(e.path, "spec.model.taskWeighting", "{e}");
        s.model.boundary_head = true;
        let learned = trainer_config(&s).unwrap();
        assert_eq!(learned.model.task_weighting, tc::TaskWeighting::Uncertainty);
        s.model.boundary_loss_weight = 3.0;
        let e = trainer_config(&s).unwrap_err();
        assert_eq!(e.path, "spec.model.boundaryLossWeight", "{e}");
        assert_eq!(s.world_size(), 2);
        s.mode = Mode::Federated;
        assert_eq!(s.world_size(), 1);
    }

    #[test]
    fn gpu_workers_multiply_the_ranks_and_train_on_cuda() {
        let mut s = spec();
        s.distributed.as_mut().unwrap().gpus_per_worker = 4;
        assert_eq!(
            (s.worker_pods(), s.gpus_per_worker(), s.world_size()),
            (2, 4, 8)
        );
        let c = trainer_config(&s).unwrap();
        assert_eq!(c.train.device, tc::DeviceKind::Cuda);
        assert_eq!(c.train.backend, tc::CollectiveBackend::Auto);
        s.distributed.as_mut().unwrap().backend = api::CollectiveBackend::Tcp;
        assert_eq!(
            trainer_config(&s).unwrap().train.backend,
            tc::CollectiveBackend::Tcp
        );
        // Epochs count every rank's batch.
        s.training.epochs = Some(1);
        s.data.shapes.as_mut().unwrap().samples = 1000;
        let per_step = 16 * 8;
        assert_eq!(total_steps(&s).unwrap(), (900u64).div_ceil(per_step));
    }
}
