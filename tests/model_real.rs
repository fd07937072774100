//! Checks on the real default model (SmolLM2-135M-Instruct, Q4_1 GGUF). They run only when
//! the model is in the cache (`goodtriever model fetch`; CI fetches it first) and print why
//! they skip otherwise.

use goodtriever::fingerprint::KeyType;
use goodtriever::generate::{Generator, SamplingParams};
use goodtriever::model::fetch::default_model_path;
use goodtriever::model::{Model, WeightFormat};

fn real_model(format: WeightFormat) -> Option<Model> {
    let path = default_model_path().ok()?;
    if !path.is_file() {
        eprintln!(
            "skipping: {} is missing (run `goodtriever model fetch`)",
            path.display()
        );
        return None;
    }
    Some(Model::load(&path, format).unwrap())
}

const TEXT: &str =
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, \
France. It is named after the engineer Gustave Eiffel, whose company designed and built the tower \
from 1887 to 1889. Locally nicknamed \"La dame de fer\", it was constructed as the centrepiece of \
the 1889 World's Fair, and to crown the centennial anniversary of the French Revolution.";

#[test]
fn tokenizer_matches_the_reference_ids() {
    let Some(m) = real_model(WeightFormat::Native) else {
        return;
    };
    let tok = m.tokenizer();
    assert_eq!(
        tok.encode("Hello world, how are you?").unwrap(),
        vec![19556, 905, 28, 638, 359, 346, 47]
    );
    assert_eq!(tok.encode("<|im_start|>user").unwrap()[0], 1);
    assert_eq!(tok.special_token_ids().len(), 17);
    for text in [TEXT, "naïve café — 東京 🚀 2024"] {
        assert_eq!(tok.decode(&tok.encode(text).unwrap(), false).unwrap(), text);
    }
    let f = m.fingerprint();
    assert_eq!((f.hidden_size, f.vocab_size), (576, Some(49152)));
    assert_eq!(f.architecture.as_deref(), Some("llama"));
}

#[test]
fn greedy_continuation_of_the_capital_of_france_names_paris() {
    let Some(m) = real_model(WeightFormat::Q8_0) else {
        return;
    };
    let params = SamplingParams {
        temperature: 0.0,
        max_new_tokens: 8,
        ..SamplingParams::default()
    };
    let s = Generator::new(&m, params)
        .unwrap()
        .generate_text("The capital of France is", None)
        .unwrap()
        .remove(0);
    assert!(s.text.contains("Paris"), "{:?}", s.text);
}

#[test]
fn converted_formats_keep_the_per_token_nll() {
    let Some(native) = real_model(WeightFormat::Native) else {
        return;
    };
    let tokens = native.tokenizer().encode(TEXT).unwrap();
    let nll = |m: &Model| {
        -m.token_logprobs(&tokens).unwrap().iter().sum::<f32>() / (tokens.len() - 1) as f32
    };
    let base = nll(&native);
    assert!(base > 1.0 && base < 4.0, "native NLL {base}");
    for format in [WeightFormat::Q8_0, WeightFormat::F32] {
        let m = real_model(format).unwrap();
        let v = nll(&m);
        eprintln!("per-token NLL: native {base:.4}, {format} {v:.4}");
        assert!((v - base).abs() < 0.05, "{format}: {v} vs native {base}");
    }
}

#[test]
fn both_key_types_have_the_hidden_size_and_differ() {
    let Some(m) = real_model(WeightFormat::F32) else {
        return;
    };
    let tokens = m.tokenizer().encode(TEXT).unwrap();
    let mut keys = Vec::new();
    for kt in KeyType::ALL {
        let mut n = 0;
        let mut first = Vec::new();
        m.encode_pairs(&tokens, 32, 16, kt, 4, |k, _| {
            assert_eq!(k.len(), 576);
            if first.is_empty() {
                first = k.to_vec();
            }
            n += 1;
        })
        .unwrap();
        assert_eq!(n, tokens.len() - 2);
        keys.push(first);
    }
    assert_ne!(keys[0], keys[1]);
}
