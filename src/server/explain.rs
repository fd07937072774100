//! `explain` on the unary Adjust (docs/architecture.md §2, "Explaining a step"): the step is
//! computed once, alone, and each row's explanation is built from that call's neighbours
//! ([`crate::explain::StepTrace`]), then encoded next to the ordinary answer.

use std::time::Instant;

use bytes::BytesMut;
use tonic::Status;

use super::adjust_step::GrpcStep;
use super::encoder::TextEncoder;
use super::proto;
use super::status;
use crate::datastore::SourceSnippet;
use crate::detox::{DetoxScratch, Detoxifier};
use crate::explain::{ExplainError, ExplainOptions, StepExplanation, StepTrace, TokenMove};
use crate::rule::{self, RuleScratch, SparseRow};
use crate::steps::{OutputRows, Step, StepOutput};

/// The request's explain options over the defaults, checked.
fn options(o: proto::ExplainOptions) -> Result<ExplainOptions, Status> {
    let d = ExplainOptions::default();
    let opts = ExplainOptions {
        top: o.top.map_or(d.top, |v| v as usize),
        rows: o.rows.map_or(d.rows, |v| v as usize),
        context_bytes: o.context_bytes.map_or(d.context_bytes, |v| v as usize),
    };
    opts.validate()
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok(opts)
}

fn from_explain(e: ExplainError) -> Status {
    match e {
        ExplainError::Options(m) => Status::invalid_argument(format!("explain: {m}")),
        ExplainError::Step(e) => status::from_detox(e),
        e @ ExplainError::Row { .. } => {
            tracing::error!(err = %e, "explain could not read a row");
            Status::internal(e.to_string())
        }
    }
}

/// Computes `step` (its form as asked) and explains each of its rows.
/// Token texts come from `encoder` (the server's model) when there is one.
pub(super) fn adjust_explained(
    engine: &Detoxifier,
    encoder: Option<&dyn TextEncoder>,
    step: &GrpcStep,
    explain: proto::ExplainOptions,
) -> Result<proto::AdjustResponse, Status> {
    let eo = options(explain)?;
    let plan = step.plan();
    let input = step.decode_all()?;
    let vocab = engine.vocab_size();
    let mut scratch = DetoxScratch::default();
    let started = Instant::now();
    let mut traces = Vec::with_capacity(plan.rows);
    let mut sparse: Vec<SparseRow> = Vec::new();
    let mut dense: Vec<f32> = Vec::new();
    if plan.dense {
        dense.resize(input.logits.len(), 0.0);
        engine
            .adjust_dense(
                &input.hidden,
                &input.logits,
                &plan.opts,
                &mut scratch,
                &mut dense,
            )
            .map_err(status::from_detox)?;
    } else {
        engine
            .adjust_sparse(&input.hidden, &plan.opts, &mut scratch, &mut sparse)
            .map_err(status::from_detox)?;
    }
    let engine_time = started.elapsed();
    let mut rule_scratch = RuleScratch::default();
    for (r, z) in input.logits.chunks_exact(vocab).enumerate() {
        let controlled = if plan.dense {
            dense[r * vocab..(r + 1) * vocab].to_vec()
        } else {
            let mut c = z.to_vec();
            rule::apply_sparse_in_place(
                &mut c,
                &sparse[r],
                plan.opts.params.filter_p,
                &mut rule_scratch,
            )
            .map_err(|e| Status::invalid_argument(format!("row {r}: {e}")))?;
            c
        };
        traces.push(
            StepTrace::from_call(engine, &plan.opts, &scratch, r, z, controlled)
                .map_err(from_explain)?,
        );
    }
    let text = |t: u32| encoder.and_then(|e| e.token_text(t));
    let explanations = traces
        .iter()
        .map(|t| {
            t.explain(engine, &eo, None, &text)
                .map(|e| explanation_proto(&e))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(from_explain)?;
    let rows = if plan.dense {
        OutputRows::Dense {
            values: &dense,
            vocab,
        }
    } else {
        OutputRows::Sparse(&sparse)
    };
    let mut resp = step.answer(
        StepOutput {
            reused: 0,
            plan: &plan,
            engine_time,
            rows,
        },
        &mut BytesMut::new(),
    );
    resp.explanations = explanations;
    Ok(resp)
}

fn explanation_proto(e: &StepExplanation) -> proto::StepExplanation {
    proto::StepExplanation {
        pushed_down: e.pushed_down.iter().map(token_proto).collect(),
        pushed_up: e.pushed_up.iter().map(token_proto).collect(),
    }
}

fn token_proto(m: &TokenMove) -> proto::TokenMove {
    proto::TokenMove {
        token: m.token,
        text: m.text.clone(),
        base_log_prob: m.base_log_prob,
        controlled_log_prob: m.controlled_log_prob,
        change: m.change,
        experts: m
            .experts
            .iter()
            .map(|e| proto::ExpertMass {
                store: e.store.clone(),
                store_weight: e.store_weight,
                probability: e.probability,
                neighbours: e.neighbours as u32,
            })
            .collect(),
        rows: m
            .rows
            .iter()
            .map(|r| proto::ExplainedRow {
                store: r.store.clone(),
                store_weight: r.store_weight,
                id: r.id,
                segment: r.segment,
                row_in_segment: r.row_in_segment.map(|v| v as u64),
                next_token: r.next_token,
                next_text: r.next_text.clone(),
                distance: r.distance,
                weight: r.weight,
                source: r.source.as_ref().map(snippet_proto),
            })
            .collect(),
        rows_total: m.rows_total as u32,
    }
}

fn snippet_proto(s: &SourceSnippet) -> proto::SourceSnippet {
    proto::SourceSnippet {
        document: s.document,
        start: s.start,
        end: s.end,
        document_bytes: s.document_bytes,
        before: s.before.clone(),
        token: s.token.clone(),
        after: s.after.clone(),
    }
}
