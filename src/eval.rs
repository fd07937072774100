//! Library side of the toxicity evaluation (`goodtriever eval`): reading prompt files and
//! scoring continuations under a model.
//!
//! The evaluation protocol (the paper's, after RealToxicityPrompts and DExperts) samples many
//! continuations per prompt with and without the control, then measures their toxicity with
//! an external scorer (scripts/eval/evaluate.py) and their fluency as the *conditional* perplexity
//! of each continuation given its prompt under the base model. That perplexity is computed
//! here rather than in Python because it needs the model: [`continuation_logprobs`] prefills
//! a prompt once and scores all of its continuations as one batch, which is what makes
//! thousands of continuations affordable on a CPU. It is checked against the unbatched
//! [`Model::token_logprobs`] in the tests.

use std::io::BufRead;

use serde_json::Value;

use crate::model::{ForwardOutput, Model, ModelError, Outputs, Positions};

/// One prompt of a prompt file, with whatever else the file says about it (id, source,
/// whether it is "challenging"), carried through to the outputs untouched.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalPrompt {
    /// The prompt text the continuations are sampled from.
    pub text: String,
    /// The line's other fields (empty for a bare string line).
    pub meta: serde_json::Map<String, Value>,
}

/// Errors of reading evaluation inputs.
#[derive(Debug, thiserror::Error)]
pub enum EvalInputError {
    /// A line is not JSON, or not a string or an object with a prompt text.
    #[error("line {line}: {message}")]
    Line {
        /// The line number, 1-based.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// Reading the input failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads JSON Lines prompts: a string per line, or an object whose "prompt" is a string or an
/// object with "text" (RealToxicityPrompts' layout); the object's other fields become `meta`.
/// Blank lines are skipped.
pub fn read_prompts(reader: impl BufRead) -> Result<Vec<EvalPrompt>, EvalInputError> {
    let mut out = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| EvalInputError::Line {
            line: i + 1,
            message,
        };
        let v: Value = serde_json::from_str(&line).map_err(|e| bad(e.to_string()))?;
        let prompt = match v {
            Value::String(text) => EvalPrompt {
                text,
                meta: Default::default(),
            },
            Value::Object(mut o) => {
                let text = match o.remove("prompt") {
                    Some(Value::String(s)) => s,
                    Some(Value::Object(p)) => match p.get("text") {
                        Some(Value::String(s)) => s.clone(),
                        _ => return Err(bad("\"prompt\" object without a \"text\" string".into())),
                    },
                    _ => return Err(bad("expected a \"prompt\" string or object".into())),
                };
                EvalPrompt { text, meta: o }
            }
            _ => return Err(bad("expected a string or an object".into())),
        };
        if prompt.text.trim().is_empty() {
            return Err(bad("empty prompt".into()));
        }
        out.push(prompt);
    }
    Ok(out)
}

/// `log softmax(logits)[token]`.
pub fn log_prob(logits: &[f32], token: u32) -> f32 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = m + logits.iter().map(|&x| (x - m).exp()).sum::<f32>().ln();
    logits[token as usize] - lse
}

/// Natural-log probability of every token of every continuation given `prompt` and the
/// continuation's earlier tokens: `result[i][j] = log p(cont[i][j] | prompt, cont[i][..j])`.
///
/// The prompt is run once; its cache is copied to one row per continuation and all
/// continuations are run as one batch, right-padded to the longest (causal attention means
/// padding after a row's last token cannot change that row's earlier positions, and the
/// padded positions' outputs are ignored).
pub fn continuation_logprobs(
    model: &Model,
    prompt: &[u32],
    continuations: &[&[u32]],
) -> Result<Vec<Vec<f32>>, ModelError> {
    if prompt.is_empty() {
        return Err(ModelError::Input("the prompt is empty".into()));
    }
    let n = continuations.len();
    let longest = continuations.iter().map(|c| c.len()).max().unwrap_or(0);
    if n == 0 || longest == 0 {
        return Ok(vec![Vec::new(); n]);
    }
    let context = model.config().context_length;
    if prompt.len() + longest > context {
        return Err(ModelError::ContextFull {
            needed: prompt.len() + longest,
            context,
        });
    }
    let logits_only = |logits| Outputs {
        logits,
        keys: Positions::None,
        key_type: crate::fingerprint::KeyType::FinalHidden,
    };
    let mut cache = model.new_cache(1);
    let mut out = ForwardOutput::default();
    model.forward_into(
        prompt,
        1,
        &mut cache,
        logits_only(Positions::Last),
        &mut out,
    )?;
    let mut result: Vec<Vec<f32>> = continuations
        .iter()
        .map(|c| {
            let mut v = Vec::with_capacity(c.len());
            if let Some(&first) = c.first() {
                v.push(log_prob(out.logits_at(0, 0), first));
            }
            v
        })
        .collect();
    if longest == 1 {
        return Ok(result);
    }
    // Inputs are each continuation but its last token, right-padded to `longest - 1`.
    let width = longest - 1;
    let pad = model.config().eos_token_id.unwrap_or(0);
    let mut tokens = Vec::with_capacity(n * width);
    for c in continuations {
        let body = &c[..c.len().saturating_sub(1)];
        tokens.extend_from_slice(body);
        tokens.extend(std::iter::repeat_n(pad, width - body.len()));
    }
    cache.select_rows(&vec![0; n])?;
    model.forward_into(
        &tokens,
        n,
        &mut cache,
        logits_only(Positions::All),
        &mut out,
    )?;
    for (r, c) in continuations.iter().enumerate() {
        for j in 1..c.len() {
            result[r].push(log_prob(out.logits_at(r, j - 1), c[j]));
        }
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::{write_tiny_llama, TinySpec};
    use crate::model::WeightFormat;

    #[test]
    fn reads_strings_rtp_objects_and_keeps_meta() {
        let text = concat!(
            "\"plain prompt\"\n",
            "\n",
            "{\"prompt\": \"with meta\", \"id\": \"a1\", \"challenging\": true}\n",
            "{\"prompt\": {\"text\": \"rtp style\", \"toxicity\": 0.2}, \"filename\": \"x\"}\n",
        );
        let p = read_prompts(text.as_bytes()).unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].text, "plain prompt");
        assert!(p[0].meta.is_empty());
        assert_eq!(p[1].text, "with meta");
        assert_eq!(p[1].meta["id"], "a1");
        assert_eq!(p[1].meta["challenging"], true);
        assert!(!p[1].meta.contains_key("prompt"));
        assert_eq!(p[2].text, "rtp style");
        assert_eq!(p[2].meta["filename"], "x");
    }

    #[test]
    fn bad_prompt_lines_name_their_line() {
        for (bad, line) in [
            ("\"ok\"\n{\"text\": \"no prompt key\"}\n", 2),
            ("not json\n", 1),
            ("\"ok\"\n\"ok\"\n\"  \"\n", 3),
            ("{\"prompt\": {\"no_text\": 1}}\n", 1),
        ] {
            match read_prompts(bad.as_bytes()) {
                Err(EvalInputError::Line { line: l, .. }) => assert_eq!(l, line, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn log_prob_is_log_softmax() {
        // softmax([0, ln 3]) = [1/4, 3/4].
        let l = [0.0f32, 3f32.ln()];
        assert!((log_prob(&l, 0) - 0.25f32.ln()).abs() < 1e-6);
        assert!((log_prob(&l, 1) - 0.75f32.ln()).abs() < 1e-6);
        // Shift invariance and large logits.
        let big = [1000.0f32, 1000.0 + 3f32.ln()];
        assert!((log_prob(&big, 1) - 0.75f32.ln()).abs() < 1e-4);
    }

    #[test]
    fn batched_continuation_logprobs_match_unbatched_scoring() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write_tiny_llama(&path, &TinySpec::default()).unwrap();
        let model = Model::load(&path, WeightFormat::F32).unwrap();
        let tok = model.tokenizer();
        let prompt = tok.encode("the cat sat on").unwrap();
        let conts: Vec<Vec<u32>> = [" the mat and slept", " a", " it", ""]
            .iter()
            .map(|s| tok.encode(s).unwrap())
            .collect();
        assert!(conts[0].len() >= 3, "a multi-token continuation is needed");
        let refs: Vec<&[u32]> = conts.iter().map(|c| c.as_slice()).collect();
        let got = continuation_logprobs(&model, &prompt, &refs).unwrap();
        assert_eq!(got.len(), 4);
        for (c, g) in conts.iter().zip(&got) {
            assert_eq!(g.len(), c.len());
            if c.is_empty() {
                continue;
            }
            let full: Vec<u32> = prompt.iter().chain(c).copied().collect();
            let all = model.token_logprobs(&full).unwrap();
            let want = &all[prompt.len() - 1..];
            for (a, b) in g.iter().zip(want) {
                assert!((a - b).abs() < 1e-3, "{g:?} vs {want:?}");
            }
        }
        assert!(continuation_logprobs(&model, &[], &refs).is_err());
    }
}
