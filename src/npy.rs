//! Reading and writing the `.npy` arrays that move keys, values and results between
//! goodtriever and other engines (numpy, PyTorch dumps, faiss scripts).
//!
//! Only the shapes and dtypes the datastore needs are accepted, and anything else is refused
//! with a message that says what was found and what was expected: keys are f32 or f16
//! `[N, D]`; values are int32, int64 or uint32 `[N]` or `[N, 1]` and must be valid token ids
//! (0 ≤ v < 2³²). Outputs are written as f32 or i64 `[B, K]`.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};

use half::f16;
use npyz::{DType, NpyFile, Order, TypeChar, WriterBuilder};

/// Errors of reading or writing an `.npy` file; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    /// Opening, reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not an `.npy` array of an accepted dtype and shape, or a value is out of
    /// range.
    #[error("{path}: {detail}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What was found and what was expected.
        detail: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> NpyError + '_ {
    move |source| NpyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn format(path: &Path, detail: impl Into<String>) -> NpyError {
    NpyError::Format {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

/// Key data as read: f32 or f16, row-major.
#[derive(Clone, Debug, PartialEq)]
pub enum KeyArray {
    /// `<f4` keys, kept as they are.
    F32(Vec<f32>),
    /// `<f2` keys, kept as f16 so they reach the store without a round trip through f32.
    F16(Vec<f16>),
}

/// A key matrix `[rows, dim]`.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyMatrix {
    /// Number of keys (N).
    pub rows: usize,
    /// Values per key (D): the model's hidden size.
    pub dim: usize,
    /// `rows × dim` values, row-major.
    pub data: KeyArray,
}

/// Refuses a header whose shape has more elements than a `u64` counts: npyz multiplies the
/// dimensions unchecked, which panics (debug) or wraps (release). Anything this cannot make
/// out is left to npyz, which refuses malformed headers itself.
fn check_shape_fits(path: &Path, f: &mut File) -> Result<(), NpyError> {
    use std::io::{Read, Seek};
    let mut head = Vec::new();
    f.by_ref()
        .take(12)
        .read_to_end(&mut head)
        .map_err(io(path))?;
    // Magic (6 bytes), version (2), then the header's length: 2 bytes in version 1, else 4.
    let (start, len) = match head.get(6) {
        Some(1) if head.len() >= 10 => (10, u16::from_le_bytes([head[8], head[9]]) as u64),
        Some(_) if head.len() >= 12 => (
            12,
            u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as u64,
        ),
        _ => (head.len(), 0),
    };
    let mut text = Vec::new();
    f.by_ref()
        .take(len.min(1 << 20))
        .read_to_end(&mut text)
        .map_err(io(path))?;
    f.rewind().map_err(io(path))?;
    let text = String::from_utf8_lossy(&head[start..]) + String::from_utf8_lossy(&text);
    let Some(at) = text.find("shape") else {
        return Ok(());
    };
    let rest = &text[at..];
    let (Some(open), Some(close)) = (rest.find('('), rest.find(')')) else {
        return Ok(());
    };
    if close < open {
        return Ok(());
    }
    let mut elements = 1u64;
    for d in rest[open + 1..close].split(',').map(str::trim) {
        match d.parse::<u64>() {
            Ok(0) | Err(_) => {}
            Ok(n) => match elements.checked_mul(n) {
                Some(e) => elements = e,
                None => {
                    return Err(format(
                        path,
                        format!(
                            "shape {} has more elements than fit in 64 bits",
                            &rest[open..=close]
                        ),
                    ))
                }
            },
        }
    }
    Ok(())
}

fn open(path: &Path) -> Result<NpyFile<BufReader<File>>, NpyError> {
    let mut f = File::open(path).map_err(io(path))?;
    check_shape_fits(path, &mut f)?;
    NpyFile::new(BufReader::with_capacity(1 << 20, f)).map_err(|e| format(path, e.to_string()))
}

fn scalar(path: &Path, dtype: &DType) -> Result<(TypeChar, usize), NpyError> {
    match dtype {
        DType::Plain(ts) => Ok((ts.type_char(), ts.size_field() as usize)),
        other => Err(format(
            path,
            format!("dtype {} is not a plain numeric type", other.descr()),
        )),
    }
}

/// Reads a key matrix: f32 (`<f4`) or f16 (`<f2`), shape `[N, D]`, C order.
pub fn read_keys(path: &Path) -> Result<KeyMatrix, NpyError> {
    let npy = open(path)?;
    let shape = npy.shape().to_vec();
    if shape.len() != 2 {
        return Err(format(
            path,
            format!("keys must have shape [N, D], found {shape:?}"),
        ));
    }
    if npy.order() != Order::C && shape[0] > 1 && shape[1] > 1 {
        return Err(format(
            path,
            "keys are in Fortran order; save them C-contiguous (np.ascontiguousarray)",
        ));
    }
    let (rows, dim) = (shape[0] as usize, shape[1] as usize);
    let (tc, size) = scalar(path, &npy.dtype())?;
    let data = match (tc, size) {
        (TypeChar::Float, 4) => KeyArray::F32(npy.into_vec::<f32>().map_err(io(path))?),
        (TypeChar::Float, 2) => KeyArray::F16(npy.into_vec::<f16>().map_err(io(path))?),
        _ => {
            return Err(format(
                path,
                format!("keys must be float32 or float16, found {tc:?} of {size} bytes"),
            ))
        }
    };
    Ok(KeyMatrix { rows, dim, data })
}

/// Reads values (token ids): int32, int64 or uint32 (any endianness), shape `[N]` or `[N, 1]`.
pub fn read_values(path: &Path) -> Result<Vec<u32>, NpyError> {
    let npy = open(path)?;
    let shape = npy.shape().to_vec();
    let ok_shape = shape.len() == 1 || (shape.len() == 2 && shape[1] == 1);
    if !ok_shape {
        return Err(format(
            path,
            format!("values must have shape [N] or [N, 1], found {shape:?}"),
        ));
    }
    let (tc, size) = scalar(path, &npy.dtype())?;
    let wide: Vec<i64> = match (tc, size) {
        (TypeChar::Int, 4) => npy
            .into_vec::<i32>()
            .map_err(io(path))?
            .into_iter()
            .map(i64::from)
            .collect(),
        (TypeChar::Int, 8) => npy.into_vec::<i64>().map_err(io(path))?,
        (TypeChar::Uint, 4) => return npy.into_vec::<u32>().map_err(io(path)),
        _ => {
            return Err(format(
                path,
                format!("values must be int32, int64 or uint32, found {tc:?} of {size} bytes"),
            ))
        }
    };
    wide.into_iter()
        .enumerate()
        .map(|(i, v)| {
            u32::try_from(v).map_err(|_| {
                format(
                    path,
                    format!("value {v} at row {i} is not a token id (must be in 0..2^32)"),
                )
            })
        })
        .collect()
}

/// Reads a query matrix `[B, D]` as f32 (f16 input is widened).
pub fn read_queries(path: &Path) -> Result<(usize, usize, Vec<f32>), NpyError> {
    let m = read_keys(path)?;
    let data = match m.data {
        KeyArray::F32(v) => v,
        KeyArray::F16(v) => v.into_iter().map(|x| x.to_f32()).collect(),
    };
    Ok((m.rows, m.dim, data))
}

fn write_2d<T: npyz::AutoSerialize + Copy>(
    path: &Path,
    rows: usize,
    cols: usize,
    data: &[T],
) -> Result<(), NpyError> {
    if data.len() != rows * cols {
        return Err(format(
            path,
            format!("{} values do not make a [{rows}, {cols}] array", data.len()),
        ));
    }
    let f = File::create(path).map_err(io(path))?;
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&[rows as u64, cols as u64])
        .writer(BufWriter::new(f))
        .begin_nd()
        .map_err(io(path))?;
    w.extend(data.iter().copied()).map_err(io(path))?;
    w.finish().map_err(io(path))
}

/// Writes a row-major f32 array `[rows, cols]`.
pub fn write_f32(path: &Path, rows: usize, cols: usize, data: &[f32]) -> Result<(), NpyError> {
    write_2d(path, rows, cols, data)
}

/// Writes a row-major i64 array `[rows, cols]`.
pub fn write_i64(path: &Path, rows: usize, cols: usize, data: &[i64]) -> Result<(), NpyError> {
    write_2d(path, rows, cols, data)
}

/// Writes keys as an f32 or f16 `[rows, dim]` array (tests, tools).
pub fn write_keys(path: &Path, m: &KeyMatrix) -> Result<(), NpyError> {
    match &m.data {
        KeyArray::F32(v) => write_2d(path, m.rows, m.dim, v),
        KeyArray::F16(v) => write_2d(path, m.rows, m.dim, v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values_round_trip_and_bad_shapes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.npy");
        let m = KeyMatrix {
            rows: 2,
            dim: 3,
            data: KeyArray::F16(
                [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.5]
                    .iter()
                    .map(|&x| f16::from_f32(x))
                    .collect(),
            ),
        };
        write_keys(&p, &m).unwrap();
        assert_eq!(read_keys(&p).unwrap(), m);
        let v = dir.path().join("v.npy");
        write_i64(&v, 3, 1, &[1, 2, 49151]).unwrap();
        assert_eq!(read_values(&v).unwrap(), vec![1, 2, 49151]);
        write_i64(&v, 1, 2, &[-1, 2]).unwrap();
        let e = read_values(&v).unwrap_err().to_string();
        assert!(e.contains("[N] or [N, 1]"), "{e}");
        write_i64(&v, 2, 1, &[-1, 2]).unwrap();
        let e = read_values(&v).unwrap_err().to_string();
        assert!(e.contains("not a token id"), "{e}");
        let e = read_keys(&v).unwrap_err().to_string();
        assert!(e.contains("float32 or float16"), "{e}");
    }
}
