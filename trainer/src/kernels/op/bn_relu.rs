//! Training-mode batch norm + ReLU as a burn operation.

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, ExtensionType, Flex, backend_extension};
use burn::tensor::{DType, Tensor};

use crate::kernels::bn_relu::BnRelu;

use super::{AutodiffFlexTensor, FlexTensor, dims4, from_values, values, vec1};

/// Output of [`bn_relu_train`]: the activation and the batch statistics.
#[derive(ExtensionType)]
pub struct BnReluOutput<B: Backend> {
    /// `max(0, γ·x̂ + β)`.
    pub output: FloatTensor<B>,
    /// Batch mean per channel (no gradient).
    pub mean: FloatTensor<B>,
    /// Biased batch variance per channel (no gradient).
    pub var: FloatTensor<B>,
}

/// Backends that can run [`bn_relu_train`].
#[backend_extension(Flex, Autodiff)]
pub trait BnReluBackend: Backend {
    /// Training-mode batch norm (batch statistics) followed by ReLU.
    fn bn_relu_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> BnReluOutput<Self>;
}

fn bn_geometry(x: &FlexTensor, eps: f64) -> BnRelu {
    let [n, c, h, w] = dims4(x);
    BnRelu {
        n,
        c,
        hw: h * w,
        eps,
    }
}

impl BnReluBackend for Flex {
    fn bn_relu_train(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        eps: f64,
    ) -> BnReluOutput<Self> {
        assert_eq!(x.dtype(), DType::F32, "bn_relu_train runs on f32 tensors");
        let geo = bn_geometry(&x, eps);
        let shape = dims4(&x);
        let f = geo.forward(&values(&x), &values(&gamma), &values(&beta));
        BnReluOutput {
            output: from_values(f.output, shape),
            mean: vec1(f.mean),
            var: vec1(f.var),
        }
    }
}

#[derive(Debug)]
struct BnReluGrad;

impl Backward<Flex, 3> for BnReluGrad {
    /// Input, γ and β (checkpointed), the batch statistics and eps.
    type State = (NodeId, NodeId, NodeId, Vec<f32>, Vec<f32>, f64);

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let (x_state, gamma_state, beta_state, mean, var, eps) = ops.state;
        let x = checkpointer.retrieve_node_output::<FlexTensor>(x_state);
        let gamma = checkpointer.retrieve_node_output::<FlexTensor>(gamma_state);
        let beta = checkpointer.retrieve_node_output::<FlexTensor>(beta_state);
        let geo = bn_geometry(&x, eps);
        let shape = dims4(&x);
        let g = geo.backward(
            &values(&x),
            (&values(&gamma), &values(&beta)),
            (&mean, &var),
            &values(&dy),
        );
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, from_values(g.dx, shape));
        }
        if let Some(node) = node_gamma {
            grads.register::<Flex>(node.id, vec1(g.dgamma));
        }
        if let Some(node) = node_beta {
            grads.register::<Flex>(node.id, vec1(g.dbeta));
        }
    }
}

impl<C: CheckpointStrategy> BnReluBackend for Autodiff<Flex, C> {
    fn bn_relu_train(
        x: AutodiffFlexTensor<C>,
        gamma: AutodiffFlexTensor<C>,
        beta: AutodiffFlexTensor<C>,
        eps: f64,
    ) -> BnReluOutput<Self> {
        let prep = BnReluGrad
            .prepare::<C>([x.node(), gamma.node(), beta.node()])
            .compute_bound()
            .stateful();
        let (output, mean, var) = match prep {
            OpsKind::Tracked(mut prep) => {
                let x_state = prep.checkpoint(&x);
                let gamma_state = prep.checkpoint(&gamma);
                let beta_state = prep.checkpoint(&beta);
                let f = Flex::bn_relu_train(
                    x.into_primitive(),
                    gamma.into_primitive(),
                    beta.into_primitive(),
                    eps,
                );
                let (mean, var) = (values(&f.mean).into_owned(), values(&f.var).into_owned());
                let state = (x_state, gamma_state, beta_state, mean, var, eps);
                (prep.finish(state, f.output), f.mean, f.var)
            }
            OpsKind::UnTracked(prep) => {
                let f = Flex::bn_relu_train(
                    x.into_primitive(),
                    gamma.into_primitive(),
                    beta.into_primitive(),
                    eps,
                );
                (prep.finish(f.output), f.mean, f.var)
            }
        };
        BnReluOutput {
            output,
            mean: AutodiffFlexTensor::<C>::new(mean),
            var: AutodiffFlexTensor::<C>::new(var),
        }
    }
}

/// What [`bn_relu_train`] returns as tensors.
pub struct BnReluTensors {
    /// The activation `[n, c, h, w]`.
    pub output: Tensor<4>,
    /// Batch mean `[c]`.
    pub mean: Tensor<1>,
    /// Biased batch variance `[c]`.
    pub var: Tensor<1>,
}

/// Training-mode batch norm followed by ReLU with our fused CPU kernels.
///
/// # Shapes
/// - `x` `[n, c, h, w]`, `gamma`, `beta` `[c]`
pub fn bn_relu_train(x: Tensor<4>, gamma: Tensor<1>, beta: Tensor<1>, eps: f64) -> BnReluTensors {
    let out = <Dispatch as BnReluBackend>::bn_relu_train(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        eps,
    );
    BnReluTensors {
        output: Tensor::from_dispatch(out.output),
        mean: Tensor::from_dispatch(out.mean),
        var: Tensor::from_dispatch(out.var),
    }
}
