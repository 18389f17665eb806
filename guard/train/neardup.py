#!/usr/bin/env python3
"""Near twins between training rows and the evaluation splits (guard/train/build, from
prepare.py): for every row of the held-out test split and of the unseen set, the highest
Jaccard similarity of its character 5-gram set (text normalised as prepare.py does) with any
training row. prepare.py drops exact duplicates; this shows how many evaluation rows still
have a close paraphrase or translation in training, split by whether that row comes from the
files given (for example a new batch of translations) or from the rest of the training data.

  python3 guard/train/neardup.py [guard/train/data/FILE.jsonl ...]
"""

import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate import load  # noqa: E402
from prepare import norm  # noqa: E402

THRESHOLDS = (0.5, 0.6, 0.7, 0.8)
# A 5-gram in more training rows than this is too common to point at a twin.
MAX_POSTING = 3000


def grams(text, n=5):
    t = norm(text)
    return {t[i:i + n] for i in range(max(1, len(t) - n + 1))}


def main():
    given = set()
    for path in sys.argv[1:]:
        given |= {json.loads(l)["text"].strip() for l in Path(path).read_text(encoding="utf-8").split("\n") if l.strip()}
    train = load("train")
    train_grams = [grams(r["text"]) for r in train]
    in_given = [r["text"].strip() in given for r in train]
    index = collections.defaultdict(list)
    for i, g in enumerate(train_grams):
        for x in g:
            index[x].append(i)
    print(f"train: {len(train)} rows, {sum(in_given)} of them from the files given")
    for split in ("test", "unseen"):
        best = []
        for r in load(split):
            g = grams(r["text"])
            shared = collections.Counter()
            for x in g:
                posting = index.get(x)
                if posting and len(posting) <= MAX_POSTING:
                    shared.update(posting)
            top = {False: 0.0, True: 0.0}
            for i, c in shared.most_common(200):
                top[in_given[i]] = max(top[in_given[i]], c / len(g | train_grams[i]))
            best.append((top[False], top[True]))
        for t in THRESHOLDS:
            rest = sum(1 for a, _ in best if a >= t)
            only = sum(1 for a, b in best if b >= t and a < t)
            print(f"{split}: {len(best)} rows; similarity >= {t}: {rest} with a twin in the rest of training, "
                  f"{only} more with one only in the files given")


if __name__ == "__main__":
    main()
