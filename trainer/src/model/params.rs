//! Named, flat access to a module's tensors: the bridge between burn modules
//! and everything that treats parameters as plain `f32` buffers (optimisers,
//! checkpoints, all-reduce, federated updates).
//!
//! See [`Layout`] for the primary entry point. Names are dotted module paths
//! (`encoder.0.convs.1.conv.weight`); the order is the module's visiting order,
//! which is fixed by its structure, so two processes with the same config agree
//! on it without talking.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Device, Gradients, Tensor, TensorData};

/// One tensor of a module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Dotted module path.
    pub name: String,
    /// Tensor shape.
    pub shape: Vec<usize>,
    /// Number of elements.
    pub len: usize,
    /// Trained by the optimiser (`false` for buffers such as BN running statistics).
    pub trainable: bool,
}

/// The tensors of a module, in visiting order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// All tensors, trainable ones and buffers interleaved as visited.
    pub entries: Vec<Entry>,
}

/// Whether a leaf name is a buffer rather than a parameter. Running statistics
/// are the only buffers the SegNet family has (PyTorch's `register_buffer`s).
fn is_buffer(name: &str) -> bool {
    let leaf = name.rsplit('.').next().unwrap_or(name);
    leaf.starts_with("running_")
}

struct PathTracker(Vec<String>);

impl PathTracker {
    fn enter(&mut self, name: &str) {
        self.0.push(name.to_owned());
    }
    fn exit(&mut self) {
        self.0.pop();
    }
    fn name(&self) -> String {
        self.0.join(".")
    }
}

impl Layout {
    /// Reads the layout of `module`.
    pub fn of<M: Module>(module: &M) -> Self {
        struct V {
            path: PathTracker,
            entries: Vec<Entry>,
        }
        impl ModuleVisitor for V {
            fn enter_module(&mut self, name: &str, _: &str) {
                self.path.enter(name);
            }
            fn exit_module(&mut self, _: &str, _: &str) {
                self.path.exit();
            }
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let name = self.path.name();
                let shape = param.shape().to_vec();
                self.entries.push(Entry {
                    trainable: !is_buffer(&name),
                    len: shape.iter().product(),
                    name,
                    shape,
                });
            }
        }
        let mut v = V {
            path: PathTracker(Vec::new()),
            entries: Vec::new(),
        };
        module.visit(&mut v);
        Self { entries: v.entries }
    }

    /// The trainable entries, in order.
    pub fn trainable(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter().filter(|e| e.trainable)
    }
}

fn tensor_values<const D: usize>(t: &Tensor<D>) -> Vec<f32> {
    t.to_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("converted to f32 above")
}

/// Copies every tensor of `module` (trainable or not, per `select`) into one
/// flat vector, in layout order.
fn gather<M: Module>(module: &M, select: &dyn Fn(&str) -> bool) -> Vec<f32> {
    struct V<'a> {
        path: PathTracker,
        select: &'a dyn Fn(&str) -> bool,
        out: Vec<f32>,
    }
    impl ModuleVisitor for V<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.enter(name);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if (self.select)(&self.path.name()) {
                self.out.extend(tensor_values(&param.val()));
            }
        }
    }
    let mut v = V {
        path: PathTracker(Vec::new()),
        select,
        out: Vec::new(),
    };
    module.visit(&mut v);
    v.out
}

/// The trainable parameters of `module`, flattened in layout order.
pub fn trainable_values<M: Module>(module: &M) -> Vec<f32> {
    trainable_values_of(module, &Trainable::All)
}

/// The parameters `selection` trains, flattened in layout order.
pub fn trainable_values_of<M: Module>(module: &M, selection: &Trainable) -> Vec<f32> {
    gather(module, &|n| selection.trains(n))
}

/// The buffers (running statistics) of `module`, flattened in layout order.
pub fn buffer_values<M: Module>(module: &M) -> Vec<f32> {
    gather(module, &is_buffer)
}

/// Every tensor of `module` by name, for checkpoints and exports.
pub fn named_values<M: Module>(module: &M) -> Vec<(Entry, Vec<f32>)> {
    let layout = Layout::of(module);
    let mut all = gather(module, &|_| true).into_iter();
    layout
        .entries
        .into_iter()
        .map(|e| {
            let values: Vec<f32> = all.by_ref().take(e.len).collect();
            (e, values)
        })
        .collect()
}

/// The gradient of every trainable parameter, flattened in layout order;
/// parameters that did not take part in the loss get zeros.
pub fn gradient_values<M: Module>(module: &M, grads: &Gradients) -> Vec<f32> {
    gradient_values_of(module, grads, &Trainable::All)
}

/// [`gradient_values`] of the parameters `selection` trains.
pub fn gradient_values_of<M: Module>(
    module: &M,
    grads: &Gradients,
    selection: &Trainable,
) -> Vec<f32> {
    struct V<'a> {
        path: PathTracker,
        grads: &'a Gradients,
        selection: &'a Trainable,
        out: Vec<f32>,
    }
    impl ModuleVisitor for V<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.enter(name);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if !self.selection.trains(&self.path.name()) {
                return;
            }
            let value = param.val();
            match value.grad(self.grads) {
                Some(g) => self.out.extend(tensor_values(&g)),
                None => self
                    .out
                    .extend(std::iter::repeat_n(0.0, value.shape().num_elements())),
            }
        }
    }
    let mut v = V {
        path: PathTracker(Vec::new()),
        grads,
        selection,
        out: Vec::new(),
    };
    module.visit(&mut v);
    v.out
}

/// Returns `module` with the tensors chosen by `select` replaced, in layout
/// order, by consecutive runs of `values` (copied to `device`). Gradient
/// tracking is preserved.
fn scatter<M: Module>(
    module: M,
    values: &[f32],
    select: &dyn Fn(&str) -> bool,
    device: &Device,
) -> M {
    let flat = from_host(values.to_vec(), &device.clone().without_autodiff());
    unflatten(module, &flat, select)
}

/// Returns `module` with its trainable parameters set from `values` (layout order).
pub fn with_trainable_values<M: Module>(module: M, values: &[f32], device: &Device) -> M {
    with_trainable_values_of(module, values, &Trainable::All, device)
}

/// Returns `module` with the parameters `selection` trains set from `values`.
pub fn with_trainable_values_of<M: Module>(
    module: M,
    values: &[f32],
    selection: &Trainable,
    device: &Device,
) -> M {
    scatter(module, values, &|n| selection.trains(n), device)
}

/// Returns `module` with its buffers set from `values` (layout order).
pub fn with_buffer_values<M: Module>(module: M, values: &[f32], device: &Device) -> M {
    scatter(module, values, &is_buffer, device)
}

/// A flat tensor's values, copied to the host.
pub fn to_host(t: &Tensor<1>) -> Vec<f32> {
    t.to_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("converted to f32 above")
}

/// Host values as a flat tensor on `device`.
pub fn from_host(values: Vec<f32>, device: &Device) -> Tensor<1> {
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [n]), device)
}

/// Where [`flatten`] takes each tensor from.
enum Source<'a> {
    /// The tensor's value.
    Values,
    /// Its gradient (zeros when it took no part in the loss).
    Gradients(&'a Gradients),
}

/// The tensors `select` picks, in layout order, as one flat tensor on their
/// device without autodiff: the form the optimiser and the collectives work on,
/// so that on a GPU nothing leaves device memory.
fn flatten<M: Module>(
    module: &M,
    select: &dyn Fn(&str) -> bool,
    source: Source,
    device: &Device,
) -> Tensor<1> {
    struct V<'a> {
        path: PathTracker,
        select: &'a dyn Fn(&str) -> bool,
        source: Source<'a>,
        device: Device,
        parts: Vec<Tensor<1>>,
    }
    impl ModuleVisitor for V<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.enter(name);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if !(self.select)(&self.path.name()) {
                return;
            }
            let value = param.val();
            let n = value.shape().num_elements();
            let part = match &self.source {
                Source::Values => value.inner().reshape([n]),
                Source::Gradients(grads) => match value.grad(grads) {
                    Some(g) => g.reshape([n]),
                    None => Tensor::zeros([n], &self.device),
                },
            };
            self.parts.push(part);
        }
    }
    let device = device.clone().without_autodiff();
    let mut v = V {
        path: PathTracker(Vec::new()),
        select,
        source,
        device: device.clone(),
        parts: Vec::new(),
    };
    module.visit(&mut v);
    if v.parts.is_empty() {
        return from_host(Vec::new(), &device);
    }
    Tensor::cat(v.parts, 0)
}

/// Returns `module` with the tensors `select` picks replaced, in layout
/// order, by consecutive slices of `flat` (which stays on its device).
/// Autodiff association and gradient tracking are kept as they were.
fn unflatten<M: Module>(module: M, flat: &Tensor<1>, select: &dyn Fn(&str) -> bool) -> M {
    struct Mp<'a> {
        path: PathTracker,
        select: &'a dyn Fn(&str) -> bool,
        flat: &'a Tensor<1>,
        offset: usize,
    }
    impl ModuleMapper for Mp<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.enter(name);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.exit();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            if !(self.select)(&self.path.name()) {
                return param;
            }
            let (id, old, mapper) = param.consume();
            let shape = old.shape();
            let n = shape.num_elements();
            let mut t: Tensor<D> = self.flat.clone().narrow(0, self.offset, n).reshape(shape);
            self.offset += n;
            if old.is_autodiff() {
                t = t.autodiff();
            }
            if old.is_require_grad() {
                t = t.require_grad();
            }
            Param::from_mapped_value(id, t, mapper)
        }
    }
    let len = flat.dims()[0];
    let mut m = Mp {
        path: PathTracker(Vec::new()),
        select,
        flat,
        offset: 0,
    };
    let module = module.map(&mut m);
    assert_eq!(
        m.offset, len,
        "flat tensor length must match the module's layout"
    );
    module
}

/// The parameters `selection` trains as one flat tensor on `device` (layout
/// order; [`trainable_values_of`] on the host).
pub fn flat_trainable_of<M: Module>(
    module: &M,
    selection: &Trainable,
    device: &Device,
) -> Tensor<1> {
    flatten(module, &|n| selection.trains(n), Source::Values, device)
}

/// The buffers (running statistics) as one flat tensor on `device`.
pub fn flat_buffers<M: Module>(module: &M, device: &Device) -> Tensor<1> {
    flatten(module, &is_buffer, Source::Values, device)
}

/// The gradients of the parameters `selection` trains as one flat tensor on
/// `device`, zeros for those that took no part in the loss
/// ([`gradient_values_of`] on the host).
pub fn flat_gradients_of<M: Module>(
    module: &M,
    grads: &Gradients,
    selection: &Trainable,
    device: &Device,
) -> Tensor<1> {
    flatten(
        module,
        &|n| selection.trains(n),
        Source::Gradients(grads),
        device,
    )
}

/// Returns `module` with the parameters `selection` trains set from `flat`.
pub fn with_flat_trainable_of<M: Module>(module: M, flat: &Tensor<1>, selection: &Trainable) -> M {
    unflatten(module, flat, &|n| selection.trains(n))
}

/// Returns `module` with its buffers set from `flat`.
pub fn with_flat_buffers<M: Module>(module: M, flat: &Tensor<1>) -> M {
    unflatten(module, flat, &is_buffer)
}

/// Which parameters an optimiser trains; buffers never are. Fine-tuning an
/// adapter trains a few tensors and freezes the rest of the base.
#[derive(Clone, Default)]
pub enum Trainable {
    /// Every parameter.
    #[default]
    All,
    /// The parameters whose names the predicate accepts.
    Matching(std::sync::Arc<dyn Fn(&str) -> bool + Send + Sync>),
}

impl std::fmt::Debug for Trainable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::All => f.write_str("All"),
            Self::Matching(_) => f.write_str("Matching(..)"),
        }
    }
}

impl Trainable {
    /// Whether the tensor `name` is trained.
    pub fn trains(&self, name: &str) -> bool {
        !is_buffer(name)
            && match self {
                Self::All => true,
                Self::Matching(f) => f(name),
            }
    }
}

/// Stops gradient tracking of every parameter `selection` does not train, so
/// backward passes neither compute nor keep their gradients.
pub fn freeze<M: Module>(module: M, selection: &Trainable) -> M {
    struct Mp<'a> {
        path: PathTracker,
        selection: &'a Trainable,
    }
    impl ModuleMapper for Mp<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.enter(name);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.exit();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let name = self.path.name();
            if is_buffer(&name) || self.selection.trains(&name) {
                param
            } else {
                param.set_require_grad(false)
            }
        }
    }
    module.map(&mut Mp {
        path: PathTracker(Vec::new()),
        selection,
    })
}

/// A named tensor is missing or has the wrong shape.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum LoadError {
    /// The source has no tensor of that name.
    #[error("no tensor `{0}` (was it written for another model config?)")]
    Missing(String),
    /// The shapes differ.
    #[error("tensor `{name}` has shape {got:?}, the model expects {expected:?}")]
    Shape {
        /// The tensor.
        name: String,
        /// Shape in the source.
        got: Vec<usize>,
        /// Shape in the model.
        expected: Vec<usize>,
    },
}

/// Returns `module` with every tensor (parameters and buffers) taken by name
/// from `get`.
pub fn load_named<'a, M: Module>(
    module: M,
    get: impl Fn(&str) -> Option<&'a crate::tensorfile::NamedTensor>,
    device: &Device,
) -> Result<M, LoadError> {
    let layout = Layout::of(&module);
    let (mut trainable, mut buffers) = (Vec::new(), Vec::new());
    for e in &layout.entries {
        let t = get(&e.name).ok_or_else(|| LoadError::Missing(e.name.clone()))?;
        if t.shape != e.shape {
            return Err(LoadError::Shape {
                name: e.name.clone(),
                got: t.shape.clone(),
                expected: e.shape.clone(),
            });
        }
        if e.trainable {
            trainable.extend_from_slice(&t.values);
        } else {
            buffers.extend_from_slice(&t.values);
        }
    }
    let module = with_trainable_values(module, &trainable, device);
    Ok(with_buffer_values(module, &buffers, device))
}
