"""kogpt-fast: a custom-kernel inference runtime for KoGPT-6B and GPT-J-architecture checkpoints.

    from kogpt_fast import KoGPTForCausalLM, KoGPTTokenizer
    tokenizer = KoGPTTokenizer.from_pretrained()          # None: the embedded demo checkpoint
    model = KoGPTForCausalLM.from_pretrained(device="cpu")
    ids = tokenizer.encode("대한민국은", return_tensors="pt")
    print(tokenizer.decode(model.generate(ids, max_new_tokens=32)[0]))

Importing the package never touches a GPU, a compiler or the CUDA library: the public names below are
resolved on first use.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "GPTJConfig": "kogpt_fast.config",
    "ConfigError": "kogpt_fast.config",
    "KoGPTForCausalLM": "kogpt_fast.model",
    "KoGPTTokenizer": "kogpt_fast.tokenizer",
    "GenerationConfig": "kogpt_fast.generation",
    "GenerateDecoderOnlyOutput": "kogpt_fast.generation",
    "CheckpointError": "kogpt_fast.loader",
    "KVCacheExhausted": "kogpt_fast.kv_cache",
    "demo_model_path": "kogpt_fast.demo",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kogpt_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
