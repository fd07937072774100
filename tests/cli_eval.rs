//! `goodtriever eval generate` and `eval perplexity` end to end on the tiny random llama and
//! two tiny stores: the record layout scripts/eval/evaluate.py relies on (one record per prompt ×
//! variant × sample, prompt fields carried through, batch timings), seeded reruns, and
//! perplexities equal to the model's own unbatched token log-probabilities; and the sampling
//! and control flags spelled the same in `generate` and `eval generate`.

mod build_common;

use std::path::Path;

use build_common::{run, texts, tiny_model, write_jsonl};
use goodtriever::model::{Model, WeightFormat};
use serde_json::Value;

fn read(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn build_store(dir: &Path, model: &Path, name: &str, seed: u64) -> String {
    let input = dir.join(format!("{name}.jsonl"));
    write_jsonl(&input, &texts(30, seed));
    let out = dir.join(name);
    let (ok, _, err) = run(&[
        "datastore",
        "build",
        "--window",
        "32",
        "--stride",
        "16",
        "--dtype",
        "f32",
        "--input",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    out.display().to_string()
}

#[test]
fn generate_then_perplexity_on_the_tiny_model() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = tiny_model(d, 64);
    let toxic = build_store(d, &model, "toxic", 1);
    let nontoxic = build_store(d, &model, "nontoxic", 2);
    let prompts = d.join("prompts.jsonl");
    std::fs::write(
        &prompts,
        concat!(
            "{\"prompt\": \"the cat sat\", \"id\": \"a\", \"challenging\": true}\n",
            "{\"prompt\": \"over the hill\", \"id\": \"b\", \"challenging\": false}\n",
            "{\"prompt\": \"not used\", \"id\": \"c\", \"challenging\": false}\n",
        ),
    )
    .unwrap();
    let m = model.to_str().unwrap();
    let gen = |out: &Path| {
        let (ok, _, err) = run(&[
            "eval",
            "generate",
            "--prompts",
            prompts.to_str().unwrap(),
            "--limit",
            "2",
            "--num-samples",
            "3",
            "--max-new-tokens",
            "5",
            "--seed",
            "7",
            "--model",
            m,
            "--weights",
            "f32",
            "--toxic",
            &toxic,
            "--nontoxic",
            &nontoxic,
            "--alpha",
            "4",
            "--temperature",
            "1",
            "--knn-temperature",
            "100",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{err}");
        read(out)
    };
    let g1 = gen(&d.join("g1.jsonl"));
    assert_eq!(g1.len(), 2 * 2 * 3, "prompts × variants × samples");
    assert_eq!(g1, {
        // Timings differ between runs; everything else is seeded.
        let mut g2 = gen(&d.join("g2.jsonl"));
        for (a, b) in g2.iter_mut().zip(&g1) {
            for k in ["batch_ms", "batch_prefill_ms", "batch_hook_ms"] {
                a[k] = b[k].clone();
            }
        }
        g2
    });
    for (i, r) in g1.iter().enumerate() {
        let (p, v, s) = (i / 6, (i / 3) % 2, i % 3);
        assert_eq!(r["prompt_index"], p);
        assert_eq!(r["variant"], ["base", "goodtriever"][v]);
        assert_eq!(r["sample"], s);
        assert_eq!(r["id"], ["a", "b"][p]);
        assert_eq!(r["challenging"], p == 0);
        assert_eq!(r["batch_size"], 3);
        assert!(r["batch_ms"].as_f64().unwrap() > 0.0);
        let hook = r["batch_hook_ms"].as_f64().unwrap();
        assert_eq!(
            hook > 0.0,
            v == 1,
            "only the controlled variant runs the hook"
        );
        assert_eq!(r["rule"].is_object(), v == 1);
    }
    // The control changes the samples (same seeds, α = 4).
    let conts = |v: &str| -> Vec<Value> {
        g1.iter()
            .filter(|r| r["variant"] == v)
            .map(|r| r["token_ids"].clone())
            .collect()
    };
    assert_ne!(conts("base"), conts("goodtriever"));

    let ppl_path = d.join("ppl.jsonl");
    let (ok, _, err) = run(&[
        "eval",
        "perplexity",
        "--input",
        d.join("g1.jsonl").to_str().unwrap(),
        "--out",
        ppl_path.to_str().unwrap(),
        "--model",
        m,
    ]);
    assert!(ok, "{err}");
    let ppl = read(&ppl_path);
    assert_eq!(ppl.len(), g1.len());
    let model = Model::load(&model, WeightFormat::F32).unwrap();
    for (g, p) in g1.iter().zip(&ppl) {
        assert_eq!(
            (&g["prompt_index"], &g["variant"], &g["sample"]),
            (&p["prompt_index"], &p["variant"], &p["sample"])
        );
        let mut cont: Vec<u32> = g["token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect();
        if g["stop"] == "eos" {
            cont.pop();
        }
        assert_eq!(p["tokens"], cont.len());
        if cont.is_empty() {
            assert!(p["ppl"].is_null());
            continue;
        }
        let prompt = model
            .tokenizer()
            .encode(g["prompt"].as_str().unwrap())
            .unwrap();
        let full: Vec<u32> = prompt.iter().chain(&cont).copied().collect();
        let lp = model.token_logprobs(&full).unwrap();
        let nll: f64 = -lp[prompt.len() - 1..]
            .iter()
            .map(|&x| f64::from(x))
            .sum::<f64>();
        let got = p["nll"].as_f64().unwrap();
        assert!(
            (got - nll).abs() < 1e-2 * cont.len() as f64,
            "{got} vs {nll}"
        );
        let want_ppl = (nll / cont.len() as f64).exp();
        assert!((p["ppl"].as_f64().unwrap() / want_ppl - 1.0).abs() < 1e-2);
    }
}

/// The long flags of a command, from its --help.
fn long_flags(cmd: &[&str]) -> Vec<String> {
    let mut args = cmd.to_vec();
    args.push("--help");
    let (ok, out, err) = run(&args);
    assert!(ok, "{err}");
    let mut flags: Vec<String> = out
        .split(|c: char| c.is_whitespace() || c == ',' || c == '=' || c == '[' || c == ']')
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.trim_end_matches(['.', ')', ':']).to_string())
        .collect();
    flags.sort();
    flags.dedup();
    flags
}

#[test]
fn generate_and_eval_generate_spell_sampling_and_rule_flags_alike() {
    let generate = long_flags(&["generate"]);
    let eval = long_flags(&["eval", "generate"]);
    for f in [
        "--temperature",
        "--knn-temperature",
        "--top-p",
        "--top-k",
        "--seed",
        "--max-new-tokens",
        "--num-samples",
        "--alpha",
        "--k",
        "--filter-p",
        "--lambda",
        "--mode",
        "--exact",
        "--ef",
        "--model",
        "--weights",
        "--toxic",
        "--nontoxic",
    ] {
        assert!(
            generate.contains(&f.to_string()),
            "generate lacks {f}: {generate:?}"
        );
        assert!(
            eval.contains(&f.to_string()),
            "eval generate lacks {f}: {eval:?}"
        );
    }
    assert!(
        !eval.contains(&"--sample-temperature".to_string()),
        "--sample-temperature is gone"
    );
    // adjust does not sample: its kNN temperature is --knn-temperature, --temperature still
    // accepted as its old name.
    assert!(long_flags(&["adjust"]).contains(&"--knn-temperature".to_string()));
    let (_, _, err) = run(&[
        "adjust",
        "--temperature",
        "0",
        "--hidden",
        "x.npy",
        "--out",
        "y",
    ]);
    assert!(!err.contains("unexpected argument"), "{err}");
}
