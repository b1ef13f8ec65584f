"""`kogpt-fast convert SRC DST`: any readable checkpoint (typically pytorch_model.bin) -> safetensors.

The output is written into a temporary sibling directory and renamed into place only when complete, so a failed
or interrupted conversion leaves no partial DST. Tensors are read one at a time and written in shards of at most
`shard_bytes`, so a 6B fp32 checkpoint converts within 24 GB of RAM.

With `quantize` ("int8", "fp8"; kogpt_fast.quant) every projection and the lm_head is quantized as it is read, from
the checkpoint's own precision: `NAME.weight` holds the int8 / float8_e4m3fn data and `NAME.weight_scale` the
per-row scales (in `dtype`, default the checkpoint's), and config.json records the scheme in quantization_config.
Such a checkpoint loads quantized as it is, without re-quantizing.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from . import quant
from .config import GPTJConfig
from .loader import IGNORED_KEY, CheckpointReader, Progress, model_dir, parse_dtype

# Files of a HF model directory that travel with the weights.
SIDE_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json",
)
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def convert(src, dst, dtype=None, shard_bytes: int = 4 * 2**30, progress: bool | None = None,
            revision: str | None = None, quantize: str | None = None) -> Path:
    """Write DST (a new directory) holding config.json, model.safetensors (or shards + index) and side files.
    SRC: a checkpoint directory, or a hub id (at `revision`) that the local HF cache holds."""
    from safetensors.torch import save_file

    src, dst = model_dir(src, revision=revision), Path(dst)
    dtype = parse_dtype(dtype)
    quantize = quant.check_scheme(quantize)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} already exists and is not an empty directory; choose another destination")
    config = GPTJConfig.from_json_file(src / "config.json")  # refuse what the runtime could not load anyway
    stored = quant.checkpoint_scheme(config.extra, str(src / "config.json"))
    if stored is not None:
        raise ValueError(f"{src} is a quantized checkpoint ({stored}) already: convert reads dense checkpoints")
    to_quantize = set(quant.quantized_names(config.n_layer, config.tie_word_embeddings)) if quantize else set()
    quantizer = quant.Quantizer(quantize, dtype) if quantize else None
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        with CheckpointReader(src) as reader:
            names = sorted(n for n in reader.names if not IGNORED_KEY.match(n))
            bar = Progress(len(names), "converting", progress if progress is not None else reader.nbytes() > 2**30)
            weight_map: dict[str, str] = {}
            shard: dict[str, torch.Tensor] = {}
            shard_size = 0
            scale_dtype = dtype

            def flush():
                file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
                save_file(shard, tmp / file, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, file))
                shard.clear()

            def add(name, tensor):
                nonlocal shard_size
                nbytes = tensor.numel() * tensor.element_size()
                if shard and shard_size + nbytes > shard_bytes:
                    flush()
                    shard_size = 0
                shard[name] = tensor.contiguous().clone()  # own memory: never a view into an mmap'd .bin
                shard_size += nbytes

            for name in names:
                tensor = reader.get(name)
                if name in to_quantize:
                    for done, qweight in quantizer.add(name, tensor):
                        add(done, qweight.data)
                        add(done.removesuffix("weight") + "weight_scale", qweight.scale)
                        scale_dtype = qweight.scale.dtype
                else:
                    add(name, tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor)
                bar.update()
            if quantizer is not None:
                quantizer.finish()
            flush()
        files = sorted(set(weight_map.values()))
        if len(files) == 1:
            os.replace(tmp / files[0], tmp / "model.safetensors")
        else:
            total = sum((tmp / f).stat().st_size for f in files)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        data = json.loads((src / "config.json").read_text(encoding="utf-8"))
        if dtype is not None:
            data["torch_dtype"] = DTYPE_NAMES[dtype]
            data.pop("dtype", None)
        if quantize:
            data["quantization_config"] = quant.quantization_config(quantize, scale_dtype, config.tie_word_embeddings)
        (tmp / "config.json").write_text(json.dumps(data, indent=2, ensure_ascii=False))
        for side in SIDE_FILES:
            if (src / side).is_file():
                shutil.copy2(src / side, tmp / side)
        if dst.exists():
            dst.rmdir()  # empty, checked above
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
