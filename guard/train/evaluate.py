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

  guard/train/evaluate --judge MODEL [--worker target/debug/sluice-worker]

adds the served model's second opinion (the worker's injection judge, `sluice-worker judge`)
on every text the default policy lets through with a classifier score in the widest grey band
(JUDGE_BANDS[0] up to the threshold), and prints, per band, what the judge adds to recall,
what it adds to false positives, the share of traffic it judges and its time per text.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build"

THRESHOLD = 0.5
# Lower edges of the grey bands reported (a tenant's `injection_judge_from`).
JUDGE_BANDS = (0.05, 0.1, 0.2, 0.3)


def load(name):
    return [json.loads(l) for l in (BUILD / f"{name}.jsonl").read_text(encoding="utf-8").split("\n") if l.strip()]


def verdicts(api, encoder, rows):
    stdin = "".join(json.dumps({"text": r["text"]}, ensure_ascii=False) + "\n" for r in rows)
    out = subprocess.run([api, "guard", "check", "--guard-model", encoder], input=stdin.encode("utf-8"),
                         stdout=subprocess.PIPE, check=True).stdout.decode("utf-8").split("\n")
    out = [l for l in out if l.strip()]
    assert len(out) == len(rows), "one verdict per line"
    return [json.loads(l) for l in out]


def judge_verdicts(worker, model, texts):
    """The worker's judge on each text: (verdict, ms) in order."""
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", encoding="utf-8", delete=False) as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
        path = f.name
    out = subprocess.run([worker, "judge", "--model", model, "--input", path],
                         stdout=subprocess.PIPE, check=True).stdout.decode("utf-8").split("\n")
    out = [l for l in out if l.strip()]
    Path(path).unlink()
    assert len(out) == len(texts), "one verdict per text"
    rows = [json.loads(l) for l in out]
    return [(r["verdict"], r["ms"]) for r in rows]


def report_judge(worker, model, rows, v, blocked):
    scores = [x["scores"]["classifier"] for x in v]
    band = [i for i, s in enumerate(scores) if not blocked[i] and JUDGE_BANDS[0] <= s < THRESHOLD]
    print(f"  judge ({model}): {len(band)} texts in the widest band [{JUDGE_BANDS[0]}, {THRESHOLD})", flush=True)
    judged = dict(zip(band, judge_verdicts(worker, model, [rows[i]["text"] for i in band])))
    labels = [r["label"] for r in rows]
    attacks, benign = sum(labels), len(labels) - sum(labels)
    base_tp = sum(1 for b, l in zip(blocked, labels) if b and l)
    base_fp = sum(1 for b, l in zip(blocked, labels) if b and not l)
    errors = sum(1 for verdict, _ in judged.values() if verdict == "error")
    for lo in JUDGE_BANDS:
        inside = [i for i in judged if scores[i] >= lo]
        stop = [i for i in inside if judged[i][0] != "clean"]  # an error fails closed
        tp = base_tp + sum(1 for i in stop if labels[i])
        fp = base_fp + sum(1 for i in stop if not labels[i])
        ms = [judged[i][1] for i in inside]
        print(f"  band [{lo}, {THRESHOLD}): judged {pct(len(inside), len(rows))} of texts; recall {pct(tp, attacks)} "
              f"(+{tp - base_tp}), false positives {pct(fp, benign)} (+{fp - base_fp})"
              + (f"; {statistics.median(ms):.0f} ms median per judged text" if ms else ""))
    if errors:
        print(f"  judge errors (counted as blocked, the judge fails closed): {errors}")


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
    ap.add_argument("--judge", metavar="MODEL", help="also measure the worker's injection judge with this served model")
    ap.add_argument("--worker", default="target/debug/sluice-worker")
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
        if args.judge:
            report_judge(args.worker, args.judge, rows, v, both)


if __name__ == "__main__":
    main()
