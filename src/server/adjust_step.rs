//! An Adjust request as a step of the [`StepEngine`](crate::steps::StepEngine): the gRPC side
//! of the step engine's [`Step`] contract.
//!
//! [`GrpcStep::check`] turns a request into a [`GrpcStep`] (options, form and tensor shapes
//! checked; its tensors stay in the request's buffers until decoded); the step engine decodes
//! it into its batch buffers and asks it to encode its answer from its rows of the output.
//! The answers' bytes are split off one pooled buffer (`Step::Wire`), so encoding reuses one
//! allocation once tonic has sent the previous answer.

use bytes::{Bytes, BytesMut};
use tonic::Status;

use super::convert::{self, Finite, WireDType};
use super::proto;
use super::status;
use crate::detox::{AdjustOptions, DetoxError, Detoxifier};
use crate::reuse::ReuseParams;
use crate::rule::{Mode, SparseRow};
use crate::steps::{OutputRows, Step, StepInput, StepOutput, StepPlan};

/// A checked Adjust request.
#[derive(Debug)]
pub(super) struct GrpcStep {
    pub(super) req: proto::AdjustRequest,
    plan: StepPlan,
    hidden: convert::Shape,
    /// The logits' shape when the dense form was asked for.
    logits: Option<convert::Shape>,
    dim: usize,
    vocab: usize,
    /// Reusing neighbours, when the request asks for it (AdjustStream only).
    pub(super) reuse: Option<ReuseParams>,
}

impl Step for GrpcStep {
    type Answer = proto::AdjustResponse;
    type Error = Status;
    type Wire = BytesMut;

    fn plan(&self) -> StepPlan {
        self.plan
    }

    fn decode(&self, input: &mut StepInput) -> Result<(), Status> {
        let hidden = self.req.hidden.as_ref().expect("checked");
        convert::append_f32(
            "hidden",
            &hidden.data,
            self.hidden.dtype,
            self.dim,
            Finite::All,
            &mut input.hidden,
        )
        .map_err(status::from_convert)?;
        if let Some(ls) = self.logits.filter(|_| self.plan.dense) {
            let logits = self.req.logits.as_ref().expect("checked");
            if let Err(e) = convert::append_f32(
                "logits",
                &logits.data,
                ls.dtype,
                self.vocab,
                Finite::AllowNegInf,
                &mut input.logits,
            ) {
                input
                    .hidden
                    .truncate(input.hidden.len() - self.plan.rows * self.dim);
                return Err(status::from_convert(e));
            }
        }
        Ok(())
    }

    fn answer(&self, out: StepOutput<'_>, wire: &mut BytesMut) -> proto::AdjustResponse {
        let mut resp = proto::AdjustResponse {
            num_rows: self.plan.rows as u32,
            vocab_size: self.vocab as u32,
            step: self.req.step,
            params: Some(proto::Params {
                reuse: self.reuse.map_or(0.0, |r| r.min),
                reuse_radius: self.reuse.map_or(0.0, |r| r.radius),
                ..params_proto(&out.plan.opts)
            }),
            engine_micros: out.engine_time.as_micros() as u64,
            rows_reused: out.reused as u32,
            ..Default::default()
        };
        match out.rows {
            OutputRows::Dense { values, .. } => resp.log_probs = dense_proto(values, wire),
            OutputRows::Sparse(rows) => resp.rows = sparse_rows_proto(rows, wire),
        }
        resp
    }
}

impl GrpcStep {
    /// The step's hidden states and logits (which an explained step always has), decoded.
    pub(super) fn decode_all(&self) -> Result<StepInput, Status> {
        let mut input = StepInput {
            hidden: Vec::new(),
            logits: Vec::new(),
        };
        let hidden = self.req.hidden.as_ref().expect("checked");
        convert::append_f32(
            "hidden",
            &hidden.data,
            self.hidden.dtype,
            self.dim,
            Finite::All,
            &mut input.hidden,
        )
        .map_err(status::from_convert)?;
        if let (Some(ls), Some(logits)) = (self.logits, self.req.logits.as_ref()) {
            convert::append_f32(
                "logits",
                &logits.data,
                ls.dtype,
                self.vocab,
                Finite::AllowNegInf,
                &mut input.logits,
            )
            .map_err(status::from_convert)?;
        }
        Ok(input)
    }

    /// The server's defaults with the request's overrides, validated.
    fn options(engine: &Detoxifier, o: Option<&proto::Overrides>) -> Result<AdjustOptions, Status> {
        let mut opts = *engine.defaults();
        if let Some(o) = o {
            if let Some(a) = o.alpha {
                opts.params.alpha = a;
            }
            if let Some(t) = o.temperature {
                opts.params.temperature = t;
            }
            if let Some(k) = o.k {
                opts.params.k = k as usize;
            }
            if let Some(p) = o.filter_p {
                opts.params.filter_p = p;
            }
            if let Some(l) = o.lambda {
                opts.params.lambda = l;
            }
            if let Some(g) = o.gate {
                opts.params.gate = g;
            }
            if let Some(m) = o.gate_neighbours {
                opts.params.gate_neighbours = m as usize;
            }
            if let Some(r) = o.prior {
                opts.params.prior = r;
            }
            if let Some(e) = o.skip {
                opts.params.skip = e;
            }
            if let Some(r) = o.skip_ratio {
                opts.params.skip_ratio = r;
            }
            if let Some(n) = o.skip_in_nucleus {
                opts.params.skip_in_nucleus = n;
            }
            opts.mode = match proto::Mode::try_from(o.mode) {
                Ok(proto::Mode::Unspecified) => opts.mode,
                Ok(proto::Mode::Ensemble) => Mode::Ensemble,
                Ok(proto::Mode::ToxicOnly) => Mode::ToxicOnly,
                Ok(proto::Mode::KnnLm) => Mode::KnnLm,
                Err(_) => {
                    return Err(Status::invalid_argument(format!(
                        "overrides.mode: unknown value {}; use ENSEMBLE, TOXIC_ONLY or KNN_LM",
                        o.mode
                    )))
                }
            };
        }
        opts.params
            .validate()
            .map_err(|e| Status::invalid_argument(format!("overrides: {e}")))?;
        engine.check_options(&opts).map_err(|e| match e {
            DetoxError::Variant(_) => Status::invalid_argument(format!("overrides: {e}")),
            _ => Status::failed_precondition(e.to_string()),
        })?;
        Ok(opts)
    }

    /// The request's checks (options, form, tensor shapes) before anything is converted: the
    /// step it asks for, its tensors still in the request until decoded.
    pub(super) fn check(
        engine: &Detoxifier,
        max_rows: usize,
        req: proto::AdjustRequest,
    ) -> Result<GrpcStep, Status> {
        let opts = Self::options(engine, req.overrides.as_ref())?;
        let dense = match proto::ResponseForm::try_from(req.form) {
            Ok(proto::ResponseForm::Unspecified) => req.logits.is_some(),
            Ok(proto::ResponseForm::Sparse) => {
                if req.logits.is_some() && req.explain.is_none() {
                    return Err(Status::invalid_argument(
                        "logits were sent with form = SPARSE, which does not use them: omit the logits, or ask for form = DENSE",
                    ));
                }
                false
            }
            Ok(proto::ResponseForm::Dense) => true,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "form: unknown value {}; use SPARSE or DENSE",
                    req.form
                )))
            }
        };
        let mut opts = opts;
        if opts.params.skip > 0.0 && !dense {
            // Asked for by this request: its mistake. A server default (`serve --skip`) only
            // applies where it can, to dense requests; sparse ones are searched on every row.
            if req.overrides.as_ref().is_some_and(|o| o.skip.is_some()) {
                return Err(status::from_detox(DetoxError::SkipNeedsLogits));
            }
            opts.params.skip = 0.0;
        }
        let (dim, vocab) = (engine.dim(), engine.vocab_size());
        let hidden = req.hidden.as_ref().ok_or_else(|| {
            Status::invalid_argument(format!(
                "hidden is missing: send the {} key hidden states, {dim} values per row",
                engine.key_type()
            ))
        })?;
        let hs = convert::check_shape(
            "hidden",
            hidden,
            dim,
            &[WireDType::F32, WireDType::F16],
            max_rows,
        )
        .map_err(status::from_convert)?;
        let logits = if dense || req.explain.is_some() {
            let logits = req.logits.as_ref().ok_or_else(|| {
                Status::invalid_argument(if dense {
                    format!("form = DENSE needs logits ({vocab} values per row); send them, or ask for form = SPARSE")
                } else {
                    format!("explain needs logits ({vocab} values per row) for the base log-probabilities; send them")
                })
            })?;
            let ls = convert::check_shape(
                "logits",
                logits,
                vocab,
                &[WireDType::F32, WireDType::F16, WireDType::Bf16],
                max_rows,
            )
            .map_err(status::from_convert)?;
            if ls.rows != hs.rows {
                return Err(Status::invalid_argument(format!(
                    "hidden has {} rows but logits have {}: send one logits row per hidden row",
                    hs.rows, ls.rows
                )));
            }
            Some(ls)
        } else {
            None
        };
        let reuse = reuse_of(&req, hs.rows, vocab)?;
        Ok(GrpcStep {
            plan: StepPlan {
                opts,
                rows: hs.rows,
                dense,
            },
            hidden: hs,
            logits,
            dim,
            vocab,
            reuse,
            req,
        })
    }
}

/// Dense answer values as packed little-endian bytes split off `wire`.
fn dense_proto(values: &[f32], wire: &mut BytesMut) -> Bytes {
    convert::put_f32_bytes(values, wire);
    wire.split().freeze()
}

/// Sparse answer rows, see [`convert::sparse_row_into_proto`]. Each answer's pieces are split
/// off `wire` and share its allocation; by the time the buffer is used again tonic has usually
/// encoded that answer and dropped it, and the next `reserve` then takes the allocation back
/// in place. Pieces a message still holds are left to it, and a new one is started.
fn sparse_rows_proto(rows: &[SparseRow], wire: &mut BytesMut) -> Vec<proto::SparseRow> {
    // All rows' bytes at once: one reclaim (or allocation) for the whole answer.
    let bytes = rows.iter().map(|r| r.pairs().len() * 8).sum();
    wire.reserve(bytes);
    rows.iter()
        .map(|row| convert::sparse_row_into_proto(row, wire))
        .collect()
}

pub(super) fn params_proto(o: &AdjustOptions) -> proto::Params {
    proto::Params {
        alpha: o.params.alpha,
        temperature: o.params.temperature,
        k: o.params.k as u32,
        filter_p: o.params.filter_p,
        mode: match o.mode {
            Mode::Ensemble => proto::Mode::Ensemble,
            Mode::ToxicOnly => proto::Mode::ToxicOnly,
            Mode::KnnLm => proto::Mode::KnnLm,
        } as i32,
        lambda: o.params.lambda,
        gate: o.params.gate,
        gate_neighbours: o.params.gate_neighbours as u32,
        prior: o.params.prior,
        skip: o.params.skip,
        skip_ratio: o.params.skip_ratio,
        skip_in_nucleus: o.params.skip_in_nucleus,
        reuse: 0.0,
        reuse_radius: 0.0,
    }
}

/// The request's reuse setting, and its emitted tokens checked against its rows.
fn reuse_of(
    req: &proto::AdjustRequest,
    rows: usize,
    vocab: usize,
) -> Result<Option<ReuseParams>, Status> {
    let o = req.overrides.as_ref();
    let min = o.and_then(|o| o.reuse).filter(|&m| m != 0.0);
    let radius = o.and_then(|o| o.reuse_radius);
    let Some(min) = min else {
        if radius.is_some() {
            return Err(Status::invalid_argument(
                "overrides.reuse_radius is set without overrides.reuse: set reuse too, or leave the radius out",
            ));
        }
        if !req.emitted_tokens.is_empty() || !req.continued_rows.is_empty() {
            return Err(Status::invalid_argument(
                "emitted_tokens and continued_rows are only read with overrides.reuse: set it, or leave them out",
            ));
        }
        return Ok(None);
    };
    let params = ReuseParams {
        min,
        radius: radius.unwrap_or(ReuseParams::default().radius),
        audit: false,
    };
    params
        .validate()
        .map_err(|e| Status::invalid_argument(format!("overrides: {e}")))?;
    if !req.emitted_tokens.is_empty() && req.emitted_tokens.len() != rows {
        return Err(Status::invalid_argument(format!(
            "emitted_tokens has {} ids for {rows} hidden rows: send one emitted token per row, or none",
            req.emitted_tokens.len()
        )));
    }
    if let Some(i) = req.emitted_tokens.iter().position(|&t| t as usize >= vocab) {
        return Err(Status::invalid_argument(format!(
            "emitted_tokens[{i}] = {} is outside the vocabulary of {vocab} tokens",
            req.emitted_tokens[i]
        )));
    }
    if !req.continued_rows.is_empty() {
        if req.emitted_tokens.is_empty() {
            return Err(Status::invalid_argument(
                "continued_rows is set without emitted_tokens: send the token each row emitted too",
            ));
        }
        if req.continued_rows.len() != rows {
            return Err(Status::invalid_argument(format!(
                "continued_rows has {} entries for {rows} hidden rows: name the previous step's row each row continues",
                req.continued_rows.len()
            )));
        }
        if req.continued_rows.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Status::invalid_argument(
                "continued_rows must be strictly ascending: rows keep their order from one step to the next",
            ));
        }
    }
    Ok(Some(params))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(n: u32) -> SparseRow {
        SparseRow::Bias {
            scale: 1.0,
            pairs: (0..n).map(|t| (t, t as f32 * 0.5)).collect(),
        }
    }

    #[test]
    fn answer_bytes_are_reused_once_the_previous_answer_is_dropped() {
        let mut wire = BytesMut::new();
        let first = sparse_rows_proto(&[row(300), row(100)], &mut wire);
        let start = first[0].tokens.as_ptr() as usize;
        let end = first[1].values.as_ptr() as usize + first[1].values.len();
        assert_eq!(
            end - start,
            400 * 8,
            "one allocation holds the whole answer"
        );
        drop(first);
        let second = sparse_rows_proto(&[row(200), row(150)], &mut wire);
        for piece in second.iter().flat_map(|r| [&r.tokens, &r.values]) {
            let p = piece.as_ptr() as usize;
            assert!(
                (start..end).contains(&p),
                "a piece outside the first answer's allocation"
            );
        }
        let rows: Vec<SparseRow> = second
            .iter()
            .map(|r| convert::sparse_row_from_proto(r).unwrap())
            .collect();
        assert_eq!(rows, [row(200), row(150)]);
    }

    #[test]
    fn answer_bytes_still_held_by_a_message_are_left_alone() {
        let mut wire = BytesMut::new();
        let first = sparse_rows_proto(&[row(300)], &mut wire);
        let second = sparse_rows_proto(&[row(100)], &mut wire);
        assert_ne!(second[0].tokens.as_ptr(), first[0].tokens.as_ptr());
        assert_eq!(convert::sparse_row_from_proto(&first[0]).unwrap(), row(300));
        assert_eq!(
            convert::sparse_row_from_proto(&second[0]).unwrap(),
            row(100)
        );
    }

    #[test]
    fn dense_answer_bytes_are_reused_too() {
        let mut wire = BytesMut::new();
        let first = dense_proto(&[-1.5; 1000], &mut wire);
        let ptr = first.as_ptr();
        drop(first);
        let dense = vec![-2.5; 1000];
        let second = dense_proto(&dense, &mut wire);
        assert_eq!(second.as_ptr(), ptr);
        assert_eq!(&second[..], &convert::f32_bytes(&dense)[..]);
    }
}
