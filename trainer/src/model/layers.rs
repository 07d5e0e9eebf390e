//! The building blocks of the SegNet family: 3x3 convolution, batch norm,
//! the conv → BN → ReLU unit, linear layers and squeeze-excitation, with
//! PyTorch's parameter names and semantics.

use burn::module::{Module, Param, RunningState};
use burn::tensor::module::{batch_norm, batch_norm_train, conv2d};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Tensor, TensorData, activation};
use rand::Rng;

use crate::kernels::op::bn_relu_train;

/// A 2-D convolution with stride 1 and "same" zero padding.
///
/// Parameter names are PyTorch's `nn.Conv2d`: `weight` `[out, in, k, k]` and `bias` `[out]`.
/// With a LoRA adapter (see [`crate::peft`]) it also holds PEFT's
/// `lora_A.weight` `[r, in, k, k]` (a conv like the base one) and
/// `lora_B.weight` `[out, r, 1, 1]` (a 1x1 conv), and computes
/// `conv(x; W) + s·B(A(dropout(x)))`; with DoRA also a magnitude `m` per
/// output channel, and the adapted weight is `m·(W + s·BA)/‖W + s·BA‖`.
#[derive(Module, Debug)]
pub struct Conv2d {
    /// `[out_channels, in_channels, kernel, kernel]`.
    pub weight: Param<Tensor<4>>,
    /// `[out_channels]`, absent when a batch norm follows.
    pub bias: Option<Param<Tensor<1>>>,
    /// LoRA's down-projection, PEFT's `lora_A`.
    pub lora_a: Option<ConvWeight>,
    /// LoRA's up-projection, PEFT's `lora_B`.
    pub lora_b: Option<ConvWeight>,
    /// DoRA's magnitude `[out]`, PEFT's `lora_magnitude_vector`.
    pub lora_magnitude: Option<Param<Tensor<1>>>,
    /// LoRA's scale s (α/r or α/√r).
    #[module(skip)]
    pub lora_scale: f32,
    /// Dropout on the adapter's input while training.
    #[module(skip)]
    pub lora_dropout: f32,
}

/// A bare convolution weight (`<path>.weight`), as PEFT names LoRA's factors.
#[derive(Module, Debug)]
pub struct ConvWeight {
    /// The weight.
    pub weight: Param<Tensor<4>>,
}

impl Conv2d {
    /// PyTorch's default initialisation (`kaiming_uniform_(a=√5)`, i.e. U(±1/√fan_in)
    /// for weight and bias), drawn from `rng` so that a seed fixes the network.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        bias: bool,
        rng: &mut impl Rng,
        device: &Device,
    ) -> Self {
        let fan_in = in_channels * kernel * kernel;
        let bound = 1.0 / (fan_in as f32).sqrt();
        let mut uniform =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-bound..bound)).collect() };
        let weight = TensorData::new(
            uniform(out_channels * fan_in),
            [out_channels, in_channels, kernel, kernel],
        );
        let bias = bias.then(|| {
            Param::from_data(
                TensorData::new(uniform(out_channels), [out_channels]),
                device,
            )
        });
        Self {
            weight: Param::from_data(weight, device),
            bias,
            lora_a: None,
            lora_b: None,
            lora_magnitude: None,
            lora_scale: 0.0,
            lora_dropout: 0.0,
        }
    }

    /// # Shapes
    /// - input `[batch, in, h, w]` → output `[batch, out, h, w]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let (Some(a), Some(b)) = (&self.lora_a, &self.lora_b) else {
            return self.base_forward(x, true);
        };
        let y = self.base_forward(x.clone(), true);
        let Some(m) = &self.lora_magnitude else {
            return y.add(self.lora_branch(dropout(x, self.lora_dropout), a, b));
        };
        // DoRA, as PEFT computes it: y + (g − 1)·(W∗x) + g·s·B(A(x)) with
        // g = m / ‖W + s·BA‖ per output channel, the norm held constant.
        let (x, base) = if dropout_active(&x, self.lora_dropout) {
            let x = dropout(x, self.lora_dropout);
            (x.clone(), self.base_forward(x, false))
        } else {
            let base = match &self.bias {
                Some(bias) => y.clone().sub(bias.val().reshape([1, -1, 1, 1])),
                None => y.clone(),
            };
            (x, base)
        };
        let out = self.weight.dims()[0];
        let g: Tensor<4> = m
            .val()
            .div(dora_norm(self.weight.val(), self.delta_weight(a, b)))
            .reshape([1, out, 1, 1]);
        let lora = self.lora_branch(x, a, b);
        y.add(base.mul(g.clone().sub_scalar(1.0))).add(lora.mul(g))
    }

    /// `s·B@A` in the base weight's shape: what merging adds.
    pub fn delta_weight(&self, a: &ConvWeight, b: &ConvWeight) -> Tensor<4> {
        let dims = self.weight.dims();
        let [r, i, k, _] = a.weight.dims();
        let a2: Tensor<2> = a.weight.val().reshape([r, i * k * k]);
        let b2: Tensor<2> = b.weight.val().reshape([dims[0], r]);
        b2.matmul(a2).mul_scalar(self.lora_scale).reshape(dims)
    }

    fn base_forward(&self, x: Tensor<4>, with_bias: bool) -> Tensor<4> {
        let [_, _, k, _] = self.weight.dims();
        let bias = self.bias.as_ref().filter(|_| with_bias);
        if k == 3 && bias.is_none() && crate::kernels::native(&x.device()).conv {
            return crate::kernels::op::conv3x3(x, self.weight.val());
        }
        let pad = k / 2;
        conv2d(
            x,
            self.weight.val(),
            bias.map(|b| b.val()),
            ConvOptions::new([1, 1], [pad, pad], [1, 1], 1),
        )
    }

    /// `s·B(A(x))` (dropout already applied): A is a conv like the base
    /// (same kernel and padding), B a 1x1 conv.
    fn lora_branch(&self, x: Tensor<4>, a: &ConvWeight, b: &ConvWeight) -> Tensor<4> {
        let [_, _, k, _] = a.weight.dims();
        let h = if k == 3 && crate::kernels::native(&x.device()).conv {
            // A is a bias-free 3x3 conv like the base: our kernel runs it
            // several times faster than burn's generic convolution.
            crate::kernels::op::conv3x3(x, a.weight.val())
        } else {
            let pad = k / 2;
            conv2d(
                x,
                a.weight.val(),
                None,
                ConvOptions::new([1, 1], [pad, pad], [1, 1], 1),
            )
        };
        // B, a 1x1 conv, is a matmul over the channels: [out, r] @ [n, r, h·w].
        let [n, r, hh, ww] = h.dims();
        let [out, _, _, _] = b.weight.dims();
        let b2: Tensor<3> = b.weight.val().reshape([1, out, r]);
        b2.matmul(h.reshape([n, r, hh * ww]))
            .reshape([n, out, hh, ww])
            .mul_scalar(self.lora_scale)
    }
}

/// Batch normalisation over `[batch, channels, h, w]`, PyTorch's `nn.BatchNorm2d`
/// (momentum 0.1, eps 1e-5, running variance unbiased).
///
/// Like burn's own layer, it normalises with batch statistics and updates the
/// running ones when the input lives on an autodiff device (training), and uses
/// the running statistics otherwise (evaluation).
#[derive(Module, Debug)]
pub struct BatchNorm2d {
    /// Scale, `[channels]`.
    pub weight: Param<Tensor<1>>,
    /// Shift, `[channels]`.
    pub bias: Param<Tensor<1>>,
    /// Running mean, a buffer (not trained).
    pub running_mean: RunningState<Tensor<1>>,
    /// Running variance, a buffer (not trained).
    pub running_var: RunningState<Tensor<1>>,
}

const BN_MOMENTUM: f64 = 0.1;
const BN_EPS: f64 = 1e-5;

impl BatchNorm2d {
    /// Identity initialisation, as in PyTorch.
    pub fn new(channels: usize, device: &Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones([channels], device)),
            bias: Param::from_tensor(Tensor::zeros([channels], device)),
            running_mean: RunningState::new(Tensor::zeros([channels], device)),
            running_var: RunningState::new(Tensor::ones([channels], device)),
        }
    }

    /// # Shapes
    /// - input `[batch, channels, h, w]` → output of the same shape
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        if x.device().is_autodiff() {
            let [b, _, h, w] = x.dims();
            let out = batch_norm_train(x, self.weight.val(), self.bias.val(), BN_EPS);
            self.update_running(out.mean, out.variance, b * h * w);
            out.output
        } else {
            let device = x.device();
            batch_norm(
                x,
                self.weight.val(),
                self.bias.val(),
                self.running_mean.value().to_device(&device),
                self.running_var.value().to_device(&device),
                BN_EPS,
            )
        }
    }

    /// Folds one batch's statistics (mean, biased variance over `count`
    /// values per channel) into the running estimates.
    fn update_running(&self, mean: Tensor<1>, biased_var: Tensor<1>, count: usize) {
        let n = count as f64;
        // PyTorch keeps the unbiased variance in the running estimate.
        let unbiased = if n > 1.0 { n / (n - 1.0) } else { 1.0 };
        let device = mean.device();
        let running_mean = self.running_mean.value_sync().to_device(&device);
        let running_var = self.running_var.value_sync().to_device(&device);
        self.running_mean.update(
            running_mean
                .mul_scalar(1.0 - BN_MOMENTUM)
                .add(mean.detach().mul_scalar(BN_MOMENTUM))
                .detach(),
        );
        self.running_var.update(
            running_var
                .mul_scalar(1.0 - BN_MOMENTUM)
                .add(biased_var.detach().mul_scalar(BN_MOMENTUM * unbiased))
                .detach(),
        );
        // RunningState applies an update lazily, at the next read on this
        // thread. Read now so that the stored value is always current: a
        // checkpoint written after this step must hold this step's statistics.
        let _ = self.running_mean.value_sync();
        let _ = self.running_var.value_sync();
    }
}

/// conv3x3 (no bias) → batch norm → ReLU.
#[derive(Module, Debug)]
pub struct ConvBnRelu {
    /// The convolution.
    pub conv: Conv2d,
    /// The normalisation.
    pub bn: BatchNorm2d,
}

impl ConvBnRelu {
    /// A block mapping `in_channels` to `out_channels`.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        rng: &mut impl Rng,
        device: &Device,
    ) -> Self {
        Self {
            conv: Conv2d::new(in_channels, out_channels, 3, false, rng, device),
            bn: BatchNorm2d::new(out_channels, device),
        }
    }

    /// # Shapes
    /// - input `[batch, in, h, w]` → output `[batch, out, h, w]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let y = self.conv.forward(x);
        let device = y.device();
        if device.is_autodiff() && crate::kernels::native(&device).bn_relu {
            let [b, _, h, w] = y.dims();
            let out = bn_relu_train(y, self.bn.weight.val(), self.bn.bias.val(), BN_EPS);
            self.bn.update_running(out.mean, out.var, b * h * w);
            return out.output;
        }
        activation::relu(self.bn.forward(y))
    }
}

/// A fully connected layer, PyTorch's `nn.Linear`: `y = x·Wᵀ + b`.
///
/// With a LoRA adapter it also holds PEFT's `lora_A.weight` `[r, in]` and
/// `lora_B.weight` `[out, r]`, and computes `x·Wᵀ + b + s·B(A(dropout(x)))`
/// (with DoRA, as [`Conv2d`] does).
#[derive(Module, Debug)]
pub struct Linear {
    /// `[out_features, in_features]`.
    pub weight: Param<Tensor<2>>,
    /// `[out_features]`.
    pub bias: Option<Param<Tensor<1>>>,
    /// LoRA's down-projection, PEFT's `lora_A`.
    pub lora_a: Option<LinearWeight>,
    /// LoRA's up-projection, PEFT's `lora_B`.
    pub lora_b: Option<LinearWeight>,
    /// DoRA's magnitude `[out]`, PEFT's `lora_magnitude_vector`.
    pub lora_magnitude: Option<Param<Tensor<1>>>,
    /// LoRA's scale s (α/r or α/√r).
    #[module(skip)]
    pub lora_scale: f32,
    /// Dropout on the adapter's input while training.
    #[module(skip)]
    pub lora_dropout: f32,
}

/// A bare linear weight (`<path>.weight`), as PEFT names LoRA's factors.
#[derive(Module, Debug)]
pub struct LinearWeight {
    /// The weight, `[out, in]`.
    pub weight: Param<Tensor<2>>,
}

impl Linear {
    /// PyTorch's default initialisation: U(±1/√in) for weight and bias.
    pub fn new(
        in_features: usize,
        out_features: usize,
        bias: bool,
        rng: &mut impl Rng,
        device: &Device,
    ) -> Self {
        let bound = 1.0 / (in_features as f32).sqrt();
        let mut uniform =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-bound..bound)).collect() };
        let weight = TensorData::new(
            uniform(out_features * in_features),
            [out_features, in_features],
        );
        let bias = bias.then(|| {
            Param::from_data(
                TensorData::new(uniform(out_features), [out_features]),
                device,
            )
        });
        Self {
            weight: Param::from_data(weight, device),
            bias,
            lora_a: None,
            lora_b: None,
            lora_magnitude: None,
            lora_scale: 0.0,
            lora_dropout: 0.0,
        }
    }

    /// # Shapes
    /// - input `[batch, in]` → output `[batch, out]`
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let base = x.clone().matmul(self.weight.val().transpose());
        let y = match &self.bias {
            Some(b) => base.clone().add(b.val().unsqueeze_dim(0)),
            None => base.clone(),
        };
        let (Some(a), Some(b)) = (&self.lora_a, &self.lora_b) else {
            return y;
        };
        let lora = |x: Tensor<2>| {
            x.matmul(a.weight.val().transpose())
                .matmul(b.weight.val().transpose())
                .mul_scalar(self.lora_scale)
        };
        let Some(m) = &self.lora_magnitude else {
            return y.add(lora(dropout(x, self.lora_dropout)));
        };
        // DoRA; see Conv2d::forward.
        let (x, base) = if dropout_active(&x, self.lora_dropout) {
            let x = dropout(x, self.lora_dropout);
            (x.clone(), x.matmul(self.weight.val().transpose()))
        } else {
            (x, base)
        };
        let g: Tensor<2> = m
            .val()
            .div(dora_norm(self.weight.val(), self.delta_weight(a, b)))
            .unsqueeze_dim(0);
        y.add(base.mul(g.clone().sub_scalar(1.0)))
            .add(lora(x).mul(g))
    }

    /// `s·B@A`: what merging adds to the weight.
    pub fn delta_weight(&self, a: &LinearWeight, b: &LinearWeight) -> Tensor<2> {
        b.weight
            .val()
            .matmul(a.weight.val())
            .mul_scalar(self.lora_scale)
    }
}

/// DoRA's ‖W + ΔW‖ per output channel (the L2 norm over all other
/// dimensions), detached from the graph as the DoRA paper (§4.3) and PEFT do.
pub fn dora_norm<const D: usize>(weight: Tensor<D>, delta: Tensor<D>) -> Tensor<1> {
    let dims = weight.dims();
    let rest: usize = dims[1..].iter().product();
    let w: Tensor<2> = weight.add(delta).detach().reshape([dims[0], rest]);
    w.powi_scalar(2).sum_dim(1).sqrt().reshape([dims[0]])
}

fn dropout_active<const D: usize>(x: &Tensor<D>, p: f32) -> bool {
    p > 0.0 && x.device().is_autodiff()
}

/// Inverted dropout with drop probability `p`, while training only (as
/// burn's and PyTorch's): evaluation leaves `x` as it is.
fn dropout<const D: usize>(x: Tensor<D>, p: f32) -> Tensor<D> {
    if dropout_active(&x, p) {
        let keep = 1.0 - p as f64;
        let mask = x.random_like(burn::tensor::Distribution::Bernoulli(keep));
        x.mul(mask).div_scalar(keep)
    } else {
        x
    }
}

/// Squeeze-and-excitation (Hu et al., 2018) on the bottleneck: global
/// context re-weights the channels, `x · σ(fc2(relu(fc1(mean_hw(x)))))`.
/// `fc1` narrows the channels 4x.
#[derive(Module, Debug)]
pub struct SqueezeExcitation {
    /// Squeeze, `channels → max(channels/4, 1)`.
    pub fc1: Linear,
    /// Excite, back to `channels`.
    pub fc2: Linear,
}

impl SqueezeExcitation {
    /// A block over `channels` channels.
    pub fn new(channels: usize, rng: &mut impl Rng, device: &Device) -> Self {
        let hidden = (channels / 4).max(1);
        Self {
            fc1: Linear::new(channels, hidden, true, rng, device),
            fc2: Linear::new(hidden, channels, true, rng, device),
        }
    }

    /// # Shapes
    /// - input `[batch, channels, h, w]` → output of the same shape
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let pooled: Tensor<2> = x.clone().reshape([b, c, h * w]).mean_dim(2).reshape([b, c]);
        let gate =
            activation::sigmoid(self.fc2.forward(activation::relu(self.fc1.forward(pooled))));
        x.mul(gate.reshape([b, c, 1, 1]))
    }
}
