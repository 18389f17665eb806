#!/usr/bin/env python3
"""The served model's probe (guard/src/classifier/probe.rs): a probe over
Qwen2.5-Coder-0.5B-Instruct's hidden states (the test GGUF of scripts/fetch-test-model,
dequantised by transformers): the model cut after its first 8 decoder layers; the outputs of
layers 1 to 8, each under the model's final RMSNorm and averaged over the window's tokens (at
most 128), and layer 8's maximum over them, side by side and standardised; five MLPs with one
hidden layer of 64 ReLU units each (scikit-learn, random_state 0 to 4), their logits averaged,
give a logit that is added to the shipped classifier's. `fit` writes guard/model/probe.json
and guard/tests/fixtures/probe-logits.json; docs/results/guard.md has the figures.

Run in the training venv (guard/train/run makes it) with guard/train/requirements-probe.txt
installed after it, after guard/train/prepare.py. The shipped probe came from (about 55
minutes of extraction on 2 cores, then 5 minutes of fitting):

  probe.py extract val 0 99999 val.npz --every-layer
  probe.py extract test 0 99999 test.npz --every-layer
  probe.py extract unseen 0 99999 unseen.npz --every-layer
  probe.py extract train 0 10000 tr1.npz --every-layer
  probe.py extract train 10000 20000 tr2.npz --every-layer
  probe.py extract train 20000 99999 tr3.npz --every-layer
  probe.py shipped F.npz                      # for each of val, test and unseen
  probe.py fit --train tr1.npz,tr2.npz,tr3.npz --val val.npz
  probe.py evaluate --train tr1.npz,tr2.npz,tr3.npz --val val.npz --test test.npz --unseen unseen.npz

(Texts are batched in length order within each extracted file, so another split into files
pads differently and moves the features in their last bits; a single MLP's figures move by
about a point with that, the average of five less.)

Usage:

  probe.py extract SPLIT LO HI OUT.npz [--layer 8] [--every-layer]   # rows LO..HI of a seeded shuffle
  probe.py shipped OUT.npz                              # the shipped classifier's logits
  probe.py evaluate --train A.npz,B.npz --val V.npz,W.npz --test T.npz --unseen U.npz
  probe.py fit --train A.npz,B.npz --val V.npz,W.npz    # writes the probe the API uses

With the layers fine-tuned (`probe_tune.py`, its docstring has the steps), `fit --tuned DIR`
reads features that `probe_tune.py extract` wrote and puts the adapters into the spec.

Each of --train, --val, --test and --unseen takes one or more extracted files, comma-separated
(the extraction can be split into row ranges and run in turns).

`extract` is the slow step (about 0.1 s a row for 8 layers on 2 cores); features and texts
go to OUT.npz and OUT.npz.texts.json, `shipped` adds OUT.npz.shipped.npy beside them.
"""

import argparse
import base64
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from embed import mask_encoded  # noqa: E402

BUILD = HERE / "build"
REPO = HERE.parent.parent
SAMPLE_SEED = 1
TOKENS = 128
# The probe's head: an MLP of MLP_UNITS ReLU units with L2 penalty MLP_ALPHA (the shipped one),
# or a logistic regression with inverse penalty PROBE_C.
HEAD = "mlp"
MLP_UNITS = 64
MLP_ALPHA = 0.1
MLP_SEEDS = 5
PROBE_C = 0.003
TARGET_FPR = 0.01
WINDOW_OVERLAP = 32
# What the shipped probe reads: the means of layers 1 to 8 and layer 8's maximum, chosen on the
# validation split over the last layer's mean alone, over the means of layers 1 to 6 and 8 with
# layer 8's maximum, and over the means and maxima of every layer (extracted with --every-layer).
FEATURES = "mean1,mean2,mean3,mean4,mean5,mean6,mean7,mean8,max8"
WEIGHTS = (0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)
DEFAULT_GGUF = os.path.expanduser("~/.cache/sluice/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")


def rows_of(split):
    return [json.loads(l) for l in (BUILD / f"{split}.jsonl").read_text(encoding="utf-8").split("\n") if l.strip()]


def load_model(gguf, layer):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    gguf = Path(gguf)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.model.layers = model.model.layers[:layer]
    return tok, model.eval()


def batch_tensors(windows):
    """Token ids of windows padded to the longest, and their mask: `(batch, width)` each."""
    import torch

    width = max(len(w) for w in windows)
    x = torch.zeros((len(windows), width), dtype=torch.long)
    mask = torch.zeros((len(windows), width), dtype=torch.long)
    for j, w in enumerate(windows):
        x[j, :len(w)] = torch.tensor(w)
        mask[j, :len(w)] = 1
    return x, mask


def pooled(model, windows, every_layer=False):
    """The final-normed state after the cut, averaged over each window's tokens. With
    every_layer, each layer's output under the same final norm, averaged over the tokens and
    its maximum over them: (windows, 2 * layers, hidden), the means of layers 1 to `layers`
    first, then their maxima."""
    import torch

    layers = len(model.model.layers)
    out = np.zeros((len(windows), 2 * layers if every_layer else 1, model.config.hidden_size), np.float32)
    with torch.no_grad():
        for s in range(0, len(windows), 16):
            b = windows[s:s + 16]
            x, mask = batch_tensors(b)
            o = model.model(input_ids=x, attention_mask=mask, output_hidden_states=every_layer)
            h = o.last_hidden_state  # normed
            mf = mask.float()[:, :, None]
            if not every_layer:
                out[s:s + len(b), 0] = ((h * mf).sum(1) / mf.sum(1)).numpy()
                continue
            # hidden_states[l] is layer l's raw output for l < layers (0: the embeddings)
            for l in range(1, layers + 1):
                hl = h if l == layers else model.model.norm(o.hidden_states[l])
                out[s:s + len(b), l - 1] = ((hl * mf).sum(1) / mf.sum(1)).numpy()
                out[s:s + len(b), layers + l - 1] = hl.masked_fill(mask[:, :, None] == 0, -1e9).amax(1).numpy()
    return out if every_layer else out[:, 0]


def named_features(every, layer):
    """What `pooled(..., every_layer=True)` computed, by name: `mean{l}` is layer l's normed
    output averaged over the tokens, `max{l}` its maximum over them."""
    named = {f"mean{l}": every[:, l - 1] for l in range(1, layer + 1)}
    named.update({f"max{l}": every[:, layer + l - 1] for l in range(1, layer + 1)})
    return named


def extract(args):
    rows = rows_of(args.split)
    idx = np.random.default_rng(SAMPLE_SEED).permutation(len(rows))[args.lo:args.hi]
    rows = [rows[i] for i in idx]
    texts = [mask_encoded(r["text"]) for r in rows]
    tok, model = load_model(args.gguf, args.layer)
    ids = [tok(t, add_special_tokens=False)["input_ids"][:TOKENS] for t in texts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    every = args.every_layer
    feats = np.zeros((len(ids), 2 * args.layer, model.config.hidden_size) if every else (len(ids), model.config.hidden_size), np.float32)
    started = time.time()
    for s in range(0, len(order), 640):
        b = order[s:s + 640]
        feats[b] = pooled(model, [ids[i] for i in b], every)
        print(f"{s + len(b)}/{len(order)} rows, {time.time() - started:.0f} s", file=sys.stderr)
    named = named_features(feats, args.layer) if every else {f"mean{args.layer}": feats}
    np.savez(args.out, y=np.array([r["label"] for r in rows]), lang=np.array([r["lang"] for r in rows]), **named)
    Path(args.out + ".texts.json").write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")


def shipped(args):
    """The shipped classifier's logits (adapter, extended vocabulary, head, n-grams), as
    finetune.py computes them, for the texts of an extracted file."""
    import torch
    from safetensors.numpy import load_file

    import finetune as F

    torch.set_num_threads(2)
    root = Path(args.encoder)
    model_dir = REPO / "guard" / "model"
    adapter = load_file(str(model_dir / "adapter.safetensors"))
    extra = [w for w in (model_dir / "vocab-extra.txt").read_text(encoding="utf-8").split("\n") if w]
    tok = F.extended_tokenizer((root / "tokenizer.json").read_text(encoding="utf-8"), extra)
    rank = adapter["encoder.layer.0.attention.self.query.lora_a"].shape[0]
    enc = F.Encoder(load_file(str(root / "model.safetensors")), json.loads((root / "config.json").read_text()),
                    torch.Generator().manual_seed(0), len(extra), tok.token_to_id("[UNK]"), rank).eval()
    head_json = json.loads((model_dir / "head.json").read_text())
    head = F.Head(torch.Generator().manual_seed(0))
    with torch.no_grad():
        enc.extra.copy_(torch.from_numpy(adapter["embeddings.word_embeddings.extra"]))
        for i, layer in enumerate(enc.layers):
            for target in F.LORA_TARGETS:
                m = getattr(layer, target.replace(".", "_"))
                m.lora_a.copy_(torch.from_numpy(adapter[f"encoder.layer.{i}.{target}.lora_a"]))
                m.lora_b.copy_(torch.from_numpy(adapter[f"encoder.layer.{i}.{target}.lora_b"]))
                m.scale = 1.0  # lora_b is stored pre-multiplied
        for lin, spec in zip((head.l1, head.l2), head_json["layers"]):
            lin.weight.copy_(torch.tensor(spec["weight"]))
            lin.bias.copy_(torch.tensor(spec["bias"]))
        lexical = np.frombuffer(base64.b64decode(head_json["lexical"]["weights_f32le_base64"]), "<f4")
        head.lexical.weight.copy_(torch.from_numpy(lexical.copy())[:, None])
    texts = json.loads(Path(args.features + ".texts.json").read_text(encoding="utf-8"))
    z = F.logits(enc, head, tok, tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]"), texts)
    np.save(args.features + ".shipped.npy", z)


def threshold(benign, fpr):
    s = np.sort(benign)[::-1]
    return np.nextafter(s[int(np.floor(fpr * len(s)))], np.float32(np.inf))


def recall(z, y, t, pick=None):
    hit = (z >= t) & (y == 1)
    sel = (y == 1) if pick is None else (y == 1) & pick
    return f"{hit[sel].sum()}/{sel.sum()} {hit[sel].sum() / max(1, sel.sum()):.3f}"


def features_of(named, features):
    """The probe's input: the named features (`mean3`, `max8`, ...) side by side."""
    return np.concatenate([named[f] for f in features], axis=1)


class Mlp:
    """`seeds` MLPs of one hidden ReLU layer and a logistic output (scikit-learn's
    MLPClassifier, Adam, early stopping on a seeded tenth of the training rows; random_state
    0, 1, ...), their output logits averaged: one MLP whose hidden layer is theirs side by
    side and whose output weights are theirs divided by `seeds`, which is how probe.json
    stores it and candle computes it (`decision_function`)."""

    def __init__(self, units, alpha, seeds=1):
        from sklearn.neural_network import MLPClassifier

        self.models = [MLPClassifier((units,), alpha=alpha, max_iter=200, early_stopping=True, random_state=s) for s in range(seeds)]

    def fit(self, x, y):
        for m in self.models:
            m.fit(x, y)
        n = len(self.models)
        self.hidden_weight = np.concatenate([m.coefs_[0] for m in self.models], axis=1)
        self.hidden_bias = np.concatenate([m.intercepts_[0] for m in self.models])
        self.out_weight = np.concatenate([m.coefs_[1][:, 0] for m in self.models]) / n
        self.out_bias = float(np.mean([m.intercepts_[1][0] for m in self.models]))
        return self

    def decision_function(self, x):
        h = np.maximum(x @ self.hidden_weight + self.hidden_bias, 0)
        return h @ self.out_weight + self.out_bias


def fit_probe(paths, features, head=HEAD, c=PROBE_C, units=MLP_UNITS, alpha=MLP_ALPHA, seeds=MLP_SEEDS):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train = [np.load(p) for p in paths.split(",")]
    x = np.concatenate([features_of(t, features) for t in train])
    y = np.concatenate([t["y"] for t in train])
    scaler = StandardScaler().fit(x)
    if head == "mlp":
        probe = Mlp(units, alpha, seeds).fit(scaler.transform(x), y)
    else:
        probe = LogisticRegression(C=c, max_iter=5000).fit(scaler.transform(x), y)
    return scaler, probe, len(y)


def scored(paths, scaler, probe, features):
    """Labels, languages, probe logits and the shipped classifier's logits of the rows of one
    or more extracted files (comma-separated)."""
    parts = []
    for path in paths.split(","):
        d = np.load(path)
        parts.append((d["y"], d["lang"], probe.decision_function(scaler.transform(features_of(d, features))), np.load(path + ".shipped.npy")))
    return tuple(np.concatenate(column) for column in zip(*parts))


def combination(vy, vp, vs):
    """On the validation split: each logit in units of its spread over the benign rows, the
    probe's weight that catches most attacks at 1 % false positives, and that threshold."""
    sp, ss = float(vp[vy == 0].std()), float(vs[vy == 0].std())
    z = {w: vs / ss + w * vp / sp for w in WEIGHTS}
    best = max(WEIGHTS, key=lambda w: (z[w] >= threshold(z[w][vy == 0], TARGET_FPR))[vy == 1].mean())
    return ss, sp, best, float(threshold(z[best][vy == 0], TARGET_FPR))


def figures(a, b, val, test, unseen):
    """Recall at 1 % false positives of `a × classifier + b × probe` logits: on validation, on
    the held-out split (at its own threshold, at validation's, by language) and on the unseen
    set, whose false positives are the held-out split's benign rows. `val` is (labels, probe,
    classifier), `test` and `unseen` (labels, languages, probe, classifier)."""
    vy, vp, vs = val
    ty, tl, tp, ts = test
    uy, ul, up, us = unseen
    zv, zt = a * vs + b * vp, a * ts + b * tp
    zu = np.concatenate([a * us + b * up, zt[ty == 0]])
    yu, lu = np.concatenate([uy, ty[ty == 0]]), np.concatenate([ul, tl[ty == 0]])
    t_val, t_test = threshold(zv[vy == 0], TARGET_FPR), threshold(zt[ty == 0], TARGET_FPR)
    return {
        "val_recall_at_1pct": recall(zv, vy, t_val),
        "test_recall_at_1pct_own_threshold": recall(zt, ty, t_test),
        "test_at_val_threshold": {"recall": recall(zt, ty, t_val), "fpr": f"{(zt[ty == 0] >= t_val).mean():.4f}"},
        "test_by_lang_own_threshold": {l: recall(zt, ty, t_test, tl == l) for l in ("en", "zh", "de", "fr", "es", "it", "pt", "ru", "ja", "ko")},
        "unseen_recall_at_1pct_own_threshold": recall(zu, yu, t_test),
        "unseen_at_val_threshold": recall(zu, yu, t_val),
        "unseen_en_other_own_threshold": [recall(zu, yu, t_test, lu == "en"), recall(zu, yu, t_test, lu != "en")],
    }


def evaluate(args):
    features = args.features.split(",")
    scaler, probe, n = fit_probe(args.train, features, args.head, args.c, args.units, args.alpha, args.seeds)
    vy, _, vp, vs = scored(args.val, scaler, probe, features)
    ss, sp, best, _ = combination(vy, vp, vs)
    combos = {"shipped": (1.0, 0.0), "probe": (0.0, 1.0), f"shipped + {best} x probe": (1.0, best)}
    result = {"train_rows": n, "features": features, "head": args.head, "c": args.c, "units": args.units, "alpha": args.alpha, "seeds": args.seeds, "probe_weight_chosen_on_val": best}
    ty, tl, tp, ts = scored(args.test, scaler, probe, features)
    uy, ul, up, us = scored(args.unseen, scaler, probe, features)
    for name, (a, b) in combos.items():
        result[name] = figures(a / ss, b / sp, (vy, vp, vs), (ty, tl, tp, ts), (uy, ul, up, us))
    print(json.dumps(result, indent=1))


ADAPTED = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
           "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def tuned_adapter(directory):
    """The adapters `probe_tune.py tune` trained (`DIR/tuned.pt`): their tensors by GGUF
    name (`blk.{i}.{name}.lora_a` and `.lora_b`, the scale folded into b) and how they were
    trained."""
    import torch

    state = torch.load(Path(directory) / "tuned.pt", weights_only=False)
    return {"tensors": state["adapters"], **{k: state[k] for k in ("rank", "alpha", "epochs", "rows", "lr")}}


def merge_adapter(model, tensors):
    """Adds `lora_b · lora_a` to each adapted projection of the (float32) cut model, as
    candle does when it loads the spec."""
    import torch

    with torch.no_grad():
        for key, a in tensors.items():
            _, i, name, ab = key.split(".")
            if ab != "lora_a":
                continue
            b = tensors[f"blk.{i}.{name}.lora_b"]
            parent, child = ADAPTED[name].split(".")
            linear = getattr(getattr(model.model.layers[int(i)], parent), child)
            linear.weight += torch.from_numpy(b @ a)


def f32_list(a):
    """An array as f32 values written to the 9 significant digits that read back as the same f32."""
    return [float(f"{x:.9g}") for x in np.asarray(a, np.float32).tolist()]


def fit(args):
    """Writes guard/model/probe.json (the probe and how it joins the classifier) and
    guard/tests/fixtures/probe-logits.json (PyTorch's probe logits of fixed texts, which
    guard/tests/classifier.rs compares with candle's)."""
    import hashlib

    from finetune import FIXED_TEXTS

    features = args.features.split(",")
    layer = max(int(f.removeprefix("mean").removeprefix("max")) for f in features)
    scaler, probe, n = fit_probe(args.train, features, args.head, args.c, args.units, args.alpha, args.seeds)
    vy, _, vp, vs = scored(args.val, scaler, probe, features)
    ss, sp, best, t = combination(vy, vp, vs)
    sha = hashlib.sha256(Path(args.gguf).read_bytes()).hexdigest()
    spec = {
        "model": "Qwen2.5-Coder-0.5B-Instruct Q4_K_M (scripts/fetch-test-model)",
        "gguf_sha256": sha,
        "trained_by": "guard/train/probe.py fit",
        "train_rows": n,
        "head": args.head,
        "layer": layer,
        "features": features,
        "window_tokens": TOKENS,
        "window_overlap": WINDOW_OVERLAP,
        "mean": f32_list(scaler.mean_),
        "scale": f32_list(scaler.scale_),
    }
    if args.head == "mlp":
        spec["hidden"] = {
            "units": args.units * args.seeds,
            "alpha": args.alpha,
            "seeds": args.seeds,
            "weight_f32le_base64": base64.b64encode(np.ascontiguousarray(probe.hidden_weight, "<f4").tobytes()).decode(),
            "bias": f32_list(probe.hidden_bias),
        }
        spec["weight"] = f32_list(probe.out_weight)
        spec["bias"] = probe.out_bias
    else:
        spec["c"] = args.c
        spec["weight"] = f32_list(probe.coef_[0])
        spec["bias"] = float(probe.intercept_[0])
    adapter = tuned_adapter(args.tuned) if args.tuned else None
    if adapter:
        spec["tuned_by"] = {k: v for k, v in adapter.items() if k != "tensors"}
        spec["adapter"] = {k: {"shape": list(v.shape), "f32le_base64": base64.b64encode(np.ascontiguousarray(v, "<f4").tobytes()).decode()} for k, v in adapter["tensors"].items()}
    spec.update({
        "classifier_scale": ss,
        "probe_scale": sp,
        "probe_weight": best,
        "threshold": t,
        "operating_point": f"combined logit 0 = at most {TARGET_FPR:.0%} false positives on the validation split",
    })
    (REPO / "guard" / "model" / "probe.json").write_text(json.dumps(spec) + "\n")
    tok, model = load_model(args.gguf, layer)
    if adapter:
        merge_adapter(model, adapter["tensors"])
    cases = []
    for text in FIXED_TEXTS:
        masked = mask_encoded(text)
        ids = tok(masked, add_special_tokens=False)["input_ids"]
        windows, start = [], 0
        while True:
            windows.append(ids[start:start + TOKENS])
            if start + TOKENS >= len(ids):
                break
            start += TOKENS - WINDOW_OVERLAP
        every = pooled(model, windows, every_layer=True)
        z = probe.decision_function(scaler.transform(features_of(named_features(every, layer), features)))
        cases.append({"text": text, "probe_logit": float(z.max()), "windows": len(windows)})
    (REPO / "guard" / "tests" / "fixtures" / "probe-logits.json").write_text(json.dumps({
        "provenance": "guard/train/probe.py fit: transformers' Qwen2 on the dequantised GGUF, float32",
        "gguf_sha256": sha,
        "cases": cases,
    }, ensure_ascii=False, indent=1) + "\n")
    print(json.dumps({k: v for k, v in spec.items() if k not in ("mean", "scale", "weight", "hidden")}, indent=1))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract")
    e.add_argument("split")
    e.add_argument("lo", type=int)
    e.add_argument("hi", type=int)
    e.add_argument("out")
    e.add_argument("--layer", type=int, default=8)
    e.add_argument("--every-layer", action="store_true", help="every layer's mean and maximum (the named features mean1..meanN, max1..maxN)")
    e.add_argument("--gguf", default=DEFAULT_GGUF)
    s = sub.add_parser("shipped")
    s.add_argument("features")
    s.add_argument("--encoder", default=os.path.expanduser("~/.cache/sluice/guard-minilm-l6-v2"))
    v = sub.add_parser("evaluate")
    for name in ("--train", "--val", "--test", "--unseen"):
        v.add_argument(name, required=True)
    v.add_argument("--features", default=FEATURES)
    v.add_argument("--c", type=float, default=PROBE_C, help="the logistic regression's inverse regularisation")
    v.add_argument("--head", choices=("mlp", "linear"), default=HEAD, help="an MLP (--units, --alpha) or a logistic regression (--c)")
    v.add_argument("--units", type=int, default=MLP_UNITS)
    v.add_argument("--alpha", type=float, default=MLP_ALPHA, help="the MLP's L2 penalty")
    v.add_argument("--seeds", type=int, default=MLP_SEEDS, help="MLPs averaged (random_state 0, 1, ...)")
    f = sub.add_parser("fit")
    f.add_argument("--train", required=True)
    f.add_argument("--val", required=True)
    f.add_argument("--features", default=FEATURES)
    f.add_argument("--c", type=float, default=PROBE_C, help="the logistic regression's inverse regularisation")
    f.add_argument("--head", choices=("mlp", "linear"), default=HEAD, help="an MLP (--units, --alpha) or a logistic regression (--c)")
    f.add_argument("--units", type=int, default=MLP_UNITS)
    f.add_argument("--alpha", type=float, default=MLP_ALPHA, help="the MLP's L2 penalty")
    f.add_argument("--seeds", type=int, default=MLP_SEEDS, help="MLPs averaged (random_state 0, 1, ...)")
    f.add_argument("--gguf", default=DEFAULT_GGUF)
    f.add_argument("--tuned", help="the directory of `probe_tune.py tune`: the spec carries its adapters, and the head reads the tuned layers' features (extracted by `probe_tune.py extract`)")
    args = ap.parse_args()
    {"extract": extract, "shipped": shipped, "evaluate": evaluate, "fit": fit}[args.cmd](args)


if __name__ == "__main__":
    main()
