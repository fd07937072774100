//! The sampling loop on a tiny random llama: determinism, greedy decoding, batching of
//! samples, stopping at EOS, and the per-step hook seam the Goodtriever engine plugs into.

use goodtriever::fingerprint::KeyType;
use goodtriever::generate::{argmax, GenerateError, Generator, SamplingParams, StopReason};
use goodtriever::hook::{HookError, StepHook};
use goodtriever::model::testing::{write_tiny_llama, TinySpec};
use goodtriever::model::{Model, Outputs, WeightFormat};

fn model() -> (tempfile::TempDir, Model) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write_tiny_llama(&path, &TinySpec::default()).unwrap();
    let m = Model::load(&path, WeightFormat::Native).unwrap();
    (dir, m)
}

fn params(n: usize, temperature: f32, seed: u64) -> SamplingParams {
    SamplingParams {
        num_samples: n,
        max_new_tokens: 12,
        temperature,
        top_p: 0.95,
        top_k: 0,
        seed,
    }
}

const PROMPT: [u32; 5] = [40, 77, 12, 200, 5];

fn tokens(samples: &[goodtriever::generate::Sample]) -> Vec<Vec<u32>> {
    samples.iter().map(|s| s.tokens.clone()).collect()
}

#[test]
fn same_seed_same_samples_other_seed_other_samples() {
    let (_d, m) = model();
    let run = |seed| {
        let mut g = Generator::new(&m, params(4, 1.0, seed)).unwrap();
        g.set_stop_tokens(vec![]);
        tokens(&g.generate(&PROMPT, None).unwrap())
    };
    let a = run(1);
    assert_eq!(a, run(1));
    assert_ne!(a, run(2));
    // Samples of one batch are independent draws, not copies.
    assert!(a.iter().any(|s| s != &a[0]));
    assert!(a.iter().all(|s| s.len() == 12));
}

#[test]
fn temperature_zero_is_greedy_argmax_and_rows_agree() {
    let (_d, m) = model();
    let mut g = Generator::new(&m, params(3, 0.0, 0)).unwrap();
    g.set_stop_tokens(vec![]);
    let samples = g.generate(&PROMPT, None).unwrap();
    // Manual greedy loop with the bare forward pass.
    let mut cache = m.new_cache(1);
    let mut out = m
        .forward(&PROMPT, 1, &mut cache, Outputs::last(KeyType::FinalHidden))
        .unwrap();
    let mut want = Vec::new();
    for _ in 0..12 {
        let t = argmax(&out.logits).unwrap();
        want.push(t);
        out = m
            .forward(&[t], 1, &mut cache, Outputs::last(KeyType::FinalHidden))
            .unwrap();
    }
    for s in &samples {
        assert_eq!(s.tokens, want);
        assert_eq!(s.stop, StopReason::MaxTokens);
        assert_eq!(s.text, m.tokenizer().decode(&want, false).unwrap());
    }
}

/// A hook that forces one token for every row, checking what it is given.
struct Force {
    token: usize,
    hidden: usize,
    vocab: usize,
    calls: usize,
    rows_seen: Vec<usize>,
    key_type: KeyType,
}

impl StepHook for Force {
    fn key_type(&self) -> KeyType {
        self.key_type
    }

    fn adjust(&mut self, keys: &[f32], logits: &mut [f32], rows: usize) -> Result<(), HookError> {
        assert_eq!(keys.len(), rows * self.hidden);
        assert_eq!(logits.len(), rows * self.vocab);
        assert!(keys.iter().all(|k| k.is_finite()));
        self.calls += 1;
        self.rows_seen.push(rows);
        for row in logits.chunks_mut(self.vocab) {
            row.iter_mut().for_each(|l| *l = f32::NEG_INFINITY);
            row[self.token] = 0.0;
        }
        Ok(())
    }
}

#[test]
fn the_hook_sees_every_step_and_its_logits_are_used() {
    let (_d, m) = model();
    let mut hook = Force {
        token: 42,
        hidden: m.config().hidden_size,
        vocab: m.config().vocab_size,
        calls: 0,
        rows_seen: vec![],
        key_type: KeyType::LastFfnInput,
    };
    let mut g = Generator::new(&m, params(5, 1.0, 3)).unwrap();
    let samples = g.generate(&PROMPT, Some(&mut hook)).unwrap();
    assert_eq!(hook.calls, 12);
    assert!(hook.rows_seen.iter().all(|&r| r == 5));
    for s in &samples {
        assert_eq!(s.tokens, vec![42; 12]);
        assert_eq!(s.timing.step_ms.len(), 12);
        assert_eq!(s.timing.hook_ms.len(), 12);
        assert!(s.timing.prefill_ms > 0.0);
        assert!(s.timing.total_hook_ms() <= s.timing.total_step_ms());
    }
}

/// A hook that passes the keys it gets to a check and leaves logits alone.
struct Record(Vec<Vec<f32>>, KeyType);

impl StepHook for Record {
    fn key_type(&self) -> KeyType {
        self.1
    }

    fn adjust(&mut self, keys: &[f32], _: &mut [f32], _: usize) -> Result<(), HookError> {
        self.0.push(keys.to_vec());
        Ok(())
    }
}

#[test]
fn the_hook_gets_the_keys_of_the_type_it_asked_for() {
    let (_d, m) = model();
    for key_type in KeyType::ALL {
        let mut rec = Record(vec![], key_type);
        let mut g = Generator::new(&m, params(1, 0.0, 0)).unwrap();
        g.set_stop_tokens(vec![]);
        let s = g.generate(&PROMPT, Some(&mut rec)).unwrap().remove(0);
        let mut cache = m.new_cache(1);
        let first = m
            .forward(&PROMPT, 1, &mut cache, Outputs::last(key_type))
            .unwrap();
        assert_eq!(rec.0[0], first.keys);
        let second = m
            .forward(&s.tokens[..1], 1, &mut cache, Outputs::last(key_type))
            .unwrap();
        assert_eq!(rec.0[1], second.keys);
    }
}

/// Forces EOS on row 0 at step 2 and forbids it otherwise.
struct EosAfter {
    eos: usize,
    vocab: usize,
    step: usize,
    rows_seen: Vec<usize>,
    /// What the generator told the hook between steps, in order.
    calls: Vec<Between>,
}

#[derive(Debug, PartialEq)]
enum Between {
    Keep(Vec<usize>),
    Advance(Vec<u32>),
}

impl StepHook for EosAfter {
    fn key_type(&self) -> KeyType {
        KeyType::FinalHidden
    }

    fn adjust(&mut self, _: &[f32], logits: &mut [f32], rows: usize) -> Result<(), HookError> {
        self.rows_seen.push(rows);
        // Row 0 ends at its third token; EOS is ruled out everywhere else.
        for (r, row) in logits.chunks_mut(self.vocab).enumerate() {
            if self.step == 2 && r == 0 {
                row.fill(f32::NEG_INFINITY);
                row[self.eos] = 0.0;
            } else {
                row[self.eos] = f32::NEG_INFINITY;
            }
        }
        self.step += 1;
        Ok(())
    }

    fn advance(&mut self, tokens: &[u32]) {
        self.calls.push(Between::Advance(tokens.to_vec()));
    }

    fn keep_rows(&mut self, keep: &[usize]) {
        self.calls.push(Between::Keep(keep.to_vec()));
    }
}

#[test]
fn rows_stop_at_eos_and_leave_the_batch() {
    let (_d, m) = model();
    let eos = m.config().eos_token_id.unwrap() as usize;
    let mut hook = EosAfter {
        eos,
        vocab: m.config().vocab_size,
        step: 0,
        rows_seen: vec![],
        calls: vec![],
    };
    let mut g = Generator::new(&m, params(3, 1.0, 9)).unwrap();
    g.set_stop_tokens(vec![eos as u32]);
    let samples = g.generate(&PROMPT, Some(&mut hook)).unwrap();
    assert_eq!(samples[0].stop, StopReason::Eos);
    assert_eq!(samples[0].tokens.len(), 3);
    assert_eq!(*samples[0].tokens.last().unwrap(), eos as u32);
    assert_eq!(samples[0].timing.step_ms.len(), 3);
    for s in &samples[1..] {
        assert_eq!(s.stop, StopReason::MaxTokens);
        assert_eq!(s.tokens.len(), 12);
        assert!(!s.tokens.contains(&(eos as u32)));
    }
    assert_eq!(&hook.rows_seen[..4], &[3, 3, 3, 2]);
    // A per-sequence hook is told that a new generation starts, which rows go on, and the
    // token each continuing row emitted, in row order, before every step but the first.
    let step_tokens = |step: usize, rows: &[usize]| -> Vec<u32> {
        rows.iter().map(|&r| samples[r].tokens[step]).collect()
    };
    let mut expected = vec![
        Between::Keep(vec![]),
        Between::Advance(step_tokens(0, &[0, 1, 2])),
        Between::Advance(step_tokens(1, &[0, 1, 2])),
        Between::Keep(vec![1, 2]),
    ];
    expected.extend((2..11).map(|step| Between::Advance(step_tokens(step, &[1, 2]))));
    assert_eq!(hook.calls, expected);
}

#[derive(Debug, thiserror::Error)]
#[error("store went away")]
struct Gone;

struct Failing;

impl StepHook for Failing {
    fn key_type(&self) -> KeyType {
        KeyType::FinalHidden
    }

    fn adjust(&mut self, _: &[f32], _: &mut [f32], _: usize) -> Result<(), HookError> {
        Err(HookError::new(Gone))
    }
}

#[test]
fn errors_are_typed() {
    let (_d, m) = model();
    let mut g = Generator::new(&m, params(2, 1.0, 0)).unwrap();
    let err = g.generate(&PROMPT, Some(&mut Failing)).unwrap_err();
    assert!(matches!(err, GenerateError::Hook(_)));
    assert!(err.to_string().contains("store went away"), "{err}");
    assert!(matches!(
        g.generate(&[], None),
        Err(GenerateError::EmptyPrompt)
    ));
    assert!(Generator::new(&m, params(0, 1.0, 0)).is_err());
    let long = SamplingParams {
        max_new_tokens: 10_000,
        ..params(1, 1.0, 0)
    };
    assert!(Generator::new(&m, long)
        .unwrap()
        .generate(&PROMPT, None)
        .is_err());
}

#[test]
fn text_prompts_are_tokenized() {
    let (_d, m) = model();
    let mut g = Generator::new(&m, params(2, 0.0, 0)).unwrap();
    g.set_stop_tokens(vec![]);
    let a = g.generate_text("hello the world", None).unwrap();
    let ids = m.tokenizer().encode("hello the world").unwrap();
    let b = g.generate(&ids, None).unwrap();
    assert_eq!(tokens(&a), tokens(&b));
}
