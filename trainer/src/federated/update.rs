//! Model tensors on the wire (safetensors) and the checks every client
//! update passes before it may be aggregated. A rejected update is answered
//! with a 4xx naming the reason and counted; it never reaches aggregation.

use std::collections::HashMap;
use std::path::Path;

use crate::model::params::Layout;
use crate::tensorfile::{self, NamedTensor};

/// The tensors a model update must carry, in layout order.
#[derive(Debug, Clone, PartialEq)]
pub struct Schema {
    /// Names and shapes.
    pub entries: Vec<(String, Vec<usize>)>,
    /// Total values.
    pub len: usize,
}

/// Why an update was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    /// Missing or wrong bearer token.
    #[error("bad or missing token for client {0}")]
    Token(usize),
    /// A client index outside the job.
    #[error("client {0} is not part of this job")]
    UnknownClient(usize),
    /// An update for a round other than the current one (replayed or late).
    #[error("update for round {got}, but the current round is {current}")]
    Stale {
        /// Round the update claims.
        got: u64,
        /// Round in progress (0 between rounds).
        current: u64,
    },
    /// The client was not sampled this round, or already submitted.
    #[error("client {client} has no open task in round {round}")]
    NotExpected {
        /// The client.
        client: usize,
        /// The round.
        round: u64,
    },
    /// The body exceeds the largest valid update (or federated.max_update_mib).
    #[error(
        "an update of {bytes} bytes is more than the {limit} bytes a valid update of this model can be"
    )]
    TooLarge {
        /// Body size.
        bytes: usize,
        /// Limit.
        limit: usize,
    },
    /// Not safetensors, or not f32, or bad metadata.
    #[error("malformed update: {0}")]
    Malformed(String),
    /// Tensor names differ from the model's.
    #[error("tensor names differ from the model's: missing {missing:?}, unexpected {unexpected:?}")]
    Names {
        /// Expected but absent (first few).
        missing: Vec<String>,
        /// Present but unknown (first few).
        unexpected: Vec<String>,
    },
    /// A tensor has the wrong shape.
    #[error("tensor `{name}` has shape {got:?}, the model's is {want:?}")]
    Shape {
        /// The tensor.
        name: String,
        /// Its shape.
        got: Vec<usize>,
        /// The model's.
        want: Vec<usize>,
    },
    /// NaN or infinity.
    #[error("tensor `{0}` holds NaN or infinite values")]
    NonFinite(String),
    /// The client already has an update being received.
    #[error("client {0} already has an update in flight; one at a time")]
    Busy(usize),
    /// The body did not arrive within its deadline.
    #[error("the update's body did not arrive within {0:?}")]
    Slow(std::time::Duration),
    /// The client claims more examples than it can hold.
    #[error("metadata `examples` is {got}, more than the {cap} this client can have")]
    Examples {
        /// Claimed.
        got: u64,
        /// The cap.
        cap: u64,
    },
    /// The update's L2 norm is beyond `federated.max_update_norm`.
    #[error("update norm {norm:.4} exceeds federated.max_update_norm {bound}")]
    Norm {
        /// Its norm.
        norm: f64,
        /// The bound.
        bound: f64,
    },
}

impl Rejection {
    /// A short label for metrics (`trainyard_federated_updates_rejected_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Token(_) => "token",
            Self::UnknownClient(_) => "unknown_client",
            Self::Stale { .. } => "stale_round",
            Self::NotExpected { .. } => "not_expected",
            Self::TooLarge { .. } => "too_large",
            Self::Malformed(_) => "malformed",
            Self::Names { .. } => "names",
            Self::Shape { .. } => "shape",
            Self::NonFinite(_) => "non_finite",
            Self::Norm { .. } => "norm",
            Self::Busy(_) => "busy",
            Self::Slow(_) => "slow",
            Self::Examples { .. } => "examples",
        }
    }

    /// The HTTP status it is answered with.
    pub fn status(&self) -> u16 {
        match self {
            Self::Token(_) => 401,
            Self::UnknownClient(_) => 404,
            Self::Stale { .. } | Self::NotExpected { .. } => 409,
            Self::TooLarge { .. } => 413,
            Self::Busy(_) => 429,
            Self::Slow(_) => 408,
            _ => 422,
        }
    }
}

impl Schema {
    /// The tensors of a model layout (parameters and buffers).
    pub fn of(layout: &Layout) -> Self {
        let entries: Vec<(String, Vec<usize>)> = layout
            .entries
            .iter()
            .map(|e| (e.name.clone(), e.shape.clone()))
            .collect();
        let len = layout.entries.iter().map(|e| e.len).sum();
        Self { entries, len }
    }

    /// Named tensors of a flat vector, for the wire.
    pub fn tensors(&self, flat: &[f32]) -> Vec<(String, NamedTensor)> {
        assert_eq!(flat.len(), self.len);
        let mut at = 0;
        self.entries
            .iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let values = flat[at..at + n].to_vec();
                at += n;
                (
                    name.clone(),
                    NamedTensor {
                        shape: shape.clone(),
                        values,
                    },
                )
            })
            .collect()
    }

    /// The size of the largest valid update: every tensor, with the metadata
    /// a client sends (`round`, `examples`, `loss`) at its longest. Nothing
    /// larger is read.
    pub fn max_update_bytes(&self) -> usize {
        let longest = HashMap::from([
            ("round".to_string(), u64::MAX.to_string()),
            ("examples".to_string(), u64::MAX.to_string()),
            ("loss".to_string(), f64::MIN.to_string()),
        ]);
        // The header is JSON: a different order or spacing of the same keys
        // stays well within this slack.
        self.encode(&vec![0.0; self.len], longest).len() + 1024
    }

    /// Safetensors bytes of a flat vector with metadata.
    pub fn encode(&self, flat: &[f32], metadata: HashMap<String, String>) -> Vec<u8> {
        tensorfile::to_bytes(&self.tensors(flat), metadata)
    }

    /// Parses and checks safetensors bytes against the schema: f32, exactly
    /// the model's names, its shapes, finite values. Returns the flat vector
    /// in layout order and the metadata.
    pub fn decode(&self, bytes: &[u8]) -> Result<(Vec<f32>, HashMap<String, String>), Rejection> {
        let file = tensorfile::parse(Path::new("update"), bytes)
            .map_err(|e| Rejection::Malformed(e.to_string()))?;
        let missing: Vec<String> = self
            .entries
            .iter()
            .filter(|(n, _)| !file.tensors.contains_key(n))
            .map(|(n, _)| n.clone())
            .take(5)
            .collect();
        let mut unexpected: Vec<String> = file
            .tensors
            .keys()
            .filter(|k| !self.entries.iter().any(|(n, _)| n == *k))
            .cloned()
            .collect();
        unexpected.sort();
        unexpected.truncate(5);
        if !missing.is_empty() || !unexpected.is_empty() {
            return Err(Rejection::Names {
                missing,
                unexpected,
            });
        }
        let mut flat = Vec::with_capacity(self.len);
        for (name, shape) in &self.entries {
            let t = &file.tensors[name];
            if &t.shape != shape {
                return Err(Rejection::Shape {
                    name: name.clone(),
                    got: t.shape.clone(),
                    want: shape.clone(),
                });
            }
            if t.values.iter().any(|v| !v.is_finite()) {
                return Err(Rejection::NonFinite(name.clone()));
            }
            flat.extend_from_slice(&t.values);
        }
        Ok((flat, file.metadata))
    }
}

/// A metadata value parsed as `T`, or a rejection naming the key.
pub fn meta<T: std::str::FromStr>(m: &HashMap<String, String>, key: &str) -> Result<T, Rejection> {
    m.get(key)
        .ok_or_else(|| Rejection::Malformed(format!("metadata `{key}` is missing")))?
        .parse()
        .map_err(|_| Rejection::Malformed(format!("metadata `{key}` is not valid")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Schema {
        Schema {
            entries: vec![("a.weight".into(), vec![2, 2]), ("b.bias".into(), vec![3])],
            len: 7,
        }
    }

    #[test]
    fn round_trip_keeps_layout_order_and_metadata() {
        let s = schema();
        let flat: Vec<f32> = (0..7).map(|i| i as f32).collect();
        let bytes = s.encode(&flat, HashMap::from([("round".into(), "3".into())]));
        let (back, m) = s.decode(&bytes).unwrap();
        assert_eq!(back, flat);
        assert_eq!(meta::<u64>(&m, "round").unwrap(), 3);
        assert!(meta::<u64>(&m, "examples").is_err());
    }

    #[test]
    fn hostile_updates_are_rejected_by_reason() {
        let s = schema();
        let t = |name: &str, shape: Vec<usize>, v: f32| {
            let n = shape.iter().product();
            (
                name.to_string(),
                NamedTensor {
                    shape,
                    values: vec![v; n],
                },
            )
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"not safetensors".to_vec(), "malformed"),
            (
                tensorfile::to_bytes(&[t("a.weight", vec![2, 2], 1.0)], HashMap::new()),
                "names",
            ),
            (
                tensorfile::to_bytes(
                    &[
                        t("a.weight", vec![2, 2], 1.0),
                        t("b.bias", vec![3], 1.0),
                        t("evil", vec![1], 1.0),
                    ],
                    HashMap::new(),
                ),
                "names",
            ),
            (
                tensorfile::to_bytes(
                    &[t("a.weight", vec![4], 1.0), t("b.bias", vec![3], 1.0)],
                    HashMap::new(),
                ),
                "shape",
            ),
            (
                tensorfile::to_bytes(
                    &[
                        t("a.weight", vec![2, 2], f32::NAN),
                        t("b.bias", vec![3], 1.0),
                    ],
                    HashMap::new(),
                ),
                "non_finite",
            ),
            (
                tensorfile::to_bytes(
                    &[
                        t("a.weight", vec![2, 2], 1.0),
                        t("b.bias", vec![3], f32::INFINITY),
                    ],
                    HashMap::new(),
                ),
                "non_finite",
            ),
        ];
        for (bytes, reason) in cases {
            let r = s.decode(&bytes).unwrap_err();
            assert_eq!(r.reason(), reason, "{r}");
            assert_eq!(r.status(), 422);
        }
        // A bf16 tensor under a right name is malformed (not f32).
        let raw = vec![0u8; 8];
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![2, 2], &raw)
            .unwrap();
        let bytes = safetensors::serialize([("a.weight", view)], None).unwrap();
        assert_eq!(s.decode(&bytes).unwrap_err().reason(), "malformed");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]

        /// Arbitrary bytes never panic the decoder and never pass as an update.
        #[test]
        fn arbitrary_bytes_are_refused_without_panicking(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            proptest::prop_assert!(schema().decode(&bytes).is_err());
        }

        /// A valid update with any one byte changed decodes to the same tensors
        /// or is refused; it never panics (header bytes change the JSON, data
        /// bytes change a value, possibly to NaN).
        #[test]
        fn single_byte_corruptions_are_refused_or_harmless(at in 0usize..200, to in proptest::num::u8::ANY) {
            let s = schema();
            let flat: Vec<f32> = (0..7).map(|i| i as f32 * 0.5).collect();
            let mut bytes = s.encode(&flat, HashMap::from([("round".into(), "1".into())]));
            let at = at % bytes.len();
            bytes[at] = to;
            if let Ok((values, _)) = s.decode(&bytes) {
                proptest::prop_assert_eq!(values.len(), 7);
                proptest::prop_assert!(values.iter().all(|v| v.is_finite()));
            }
        }
    }
}
