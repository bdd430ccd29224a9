//! A session's state as named tensors: the placement-free form that snapshots, exports and
//! imports carry. Layers are named by their index in the whole model (`layers.3.ssm`), so a
//! pipeline stage exports and imports exactly the layers it holds, whatever split the state
//! was taken under; an import checks every tensor it needs against the fresh state's size.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Values of one state tensor, in the dtype the state keeps them (restored bit for bit).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum StateValue {
    F32(Vec<f32>),
    F64(Vec<f64>),
    U64(Vec<u64>),
    U8(Vec<u8>),
}

impl StateValue {
    pub fn dtype(&self) -> &'static str {
        match self {
            StateValue::F32(_) => "F32",
            StateValue::F64(_) => "F64",
            StateValue::U64(_) => "U64",
            StateValue::U8(_) => "U8",
        }
    }

    pub fn len(&self) -> usize {
        match self {
            StateValue::F32(v) => v.len(),
            StateValue::F64(v) => v.len(),
            StateValue::U64(v) => v.len(),
            StateValue::U8(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of the values.
    pub fn size_bytes(&self) -> usize {
        match self {
            StateValue::F32(v) => 4 * v.len(),
            StateValue::F64(v) => 8 * v.len(),
            StateValue::U64(v) => 8 * v.len(),
            StateValue::U8(v) => v.len(),
        }
    }
}

/// Why a state could not be taken in.
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
pub enum StateError {
    #[error("the state has no tensor {name:?}, which this model's session state needs")]
    Missing { name: String },
    #[error(
        "state tensor {name:?} is {found_dtype} with {found} values; this model's is {expected_dtype} with {expected}"
    )]
    Shape {
        name: String,
        found_dtype: String,
        found: usize,
        expected_dtype: String,
        expected: usize,
    },
    #[error("{what} cannot be exported or imported yet (CPU sessions can)")]
    Unsupported { what: String },
}

/// A session's state (or the part of it one stage holds) as named tensors.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StateTensors(pub BTreeMap<String, StateValue>);

impl StateTensors {
    pub fn put(&mut self, name: impl Into<String>, value: StateValue) {
        self.0.insert(name.into(), value);
    }

    pub fn put_f32(&mut self, name: impl Into<String>, values: &[f32]) {
        self.put(name, StateValue::F32(values.to_vec()));
    }

    pub fn put_u64(&mut self, name: impl Into<String>, value: u64) {
        self.put(name, StateValue::U64(vec![value]));
    }

    pub fn put_bytes(&mut self, name: impl Into<String>, bytes: &[u8]) {
        self.put(name, StateValue::U8(bytes.to_vec()));
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    fn get(&self, name: &str) -> Result<&StateValue, StateError> {
        self.0.get(name).ok_or_else(|| StateError::Missing {
            name: name.to_string(),
        })
    }

    fn mismatch(name: &str, found: &StateValue, dtype: &str, expected: usize) -> StateError {
        StateError::Shape {
            name: name.to_string(),
            found_dtype: found.dtype().to_string(),
            found: found.len(),
            expected_dtype: dtype.to_string(),
            expected,
        }
    }

    /// Fills `into` from f32 tensor `name`, which must hold exactly `into.len()` values.
    pub fn take_f32(&self, name: &str, into: &mut [f32]) -> Result<(), StateError> {
        match self.get(name)? {
            StateValue::F32(v) if v.len() == into.len() => {
                into.copy_from_slice(v);
                Ok(())
            }
            other => Err(Self::mismatch(name, other, "F32", into.len())),
        }
    }

    /// Fills `into` from f64 tensor `name`, which must hold exactly `into.len()` values.
    pub fn take_f64(&self, name: &str, into: &mut [f64]) -> Result<(), StateError> {
        match self.get(name)? {
            StateValue::F64(v) if v.len() == into.len() => {
                into.copy_from_slice(v);
                Ok(())
            }
            other => Err(Self::mismatch(name, other, "F64", into.len())),
        }
    }

    /// The one value of u64 tensor `name`.
    pub fn u64(&self, name: &str) -> Result<u64, StateError> {
        match self.get(name)? {
            StateValue::U64(v) if v.len() == 1 => Ok(v[0]),
            other => Err(Self::mismatch(name, other, "U64", 1)),
        }
    }

    /// The bytes of u8 tensor `name` (any length).
    pub fn bytes(&self, name: &str) -> Result<&[u8], StateError> {
        match self.get(name)? {
            StateValue::U8(v) => Ok(v),
            other => Err(Self::mismatch(name, other, "U8", other.len())),
        }
    }

    /// The values of f32 tensor `name` (any length).
    pub fn f32s(&self, name: &str) -> Result<&[f32], StateError> {
        match self.get(name)? {
            StateValue::F32(v) => Ok(v),
            other => Err(Self::mismatch(name, other, "F32", other.len())),
        }
    }

    /// Moves every tensor of `other` in (a later stage's part of the same session).
    pub fn merge(&mut self, other: StateTensors) {
        self.0.extend(other.0);
    }

    pub fn size_bytes(&self) -> usize {
        self.0.values().map(StateValue::size_bytes).sum()
    }
}

/// A layer's recurrent state as named f32 fields (`conv`, `ssm`, ...), for the families whose
/// layers keep only f32 buffers of a fixed size.
pub trait LayerFields {
    fn fields(&self) -> Vec<(&'static str, &[f32])>;
    fn fields_mut(&mut self) -> Vec<(&'static str, &mut [f32])>;
}

/// Writes every layer's fields as `layers.{first + i}.{field}`.
pub fn export_layers<L: LayerFields>(layers: &[L], first: usize, out: &mut StateTensors) {
    for (i, layer) in layers.iter().enumerate() {
        for (field, values) in layer.fields() {
            out.put_f32(format!("layers.{}.{field}", first + i), values);
        }
    }
}

/// Reads every layer's fields from `layers.{first + i}.{field}`.
pub fn import_layers<L: LayerFields>(
    layers: &mut [L],
    first: usize,
    from: &StateTensors,
) -> Result<(), StateError> {
    for (i, layer) in layers.iter_mut().enumerate() {
        for (field, values) in layer.fields_mut() {
            from.take_f32(&format!("layers.{}.{field}", first + i), values)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tensor_of_the_wrong_size_or_dtype_is_refused_by_name() {
        let mut t = StateTensors::default();
        t.put_f32("layers.0.ssm", &[1.0, 2.0]);
        t.put_u64("position", 7);
        let mut into = [0.0f32; 3];
        let e = t.take_f32("layers.0.ssm", &mut into).unwrap_err();
        assert!(
            e.to_string()
                .contains("\"layers.0.ssm\" is F32 with 2 values")
        );
        let mut two = [0.0f32; 2];
        t.take_f32("layers.0.ssm", &mut two).unwrap();
        assert_eq!(two, [1.0, 2.0]);
        assert!(matches!(
            t.take_f32("position", &mut two),
            Err(StateError::Shape { .. })
        ));
        assert!(matches!(
            t.u64("layers.1.conv"),
            Err(StateError::Missing { .. })
        ));
        assert_eq!(t.u64("position").unwrap(), 7);
    }
}
