#!/usr/bin/env python3
"""Sluice's worker against Hugging Face transformers on one random-weight Qwen2 model.

Generates a random-initialised Qwen2 of a chosen shape with transformers (fixed seed), saves it
as safetensors, runs `sluice-worker bench` on it, and then, on the same device and in the same
dtype:
  * compares Sluice's logits after the prompt with transformers' (max abs / relative diff,
    cosine, top-1 / top-5 agreement),
  * compares the greedy tokens (identical leading tokens, and a teacher-forced check that tells
    a real divergence from a near-tie that bf16 rounding flipped),
  * measures transformers' `generate` decode speed at batch 1 and 32,
  * measures the device's copy bandwidth and the single-stream roofline (bandwidth / bytes read
    per decode step), and Sluice's fraction of it,
and prints a table with the targets and writes a JSON summary (--out).

Needs torch, transformers, safetensors and numpy; no network, no tokenizer, no Rust. The prompt
token ids are Sluice's bench ids: [100 + 7*i (+ b for batch member b)].

  python3 benches/gpu/bench.py --sluice target-cuda/release/sluice-worker --shape 7b
  python3 benches/gpu/bench.py --sluice target/release/sluice-worker --shape tiny \
      --device cpu --dtype f32
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

# Qwen2.5-7B-Instruct's config.json, less the tokenizer ids.
SHAPES = {
    "7b": dict(
        hidden_size=3584,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        intermediate_size=18944,
        vocab_size=152064,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
    ),
    # Small enough for a CPU smoke test in seconds; head_dim 64 like the real models use 128.
    "tiny": dict(
        hidden_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=512,
        vocab_size=4096,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
}

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}

# Targets for the 7b shape on an H100/H200 (see README.md).
TARGET_ROOFLINE_FRACTION = 0.60
TARGET_VS_TRANSFORMERS = 1.5
TARGET_BATCH32_TOK_S = 2000.0


def log(msg: str) -> None:
    print(msg, flush=True)


def prompt_ids(n: int, shift: int = 0) -> list[int]:
    """Sluice's bench prompt (worker/src/bench.rs: prompt_ids)."""
    return [100 + 7 * i + shift for i in range(n)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def candle_config_fields(shape: dict) -> dict:
    """Every field candle-transformers' qwen2::Config deserialises (none optional there)."""
    return dict(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"],
        max_position_embeddings=shape["max_position_embeddings"],
        # Qwen2.5's own files carry sliding_window 131072 with use_sliding_window false;
        # transformers writes null when sliding is off, which candle's usize field rejects.
        sliding_window=shape["max_position_embeddings"],
        max_window_layers=shape["num_hidden_layers"],
        tie_word_embeddings=shape["tie_word_embeddings"],
        rope_theta=shape["rope_theta"],
        rms_norm_eps=shape["rms_norm_eps"],
        use_sliding_window=False,
        hidden_act="silu",
    )


def build_model(shape: dict, dtype: torch.dtype, device: torch.device, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    fields = candle_config_fields(shape)
    cfg = Qwen2Config(**fields, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    # transformers 5 keeps rope_theta in rope_parameters; make sure it is the one we asked for.
    rp = getattr(cfg, "rope_parameters", None)
    if isinstance(rp, dict):
        rp["rope_theta"] = shape["rope_theta"]
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        # Parameters are created and initialised directly on the device, in the target dtype.
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    # No model.to(dtype): that would also round the rotary inv_freq buffer (float32 by design,
    # as from_pretrained leaves it) to bf16.
    model.eval()
    wrong = {str(p.dtype) for p in model.parameters() if p.dtype != dtype or p.device.type != device.type}
    if wrong:
        raise SystemExit(f"parameters not all {dtype} on {device}: {wrong}")
    # transformers initialises biases to 0 and norm weights to 1: perturb them so that a loader
    # that skipped the q/k/v biases or a norm would show up in the logits.
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32) * 0.5)
            elif "norm" in name and p.dim() == 1:
                p.copy_(1.0 + torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32) * 0.1)
    # Check the rotary frequencies are the configured theta's.
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    inv = getattr(getattr(model.model, "rotary_emb", None), "inv_freq", None)
    if inv is not None:
        want = 1.0 / (shape["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        got = inv.detach().double().cpu()
        if not torch.allclose(got, want, rtol=1e-4):
            raise SystemExit(f"transformers' rope inv_freq does not match rope_theta {shape['rope_theta']}")
    return model, fields


def save_model(model, fields: dict, out_dir: str) -> list[str]:
    """save_pretrained, then make config.json carry every field candle needs. Returns the
    fields that had to be added or corrected (candle would have failed on them)."""
    try:
        model.save_pretrained(out_dir, safe_serialization=True)
    except TypeError:  # a transformers without the argument: safetensors is its only format
        model.save_pretrained(out_dir)
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    patched = []
    for k, v in fields.items():
        if cfg.get(k) != v:
            patched.append(f"{k}: {cfg.get(k)!r} -> {v!r}")
            cfg[k] = v
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
    return patched


def run_sluice(args, model_dir: str, logits_path: str) -> tuple[dict | None, str, float]:
    cmd = [
        args.sluice, "bench",
        "--model", model_dir,
        "--device", args.device,
        "--prompt-tokens", str(args.prompt_tokens),
        "--steps", str(args.steps),
        "--batches", args.sluice_batches,
        "--dtype", args.dtype,
        "--logits-out", logits_path,
        "--json",
    ]
    log("$ " + " ".join(cmd))
    t = time.perf_counter()
    lines: list[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + args.sluice_timeout
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if not line.startswith("{"):
                log("  sluice| " + line.rstrip("\n"))
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(cmd, args.sluice_timeout)
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None, f"timed out after {args.sluice_timeout}s", time.perf_counter() - t
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        return None, f"exit status {proc.returncode}: " + " / ".join(lines[-5:]), wall
    for line in reversed(lines):
        if line.startswith("{"):
            return json.loads(line), "", wall
    return None, "no JSON line in its output", wall


def compare_logits(sluice: np.ndarray, ref: np.ndarray) -> dict:
    diff = np.abs(sluice.astype(np.float64) - ref.astype(np.float64))
    scale = float(np.max(np.abs(ref)))
    rms_ref = float(np.sqrt(np.mean(ref.astype(np.float64) ** 2)))
    cos = float(
        np.dot(sluice.astype(np.float64), ref.astype(np.float64))
        / (np.linalg.norm(sluice.astype(np.float64)) * np.linalg.norm(ref.astype(np.float64)))
    )
    top5_s = list(np.argsort(-sluice)[:5])
    top5_r = list(np.argsort(-ref)[:5])
    return dict(
        max_abs_diff=float(diff.max()),
        ref_max_abs=scale,
        max_rel_diff=float(diff.max() / scale) if scale > 0 else math.inf,
        rms_rel_diff=float(np.sqrt(np.mean(diff**2)) / rms_ref) if rms_ref > 0 else math.inf,
        cosine=cos,
        top1_sluice=int(top5_s[0]),
        top1_transformers=int(top5_r[0]),
        top1_agree=bool(top5_s[0] == top5_r[0]),
        top5_overlap=len(set(map(int, top5_s)) & set(map(int, top5_r))),
        top1_gap_transformers=float(ref[top5_r[0]] - ref[top5_r[1]]),
    )


@torch.inference_mode()
def teacher_forced(model, prompt: list[int], tokens: list[int], device) -> dict:
    """Runs transformers over prompt + Sluice's tokens and checks, position by position, that
    Sluice's token is transformers' argmax; where not, how far below the argmax it scored."""
    seq = torch.tensor([prompt + tokens[:-1]], device=device)
    logits = model(seq).logits[0, len(prompt) - 1 :].float()
    want = torch.tensor(tokens, device=device)
    top = logits.argmax(-1)
    agree = top == want
    gaps = (logits.max(-1).values - logits.gather(1, want[:, None])[:, 0])
    mism = (~agree).nonzero().flatten().tolist()
    return dict(
        positions=len(tokens),
        argmax_agree=int(agree.sum().item()),
        first_mismatch=(mism[0] if mism else None),
        max_gap_at_mismatch=(float(gaps[~agree].max().item()) if mism else 0.0),
        logit_std=float(logits.std().item()),
    )


@torch.inference_mode()
def hf_generate(model, prompts: torch.Tensor, new_tokens: int):
    from transformers import GenerationConfig

    gc = GenerationConfig(
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=None,
    )
    out = model.generate(
        prompts, attention_mask=torch.ones_like(prompts), generation_config=gc
    )
    return out[:, prompts.shape[1] :]


def time_generate(model, batch: int, args, device) -> dict:
    prompts = torch.tensor(
        [prompt_ids(args.prompt_tokens, b) for b in range(batch)], device=device
    )
    hf_generate(model, prompts, 8)  # warm-up (kernels, allocator, cuBLAS heuristics)
    sync(device)

    def timed(n: int):
        t = time.perf_counter()
        out = hf_generate(model, prompts, n)
        sync(device)
        return time.perf_counter() - t, out

    # Best of a few runs: prefill + first token alone, then the whole generation.
    prefill = min(timed(1)[0] for _ in range(3))
    total, out = min((timed(args.steps) for _ in range(2)), key=lambda r: r[0])
    assert out.shape == (batch, args.steps), out.shape
    decode = max(total - prefill, 1e-9)
    return dict(
        batch=batch,
        new_tokens=args.steps,
        total_s=total,
        prefill_s=prefill,
        # Everything generate() did, prefill included (nothing subtracted).
        generate_tok_s=batch * args.steps / total,
        # The steps after the first token only, which is what Sluice's decode figure times.
        decode_only_tok_s=batch * (args.steps - 1) / decode,
    )


def copy_bandwidth(device: torch.device) -> dict:
    """Device-to-device (or RAM-to-RAM) copy, bytes read + written per second."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        n = min(2 << 30, free // 4)
        iters = 50
    else:
        n = 256 << 20
        iters = 10
    src = torch.empty(n, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            dst.copy_(src)
        end.record()
        end.synchronize()
        secs = start.elapsed_time(end) / 1e3
    else:
        t = time.perf_counter()
        for _ in range(iters):
            dst.copy_(src)
        secs = time.perf_counter() - t
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(bytes_per_copy=n, iterations=iters, bytes_per_s=2 * n * iters / secs)


def weight_bytes_per_step(model) -> dict:
    """Bytes of parameters one decode step reads: all of them, except that the embedding
    table is only gathered (one row per token)."""
    total = 0
    embed = 0
    seen = set()
    for name, p in model.named_parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        b = p.numel() * p.element_size()
        total += b
        if "embed_tokens" in name:
            embed += b
    row = model.config.hidden_size * next(model.parameters()).element_size()
    return dict(param_bytes=total, embed_bytes=embed, read_per_step=total - embed + row)


def fmt(x, spec=".1f", none="-"):
    return none if x is None else format(x, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sluice", required=True, help="path of the sluice-worker binary")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--device", default="cuda", help="cpu, cuda or cuda:N (both sides)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, f32 on cpu")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--sluice-batches", default=None, help="default: 1,8,32 on cuda, 1,4 on cpu")
    ap.add_argument("--hf-batches", default=None, help="default: 1,32 on cuda, 1,4 on cpu")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--sluice-timeout", type=float, default=300.0, help="seconds for the Sluice run")
    ap.add_argument("--workdir", default=None, help="where the model is written (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated model")
    ap.add_argument("--out", default=None, help="write the JSON summary here")
    args = ap.parse_args()

    device = torch.device(args.device)
    if args.dtype is None:
        args.dtype = "bf16" if device.type == "cuda" else "f32"
    on_gpu = device.type == "cuda"
    if args.sluice_batches is None:
        args.sluice_batches = "1,8,32" if on_gpu else "1,4"
    if args.hf_batches is None:
        args.hf_batches = "1,32" if on_gpu else "1,4"
    if "1" not in args.sluice_batches.split(","):
        raise SystemExit("--sluice-batches must include 1 (the greedy tokens come from it)")
    dtype = DTYPES[args.dtype]
    shape = SHAPES[args.shape]
    if shape["vocab_size"] <= max(prompt_ids(args.prompt_tokens, 64)):
        raise SystemExit("vocabulary too small for the prompt ids")
    args.sluice = os.path.abspath(args.sluice)
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = False

    import transformers

    summary: dict = dict(
        shape=args.shape,
        device=args.device,
        device_name=(torch.cuda.get_device_name(device) if on_gpu else "cpu"),
        dtype=args.dtype,
        prompt_tokens=args.prompt_tokens,
        steps=args.steps,
        torch=torch.__version__,
        transformers=transformers.__version__,
        cpu_threads=torch.get_num_threads(),
    )
    log(f"== {args.shape} Qwen2, {args.dtype}, {summary['device_name']}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}")

    workdir = args.workdir or tempfile.mkdtemp(prefix="sluice-gpu-bench-")
    model_dir = os.path.join(workdir, f"qwen2-{args.shape}-random")
    os.makedirs(model_dir, exist_ok=True)
    failures: list[str] = []
    try:
        # 1. The model.
        t = time.perf_counter()
        model, fields = build_model(shape, dtype, device, args.seed)
        sync(device)
        summary["init_s"] = time.perf_counter() - t
        t = time.perf_counter()
        patched = save_model(model, fields, model_dir)
        summary["save_s"] = time.perf_counter() - t
        summary["config_fields_patched"] = patched
        wb = weight_bytes_per_step(model)
        summary["weights"] = wb
        log(f"model: {wb['param_bytes'] / 1e9:.2f} GB of parameters, initialised in "
            f"{summary['init_s']:.1f}s, saved in {summary['save_s']:.1f}s to {model_dir}")
        if patched:
            log("config.json fields corrected for candle: " + "; ".join(patched))

        # 2. Sluice.
        logits_path = os.path.join(workdir, "sluice-logits.f32")
        report, err, wall = run_sluice(args, model_dir, logits_path)
        summary["sluice_wall_s"] = wall
        summary["sluice"] = report
        if report is None:
            failures.append(f"sluice bench failed: {err}")
            log(f"!! sluice bench failed: {err}")

        # 3. Logits and greedy tokens.
        prompt = prompt_ids(args.prompt_tokens)
        with torch.inference_mode():
            ref = model(torch.tensor([prompt], device=device)).logits[0, -1].float().cpu().numpy()
        ref_tokens = hf_generate(model, torch.tensor([prompt], device=device), args.steps + 1)[0].tolist()
        summary["transformers_tokens"] = ref_tokens
        if report is not None and os.path.exists(logits_path):
            sl = np.fromfile(logits_path, dtype="<f4")
            if sl.shape != ref.shape:
                failures.append(f"logits length {sl.shape[0]} != vocab {ref.shape[0]}")
            else:
                cmp = compare_logits(sl, ref)
                summary["logits"] = cmp
            tok_path = logits_path + ".tokens.json"
            if os.path.exists(tok_path):
                with open(tok_path) as f:
                    s_tokens = json.load(f)
                lead = 0
                for a, b in zip(s_tokens, ref_tokens):
                    if a != b:
                        break
                    lead += 1
                summary["greedy"] = dict(
                    sluice_tokens=s_tokens,
                    compared=min(len(s_tokens), len(ref_tokens)),
                    identical_leading=lead,
                    teacher_forced=teacher_forced(model, prompt, s_tokens, device),
                )
            else:
                failures.append(f"{tok_path} not written")

        # 4. transformers' generate speed.
        hf = []
        for b in [int(x) for x in args.hf_batches.split(",") if x]:
            t = time_generate(model, b, args, device)
            log(f"transformers generate batch {b}: {t['generate_tok_s']:.1f} tok/s with prefill, "
                f"{t['decode_only_tok_s']:.1f} tok/s decode only (prefill {t['prefill_s'] * 1e3:.1f} ms)")
            hf.append(t)
        summary["transformers"] = hf

        # 5. Bandwidth and roofline.
        del model
        if on_gpu:
            torch.cuda.empty_cache()
        bw = copy_bandwidth(device)
        kv_tok = (report or {}).get("kv_bytes_per_token") or (
            shape["num_hidden_layers"] * 2 * shape["num_key_value_heads"]
            * (shape["hidden_size"] // shape["num_attention_heads"]) * torch.finfo(dtype).bits // 8
        )
        # KV read per step at the mean context of the decode run.
        kv_read = kv_tok * (args.prompt_tokens + args.steps / 2)
        step_bytes = wb["read_per_step"] + kv_read
        roofline = bw["bytes_per_s"] / step_bytes
        summary["bandwidth"] = bw
        summary["roofline"] = dict(bytes_per_step=step_bytes, kv_bytes_per_step=kv_read,
                                   single_stream_tok_s=roofline)
        log(f"copy bandwidth: {bw['bytes_per_s'] / 1e9:.0f} GB/s (read + write); "
            f"{step_bytes / 1e9:.3f} GB read per decode step; roofline {roofline:.1f} tok/s single stream")
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    # 6. Table and targets.
    sdec = {d["batch"]: d for d in (report or {}).get("decode", [])}
    hdec = {d["batch"]: d for d in summary["transformers"]}
    log("")
    log(f"{'':34}{'Sluice':>12}{'transformers':>14}{'ratio':>8}")
    if report:
        log(f"{'load (s)':34}{report['load_s']:>12.1f}")
        log(f"{'prompt processing (tok/s)':34}{report['prompt_tok_s']:>12.1f}")
        log(f"{'time to first token (ms)':34}{report['ttft_ms']:>12.1f}"
            + (f"{hdec[1]['prefill_s'] * 1e3:>14.1f}" if 1 in hdec else ""))
    for b in sorted(set(sdec) | set(hdec)):
        s = sdec.get(b, {}).get("aggregate_tok_s")
        h = hdec.get(b, {}).get("decode_only_tok_s")
        r = (s / h) if s and h else None
        log(f"{f'decode batch {b} (tok/s, decode only)':34}{fmt(s):>12}{fmt(h):>14}{fmt(r, '.2f'):>8}")
        hg = hdec.get(b, {}).get("generate_tok_s")
        if hg:
            r2 = (s / hg) if s else None
            log(f"{f'  vs generate() incl. prefill':34}{'':>12}{fmt(hg):>14}{fmt(r2, '.2f'):>8}")
    if "logits" in summary:
        c = summary["logits"]
        log(f"logits: max abs diff {c['max_abs_diff']:.3g} (max |logit| {c['ref_max_abs']:.3g}, "
            f"rel {c['max_rel_diff']:.3g}, rms rel {c['rms_rel_diff']:.3g}), cosine {c['cosine']:.6f}, "
            f"top-1 {'agrees' if c['top1_agree'] else 'DIFFERS'}, top-5 overlap {c['top5_overlap']}/5")
    if "greedy" in summary:
        g = summary["greedy"]
        tf = g["teacher_forced"]
        log(f"greedy: {g['identical_leading']}/{g['compared']} identical leading tokens; teacher-forced "
            f"{tf['argmax_agree']}/{tf['positions']} of Sluice's tokens are transformers' argmax"
            + (f" (largest shortfall at a mismatch {tf['max_gap_at_mismatch']:.3g}, logit std "
               f"{tf['logit_std']:.3g})" if tf["first_mismatch"] is not None else ""))

    # Correctness verdicts: exact-ish in f32, loose in half precision.
    checks = []
    if "logits" in summary:
        c = summary["logits"]
        if args.dtype == "f32":
            checks.append(("logits match (f32: rel diff < 1e-4, top-1 agrees)",
                           c["max_rel_diff"] < 1e-4 and c["top1_agree"]))
        else:
            checks.append(("logits match (half: cosine > 0.999, top-5 overlap >= 4)",
                           c["cosine"] > 0.999 and c["top5_overlap"] >= 4))
    if "greedy" in summary:
        tf = summary["greedy"]["teacher_forced"]
        tol = 1e-3 if args.dtype == "f32" else 0.05 * max(tf["logit_std"], 1e-6) + 0.1
        checks.append((f"greedy tokens are transformers' argmax or a near-tie (gap <= {tol:.3g})",
                       tf["first_mismatch"] is None or tf["max_gap_at_mismatch"] <= tol))
    s1 = sdec.get(1, {}).get("aggregate_tok_s")
    s32 = sdec.get(32, {}).get("aggregate_tok_s")
    roof = summary.get("roofline", {}).get("single_stream_tok_s")
    targets = []
    if s1 and roof:
        summary["roofline"]["sluice_fraction"] = s1 / roof
        targets.append((f">= {TARGET_ROOFLINE_FRACTION:.0%} of the single-stream roofline",
                        f"{s1 / roof:.1%}", s1 / roof >= TARGET_ROOFLINE_FRACTION))
    for b in (1, 32):
        s, h = sdec.get(b, {}).get("aggregate_tok_s"), hdec.get(b, {}).get("decode_only_tok_s")
        hg = hdec.get(b, {}).get("generate_tok_s")
        if s and h:
            targets.append((f">= {TARGET_VS_TRANSFORMERS}x transformers at batch {b} (decode only)",
                            f"{s / h:.2f}x", s / h >= TARGET_VS_TRANSFORMERS))
        if s and hg:
            targets.append((f">= {TARGET_VS_TRANSFORMERS}x transformers at batch {b} (generate incl. prefill)",
                            f"{s / hg:.2f}x", s / hg >= TARGET_VS_TRANSFORMERS))
    if s32:
        targets.append((f">= {TARGET_BATCH32_TOK_S:.0f} tok/s aggregate at batch 32", f"{s32:.0f}",
                        s32 >= TARGET_BATCH32_TOK_S))
    log("")
    log("correctness:")
    for name, ok in checks:
        log(f"  [{'ok' if ok else 'FAIL'}] {name}")
    log("targets" + ("" if args.shape == "7b" and on_gpu else " (meant for --shape 7b on an H100/H200)") + ":")
    for name, value, ok in targets:
        log(f"  [{'met' if ok else 'MISSED'}] {name}: {value}")
    summary["checks"] = [dict(name=n, ok=ok) for n, ok in checks]
    summary["targets"] = [dict(name=n, value=v, met=ok) for n, v, ok in targets]
    summary["failures"] = failures
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)
        log(f"summary written to {args.out}")
    for f_ in failures:
        log(f"FAILED: {f_}")
    return 1 if failures or not all(ok for _, ok in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
