"""A fake Hugging Face hub cache made from the demo checkpoint: kakaobrain/kogpt with KoGPT's two revisions.

HF's layout (huggingface_hub's cache): HF_HUB_CACHE/models--kakaobrain--kogpt/refs/<revision> holds a commit sha,
snapshots/<sha>/ the files (links into blobs/, as hf download leaves them). The two revisions differ in one visible
way, n_positions (GPT-J has no position weights, so the same weights load under either): 512 in the float16
revision, 256 in the float32 one.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from kogpt_fast.demo import demo_model_path

REPO_ID = "kakaobrain/kogpt"
REVISIONS = {  # revision -> (commit sha, n_positions)
    "KoGPT6B-ryan1.5b-float16": ("a" * 8 + "0123456789abcdef0123456789abcdef", 512),
    "KoGPT6B-ryan1.5b": ("b" * 8 + "0123456789abcdef0123456789abcdef", 256),
}
FILES = ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json")


def build_fake_hub_cache(cache: Path) -> Path:
    """Write the fake cache under `cache` (what HF_HUB_CACHE would point at); returns `cache`."""
    repo = cache / ("models--" + REPO_ID.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    demo = demo_model_path()
    for revision, (sha, n_positions) in REVISIONS.items():
        snapshot = repo / "snapshots" / sha
        snapshot.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            data = (demo / name).read_bytes()
            if name == "config.json":
                data = json.dumps({**json.loads(data), "n_positions": n_positions}, indent=2).encode()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            if not blob.exists():
                blob.write_bytes(data)
            (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
        (repo / "refs" / revision).write_text(sha)
    return cache
