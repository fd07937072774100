//! Packed tensors on the wire ↔ rows of `f32` in memory.
//!
//! Clients send hidden states and logits as raw little-endian buffers (what every engine holds
//! anyway), so the server must check what a typed API would have checked for free: the element
//! type, that the byte length is a whole number of rows of the width the server knows, the row
//! count against the limit, and that the values are finite. Each failure is a [`ConvertError`]
//! that names the field and says what to send instead; the checks run before any search, so
//! bad input costs almost nothing and changes nothing.

use bytes::{Bytes, BytesMut};
use half::{bf16, f16};

use super::proto;
use crate::rule::SparseRow;

/// Element type of a packed tensor, as sent on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireDType {
    /// IEEE binary32, little-endian; also what `D_TYPE_UNSPECIFIED` means.
    F32,
    /// IEEE binary16, little-endian: half the bytes for hidden states.
    F16,
    /// bfloat16, little-endian; accepted for logits only, which bf16 engines then send as they
    /// hold them.
    Bf16,
}

impl WireDType {
    /// Bytes per element: 4 or 2.
    pub fn size(self) -> usize {
        match self {
            WireDType::F32 => 4,
            WireDType::F16 | WireDType::Bf16 => 2,
        }
    }

    /// The lowercase name used in error messages.
    pub fn as_str(self) -> &'static str {
        match self {
            WireDType::F32 => "f32",
            WireDType::F16 => "f16",
            WireDType::Bf16 => "bf16",
        }
    }

    /// The proto enum value; unspecified means f32.
    pub fn from_proto(what: &'static str, value: i32) -> Result<Self, ConvertError> {
        match proto::DType::try_from(value) {
            Ok(proto::DType::Unspecified | proto::DType::F32) => Ok(WireDType::F32),
            Ok(proto::DType::F16) => Ok(WireDType::F16),
            Ok(proto::DType::Bf16) => Ok(WireDType::Bf16),
            Err(_) => Err(ConvertError::UnknownDType { what, value }),
        }
    }
}

/// Why a packed tensor was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConvertError {
    /// The tensor's `dtype` is not a value of the proto enum (a newer or broken client).
    #[error("{what}: unknown dtype value {value}; use F32, F16 or BF16")]
    UnknownDType {
        /// The request field, e.g. `hidden`.
        what: &'static str,
        /// The raw enum value received.
        value: i32,
    },
    /// The dtype is known but not accepted for this field.
    #[error("{what}: dtype {dtype} is not accepted here; send {allowed}")]
    DTypeNotAllowed {
        /// The request field.
        what: &'static str,
        /// The dtype received.
        dtype: &'static str,
        /// The dtypes the field accepts, in words.
        allowed: &'static str,
    },
    /// The tensor has no data.
    #[error("{what} is missing or empty: send at least one row of {width} values")]
    Empty {
        /// The request field.
        what: &'static str,
        /// Values per row the server expects.
        width: usize,
    },
    /// The byte length is not a whole number of rows: usually a model whose hidden or
    /// vocabulary size differs from the server's.
    #[error("{what} has {bytes} bytes, which is not a whole number of rows of {width} {dtype} values ({row_bytes} bytes per row); check that the model's hidden size / vocabulary size matches the server's (see Info)")]
    Length {
        /// The request field.
        what: &'static str,
        /// Bytes received.
        bytes: usize,
        /// Values per row the server expects.
        width: usize,
        /// The dtype received.
        dtype: &'static str,
        /// `width` times the dtype's size.
        row_bytes: usize,
    },
    /// The tensor's optional `rows` disagrees with its data.
    #[error("{what} says rows = {declared} but its data holds {actual} rows")]
    RowsMismatch {
        /// The request field.
        what: &'static str,
        /// The `rows` the client declared.
        declared: usize,
        /// Rows in the data.
        actual: usize,
    },
    /// More rows than the server's `--max-rows`.
    #[error("{what} has {rows} rows; this server accepts at most {max} per request (--max-rows): split the batch")]
    TooManyRows {
        /// The request field.
        what: &'static str,
        /// Rows received.
        rows: usize,
        /// The server's limit.
        max: usize,
    },
    /// A value is NaN or infinite (or +∞/NaN in logits, where −∞ is a legal mask).
    #[error("{what} row {row} has {value} at index {index}; values must be finite")]
    NonFinite {
        /// The request field.
        what: &'static str,
        /// The row, 0-based.
        row: usize,
        /// The position within the row, 0-based.
        index: usize,
        /// The value found.
        value: f32,
    },
    /// A sparse row from the wire has uneven token/value lists or an unknown kind.
    #[error("sparse row: {0}")]
    SparseRow(String),
}

/// How [`append_f32`] treats infinities: hidden states must be finite; logits may use −∞ as a
/// mask but never NaN or +∞.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finite {
    /// Every value must be finite (hidden states).
    All,
    /// −∞ is allowed as a mask; NaN and +∞ are not (logits).
    AllowNegInf,
}

/// The checked shape of a packed tensor, before its values are converted.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// The element type, checked against the field's accepted ones.
    pub dtype: WireDType,
    /// Whole rows in the data, at most the limit given to [`check_shape`].
    pub rows: usize,
}

/// Checks dtype, length and row count of `t` against a row `width`; nothing is copied.
pub fn check_shape(
    what: &'static str,
    t: &proto::Tensor,
    width: usize,
    allowed: &[WireDType],
    max_rows: usize,
) -> Result<Shape, ConvertError> {
    let dtype = WireDType::from_proto(what, t.dtype)?;
    if !allowed.contains(&dtype) {
        return Err(ConvertError::DTypeNotAllowed {
            what,
            dtype: dtype.as_str(),
            allowed: if allowed.contains(&WireDType::Bf16) {
                "F32, F16 or BF16"
            } else {
                "F32 or F16"
            },
        });
    }
    if t.data.is_empty() {
        return Err(ConvertError::Empty { what, width });
    }
    let row_bytes = width * dtype.size();
    if width == 0 || !t.data.len().is_multiple_of(row_bytes) {
        return Err(ConvertError::Length {
            what,
            bytes: t.data.len(),
            width,
            dtype: dtype.as_str(),
            row_bytes,
        });
    }
    let rows = t.data.len() / row_bytes;
    if t.rows != 0 && t.rows as usize != rows {
        return Err(ConvertError::RowsMismatch {
            what,
            declared: t.rows as usize,
            actual: rows,
        });
    }
    if rows > max_rows {
        return Err(ConvertError::TooManyRows {
            what,
            rows,
            max: max_rows,
        });
    }
    Ok(Shape { dtype, rows })
}

/// Converts checked bytes to `f32`, appended to `out` (a request's rows, or several requests'
/// rows merged into one batch), and checks finiteness. Row numbers in an error count from the
/// start of `bytes`; on error `out` is left as it was.
pub fn append_f32(
    what: &'static str,
    bytes: &[u8],
    dtype: WireDType,
    width: usize,
    finite: Finite,
    out: &mut Vec<f32>,
) -> Result<(), ConvertError> {
    let start = out.len();
    match dtype {
        WireDType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        WireDType::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        WireDType::Bf16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
    }
    let checked = check_finite(what, &out[start..], width, finite);
    if checked.is_err() {
        out.truncate(start);
    }
    checked
}

/// Checks finiteness of `f16` rows without converting them (keys stored as f16 stay f16).
pub fn f16_rows(
    what: &'static str,
    bytes: &[u8],
    width: usize,
    out: &mut Vec<f16>,
) -> Result<(), ConvertError> {
    out.clear();
    out.extend(
        bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]])),
    );
    if let Some(i) = out.iter().position(|x| !x.is_finite()) {
        return Err(ConvertError::NonFinite {
            what,
            row: i / width,
            index: i % width,
            value: out[i].to_f32(),
        });
    }
    Ok(())
}

fn check_finite(
    what: &'static str,
    values: &[f32],
    width: usize,
    finite: Finite,
) -> Result<(), ConvertError> {
    let bad = match finite {
        Finite::All => values.iter().position(|x| !x.is_finite()),
        Finite::AllowNegInf => values
            .iter()
            .position(|x| x.is_nan() || *x == f32::INFINITY),
    };
    match bad {
        Some(i) => Err(ConvertError::NonFinite {
            what,
            row: i / width,
            index: i % width,
            value: values[i],
        }),
        None => Ok(()),
    }
}

/// Packs `f32` values as little-endian bytes: a [`proto::Tensor`]'s `data` (what a Rust
/// client sends its hidden states and logits as).
pub fn f32_bytes(values: &[f32]) -> Bytes {
    let mut out = BytesMut::new();
    put_f32_bytes(values, &mut out);
    out.freeze()
}

/// Appends `values` to `out` as packed little-endian `f32`.
pub fn put_f32_bytes(values: &[f32], out: &mut BytesMut) {
    out.reserve(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// The engine's sparse answer for one row as its wire message: tokens and values packed as
/// little-endian `u32` and `f32`.
pub fn sparse_row_to_proto(row: &SparseRow) -> proto::SparseRow {
    sparse_row_into_proto(row, &mut BytesMut::new())
}

/// [`sparse_row_to_proto`] writing the packed tokens and values into `wire` and splitting them
/// off it, so that a server's answers share (and, once dropped, give back) one allocation.
pub fn sparse_row_into_proto(row: &SparseRow, wire: &mut BytesMut) -> proto::SparseRow {
    let (kind, scale, lambda) = match row {
        SparseRow::Bias { scale, .. } => (proto::sparse_row::Kind::Bias, *scale, 0.0),
        SparseRow::Mixture { lambda, .. } => (proto::sparse_row::Kind::Mixture, 1.0, *lambda),
    };
    let pairs = row.pairs();
    wire.reserve(pairs.len() * 8);
    for &(t, _) in pairs {
        wire.extend_from_slice(&t.to_le_bytes());
    }
    let tokens = wire.split().freeze();
    for &(_, v) in pairs {
        wire.extend_from_slice(&v.to_le_bytes());
    }
    proto::SparseRow {
        kind: kind as i32,
        scale,
        lambda,
        tokens,
        values: wire.split().freeze(),
    }
}

/// Reads a sparse row from the wire (what a Rust client does with an answer), checking that
/// its kind is known and its token and value lists are whole and of equal length.
pub fn sparse_row_from_proto(row: &proto::SparseRow) -> Result<SparseRow, ConvertError> {
    let (t, v) = (&row.tokens[..], &row.values[..]);
    if t.len() % 4 != 0 || v.len() % 4 != 0 || t.len() != v.len() {
        return Err(ConvertError::SparseRow(format!(
            "tokens has {} bytes and values {}; both must hold the same number of 4-byte entries",
            t.len(),
            v.len()
        )));
    }
    let pairs = t
        .chunks_exact(4)
        .zip(v.chunks_exact(4))
        .map(|(t, v)| {
            (
                u32::from_le_bytes([t[0], t[1], t[2], t[3]]),
                f32::from_le_bytes([v[0], v[1], v[2], v[3]]),
            )
        })
        .collect();
    match proto::sparse_row::Kind::try_from(row.kind) {
        Ok(proto::sparse_row::Kind::Bias) => Ok(SparseRow::Bias {
            scale: row.scale,
            pairs,
        }),
        Ok(proto::sparse_row::Kind::Mixture) => Ok(SparseRow::Mixture {
            lambda: row.lambda,
            log_probs: pairs,
        }),
        _ => Err(ConvertError::SparseRow(format!(
            "unknown kind {}; expected BIAS or MIXTURE",
            row.kind
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(data: impl Into<Bytes>, dtype: proto::DType, rows: u32) -> proto::Tensor {
        proto::Tensor {
            data: data.into(),
            dtype: dtype as i32,
            rows,
        }
    }

    const ALL: [WireDType; 3] = [WireDType::F32, WireDType::F16, WireDType::Bf16];

    #[test]
    fn decodes_every_dtype() {
        let values = [1.5f32, -2.0, 0.25, f32::NEG_INFINITY];
        let mut out = Vec::new();
        let f32_t = tensor(f32_bytes(&values), proto::DType::F32, 2);
        let s = check_shape("logits", &f32_t, 2, &ALL, 8).unwrap();
        assert_eq!(s.rows, 2);
        append_f32(
            "logits",
            &f32_t.data,
            s.dtype,
            2,
            Finite::AllowNegInf,
            &mut out,
        )
        .unwrap();
        assert_eq!(out, values);
        out.clear();

        let f16_bytes: Vec<u8> = values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect();
        append_f32(
            "logits",
            &f16_bytes,
            WireDType::F16,
            2,
            Finite::AllowNegInf,
            &mut out,
        )
        .unwrap();
        assert_eq!(out, values);
        out.clear();
        let bf16_bytes: Vec<u8> = values
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect();
        append_f32(
            "logits",
            &bf16_bytes,
            WireDType::Bf16,
            2,
            Finite::AllowNegInf,
            &mut out,
        )
        .unwrap();
        assert_eq!(out, values);
    }

    #[test]
    fn refuses_bad_shapes_and_values() {
        let t = tensor(vec![0; 12], proto::DType::F32, 0);
        assert!(matches!(
            check_shape("hidden", &t, 2, &ALL, 8),
            Err(ConvertError::Length { bytes: 12, .. })
        ));
        assert!(matches!(
            check_shape("hidden", &t, 3, &ALL, 8),
            Ok(Shape { rows: 1, .. })
        ));
        assert!(matches!(
            check_shape(
                "hidden",
                &tensor(vec![0; 12], proto::DType::F32, 2),
                3,
                &ALL,
                8
            ),
            Err(ConvertError::RowsMismatch {
                declared: 2,
                actual: 1,
                ..
            })
        ));
        assert!(matches!(
            check_shape("hidden", &tensor(vec![], proto::DType::F32, 0), 3, &ALL, 8),
            Err(ConvertError::Empty { .. })
        ));
        assert!(matches!(
            check_shape(
                "hidden",
                &tensor(vec![0; 48], proto::DType::F32, 0),
                3,
                &ALL,
                2
            ),
            Err(ConvertError::TooManyRows {
                rows: 4,
                max: 2,
                ..
            })
        ));
        assert!(matches!(
            check_shape(
                "hidden",
                &tensor(vec![0; 8], proto::DType::Bf16, 0),
                2,
                &ALL[..2],
                8
            ),
            Err(ConvertError::DTypeNotAllowed { .. })
        ));
        let bad = proto::Tensor {
            data: vec![0; 8].into(),
            dtype: 42,
            rows: 0,
        };
        assert!(matches!(
            check_shape("hidden", &bad, 2, &ALL, 8),
            Err(ConvertError::UnknownDType { value: 42, .. })
        ));
        let mut out = Vec::new();
        let nan = f32_bytes(&[0.0, 1.0, 2.0, f32::NAN]);
        let err = append_f32("hidden", &nan, WireDType::F32, 2, Finite::All, &mut out).unwrap_err();
        assert!(
            matches!(
                err,
                ConvertError::NonFinite {
                    row: 1,
                    index: 1,
                    ..
                }
            ),
            "{err}"
        );
        assert!(out.is_empty(), "a refused tensor leaves nothing behind");
        let neg_inf = f32_bytes(&[f32::NEG_INFINITY, 1.0]);
        assert!(append_f32("hidden", &neg_inf, WireDType::F32, 2, Finite::All, &mut out).is_err());
        assert!(append_f32(
            "logits",
            &neg_inf,
            WireDType::F32,
            2,
            Finite::AllowNegInf,
            &mut out
        )
        .is_ok());
        let pos_inf = f32_bytes(&[f32::INFINITY, 1.0]);
        assert!(append_f32(
            "logits",
            &pos_inf,
            WireDType::F32,
            2,
            Finite::AllowNegInf,
            &mut out
        )
        .is_err());
        // Appending: the accepted rows stay, the refused ones are taken back out.
        assert_eq!(out, [f32::NEG_INFINITY, 1.0]);
        let mut h = Vec::new();
        let inf16: Vec<u8> = [1.0f32, f32::INFINITY]
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect();
        assert!(f16_rows("hidden", &inf16, 2, &mut h).is_err());
    }

    #[test]
    fn sparse_rows_survive_the_wire_and_bad_ones_are_refused() {
        let rows = [
            SparseRow::Bias {
                scale: 0.75,
                pairs: vec![(3, -1.5), (70_000, 2.25), (u32::MAX, 0.0)],
            },
            SparseRow::Mixture {
                lambda: 0.25,
                log_probs: vec![(0, -0.1), (9, f32::MIN_POSITIVE.ln())],
            },
            SparseRow::Bias {
                scale: 1.0,
                pairs: Vec::new(),
            },
        ];
        for row in &rows {
            let wire = sparse_row_to_proto(row);
            assert_eq!(&sparse_row_from_proto(&wire).unwrap(), row);
        }

        let good = sparse_row_to_proto(&rows[0]);
        let mut ragged = good.clone();
        ragged.values = ragged.values.slice(..ragged.values.len() - 2);
        let mut short = good.clone();
        short.tokens = short.tokens.slice(4..);
        let mut unknown = good.clone();
        unknown.kind = 9;
        for bad in [ragged, short, unknown] {
            let err = sparse_row_from_proto(&bad).unwrap_err();
            assert!(matches!(err, ConvertError::SparseRow(_)), "{err}");
        }
    }

    /// Packed words for random tensors: mostly finite in every dtype (f32, and f16 or bf16
    /// halves), sometimes an infinity or a NaN of one of them.
    fn word() -> impl proptest::strategy::Strategy<Value = u32> {
        use proptest::prelude::*;
        prop_oneof![
            12 => any::<u32>().prop_map(|x| x & 0x3fff_3fff),
            1 => Just(0x7f80_0000u32), // f32 +inf; bf16 +inf in the high half
            1 => Just(0xff80_0000u32), // f32 and bf16 -inf
            1 => Just(0x7fc0_0000u32), // f32 NaN
            1 => Just(0x7c00_3c00u32), // f16 1.0 and +inf
            1 => Just(0xfc00_7e00u32), // f16 NaN and -inf
        ]
    }

    proptest::proptest! {
        /// Any bytes, dtype value, declared row count and width: the checks either refuse the
        /// tensor or accept exactly whole rows; converting accepted rows either appends all of
        /// them or, at the first value it refuses, nothing. Nothing a client sends can panic
        /// the decoder.
        #[test]
        fn any_tensor_is_refused_or_decoded_whole(
            words in proptest::collection::vec(word(), 0..24),
            cut in proptest::prop_oneof![6 => proptest::strategy::Just(0usize), 1 => 1usize..4],
            dtype in -1i32..5,
            declared in proptest::prop_oneof![proptest::strategy::Just(0u32), 0u32..12],
            width in 0usize..5,
            max_rows in 1usize..8,
            finite_logits in proptest::prelude::any::<bool>(),
        ) {
            let mut data: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            data.truncate(data.len().saturating_sub(cut));
            let t = proto::Tensor { data: data.clone().into(), dtype, rows: declared };
            if let Ok(shape) = check_shape("hidden", &t, width, &ALL, max_rows) {
                proptest::prop_assert!(shape.rows >= 1 && shape.rows <= max_rows);
                proptest::prop_assert_eq!(shape.rows * width * shape.dtype.size(), data.len());
                let finite = if finite_logits { Finite::AllowNegInf } else { Finite::All };
                let mut out = vec![7.0f32];
                match append_f32("hidden", &data, shape.dtype, width, finite, &mut out) {
                    Ok(()) => {
                        proptest::prop_assert_eq!(out.len(), 1 + shape.rows * width);
                        proptest::prop_assert!(out[1..].iter().all(|x| !x.is_nan()
                            && (*x != f32::INFINITY)
                            && (finite_logits || x.is_finite())));
                    }
                    Err(ConvertError::NonFinite { row, index, .. }) => {
                        proptest::prop_assert_eq!(&out, &vec![7.0f32]);
                        proptest::prop_assert!(row < shape.rows && index < width);
                    }
                    Err(e) => proptest::prop_assert!(false, "unexpected {}", e),
                }
            }
        }
    }
}
