#!/usr/bin/env python3
"""The guard as the API runs it (rules + classifier, through `sluice-api guard check`) on the
evaluation splits, printing recall and false-positive rate per set, language and category.

  guard/train/evaluate [--sets test,unseen,corpus]

Sets (built by prepare.py; none of them was trained on):
  test    the held-out test splits of s-labs, neuralchemy, the project's authored data and
          its rule corpus (guard/tests/corpus)
  unseen  yanismiraoui (multilingual attacks; a public set the training never saw), with the
          test split's benign rows for the false-positive rate

For each: rules alone, classifier alone (score >= 0.5, the shipped threshold) and both (what
a tenant with the default policy gets), plus the classifier's recall at 1 % FPR measured on the
set's own benign rows (how Prompt Guard reports it) where the set has at least 100 of them.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build"


def load(name):
    return [json.loads(l) for l in (BUILD / f"{name}.jsonl").read_text(encoding="utf-8").splitlines() if l.strip()]


def verdicts(api, encoder, rows):
    stdin = "".join(json.dumps({"text": r["text"]}, ensure_ascii=False) + "\n" for r in rows)
    out = subprocess.run([api, "guard", "check", "--guard-model", encoder], input=stdin.encode("utf-8"),
                         stdout=subprocess.PIPE, check=True).stdout.decode("utf-8").splitlines()
    assert len(out) == len(rows), "one verdict per line"
    return [json.loads(l) for l in out]


def pct(a, b):
    return f"{a}/{b} = {100.0 * a / b:5.1f} %" if b else "-"


def recall_at_fpr(scores, labels, fpr=0.01):
    benign = sorted((s for s, l in zip(scores, labels) if l == 0), reverse=True)
    k = int(fpr * len(benign))
    t = benign[k] if k < len(benign) else -1.0
    hits = sum(1 for s, l in zip(scores, labels) if l == 1 and s > t)
    return hits, sum(labels)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("api")
    ap.add_argument("encoder")
    ap.add_argument("--sets", default="test,unseen")
    args = ap.parse_args()
    test = load("test")
    for name in args.sets.split(","):
        rows = load(name)
        if name == "unseen":
            rows = rows + [r for r in test if r["label"] == 0]
        v = verdicts(args.api, args.encoder, rows)
        rules = [any(c != "classifier" for c in x["categories"]) for x in v]
        clf = ["classifier" in x["categories"] for x in v]
        both = [a or b for a, b in zip(rules, clf)]
        labels = [r["label"] for r in rows]
        print(f"\n== {name}: {sum(labels)} attacks, {len(labels) - sum(labels)} benign")
        for what, fired in (("rules", rules), ("classifier", clf), ("rules + classifier", both)):
            tp = sum(1 for f, l in zip(fired, labels) if f and l)
            fp = sum(1 for f, l in zip(fired, labels) if f and not l)
            print(f"  {what:19} recall {pct(tp, sum(labels))}   false positives {pct(fp, len(labels) - sum(labels))}")
        if len(labels) - sum(labels) >= 100:
            h, n = recall_at_fpr([x["scores"]["classifier"] for x in v], labels)
            print(f"  classifier recall at 1 % FPR (threshold from this set's benign rows): {pct(h, n)}")
        for key in ("lang", "category", "source"):
            groups = {}
            for r, f in zip(rows, both):
                g = groups.setdefault((r["label"], r[key]), [0, 0])
                g[0] += int(f)
                g[1] += 1
            att = ", ".join(f"{k} {a}/{b}" for (l, k), (a, b) in sorted(groups.items()) if l == 1)
            ben = ", ".join(f"{k} {a}/{b}" for (l, k), (a, b) in sorted(groups.items()) if l == 0 and a)
            print(f"  by {key}: attacks caught {att}")
            if ben:
                print(f"  by {key}: benign blocked {ben}")


if __name__ == "__main__":
    main()
