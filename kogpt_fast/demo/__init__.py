"""The embedded demo checkpoint: a small GPT-J with KoGPT's head geometry, in HF format (see README.md here)."""
from __future__ import annotations

from pathlib import Path


def demo_model_path() -> Path:
    """The directory of the embedded demo checkpoint (config.json, model.safetensors, tokenizer files)."""
    return Path(__file__).resolve().parent
