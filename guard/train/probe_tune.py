#!/usr/bin/env python3
"""The served model's probe with its layers fine-tuned: LoRA adapters (rank 8, on every
projection) of the first 8 decoder layers of Qwen2.5-Coder-0.5B-Instruct (the test GGUF,
dequantised by transformers), trained together with a small head, instead of a head over frozen
states; then the shipped probe recipe (`probe.py`: five MLPs over the means of layers 1 to 8 and
layer 8's maximum) fitted over the tuned layers' features.

`tune` trains the adapters with a head that reads `mean8` and `max8` (layer 8's output under
the final RMSNorm, averaged over the window's tokens and its maximum over them), standardised
with the untuned model's means and spreads over 1 024 training rows, through an MLP of 64 ReLU
units: binary cross-entropy on the training split (the first 128-token window of each text, as
`probe.py extract` reads it), AdamW, one epoch, in bfloat16 matrix products (AMX or AVX-512
BF16 where the CPU has them; about 20 minutes for 16 000 rows on 2 Xeon cores with AMX).

Run in the training venv with guard/train/requirements-probe.txt, after prepare.py:

  probe_tune.py tune DIR [--rows 16000] [--epochs 1] [--rank 8]
  probe_tune.py score DIR SPLIT OUT.npz      # the tuning head's logits, in the split's order
  probe.py shipped OUT.npz                    # the shipped classifier's logits beside them
  probe_tune.py evaluate --val V.npz --test T.npz --unseen U.npz
  probe_tune.py extract DIR SPLIT OUT.npz    # every layer's mean and maximum, tuned (train,
                                              # val, test, unseen; `probe.py shipped` for the
                                              # last three)
  probe.py evaluate --train TRAIN.npz --val VAL.npz --test TEST.npz --unseen UNSEEN.npz
  probe.py fit --train TRAIN.npz --val VAL.npz --tuned DIR    # the spec, adapters included

`evaluate` combines the tuning head's logit with the shipped classifier's as `probe.py` does
(each in units of its spread over the validation split's benign rows, the probe's weight and
the threshold chosen on the validation split) and prints recall at 1 % false positives.
docs/results/guard.md has the figures.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from embed import mask_encoded  # noqa: E402
from probe import ADAPTED, DEFAULT_GGUF, TOKENS, batch_tensors, combination, figures, load_model, rows_of  # noqa: E402

SEED = 20261207
LAYER = 8
TARGETS = tuple(ADAPTED.values())
UNITS = 64
BATCH = 32


def torch_setup():
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    return torch


def lora_model(gguf, rank, alpha):
    """The cut model in bfloat16 with f32 LoRA adapters on every projection; only the adapters
    train."""
    torch = torch_setup()
    from torch import nn

    class Lora(nn.Module):
        def __init__(self, base, gen):
            super().__init__()
            self.base = base
            self.a = nn.Parameter(torch.randn(rank, base.in_features, generator=gen) / math.sqrt(base.in_features))
            self.b = nn.Parameter(torch.zeros(base.out_features, rank))
            self.scale = alpha / rank

        def forward(self, x):
            return self.base(x) + (x @ self.a.to(x.dtype).t()) @ (self.b.to(x.dtype).t() * self.scale)

    tok, model = load_model(gguf, LAYER)
    model = model.to(torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(SEED)
    for layer in model.model.layers:
        for target in TARGETS:
            parent_name, name = target.split(".")
            parent = getattr(layer, parent_name)
            setattr(parent, name, Lora(getattr(parent, name), gen))
    return tok, model


def tuning_head(width):
    """The head trained with the adapters: dropout, `UNITS` ReLU units, one logit."""
    from torch import nn

    return nn.Sequential(nn.Dropout(0.1), nn.Linear(width, UNITS), nn.ReLU(), nn.Linear(UNITS, 1))


def adapters(model):
    """The adapters' tensors by the GGUF name of the projection they adapt:
    `blk.{i}.{attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down}.lora_{a|b}` (b
    multiplied by the scale), so that W + b·a is the tuned weight, `(out, in)`."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        for gguf_name, target in ADAPTED.items():
            parent_name, name = target.split(".")
            m = getattr(getattr(layer, parent_name), name)
            out[f"blk.{i}.{gguf_name}.lora_a"] = m.a.detach().float().numpy()
            out[f"blk.{i}.{gguf_name}.lora_b"] = (m.b.detach().float() * m.scale).numpy()
    return out


def first_windows(tok, texts):
    return [tok(mask_encoded(t), add_special_tokens=False)["input_ids"][:TOKENS] or [tok.eos_token_id] for t in texts]


def features(torch, model, x, mask):
    """`mean8` and `max8` side by side, f32: `(batch, 2 * hidden)`."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model.model(input_ids=x, attention_mask=mask).last_hidden_state
    h = h.float()
    mf = mask.float()[:, :, None]
    mean = (h * mf).sum(1) / mf.sum(1)
    top = h.masked_fill(mask[:, :, None] == 0, -1e9).amax(1)
    return torch.cat([mean, top], 1)


def batches(lengths, rng):
    """Batches of similar length in a seeded random order."""
    idx = rng.permutation(len(lengths))
    out = []
    for s in range(0, len(idx), BATCH * 64):
        chunk = sorted(idx[s:s + BATCH * 64], key=lambda i: lengths[i])
        out.extend(chunk[k:k + BATCH] for k in range(0, len(chunk), BATCH))
    return [out[i] for i in rng.permutation(len(out))]


def tune(args):
    torch = torch_setup()
    from torch import nn

    rows = rows_of("train")
    rng = np.random.default_rng(SEED)
    if args.rows:
        rows = [rows[i] for i in rng.permutation(len(rows))[: args.rows]]
    tok, model = lora_model(args.gguf, args.rank, args.alpha)
    windows = first_windows(tok, [r["text"] for r in rows])
    y = torch.tensor([float(r["label"]) for r in rows])
    # Standardisation from the untuned model (the adapters start at zero).
    sample = rng.permutation(len(windows))[:1024]
    with torch.no_grad():
        f = torch.cat([features(torch, model, *batch_tensors([windows[i] for i in sample[s:s + 64]])) for s in range(0, len(sample), 64)])
    mean, scale = f.mean(0), f.std(0).clamp_min(1e-4)
    head = tuning_head(f.shape[1])
    lora = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": lora, "lr": args.lr, "weight_decay": 0.0}, {"params": head.parameters(), "lr": args.head_lr, "weight_decay": 0.01}])
    plan = [b for _ in range(args.epochs) for b in batches([len(w) for w in windows], rng)]
    warmup = 50
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1 - s / len(plan)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started, seen, loss_sum = time.time(), 0, 0.0
    model.train()
    for step, b in enumerate(plan):
        x, mask = batch_tensors([windows[i] for i in b])
        z = head((features(torch, model, x, mask) - mean) / scale)[:, 0]
        loss = nn.functional.binary_cross_entropy_with_logits(z, y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        seen += len(b)
        loss_sum += float(loss) * len(b)
        if (step + 1) % 50 == 0 or step + 1 == len(plan):
            print(f"step {step + 1}/{len(plan)} loss {loss_sum / seen:.4f} {time.time() - started:.0f} s", file=sys.stderr, flush=True)
            seen, loss_sum = 0, 0.0
    model.eval()
    head.eval()
    state = {"adapters": adapters(model), "mean": mean.numpy(), "scale": scale.numpy(), "head": {k: v.detach().numpy() for k, v in head.state_dict().items()},
             "rank": args.rank, "alpha": args.alpha, "epochs": args.epochs, "rows": len(rows), "lr": args.lr, "head_lr": args.head_lr}
    torch.save(state, out / "tuned.pt")
    print(json.dumps({k: v for k, v in state.items() if k not in ("adapters", "mean", "scale", "head")}))


def load_tuned(gguf, out):
    torch = torch_setup()
    state = torch.load(Path(out) / "tuned.pt", weights_only=False)
    tok, model = lora_model(gguf, state["rank"], state["alpha"])
    with torch.no_grad():
        for key, value in state["adapters"].items():
            _, i, gguf_name, ab = key.split(".")
            parent_name, name = ADAPTED[gguf_name].split(".")
            m = getattr(getattr(model.model.layers[int(i)], parent_name), name)
            if ab == "lora_a":
                m.a.copy_(torch.from_numpy(value))
            else:
                m.b.copy_(torch.from_numpy(value) / m.scale)
    head = tuning_head(len(state["mean"]))
    head.load_state_dict({k: torch.from_numpy(v) for k, v in state["head"].items()})
    return tok, model.eval(), head.eval(), torch.from_numpy(state["mean"]), torch.from_numpy(state["scale"])


def tuned_batches(args):
    """The split's rows and the tuned model, and its first windows in batches of 64 of similar
    length: (row indices, input ids, mask) each."""
    torch = torch_setup()
    rows = rows_of(args.split)
    tok, model, head, mean, scale = load_tuned(args.gguf, args.out)
    windows = first_windows(tok, [r["text"] for r in rows])
    order = sorted(range(len(windows)), key=lambda i: len(windows[i]))
    batched = ((order[s:s + 64], *batch_tensors([windows[i] for i in order[s:s + 64]])) for s in range(0, len(order), 64))
    return torch, rows, (model, head, mean, scale), batched


def labelled(rows):
    return {"y": np.array([r["label"] for r in rows]), "lang": np.array([r["lang"] for r in rows])}


def score(args):
    torch, rows, (model, head, mean, scale), batched = tuned_batches(args)
    z = np.zeros(len(rows), np.float32)
    started = time.time()
    with torch.no_grad():
        for b, x, mask in batched:
            z[b] = head((features(torch, model, x, mask) - mean) / scale)[:, 0].numpy()
    print(f"{len(z)} rows, {time.time() - started:.0f} s", file=sys.stderr)
    np.savez(args.file, tuned=z, **labelled(rows))
    Path(args.file + ".texts.json").write_text(json.dumps([mask_encoded(r["text"]) for r in rows], ensure_ascii=False), encoding="utf-8")


def extract(args):
    """Every layer's mean and maximum through the tuned layers (bfloat16 products), in the
    split's file order, as `probe.py extract --every-layer` writes them, so that `probe.py
    evaluate` fits its head over the tuned states."""
    torch, rows, (model, _, _, _), batched = tuned_batches(args)
    layers = len(model.model.layers)
    feats = np.zeros((len(rows), 2 * layers, model.config.hidden_size), np.float32)
    started = time.time()
    with torch.no_grad():
        for b, x, mask in batched:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                o = model.model(input_ids=x, attention_mask=mask, output_hidden_states=True)
            mf = mask.float()[:, :, None]
            for l in range(1, layers + 1):
                hl = (o.last_hidden_state if l == layers else model.model.norm(o.hidden_states[l])).float()
                feats[b, l - 1] = ((hl * mf).sum(1) / mf.sum(1)).numpy()
                feats[b, layers + l - 1] = hl.masked_fill(mask[:, :, None] == 0, -1e9).amax(1).numpy()
    print(f"{len(rows)} rows, {time.time() - started:.0f} s", file=sys.stderr)
    named = {f"mean{l}": feats[:, l - 1] for l in range(1, layers + 1)}
    named.update({f"max{l}": feats[:, layers + l - 1] for l in range(1, layers + 1)})
    np.savez(args.file, **named, **labelled(rows))


def evaluate(args):
    def load(path):
        d = np.load(path)
        return d["y"], d["lang"], d["tuned"], np.load(path + ".shipped.npy")

    vy, _, vp, vs = load(args.val)
    ty, tl, tp, ts = load(args.test)
    uy, ul, up, us = load(args.unseen)
    ss, sp, best, _ = combination(vy, vp, vs)
    result = {"probe_weight_chosen_on_val": best}
    for name, (a, b) in {"shipped": (1.0, 0.0), "tuned probe": (0.0, 1.0), f"shipped + {best} x tuned probe": (1.0, best)}.items():
        result[name] = figures(a / ss, b / sp, (vy, vp, vs), (ty, tl, tp, ts), (uy, ul, up, us))
    print(json.dumps(result, indent=1))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tune")
    t.add_argument("out")
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--rank", type=int, default=8)
    t.add_argument("--alpha", type=float, default=16.0)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--head-lr", type=float, default=1e-3)
    t.add_argument("--rows", type=int, default=0, help="a seeded sample of the training rows (0: all)")
    t.add_argument("--gguf", default=DEFAULT_GGUF)
    s = sub.add_parser("score")
    s.add_argument("out")
    s.add_argument("split")
    s.add_argument("file")
    s.add_argument("--gguf", default=DEFAULT_GGUF)
    x = sub.add_parser("extract")
    x.add_argument("out")
    x.add_argument("split")
    x.add_argument("file")
    x.add_argument("--gguf", default=DEFAULT_GGUF)
    e = sub.add_parser("evaluate")
    for name in ("--val", "--test", "--unseen"):
        e.add_argument(name, required=True)
    args = ap.parse_args()
    {"tune": tune, "score": score, "extract": extract, "evaluate": evaluate}[args.cmd](args)


if __name__ == "__main__":
    main()
