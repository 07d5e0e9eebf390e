//! Gradient exchange strategies for data-parallel training beyond a plain
//! all-reduce. See [`topk::TopK`].

pub mod topk;
