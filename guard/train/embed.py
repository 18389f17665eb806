#!/usr/bin/env python3
"""Embeds every text of guard/train/build/*.jsonl not embedded yet, with the Rust encoder,
after `mask_encoded` (what the classifier sees).

The cache, build/embeddings-<encoder sha256>.bin, holds per text (keyed by the SHA-256 of
its UTF-8) its window count and windows, in the format `sluice-guard-embed` writes; a text
embedded once is never embedded again for the same encoder weights.

  python embed.py EMBEDDER ENCODER_DIR ENCODER_SHA256
"""

import hashlib
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

BUILD = Path(__file__).resolve().parent / "build"
SPLITS = ("train", "val", "test", "unseen")
WIDTH = 384


ENCODED_RUN = re.compile(r"[A-Za-z0-9+/=_-]{20,}")


def mask_encoded(text: str) -> str:
    """guard/src/classifier/mod.rs `mask_encoded`: long runs of base64/hex-like characters with
    both a letter and a digit become " [encoded] " (their decoded layers are scored apart)."""
    def repl(m):
        run = m.group(0)
        if any(c.isdigit() for c in run) and any(c.isalpha() for c in run):
            return " [encoded] "
        return run
    return ENCODED_RUN.sub(repl, text)


def key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_records(data: bytes, count: int):
    out, off = [], 0
    for _ in range(count):
        (n,) = struct.unpack_from("<I", data, off)
        off += 4
        out.append(np.frombuffer(data, dtype="<f4", count=n * WIDTH, offset=off).reshape(n, WIDTH))
        off += n * WIDTH * 4
    if off != len(data):
        raise ValueError("embedding cache is inconsistent")
    return out


def load_cache(sha: str) -> dict:
    idx = BUILD / f"embeddings-{sha}.idx"
    binf = BUILD / f"embeddings-{sha}.bin"
    if not idx.exists():
        return {}
    keys = idx.read_text().split()
    return dict(zip(keys, read_records(binf.read_bytes(), len(keys))))


def main():
    embedder, encoder_dir, sha = sys.argv[1:4]
    cache = load_cache(sha)
    texts = {}
    for split in SPLITS:
        for line in (BUILD / f"{split}.jsonl").read_text(encoding="utf-8").split("\n"):
            if line.strip():
                t = mask_encoded(json.loads(line)["text"])
                texts.setdefault(key(t), t)
    missing = [(k, t) for k, t in texts.items() if k not in cache]
    print(f"embed: {len(texts)} texts, {len(missing)} to embed", file=sys.stderr)
    if not missing:
        return
    stdin = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for _, t in missing)
    out = subprocess.run([embedder, encoder_dir], input=stdin.encode("utf-8"), stdout=subprocess.PIPE, check=True).stdout
    read_records(out, len(missing))  # validates before appending
    with open(BUILD / f"embeddings-{sha}.bin", "ab") as f:
        f.write(out)
    with open(BUILD / f"embeddings-{sha}.idx", "a") as f:
        f.write("".join(k + "\n" for k, _ in missing))


if __name__ == "__main__":
    main()
