//! The continuous-batching core on the tiny model: `KvCache::append_rows` and
//! `trim_padding` against running the rows alone, and `DecodeBatch` (rows joining a running
//! batch at different steps, with and without the control) against `Generator`, and an
//! explained row against `ExplainHook`'s traces.

mod http_support;

use std::collections::HashMap;

use goodtriever::batch::{BatchEvent, BatchRequest, DecodeBatch};
use goodtriever::detox::ControlHook;
use goodtriever::explain::{ExplainHook, ExplainOptions, StepExplanation};
use goodtriever::fingerprint::KeyType;
use goodtriever::generate::{Generator, SamplingParams, StopReason};
use goodtriever::model::testing::{write_tiny_llama, TinySpec};
use goodtriever::model::{KvCache, Model, Outputs, WeightFormat};

const A: [u32; 4] = [40, 77, 12, 200];
const B: [u32; 9] = [5, 6, 7, 8, 9, 10, 11, 12, 13];

/// Prefills `prompt` alone, then runs `next`; the second forward's logits.
fn alone(m: &Model, prompt: &[u32], next: u32) -> (KvCache, Vec<f32>) {
    let mut cache = m.new_cache(1);
    let o = Outputs::last(KeyType::FinalHidden);
    m.forward(prompt, 1, &mut cache, o).unwrap();
    let out = m.forward(&[next], 1, &mut cache, o).unwrap();
    (cache, out.logits)
}

fn prefilled(m: &Model, prompt: &[u32]) -> KvCache {
    let mut cache = m.new_cache(1);
    m.forward(prompt, 1, &mut cache, Outputs::last(KeyType::FinalHidden))
        .unwrap();
    cache
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "{what}: logits differ by {worst}");
}

#[test]
fn appended_rows_decode_as_they_do_alone() {
    let dir = tempfile::tempdir().unwrap();
    let m = http_support::model(dir.path());
    let v = m.config().vocab_size;
    let (_, la) = alone(&m, &A, 3);
    let (_, lb) = alone(&m, &B, 4);
    // The shorter cache first (it is padded), and the longer first (the other is padded).
    for (first, second, tokens, want) in [
        (&A[..], &B[..], [3, 4], [&la, &lb]),
        (&B[..], &A[..], [4, 3], [&lb, &la]),
    ] {
        let mut joined = prefilled(&m, first);
        joined.append_rows(&prefilled(&m, second)).unwrap();
        assert_eq!(joined.batch(), 2);
        assert_eq!(joined.len(), B.len());
        assert_eq!(joined.row_len(0), first.len());
        assert_eq!(joined.row_len(1), second.len());
        let out = m
            .forward(&tokens, 2, &mut joined, Outputs::last(KeyType::FinalHidden))
            .unwrap();
        assert_close(&out.logits[..v], want[0], "row 0");
        assert_close(&out.logits[v..], want[1], "row 1");
        // The row that needed the padding leaves; what is left is trimmed and decodes on.
        let keep = if first.len() < second.len() { 1 } else { 0 };
        joined.select_rows(&[keep]).unwrap();
        joined.trim_padding();
        assert_eq!(joined.left_padding(), &[0]);
        assert_eq!(joined.len(), B.len() + 1);
        let after = m
            .forward(&[9], 1, &mut joined, Outputs::last(KeyType::FinalHidden))
            .unwrap();
        let mut c = prefilled(&m, &B);
        let o = Outputs::last(KeyType::FinalHidden);
        m.forward(&[4], 1, &mut c, o).unwrap();
        let want = m.forward(&[9], 1, &mut c, o).unwrap();
        assert_close(&after.logits, &want.logits, "after trimming");
    }
}

#[test]
fn caches_of_different_models_are_not_joined() {
    let dir = tempfile::tempdir().unwrap();
    let m = http_support::model(dir.path());
    let path = dir.path().join("other.gguf");
    let spec = TinySpec {
        n_layers: 3,
        ..TinySpec::default()
    };
    write_tiny_llama(&path, &spec).unwrap();
    let other = Model::load(&path, WeightFormat::Native).unwrap();
    let mut a = prefilled(&m, &A);
    let before = a.clone();
    assert!(a.append_rows(&prefilled(&other, &A)).is_err());
    assert_eq!(a.batch(), before.batch());
    assert_eq!(a.len(), before.len());
}

fn params(n: usize, seed: u64, max: usize) -> SamplingParams {
    SamplingParams {
        num_samples: n,
        max_new_tokens: max,
        temperature: 1.0,
        top_p: 0.95,
        top_k: 0,
        seed,
    }
}

/// Runs the batch until it is empty, admitting `later` after `after` steps; the tokens of
/// every (request, choice), and how each ended.
fn drive(
    batch: &mut DecodeBatch<'_>,
    first: Vec<BatchRequest>,
    later: Vec<BatchRequest>,
    after: usize,
) -> HashMap<(u64, usize), (Vec<u32>, StopReason)> {
    let mut got: HashMap<(u64, usize), (Vec<u32>, StopReason)> = HashMap::new();
    batch.admit(first).unwrap();
    let mut later = (!later.is_empty()).then_some(later);
    let mut events = Vec::new();
    let mut step = 0;
    while !batch.is_empty() || later.is_some() {
        if step == after {
            if let Some(l) = later.take() {
                batch.admit(l).unwrap();
            }
        }
        events.clear();
        batch.step(&mut events).unwrap();
        for e in &events {
            match e {
                BatchEvent::Token {
                    id, choice, token, ..
                } => got
                    .entry((*id, *choice))
                    .or_insert((Vec::new(), StopReason::MaxTokens))
                    .0
                    .push(*token),
                BatchEvent::Finished {
                    id, choice, reason, ..
                } => got.get_mut(&(*id, *choice)).unwrap().1 = *reason,
                BatchEvent::Failed { message, .. } => panic!("{message}"),
            }
        }
        step += 1;
    }
    got
}

#[test]
fn rows_joining_a_running_batch_sample_what_the_generator_samples() {
    let dir = tempfile::tempdir().unwrap();
    let m = http_support::model(dir.path());
    let detox = http_support::detox(dir.path(), &m);
    let opts = *detox.defaults();
    let req = |id, prompt: &[u32], p: SamplingParams, control| BatchRequest {
        id,
        prompt: prompt.to_vec(),
        params: p,
        control,
        top_logprobs: None,
        explain: None,
    };
    // Request 1 (controlled, 3 samples) runs alone for 4 steps; then requests 2 (bare, a
    // longer prompt) and 3 (controlled, other seed) join it.
    let first = vec![req(1, &A, params(3, 5, 14), Some(opts))];
    let later = vec![
        req(2, &B, params(2, 9, 10), None),
        req(3, &B[2..], params(2, 11, 12), Some(opts)),
    ];
    let mut batch = DecodeBatch::new(&m, Some(detox.clone()));
    batch.set_stop_tokens(vec![]);
    let got = drive(&mut batch, first.clone(), later.clone(), 4);
    for r in first.iter().chain(&later) {
        let mut g = Generator::new(&m, r.params.clone()).unwrap();
        g.set_stop_tokens(vec![]);
        let samples = match r.control {
            Some(o) => {
                let mut hook = ControlHook::new(detox.clone(), o).unwrap();
                g.generate(&r.prompt, Some(&mut hook)).unwrap()
            }
            None => g.generate(&r.prompt, None).unwrap(),
        };
        for (i, s) in samples.iter().enumerate() {
            let (tokens, reason) = &got[&(r.id, i)];
            assert_eq!(tokens, &s.tokens, "request {} sample {i}", r.id);
            assert_eq!(*reason, StopReason::MaxTokens);
        }
    }
    // The control changes what is sampled (else the comparison above proves little).
    let mut bare = DecodeBatch::new(&m, Some(detox.clone()));
    bare.set_stop_tokens(vec![]);
    let uncontrolled = drive(
        &mut bare,
        vec![req(1, &A, params(3, 5, 14), None)],
        vec![],
        usize::MAX,
    );
    assert!((0..3).any(|i| uncontrolled[&(1, i)].0 != got[&(1, i)].0));
}

#[test]
fn a_cancelled_request_leaves_and_the_others_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let m = http_support::model(dir.path());
    let mut batch = DecodeBatch::new(&m, None);
    batch.set_stop_tokens(vec![]);
    let r = |id| BatchRequest {
        id,
        prompt: A.to_vec(),
        params: params(2, id, 8),
        control: None,
        top_logprobs: Some(3),
        explain: None,
    };
    batch.admit(vec![r(1), r(2)]).unwrap();
    let mut events = Vec::new();
    batch.step(&mut events).unwrap();
    assert_eq!(batch.rows(), 4);
    for e in &events {
        let BatchEvent::Token { logprob, token, .. } = e else {
            panic!("{e:?}")
        };
        let lp = logprob.as_ref().unwrap();
        assert_eq!(lp.top.len(), 3);
        assert!(lp.logprob <= 0.0 && lp.top[0].1 >= lp.logprob);
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
        assert!(lp.top.iter().any(|(t, _)| t == token) || lp.logprob <= lp.top[2].1);
    }
    batch.cancel(1);
    batch.cancel_choice(2, 0);
    events.clear();
    batch.step(&mut events).unwrap();
    assert_eq!(batch.rows(), 1);
    assert!(events.iter().all(|e| matches!(
        e,
        BatchEvent::Token {
            id: 2,
            choice: 1,
            ..
        }
    )));
}

#[test]
fn bad_requests_are_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let m = http_support::model(dir.path());
    let mut batch = DecodeBatch::new(&m, None);
    let ok = BatchRequest {
        id: 1,
        prompt: A.to_vec(),
        params: params(1, 0, 4),
        control: None,
        top_logprobs: None,
        explain: None,
    };
    let empty = BatchRequest {
        prompt: vec![],
        ..ok.clone()
    };
    let long = BatchRequest {
        params: params(1, 0, m.config().context_length),
        ..ok.clone()
    };
    let controlled = BatchRequest {
        control: Some(Default::default()),
        ..ok.clone()
    };
    // Explaining needs the control: a bare row has no step to explain.
    let explained_bare = BatchRequest {
        explain: Some(Default::default()),
        ..ok.clone()
    };
    for bad in [empty, long, controlled, explained_bare] {
        assert!(batch.admit(vec![ok.clone(), bad]).is_err());
        assert!(batch.is_empty());
    }
    batch.admit(vec![ok]).unwrap();
    assert_eq!(batch.rows(), 1);
}

/// The token ids and listed row ids of an explanation, and its numbers: what must match
/// exactly and what only to f32 rounding (logits of a batch of three rows and of the
/// generator's one differ in the last bits).
fn explanation_parts(e: &StepExplanation) -> (Vec<(u32, Vec<u64>)>, Vec<f64>) {
    let moves = e
        .pushed_down
        .iter()
        .chain(&e.pushed_up)
        .chain(e.chosen.as_ref());
    let mut ids = Vec::new();
    let mut nums = Vec::new();
    for m in moves {
        ids.push((m.token, m.rows.iter().map(|r| r.id).collect()));
        nums.extend([m.base_log_prob, m.controlled_log_prob, m.change].map(f64::from));
        nums.extend(m.experts.iter().map(|x| x.probability));
        nums.extend(
            m.rows
                .iter()
                .flat_map(|r| [f64::from(r.distance), r.weight]),
        );
    }
    (ids, nums)
}

#[test]
fn an_explained_row_gets_the_librarys_trace_and_changes_no_token() {
    let dir = tempfile::tempdir().unwrap();
    let m = http_support::model(dir.path());
    let detox = http_support::detox(dir.path(), &m);
    let opts = *detox.defaults();
    let eo = ExplainOptions {
        top: 3,
        rows: 2,
        context_bytes: 16,
    };
    // Two plain controlled rows, then the explained one: one run of three rows with equal
    // options, the explained row third in the engine call.
    let plain = BatchRequest {
        id: 1,
        prompt: A.to_vec(),
        params: params(2, 5, 8),
        control: Some(opts),
        top_logprobs: None,
        explain: None,
    };
    let explained = BatchRequest {
        id: 2,
        prompt: B.to_vec(),
        params: params(1, 11, 8),
        control: Some(opts),
        top_logprobs: None,
        explain: Some(eo),
    };
    let mut batch = DecodeBatch::new(&m, Some(detox.clone()));
    batch.set_stop_tokens(vec![]);
    batch.admit(vec![plain.clone(), explained.clone()]).unwrap();
    let mut tokens: HashMap<(u64, usize), Vec<u32>> = HashMap::new();
    let mut explanations = Vec::new();
    let mut events = Vec::new();
    while !batch.is_empty() {
        events.clear();
        batch.step(&mut events).unwrap();
        for e in &events {
            match e {
                BatchEvent::Token {
                    id,
                    choice,
                    token,
                    explanation,
                    ..
                } => {
                    tokens.entry((*id, *choice)).or_default().push(*token);
                    assert_eq!(explanation.is_some(), *id == 2, "{e:?}");
                    if let Some(x) = explanation {
                        explanations.push(StepExplanation::clone(x));
                    }
                }
                BatchEvent::Finished { .. } => {}
                BatchEvent::Failed { message, .. } => panic!("{message}"),
            }
        }
    }
    // The plain rows sample what the generator samples with the control.
    let mut g = Generator::new(&m, plain.params.clone()).unwrap();
    g.set_stop_tokens(vec![]);
    let mut hook = ControlHook::new(detox.clone(), opts).unwrap();
    for (i, s) in g.generate(&A, Some(&mut hook)).unwrap().iter().enumerate() {
        assert_eq!(tokens[&(1, i)], s.tokens, "plain sample {i}");
    }
    // The explained row samples what `goodtriever explain` samples, with the same steps.
    let mut g = Generator::new(&m, explained.params.clone()).unwrap();
    g.set_stop_tokens(vec![]);
    let mut hook = ExplainHook::new(&detox, opts).unwrap();
    let sample = g.generate(&B, Some(&mut hook)).unwrap().remove(0);
    assert_eq!(tokens[&(2, 0)], sample.tokens);
    assert_eq!(explanations.len(), sample.tokens.len());
    let text = |t: u32| m.tokenizer().decode(&[t], false).ok();
    let mut listed = 0;
    for (step, (got, trace)) in explanations.iter().zip(hook.traces()).enumerate() {
        let want = trace
            .explain(&detox, &eo, Some(sample.tokens[step]), &text)
            .unwrap();
        let (gi, gn) = explanation_parts(got);
        let (wi, wn) = explanation_parts(&want);
        assert_eq!(gi, wi, "step {step}");
        assert_eq!(gn.len(), wn.len(), "step {step}");
        for (a, b) in gn.iter().zip(&wn) {
            assert!(
                (a - b).abs() <= 1e-4 * a.abs().max(1.0),
                "step {step}: {a} vs {b}"
            );
        }
        assert_eq!(got.chosen.as_ref().unwrap().token, sample.tokens[step]);
        listed += gi.iter().map(|(_, rows)| rows.len()).sum::<usize>();
    }
    assert!(listed > 0, "no step listed a row: {explanations:?}");
}
