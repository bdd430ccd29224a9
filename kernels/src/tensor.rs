//! The owned f32 [`Tensor`] and the read-only [`Weight`] storage.

use std::fmt;
use std::sync::Arc;

/// A shape that does not fit the data it describes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("shape {shape:?} holds {expected} elements but {found} were given")]
pub struct ShapeError {
    pub shape: Vec<usize>,
    pub expected: usize,
    pub found: usize,
}

/// An owned, contiguous, row-major f32 tensor.
#[derive(Clone, PartialEq)]
pub struct Tensor {
    data: Vec<f32>,
    shape: Vec<usize>,
}

impl Tensor {
    pub fn zeros(shape: &[usize]) -> Self {
        Tensor {
            data: vec![0.0; shape.iter().product()],
            shape: shape.to_vec(),
        }
    }

    pub fn from_vec(data: Vec<f32>, shape: &[usize]) -> Result<Self, ShapeError> {
        let expected: usize = shape.iter().product();
        if expected != data.len() {
            return Err(ShapeError {
                shape: shape.to_vec(),
                expected,
                found: data.len(),
            });
        }
        Ok(Tensor {
            data,
            shape: shape.to_vec(),
        })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn data(&self) -> &[f32] {
        &self.data
    }

    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    pub fn into_vec(self) -> Vec<f32> {
        self.data
    }

    /// Row `i` of a tensor seen as `[shape[0], rest]`.
    pub fn row(&self, i: usize) -> &[f32] {
        let width = self.row_len();
        &self.data[i * width..(i + 1) * width]
    }

    /// Number of elements in one row (all dimensions but the first).
    pub fn row_len(&self) -> usize {
        self.shape.iter().skip(1).product()
    }

    /// Appends the rows of `other` (same trailing shape) below this tensor's.
    pub fn append_rows(&mut self, other: &Tensor) -> Result<(), ShapeError> {
        if self.shape.len() != other.shape.len() || self.shape[1..] != other.shape[1..] {
            return Err(ShapeError {
                shape: self.shape.clone(),
                expected: self.row_len(),
                found: other.row_len(),
            });
        }
        self.data.extend_from_slice(&other.data);
        self.shape[0] += other.shape[0];
        Ok(())
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor{:?}", self.shape)
    }
}

/// Bytes that a [`Weight`] can borrow its values from (a memory-mapped checkpoint file).
pub type SharedBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

#[derive(Clone)]
enum Storage {
    /// f32 values read in place from shared bytes (little-endian, 4-byte aligned).
    Mapped {
        bytes: SharedBytes,
        offset: usize,
        len: usize,
    },
    Owned(Arc<[f32]>),
}

/// Read-only f32 parameters with a shape. Cloning shares the storage (tied embeddings).
#[derive(Clone)]
pub struct Weight {
    storage: Storage,
    shape: Vec<usize>,
}

impl Weight {
    pub fn from_vec(data: Vec<f32>, shape: &[usize]) -> Result<Self, ShapeError> {
        let expected: usize = shape.iter().product();
        if expected != data.len() {
            return Err(ShapeError {
                shape: shape.to_vec(),
                expected,
                found: data.len(),
            });
        }
        Ok(Weight {
            storage: Storage::Owned(data.into()),
            shape: shape.to_vec(),
        })
    }

    /// f32 little-endian values at `bytes[offset..offset + 4·n]`, used in place when the host
    /// is little-endian and the address is aligned, copied otherwise.
    pub fn from_f32_bytes(
        bytes: SharedBytes,
        offset: usize,
        shape: &[usize],
    ) -> Result<Self, ShapeError> {
        let len: usize = shape.iter().product();
        let raw = &(*bytes).as_ref()[offset..];
        if raw.len() < len * 4 {
            return Err(ShapeError {
                shape: shape.to_vec(),
                expected: len,
                found: raw.len() / 4,
            });
        }
        let raw = &raw[..len * 4];
        let in_place = cfg!(target_endian = "little")
            && (raw.as_ptr() as usize).is_multiple_of(std::mem::align_of::<f32>());
        if in_place {
            Ok(Weight {
                storage: Storage::Mapped { bytes, offset, len },
                shape: shape.to_vec(),
            })
        } else {
            let data = raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            Weight::from_vec(data, shape)
        }
    }

    /// Widens little-endian bf16 values to f32.
    pub fn from_bf16_bytes(raw: &[u8], shape: &[usize]) -> Result<Self, ShapeError> {
        let data = raw
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect();
        Weight::from_vec(data, shape)
    }

    /// Widens little-endian IEEE f16 values to f32.
    pub fn from_f16_bytes(raw: &[u8], shape: &[usize]) -> Result<Self, ShapeError> {
        let data = raw
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect();
        Weight::from_vec(data, shape)
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of f32 values this weight presents (mapped or owned).
    pub fn size_bytes(&self) -> usize {
        self.len() * 4
    }

    pub fn as_slice(&self) -> &[f32] {
        match &self.storage {
            Storage::Owned(values) => values,
            Storage::Mapped { bytes, offset, len } => {
                let raw = &(**bytes).as_ref()[*offset..*offset + *len * 4];
                // SAFETY: `from_f32_bytes` checked that this range is in bounds, 4-byte aligned
                // and little-endian on a little-endian host; every bit pattern is a valid f32,
                // and `bytes` is kept alive (and never written) by the Arc we hold.
                unsafe { std::slice::from_raw_parts(raw.as_ptr().cast::<f32>(), *len) }
            }
        }
    }

    /// Row `i` of a 2-D weight.
    pub fn row(&self, i: usize) -> &[f32] {
        let width: usize = self.shape.iter().skip(1).product();
        &self.as_slice()[i * width..(i + 1) * width]
    }
}

impl fmt::Debug for Weight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.storage {
            Storage::Mapped { .. } => "mapped",
            Storage::Owned(_) => "owned",
        };
        write!(f, "Weight{:?}({kind})", self.shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_rejects_wrong_length() {
        let err = Tensor::from_vec(vec![1.0; 5], &[2, 3]).unwrap_err();
        assert_eq!(err.expected, 6);
        assert_eq!(err.found, 5);
    }

    #[test]
    fn mapped_f32_reads_in_place_and_unaligned_copies() {
        let values = [1.5f32, -2.25, 3.0, 1e-3];
        // The same values at two offsets one byte apart: at most one of them is 4-byte
        // aligned, so both the in-place and the copying path run, and must agree.
        for pad in [0usize, 1] {
            let mut bytes = vec![0u8; pad];
            for v in values {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
            let shared: SharedBytes = Arc::new(bytes);
            let w = Weight::from_f32_bytes(shared, pad, &[2, 2]).unwrap();
            assert_eq!(w.as_slice(), &values);
            assert_eq!(w.row(1), &values[2..]);
        }
    }

    #[test]
    fn widens_half_types() {
        let bf: Vec<u8> = [1.0f32, -0.5]
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        assert_eq!(
            Weight::from_bf16_bytes(&bf, &[2]).unwrap().as_slice(),
            &[1.0, -0.5]
        );
        let h: Vec<u8> = [0.25f32, 8.0]
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        assert_eq!(
            Weight::from_f16_bytes(&h, &[2]).unwrap().as_slice(),
            &[0.25, 8.0]
        );
    }
}
