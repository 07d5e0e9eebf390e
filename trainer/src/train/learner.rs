//! A model being trained, and one optimiser step of it: the piece that
//! `train` (data-parallel, PEFT) and the federated client share.
//!
//! The trainable parameters live as one flat tensor on the compute device
//! beside the model that views them; gradients come out of the backward pass
//! as another flat tensor on the same device; the optimiser updates the flat
//! tensor there and the model takes slices of it. On a GPU nothing but the
//! loss and the gradient norm (two scalars) crosses to the host in a step.

use burn::tensor::{Device, Tensor};

use super::batch_loss;
use super::optim::{self, Optimizer};
use crate::config::{OptimizerConfig, TrainerConfig};
use crate::data::Batch;
use crate::model::params::{self, Trainable};
use crate::model::{SegNet, noise};

/// A model, the parameters it trains and their optimiser.
pub struct Learner {
    model: SegNet,
    selection: Trainable,
    /// The trained parameters, flat in layout order (no autodiff).
    params: Tensor<1>,
    optimizer: Optimizer,
    /// The autodiff device the model computes on.
    device: Device,
}

/// What one optimiser step produced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Gradient L2 norm before clipping.
    pub grad_norm: f64,
}

impl Learner {
    /// Starts training `model`'s parameters that `selection` picks, with a
    /// fresh optimiser. `device` is the autodiff device the model lives on.
    pub fn new(
        model: SegNet,
        selection: Trainable,
        optimizer: &OptimizerConfig,
        device: &Device,
    ) -> Self {
        let params = params::flat_trainable_of(&model, &selection, device);
        let n = params.dims()[0];
        let inner = device.clone().without_autodiff();
        Self {
            model,
            selection,
            params,
            optimizer: Optimizer::new(optimizer, n, &inner),
            device: device.clone(),
        }
    }

    /// The model.
    pub fn model(&self) -> &SegNet {
        &self.model
    }

    /// Which parameters are trained.
    pub fn selection(&self) -> &Trainable {
        &self.selection
    }

    /// The trained parameters, flat (on the device).
    pub fn params(&self) -> &Tensor<1> {
        &self.params
    }

    /// Number of trained values.
    pub fn len(&self) -> usize {
        self.params.dims()[0]
    }

    /// Whether nothing is trained.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The optimiser.
    pub fn optimizer(&self) -> &Optimizer {
        &self.optimizer
    }

    /// The optimiser, to restore or hand over its state.
    pub fn optimizer_mut(&mut self) -> &mut Optimizer {
        &mut self.optimizer
    }

    /// The autodiff device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Replaces the trained parameters (and the model's view of them).
    pub fn set_params(&mut self, params: Tensor<1>) {
        assert_eq!(
            params.dims(),
            self.params.dims(),
            "one value per trained parameter"
        );
        self.model = params::with_flat_trainable_of(self.model.clone(), &params, &self.selection);
        self.params = params;
    }

    /// The model's buffers (BatchNorm running statistics), flat on the device.
    pub fn buffers(&self) -> Tensor<1> {
        params::flat_buffers(&self.model, &self.device)
    }

    /// Replaces the model's buffers (the group's average).
    pub fn set_buffers(&mut self, buffers: Tensor<1>) {
        self.model = params::with_flat_buffers(self.model.clone(), &buffers);
    }

    /// Replaces the model (a restored checkpoint, a base with adapters) and
    /// takes its trained parameters from it.
    pub fn set_model(&mut self, model: SegNet) {
        self.params = params::flat_trainable_of(&model, &self.selection, &self.device);
        self.model = model;
    }

    /// The loss (a one-element tensor on the device) and the flat gradient of
    /// one micro-batch, computed by the clean model.
    pub fn loss_and_gradient(
        &self,
        batch: &Batch,
        config: &TrainerConfig,
    ) -> (Tensor<1>, Tensor<1>) {
        self.loss_and_gradient_by(&self.model, batch, config)
    }

    /// [`Learner::loss_and_gradient`] with the forward pass computed by
    /// `forward` (the model, or a view of it such as its weights under noise),
    /// and the gradients read for the model's own parameters.
    fn loss_and_gradient_by(
        &self,
        forward: &SegNet,
        batch: &Batch,
        config: &TrainerConfig,
    ) -> (Tensor<1>, Tensor<1>) {
        let loss = batch_loss(forward, batch, config, &self.device);
        let grads = loss.backward();
        let flat = params::flat_gradients_of(&self.model, &grads, &self.selection, &self.device);
        (loss.inner(), flat)
    }

    /// The mean loss and mean gradient over `batches` (gradient accumulation)
    /// of optimiser step `step`, under `train.weight_noise` when set (one draw
    /// per step, the same for every micro-batch and rank). The loss is read to
    /// the host here: one scalar per step.
    ///
    /// # Panics
    /// When `batches` is empty.
    pub fn mean_gradient(
        &self,
        batches: impl IntoIterator<Item = Batch>,
        config: &TrainerConfig,
        step: u64,
    ) -> (f32, Tensor<1>) {
        let draw = config
            .train
            .weight_noise
            .as_ref()
            .map(|n| noise::WeightNoise::draw(&self.model, n.sigma, config.train.seed, step));
        let mut sum: Option<(Tensor<1>, Tensor<1>)> = None;
        let mut count = 0usize;
        for batch in batches {
            // A graph per micro-batch: each has its own backward pass.
            let (l, g) = match &draw {
                Some(d) => self.loss_and_gradient_by(&d.apply(self.model.clone()), &batch, config),
                None => self.loss_and_gradient(&batch, config),
            };
            sum = Some(match sum {
                None => (l, g),
                Some((ls, gs)) => (ls.add(l), gs.add(g)),
            });
            count += 1;
        }
        let (loss, grads) = sum.expect("at least one micro-batch per step");
        if count == 1 {
            return (loss.into_scalar::<f32>(), grads);
        }
        let inv = 1.0 / count as f32;
        (
            loss.mul_scalar(inv).into_scalar::<f32>(),
            grads.mul_scalar(inv),
        )
    }

    /// One optimiser step with the (group's) gradient `grads`: clipping to
    /// `clip` (global L2 norm) first, when given.
    pub fn apply(&mut self, grads: Tensor<1>, lr: f64, clip: Option<f64>) -> StepReport {
        let (grads, grad_norm) = match clip {
            Some(max) => optim::clip_grad_norm(grads, max),
            None => {
                let norm = optim::grad_norm(&grads);
                (grads, norm)
            }
        };
        let params = self.optimizer.step(self.params.clone(), grads, lr);
        self.set_params(params);
        StepReport { grad_norm }
    }
}
