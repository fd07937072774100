"""Hand-made cases for the sweep and drift helpers (no model, no scorer, no download):
evaluate.all_metrics over variants and subsets, sweep.py's run plan and recipe parsing, and
make_prompts.davidson_domains' held-out / store split on a tiny hand-written CSV.

Run: .venv-data/bin/python -m pytest scripts/eval/tests
"""

import csv
import sys
from pathlib import Path

import pytest

# The scripts under test live in scripts/eval and scripts/data.
sys.path[:0] = [str(Path(__file__).resolve().parents[2] / d) for d in ("data", "eval")]

import evaluate as ev  # noqa: E402
import make_prompts as mp  # noqa: E402
import sweep  # noqa: E402


def gen(p, v, s, text, challenging):
    return {"prompt_index": p, "variant": v, "sample": s, "continuation": text, "challenging": challenging,
            "batch_ms": 100.0, "batch_size": 2, "batch_hook_ms": 25.0 if v != "base" else 0.0}


def test_all_metrics_by_variant_and_subset():
    gens = [
        gen(0, "base", 0, "a b c", True), gen(0, "base", 1, "a b d", True),
        gen(1, "base", 0, "x y q", False), gen(1, "base", 1, "x y q", False),
        gen(0, "ctl", 0, "a b c", True), gen(0, "ctl", 1, "a b c", True),
        gen(1, "ctl", 0, "x z q", False), gen(1, "ctl", 1, "w y q", False),
    ]
    scores = [0.9, 0.2, 0.1, 0.3, 0.4, 0.1, 0.0, 0.2]
    # nll = ln(4) * tokens: every continuation's perplexity is 4.
    ppl = [{"prompt_index": g["prompt_index"], "variant": g["variant"], "sample": g["sample"],
            "nll": 2 * 1.3862943611198906, "tokens": 2} for g in gens]
    m = ev.all_metrics(gens, scores, ppl)
    assert set(m) == {"all", "challenging", "non-challenging"}
    assert list(m["all"]) == ["base", "ctl"]
    # EMT: base maxima 0.9 and 0.3, ctl 0.4 and 0.2.
    assert m["all"]["base"]["emt"] == pytest.approx(0.6)
    assert m["all"]["ctl"]["emt"] == pytest.approx(0.3)
    assert m["all"]["ctl"]["emt_se"] == pytest.approx(0.1 / 2**0.5)  # maxima 0.4, 0.2: std 0.1
    assert m["challenging"]["base"]["emt"] == pytest.approx(0.9)
    assert m["non-challenging"]["ctl"]["emt"] == pytest.approx(0.2)
    assert m["all"]["base"]["tox_prob_0.25"] == pytest.approx(1.0)
    assert m["all"]["ctl"]["tox_prob_0.25"] == pytest.approx(0.5)
    # dist-1: base prompt 0: {a,b,c,d}/6, prompt 1: {x,y,q}/6; ctl: 3/6 and {x,z,q,w,y}/6.
    assert m["all"]["base"]["dist_1"] == pytest.approx((4 / 6 + 3 / 6) / 2)
    assert m["all"]["ctl"]["dist_1"] == pytest.approx((3 / 6 + 5 / 6) / 2)
    # dist-3: every continuation is one trigram; base prompt 0: 2/2, prompt 1: 1/2.
    assert m["all"]["base"]["dist_3"] == pytest.approx((1.0 + 0.5) / 2)
    assert m["all"]["ctl"]["ppl"] == pytest.approx(4.0)
    assert m["all"]["ctl"]["control_share"] == pytest.approx(0.25)
    assert m["all"]["ctl"]["ms_per_sequence"] == pytest.approx(50.0)


def test_a_subset_without_bigrams_leaves_dist_2_and_3_out():
    # The challenging subset's continuations are one word each: dist-1 exists, dist-2/3 do not.
    gens = [
        gen(0, "base", 0, "a", True), gen(0, "base", 1, "b", True),
        gen(1, "base", 0, "x y z", False), gen(1, "base", 1, "x y w", False),
        gen(0, "ctl", 0, "a", True), gen(0, "ctl", 1, "a", True),
        gen(1, "ctl", 0, "x y z", False), gen(1, "ctl", 1, "w y z", False),
    ]
    m = ev.all_metrics(gens, [0.1] * 8, [])
    ch = m["challenging"]
    assert ch["base"]["dist_1"] == pytest.approx(1.0) and ch["ctl"]["dist_1"] == pytest.approx(0.5)
    assert "dist_2" not in ch["base"] and "dist_3" not in ch["ctl"]
    assert m["all"]["base"]["dist_2"] == pytest.approx(3 / 4)  # prompt 1: {xy, yz, yw} of 4
    targets = ev.check_targets(ch["base"], ch["ctl"])
    assert "dist_1_drop" in targets and "dist_2_drop" not in targets
    assert "| ctl |" in ev.markdown({"settings": {"n_prompts": 2, "prompts_file": "p", "samples": 2, "tokens": 3, "seed": 0},
                                    "metrics": m, "targets": {}})


def test_recipe_args_skip_comments_and_blanks(tmp_path):
    p = tmp_path / "r.args"
    p.write_text("# a comment\n--input\n  data/x.jsonl \n\n--window\n256\n")
    assert sweep.recipe_args(p) == ["--input", "data/x.jsonl", "--window", "256"]


def test_plan_shares_base_and_default_runs():
    runs, groups = sweep.plan(["alpha", "k", "T", "size", "mode", "sampling"], {0.25: Path("/s/25"), 0.5: Path("/s/50")})
    # The default configuration is one run, shared by every group that contains it.
    assert [n for _, n in groups["alpha"]] == ["alpha-0.5", "alpha-1", "default", "alpha-4"]
    assert [n for _, n in groups["k"]] == ["k-64", "k-256", "default"]
    assert [n for _, n in groups["T"]] == ["T-1", "T-5", "T-25", "default", "T-400"]
    assert [n for _, n in groups["size"]] == ["toxic-25pct", "toxic-50pct", "default"]
    assert runs["toxic-25pct"]["toxic"] == "/s/25"
    assert runs["T-25"]["extra"] == ["--knn-temperature", "25"]
    assert runs["toxic-only"]["extra"] == ["--mode", "toxic-only"]
    assert runs["base"]["base"] and runs["base-top-p-1"]["base"] and not runs["top-p-1"]["base"]
    assert runs["top-p-1-filter-p-1"]["extra"] == ["--top-p", "1", "--filter-p", "1"]
    assert len(runs) == 18
    runs2, _ = sweep.plan(["alpha", "alpha-sampling"], {})
    assert runs2["alpha-1"]["extra"] == ["--alpha", "1"] and runs2["alpha-1-top-p-1"]["extra"] == ["--alpha", "1", "--top-p", "1"]
    with pytest.raises(SystemExit):
        sweep.plan(["nope"], {})


def test_davidson_domains_split_held_out_prompts_from_store_tweets(tmp_path):
    # Find row indices on each side of the held-out rule.
    held = [str(i) for i in range(2000) if mp.davidson_is_heldout(str(i))][:4]
    rest = [str(i) for i in range(2000) if not mp.davidson_is_heldout(str(i))][:6]
    long_ = "one two three four five six seven eight nine ten"
    rows = [
        (held[0], 0, f"RT @someone: hate {long_} &amp; more"),
        (held[1], 1, f"offensive {long_}"),
        (held[2], 0, "too short to split"),
        (held[3], 2, f"neither {long_}"),
        (rest[0], 0, "store hate one"),
        (rest[1], 0, "store hate two"),
        (rest[2], 1, "store offensive one"),
        (rest[3], 1, f"offensive {long_}"),  # the same text as a held-out tweet: never stored
        (rest[4], 1, "store offensive two"),
        (rest[5], 0, "store hate one"),  # a duplicate text: once
    ]
    path = tmp_path / "labeled.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["", "count", "hate_speech", "offensive_language", "neither", "class", "tweet"])
        for idx, cls, tweet in rows:
            w.writerow([idx, 3, 0, 0, 0, cls, tweet])
    d = mp.davidson_domains(path, (0, 1), 1, 2)
    assert d[0]["name"] == "hate" and d[1]["name"] == "offensive"
    hp = d[0]["prompts"][0]
    assert hp["prompt"] == "hate one two three four five"
    assert hp["continuation"] == " six seven eight nine ten & more"
    assert hp["domain"] == "hate" and hp["class"] == 0
    assert sorted(d[0]["store"]) == ["store hate one", "store hate two"]
    assert sorted(d[1]["store"]) == ["store offensive one", "store offensive two"]
    with pytest.raises(SystemExit):
        mp.davidson_domains(path, (0, 1), 2, 2)  # only one splittable held-out hate tweet


def test_frontier_compares_each_run_with_the_base_prompt_by_prompt():
    import frontier

    def metrics(tox, d1, d2, ppl):
        per = {"max_toxicity": dict(enumerate(tox)), "dist_1": dict(enumerate(d1)),
               "dist_2": dict(enumerate(d2)), "ppl": dict(enumerate(ppl))}
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        return {"emt": mean(tox), "ppl": mean(ppl), "per_prompt": per}

    base = metrics([0.6, 0.4], [0.80, 0.70], [0.95, 0.97], [20.0, 22.0])
    good = metrics([0.3, 0.2], [0.78, 0.67], [0.94, 0.95], [21.0, 22.0])
    c = frontier.compare(base, good)
    assert c["emt_rel"] == pytest.approx(-0.5)
    assert c["max_toxicity"]["diff"] == pytest.approx(-0.25) and c["max_toxicity"]["pairs"] == 2
    assert c["dist_1"]["diff"] == pytest.approx(-0.025)
    assert c["meets_target"]
    # Diversity lost beyond the bar fails the target however much toxicity went.
    collapsed = metrics([0.0, 0.0], [0.60, 0.55], [0.90, 0.90], [15.0, 15.0])
    c = frontier.compare(base, collapsed)
    assert c["emt_rel"] == pytest.approx(-1.0) and not c["meets_target"]
    assert frontier.run_name("gate+prior", 4.0) == "gate-prior-alpha-4"
    assert frontier.parse_alphas(["gate=2,8"]) == {"gate": (2.0, 8.0)}
    with pytest.raises(SystemExit):
        frontier.parse_alphas(["nope=1"])


def test_frontier_second_scores_and_source_subsets(tmp_path):
    import json

    import frontier

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "source": s}) + "\n"
                               for p, s in [("a", "brown"), ("b", "davidson"), ("c", "brown"), ("d", "sotu")]))
    subsets = frontier.source_subsets(prompts, 3)  # the 4th prompt is beyond n: no "sotu" subset
    assert sorted(subsets) == ["source:brown", "source:davidson"]
    assert subsets["source:brown"]({"source": "brown"}) and not subsets["source:brown"]({"source": "davidson"})
    # Two prompts x two samples; the subset "one" holds prompt 0 only.
    gens = [{"prompt_index": i, "continuation": ""} for i in (0, 0, 1, 1)]
    metrics = {"all": {"per_prompt": {"max_toxicity": {"0": 0.0, "1": 0.0}}},
               "one": {"per_prompt": {"max_toxicity": {"0": 0.0}}}}
    frontier.add_second_scores(metrics, gens, [0.2, 0.6, 0.1, 0.3])
    assert metrics["all"]["per_prompt"]["max_toxicity2"] == {"0": 0.6, "1": 0.3}
    assert metrics["all"]["emt2"] == pytest.approx(0.45)
    assert metrics["one"]["emt2"] == pytest.approx(0.6) and metrics["one"]["per_prompt"]["max_toxicity2"] == {"0": 0.6}
    # The paired comparison carries the second scorer's change.
    base = {"emt": 0.5, "emt2": 0.45, "per_prompt": {"max_toxicity": {"0": 0.5, "1": 0.5},
            "max_toxicity2": {"0": 0.6, "1": 0.3}, "dist_1": {"0": 0.8}, "dist_2": {"0": 0.9}}}
    run = {"emt": 0.25, "emt2": 0.15, "per_prompt": {"max_toxicity": {"0": 0.25, "1": 0.25},
           "max_toxicity2": {"0": 0.2, "1": 0.1}, "dist_1": {"0": 0.8}, "dist_2": {"0": 0.9}}}
    c = frontier.compare(base, run)
    assert c["max_toxicity2"]["diff"] == pytest.approx(-0.3)
    assert c["emt2_rel"] == pytest.approx(-2 / 3)


def test_second_scorer_splits_by_the_prompts_rule_and_ranks_held_out_tweets(tmp_path):
    pytest.importorskip("sklearn")
    import second_scorer

    held = [str(i) for i in range(4000) if mp.davidson_is_heldout(str(i))][:20]
    rest = [str(i) for i in range(4000) if not mp.davidson_is_heldout(str(i))][:200]
    path = tmp_path / "labeled.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["", "count", "hate_speech", "offensive_language", "neither", "class", "tweet"])
        for n, idx in enumerate(rest + held):
            toxic = n % 2 == 0
            text = f"you stupid ugly jerk number {n}" if toxic else f"lovely sunny garden walk number {n}"
            w.writerow([idx, 3, 0, 3 if toxic else 0, 0 if toxic else 3, 1 if toxic else 2, text])
    train, held_out = second_scorer.labelled_tweets(path)
    assert len(train) == 200 and len(held_out) == 20
    cache = tmp_path / "scorer.pkl"
    fitted = second_scorer.fit(path, cache)
    assert fitted["meta"]["held_out_auc"] == pytest.approx(1.0)
    a, b = second_scorer.score(["what a stupid ugly jerk", "a sunny garden walk"], fitted)
    assert a > 0.5 > b
    # The cache is reused while the CSV is unchanged, and refitted once it changes.
    assert second_scorer.fit(path, cache)["meta"] == fitted["meta"]
    with open(path, "a", newline="", encoding="utf-8") as f:
        csv.writer(f).writerow([rest[0] + "0000", 3, 0, 0, 3, 2, "another calm day"])
    assert second_scorer.fit(path, cache)["meta"]["csv_sha256"] != fitted["meta"]["csv_sha256"]
