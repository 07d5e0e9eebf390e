//! What data-parallel ranks exchange besides gradients: the starting state
//! (rank 0's, fresh or resumed), exact integers, and the check that they
//! still hold the same model.

use super::DataParallel;
use super::local_sgd::LocalSgd;
use crate::collective::{Collective, CollectiveError};
use crate::model::params;
use crate::train::learner::Learner;

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

/// Makes every rank start from rank 0's state: the step, the trained
/// parameters, the BatchNorm buffers, the optimiser state and local SGD's
/// anchor and outer momentum. Returns the step.
pub fn adopt_root_state(
    group: &mut DataParallel,
    start_step: u64,
    learner: &mut Learner,
    local_sgd: Option<&mut LocalSgd>,
) -> Result<u64, CollectiveError> {
    let c = group.collective();
    let (t, slots) = learner.optimizer().state();
    let mut header = vec![start_step, t, slots.len() as u64];
    header.extend(slots.iter().map(|(_, v)| v.len() as u64));
    broadcast_u64s(c, &mut header)?;
    let (start_step, t) = (header[0], header[1]);
    let n = learner.len();
    // Rank 0's lengths size buffers here: each must be this model's (or
    // empty, an SGD momentum before its first step).
    if header[2] != slots.len() as u64 || header[3..].iter().any(|&len| len != 0 && len != n as u64)
    {
        return Err(CollectiveError::Protocol {
            peer: 0,
            message: format!(
                "rank 0's optimizer state has {} buffers of {:?} values; this model trains {n} with {} buffers",
                header[2],
                &header[3..],
                slots.len()
            ),
        });
    }
    let mut received: Vec<(&'static str, Vec<f32>)> = Vec::with_capacity(slots.len());
    for (i, (name, mut buf)) in slots.into_iter().enumerate() {
        buf.resize(header[3 + i] as usize, 0.0);
        c.broadcast(&mut buf, 0)?;
        received.push((name, buf));
    }
    let device = learner.params().device();
    learner
        .optimizer_mut()
        .load_state(
            t,
            n,
            |slot| {
                received
                    .iter()
                    .find(|(s, _)| *s == slot)
                    .map(|(_, v)| v.clone())
            },
            &device,
        )
        .map_err(|e| CollectiveError::Protocol {
            peer: 0,
            message: format!("rank 0's optimizer state does not fit this model: {e}"),
        })?;
    let params = c.broadcast_tensor(learner.params().clone(), 0)?;
    let buffers = c.broadcast_tensor(learner.buffers(), 0)?;
    learner.set_params(params);
    learner.set_buffers(buffers);
    if let Some(l) = local_sgd {
        l.reset(learner.params());
        if let Some(outer) = l.outer.as_mut() {
            let mut len = [outer.momentum.len() as u64];
            broadcast_u64s(c, &mut len)?;
            if len[0] != 0 && len[0] != n as u64 {
                return Err(CollectiveError::Protocol {
                    peer: 0,
                    message: format!(
                        "rank 0's outer momentum has {} values; this model trains {n}",
                        len[0]
                    ),
                });
            }
            outer.momentum.resize(len[0] as usize, 0.0);
            c.broadcast(&mut outer.momentum, 0)?;
        }
    }
    Ok(start_step)
}

/// A hash of the bits of the trained parameters and the buffers (FNV-1a):
/// equal on every rank of a healthy group, and across runs that should be
/// bit-identical.
pub fn fingerprint(learner: &Learner) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in params::to_host(learner.params())
        .into_iter()
        .chain(params::to_host(&learner.buffers()))
    {
        for b in v.to_bits().to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Compares every rank's `fingerprint`: ranks that drifted apart (a broken
/// collective or device) are an error naming them, never a silent fork.
pub fn check_in_sync(c: &mut dyn Collective, fingerprint: u64) -> Result<(), CollectiveError> {
    for root in 0..c.world_size() {
        let mut theirs = [fingerprint];
        broadcast_from(c, &mut theirs, root)?;
        if theirs[0] != fingerprint {
            return Err(CollectiveError::WrongResult(format!(
                "the ranks' models differ: rank {root}'s parameters hash to {:016x}, rank {}'s to {fingerprint:016x}",
                theirs[0],
                c.rank()
            )));
        }
    }
    Ok(())
}
