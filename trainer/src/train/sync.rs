//! What data-parallel ranks exchange besides gradients: the starting state
//! (rank 0's, fresh or resumed), and small control values.

use burn::tensor::Device;

use super::optim::Optimizer;
use crate::collective::{Collective, CollectiveError};
use crate::model::SegNet;
use crate::model::params;

/// Broadcasts integers from rank 0, each as the bit patterns of two f32 words
/// (exact: no arithmetic touches them).
pub fn broadcast_u64s(c: &mut dyn Collective, values: &mut [u64]) -> Result<(), CollectiveError> {
    broadcast_from(c, values, 0)
}

/// Broadcasts integers from `root` (see [`broadcast_u64s`]).
pub fn broadcast_from(
    c: &mut dyn Collective,
    values: &mut [u64],
    root: usize,
) -> Result<(), CollectiveError> {
    let mut words: Vec<f32> = values
        .iter()
        .flat_map(|v| [f32::from_bits(*v as u32), f32::from_bits((*v >> 32) as u32)])
        .collect();
    c.broadcast(&mut words, root)?;
    for (v, pair) in values.iter_mut().zip(words.chunks_exact(2)) {
        *v = pair[0].to_bits() as u64 | (pair[1].to_bits() as u64) << 32;
    }
    Ok(())
}

/// Makes every rank start from rank 0's state: the step, the parameters, the
/// BatchNorm buffers and the optimiser state. Returns the step and the model.
pub fn adopt_root_state(
    c: &mut dyn Collective,
    start_step: u64,
    model: SegNet,
    trainable: &mut [f32],
    optimizer: &mut Optimizer,
    selection: &params::Trainable,
    device: &Device,
) -> Result<(u64, SegNet), CollectiveError> {
    let (t, slots) = optimizer.state();
    let mut header = vec![start_step, t, slots.len() as u64];
    header.extend(slots.iter().map(|(_, v)| v.len() as u64));
    broadcast_u64s(c, &mut header)?;
    let (start_step, t) = (header[0], header[1]);
    let names: Vec<&'static str> = slots.iter().map(|(n, _)| *n).collect();
    let mut received: Vec<Vec<f32>> = Vec::with_capacity(names.len());
    for (i, (_, local)) in slots.iter().enumerate() {
        let mut buf = local.to_vec();
        buf.resize(header[3 + i] as usize, 0.0);
        c.broadcast(&mut buf, 0)?;
        received.push(buf);
    }
    let n = trainable.len();
    optimizer
        .load_state(t, n, |slot| {
            names
                .iter()
                .position(|s| *s == slot)
                .map(|i| received[i].clone())
        })
        .map_err(|e| CollectiveError::Protocol {
            peer: 0,
            message: format!("rank 0's optimizer state does not fit this model: {e}"),
        })?;
    c.broadcast(trainable, 0)?;
    let mut buffers = params::buffer_values(&model);
    c.broadcast(&mut buffers, 0)?;
    let model = params::with_trainable_values_of(model, trainable, selection, device);
    Ok((
        start_step,
        params::with_buffer_values(model, &buffers, device),
    ))
}
