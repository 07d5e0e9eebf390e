use std::collections::HashMap;

use burn::tensor::{Device, Int, Tensor, TensorData};
use safetensors::SafeTensors;
use trainyard_trainer::config::{DecoderKind, ModelConfig};
use trainyard_trainer::model::SegNet;
use trainyard_trainer::model::params::load_named;
use trainyard_trainer::model::pool::{max_pool2x2, max_unpool2d, upsample_nearest};
use trainyard_trainer::tensorfile::{self, NamedTensor};

use crate::util::fixture;

fn f32_tensor(st: &SafeTensors, name: &str, device: &Device) -> Tensor<4> {
    let v = st.tensor(name).unwrap();
    let values: Vec<f32> = v
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let shape: [usize; 4] = v.shape().try_into().unwrap();
    Tensor::from_data(TensorData::new(values, shape), device)
}

fn values(t: Tensor<4>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn pooling_indices_and_unpooling_equal_pytorch() {
    let bytes = std::fs::read(fixture("pool.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let device = Device::flex();
    let x = f32_tensor(&st, "x", &device);
    let (pooled, indices) = max_pool2x2(x);

    let idx_view = st.tensor("indices").unwrap();
    let torch_idx: Vec<i64> = idx_view
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let ours: Vec<i64> = indices
        .clone()
        .into_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .unwrap();
    assert_eq!(
        ours, torch_idx,
        "argmax indices are PyTorch's flat h*w positions"
    );
    assert_eq!(
        values(pooled.clone()),
        values(f32_tensor(&st, "pooled", &device))
    );

    let unpooled = max_unpool2d(pooled.clone(), indices, [6, 8]);
    assert_eq!(
        values(unpooled),
        values(f32_tensor(&st, "unpooled", &device))
    );
    let nearest = upsample_nearest(pooled, [6, 8]);
    assert_eq!(values(nearest), values(f32_tensor(&st, "nearest", &device)));
}

fn whole_net_matches(decoder: DecoderKind, file: &str) {
    let device = Device::flex();
    let fixture = tensorfile::read(&fixture(file)).unwrap();
    let weights: HashMap<String, NamedTensor> = fixture
        .tensors
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("model.").map(|n| (n.to_owned(), v.clone())))
        .collect();
    let config = ModelConfig {
        widths: vec![4, 8],
        classes: 3,
        decoder,
        ..ModelConfig::default()
    };
    // Our module paths must be exactly PyTorch's: every name is found, none is left over.
    let model = SegNet::new(&config, 0, &device);
    let layout = trainyard_trainer::model::params::Layout::of(&model);
    let mut ours: Vec<&str> = layout.entries.iter().map(|e| e.name.as_str()).collect();
    let mut theirs: Vec<&str> = weights.keys().map(String::as_str).collect();
    ours.sort_unstable();
    theirs.sort_unstable();
    assert_eq!(ours, theirs);
    let model = load_named(model, |n| weights.get(n), &device).unwrap();

    let input = &fixture.tensors["input"];
    let x = Tensor::<4>::from_data(
        TensorData::new(input.values.clone(), [2, 3, 8, 12]),
        &device,
    );
    let logits = values(model.forward(x).logits);
    let diff = max_abs_diff(&logits, &fixture.tensors["logits"].values);
    assert!(diff < 1e-4, "max |ours - torch| = {diff}");
}

#[test]
fn whole_unpool_segnet_equals_pytorch_in_eval_mode() {
    whole_net_matches(DecoderKind::Unpool, "segnet_unpool.safetensors");
}

#[test]
fn whole_nearest_segnet_equals_pytorch_in_eval_mode() {
    whole_net_matches(DecoderKind::Nearest, "segnet_nearest.safetensors");
}

#[test]
fn int_indices_type_is_what_unpool_expects() {
    // Indices outside the plane would be silently dropped by a scatter on some
    // backends; ours are bounded by construction. Guard the shape contract.
    let device = Device::flex();
    let x = Tensor::<4>::from_data(
        TensorData::new((0..16).map(|v| v as f32).collect::<Vec<_>>(), [1, 1, 4, 4]),
        &device,
    );
    let (p, i): (Tensor<4>, Tensor<4, Int>) = max_pool2x2(x);
    assert_eq!(p.dims(), [1, 1, 2, 2]);
    let idx: Vec<i64> = i
        .into_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .unwrap();
    assert_eq!(idx, vec![5, 7, 13, 15]);
}
